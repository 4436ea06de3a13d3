"""The benchmarks' one timing loop (`benchmarks/_timing.py`): the order of its calls,
what it keeps, and its statistics, on programs that record when they run. No speed
is asserted."""

import jax.numpy as jnp
import pytest

from benchmarks._timing import Timing, spread, time_interleaved


def test_warm_up_then_round_robin():
    calls = []

    def program(name):
        def run():
            calls.append(name)
            return jnp.full((2,), len(calls))

        return run

    timings = time_interleaved({"a": program("a"), "b": program("b")}, 3)
    # One warm-up call each, excluded from the timed calls, then rounds of a, b.
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert list(timings) == ["a", "b"]
    for timing in timings.values():
        assert len(timing.seconds) == len(timing.cpu_seconds) == 3
        assert timing.first_call_seconds >= 0
    # The last output is the last timed call's: b ran eighth.
    assert timings["b"].last.tolist() == [8, 8]


def test_a_program_that_times_itself():
    timings = time_interleaved(
        {"own": lambda: 0.25}, 2, timer=lambda out, wall: float(out)
    )
    assert timings["own"].seconds == [0.25, 0.25]
    assert timings["own"].first_call_seconds == 0.25


def test_statistics_and_record():
    timing = Timing(9.0, [3.0, 1.0, 2.0], [0.5, 0.25, 1.0])
    assert timing.median == 2.0
    assert timing.spread(".1f") == "2.0 (1.0–3.0)"
    assert spread([1000.0, 3000.0, 2500.0], ",.0f") == "2,500 (1,000–3,000)"
    assert timing.record() == dict(
        first_call_seconds=9.0,
        seconds=[3.0, 1.0, 2.0],
        median_seconds=2.0,
        min_seconds=1.0,
        max_seconds=3.0,
        cpu_seconds=[0.5, 0.25, 1.0],
        median_cpu_seconds=0.5,
    )


def test_no_repeats_is_an_error():
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        time_interleaved({"a": lambda: 0}, 0)
