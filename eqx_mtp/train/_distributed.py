"""Running the job as several JAX processes: start-up, which part of a batch a process
holds, and global arrays built from process-local data."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Sharding


def initialize(
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> bool:
    """Join a multi-process JAX run (`jax.distributed.initialize`) when asked to.

    Explicit `coordinator`, `num_processes` and `process_id` start JAX's own
    multi-process runtime on any platform (CPU processes use gloo collectives). With
    `auto`, or on a multi-host Cloud TPU VM (`TPU_WORKER_HOSTNAMES` lists several
    hosts), JAX detects them itself. Returns whether the run is multi-process.
    """
    explicit = (coordinator, num_processes, process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise ValueError(
                "--coordinator, --num-processes and --process-id go together: pass "
                "all three (or none, on a TPU pod)"
            )
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
        )
        return True
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if auto or len([h for h in tpu_hosts.split(",") if h]) > 1:
        jax.distributed.initialize()
        return True
    return False


def is_primary() -> bool:
    """Whether this process draws the progress bar and writes metrics and plots."""
    return jax.process_index() == 0


def process_box(sharding: Sharding, shape: Sequence[int]) -> tuple[slice, ...]:
    """The block of a global array of `shape` that this process's devices hold under
    `sharding`, one slice per dimension.

    Raises a `ValueError` when the process's shards do not form one block (a mesh
    whose devices interleave processes along a sharded axis).
    """
    boxes = {
        tuple(
            (index.start or 0, shape[d] if index.stop is None else index.stop)
            for d, index in enumerate(indices)
        )
        for indices in sharding.addressable_devices_indices_map(tuple(shape)).values()
    }
    box = tuple(
        (min(b[d][0] for b in boxes), max(b[d][1] for b in boxes))
        for d in range(len(shape))
    )
    volume = math.prod(stop - start for start, stop in box)
    covered = sum(math.prod(stop - start for start, stop in b) for b in boxes)
    if covered != volume:
        raise ValueError(
            f"this process's devices hold {sorted(boxes)} of an array of shape "
            f"{tuple(shape)}, which is not one block; lay the mesh out so each "
            "process's devices are contiguous along the data and context axes"
        )
    return tuple(slice(start, stop) for start, stop in box)


def global_array(
    local: np.ndarray, sharding: Sharding, global_shape: Sequence[int]
) -> jax.Array:
    """A global array from this process's block of it (see `process_box`)."""
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def replicated_input(value: np.ndarray, sharding: Sharding) -> jax.Array:
    """A global array from a value every process holds whole (e.g. eval batches)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])
