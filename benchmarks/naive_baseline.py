"""The default training step against the same model written the naive way, at D = 1,
2, 4, 8: step-time, compile-time and memory ratios.

`python benchmarks/naive_baseline.py [--quick] [--depths 1,2,4,8] [--repeats 7]`.

**Ours** is the step `eqx-mtp train` runs: `eqx_mtp.train.train_step` with
`eqx_mtp.train.make_optimizer` (AdamW, warm-up + cosine, clipping, masked weight decay),
on the `ModelConfig` that `eqx-mtp train` builds with its default flags except
`--num-depths D` (byte vocabulary 259, dim 192, 4 layers, 4 query / 2 key-value
heads, mlp 512, sequential transformer depths; the defaults: fused loss, blockwise
attention, `remat="full"`), at the default `--batch-size` × `--seq-len`, λ = 0.3,
reduction `"mean"`.

**Naive** is `benchmarks/_naive.py`'s loss, written the way public MTP code
(MaxText, Megatron-Core, DeepSeek-V3's reference) writes it: a Python loop over layers
and depths, full `[batch, seq, vocab]` logits and `log_softmax` for every head,
materialised `[batch, heads, seq, seq]` attention, no remat; then
`jax.value_and_grad` and the same optax optimizer, under `jax.jit` with the
parameters and optimizer state donated, as ours are. `tests/test_naive_baseline.py`
holds its loss and gradients equal to `eqx_mtp.mtp_loss`'s.

Both run from the same initial weights on the same packed rows (documents of
`--document-length // 2` to `3 × --document-length // 2` tokens,
`_common.packed_rows`). Per D, after one untimed round at the first D (which takes
the process's one-time start-up costs): compile time (`lower` and `compile` timed
apart, then a first call, timed apart again), XLA's compiled temporary memory
(`memory_analysis().temp_size_in_bytes`), the loss of each at the first step (they
must agree), then `--repeats` timed steps of each, interleaved (ours, naive, for
every D, then again), each ended with `block_until_ready`; medians and min–max of
the wall clock, and the median CPU seconds of this process (all its threads), which
a machine shared with other jobs disturbs less.
Ratios are ours / naive: below 1 is ours smaller or faster. The script fails (after
writing the JSON, before the docs) when the two first-step losses differ by more than
`LOSS_RTOL` (1e-4, relative).

`--quick`: 2 × 32 tokens, one trunk layer of width 32, D = 2, one repeat, no
untimed first round (about 20 s of CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings

import _common
import _naive
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _step import job_optimizer, step_arguments
from _timing import time_interleaved

import eqx_mtp
from eqx_mtp._attention import resolve_attention_impl
from eqx_mtp.train import TrainConfig
from eqx_mtp.train._train_step import _donating_train_step

MiB = 2**20
# Two float32 programs that sum in different orders: their losses agree to about
# 1e-7 (tests/test_naive_baseline.py holds them to 1e-5); a larger gap is a bug.
LOSS_RTOL = 1e-4
QUICK = dict(batch_size=2, seq_len=32, dim=32, num_layers=1, mlp_dim=64)


def _lower_and_compile(jitted, *args) -> dict:
    """`jitted.lower(*args).compile()`, each stage timed."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    inner = getattr(compiled, "compiled", compiled)  # equinox wraps jax's Compiled
    return dict(
        compiled=compiled,
        lower_seconds=lowered_at - start,
        compile_seconds=compiled_at - lowered_at,
        temp_bytes=inner.memory_analysis().temp_size_in_bytes,
    )


