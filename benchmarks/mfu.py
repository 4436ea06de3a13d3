"""Model FLOPs utilisation of the training step, checked against XLA's FLOP count.

`python benchmarks/mfu.py [--quick]`. For two models — the one `eqx-mtp train` builds
with its default flags, and a larger one (dim 512, 8 layers, rows of 1024 tokens) —
the product's step (`eqx_mtp.train.train_step` with `make_optimizer`'s AdamW) is
timed, interleaved after a warm-up, and its FLOPs counted three ways:

- *model FLOPs* (`_flops.step_flops`): the matmuls of the trunk, every depth
    (`eh_proj`, its block, its head), the main head and causal attention, forward and
    backward; the MFU numerator, as in PaLM;
- *hardware FLOPs*: model FLOPs plus what the compiled step does besides
    (rematerialisation, attention's diagonal tiles computed whole and its scores
    recomputed in the backward);
- XLA's `cost_analysis()["flops"]` of the compiled step. XLA counts a loop's body
    once, whatever its trip count, so the step is also compiled with every loop
    unrolled (`_unrolled_loops`: the same program, laid out flat), which XLA counts
    whole; that count is compared with the hardware FLOPs.

Peak: on CPU, a square float32 matmul timed in the same run; on an accelerator, the
published dense peak of the chip for the dtype (`PUBLISHED_PEAK_TFLOPS`) next to the
measured matmul. Where the larger model falls short of 40% MFU (or with
`--breakdown`), the step is split into separately jitted parts (trunk, depths, losses,
optimizer), each timed the same way.
Last, the fused cross-entropy against the full-logits one (`ce_speed.py`'s programs),
loss + both gradients, at two vocabularies in one run.

`--quick`: tiny models (one layer of width 64 each), a 1024² matmul, one repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import sys
import time

import _common
import _flops
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_mtp
import eqx_mtp._blockwise as blockwise
from eqx_mtp._cross_entropy import head_loss_sum
from eqx_mtp.train._job import TrainConfig
from eqx_mtp.train._train_step import _donating_train_step, make_optimizer, train_step

# Dense (no sparsity) peak TFLOP/s by `device_kind` and dtype, from the vendors' data
# sheets ("published spec"; not measured here). H100: the SXM part; float32 is the
# non-tensor-core rate (TF32 tensor cores: 495 dense). TPUs: bfloat16 only.
PUBLISHED_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": dict(bfloat16=989.0, float32=67.0, tf32=495.0),
    "NVIDIA A100-SXM4-80GB": dict(bfloat16=312.0, float32=19.5, tf32=156.0),
    "NVIDIA A100-SXM4-40GB": dict(bfloat16=312.0, float32=19.5, tf32=156.0),
    "TPU v4": dict(bfloat16=275.0),
    "TPU v5 lite": dict(bfloat16=197.0),
    "TPU v5e": dict(bfloat16=197.0),
    "TPU v5p": dict(bfloat16=459.0),
    "TPU v5": dict(bfloat16=459.0),
    "TPU v6 lite": dict(bfloat16=918.0),
    "TPU v6e": dict(bfloat16=918.0),
}
MFU_TARGET = 0.40


# -- the models and their step ---------------------------------------------------------


def default_job() -> tuple[eqx_mtp.ModelConfig, TrainConfig]:
    """The model `eqx-mtp train` builds with its default flags, and those flags."""
    job = TrainConfig()
    return job.model, job


def larger_model(config: eqx_mtp.ModelConfig) -> eqx_mtp.ModelConfig:
    """Dim 512, 8 layers, rows of 1024, MLP width in the default's ratio (8/3, to a
    multiple of 64); the default's other settings."""
    return dataclasses.replace(
        config, dim=512, num_layers=8, mlp_dim=1408, max_seq_len=1024
    )


