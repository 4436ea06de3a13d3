"""Shared pieces of the benchmark scripts: the flags every script takes, where it ran,
model shapes, results, the docs table."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from _suite import REPORT, cpu_model

import eqx_mtp

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"

_DOC_HEADER = """# Benchmarks

Scripts in `benchmarks/` (not collected by `pytest`), run together by one command from
the repository root, `python -m benchmarks` ([Running the suite](#running-the-suite)).
Each writes `benchmarks/results/<name>.json` and rewrites its own section below,
between `<!-- BEGIN name -->` / `<!-- END name -->` markers. Timings come after a
warm-up call, so compile time is reported apart, and every timed call ends with
`block_until_ready()`.

"""


def environment() -> dict:
    """Where the numbers were taken: they are only comparable on the same machine.

    Call it after [`start`][] (which joins a multi-process run): the device and
    process counts are then the whole run's.
    """
    try:
        load = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load = None
    devices = jax.devices()
    return dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        equinox=eqx.__version__,
        python=platform.python_version(),
        git=git_state(),
        backend=jax.default_backend(),
        device=str(devices[0].device_kind),
        device_count=len(devices),
        local_device_count=jax.local_device_count(),
        process_count=jax.process_count(),
        cpu=cpu_model(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        system=platform.platform(),
        load_average=load,
    )


# -- the flags every script takes ------------------------------------------------------


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags of where a benchmark runs and where its results go; `python -m
    benchmarks` passes them on to every script. Call [`start`][] after parsing."""
    group = parser.add_argument_group("results and processes")
    group.add_argument(
        "--results-dir",
        default=None,
        help="write the results JSON here (default benchmarks/results, or "
        "benchmarks/results/quick with --quick)",
    )
    group.add_argument("--coordinator", help="HOST:PORT of process 0, multi-process")
    group.add_argument("--num-processes", type=int, help="processes of the run")
    group.add_argument("--process-id", type=int, help="this process's index")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run whose peers JAX detects (SLURM, Open MPI; a "
        "multi-host Cloud TPU slice is detected without this flag)",
    )


def start(args) -> None:
    """Join the multi-process run the flags of [`add_run_flags`][] describe, if any
    (`jax.distributed.initialize`; before anything touches a device)."""
    from eqx_mtp.train._distributed import initialize

    try:
        initialize(
            coordinator=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            auto=args.distributed,
        )
    except ValueError as error:
        sys.exit(str(error))


def model_parser(
    description: str, *, batch: int, seq: int, dim: int, mlp_dim: int, layers: int
) -> argparse.ArgumentParser:
    """An argument parser with `--quick`, the model-size flags every benchmark takes,
    with these defaults, and [`add_run_flags`][]'s."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repeat: a smoke run"
    )
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--mlp-dim", type=int, default=mlp_dim)
    parser.add_argument("--layers", type=int, default=layers)
    add_run_flags(parser)
    return parser


def model_config(
    args,
    *,
    vocab: int,
    num_depths: int,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_seq_len: int | None = None,
    **options,
) -> eqx_mtp.ModelConfig:
    """The benchmarked model: the sizes from `args` (see `model_parser`), 4 query and
    2 key/value heads unless told, rows of at most `max_seq_len` tokens (by default
    exactly `args.seq`)."""
    return eqx_mtp.ModelConfig(
        vocab_size=vocab,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        mlp_dim=args.mlp_dim,
        max_seq_len=args.seq if max_seq_len is None else max_seq_len,
        num_depths=num_depths,
        **options,
    )


def model_settings(args, **extra) -> dict:
    """The sizes from `args` for a results file, with `extra` settings."""
    return dict(
        batch=args.batch,
        seq=args.seq,
        dim=args.dim,
        mlp_dim=args.mlp_dim,
        layers=args.layers,
        **extra,
    )


def abstract_model(config: eqx_mtp.ModelConfig):
    """`(params, static)` of an `MTPModel` as `ShapeDtypeStruct`s: enough to lower and
    compile, nothing allocated."""
    shapes = eqx.filter_eval_shape(eqx_mtp.MTPModel, config, key=jax.random.key(0))

    def is_leaf(x):
        return isinstance(x, jax.ShapeDtypeStruct)

    return eqx.partition(shapes, is_leaf, is_leaf=is_leaf)


def array_bytes(tree) -> int:
    """Total bytes of the arrays (or `ShapeDtypeStruct`s) in `tree`."""
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(
        jnp.dtype(leaf.dtype).itemsize * math.prod(leaf.shape)
        for leaf in leaves
        if hasattr(leaf, "shape")
    )


def packed_rows(
    batch: int, seq: int, vocab: int, *, document_length: int, seed: int = 0
) -> tuple[jax.Array, jax.Array]:
    """`(tokens, segment_ids)`, int32 `[batch, seq]`: random token ids in rows packed
    with documents of `document_length // 2` to `3 * document_length // 2` tokens
    (segment ids 1, 2, … in each row, the last document cut at the row's end; no
    padding)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq), dtype=np.int32)
    segment_ids = np.empty((batch, seq), np.int32)
    low = max(1, document_length // 2)
    high = max(low, 3 * document_length // 2)
    for row in segment_ids:
        start, segment = 0, 1
        while start < seq:
            length = int(rng.integers(low, high + 1))
            row[start : start + length] = segment
            start, segment = start + length, segment + 1
    return jnp.asarray(tokens), jnp.asarray(segment_ids)


def git_state() -> str:
    """The commit the numbers were taken at, marked when `eqx_mtp/` has uncommitted
    changes."""

    def git(*command):
        return subprocess.run(
            ["git", *command], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "eqx_mtp")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (eqx_mtp/ modified)" if dirty else "")


def median(values) -> float:
    return float(statistics.median(values))


def is_primary() -> bool:
    """Whether this process writes files: process 0 of a multi-process run."""
    return jax.process_index() == 0


def results_dir(args) -> pathlib.Path:
    """`--results-dir`, else `benchmarks/results/quick` for a quick run (untracked, so
    a smoke run never replaces a measurement), else `benchmarks/results`."""
    if args.results_dir:
        return pathlib.Path(args.results_dir)
    return RESULTS / "quick" if args.quick else RESULTS


def write_results(name: str, payload: dict, args) -> pathlib.Path | None:
    """Write `payload` as `<name>.json` in [`results_dir`][] (process 0 only; the
    others return `None`)."""
    payload = dict(payload, quick=bool(args.quick))
    if not is_primary():
        print(f"process {jax.process_index()}: process 0 writes {name}.json")
        return None
    directory = results_dir(args)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    if os.environ.get(REPORT):
        with open(os.environ[REPORT], "a") as report:
            report.write(f"{path}\n")
    return path


def publish(name: str, payload: dict, section: str | None, args) -> None:
    """The one report of a benchmark: `payload` as `<name>.json` ([`write_results`][])
    and, unless `section` is `None`, that Markdown as its section of
    `docs/benchmarks.md` ([`write_doc_section`][])."""
    write_results(name, payload, args)
    if section is not None:
        write_doc_section(name, section, args)


def run_line(script: str, environment: dict) -> str:
    """The command and where it ran, as a docs section opens: "`python
    benchmarks/<script> <flags>` (date, device, cores, load average)"."""
    command = " ".join([f"python benchmarks/{script}"] + sys.argv[1:])
    env = environment
    return (
        f"`{command}` ({env['date']}, {env['device']}, {env['cpu_count']} CPU cores "
        f"shared with other jobs, load average {env['load_average']})"
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_doc_section(name: str, body: str, args) -> None:
    """Replace this benchmark's section of `docs/benchmarks.md` (append it if absent),
    leaving every other section as it is. Not for a quick run, and only process 0
    writes."""
    if args.quick:
        print(f"quick run: the {name} section of {DOC} is left as it is")
        return
    if not is_primary():
        return
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    text = DOC.read_text() if DOC.exists() else _DOC_HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"rewrote the {name} section of {DOC}")
