"""Compiled temporary memory of loss + gradient: full logits against the lean losses.

`python benchmarks/loss_memory.py [--quick]`. Nothing runs: XLA's memory analysis of
the compiled program (`temp_size_in_bytes`) is read for every (vocab, D, variant).

Two programs are measured:

- `model`: `eqx_mtp.mtp_loss` of a whole `MTPModel` (trunk + main head + D depths),
    gradient w.r.t. every parameter;
- `heads`: the main head and the D depths on a given trunk output `h⁰`
    (`eqx_mtp.mtp_depth_losses`), gradient w.r.t. their parameters and `h⁰`: the part
    of the step the loss implementation changes.

Variants: `loss_impl` `"naive"` (full `[tokens, vocab]` logits) against `--impl`
(`"fused"`, the default, or `"chunked"`), with the trunk and depth scans
un-rematerialised (`remat="none"`) or rematerialised (`remat="full"`; `--remats`
picks the policies, `save_dots` among them).

`--quick`: 2 × 64 tokens, one trunk layer of width 64, vocabulary 2048, D = 0 and 1,
the first of `--remats` only.
"""

from __future__ import annotations

import sys
import time

import _common
import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_mtp

MiB = 2**20


def _config(args, vocab, num_depths, impl, remat):
    return _common.model_config(
        args,
        vocab=vocab,
        num_depths=num_depths,
        loss_impl=impl,
        loss_chunk_size=args.chunk,
        remat=remat,
        mtp_block=args.block,
    )


def _model_program(config, args):
    params, static = _common.abstract_model(config)
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)

    def grads(p, t):
        def loss(p):
            return eqx_mtp.mtp_loss(eqx.combine(p, static), t)[0]

        return jax.grad(loss)(p)

    return grads, (params, tokens)


def _heads_program(config, args):
    params, static = _common.abstract_model(config)
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    hidden = jax.ShapeDtypeStruct((args.batch, args.seq, args.dim), jnp.float32)

    def grads(p, h, t):
        def loss(p, h):
            model = eqx.combine(p, static)
            trunk = model.trunk
            targets, valid = eqx_mtp.depth_targets(t, 0)
            main_sum, main_count = eqx_mtp.head_loss_sum(
                trunk.final_norm(h).reshape(-1, args.dim),
                trunk.unembedding_matrix,
                targets.reshape(-1),
                valid.reshape(-1),
                chunk_size=config.loss_chunk_size,
                impl=config.loss_impl,
            )
            total = main_sum / main_count
            if model.depths is not None:
                sums, counts = eqx_mtp.mtp_depth_losses(
                    model.depths,
                    h,
                    t,
                    embedding=trunk.embedding,
                    unembedding=trunk.unembedding_matrix,
                    final_norm=trunk.final_norm,
                    loss_chunk_size=config.loss_chunk_size,
                    loss_impl=config.loss_impl,
                )
                total = total + jnp.mean(sums / counts)
            return total

        return jax.grad(loss, (0, 1))(p, h)

    return grads, (params, hidden, tokens)


def temp_bytes(part, config, args) -> tuple[int, float]:
    build = _model_program if part == "model" else _heads_program
    fn, inputs = build(config, args)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*inputs).compile()
    seconds = time.perf_counter() - start
    return compiled.memory_analysis().temp_size_in_bytes, seconds


def _parser():
    parser = _common.model_parser(
        __doc__.split("\n")[0], batch=8, seq=1024, dim=256, mlp_dim=704, layers=2
    )
    parser.add_argument("--chunk", type=int, default=256, help="loss_chunk_size")
    parser.add_argument(
        "--impl",
        default="fused",
        choices=("fused", "chunked"),
        help="the loss_impl measured against 'naive'",
    )
    parser.add_argument(
        "--remats",
        default="none,full",
        help="comma-separated ModelConfig.remat policies, each applied to both sides",
    )
    parser.add_argument(
        "--block",
        default="transformer",
        choices=("transformer", "mlp", "linear"),
        help="mtp_block of the depths; 'linear' leaves little but the loss to measure",
    )
    parser.add_argument("--vocabs", default="256,32768,131072")
    parser.add_argument("--depths", default="0,1,2,4,8")
    parser.add_argument(
        "--tag", default="", help="suffix of the results file and docs section name"
    )
    return parser


