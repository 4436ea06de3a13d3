"""Splash attention, the Pallas TPU kernel shipped with JAX
(`jax.experimental.pallas.ops.tpu.splash_attention`), with segment ids."""

from __future__ import annotations

import math

from jaxtyping import Array, Float, Int

from ._common import PAD_SEGMENT, pad_row, padded_length, repeat_kv_heads


def splash_tpu_attention(
    queries: Float[Array, "seq heads head_dim"],
    keys: Float[Array, "seq kv_heads head_dim"],
    values: Float[Array, "seq kv_heads head_dim"],
    *,
    segment_ids: Int[Array, " seq"],
    block_size: int = 128,
    interpret: bool = False,
) -> Float[Array, "seq heads head_dim"]:
    """Causal self-attention over one packed row with JAX's splash attention kernel
    (a causal mask whose fully masked tiles are skipped, segment ids for the
    documents). Splash does not scale the scores, so the queries are scaled first.
    `interpret=True` runs the kernel in Pallas's interpreter, on any backend."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
        splash_attention_mask as masks,
    )

    seq_len, num_heads, head_dim = queries.shape
    block = min(block_size, padded_length(seq_len, 128))
    length = padded_length(seq_len, block)
    mask = masks.MultiHeadMask(
        [masks.CausalMask((length, length)) for _ in range(num_heads)]
    )
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )

    def heads_first(x):
        return pad_row(x, length, 0).transpose(1, 0, 2)

    segments = pad_row(segment_ids, length, PAD_SEGMENT)
    out = kernel(
        heads_first(queries * (1.0 / math.sqrt(head_dim))).astype(queries.dtype),
        heads_first(repeat_kv_heads(keys, num_heads)),
        heads_first(repeat_kv_heads(values, num_heads)),
        segment_ids=splash.SegmentIds(q=segments, kv=segments),
    )
    return out.transpose(1, 0, 2)[:seq_len]
