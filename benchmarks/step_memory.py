"""Compiled temporary memory and time of the whole training step: the lean step
against naive, and attention alone.

`python benchmarks/step_memory.py [--quick] [--timed-impls fused]`.

**The step** is `eqx.filter_value_and_grad` of `eqx_mtp.mtp_loss` (loss + gradient
w.r.t. every parameter; no optimizer update) under `jax.jit`, on packed rows
(documents of about `--document-length` tokens, `_common.packed_rows`). It is
measured at `--batch × --seq` and at the same number of tokens in rows of
`--long-seq` (8 × 1024 and 2 × 4096 by default), for these variants:

- `naive`: `loss_impl="naive"` (full logits), `attention_impl="reference"`
    (materialised `[heads, seq, seq]` softmax), `remat="none"`, as public
    implementations run it;
- lean candidates: `loss_impl` `"fused"` (and `"chunked"`), `attention_impl=
    "blockwise"`, each `remat` policy (`"none"`, `"full"`, `"save_dots"`);
- for context, not judged: `"fused"` with the reference attention (the
    `ModelConfig` defaults before the lean-memory defaults) and remat none or full.

Memory is XLA's analysis of the compiled program (`temp_size_in_bytes`; nothing
runs). Time: the naive and the lean steps at `--batch × --seq` (`--timed-impls`
picks which lean losses; `--timed-impls fused` leaves out chunked's three steps,
about a third of the run), each compiled ahead of time (compile seconds reported
apart), called once to warm up, then `--repeats` times interleaved; medians and
min–max reported. Where naive's compiled temp memory does not fit `--max-run-gib`,
the batch is halved until it does, and the steps are timed there instead.

**The remat rule.** Of the fused + blockwise steps, the leanest policy (least temp
memory at `--batch × --seq`) whose median step time is within `--slack` (1.2) of
the fastest policy's; the report says whether `ModelConfig`'s default agrees.

**Targets** (the lean step: fused, blockwise, the rule's policy): temp memory ≤ 5%
of naive's at `--batch × --seq`; at `--long-seq` within 1.2× of that (linear in
the row length); step time ≤ 1.2× naive's.

**Attention alone**: one row, `eqx_mtp.nn.blockwise_attention` against the
materialised reference (`eqx_mtp._transformer.grouped_attention` with
`attention_mask`), forward + backward (`jax.vjp`, gradient w.r.t. queries, keys
and values), at each of `--attention-seqs`: compiled temp memory and time (warm-up,
then `--repeats` interleaved), and the largest difference of the output and
gradients between the two, relative to the reference's largest magnitude. A
reference whose temp memory exceeds `--max-run-gib` is compiled but not run.

`--quick`: naive against one lean step (fused, blockwise, `remat="none"`; no context
variants) at 2 × 128 and 1 × 256 tokens, one trunk layer of width 64, vocabulary
1024, D = 1, attention alone at 256 tokens, one repeat.
"""

from __future__ import annotations

import sys
import time

import _common
import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_mtp
from eqx_mtp._transformer import attention_mask, grouped_attention

MiB = 2**20
GiB = 2**30
POLICIES = ("none", "full", "save_dots")
NAIVE = ("naive", "reference", "none")
# The ModelConfig defaults before the lean-memory defaults (materialised attention),
# with and without
# remat: context, not judged.
CONTEXT = (("fused", "reference", "none"), ("fused", "reference", "full"))
MTP_WEIGHT = 0.1


def _name(variant) -> str:
    loss_impl, attention_impl, remat = variant
    return f"{loss_impl} / {attention_impl} / {remat}"


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _timing(seconds: list[float]) -> dict:
    return dict(
        seconds=seconds,
        median_seconds=_common.median(seconds),
        min_seconds=min(seconds),
        max_seconds=max(seconds),
    )


def _spread(record: dict) -> str:
    return (
        f"{record['median_seconds']:.2f} "
        f"({record['min_seconds']:.2f}–{record['max_seconds']:.2f})"
    )


# -- the step --------------------------------------------------------------------------


