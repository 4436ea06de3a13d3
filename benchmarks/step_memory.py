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
import _step_memory_report
import equinox as eqx
import jax
import jax.numpy as jnp
from _timing import time_interleaved

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


def time_steps(args, programs: dict, batch: int, seq: int) -> dict:
    """Warm-up, then `args.repeats` interleaved rounds of every compiled step."""
    tokens, segment_ids = _common.packed_rows(
        batch, seq, args.vocab, document_length=args.document_length, seed=1
    )

    def bound(variant, compiled):
        model = eqx_mtp.MTPModel(_config(args, variant), key=jax.random.key(0))
        inputs = (eqx.filter(model, eqx.is_array), tokens, segment_ids)
        return lambda: compiled(*inputs)

    timings = time_interleaved(
        {_name(v): bound(v, compiled) for v, compiled in programs.items()},
        args.repeats,
    )
    return {
        v: dict(timings[_name(v)].record(), loss=float(timings[_name(v)].last[0]))
        for v in programs
    }


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
    timings = time_interleaved(
        {impl: (lambda p=p: p(*inputs)) for impl, p in compiled.items()}, args.repeats
    )
    outputs = {impl: timing.last for impl, timing in timings.items()}
    for impl, timing in timings.items():
        records[impl].update(timing.record())
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
            f"MiB, {timings[impl].spread('.2f')} s",
            flush=True,
        )
    return records


# -- main ------------------------------------------------------------------------------


def _parser():
    parser = _common.model_parser(
        __doc__.split("\n")[0], batch=8, seq=1024, dim=256, mlp_dim=704, layers=4
    )
    add = parser.add_argument
    add("--long-seq", type=int, default=4096)
    add("--vocab", type=int, default=32768)
    add("--depths", type=int, default=4, help="num_depths D")
    add("--heads", type=int, default=4)
    add("--kv-heads", type=int, default=2)
    add("--chunk", type=int, default=256, help="loss_chunk_size")
    add("--block-size", type=int, default=128, help="attention_block_size")
    add("--document-length", type=int, default=300)
    add(
        "--lean-impls",
        default="fused,chunked",
        help="loss_impls of the lean candidates (memory)",
    )
    add(
        "--timed-impls",
        default=None,
        help="loss_impls of the lean candidates that are also timed (default: all)",
    )
    add("--repeats", type=int, default=3)
    add("--slack", type=float, default=1.2, help="the remat rule's")
    add(
        "--max-run-gib",
        type=float,
        default=None,
        help="largest compiled temp memory run (default: 70%% of MemAvailable)",
    )
    add("--attention-seqs", default="512,1024,2048,4096,8192")
    add("--attention-heads", type=int, default=8)
    add("--attention-kv-heads", type=int, default=4)
    add("--attention-head-dim", type=int, default=64)
    add("--tag", default="", help="suffix of the results file")
    return parser


def _run_limit(args) -> tuple[float, int | None]:
    """The largest compiled temp memory that is run, and the memory available."""
    available = _available_bytes()
    if args.max_run_gib is not None:
        return args.max_run_gib * GiB, available
    return (8 * GiB if available is None else 0.7 * available), available


def measure_memory(args, shapes: dict, variants: list) -> tuple[list, dict]:
    """Every variant compiled at both shapes: the memory records, and the programs
    compiled at the short shape."""
    memory, compiled_short = [], {}
    for shape_name, (batch, seq) in shapes.items():
        for variant in variants:
            compiled, seconds = compile_step(_config(args, variant), batch, seq)
            temp = compiled.memory_analysis().temp_size_in_bytes
            loss_impl, attention_impl, remat = variant
            memory.append(
                dict(shape=shape_name, batch=batch, seq=seq, loss_impl=loss_impl)
                | dict(attention_impl=attention_impl, remat=remat, temp_bytes=temp)
                | dict(compile_seconds=seconds)
            )
            if shape_name == "short":
                compiled_short[variant] = compiled
            print(
                f"{batch} × {seq} {_name(variant):32s} temp {temp / MiB:9.1f} MiB "
                f"(compiled in {seconds:.1f}s)",
                flush=True,
            )
    return memory, compiled_short


def timed_programs(args, timed, naive_temp, compiled_short, run_limit):
    """`(batch, programs)`: the timed steps at the largest batch naive fits."""
    time_batch, short_temp = args.batch, naive_temp
    while naive_temp > run_limit and time_batch > 1:
        time_batch //= 2
        naive_temp = compile_step(_config(args, NAIVE), time_batch, args.seq)[0]
        naive_temp = naive_temp.memory_analysis().temp_size_in_bytes
    if naive_temp > run_limit:
        sys.exit(f"naive does not fit --max-run-gib even at 1 × {args.seq}")
    if time_batch == args.batch:
        return time_batch, {v: compiled_short[v] for v in timed}
    print(
        f"naive's {short_temp / GiB:.1f} GiB do not fit {run_limit / GiB:.1f} GiB: "
        f"timing at {time_batch} × {args.seq}",
        flush=True,
    )
    compile_at = {
        v: compile_step(_config(args, v), time_batch, args.seq)[0] for v in timed
    }
    return time_batch, compile_at


