"""Loss curves of a run, drawn from its `metrics.jsonl`."""

from __future__ import annotations

import json
import os
import pathlib


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Training records and eval records of a `metrics.jsonl`."""
    train, evals = [], []
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # empty, or a line cut short when the process was killed
        (evals if "eval" in record else train).append(record)
    return train, evals


def plot_losses(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Write a PNG with the training and eval loss of every depth against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    if train:
        steps = [r["step"] for r in train]
        for k in range(len(train[-1]["depth_losses"])):
            label = "main (t+1)" if k == 0 else f"depth {k} (t+{k + 1})"
            left.plot(steps, [r["depth_losses"][k] for r in train], label=label)
    if evals:
        steps = [r["step"] for r in evals]
        for k in range(len(evals[-1]["eval"]["depth_losses"])):
            label = "main (t+1)" if k == 0 else f"depth {k} (t+{k + 1})"
            values = [r["eval"]["depth_losses"][k] for r in evals]
            right.plot(steps, values, marker="o", label=label)
    left.set_title("training loss")
    right.set_title("held-out loss")
    for axis in (left, right):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    left.set_ylabel("cross-entropy (nats)")
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
