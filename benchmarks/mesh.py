"""Collective bytes and per-device memory of one sharded `train_step`: XLA's program
against a formula.

`python benchmarks/mesh.py [--quick] [--pod] [--meshes D,M,C ...] [--real-devices]`.
The script gives itself 8 simulated CPU devices
(`--xla_force_host_platform_device_count=8`, set before JAX is imported, unless
`XLA_FLAGS` sets a count already); with `--real-devices` it leaves the platform to JAX
and lays each mesh over every device JAX sees, every process's in a multi-process run
(what `python -m benchmarks --mesh ...` asks for). For every mesh `(data, model,
context)` of `--meshes`, and for `(1, 1, 1)` on one device as the baseline, it places
a model and its AdamW state by `eqx_mtp.DEFAULT_RULES`, lowers and compiles one
`eqx_mtp.train.train_step` (nothing runs), and reads from the optimised HLO
(`_hlo.py`, whose docstring says how collectives and their bytes are counted) the
bytes every collective moves per device per training step, next to the formula of
`_mesh_formula.py` from the model's shape and the mesh. Collectives whose replica
groups hold one device move nothing and are left out. Token ids, flags and other
integer collectives are counted in the HLO totals (and reported apart) but not in
the formula: they are a few bytes per token.

**The embedding's share.** The tied embedding's collectives (its FSDP gather and the
one reduction of its per-token-shard copies' gradient, which sums every lookup's and
every head's) are reported apart: in the HLO, every array of a collective shaped like
a shard of the table (`[V or V/model, H/k]`, or `[V_pad/model, H]`); in the formula,
the terms of its `embedding` group.

`--pod` prints only the formula at pod scale (a Llama-2-7B trunk on 256 chips, one
DeepSeek-V3-sized MTP depth); nothing is compiled. `--quick`: one layer of width 64,
vocabulary 1024, 8 rows of 32 tokens, on the mesh (2, 2, 2) (or those of `--meshes`).
"""

from __future__ import annotations

import os
import sys

# Before JAX is imported (by `_common` too): 8 simulated CPU devices, unless the real
# ones are asked for (read from the command line here, before argparse runs).
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if "--real-devices" not in sys.argv[1:]:
    if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" {_DEVICE_FLAG}=8"
        ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import _common  # noqa: E402
import _hlo  # noqa: E402
import _mesh_formula as formula  # noqa: E402
import _mesh_report  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from _step import step_arguments  # noqa: E402

import eqx_mtp  # noqa: E402
from eqx_mtp.train._train_step import _donating_train_step  # noqa: E402

MESHES = ((8, 1, 1), (4, 2, 1), (2, 2, 2), (2, 1, 4), (1, 1, 8))
MiB = 2**20


def _config(args) -> eqx_mtp.ModelConfig:
    return _common.model_config(
        args,
        vocab=args.vocab,
        num_depths=args.depths,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        # The formula is the materialised attention's. The blockwise kernel's causal
        # tile loops have data-dependent trip counts on a context axis, and hold
        # collectives there, so the HLO cannot say how often those run.
        attention_impl="reference",
    )


def _setup(args, config, mesh_shape) -> formula.Setup:
    data, model, context = mesh_shape
    return formula.Setup(
        vocab=config.vocab_size,
        dim=config.dim,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        mlp_dim=config.mlp_dim,
        num_depths=config.num_depths,
        rows=args.batch,
        seq=args.seq,
        data=data,
        model=model,
        context=context,
        micro_batches=args.micro_batches,
        remat=config.remat,
        tie_embeddings=config.tie_embeddings,
    )


def embedding_arrays(config: eqx_mtp.ModelConfig, model: int):
    """`(dtype, shape) -> bool`: whether an array of a collective is (a shard of) the
    embedding table or its gradient, `[V or V/model, H/k]`, or a copy's gradient,
    `[V_pad/model, H]` (the vocabulary padded to a multiple of `model`)."""
    rows = {
        config.vocab_size,
        config.vocab_size // model,
        -(-config.vocab_size // model),
    }

    def where(dtype, shape):
        return len(shape) == 2 and shape[0] in rows and config.dim % shape[1] == 0

    return where


def _shard_bytes(tree) -> int:
    """Bytes of device 0's shard of every array of `tree`."""
    return sum(
        leaf.addressable_shards[0].data.nbytes
        for leaf in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))
    )


