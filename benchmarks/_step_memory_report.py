"""The docs section of `step_memory.py`, built from its results payload alone: the
compiled temp memory of every variant, the step times, the remat rule, the targets
and attention alone."""

from __future__ import annotations

import sys

import _common
from _timing import spread

MiB = 2**20
GiB = 2**30
NAIVE = ("naive", "reference", "none")


def _variant(record) -> tuple[str, str, str]:
    return record["loss_impl"], record["attention_impl"], record["remat"]


def _mib(nbytes) -> str:
    return f"{nbytes / MiB:,.0f}" if nbytes >= 100 * MiB else f"{nbytes / MiB:.1f}"


def _share(nbytes, of) -> str:
    return f"{100 * nbytes / of:.1f}%"


def _spread(record) -> str:
    return spread(record["seconds"], ".2f")


def _memory_table(payload, temp, names) -> str:
    naive = {shape: temp(shape, NAIVE) for shape in ("short", "long")}
    rows = []
    for record in payload["memory"]:
        if record["shape"] != "short":
            continue
        variant = _variant(record)
        short, long = temp("short", variant), temp("long", variant)
        label = "naive" if variant == NAIVE else "context"
        label = "lean" if variant[1] == "blockwise" else label
        rows.append(
            [label, *variant, _mib(short), _share(short, naive["short"])]
            + [_mib(long), _share(long, naive["long"]), f"{long / short:.2f}"]
        )
    return _common.markdown_table(
        ["", "loss", "attention", "remat", f"temp MiB {names['short']}", "of naive"]
        + [f"temp MiB {names['long']}", "of naive", "long / short"],
        rows,
    )


def _time_table(payload, naive_seconds, names) -> str:
    rows = [
        [*_variant(r), _spread(r), f"{r['median_seconds'] / naive_seconds:.2f}"]
        + [f"{r['first_call_seconds']:.1f}", f"{r['loss']:.6f}"]
        for r in payload["step_times"]
    ]
    return _common.markdown_table(
        ["loss", "attention", "remat", f"step s, median (min–max), {names['time']}"]
        + ["/ naive", "warm-up s", "loss value"],
        rows,
    )


def _remat_table(payload, temp, names) -> str:
    rule, slack = payload["remat_rule"], payload["settings"]["slack"]
    rows = []
    for record in payload["step_times"]:
        variant = _variant(record)
        if variant[:2] != ("fused", "blockwise"):
            continue
        remat = variant[2]
        rows.append(
            [remat, _mib(temp("short", variant)), _mib(temp("long", variant))]
            + [_spread(record)]
            + [f"{record['median_seconds'] / rule['fastest_median_seconds']:.2f}"]
            + ["yes" if remat in rule["eligible"] else "no"]
            + ["**chosen**" if remat == rule["chosen"] else ""]
        )
    return _common.markdown_table(
        ["remat", f"temp MiB {names['short']}", f"temp MiB {names['long']}"]
        + ["step s", "/ fastest", f"within {slack}×", ""],
        rows,
    )


def _attention_table(payload) -> str:
    rows = []
    for record in payload["attention"]:
        ref, blk = record["reference"], record["blockwise"]

        def time_cell(r):
            return _spread(r) if r["ran"] else "not run"

        both = ref["ran"] and blk["ran"]
        rows.append(
            [record["seq"], f"{ref['temp_bytes'] / MiB:,.1f}"]
            + [f"{blk['temp_bytes'] / MiB:,.1f}"]
            + [f"{blk['temp_bytes'] / ref['temp_bytes']:.4f}"]
            + [time_cell(ref), time_cell(blk)]
            + [f"{blk['median_seconds'] / ref['median_seconds']:.2f}" if both else ""]
            + [
                f"{record['max_relative_difference']:.1e}"
                if "max_relative_difference" in record
                else ""
            ]
        )
    return _common.markdown_table(
        ["row length", "reference temp MiB", "blockwise temp MiB"]
        + ["blockwise / reference", "reference s", "blockwise s"]
        + ["time blockwise / reference", "max rel. difference"],
        rows,
    )