def remat_rule(args, policies, step_times, temp) -> dict:
    """Of the fused + blockwise steps, the leanest policy within `--slack` of the
    fastest's median step time."""
    fused = {remat: ("fused", "blockwise", remat) for remat in policies}
    fastest = min(step_times[v]["median_seconds"] for v in fused.values())
    eligible = [
        remat
        for remat, v in fused.items()
        if step_times[v]["median_seconds"] <= args.slack * fastest
    ]
    chosen = min(eligible, key=lambda remat: temp("short", fused[remat]))
    return dict(
        fastest_median_seconds=fastest,
        eligible=eligible,
        chosen=chosen,
        library_default=eqx_mtp.ModelConfig(vocab_size=2).remat,
    )


def targets(names: dict, ratios: tuple[float, float, float]) -> list[dict]:
    """The three targets of the lean step, each with whether it is met."""
    short_ratio, long_ratio, time_ratio = ratios
    rows = [
        (f"lean temp ≤ 5% of naive's at {names['short']}", short_ratio, 0.05),
        (
            f"lean temp at {names['long']} ≤ 1.2 × lean at {names['short']}",
            long_ratio,
            1.2,
        ),
        (f"lean step time ≤ 1.2 × naive's (at {names['time']})", time_ratio, 1.2),
    ]
    return [
        dict(target=target, measured=measured, limit=limit, met=measured <= limit)
        for target, measured, limit in rows
    ]


def main():
    started = time.perf_counter()
    parser = _parser()
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
    run_limit, available = _run_limit(args)
    shapes = {"short": (args.batch, args.seq), "long": (long_batch, args.long_seq)}
    lean = [(impl, "blockwise", remat) for impl in lean_impls for remat in policies]

    memory, compiled_short = measure_memory(args, shapes, [NAIVE, *lean, *context])
    temps = {
        (r["shape"], (r["loss_impl"], r["attention_impl"], r["remat"])): r["temp_bytes"]
        for r in memory
    }

    def temp(shape_name, variant):
        return temps[(shape_name, variant)]

    attention = [
        dict(seq=seq, **measure_attention(args, seq, run_limit))
        for seq in (int(s) for s in args.attention_seqs.split(",") if s)
    ]
    timed = [NAIVE] + [v for v in lean if v[0] in timed_impls]
    time_batch, programs = timed_programs(
        args, timed, temp("short", NAIVE), compiled_short, run_limit
    )
    del compiled_short
    step_times = time_steps(args, programs, time_batch, args.seq)
    rule = remat_rule(args, policies, step_times, temp)
    lean_step = ("fused", "blockwise", rule["chosen"])
    names = dict(
        short=f"{args.batch} × {args.seq}",
        long=f"{long_batch} × {args.long_seq}",
        time=f"{time_batch} × {args.seq}",
    )
    ratios = (
        temp("short", lean_step) / temp("short", NAIVE),
        temp("long", lean_step) / temp("short", lean_step),
        step_times[lean_step]["median_seconds"] / step_times[NAIVE]["median_seconds"],
    )
    settings = dict(long_batch=long_batch, long_seq=args.long_seq, vocab=args.vocab)
    settings |= dict(num_depths=args.depths, heads=args.heads, kv_heads=args.kv_heads)
    settings |= dict(mtp_block="transformer", loss_chunk_size=args.chunk)
    settings |= dict(attention_block_size=args.block_size)
    settings |= dict(document_length=args.document_length, mtp_weight=MTP_WEIGHT)
    settings |= dict(repeats=args.repeats, slack=args.slack, run_limit_bytes=run_limit)
    settings |= dict(available_bytes=available, time_batch=time_batch)
    settings |= dict(attention_heads=args.attention_heads)
    settings |= dict(attention_kv_heads=args.attention_kv_heads)
    settings |= dict(attention_head_dim=args.attention_head_dim)
    payload = dict(
        benchmark="step_memory",
        environment=_common.environment(),
        settings=_common.model_settings(args, **settings),
        seconds=time.perf_counter() - started,
        memory=memory,
        step_times=[
            dict(loss_impl=v[0], attention_impl=v[1], remat=v[2], batch=time_batch)
            | dict(seq=args.seq, **record)
            for v, record in step_times.items()
        ],
        remat_rule=rule,
        targets=targets(names, ratios),
        attention=attention,
    )
    report = _step_memory_report.section(payload, args.tag)
    print(f"\n{report}\n")
    name = "step_memory" + (f"_{args.tag}" if args.tag else "")
    _common.publish(name, payload, report, args)


if __name__ == "__main__":
    main()