def _config(args, variant) -> eqx_mtp.ModelConfig:
    loss_impl, attention_impl, remat = variant
    return _common.model_config(
        args,
        vocab=args.vocab,
        num_depths=args.depths,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        max_seq_len=max(args.seq, args.long_seq),
        mtp_block="transformer",
        loss_impl=loss_impl,
        loss_chunk_size=args.chunk,
        attention_impl=attention_impl,
        attention_block_size=args.block_size,
        remat=remat,
    )


def compile_step(config, batch: int, seq: int):
    """`(compiled, seconds)`: `jit(value_and_grad(mtp_loss))` of `params, tokens,
    segment_ids`, lowered on shapes only."""
    params, static = _common.abstract_model(config)
    rows = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def step(params, tokens, segment_ids):
        def loss(model):
            return eqx_mtp.mtp_loss(
                model, tokens, segment_ids=segment_ids, mtp_weight=MTP_WEIGHT
            )

        (value, _), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
            eqx.combine(params, static)
        )
        return value, grads

    start = time.perf_counter()
    compiled = jax.jit(step).lower(params, rows, rows).compile()
    return compiled, time.perf_counter() - start


def _call(fn, inputs) -> tuple[float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*inputs))
    return time.perf_counter() - start, out


def time_steps(args, programs: dict, batch: int, seq: int) -> dict:
    """Warm-up, then `args.repeats` interleaved rounds of every compiled step."""
    tokens, segment_ids = _common.packed_rows(
        batch, seq, args.vocab, document_length=args.document_length, seed=1
    )
    inputs = {}
    for variant in programs:
        model = eqx_mtp.MTPModel(_config(args, variant), key=jax.random.key(0))
        inputs[variant] = (eqx.filter(model, eqx.is_array), tokens, segment_ids)
    records = {}
    for variant, compiled in programs.items():
        seconds, (loss, _) = _call(compiled, inputs[variant])
        records[variant] = dict(first_call_seconds=seconds, loss=float(loss))
        print(f"warm-up {_name(variant)}: {seconds:.2f}s, loss {loss:.6f}", flush=True)
    times = {variant: [] for variant in programs}
    for repeat in range(args.repeats):
        for variant, compiled in programs.items():
            seconds, _ = _call(compiled, inputs[variant])
            times[variant].append(seconds)
            print(f"repeat {repeat} {_name(variant)}: {seconds:.2f}s", flush=True)
    for variant in programs:
        records[variant].update(_timing(times[variant]))
    return records


# -- attention alone -------------------------------------------------------------------


def _attention_fns(block_size: int) -> dict:
    def reference(q, k, v, segment_ids):
        index = jnp.arange(q.shape[0])
        mask = attention_mask(segment_ids, segment_ids, index, index)
        return grouped_attention(q, k, v, mask)

    def blockwise(q, k, v, segment_ids):
        return eqx_mtp.nn.blockwise_attention(
            q,
            k,
            v,
            query_segment_ids=segment_ids,
            key_segment_ids=segment_ids,
            block_q=block_size,
            block_k=block_size,
        )

    def forward_backward(attend):
        def fn(q, k, v, segment_ids, cotangent):
            out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, segment_ids), q, k, v)
            return out, vjp(cotangent)

        return fn

    return dict(
        reference=forward_backward(reference), blockwise=forward_backward(blockwise)
    )


