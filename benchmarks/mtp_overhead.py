"""Training-step time with D MTP depths against a FLOP model of the step.

`python benchmarks/mtp_overhead.py [--quick]`. One jitted step (loss, gradient and an
optax AdamW update) per D; after a warm-up call per D, the steps are timed interleaved
(D=0, 1, 2, 4, then again) and the median of the repeats is reported, since the machine
is shared.

FLOP model: `_flops.forward_flops_per_token`, the model FLOPs `mfu.py` counts too
(trunk projections, causal attention, SwiGLU, main head, and per depth `eh_proj`,
block and head); training = 3 × forward (the backward pass does two matmuls per
forward matmul, and the fused loss does exactly three).

`--quick`: 2 × 64 tokens, one trunk layer of width 64, vocabulary 1024, D = 0 and 1,
one repeat.
"""

from __future__ import annotations

import _common
import equinox as eqx
import jax
import optax
from _flops import forward_flops_per_token
from _timing import time_interleaved

import eqx_mtp


def make_step(config: eqx_mtp.ModelConfig, mtp_weight: float):
    model = eqx_mtp.MTPModel(config, key=jax.random.key(0))
    optimizer = optax.adamw(1e-3, weight_decay=0.1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, tokens):
        def loss_fn(m):
            return eqx_mtp.mtp_loss(m, tokens, mtp_weight=mtp_weight)[0]

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optimizer.update(
            grads, opt_state, eqx.filter(model, eqx.is_array)
        )
        return eqx.apply_updates(model, updates), opt_state, loss

    return step, model, opt_state


def doc_section(payload: dict, args) -> str:
    """The docs section: a row per D, then the target."""
    results = payload["results"]
    rows = []
    for r in results:
        times, median = r["step_seconds"], r["median_seconds"]
        rows.append(
            [
                r["num_depths"],
                f"{median:.3f}",
                f"{min(times):.3f}–{max(times):.3f}",
                f"{r['train_flops_per_step'] / median / 1e9:.0f}",
                f"{r['time_ratio']:.2f}",
                f"{r['flop_ratio']:.2f}",
                f"{100 * r['relative_gap']:+.1f}%",
            ]
        )
    worst = max(abs(r["relative_gap"]) for r in results)
    lines = [
        "## MTP overhead",
        "",
        f"{_common.run_line('mtp_overhead.py', payload['environment'])}. One "
        "training step (fused "
        f"loss, gradient, optax AdamW update) at {args.batch} × {args.seq} tokens, dim "
        f"{args.dim}, {args.layers} trunk layers, mlp {args.mlp_dim}, vocab "
        f"{args.vocab}, transformer depth blocks; median of {args.repeats} interleaved "
        "repeats after a warm-up. FLOP model (`benchmarks/_flops.py`, the one "
        "`mfu.py` uses): trunk projections, causal attention, SwiGLU, main head, and "
        "per depth `eh_proj`, block and head; training = 3 × forward.",
        "",
        _common.markdown_table(
            [
                "D",
                "median s",
                "range s",
                "GFLOP/s (model)",
                "time(D)/time(0)",
                "FLOP ratio",
                "gap",
            ],
            rows,
        ),
        "",
        f"**Target** time ratio within 10% of the FLOP ratio: largest gap "
        f"{100 * worst:.1f}%.",
    ]
    return "\n".join(lines)


def main():
    parser = _common.model_parser(
        __doc__.split("\n")[0], batch=4, seq=512, dim=256, mlp_dim=704, layers=4
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    _common.start(args)
    depths = [0, 1, 2, 4]
    if args.quick:
        args.batch, args.seq, args.dim, args.mlp_dim = 2, 64, 64, 128
        args.layers, args.vocab, args.repeats = 1, 1024, 1
        depths = [0, 1]

    configs = {
        d: _common.model_config(args, vocab=args.vocab, num_depths=d) for d in depths
    }
    tokens = jax.random.randint(
        jax.random.key(1), (args.batch, args.seq), 0, args.vocab
    )

    def program(d):
        step, model, opt_state = make_step(configs[d], mtp_weight=0.3)
        state = [model, opt_state]

        def run():
            state[0], state[1], loss = step(*state, tokens)
            return state, loss

        return run

    timings = time_interleaved({f"D={d}": program(d) for d in depths}, args.repeats)
    times = {d: timings[f"D={d}"].seconds for d in depths}
    compile_seconds = {d: timings[f"D={d}"].first_call_seconds for d in depths}

    tokens_per_step = args.batch * args.seq
    flops = {d: forward_flops_per_token(configs[d], args.seq) for d in depths}
    medians = {d: _common.median(times[d]) for d in depths}
    results = []
    for d in depths:
        flop_ratio = flops[d]["total"] / flops[0]["total"]
        time_ratio = medians[d] / medians[0]
        train_flops = 3 * flops[d]["total"] * tokens_per_step
        results.append(
            dict(
                num_depths=d,
                step_seconds=times[d],
                median_seconds=medians[d],
                first_call_seconds=compile_seconds[d],
                forward_flops_per_token=flops[d],
                train_flops_per_step=train_flops,
                time_ratio=time_ratio,
                flop_ratio=flop_ratio,
                relative_gap=time_ratio / flop_ratio - 1,
            )
        )
    payload = dict(
        benchmark="mtp_overhead",
        environment=_common.environment(),
        settings=_common.model_settings(
            args,
            vocab=args.vocab,
            repeats=args.repeats,
            mtp_block="transformer",
            loss_impl="fused",
            optimizer="optax.adamw",
        ),
        results=results,
    )
    _common.publish("mtp_overhead", payload, doc_section(payload, args), args)


if __name__ == "__main__":
    main()