def naive_step(optimizer, static, mtp_weight: float):
    """`(params, opt_state, tokens, segment_ids) -> (params, opt_state, loss)`:
    the naive loss, `jax.value_and_grad`, the optax update; jitted, parameters and
    optimizer state donated."""

    def step(params, opt_state, tokens, segment_ids):
        def loss_fn(p):
            model = eqx.combine(p, static)
            return _naive.naive_mtp_loss(
                model, tokens, segment_ids, mtp_weight=mtp_weight
            )

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # optax mixes Python floats with int32 step counts, as in train_step.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def setup(fields: dict, num_depths: int, tokens, segment_ids, positions):
    """Both steps of one D, compiled and measured; their states ready to run."""
    train = TrainConfig.from_dict(fields | dict(num_depths=num_depths))
    config = train.model
    model = eqx_mtp.MTPModel(config, key=jax.random.key(train.run.seed))
    optimizer = job_optimizer(train, model)
    params, static = eqx.partition(model, eqx.is_array)
    mtp_weight = float(eqx_mtp.parse_mtp_weight(train.objective.mtp_weight))

    batch = dict(
        tokens=tokens[None], segment_ids=segment_ids[None], positions=positions[None]
    )
    arguments = step_arguments(
        optimizer,
        batch,
        np.float32(mtp_weight),
        train.objective.reduction,
        model,
        optimizer.init(params),
    )
    kept = arguments[0]
    ours = _lower_and_compile(_donating_train_step, *arguments)
    naive_jitted = naive_step(optimizer, static, mtp_weight)
    # Fresh copies: each step donates its own parameters and state.
    naive_params = jax.tree.map(jnp.copy, params)
    naive = _lower_and_compile(
        naive_jitted, naive_params, optimizer.init(params), tokens, segment_ids
    )

    states = dict(
        ours=[jax.tree.map(jnp.copy, model), optimizer.init(params)],
        naive=[naive_params, optimizer.init(params)],
    )

    # Each returns its new state too, so that the timed call ends when all of it
    # is ready.
    def run_ours():
        state = states["ours"]
        state[0], state[1], metrics = ours["compiled"](kept, *state)
        return metrics["loss"], state

    def run_naive():
        state = states["naive"]
        state[0], state[1], loss = naive["compiled"](*state, tokens, segment_ids)
        return loss, state

    record = dict(num_depths=num_depths)
    for name, measured in (("ours", ours), ("naive", naive)):
        record[name] = {
            key: measured[key]
            for key in ("lower_seconds", "compile_seconds", "temp_bytes")
        }
    print(
        f"D={num_depths}: lower+compile ours {ours['lower_seconds']:.1f}+"
        f"{ours['compile_seconds']:.1f}s, naive {naive['lower_seconds']:.1f}+"
        f"{naive['compile_seconds']:.1f}s; temp ours "
        f"{ours['temp_bytes'] / MiB:.1f} MiB, naive "
        f"{naive['temp_bytes'] / MiB:.1f} MiB",
        flush=True,
    )
    return record, dict(ours=run_ours, naive=run_naive)


def _ratios(ours: dict, naive: dict) -> dict:
    """Ours over naive: step time (medians, and the least and greatest ratio of a
    repeat's pair), CPU time, compile time, temp memory."""
    paired = [o / n for o, n in zip(ours["seconds"], naive["seconds"])]
    return dict(
        step_time=ours["median_seconds"] / naive["median_seconds"],
        step_time_paired_min=min(paired),
        step_time_paired_max=max(paired),
        step_cpu_time=ours["median_cpu_seconds"] / naive["median_cpu_seconds"],
        compile_time=(ours["lower_seconds"] + ours["compile_seconds"])
        / (naive["lower_seconds"] + naive["compile_seconds"]),
        temp_memory=ours["temp_bytes"] / naive["temp_bytes"],
    )


def main():
    fields = {}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repeat: a smoke run"
    )
    parser.add_argument("--depths", default="1,2,4,8", help="the values of D")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--document-length", type=int, default=100)
    _common.add_run_flags(parser)
    args = parser.parse_args()
    _common.start(args)
    depths = [int(d) for d in args.depths.split(",") if d]
    if args.quick:
        fields = dict(QUICK)
        depths, args.repeats, args.document_length = [2], 1, 12
    train = TrainConfig.from_dict(fields)
    vocab = train.model.vocab_size
    tokens, segment_ids = _common.packed_rows(
        train.data.batch_size,
        train.data.seq_len,
        vocab,
        document_length=args.document_length,
        seed=1,
    )
    positions = eqx_mtp.segment_positions(segment_ids)

    with warnings.catch_warnings():
        # Donated buffers the CPU backend cannot reuse: harmless, and noisy.
        warnings.filterwarnings("ignore", message="Some donated buffers")
        # The process's one-time costs (XLA and LLVM start-up, first traces of
        # equinox, optax and eqx_mtp) would otherwise land on the first D measured.
        # Left out of a smoke run, whose compile times mean nothing.
        if not args.quick:
            _, warm = setup(fields, depths[0], tokens, segment_ids, positions)
            for program in warm.values():
                jax.block_until_ready(program())
            jax.clear_caches()
        records, programs = {}, {}
        for d in depths:
            records[d], runs = setup(fields, d, tokens, segment_ids, positions)
            programs |= {f"D={d} {name}": run for name, run in runs.items()}
        # Interleaved: ours, naive, for every D, then again.
        timings = time_interleaved(programs, args.repeats)

    results = []
    for d in depths:
        record = records[d]
        for name in ("ours", "naive"):
            timing = timings[f"D={d} {name}"]
            record[name] |= timing.record() | dict(first_loss=float(timing.first[0]))
        ours, naive = record["ours"], record["naive"]
        print(
            f"D={d}: first-step loss ours {ours['first_loss']:.6f}, naive "
            f"{naive['first_loss']:.6f}",
            flush=True,
        )
        record["ratios"] = _ratios(ours, naive)
        record["first_loss_relative_difference"] = abs(
            ours["first_loss"] - naive["first_loss"]
        ) / abs(naive["first_loss"])
        results.append(record)

    payload = dict(
        benchmark="naive_baseline",
        environment=_common.environment(),
        settings=dict(
            batch=train.data.batch_size,
            seq=train.data.seq_len,
            model_config=dataclasses.replace(
                train.model, num_depths=depths[0]
            ).to_dict(),
            depths=depths,
            repeats=args.repeats,
            document_length=args.document_length,
            mtp_weight=train.objective.mtp_weight,
            reduction=train.objective.reduction,
            attention_impl_resolved=resolve_attention_impl(train.model.attention_impl),
        ),
        results=results,
    )
    _common.write_results("naive_baseline", payload, args)
    disagree = [
        r["num_depths"]
        for r in results
        if r["first_loss_relative_difference"] > LOSS_RTOL
    ]
    if disagree:
        sys.exit(
            f"the two steps' first-step losses differ by more than {LOSS_RTOL:g} "
            f"(relative) at D = {disagree}: they do not compute the same loss"
        )
    _common.write_doc_section("naive_baseline", doc_section(payload, args), args)


