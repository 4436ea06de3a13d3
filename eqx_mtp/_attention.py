"""Which attention a block runs (`ModelConfig.attention_impl`): the materialised
reference, the blockwise kernel in pure JAX, or a backend's fused kernel."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._blockwise import attention_of_documents
from ._kernels import pallas_gpu_attention, splash_tpu_attention
from ._mesh import CONTEXT, DATA, MODEL, _active_mesh_axis

KERNEL_BACKENDS = {"pallas_gpu": "gpu", "splash_tpu": "tpu"}
_KERNELS = {"pallas_gpu": pallas_gpu_attention, "splash_tpu": splash_tpu_attention}


def attention_mask(
    query_segment_ids: Int[Array, " seq"],
    key_segment_ids: Int[Array, " keys"],
    query_index: Int[Array, " seq"],
    key_index: Int[Array, " keys"],
) -> Bool[Array, "seq keys"]:
    """Causal block-diagonal mask: a query sees earlier-or-equal keys of its segment.

    Ids are compared by equality, so they must be document numbers
    ([`eqx_mtp.document_ids`][]) for a reused id to be another document. Padding
    (segment 0) sees only padding; the diagonal is always visible, so no row of the
    softmax is empty.
    """
    causal = key_index[None, :] <= query_index[:, None]
    same_segment = key_segment_ids[None, :] == query_segment_ids[:, None]
    return causal & same_segment


def grouped_attention(
    queries: Float[Array, "seq heads head_dim"],
    keys: Float[Array, "keys kv_heads head_dim"],
    values: Float[Array, "keys kv_heads head_dim"],
    mask: Bool[Array, "seq keys"],
) -> Float[Array, "seq heads head_dim"]:
    """Softmax attention where each key/value head serves `heads / kv_heads` query
    heads. Logits and softmax in float32."""
    seq_len, num_heads, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    q = queries.reshape(seq_len, num_kv_heads, group, head_dim)
    logits = jnp.einsum(
        "tkgd,skd->kgts", q, keys, preferred_element_type=jnp.float32
    ) / math.sqrt(head_dim)
    logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    out = jnp.einsum("kgts,skd->tkgd", weights, values)
    return out.reshape(seq_len, num_heads, head_dim)


def _on_a_mesh() -> bool:
    return any(_active_mesh_axis(axis) > 1 for axis in (DATA, MODEL, CONTEXT))


def resolve_attention_impl(impl: str) -> str:
    """The implementation `impl` names on this backend: `"auto"` is the backend's
    fused kernel where it has one (GPU: `"pallas_gpu"`, TPU: `"splash_tpu"`) and the
    computation runs on one device, `"blockwise"` otherwise.

    **Raises:**

    `ValueError` naming `attention_impl` when a kernel is asked for on a backend that
    lacks it, or inside a multi-device mesh (the kernels are not shard-mapped yet).
    """
    backend = jax.default_backend()
    if impl == "auto":
        kernels = {platform: name for name, platform in KERNEL_BACKENDS.items()}
        kernel = kernels.get(backend)
        return "blockwise" if kernel is None or _on_a_mesh() else kernel
    if impl in KERNEL_BACKENDS:
        if backend != KERNEL_BACKENDS[impl]:
            raise ValueError(
                f"attention_impl={impl!r} is a {KERNEL_BACKENDS[impl].upper()} kernel, "
                f"but JAX's backend is {backend!r}; use 'blockwise', or 'auto' (the "
                "backend's kernel where it has one, 'blockwise' elsewhere)"
            )
        if _on_a_mesh():
            raise ValueError(
                f"attention_impl={impl!r} runs on one device; on a multi-device mesh "
                "use 'blockwise' or 'auto' (which does)"
            )
    return impl


def attend(
    queries: Float[Array, "seq heads head_dim"],
    keys: Float[Array, "keys kv_heads head_dim"],
    values: Float[Array, "keys kv_heads head_dim"],
    *,
    segment_ids: Int[Array, " seq"],
    key_segment_ids: Int[Array, " keys"],
    impl: str,
    block_size: int,
) -> Float[Array, "seq heads head_dim"]:
    """Causal self-attention over one packed row by the implementation `impl` names
    (see [`eqx_mtp.ModelConfig`][]'s `attention_impl`). The segment ids are document
    numbers ([`eqx_mtp.document_ids`][], as the trunk passes them): every
    implementation compares them by equality."""
    impl = resolve_attention_impl(impl)
    if impl == "blockwise":
        return attention_of_documents(
            queries,
            keys,
            values,
            query_segment_ids=segment_ids,
            key_segment_ids=key_segment_ids,
            block_q=block_size,
            block_k=block_size,
        )
    if impl in _KERNELS:
        return _KERNELS[impl](
            queries, keys, values, segment_ids=segment_ids, block_size=block_size
        )
    index = jnp.arange(queries.shape[0])
    mask = attention_mask(segment_ids, key_segment_ids, index, index)
    return grouped_attention(queries, keys, values, mask)
