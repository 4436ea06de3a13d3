"""The report of `learning.py`: the table (mean ± standard deviation over seeds per
configuration), the plot (held-out bits/byte against model FLOPs and against seconds
of training), the results JSON and the docs section."""

from __future__ import annotations

import statistics

import _common
import numpy as np


def _spread(values, form: str) -> str:
    """`mean ± sd` over seeds (the sample standard deviation; none for one seed);
    `—` where a value is missing."""
    if any(value is None for value in values):
        return "—"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:{form}}"
    return f"{mean:{form}} ± {statistics.stdev(values):{form}}"


def _per_depth(records, field: str, form: str, first: int) -> str:
    """Each depth's `mean ± sd` of `field` (a list per record), from index `first`;
    `—` where there is none."""
    width = len(records[0][field])
    cells = [_spread([r[field][k] for r in records], form) for k in range(first, width)]
    return " / ".join(cells) or "—"


def by_config(payload: dict) -> dict[str, list[dict]]:
    """The records grouped by configuration, in the order they ran."""
    groups: dict[str, list[dict]] = {}
    for record in payload["results"]:
        groups.setdefault(record["config"], []).append(record)
    return groups


def table(payload: dict) -> str:
    """One row per configuration: its steps, what it spent, and what it reached."""
    rows = []
    for name, records in by_config(payload).items():
        rows.append(
            [
                f"`{name}`",
                records[0]["steps"],
                _spread([r["model_flops"] for r in records], ".4g"),
                _spread([r["train_seconds"] for r in records], ".3g"),
                _spread([r["main_bits_per_byte"] for r in records], ".4f"),
                _per_depth(records, "depth_losses", ".3f", 1),
                _per_depth(records, "depth_agreement", ".3f", 1),
                _spread([r["tokens_per_forward"] for r in records], ".2f"),
            ]
        )
    header = [
        "configuration",
        "steps",
        "model FLOPs",
        "train s",
        "held-out bits/byte",
        "depth losses (nats)",
        "agreement per depth",
        "tokens / trunk pass",
    ]
    return _common.markdown_table(header, rows)


def _mean_curve(records: list[dict], axis: str) -> tuple[np.ndarray, ...]:
    """`(x, mean, low, high)` of bits/byte over seeds at each eval (the runs of a
    configuration evaluate at the same steps), `x` the mean of `axis`."""
    length = min(len(r["curve"]) for r in records)
    points = [r["curve"][:length] for r in records]
    x = np.array([[p[axis] or np.nan for p in curve] for curve in points], float)
    y = np.array([[p["bits_per_byte"] for p in curve] for curve in points], float)
    return x.mean(0), y.mean(0), y.min(0), y.max(0)


def plot(payload: dict, path) -> None:
    """Two panels, bits/byte against model FLOPs and against seconds of training,
    a curve per configuration (mean over seeds, band: their range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, records in by_config(payload).items():
        for panel, axis in zip(panels, ("flops", "seconds")):
            x, mean, low, high = _mean_curve(records, axis)
            (line,) = panel.plot(x, mean, marker=".", label=name)
            if len(records) > 1:
                panel.fill_between(x, low, high, alpha=0.2, color=line.get_color())
    budget = payload["budget"]
    if budget["kind"] != "steps":
        panel = panels[0 if budget["kind"] == "flops" else 1]
        panel.axvline(budget["amount"], color="grey", linestyle="--", label="budget")
    panels[0].set_xlabel("model FLOPs (FLOP model)")
    panels[1].set_xlabel("seconds of training (compilation and evals apart)")
    panels[0].set_ylabel("held-out main bits/byte")
    for panel in panels:
        panel.grid(alpha=0.3)
    panels[1].legend(fontsize=8)
    figure.suptitle(f"budget: {budget['given']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def section(payload: dict, name: str) -> str:
    """The docs section: the command, the budget, the table."""
    env = payload["environment"]
    seeds = payload["settings"]["seeds"]
    return "\n".join(
        [
            "## Objectives at equal compute: " + payload["budget"]["given"],
            "",
            f"{_common.run_line('learning.py', env)}; {payload['seconds'] / 60:.1f} "
            f"min. Budget: {payload['budget']['given']} "
            f"({payload['budget']['amount']:.4g} {payload['budget']['kind']}); seeds "
            f"{seeds}, mean ± standard deviation. Plot: `benchmarks/results/"
            f"{name}.png`.",
            "",
            table(payload),
        ]
    )


def write(payload: dict, args) -> None:
    """The JSON, the table (`<name>.md`), the plot (`<name>.png`) in the results
    directory; the docs section unless `--quick`."""
    name = "learning" + (f"_{args.tag}" if args.tag else "")
    text = table(payload)
    print(text)
    _common.publish(name, payload, section(payload, name), args)
    if _common.is_primary():
        directory = _common.results_dir(args)
        (directory / f"{name}.md").write_text(text + "\n")
        plot(payload, directory / f"{name}.png")
        print(f"wrote {directory / name}.md and .png")
