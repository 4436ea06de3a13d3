"""`python -m benchmarks`: every benchmark of the registry below, one process each.

    python -m benchmarks [--quick] [--only NAME ...] [--mesh data=D,model=M,context=C]
        [--decode-run NAME=DIR ...] [--results-dir DIR]
        [--coordinator HOST:PORT --num-processes N --process-id I | --distributed]

Each benchmark runs as `python benchmarks/<name>.py` in a process of its own, the
command that also runs it alone. A process each, because the scripts set process-wide
state before JAX starts (`mesh.py` gives itself 8 simulated CPU devices, the others
use the real ones); because compiled programs and buffers are freed between
benchmarks (one process compiling hundreds of programs once crashed in XLA, see
`tests/conftest.py`); and because a benchmark that fails does not take the rest with
it. This process imports neither JAX nor `eqx_mtp`: on a TPU host the chips belong
to whichever process opens them first.

In a multi-process run (the multi-host flags, `--distributed`, or a multi-host Cloud
TPU slice, which JAX detects) every process runs this same command; each benchmark's
processes join one `jax.distributed` run, and only process 0 writes files.

**Adding a benchmark.** Write `benchmarks/<name>.py` that takes `--quick` (tiny
sizes, one repeat, minutes at most on a CPU) and `_common.add_run_flags`'s flags
(`_common.model_parser` adds both), calls `_common.start(args)` before touching a
device, times with `_timing.time_interleaved` (reads HLO with `_hlo`), records
`_common.environment()` in its payload, and writes with `_common.publish(name,
payload, section, args)`; then add a `Benchmark` to `BENCHMARKS`, with an
`arguments` function if it needs flags from the suite's options (as `mesh` and
`decode` do).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MESH_AXES = ("data", "model", "context")
# Names the file where a benchmark's process 0 lists the files it wrote (this module
# does not import `_common`, which imports JAX; `_common` imports this).
REPORT = "BENCHMARKS_SUITE_REPORT"


class Skip(Exception):
    """Raised by a `Benchmark.arguments` function: the benchmark cannot run with these
    options; the message says why."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What the suite was asked for, as the `arguments` functions see it."""

    quick: bool
    mesh: dict[str, int] | None
    decode_runs: tuple[str, ...]
    multiprocess: bool


def _no_arguments(options: Options) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One entry of the suite: `benchmarks/<name>.py`, which writes `<name>.json` and
    the docs section `name`; `arguments` gives its own flags (beyond `--quick`, the
    results directory and the multi-process flags, which every script takes) or
    raises `Skip`."""

    name: str
    arguments: Callable[[Options], list[str]] = _no_arguments

    @property
    def script(self) -> pathlib.Path:
        return HERE / f"{self.name}.py"

    def summary(self) -> str:
        """The first line of the script's docstring, read without importing it."""
        docstring = ast.get_docstring(ast.parse(self.script.read_text())) or ""
        return " ".join(docstring.split("\n\n")[0].split())


def _mesh_arguments(options: Options) -> list[str]:
    if options.mesh is None:
        return []  # mesh.py's own meshes, on 8 simulated CPU devices
    sizes = ",".join(str(options.mesh[axis]) for axis in MESH_AXES)
    return ["--meshes", sizes, "--real-devices"]


def _decode_arguments(options: Options) -> list[str]:
    if options.decode_runs:
        return [flag for run in options.decode_runs for flag in ("--run", run)]
    if not options.quick:
        raise Skip(
            "decode needs trained runs: pass --decode-run NAME=DIR (e.g. "
            "default=runs/default after `eqx-mtp train --run runs/default`; "
            "docs/benchmarks.md#decoding has the two the docs report)"
        )
    if options.multiprocess:
        raise Skip(
            "decode --quick trains its tiny run in one process; in a multi-process "
            "run pass --decode-run NAME=DIR"
        )
    return []  # decode.py --quick trains a tiny run itself


def _learning_arguments(options: Options) -> list[str]:
    if options.multiprocess:
        raise Skip("learning trains its runs in one process")
    if not options.quick:
        raise Skip(
            "learning trains 10 configurations × 3 seeds of the default job (hours on "
            "a CPU): run `python -m benchmarks.learning` alone "
            "(docs/benchmarks.md#objectives-at-equal-compute)"
        )
    return []  # a tiny model, D = 0 and 1: seconds


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("loss_memory"),
    Benchmark("step_memory"),
    Benchmark("compile_time"),
    Benchmark("mtp_overhead"),
    Benchmark("naive_baseline"),
    Benchmark("ce_speed"),
    Benchmark("mfu"),
    Benchmark("mesh", _mesh_arguments),
    Benchmark("decode", _decode_arguments),
    Benchmark("learning", _learning_arguments),
)
"""The suite, in the order it runs. Add new benchmarks here."""


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=4,model=2,context=1"` as `{"data": 4, "model": 2, "context": 1}`; axes
    left out are 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in text.split(","):
        axis, _, size = part.partition("=")
        axis = axis.strip()
        if axis not in MESH_AXES or not size.strip().isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(
                f"--mesh must look like 'data=4,model=2,context=1' (axes data, model, "
                f"context; sizes >= 1), got {text!r}"
            )
        sizes[axis] = int(size)
    return sizes


