"""A run's directory: which one a command means, creating it once a start succeeded,
and the metrics log inside it."""

from __future__ import annotations

import datetime
import json
import os
import pathlib

import jax

from ._byte_tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer
from ._config import UserError
from ._framing import Framed
from ._text_tokenizer import TextTokenizer

RUNS = pathlib.Path("runs")


def has_checkpoints(run: pathlib.Path) -> bool:
    """Whether `run` holds a finished checkpoint (a step directory)."""
    directory = run / "checkpoints"
    return directory.is_dir() and any(
        p.name.isdigit() for p in directory.iterdir() if p.is_dir()
    )


def newest_run_with_a_checkpoint(flag: str) -> pathlib.Path:
    """The newest run under `runs/` (they are named by their start time) that holds a
    checkpoint; runs that failed to start or never saved are passed over."""
    runs = sorted(p for p in RUNS.glob("*") if p.is_dir() and has_checkpoints(p))
    if not runs:
        raise UserError(
            f"{flag}: no run with a checkpoint under {RUNS}/; pass --run DIR"
        )
    return runs[-1]


def run_directory(directory: str | None, *, resume: bool) -> pathlib.Path:
    """The run directory a job means (not created yet): `directory`, or with `resume`
    the newest run that holds a checkpoint, or a new `runs/<timestamp>`."""
    if directory is not None:
        run = pathlib.Path(directory)
    elif resume:
        run = newest_run_with_a_checkpoint("--resume")
    elif jax.process_count() > 1:
        raise UserError("--run: a multi-process run needs one run directory; pass it")
    else:
        run = RUNS / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    existing = run
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--run: cannot write to {run}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--run: cannot write to {run}: permission denied")
    return run


def create_run_directory(run: pathlib.Path) -> None:
    """Create `run` (in every process), checking that it can be written to."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write-test-{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--run: cannot write to {run}: {error.strerror}") from None


def open_metrics(path: pathlib.Path):
    """Open the metrics log for appending, on a line of its own: a process killed
    mid-write leaves a partial last line, which readers skip."""
    metrics_file = open(path, "a+")
    if metrics_file.tell():
        metrics_file.seek(metrics_file.tell() - 1)
        if metrics_file.read(1) != "\n":
            metrics_file.write("\n")
    return metrics_file


class Discard:
    """Stands in for the metrics file in processes other than the first."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def log(metrics_file, record: dict) -> None:
    """Append `record` as one line of JSON, flushed."""
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()


def read_summary(run: pathlib.Path) -> dict | None:
    """The summary a finished run wrote, or `None`."""
    try:
        return json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def main_loss_units(result: dict) -> str:
    """An eval's main loss in what it measures: bits per byte of text, bits per
    token, or both where they differ."""
    per_token = result.get("main_bits_per_token", result.get("main_bits_per_byte"))
    if "main_bits_per_byte" not in result:
        return f"{per_token:.3f} bits/token"
    per_byte = f"{result['main_bits_per_byte']:.3f} bits/byte"
    if result.get("bytes", result.get("tokens")) == result.get("tokens"):
        return per_byte  # one token per byte: the same figure
    return f"{per_byte}, {per_token:.3f} bits/token"


def format_summary(summary: dict) -> str:
    """The final eval as a Markdown table: one row per depth."""
    result = summary["eval"]
    lines = [
        f"run {summary['run']}, step {summary['step']}, "
        f"{summary['tokens_per_second'] or 0:,.0f} tokens/s, held-out main loss "
        f"{main_loss_units(result)}",
        "",
        "| depth | predicts | loss (nats) | top-1 accuracy | agreement with trunk |",
        "|---|---|---|---|---|",
    ]
    for k, (loss, accuracy, agreement) in enumerate(
        zip(result["depth_losses"], result["depth_accuracy"], result["depth_agreement"])
    ):
        agree = "—" if k == 0 else f"{agreement:.3f}"
        lines.append(f"| {k} | t+{k + 1} | {loss:.3f} | {accuracy:.3f} | {agree} |")
    return "\n".join(lines)


RUN_TOKENIZER = "tokenizer"
"""The folder of a run directory that holds the files of the tokenizer it trained
with (none for a byte-level run)."""


def run_tokenizer(run: pathlib.Path, vocab_size: int) -> Framed | None:
    """The tokenizer a run trained with: the one kept in its `tokenizer/` folder,
    else the byte-level one for a model of the byte vocabulary; `None` for a run on
    token ids whose tokenizer is unknown.

    **Raises:**

    `TokenizerError` when the kept tokenizer does not read.
    """
    kept = run / RUN_TOKENIZER
    if kept.is_dir():
        return TextTokenizer.load(kept)
    if vocab_size == BYTE_VOCAB_SIZE:
        return ByteTokenizer()
    return None
