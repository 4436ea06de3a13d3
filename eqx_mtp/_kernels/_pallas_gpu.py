"""The Pallas GPU attention kernel shipped with JAX
(`jax.experimental.pallas.ops.gpu.attention.mha`), which takes segment ids."""

from __future__ import annotations

import math

from jaxtyping import Array, Float, Int

from ._common import PAD_SEGMENT, pad_row, padded_length, repeat_kv_heads


def pallas_gpu_attention(
    queries: Float[Array, "seq heads head_dim"],
    keys: Float[Array, "seq kv_heads head_dim"],
    values: Float[Array, "seq kv_heads head_dim"],
    *,
    segment_ids: Int[Array, " seq"],
    block_size: int = 128,
    interpret: bool = False,
) -> Float[Array, "seq heads head_dim"]:
    """Causal self-attention over one packed row with JAX's fused Pallas GPU kernel
    (forward and backward). The row is padded to whole tiles and the key/value heads
    repeated for their query heads. `interpret=True` runs the kernel in Pallas's
    interpreter, on any backend (slow; for tests)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    seq_len, num_heads, head_dim = queries.shape
    block = min(block_size, padded_length(seq_len, 16))
    length = padded_length(seq_len, block)
    sizes = gpu_attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    out = gpu_attention.mha(
        pad_row(queries, length, 0)[None],
        pad_row(repeat_kv_heads(keys, num_heads), length, 0)[None],
        pad_row(repeat_kv_heads(values, num_heads), length, 0)[None],
        pad_row(segment_ids, length, PAD_SEGMENT)[None],
        sm_scale=1.0 / math.sqrt(head_dim),
        causal=True,
        block_sizes=sizes,
        interpret=interpret,
    )
    return out[0, :seq_len]
