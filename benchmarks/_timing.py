"""The one timing loop of the benchmarks: the variants being compared are called
round-robin, after a warm-up call each (compile time, reported apart), every timed
call ended by `jax.block_until_ready`, so that a slow phase of a shared machine hits
every variant alike."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def spread(values, fmt: str = ".3f") -> str:
    """`median (min–max)` of `values`, each formatted by `fmt`."""
    median = statistics.median(values)
    return f"{median:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


@dataclasses.dataclass
class Timing:
    """One variant's calls: the warm-up's seconds, then every timed call's wall-clock
    and CPU seconds (this process's, all its threads: less disturbed by other jobs
    on a shared machine); the warm-up's output and the last call's."""

    first_call_seconds: float
    seconds: list[float]
    cpu_seconds: list[float]
    first: Any = None
    last: Any = None

    @property
    def median(self) -> float:
        return float(statistics.median(self.seconds))

    def spread(self, fmt: str = ".3f") -> str:
        """`median (min–max)` of the timed seconds."""
        return spread(self.seconds, fmt)

    def record(self) -> dict:
        """The timings as a results file stores them."""
        return dict(
            first_call_seconds=self.first_call_seconds,
            seconds=self.seconds,
            median_seconds=self.median,
            min_seconds=min(self.seconds),
            max_seconds=max(self.seconds),
            cpu_seconds=self.cpu_seconds,
            median_cpu_seconds=float(statistics.median(self.cpu_seconds)),
        )


def time_interleaved(
    programs: dict[Any, Callable[[], Any]],
    repeats: int,
    *,
    timer: Callable[[Any, float], float] | None = None,
) -> dict[Any, Timing]:
    """Call every program once to warm up, then `repeats` rounds in which each runs
    once, in order.

    **Arguments:**

    - `programs`: name to a function of no arguments (a closure that updates its
        own state, for a step that returns new parameters); its output is waited for
        with `jax.block_until_ready`.
    - `repeats`: timed calls of each program.
    - `timer`: optional `(output, wall_seconds) -> seconds`, for a program that
        times itself (`eqx_mtp.generate`'s `seconds` leave its compile-cache lookup
        out); by default the wall clock around the call.

    **Returns:**

    A [`Timing`][] per program, in the order of `programs`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")

    def call(program):
        wall, cpu = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(program())
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        return (wall if timer is None else timer(out, wall)), cpu, out

    timings = {}
    for name, program in programs.items():
        seconds, _, out = call(program)
        timings[name] = Timing(seconds, [], [], first=out, last=out)
        print(f"{name}: first call {seconds:.2f}s", flush=True)
    for repeat in range(repeats):
        for name, program in programs.items():
            seconds, cpu, timings[name].last = call(program)
            timings[name].seconds.append(seconds)
            timings[name].cpu_seconds.append(cpu)
            print(f"repeat {repeat} {name}: {seconds:.3f}s", flush=True)
    return timings