def _lower_step(args, config, mesh):
    """`(lowered, placed model, optimizer state)` of one sharded `train_step`."""
    placed = eqx_mtp.shard_tree(eqx_mtp.MTPModel(config, key=jax.random.key(0)), mesh)
    optimizer = eqx_mtp.train.make_optimizer(
        placed, learning_rate=1e-3, total_steps=100, warmup_steps=10
    )
    params = eqx.filter(placed, eqx.is_array)
    state_shapes = jax.eval_shape(optimizer.init, params)
    opt_state = jax.jit(
        optimizer.init, out_shardings=eqx_mtp.named_shardings(state_shapes, mesh)
    )(params)
    shape = (args.micro_batches, args.batch, args.seq)
    layout = eqx_mtp.batch_sharding(mesh, 3)
    rng = np.random.default_rng(0)
    positions = np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape)
    batch = dict(
        tokens=rng.integers(0, config.vocab_size, shape, dtype=np.int32),
        segment_ids=np.ones(shape, np.int32),
        positions=positions,
    )
    batch = {k: jax.device_put(v, layout) for k, v in batch.items()}
    with warnings.catch_warnings():
        # Nothing runs, so the donated buffers' reuse does not matter here.
        warnings.filterwarnings("ignore", message="Some donated buffers")
        # `train_step` is a plain function around its jitted, donating body.
        arguments = step_arguments(
            optimizer, batch, np.float32(0.3), "mean", placed, opt_state, mesh
        )
        return _donating_train_step.lower(*arguments), placed, opt_state


def measure(args, config, mesh_shape, devices) -> dict:
    """Compile the step on one mesh and hold its HLO's collectives against the
    formula's; memory per device besides."""
    data, model, context = mesh_shape
    devices = devices[: data * model * context]
    mesh = eqx_mtp.make_mesh(data, model, context, devices=devices)
    start = time.perf_counter()
    lowered, placed, opt_state = _lower_step(args, config, mesh)
    lowered_at = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers")
        compiled = lowered.compile().compiled
    compiled_at = time.perf_counter()
    records = _hlo.collectives(compiled.as_text())
    setup = _setup(args, config, mesh_shape)
    terms = formula.collective_terms(setup)
    by_kind = dict.fromkeys(_hlo.KINDS, 0) | formula.total_by(terms, "kind")
    by_group = formula.total_by(terms, "group")
    memory = compiled.memory_analysis()
    top = sorted(
        (r for r in records if r["group"] > 1), key=lambda r: -r["bytes"] * r["times"]
    )[:12]
    return dict(
        mesh=dict(data=data, model=model, context=context),
        seconds=dict(
            place_and_lower=lowered_at - start, compile=compiled_at - lowered_at
        ),
        hlo=_hlo.collective_bytes(records),
        hlo_embedding=_hlo.collective_bytes(
            records, where=embedding_arrays(config, model)
        ),
        formula=dict(
            by_kind=by_kind,
            by_group=by_group,
            total=sum(by_kind.values()),
            terms=terms,
        ),
        memory=dict(
            argument_bytes=memory.argument_size_in_bytes,
            output_bytes=memory.output_size_in_bytes,
            alias_bytes=memory.alias_size_in_bytes,
            temp_bytes=memory.temp_size_in_bytes,
        ),
        param_bytes_per_device=_shard_bytes(placed),
        opt_state_bytes_per_device=_shard_bytes(opt_state),
        formula_param_bytes_per_device=formula.parameter_bytes_per_device(setup),
        largest_hlo_collectives=[
            dict(
                kind=r["kind"],
                group=r["group"],
                times=r["times"],
                bytes=r["bytes"],
                type=r["type"][:200],
                op_name=r["op_name"][-160:],
            )
            for r in top
        ],
    )


# -- main ------------------------------------------------------------------------------


