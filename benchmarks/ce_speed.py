"""Speed of the cross-entropy loss + gradient alone: full logits against chunked.

`python benchmarks/ce_speed.py [--quick]`. `head_loss_sum` and its gradient w.r.t. the
hidden states and the unembedding, for each `impl`, timed interleaved after a warm-up;
medians reported. A square float32 matmul is timed alongside as the machine's
reference rate. Useful FLOPs are `6 · tokens · dim · vocab` (three matmuls) for every
implementation, so the rates compare directly (`"chunked"` does four matmuls).

`--quick`: 1024 tokens, dim 64, vocabulary 4096, a 512² matmul, one repeat.
"""

from __future__ import annotations

import argparse

import _common
import jax
import jax.numpy as jnp
from _timing import time_interleaved

import eqx_mtp

IMPLS = ("naive", "fused", "chunked")


def _bound(fn, *arguments):
    return lambda: fn(*arguments)


def ce_programs(tokens: int, dim: int, vocabs, chunk: int, impls=IMPLS) -> dict:
    """`(vocab, impl)` to a program of no arguments: jitted `head_loss_sum` + its
    gradients w.r.t. hidden states and unembedding, on random float32 inputs."""
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (tokens, dim), jnp.float32)
    where = jnp.ones((tokens,), jnp.bool_)
    programs = {}
    for vocab in vocabs:
        unembed = 0.05 * jax.random.normal(keys[1], (vocab, dim), jnp.float32)
        targets = jax.random.randint(keys[2], (tokens,), 0, vocab)
        for impl in impls:

            def loss(h, w, targets=targets, impl=impl):
                return eqx_mtp.head_loss_sum(
                    h, w, targets, where, chunk_size=chunk, impl=impl
                )[0]

            step = jax.jit(jax.value_and_grad(loss, (0, 1)))
            programs[(vocab, impl)] = _bound(step, hidden, unembed)
    return programs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repeat: a smoke run"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocabs", default="32768,131072")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--matmul", type=int, default=2048)
    _common.add_run_flags(parser)
    args = parser.parse_args()
    _common.start(args)
    vocabs = [int(v) for v in args.vocabs.split(",")]
    if args.quick:
        args.tokens, args.dim, args.repeats, args.matmul = 1024, 64, 1, 512
        vocabs = [4096]

    square = jnp.ones((args.matmul, args.matmul), jnp.float32)
    programs = {"matmul": _bound(jax.jit(lambda a: a @ a), square)}
    programs |= ce_programs(args.tokens, args.dim, vocabs, args.chunk, IMPLS)
    timings = time_interleaved(programs, args.repeats)

    matmul_rate = 2 * args.matmul**3 / timings["matmul"].median / 1e9
    results, rows = [], []
    for vocab in vocabs:
        naive = timings[(vocab, "naive")].median
        for impl in IMPLS:
            timing = timings[(vocab, impl)]
            seconds = timing.median
            rate = 6 * args.tokens * args.dim * vocab / seconds / 1e9
            results.append(
                dict(
                    vocab=vocab,
                    impl=impl,
                    seconds=timing.seconds,
                    median_seconds=seconds,
                    first_call_seconds=timing.first_call_seconds,
                    useful_gflops=rate,
                    speedup_over_naive=naive / seconds,
                )
            )
            rows.append(
                [
                    vocab,
                    impl,
                    f"{seconds:.3f}",
                    f"{rate:.0f}",
                    f"{100 * rate / matmul_rate:.0f}%",
                    f"{naive / seconds:.2f}×",
                ]
            )
    payload = dict(
        benchmark="ce_speed",
        environment=_common.environment(),
        settings=dict(
            tokens=args.tokens,
            dim=args.dim,
            loss_chunk_size=args.chunk,
            repeats=args.repeats,
            matmul_size=args.matmul,
        ),
        matmul_gflops=matmul_rate,
        results=results,
    )
    lines = [
        "## Cross-entropy speed",
        "",
        f"{_common.run_line('ce_speed.py', payload['environment'])}. "
        f"`head_loss_sum` + gradient w.r.t. hidden and unembedding, {args.tokens} "
        f"tokens, dim {args.dim}, float32, chunks of {args.chunk} tokens; median of "
        f"{args.repeats} interleaved repeats. Useful GFLOP/s count "
        f"`6 · tokens · dim · vocab`; a {args.matmul}³ float32 matmul ran at "
        f"{matmul_rate:.0f} GFLOP/s in the same run.",
        "",
        _common.markdown_table(
            ["vocab", "impl", "median s", "useful GFLOP/s", "of matmul", "speed-up"],
            rows,
        ),
    ]
    _common.publish("ce_speed", payload, "\n".join(lines), args)


if __name__ == "__main__":
    main()