def measure_attention(args, seq: int, run_limit: float) -> dict:
    keys = jax.random.split(jax.random.key(seq), 4)
    q_shape = (seq, args.attention_heads, args.attention_head_dim)
    kv_shape = (seq, args.attention_kv_heads, args.attention_head_dim)
    _, segment_ids = _common.packed_rows(
        1, seq, 2, document_length=args.document_length, seed=seq
    )
    inputs = (
        jax.random.normal(keys[0], q_shape, jnp.float32),
        jax.random.normal(keys[1], kv_shape, jnp.float32),
        jax.random.normal(keys[2], kv_shape, jnp.float32),
        segment_ids[0],
        jax.random.normal(keys[3], q_shape, jnp.float32),
    )
    records, compiled = {}, {}
    for impl, fn in _attention_fns(args.block_size).items():
        start = time.perf_counter()
        program = jax.jit(fn).lower(*inputs).compile()
        memory = program.memory_analysis()
        records[impl] = dict(
            temp_bytes=memory.temp_size_in_bytes,
            output_bytes=memory.output_size_in_bytes,
            compile_seconds=time.perf_counter() - start,
            ran=memory.temp_size_in_bytes <= run_limit,
        )
        if records[impl]["ran"]:
            compiled[impl] = program
        else:
            print(
                f"attention seq={seq} {impl}: temp "
                f"{memory.temp_size_in_bytes / GiB:.1f} GiB > --max-run-gib, not run",
                flush=True,
            )
    outputs = {}
    for impl, program in compiled.items():
        seconds, outputs[impl] = _call(program, inputs)
        records[impl]["first_call_seconds"] = seconds
    times = {impl: [] for impl in compiled}
    for _ in range(args.repeats):
        for impl, program in compiled.items():
            times[impl].append(_call(program, inputs)[0])
    for impl in compiled:
        records[impl].update(_timing(times[impl]))
    if len(outputs) == 2:
        reference = jax.tree_util.tree_leaves(outputs["reference"])
        blockwise = jax.tree_util.tree_leaves(outputs["blockwise"])
        records["max_relative_difference"] = max(
            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
            for a, b in zip(reference, blockwise)
        )
    for impl in compiled:
        print(
            f"attention seq={seq} {impl}: temp {records[impl]['temp_bytes'] / MiB:.1f} "
            f"MiB, {_spread(records[impl])} s",
            flush=True,
        )
    return records


# -- main ------------------------------------------------------------------------------