def _parser() -> argparse.ArgumentParser:
    names = [benchmark.name for benchmark in BENCHMARKS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the benchmark suite: each benchmark in its own process, its "
        "results in benchmarks/results/<name>.json and its section of "
        "docs/benchmarks.md.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, one repeat: a smoke run; results go to "
        "benchmarks/results/quick/ and the docs are left as they are",
    )
    parser.add_argument(
        "--only", nargs="+", choices=names, metavar="NAME", help=f"of {names}"
    )
    parser.add_argument("--list", action="store_true", help="name the benchmarks")
    parser.add_argument(
        "--mesh",
        type=parse_mesh,
        help="data=D,model=M,context=C: the mesh `mesh` measures, over every device "
        "JAX sees (default: its own meshes of 8 simulated CPU devices)",
    )
    parser.add_argument(
        "--decode-run",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a trained run for `decode` (repeatable); without one it trains a tiny "
        "run under --quick and is skipped otherwise",
    )
    parser.add_argument(
        "--results-dir",
        help="where the JSON goes (default benchmarks/results, or "
        "benchmarks/results/quick with --quick)",
    )
    group = parser.add_argument_group("several processes (passed to every benchmark)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    group.add_argument("--num-processes", type=int, metavar="N")
    group.add_argument("--process-id", type=int, metavar="I")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="peers detected by JAX (SLURM, Open MPI; a multi-host Cloud TPU slice is "
        "detected without this flag)",
    )
    return parser


def cpu_model() -> str:
    """The CPU's model name (from `/proc/cpuinfo` where there is one)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment() -> dict:
    """Where the suite ran, without importing JAX (each benchmark's JSON has the
    devices)."""

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax=version("jax"),
        jaxlib=version("jaxlib"),
        python=platform.python_version(),
        cpu=cpu_model(),
        cpu_count=os.cpu_count(),
        system=platform.platform(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


def _children_cpu_seconds() -> float:
    """User + system seconds of the finished child processes (on a shared machine
    the wall-clock time says little)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        for benchmark in BENCHMARKS:
            print(f"{benchmark.name:14s} {benchmark.summary()}")
        return
    process_flags = (args.coordinator, args.num_processes, args.process_id)
    if any(flag is not None for flag in process_flags) and None in process_flags:
        parser.error(
            "--coordinator, --num-processes and --process-id go together: pass all "
            "three (or none, on a TPU pod)"
        )
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    options = Options(
        quick=args.quick,
        mesh=args.mesh,
        decode_runs=tuple(args.decode_run),
        multiprocess=args.coordinator is not None
        or args.distributed
        or len(tpu_hosts) > 1,
    )
    if args.results_dir:
        results = pathlib.Path(args.results_dir).resolve()
    else:
        results = RESULTS / "quick" if args.quick else RESULTS
    # Only what differs from the scripts' defaults, so that the commands the docs
    # quote are the ones to type.
    common = ["--quick"] if args.quick else []
    if args.results_dir:
        common += ["--results-dir", str(results)]
    if args.coordinator is not None:
        common += [
            f"--coordinator={args.coordinator}",
            f"--num-processes={args.num_processes}",
            f"--process-id={args.process_id}",
        ]
    if args.distributed:
        common.append("--distributed")
    # The checkout's eqx_mtp, as `python -m benchmarks` from the root sees it.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )

    # Each benchmark's process 0 lists the files it wrote here (`_common.REPORT`).
    scratch = tempfile.TemporaryDirectory(prefix="benchmarks-")
    report = pathlib.Path(scratch.name) / "written"
    env[REPORT] = str(report)

    selected = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    started = time.perf_counter()
    records = []
    for benchmark in selected:
        record = dict(name=benchmark.name)
        try:
            extra = benchmark.arguments(options)
        except Skip as reason:
            print(f"== {benchmark.name}: skipped: {reason}", flush=True)
            records.append(dict(record, status="skipped", reason=str(reason)))
            continue
        command = [sys.executable, str(benchmark.script), *extra, *common]
        shown = shlex.join(["python", f"benchmarks/{benchmark.script.name}", *extra])
        print(f"== {benchmark.name}: {shown}", flush=True)
        record["command"] = shown
        wall, cpu = time.perf_counter(), _children_cpu_seconds()
        report.write_text("")
        returncode = subprocess.run(command, cwd=ROOT, env=env).returncode
        seconds = time.perf_counter() - wall
        record.update(
            status="ok" if returncode == 0 else "failed",
            returncode=returncode,
            seconds=round(seconds, 1),
            cpu_seconds=round(_children_cpu_seconds() - cpu, 1),
            results=report.read_text().splitlines(),
        )
        records.append(record)
        print(f"== {benchmark.name}: {record['status']} in {seconds:.0f} s", flush=True)
    seconds = time.perf_counter() - started
    scratch.cleanup()

    print()
    for record in records:
        detail = record.get("reason") or (
            f"{record['seconds']:.0f} s ({record['cpu_seconds']:.0f} s of CPU)"
        )
        print(f"{record['name']:14s} {record['status']:8s} {detail}")
    cpu_seconds = sum(r.get("cpu_seconds", 0) for r in records)
    print(f"suite: {seconds:.0f} s ({cpu_seconds:.0f} s of CPU)")
    # Process 0 writes: the one whose benchmarks wrote (JAX numbers the processes
    # of a TPU slice), else the one numbered 0.
    primary = any(r.get("results") for r in records) or (
        args.process_id == 0 or not options.multiprocess
    )
    if primary:
        results.mkdir(parents=True, exist_ok=True)
        summary = dict(
            benchmark="suite",
            quick=args.quick,
            command=shlex.join(["python", "-m", "benchmarks", *argv]),
            environment=_environment(),
            mesh=args.mesh,
            num_processes=args.num_processes,
            seconds=round(seconds, 1),
            cpu_seconds=round(cpu_seconds, 1),
            benchmarks=records,
        )
        (results / "suite.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {results / 'suite.json'}")
    if any(r["status"] == "failed" for r in records):
        sys.exit(1)