def make_batch(config: eqx_mtp.ModelConfig, batch: int, seq: int, seed: int = 0):
    """A `[1, batch, seq]` batch as the job feeds it: packed documents with their
    segment ids and positions."""
    tokens, segment_ids = _common.packed_rows(
        batch, seq, config.vocab_size, document_length=seq // 2, seed=seed
    )
    segments = np.asarray(segment_ids)
    starts = np.concatenate(
        [np.ones((batch, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1
    )
    index = np.broadcast_to(np.arange(seq), (batch, seq))
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    positions = jnp.asarray(index - first, jnp.int32)
    return {
        k: v[None] for k, v in dict(tokens=tokens, segment_ids=segment_ids).items()
    } | dict(positions=positions[None])


@dataclasses.dataclass
class Case:
    """One benchmarked model: its step's state and what the step costs."""

    name: str
    config: eqx_mtp.ModelConfig
    batch_rows: int
    seq: int
    job: TrainConfig
    model: eqx.Module = None
    opt_state: object = None
    optimizer: object = None
    batch: dict = None

    def setup(self):
        job = self.job
        self.model = eqx_mtp.MTPModel(self.config, key=jax.random.key(job.run.seed))
        self.optimizer = make_optimizer(
            self.model,
            learning_rate=job.optimizer.learning_rate,
            total_steps=job.run.steps,
            warmup_steps=job.optimizer.warmup_steps,
            min_learning_rate_ratio=job.optimizer.min_learning_rate_ratio,
            weight_decay=job.optimizer.weight_decay,
            grad_clip=job.optimizer.grad_clip,
            depth_grad_clip=job.optimizer.depth_grad_clip,
        )
        self.opt_state = self.optimizer.init(eqx.filter(self.model, eqx.is_array))
        self.batch = make_batch(self.config, self.batch_rows, self.seq)
        self.weight = np.asarray(float(job.objective.mtp_weight), np.float32)

    def step(self):
        self.model, self.opt_state, metrics = train_step(
            self.optimizer,
            self.model,
            self.opt_state,
            self.batch,
            self.weight,
            self.job.objective.reduction,
        )
        return jax.block_until_ready(metrics)

    def step_arguments(self):
        kept = (
            self.optimizer,
            self.batch,
            self.weight,
            self.job.objective.reduction,
            None,
        )
        kept += (eqx_mtp.DEFAULT_RULES,)
        return kept, self.model, self.opt_state


# -- XLA's count -----------------------------------------------------------------------


class _NumpyArange:
    """`jax.numpy` for `_blockwise` inside `_unrolled_loops`, except that `arange` is
    NumPy's (and `minimum`, which bounds the key tiles): the tile indices stay Python
    ints, and so do the loop bounds computed from them."""

    def __getattr__(self, name):
        if name in ("arange", "minimum"):
            return getattr(np, name)
        return getattr(jnp, name)


@contextlib.contextmanager
def _unrolled_loops():
    """Trace every `lax.scan`, `lax.map` and `lax.fori_loop` of the step as straight
    code, so that XLA's cost analysis, which counts a loop body once, sees every
    iteration. The blockwise attention's tile loops have bounds computed from the
    tile index: over a NumPy range the index is a Python int, and so are they."""
    scan, map_, fori_loop = jax.lax.scan, jax.lax.map, jax.lax.fori_loop

    def unrolled_scan(f, init, xs=None, length=None, reverse=False, **kwargs):
        if isinstance(xs, np.ndarray) and xs.ndim == 1:
            carry, ys = init, []
            for x in xs[::-1] if reverse else xs:
                carry, y = f(carry, int(x))
                ys.append(y)
            ys = ys[::-1] if reverse else ys
            return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)
        kwargs.pop("unroll", None)
        return scan(f, init, xs, length, reverse=reverse, unroll=True, **kwargs)

    def unrolled_map(f, xs, **kwargs):
        return unrolled_scan(lambda carry, x: (carry, f(x)), None, xs)[1]

    def unrolled_fori_loop(lower, upper, body, init, **kwargs):
        if not all(isinstance(b, int | np.integer) for b in (lower, upper)):
            return fori_loop(lower, upper, body, init, **kwargs)
        for i in range(int(lower), int(upper)):
            init = body(i, init)
        return init

    jax.lax.scan, jax.lax.map, jax.lax.fori_loop = (
        unrolled_scan,
        unrolled_map,
        unrolled_fori_loop,
    )
    blockwise.jnp = _NumpyArange()
    try:
        yield
    finally:
        jax.lax.scan, jax.lax.map, jax.lax.fori_loop = scan, map_, fori_loop
        blockwise.jnp = jnp


_DEFINITION = re.compile(r"(%[\w.\-]+) = [a-z0-9]+\[([0-9,]*)\]")
_DOT = re.compile(
    r"= [a-z0-9]+\[([0-9,]*)\]\S* dot\((%[\w.\-]+), %[\w.\-]+\)"
    r".*?lhs_contracting_dims=\{([0-9,]*)\}"
)


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def hlo_dot_flops(hlo: str) -> int:
    """FLOPs of the `dot` instructions of an HLO module's text: `2 ·` output size `·`
    contracted size each, every instruction once (so only for a module whose loops
    are unrolled)."""
    shapes = {m.group(1): _dims(m.group(2)) for m in _DEFINITION.finditer(hlo)}
    total = 0
    for match in _DOT.finditer(hlo):
        out, lhs, contracting = match.groups()
        contracted = math.prod(shapes[lhs][i] for i in _dims(contracting))
        total += 2 * math.prod(_dims(out)) * contracted
    return total


def xla_flops(case: Case) -> dict:
    """XLA's counts of the compiled step, the jitted body of `train_step`:
    `cost_analysis()["flops"]` of the product's program (`as_compiled`) and of the
    same with every loop unrolled (`unrolled`, traced afresh so that neither reuses
    the other's trace), and the FLOPs of the unrolled program's `dot`s alone
    (`unrolled_dots`)."""
    arguments = case.step_arguments()
    compiled = _donating_train_step.lower(*arguments).compile().compiled
    as_compiled = float(compiled.cost_analysis()["flops"])
    body = _donating_train_step.__wrapped__
    with _unrolled_loops():
        lowered = eqx.filter_jit(lambda *a: body(*a)).lower(*arguments)
    unrolled = lowered.compile().compiled
    return dict(
        as_compiled=as_compiled,
        unrolled=float(unrolled.cost_analysis()["flops"]),
        unrolled_dots=hlo_dot_flops(unrolled.as_text()),
    )


# -- the peak --------------------------------------------------------------------------


def published_peak(device_kind: str, dtype: str) -> float | None:
    """The published dense peak in FLOP/s of this chip for `dtype`, if listed."""
    for kind, peaks in PUBLISHED_PEAK_TFLOPS.items():
        if device_kind.lower().startswith(kind.lower()) and dtype in peaks:
            return peaks[dtype] * 1e12
    return None


def matmul_program(size: int, dtype):
    square = jnp.ones((size, size), dtype) / size
    return jax.jit(lambda a: a @ a), (square,)


# -- where the time goes ---------------------------------------------------------------


def part_programs(case: Case) -> dict:
    """The step cut into separately jitted parts, each forward + backward (as the step
    runs it, with its rematerialisation): the trunk from tokens to `h⁰`; the depths
    from `h⁰` (their blocks and `eh_proj`, their losses as a constant readout); every
    loss (the main head's and each depth's, from fixed hidden states); the optimizer
    update. Each takes the parameters and returns gradients, so nothing is dead code.
    """
    model, batch = case.model, case.batch
    tokens, segment_ids, positions = (
        batch[k][0] for k in ("tokens", "segment_ids", "positions")
    )
    params, static = eqx.partition(model, eqx.is_array)
    trunk, depths = model.trunk, model.depths

    def trunk_sum(trunk_params, cotangent):
        trunk = eqx.combine(trunk_params, eqx.partition(model.trunk, eqx.is_array)[1])
        h0 = jax.vmap(lambda t, s, p: trunk(t, positions=p, segment_ids=s))(
            tokens, segment_ids, positions
        )
        return jnp.sum(h0 * cotangent)

    h0 = jax.vmap(lambda t, s, p: trunk(t, positions=p, segment_ids=s))(
        tokens, segment_ids, positions
    )
    cotangent = jax.random.normal(jax.random.key(2), h0.shape, h0.dtype)

    def depth_hidden_sum(depth_params, h0):
        depths = eqx.combine(depth_params, eqx.partition(model.depths, eqx.is_array)[1])
        hiddens = eqx_mtp.scan_depths(
            depths,
            h0,
            tokens,
            embedding=trunk.embedding,
            final_norm=trunk.final_norm,
            readout=lambda k, normed: jnp.sum(normed * cotangent),
            segment_ids=segment_ids,
            positions=positions,
        )
        return jnp.sum(hiddens)

    def losses_sum(unembedding, hiddens):
        total = 0.0
        for k in range(hiddens.shape[0]):
            targets = jnp.roll(tokens, -(k + 1), axis=1).reshape(-1)
            where = jnp.ones(targets.shape, jnp.bool_)
            total = (
                total
                + head_loss_sum(
                    hiddens[k].reshape(-1, hiddens.shape[-1]),
                    unembedding,
                    targets,
                    where,
                    chunk_size=case.config.loss_chunk_size,
                    impl=case.config.loss_impl,
                )[0]
            )
        return total

    hiddens = jnp.stack([h0] * (1 + case.config.num_depths))
    grads = jax.tree.map(jnp.ones_like, params)

    def update(grads, opt_state, params):
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = case.optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state

    trunk_params = eqx.filter(trunk, eqx.is_array)
    depth_params = eqx.filter(depths, eqx.is_array)
    return dict(
        trunk=(eqx.filter_jit(jax.grad(trunk_sum)), (trunk_params, cotangent)),
        depths=(
            eqx.filter_jit(jax.grad(depth_hidden_sum, argnums=(0, 1))),
            (depth_params, h0),
        ),
        losses=(
            eqx.filter_jit(jax.grad(losses_sum, argnums=(0, 1))),
            (trunk.unembedding_matrix, hiddens),
        ),
        optimizer=(eqx.filter_jit(update), (grads, case.opt_state, params)),
    )


# -- timing ----------------------------------------------------------------------------


def time_interleaved(programs: dict, repeats: int) -> tuple[dict, dict]:
    """First-call seconds (compile + run) and `repeats` timed seconds of every
    `name: (fn, args)` or `name: callable`, the repeats interleaved."""

    def call(entry):
        if callable(entry):
            return entry()
        fn, arguments = entry
        return jax.block_until_ready(fn(*arguments))

    first = {}
    for name, entry in programs.items():
        start = time.perf_counter()
        call(entry)
        first[name] = time.perf_counter() - start
        print(f"{name}: first call {first[name]:.2f}s", flush=True)
    times = {name: [] for name in programs}
    for repeat in range(repeats):
        for name, entry in programs.items():
            start = time.perf_counter()
            call(entry)
            times[name].append(time.perf_counter() - start)
            print(f"repeat {repeat} {name}: {times[name][-1]:.3f}s", flush=True)
    return first, times


def spread(values) -> str:
    return f"{_common.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def ce_programs(tokens: int, dim: int, vocabs, chunk: int) -> dict:
    """`ce_speed.py`'s programs: `head_loss_sum` + gradients w.r.t. hidden and
    unembedding, fused and naive, per vocabulary."""
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (tokens, dim), jnp.float32)
    where = jnp.ones((tokens,), jnp.bool_)
    programs = {}
    for vocab in vocabs:
        unembed = 0.05 * jax.random.normal(keys[1], (vocab, dim), jnp.float32)
        targets = jax.random.randint(keys[2], (tokens,), 0, vocab)
        for impl in ("naive", "fused"):

            def loss(h, w, targets=targets, impl=impl):
                return head_loss_sum(h, w, targets, where, chunk_size=chunk, impl=impl)[
                    0
                ]

            programs[f"ce {impl} V={vocab}"] = (
                jax.jit(jax.value_and_grad(loss, (0, 1))),
                (hidden, unembed),
            )
    return programs


# -- the run ---------------------------------------------------------------------------


def peak_dtype(config: eqx_mtp.ModelConfig) -> str:
    """The published peak that applies to the step's matmuls: bfloat16's, or for
    float32 on a GPU TF32's (JAX's default matmul precision there), on a TPU
    bfloat16's (its default precision passes float32 through bfloat16)."""
    if config.compute_dtype == "bfloat16" or jax.default_backend() == "tpu":
        return "bfloat16"
    return "tf32" if jax.default_backend() == "gpu" else "float32"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repeat: a smoke run"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large-batch", type=int, default=4)
    parser.add_argument("--matmul", type=int, default=4096)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="time the step's parts even when the larger model reaches the target",
    )
    parser.add_argument("--ce-tokens", type=int, default=8192)
    parser.add_argument("--ce-dim", type=int, default=256)
    parser.add_argument("--ce-vocabs", default="32768,131072")
    parser.add_argument(
        "--ce-repeats",
        type=int,
        default=3,
        help="repeats of the cross-entropy programs (at V=131072 a naive call takes "
        "tens of seconds here)",
    )
    _common.add_run_flags(parser)
    args = parser.parse_args()
    _common.start(args)
    ce_vocabs = [int(v) for v in args.ce_vocabs.split(",")]

    config, job = default_job()
    large = larger_model(config)
    cases = [
        Case("default", config, job.data.batch_size, job.data.seq_len, job),
        Case("larger", large, args.large_batch, large.max_seq_len, job),
    ]
    if args.quick:
        args.repeats, args.matmul, args.ce_tokens, args.ce_dim = 1, 1024, 512, 32
        args.ce_repeats = 1
        ce_vocabs = [1024]
        cases = [
            Case(
                "default",
                dataclasses.replace(
                    config, dim=64, num_layers=1, mlp_dim=128, max_seq_len=32
                ),
                2,
                32,
                job,
            ),
            Case(
                "larger",
                dataclasses.replace(
                    large, dim=64, num_layers=1, mlp_dim=128, max_seq_len=64
                ),
                1,
                64,
                job,
            ),
        ]

    counts = {}
    for case in cases:
        case.setup()
        flops = _flops.step_flops(case.config, batch=case.batch_rows, seq=case.seq)
        start = time.perf_counter()
        xla = xla_flops(case)
        counts[case.name] = dict(flops, xla=xla)
        hardware = flops["hardware"]["total"] + flops["optimizer"]
        print(
            f"{case.name}: model {flops['model']['total']:.4g}, hardware "
            f"{hardware:.4g}, XLA {xla['as_compiled']:.4g} (loops once), "
            f"{xla['unrolled']:.4g} (unrolled; dots {xla['unrolled_dots']:.4g}): "
            f"ratio {xla['unrolled'] / hardware:.3f}; counted in "
            f"{time.perf_counter() - start:.0f}s",
            flush=True,
        )

    programs = {case.name: case.step for case in cases}
    programs["matmul"] = matmul_program(args.matmul, jnp.float32)
    first, times = time_interleaved(programs, args.repeats)

    device_kind = str(jax.devices()[0].device_kind)
    matmul_flops = 2 * args.matmul**3
    measured_peak = matmul_flops / _common.median(times["matmul"])
    published = published_peak(device_kind, peak_dtype(config))
    peak = measured_peak if jax.default_backend() == "cpu" else published
    peak_source = (
        "measured matmul"
        if jax.default_backend() == "cpu"
        else ("published spec" if published else "measured matmul (chip not listed)")
    )
    peak = peak or measured_peak

    results = []
    for case in cases:
        seconds = _common.median(times[case.name])
        count = counts[case.name]
        model_flops = count["model"]["total"]
        hardware = count["hardware"]["total"] + count["optimizer"]
        results.append(
            dict(
                name=case.name,
                config=case.config.to_dict(),
                batch=case.batch_rows,
                seq=case.seq,
                tokens=case.batch_rows * case.seq,
                step_seconds=times[case.name],
                median_seconds=seconds,
                first_call_seconds=first[case.name],
                flops=count,
                hardware_flops=hardware,
                xla_over_hardware=count["xla"]["unrolled"] / hardware,
                xla_dots_over_hardware_matmuls=count["xla"]["unrolled_dots"]
                / count["hardware"]["total"],
                xla_as_compiled_over_hardware=count["xla"]["as_compiled"] / hardware,
                model_flops_per_second=model_flops / seconds,
                hardware_flops_per_second=hardware / seconds,
                mfu=model_flops / seconds / peak,
                hfu=hardware / seconds / peak,
            )
        )
        print(
            f"{case.name}: {spread(times[case.name])}s, MFU {results[-1]['mfu']:.1%}",
            flush=True,
        )

    larger = results[-1]
    breakdown = None
    if larger["mfu"] < MFU_TARGET or args.quick or args.breakdown:
        parts = part_programs(cases[-1])
        part_first, part_times = time_interleaved(parts, args.repeats)
        breakdown = dict(
            seconds={name: part_times[name] for name in parts},
            median_seconds={name: _common.median(part_times[name]) for name in parts},
            first_call_seconds=part_first,
        )

    ce_first, ce_times = time_interleaved(
        ce_programs(args.ce_tokens, args.ce_dim, ce_vocabs, config.loss_chunk_size),
        args.ce_repeats,
    )
    ce = []
    for vocab in ce_vocabs:
        naive = ce_times[f"ce naive V={vocab}"]
        fused = ce_times[f"ce fused V={vocab}"]
        ce.append(
            dict(
                vocab=vocab,
                naive_seconds=naive,
                fused_seconds=fused,
                ratio=_common.median(fused) / _common.median(naive),
                # Each repeat's fused over the same repeat's naive: the spread.
                ratios=[f / n for f, n in zip(fused, naive)],
            )
        )

    payload = dict(
        benchmark="mfu",
        environment=_common.environment(),
        settings=dict(
            repeats=args.repeats,
            matmul_size=args.matmul,
            ce_tokens=args.ce_tokens,
            ce_dim=args.ce_dim,
            ce_repeats=args.ce_repeats,
            ce_chunk=config.loss_chunk_size,
            mtp_weight=job.objective.mtp_weight,
            optimizer="make_optimizer (AdamW, clipping)",
        ),
        peak=dict(
            flops_per_second=peak,
            source=peak_source,
            measured_matmul_flops_per_second=measured_peak,
            matmul_seconds=times["matmul"],
            published_flops_per_second=published,
            device_kind=device_kind,
        ),
        results=results,
        breakdown=breakdown,
        cross_entropy=ce,
    )
    _common.write_results("mfu", payload, args)
    _common.write_doc_section("mfu", doc_section(payload, args), args)