def _parser():
    parser = _common.model_parser(
        __doc__.split("\n")[0], batch=8, seq=256, dim=256, mlp_dim=768, layers=2
    )
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--depths", type=int, default=1, help="num_depths D")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument(
        "--meshes",
        default=None,
        help="space-separated data,model,context triples (default: "
        + " ".join(",".join(map(str, mesh)) for mesh in MESHES)
        + "; with --quick 2,2,2; with --real-devices those of every device, or "
        "N,1,1)",
    )
    parser.add_argument(
        "--real-devices",
        action="store_true",
        help="JAX's own platform and every device it sees (every process's), not "
        "simulated CPU devices",
    )
    parser.add_argument(
        "--pod", action="store_true", help="only print the formula at pod scale"
    )
    parser.add_argument("--tag", default="", help="suffix of the results file")
    return parser


def _meshes(parser, args, devices) -> list[tuple[int, int, int]]:
    """The meshes asked for, checked; under `--quick` the sizes shrink to fit them."""
    if args.meshes is not None:
        meshes = [tuple(int(n) for n in m.split(",")) for m in args.meshes.split()]
    elif args.quick:
        meshes = [(2, 2, 2)]
    elif args.real_devices:
        meshes = [m for m in MESHES if math.prod(m) == len(devices)]
        meshes = meshes or [(len(devices), 1, 1)]
    else:
        meshes = list(MESHES)
    if args.quick:
        args.dim, args.mlp_dim, args.layers, args.vocab = 64, 128, 1, 1024
        # Rows and their length divisible by any mesh's data and context axes.
        args.batch = math.lcm(8, *(m[0] for m in meshes if m))
        args.seq = math.lcm(32, *(m[-1] for m in meshes if m))
    for mesh in meshes:
        if len(mesh) != 3 or min(mesh) < 1:
            parser.error(f"--meshes: {mesh} is not three positive sizes")
        if args.real_devices and math.prod(mesh) != len(devices):
            parser.error(
                f"--meshes: {mesh} is not a mesh of all {len(devices)} devices "
                f"({devices[0].device_kind})"
            )
        if math.prod(mesh) > len(devices):
            sys.exit(
                f"mesh {mesh} needs {math.prod(mesh)} devices, got {len(devices)}: "
                f"set XLA_FLAGS={_DEVICE_FLAG}=N"
            )
        if args.batch % mesh[0] or args.seq % mesh[2]:
            parser.error(
                f"--meshes: {mesh}: data must divide --batch {args.batch} and "
                f"context --seq {args.seq}"
            )
    return meshes


def main():
    started = time.perf_counter()
    parser = _parser()
    args = parser.parse_args()
    if args.pod:
        print(_mesh_report.pod_report(formula.pod_costs()))
        return
    _common.start(args)
    # Simulated devices are this process's own; real ones are the whole run's.
    devices = jax.devices() if args.real_devices else jax.local_devices()
    meshes = _meshes(parser, args, devices)
    config = _config(args)
    records = []
    for mesh in [(1, 1, 1), *meshes]:
        # The one-device baseline on a device of this process, so every process
        # can compile it.
        on = jax.local_devices() if mesh == (1, 1, 1) else devices
        record = measure(args, config, mesh, on)
        records.append(record)
        print(
            f"mesh {_mesh_report.mesh_name(record)}: HLO "
            f"{record['hlo']['total'] / MiB:.2f} MiB, "
            f"formula {record['formula']['total'] / MiB:.2f} MiB, lower "
            f"{record['seconds']['place_and_lower']:.1f}s, compile "
            f"{record['seconds']['compile']:.1f}s",
            flush=True,
        )
    seconds = time.perf_counter() - started
    payload = dict(
        benchmark="mesh",
        environment=_common.environment(),
        settings=_common.model_settings(
            args,
            meshes=[dict(zip(("data", "model", "context"), m)) for m in meshes],
            real_devices=args.real_devices,
            vocab=args.vocab,
            heads=args.heads,
            kv_heads=args.kv_heads,
            num_depths=args.depths,
            micro_batches=args.micro_batches,
            loss_impl=config.loss_impl,
            loss_chunk_size=config.loss_chunk_size,
            remat=config.remat,
        ),
        seconds=seconds,
        records=records,
        pod=formula.pod_costs(),
    )
    name = "mesh" + (f"_{args.tag}" if args.tag else "")
    _common.write_results(name, payload, args)
    _mesh_report.print_report(args, config, records, seconds)


if __name__ == "__main__":
    main()
