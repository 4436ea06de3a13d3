"""What the kernel wrappers share: padding a row to whole tiles, and grouped heads."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array

# A padded query or key gets this segment id: it matches no real token's (ids are
# >= 0), so padding and real tokens never see each other.
PAD_SEGMENT = -1


def pad_row(x: Array, length: int, fill) -> Array:
    """`x` padded along axis 0 to `length` with `fill`."""
    pad = length - x.shape[0]
    if pad == 0:
        return x
    return jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])


def padded_length(seq_len: int, block_size: int) -> int:
    """The row length rounded up to whole tiles."""
    return -(-seq_len // block_size) * block_size


def repeat_kv_heads(x: Array, num_heads: int) -> Array:
    """`[seq, kv_heads, d] -> [seq, heads, d]`: each key/value head repeated for the
    `heads / kv_heads` query heads it serves (the kernels take as many as queries)."""
    return jnp.repeat(x, num_heads // x.shape[1], axis=1)