def doc_section(payload: dict, args) -> str:
    env, settings = payload["environment"], payload["settings"]
    config = settings["model_config"]
    attention = config["attention_impl"]
    resolved = settings["attention_impl_resolved"]
    if resolved != attention:
        attention = f"{attention} ({resolved} here)"
    rows = []
    for r in payload["results"]:
        ours, naive, ratios = r["ours"], r["naive"], r["ratios"]

        def compile_seconds(x):
            return x["lower_seconds"] + x["compile_seconds"]

        rows.append(
            [
                r["num_depths"],
                f"{ours['median_seconds']:.3f} / {naive['median_seconds']:.3f}",
                f"**{ratios['step_time']:.2f}** ({ratios['step_time_paired_min']:.2f}"
                f"–{ratios['step_time_paired_max']:.2f})",
                f"{ratios['step_cpu_time']:.2f}",
                f"{compile_seconds(ours):.1f} / {compile_seconds(naive):.1f}",
                f"**{ratios['compile_time']:.2f}**",
                f"{ours['temp_bytes'] / MiB:.1f} / {naive['temp_bytes'] / MiB:.1f}",
                f"**{ratios['temp_memory']:.3f}**",
                f"{ours['first_loss']:.6f} / {naive['first_loss']:.6f}",
            ]
        )
    lines = [
        "## Naive baseline",
        "",
        f"`python benchmarks/naive_baseline.py{' --quick' if args.quick else ''}` "
        f"({env['date']}, git {env['git']}, {env['device']}, {env['cpu_count']} CPU "
        f"cores shared with other jobs, load average {env['load_average']}). The "
        "default training step (`train_step` + `make_optimizer` on the model "
        f"`eqx-mtp train` builds by default: vocab {config['vocab_size']}, dim "
        f"{config['dim']}, {config['num_layers']} layers, mlp {config['mlp_dim']}; "
        f"fused loss, {attention} attention, remat "
        f"`{config['remat']}`) at {settings['batch']} × {settings['seq']} tokens "
        "against the same model written as public MTP code writes it "
        "(`benchmarks/_naive.py`: a Python loop over depths, full logits for every "
        "head, materialised attention, no remat; `value_and_grad` + the same "
        "optimizer). Same weights, same packed rows. Ratios are ours / naive; step "
        f"time is the median of {settings['repeats']} interleaved repeats after a "
        "warm-up, in brackets the least and greatest ratio of a repeat's pair; the "
        "CPU-time ratio is that of the medians of this process's CPU seconds per "
        "step (less disturbed by other jobs than the wall clock); "
        "compile time is `lower` + `compile`; memory is XLA's compiled temporary "
        "memory.",
        "",
        _common.markdown_table(
            [
                "D",
                "step s (ours / naive)",
                "step ratio",
                "CPU-time ratio",
                "compile s (ours / naive)",
                "compile ratio",
                "temp MiB (ours / naive)",
                "memory ratio",
                "first-step loss (ours / naive)",
            ],
            rows,
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