def main():
    started = time.perf_counter()
    parser = _common.model_parser(
        __doc__.split("\n")[0], batch=8, seq=1024, dim=256, mlp_dim=704, layers=4
    )
    parser.add_argument("--long-seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--depths", type=int, default=4, help="num_depths D")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256, help="loss_chunk_size")
    parser.add_argument(
        "--block-size", type=int, default=128, help="attention_block_size"
    )
    parser.add_argument("--document-length", type=int, default=300)
    parser.add_argument(
        "--lean-impls",
        default="fused,chunked",
        help="loss_impls of the lean candidates (memory)",
    )
    parser.add_argument(
        "--timed-impls",
        default=None,
        help="loss_impls of the lean candidates that are also timed (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slack", type=float, default=1.2, help="the remat rule's")
    parser.add_argument(
        "--max-run-gib",
        type=float,
        default=None,
        help="largest compiled temp memory run (default: 70%% of MemAvailable)",
    )
    parser.add_argument("--attention-seqs", default="512,1024,2048,4096,8192")
    parser.add_argument("--attention-heads", type=int, default=8)
    parser.add_argument("--attention-kv-heads", type=int, default=4)
    parser.add_argument("--attention-head-dim", type=int, default=64)
    parser.add_argument("--tag", default="", help="suffix of the results file")
    args = parser.parse_args()
    _common.start(args)
    policies, context = POLICIES, CONTEXT
    if args.quick:
        # One lean step (fused, blockwise, no remat) against naive, at two shapes.
        args.batch, args.seq, args.long_seq = 2, 128, 256
        args.dim, args.mlp_dim, args.layers, args.vocab = 64, 128, 1, 1024
        args.depths, args.chunk, args.block_size = 1, 128, 64
        args.repeats, args.attention_seqs = 1, "256"
        args.lean_impls, args.timed_impls = "fused", None
        policies, context = POLICIES[:1], ()
    tokens = args.batch * args.seq
    if tokens % args.long_seq:
        parser.error(f"--long-seq {args.long_seq} must divide {tokens} tokens")
    long_batch = tokens // args.long_seq
    lean_impls = args.lean_impls.split(",")
    timed_impls = (
        lean_impls if args.timed_impls is None else args.timed_impls.split(",")
    )
    if "fused" not in timed_impls or not set(timed_impls) <= set(lean_impls):
        parser.error("--timed-impls must hold 'fused' and only --lean-impls")
    attention_seqs = [int(s) for s in args.attention_seqs.split(",") if s]
    available = _available_bytes()
    if args.max_run_gib is not None:
        run_limit = args.max_run_gib * GiB
    elif available is not None:
        run_limit = 0.7 * available
    else:
        run_limit = 8 * GiB
    name = "step_memory" + (f"_{args.tag}" if args.tag else "")
    shapes = {"short": (args.batch, args.seq), "long": (long_batch, args.long_seq)}
    lean = [(impl, "blockwise", remat) for impl in lean_impls for remat in policies]
    variants = [NAIVE, *lean, *context]

    # Memory: every variant at both shapes.
    memory, compiled_short = [], {}
    for shape_name, (batch, seq) in shapes.items():
        for variant in variants:
            compiled, seconds = compile_step(_config(args, variant), batch, seq)
            temp = compiled.memory_analysis().temp_size_in_bytes
            memory.append(
                dict(
                    shape=shape_name,
                    batch=batch,
                    seq=seq,
                    loss_impl=variant[0],
                    attention_impl=variant[1],
                    remat=variant[2],
                    temp_bytes=temp,
                    compile_seconds=seconds,
                )
            )
            if shape_name == "short":
                compiled_short[variant] = compiled
            print(
                f"{batch} × {seq} {_name(variant):32s} temp {temp / MiB:9.1f} MiB "
                f"(compiled in {seconds:.1f}s)",
                flush=True,
            )

    def temp(shape_name, variant):
        for r in memory:
            if (r["shape"], r["loss_impl"], r["attention_impl"], r["remat"]) == (
                shape_name,
                *variant,
            ):
                return r["temp_bytes"]
        raise KeyError((shape_name, variant))

    # Attention alone.
    attention = []
    for seq in attention_seqs:
        attention.append(dict(seq=seq, **measure_attention(args, seq, run_limit)))

    # Step time: naive and the timed lean steps, at the largest batch naive fits.
    timed = [NAIVE] + [v for v in lean if v[0] in timed_impls]
    time_batch = args.batch
    naive_temp = temp("short", NAIVE)
    while naive_temp > run_limit and time_batch > 1:
        time_batch //= 2
        naive_temp = compile_step(_config(args, NAIVE), time_batch, args.seq)[0]
        naive_temp = naive_temp.memory_analysis().temp_size_in_bytes
    if naive_temp > run_limit:
        sys.exit(f"naive does not fit --max-run-gib even at 1 × {args.seq}")
    if time_batch == args.batch:
        programs = {v: compiled_short[v] for v in timed}
    else:
        print(
            f"naive's {temp('short', NAIVE) / GiB:.1f} GiB do not fit "
            f"{run_limit / GiB:.1f} GiB: timing at {time_batch} × {args.seq}",
            flush=True,
        )
        programs = {
            v: compile_step(_config(args, v), time_batch, args.seq)[0] for v in timed
        }
    del compiled_short
    step_times = time_steps(args, programs, time_batch, args.seq)
    naive_seconds = step_times[NAIVE]["median_seconds"]

    # The remat rule, on the fused + blockwise steps.
    fused = {remat: ("fused", "blockwise", remat) for remat in policies}
    fastest = min(step_times[v]["median_seconds"] for v in fused.values())
    eligible = [
        remat
        for remat, v in fused.items()
        if step_times[v]["median_seconds"] <= args.slack * fastest
    ]
    chosen = min(eligible, key=lambda remat: temp("short", fused[remat]))
    lean_step = fused[chosen]
    default_remat = eqx_mtp.ModelConfig(vocab_size=2).remat

    short_ratio = temp("short", lean_step) / temp("short", NAIVE)
    long_ratio = temp("long", lean_step) / temp("short", lean_step)
    time_ratio = step_times[lean_step]["median_seconds"] / naive_seconds
    short_name = f"{args.batch} × {args.seq}"
    long_name = f"{long_batch} × {args.long_seq}"
    time_name = f"{time_batch} × {args.seq}"
    targets = [
        dict(
            target=f"lean temp ≤ 5% of naive's at {short_name}",
            measured=short_ratio,
            limit=0.05,
        ),
        dict(
            target=f"lean temp at {long_name} ≤ 1.2 × lean at {short_name}",
            measured=long_ratio,
            limit=1.2,
        ),
        dict(
            target=f"lean step time ≤ 1.2 × naive's (at {time_name})",
            measured=time_ratio,
            limit=1.2,
        ),
    ]
    for target in targets:
        target["met"] = target["measured"] <= target["limit"]
    seconds = time.perf_counter() - started

    payload = dict(
        benchmark="step_memory",
        quick=args.quick,
        environment=_common.environment(),
        settings=_common.model_settings(
            args,
            long_batch=long_batch,
            long_seq=args.long_seq,
            vocab=args.vocab,
            num_depths=args.depths,
            heads=args.heads,
            kv_heads=args.kv_heads,
            mtp_block="transformer",
            loss_chunk_size=args.chunk,
            attention_block_size=args.block_size,
            document_length=args.document_length,
            mtp_weight=MTP_WEIGHT,
            repeats=args.repeats,
            slack=args.slack,
            run_limit_bytes=run_limit,
            available_bytes=available,
            time_batch=time_batch,
            attention_heads=args.attention_heads,
            attention_kv_heads=args.attention_kv_heads,
            attention_head_dim=args.attention_head_dim,
        ),
        seconds=seconds,
        memory=memory,
        step_times=[
            dict(
                loss_impl=v[0],
                attention_impl=v[1],
                remat=v[2],
                batch=time_batch,
                seq=args.seq,
                **record,
            )
            for v, record in step_times.items()
        ],
        remat_rule=dict(
            fastest_median_seconds=fastest,
            eligible=eligible,
            chosen=chosen,
            library_default=default_remat,
        ),
        targets=targets,
        attention=attention,
    )
    _common.write_results(name, payload, args)

    # -- tables ------------------------------------------------------------------------
    def mib(nbytes):
        return f"{nbytes / MiB:,.0f}" if nbytes >= 100 * MiB else f"{nbytes / MiB:.1f}"

    def share(nbytes, of):
        return f"{100 * nbytes / of:.1f}%"

    memory_rows = []
    for variant in variants:
        short, long = temp("short", variant), temp("long", variant)
        label = (
            "naive" if variant == NAIVE else "lean" if variant in lean else "context"
        )
        memory_rows.append(
            [
                label,
                *variant,
                mib(short),
                share(short, temp("short", NAIVE)),
                mib(long),
                share(long, temp("long", NAIVE)),
                f"{long / short:.2f}",
            ]
        )
    memory_table = _common.markdown_table(
        [
            "",
            "loss",
            "attention",
            "remat",
            f"temp MiB {short_name}",
            "of naive",
            f"temp MiB {long_name}",
            "of naive",
            "long / short",
        ],
        memory_rows,
    )
    time_rows = []
    for variant, record in step_times.items():
        time_rows.append(
            [
                *variant,
                _spread(record),
                f"{record['median_seconds'] / naive_seconds:.2f}",
                f"{record['first_call_seconds']:.1f}",
                f"{record['loss']:.6f}",
            ]
        )
    time_table = _common.markdown_table(
        [
            "loss",
            "attention",
            "remat",
            f"step s, median (min–max), {time_name}",
            "/ naive",
            "warm-up s",
            "loss value",
        ],
        time_rows,
    )
    remat_rows = []
    for remat, variant in fused.items():
        median_seconds = step_times[variant]["median_seconds"]
        remat_rows.append(
            [
                remat,
                mib(temp("short", variant)),
                mib(temp("long", variant)),
                _spread(step_times[variant]),
                f"{median_seconds / fastest:.2f}",
                "yes" if remat in eligible else "no",
                "**chosen**" if remat == chosen else "",
            ]
        )
    remat_table = _common.markdown_table(
        [
            "remat",
            f"temp MiB {short_name}",
            f"temp MiB {long_name}",
            "step s",
            "/ fastest",
            f"within {args.slack}×",
            "",
        ],
        remat_rows,
    )
    attention_rows = []
    for record in attention:
        ref, blk = record["reference"], record["blockwise"]

        def time_cell(r):
            return _spread(r) if r["ran"] else "not run"

        attention_rows.append(
            [
                record["seq"],
                f"{ref['temp_bytes'] / MiB:,.1f}",
                f"{blk['temp_bytes'] / MiB:,.1f}",
                f"{blk['temp_bytes'] / ref['temp_bytes']:.4f}",
                time_cell(ref),
                time_cell(blk),
                f"{blk['median_seconds'] / ref['median_seconds']:.2f}"
                if ref["ran"] and blk["ran"]
                else "",
                f"{record['max_relative_difference']:.1e}"
                if "max_relative_difference" in record
                else "",
            ]
        )
    attention_table = _common.markdown_table(
        [
            "row length",
            "reference temp MiB",
            "blockwise temp MiB",
            "blockwise / reference",
            "reference s",
            "blockwise s",
            "time blockwise / reference",
            "max rel. difference",
        ],
        attention_rows,
    )
    target_table = _common.markdown_table(
        ["target", "measured", "", "met"],
        [
            [
                t["target"],
                f"{100 * t['measured']:.1f}%"
                if t["limit"] < 1
                else f"{t['measured']:.2f}×",
                f"limit {100 * t['limit']:.0f}%"
                if t["limit"] < 1
                else f"limit {t['limit']}×",
                "met" if t["met"] else "missed",
            ]
            for t in targets
        ],
    )
    env = payload["environment"]
    command = " ".join(["python benchmarks/step_memory.py"] + sys.argv[1:])
    lines = [
        "## Step memory" + (f" ({args.tag})" if args.tag else ""),
        "",
        f"`{command}` ({env['date']}, {env['device']}, {env['cpu_count']} cores, "
        f"load average {env['load_average']}, jax {env['jax']}, git {env['git']}; "
        f"{seconds / 60:.1f} min). The whole step, `filter_value_and_grad` of "
        f"`mtp_loss` (no optimizer update): vocab {args.vocab}, dim {args.dim}, "
        f"{args.layers} trunk layers, {args.heads} heads / {args.kv_heads} kv heads, "
        f"mlp {args.mlp_dim}, D = {args.depths} transformer depths, "
        f"`loss_chunk_size` {args.chunk}, `attention_block_size` {args.block_size}, "
        f"float32, rows packed with documents of about {args.document_length} "
        "tokens. Memory is XLA's compiled `temp_size_in_bytes`; times are medians "
        f"(min–max) of {args.repeats} interleaved calls after a warm-up.",
        "",
        f"**Compiled temp memory**, {short_name} and {long_name} tokens:",
        "",
        memory_table,
        "",
        f"**Step time** at {time_name}"
        + (
            ""
            if time_batch == args.batch
            else f" (naive's {mib(temp('short', NAIVE))} MiB do not fit "
            f"{run_limit / GiB:.1f} GiB here, so the batch was halved)"
        )
        + ":",
        "",
        time_table,
        "",
        f"**Remat rule** (fused + blockwise): the leanest policy within {args.slack}× "
        f"of the fastest's step time. Chosen: `remat={chosen!r}`; "
        f"`ModelConfig`'s default is `remat={default_remat!r}`"
        + (" (they agree)." if chosen == default_remat else " (**they differ**)."),
        "",
        remat_table,
        "",
        f"**Targets** (lean = fused, blockwise, `remat={chosen!r}`):",
        "",
        target_table,
        "",
        f"**Attention alone**, one row, {args.attention_heads} heads / "
        f"{args.attention_kv_heads} kv heads / head_dim {args.attention_head_dim}, "
        f"tiles of {args.block_size}, forward + backward (`jax.vjp`); temp memory "
        "excludes the outputs (the attention output and three gradients, the same "
        "for both). `not run`: compiled only, its temp memory exceeds "
        f"{run_limit / GiB:.1f} GiB.",
        "",
        attention_table,
    ]
    report = "\n".join(lines)
    print()
    print(report)
    print()
    _common.write_doc_section(name, report, args)


if __name__ == "__main__":
    main()
