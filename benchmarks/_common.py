"""Shared pieces of the benchmark scripts: model shapes, results, the docs table."""

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

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_mtp

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"

_DOC_HEADER = """# Benchmarks

Scripts in `benchmarks/` (not collected by `pytest`). Each writes
`benchmarks/results/<name>.json` and rewrites its own section below, between
`<!-- BEGIN name -->` / `<!-- END name -->` markers. Timings come after a warm-up call,
so compile time is reported apart, and every timed call ends with
`block_until_ready()`.

"""


def environment() -> dict:
    """Where the numbers were taken: they are only comparable on the same machine."""
    try:
        load = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load = None
    return dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax=jax.__version__,
        equinox=eqx.__version__,
        backend=jax.default_backend(),
        device=str(jax.devices()[0].device_kind),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        load_average=load,
    )


def model_parser(
    description: str, *, batch: int, seq: int, dim: int, mlp_dim: int, layers: int
) -> argparse.ArgumentParser:
    """An argument parser with `--quick` and the model-size flags every benchmark
    takes, with these defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--mlp-dim", type=int, default=mlp_dim)
    parser.add_argument("--layers", type=int, default=layers)
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


def write_results(name: str, payload: dict) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_doc_section(name: str, body: str) -> None:
    """Replace this benchmark's section of `docs/benchmarks.md` (append it if absent),
    leaving every other section as it is."""
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