def doc_section(payload: dict, args) -> str:
    env, peak = payload["environment"], payload["peak"]
    command = " ".join(["python benchmarks/mfu.py"] + sys.argv[1:])
    rows = []
    for r in payload["results"]:
        f = r["flops"]
        c = r["config"]
        rows.append(
            [
                r["name"],
                f"dim {c['dim']}, {c['num_layers']} layers, D={c['num_depths']}, "
                f"{r['batch']} × {r['seq']}",
                f"{f['model']['total'] / 1e9:.1f}",
                f"{r['hardware_flops'] / 1e9:.1f}",
                f"{f['xla']['unrolled'] / 1e9:.1f}",
                f"{r['xla_over_hardware']:.3f}",
                f"{r['xla_dots_over_hardware_matmuls']:.3f}",
                f"{f['xla']['as_compiled'] / 1e9:.1f}",
                spread(r["step_seconds"]),
                f"{r['model_flops_per_second'] / 1e9:.0f}",
                f"{100 * r['mfu']:.1f}%",
                f"{100 * r['hfu']:.1f}%",
            ]
        )
    lines = [
        "## Model FLOPs utilisation",
        "",
        f"`{command}` ({env['date']}, {env['device']}, {env['cpu_count']} CPU cores "
        f"shared with other jobs, load average {env['load_average']}). The product's "
        "step (`train_step`, `make_optimizer`, one micro-batch of packed rows with "
        "segment ids and positions); median (min–max) of "
        f"{payload['settings']['repeats']} interleaved repeats after a warm-up. Peak: "
        f"{peak['flops_per_second'] / 1e9:.0f} GFLOP/s ({peak['source']}; a "
        f"{payload['settings']['matmul_size']}² float32 matmul ran at "
        f"{peak['measured_matmul_flops_per_second'] / 1e9:.0f} GFLOP/s in this run).",
        "",
        _common.markdown_table(
            [
                "model",
                "shape",
                "model GFLOP",
                "hardware GFLOP",
                "XLA GFLOP (unrolled)",
                "XLA / hardware",
                "XLA dots / hardware matmuls",
                "XLA GFLOP (as compiled)",
                "step s",
                "model GFLOP/s",
                "MFU",
                "HFU",
            ],
            rows,
        ),
    ]
    lines += [
        "",
        "*Model FLOPs* (the MFU numerator, PaLM's convention: no recompute) count the "
        "matmuls of the trunk, of every depth (`eh_proj`, block, head) and of the "
        "main head, forward and backward (3 × forward), and attention over the "
        "causal half of each row, `T(T+1)/2` query-key pairs: the blockwise kernel "
        "skips the tiles above the diagonal, so counting all `T²` (PaLM's "
        "`12·L·H·Q·T`) would credit it with work nobody does. *Hardware FLOPs* add "
        'what the step computes besides: `remat="full"` runs every block\'s '
        "forward again in the backward pass (not a trunk block's down projection, "
        "whose output nothing needs), the blockwise kernel computes the diagonal "
        "tiles whole (`T(T+block)/2` pairs) and recomputes the scores in its "
        "backward (five tile matmuls, not four), and AdamW's elementwise work "
        f"(≈ {_flops.OPTIMIZER_FLOPS_PER_PARAMETER} FLOPs per parameter; "
        "`benchmarks/_flops.py` has the whole model).",
        "",
        "XLA's `cost_analysis()` of the step as compiled counts each loop body once, "
        "whatever its trip count: the layer scan, the depth scan, the loss's chunks "
        "and the attention's tiles are all loops, hence the column \"as "
        'compiled", a fraction of the work. The comparison is therefore made on the '
        "same step traced with every loop unrolled (`_unrolled_loops`). XLA's `dot`s "
        "there (read from the compiled HLO) fall short of the hardware matmuls by "
        "half an attention forward per layer, because in the unrolled program XLA "
        "merges the backward's recomputed score tiles with the rematerialised "
        "forward's (the same operands), which the looped program cannot; its total "
        "also counts elementwise work (norms, RoPE, softmax; `exp` apart, as "
        "transcendentals), which about makes up for that.",
    ]
    b = payload["breakdown"]
    if b is not None:
        total = sum(b["median_seconds"].values())
        lines += [
            "",
            "Step time of the larger model by part (each part jitted alone, forward "
            "and backward as the step runs it; medians):",
            "",
            _common.markdown_table(
                ["part", "s", "share of the parts' sum"],
                [
                    [name, spread(b["seconds"][name]), f"{100 * s / total:.0f}%"]
                    for name, s in b["median_seconds"].items()
                ],
            ),
        ]
    lines += [
        "",
        f"Fused cross-entropy against full logits, {payload['settings']['ce_tokens']} "
        f"tokens, dim {payload['settings']['ce_dim']}, loss + both gradients, "
        f"chunks of {payload['settings']['ce_chunk']} tokens (the default), "
        f"{payload['settings']['ce_repeats']} repeats interleaved in this run:",
        "",
        _common.markdown_table(
            ["vocab", "naive s", "fused s", "fused / naive (per-repeat range)"],
            [
                [
                    c["vocab"],
                    spread(c["naive_seconds"]),
                    spread(c["fused_seconds"]),
                    f"{c['ratio']:.2f} ({min(c['ratios']):.2f}–{max(c['ratios']):.2f})",
                ]
                for c in payload["cross_entropy"]
            ],
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