def _target_table(payload) -> str:
    def cells(t):
        if t["limit"] < 1:
            return f"{100 * t['measured']:.1f}%", f"limit {100 * t['limit']:.0f}%"
        return f"{t['measured']:.2f}×", f"limit {t['limit']}×"

    return _common.markdown_table(
        ["target", "measured", "", "met"],
        [
            [t["target"], *cells(t), "met" if t["met"] else "missed"]
            for t in payload["targets"]
        ],
    )


def section(payload: dict, tag: str = "") -> str:
    """The docs section of a `step_memory.py` results payload."""
    s, env, rule = payload["settings"], payload["environment"], payload["remat_rule"]
    temps = {(r["shape"], _variant(r)): r["temp_bytes"] for r in payload["memory"]}

    def temp(shape, variant):
        return temps[(shape, variant)]

    names = dict(
        short=f"{s['batch']} × {s['seq']}",
        long=f"{s['long_batch']} × {s['long_seq']}",
        time=f"{s['time_batch']} × {s['seq']}",
    )
    naive_seconds = next(
        r["median_seconds"] for r in payload["step_times"] if _variant(r) == NAIVE
    )
    run_limit, chosen = s["run_limit_bytes"], rule["chosen"]
    default = rule["library_default"]
    command = " ".join(["python benchmarks/step_memory.py"] + sys.argv[1:])
    halved = (
        ""
        if s["time_batch"] == s["batch"]
        else f" (naive's {_mib(temp('short', NAIVE))} MiB do not fit "
        f"{run_limit / GiB:.1f} GiB here, so the batch was halved)"
    )
    lines = [
        "## Step memory" + (f" ({tag})" if tag else ""),
        "",
        f"`{command}` ({env['date']}, {env['device']}, {env['cpu_count']} cores, "
        f"load average {env['load_average']}, jax {env['jax']}, git {env['git']}; "
        f"{payload['seconds'] / 60:.1f} min). The whole step, "
        "`filter_value_and_grad` of "
        f"`mtp_loss` (no optimizer update): vocab {s['vocab']}, dim {s['dim']}, "
        f"{s['layers']} trunk layers, {s['heads']} heads / {s['kv_heads']} kv heads, "
        f"mlp {s['mlp_dim']}, D = {s['num_depths']} transformer depths, "
        f"`loss_chunk_size` {s['loss_chunk_size']}, `attention_block_size` "
        f"{s['attention_block_size']}, float32, rows packed with documents of about "
        f"{s['document_length']} tokens. Memory is XLA's compiled "
        "`temp_size_in_bytes`; times are medians "
        f"(min–max) of {s['repeats']} interleaved calls after a warm-up.",
        "",
        f"**Compiled temp memory**, {names['short']} and {names['long']} tokens:",
        "",
        _memory_table(payload, temp, names),
        "",
        f"**Step time** at {names['time']}{halved}:",
        "",
        _time_table(payload, naive_seconds, names),
        "",
        f"**Remat rule** (fused + blockwise): the leanest policy within "
        f"{s['slack']}× of the fastest's step time. Chosen: `remat={chosen!r}`; "
        f"`ModelConfig`'s default is `remat={default!r}`"
        + (" (they agree)." if chosen == default else " (**they differ**)."),
        "",
        _remat_table(payload, temp, names),
        "",
        f"**Targets** (lean = fused, blockwise, `remat={chosen!r}`):",
        "",
        _target_table(payload),
        "",
        f"**Attention alone**, one row, {s['attention_heads']} heads / "
        f"{s['attention_kv_heads']} kv heads / head_dim {s['attention_head_dim']}, "
        f"tiles of {s['attention_block_size']}, forward + backward (`jax.vjp`); temp "
        "memory excludes the outputs (the attention output and three gradients, the "
        "same for both). `not run`: compiled only, its temp memory exceeds "
        f"{run_limit / GiB:.1f} GiB.",
        "",
        _attention_table(payload),
    ]
    return "\n".join(lines)