def measure(args, parts, vocabs, depths, variants) -> list[dict]:
    """Compiled temp memory of every (part, vocab, D, variant)."""
    records = []
    for part in parts:
        for vocab in vocabs:
            for num_depths in depths:
                for impl, remat in variants:
                    config = _config(args, vocab, num_depths, impl, remat)
                    temp, seconds = temp_bytes(part, config, args)
                    records.append(
                        dict(part=part, vocab=vocab, num_depths=num_depths)
                        | dict(impl=impl, remat=remat, temp_bytes=temp)
                    )
                    print(
                        f"{part:5s} V={vocab:6d} D={num_depths} {impl:5s} "
                        f"remat={remat:4s} temp={temp / MiB:9.1f} MiB "
                        f"(compiled in {seconds:.1f}s)",
                        flush=True,
                    )
    return records


def main():
    parser = _parser()
    args = parser.parse_args()
    _common.start(args)
    vocabs = [int(v) for v in args.vocabs.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    name = "loss_memory" + (f"_{args.tag}" if args.tag else "")
    if len(set(depths)) < 2 or max(depths) < 1:
        parser.error("--depths needs two or more values, one of them positive")
    remats = args.remats.split(",")
    if args.quick:
        args.batch, args.seq, args.dim, args.mlp_dim, args.layers = 2, 64, 64, 128, 1
        vocabs, depths, remats = [2048], [0, 1], remats[:1]
    parts = ["model", "heads"]
    lean = args.impl
    variants = [(impl, remat) for remat in remats for impl in ("naive", lean)]

    records = measure(args, parts, vocabs, depths, variants)

    def temp(part, vocab, num_depths, impl, remat):
        for r in records:
            key = (r["part"], r["vocab"], r["num_depths"], r["impl"], r["remat"])
            if key == (part, vocab, num_depths, impl, remat):
                return r["temp_bytes"]
        raise KeyError((part, vocab, num_depths, impl, remat))

    # What one more depth may cost: its parameters and the carried hidden state.
    largest = max(d for d in depths if d > 0)
    params, _ = _common.abstract_model(_config(args, vocabs[0], largest, lean, "none"))
    depth_param_bytes = _common.array_bytes(params.depths) // largest
    hidden_bytes = args.batch * args.seq * args.dim * 4
    target_vocab = 32768 if 32768 in vocabs else vocabs[-1]
    target_depth = 4 if 4 in depths else depths[-1]
    previous = sorted(d for d in depths if d < largest)[-1]

    summary = []
    for part in parts:
        for remat in remats:
            ratio = temp(part, target_vocab, target_depth, lean, remat) / temp(
                part, target_vocab, target_depth, "naive", remat
            )
            growth = {
                vocab: (
                    temp(part, vocab, largest, lean, remat)
                    - temp(part, vocab, previous, lean, remat)
                )
                / (largest - previous)
                for vocab in vocabs
            }
            summary.append(
                dict(
                    part=part,
                    remat=remat,
                    impl=lean,
                    impl_over_naive=ratio,
                    growth_per_depth_bytes=growth,
                )
            )

    payload = dict(
        benchmark="loss_memory",
        environment=_common.environment(),
        settings=_common.model_settings(
            args,
            tokens=args.batch * args.seq,
            loss_chunk_size=args.chunk,
            mtp_block=args.block,
        ),
        depth_param_bytes=depth_param_bytes,
        carried_hidden_bytes=hidden_bytes,
        records=records,
        summary=summary,
    )

    grid = dict(parts=parts, remats=remats, vocabs=vocabs, depths=depths, lean=lean)
    target = dict(vocab=target_vocab, depth=target_depth)
    target |= dict(previous=previous, largest=largest)
    section = doc_section(payload, args, grid, target)
    _common.publish(name, payload, section, args)


def doc_section(payload: dict, args, grid: dict, target: dict) -> str:
    """The docs section: `grid` holds the parts, remat policies, vocabularies, D
    values and the lean `loss_impl` measured; `target` the vocabulary and D of the
    5% target and the two D values the growth per depth is measured between."""
    parts, remats, vocabs = grid["parts"], grid["remats"], grid["vocabs"]
    depths, lean = grid["depths"], grid["lean"]
    target_vocab, target_depth = target["vocab"], target["depth"]
    previous, largest = target["previous"], target["largest"]
    summary = payload["summary"]
    depth_param_bytes = payload["depth_param_bytes"]
    hidden_bytes = payload["carried_hidden_bytes"]
    allowance = depth_param_bytes + hidden_bytes
    temps = {
        (r["part"], r["vocab"], r["num_depths"], r["impl"], r["remat"]): r["temp_bytes"]
        for r in payload["records"]
    }

    def temp(*key):
        return temps[key]

    command = " ".join(["python benchmarks/loss_memory.py"] + sys.argv[1:])
    lines = [
        "## Loss memory" + (f" ({args.tag})" if args.tag else ""),
        "",
        f"`{command}` "
        f"({payload['environment']['date']}, {payload['environment']['device']}, "
        f"jax {jax.__version__}). Compiled `temp_size_in_bytes` of loss + gradient "
        f"(XLA's memory analysis; nothing runs) at {args.batch} × {args.seq} = "
        f"{args.batch * args.seq} tokens, dim {args.dim}, {args.layers} trunk layers, "
        f"mlp {args.mlp_dim}, {args.block} depth blocks, `loss_chunk_size` "
        f"{args.chunk}. Each cell is {lean} / naive MiB ({lean} as a share of naive).",
        "",
        "- `model`: `eqx_mtp.mtp_loss` of the whole model, gradient w.r.t. every "
        "parameter.",
        "- `heads`: the main head and the depths on a given trunk output `h⁰` "
        "(`mtp_depth_losses`), gradient w.r.t. their parameters and `h⁰`.",
        "- `remat`: the `ModelConfig.remat` of both scans, for both variants.",
        "",
        f"At D=0 the `heads` program is the cross-entropy alone, so its {lean}/naive "
        "share is the loss's own. Every other cell also holds the trunk's and the "
        "depth blocks' activations, which do not depend on the loss implementation "
        "(a small vocabulary's row shows their size).",
        "",
    ]
    for part in parts:
        for remat in remats:
            lines.append(f"**{part}, remat={remat!r}**")
            lines.append("")
            rows = []
            for vocab in vocabs:
                row = [vocab]
                for num_depths in depths:
                    ours = temp(part, vocab, num_depths, lean, remat)
                    naive = temp(part, vocab, num_depths, "naive", remat)
                    row.append(
                        f"{ours / MiB:.0f} / {naive / MiB:.0f} "
                        f"({100 * ours / naive:.1f}%)"
                    )
                rows.append(row)
            lines.append(
                _common.markdown_table(["vocab"] + [f"D={d}" for d in depths], rows)
            )
            lines.append("")
    lines += [
        f"**Targets.** {lean} ≤ 5% of naive at vocab {target_vocab}, "
        f"D={target_depth}; {lean} memory grows per depth by no more than one "
        "depth's parameters "
        f"({depth_param_bytes / MiB:.1f} MiB) plus the carried hidden state "
        f"({hidden_bytes / MiB:.1f} MiB) = {allowance / MiB:.1f} MiB. Growth is "
        f"measured between D={previous} and D={largest}.",
        "",
    ]
    rows = []
    for item in summary:
        growth = ", ".join(
            f"{vocab}: {value / MiB:.1f}"
            for vocab, value in item["growth_per_depth_bytes"].items()
        )
        rows.append(
            [
                item["part"],
                repr(item["remat"]),
                f"{100 * item['impl_over_naive']:.1f}%",
                growth,
            ]
        )
    lines.append(
        _common.markdown_table(
            [
                "part",
                "remat",
                f"{lean}/naive (V={target_vocab}, D={target_depth})",
                f"{lean} growth per depth, MiB (by vocab)",
            ],
            rows,
        )
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
