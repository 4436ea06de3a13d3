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

`--quick`: the larger model only, cut to one layer of width 64, rows of 64 tokens, a
1024² matmul, one repeat.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import _common
import _flops
import jax
import jax.numpy as jnp
from _step import Case, default_job, larger_model, part_programs
from _timing import spread, time_interleaved
from ce_speed import ce_programs

import eqx_mtp
from eqx_mtp.train._train_step import _donating_train_step

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


# -- the peak --------------------------------------------------------------------------


def published_peak(device_kind: str, dtype: str) -> float | None:
    """The published dense peak in FLOP/s of this chip for `dtype`, if listed."""
    for kind, peaks in PUBLISHED_PEAK_TFLOPS.items():
        if device_kind.lower().startswith(kind.lower()) and dtype in peaks:
            return peaks[dtype] * 1e12
    return None


def matmul_program(size: int, dtype):
    """A square matmul, as a program of no arguments."""
    square = jnp.ones((size, size), dtype) / size
    matmul = jax.jit(lambda a: a @ a)
    return lambda: matmul(square)


# -- the run ---------------------------------------------------------------------------


def peak_dtype(config: eqx_mtp.ModelConfig) -> str:
    """The published peak that applies to the step's matmuls: bfloat16's, or for
    float32 on a GPU TF32's (JAX's default matmul precision there), on a TPU
    bfloat16's (its default precision passes float32 through bfloat16)."""
    if config.compute_dtype == "bfloat16" or jax.default_backend() == "tpu":
        return "bfloat16"
    return "tf32" if jax.default_backend() == "gpu" else "float32"


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _cases(args) -> list[Case]:
    """The default job's model and the larger one; under `--quick` only the larger
    one (the one the breakdown cuts up), with one layer of width 64, and the
    cross-entropy and matmul sizes cut down."""
    config, job = default_job()
    large = larger_model(config)
    if not args.quick:
        return [
            Case("default", config, job.data.batch_size, job.data.seq_len, job),
            Case("larger", large, args.large_batch, large.max_seq_len, job),
        ]
    args.repeats, args.matmul, args.ce_tokens, args.ce_dim = 1, 1024, 512, 32
    args.ce_repeats, args.ce_vocabs = 1, "1024"
    tiny = dataclasses.replace(large, dim=64, num_layers=1, mlp_dim=128, max_seq_len=64)
    return [Case("larger", tiny, 1, 64, job)]


def _count(case: Case) -> dict:
    """The FLOP model's counts of the case's step, and XLA's."""
    flops = _flops.step_flops(case.config, batch=case.batch_rows, seq=case.seq)
    start = time.perf_counter()
    xla = _flops.xla_flops(_donating_train_step, *case.step_arguments())
    hardware = flops["hardware"]["total"] + flops["optimizer"]
    print(
        f"{case.name}: model {flops['model']['total']:.4g}, hardware "
        f"{hardware:.4g}, XLA {xla['as_compiled']:.4g} (loops once), "
        f"{xla['unrolled']:.4g} (unrolled; dots {xla['unrolled_dots']:.4g}): "
        f"ratio {xla['unrolled'] / hardware:.3f}; counted in "
        f"{time.perf_counter() - start:.0f}s",
        flush=True,
    )
    return dict(flops, xla=xla)


def _result(case: Case, count: dict, timing, peak: float) -> dict:
    seconds = timing.median
    model_flops = count["model"]["total"]
    hardware = count["hardware"]["total"] + count["optimizer"]
    return dict(
        name=case.name,
        config=case.config.to_dict(),
        batch=case.batch_rows,
        seq=case.seq,
        tokens=case.batch_rows * case.seq,
        step_seconds=timing.seconds,
        median_seconds=seconds,
        first_call_seconds=timing.first_call_seconds,
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


def _peak(args, config, matmul_seconds: list[float]) -> dict:
    """The peak MFU is measured against: on CPU the matmul timed in this run, on an
    accelerator the chip's published peak (or the matmul where it is not listed)."""
    device_kind = str(jax.devices()[0].device_kind)
    measured = 2 * args.matmul**3 / _common.median(matmul_seconds)
    published = published_peak(device_kind, peak_dtype(config))
    on_cpu = jax.default_backend() == "cpu"
    source = "measured matmul" if on_cpu else "published spec"
    if not on_cpu and not published:
        source = "measured matmul (chip not listed)"
    return dict(
        flops_per_second=(measured if on_cpu else published) or measured,
        source=source,
        measured_matmul_flops_per_second=measured,
        matmul_seconds=matmul_seconds,
        published_flops_per_second=published,
        device_kind=device_kind,
    )


def _cross_entropy(args, chunk: int) -> list[dict]:
    """Fused against naive cross-entropy, loss + gradients, per vocabulary."""
    vocabs = [int(v) for v in args.ce_vocabs.split(",")]
    programs = ce_programs(
        args.ce_tokens, args.ce_dim, vocabs, chunk, ("naive", "fused")
    )
    timings = time_interleaved(
        {f"ce {impl} V={vocab}": p for (vocab, impl), p in programs.items()},
        args.ce_repeats,
    )
    results = []
    for vocab in vocabs:
        naive = timings[f"ce naive V={vocab}"].seconds
        fused = timings[f"ce fused V={vocab}"].seconds
        results.append(
            dict(
                vocab=vocab,
                naive_seconds=naive,
                fused_seconds=fused,
                ratio=_common.median(fused) / _common.median(naive),
                # Each repeat's fused over the same repeat's naive: the spread.
                ratios=[f / n for f, n in zip(fused, naive)],
            )
        )
    return results


def main():
    args = _parser().parse_args()
    _common.start(args)
    cases = _cases(args)
    counts = {}
    for case in cases:
        case.setup()
        counts[case.name] = _count(case)

    programs = {case.name: case.step for case in cases}
    programs["matmul"] = matmul_program(args.matmul, jnp.float32)
    timings = time_interleaved(programs, args.repeats)
    config, job = cases[0].config, cases[0].job
    peak = _peak(args, config, timings["matmul"].seconds)
    results = []
    for case in cases:
        timing = timings[case.name]
        results.append(
            _result(case, counts[case.name], timing, peak["flops_per_second"])
        )
        print(f"{case.name}: {timing.spread()}s, MFU {results[-1]['mfu']:.1%}")

    breakdown = None
    if results[-1]["mfu"] < MFU_TARGET or args.quick or args.breakdown:
        parts = time_interleaved(part_programs(cases[-1]), args.repeats)
        breakdown = dict(
            seconds={name: t.seconds for name, t in parts.items()},
            median_seconds={name: t.median for name, t in parts.items()},
            first_call_seconds={
                name: t.first_call_seconds for name, t in parts.items()
            },
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
        peak=peak,
        results=results,
        breakdown=breakdown,
        cross_entropy=_cross_entropy(args, config.loss_chunk_size),
    )
    _common.publish("mfu", payload, doc_section(payload), args)


def doc_section(payload: dict) -> str:
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
