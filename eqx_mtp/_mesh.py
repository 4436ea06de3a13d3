"""The device mesh: axes `("data", "model", "context")` and how a batch lies on it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"
MODEL = "model"
CONTEXT = "context"
MESH_AXES = (DATA, MODEL, CONTEXT)
"""The axis names of every mesh the library takes, in order: `("data", "model",
"context")` ([`eqx_mtp.make_mesh`][])."""


def make_mesh(
    data: int = -1,
    model: int = 1,
    context: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A `jax.sharding.Mesh` with axes `("data", "model", "context")`.

    `data` shards rows of a batch and, FSDP-style, the large parameter matrices;
    `model` shards the vocabulary, attention heads and MLP hidden units (tensor
    parallelism); `context` shards the sequence axis of a batch.

    **Arguments:**

    - `data`, `model`, `context`: the size of each axis; one of them may be `-1`, which
        takes the devices the others leave.
    - `devices`: the devices to lay out; default every device of every process
        (`jax.devices()`).

    **Returns:**

    A mesh whose axes are all `AxisType.Auto`, so that `jit` partitions what runs on it.

    **Raises:**

    `ValueError` naming the axis when a size is not a positive integer or `-1`, or when
    the product of the sizes is not the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {DATA: data, MODEL: model, CONTEXT: context}
    for name, size in sizes.items():
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or not (size >= 1 or size == -1)
        ):
            raise ValueError(
                f"make_mesh: {name} must be a positive integer or -1, got {size!r}"
            )
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(
            f"make_mesh: only one axis may be -1, got -1 for {' and '.join(free)}"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"make_mesh: the other axes take {fixed} devices, which does not "
                f"divide the {len(devices)} devices, so {free[0]}=-1 has no size"
            )
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        layout = " × ".join(f"{name}={size}" for name, size in sizes.items())
        raise ValueError(
            f"make_mesh: {layout} is {math.prod(sizes.values())} devices, but there "
            f"are {len(devices)}"
        )
    return jax.make_mesh(
        tuple(sizes[name] for name in MESH_AXES),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def batch_spec(ndim: int = 2) -> PartitionSpec:
    """The `PartitionSpec` of a `[..., rows, seq]` batch array: rows over `data`,
    the sequence over `context`, leading axes (e.g. micro-batches) unsharded."""
    if ndim < 2:
        raise ValueError(f"batch_spec: a batch has at least 2 axes, got ndim={ndim}")
    return PartitionSpec(*([None] * (ndim - 2)), DATA, CONTEXT)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """`NamedSharding(mesh, batch_spec(ndim))`."""
    return NamedSharding(mesh, batch_spec(ndim))


def check_batch_fits_mesh(mesh: Mesh, shape: Sequence[int], *, name: str) -> None:
    """Raise a `ValueError` naming `name` when the `data` axis of `mesh` does not
    divide the rows of a `[..., rows, seq]` array or the `context` axis its
    sequence."""
    rows, seq_len = shape[-2], shape[-1]
    if rows % mesh.shape[DATA]:
        raise ValueError(
            f"{name}: {rows} rows cannot be split over the mesh's data axis of size "
            f"{mesh.shape[DATA]}; use a batch whose rows it divides"
        )
    if seq_len % mesh.shape[CONTEXT]:
        raise ValueError(
            f"{name}: a sequence of {seq_len} tokens cannot be split over the mesh's "
            f"context axis of size {mesh.shape[CONTEXT]}; use a seq_len it divides"
        )


def check_mesh(mesh) -> None:
    """Raise a `TypeError`/`ValueError` unless `mesh` is a `jax.sharding.Mesh` with
    the axes `("data", "model", "context")` (e.g. from [`eqx_mtp.make_mesh`][])."""
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (eqx_mtp.make_mesh), got {type(mesh)}"
        )
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(
            f"mesh must have the axes {MESH_AXES} (eqx_mtp.make_mesh), got "
            f"{tuple(mesh.axis_names)}"
        )


def _active_mesh_axis(name: str) -> int:
    """The size of axis `name` of the mesh that [`eqx_mtp.mtp_loss_sums`][] set for
    tracing (`jax.sharding.use_abstract_mesh`), or 0 outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or name not in mesh.axis_names:
        return 0
    return mesh.shape[name]


def tracing_on(mesh: Mesh | None):
    """A context in which the per-row code below sees `mesh` (nothing for `None`)."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def map_rows(fn: Callable) -> Callable:
    """`jax.vmap(fn)` over the rows of a batch; on a mesh (see `tracing_on`) the rows
    are named as split over `data`, so the sharding constraints of `fn`'s per-row code
    keep them split."""
    return jax.vmap(fn, spmd_axis_name=DATA if _active_mesh_axis(DATA) else None)


def gathered_over_context(x, *, head_axis: int | None = None):
    """One row's `[seq, ...]` array whole along its sequence axis (axis 0), on a mesh
    whose `context` axis splits the sequence: the keys, values and key segment ids
    that attention gathers so that every query shard sees its whole row. The heads
    (`head_axis`) stay split over `model` where it divides them. Outside a mesh, or
    with `context` of size 1, `x` unchanged."""
    if _active_mesh_axis(CONTEXT) <= 1:
        return x
    spec = [None] * x.ndim
    model = _active_mesh_axis(MODEL)
    if head_axis is not None and model > 1 and x.shape[head_axis] % model == 0:
        spec[head_axis] = MODEL
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
