"""The attention layer of a trunk block, and which attention it runs
(`ModelConfig.attention_impl`): the materialised reference, the blockwise kernel in
pure JAX, or a backend's fused kernel."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._blockwise import attention_of_documents
from ._config import ModelConfig, RopeScaling
from ._kernels import pallas_gpu_attention, splash_tpu_attention
from ._kv_cache import KVCache, cached_attention_mask
from ._layers import RMSNorm, dense
from ._mesh import CONTEXT, DATA, MODEL, _active_mesh_axis, gathered_over_context
from ._rope import apply_rope

KERNEL_BACKENDS = {"pallas_gpu": "gpu", "splash_tpu": "tpu"}
_KERNELS = {"pallas_gpu": pallas_gpu_attention, "splash_tpu": splash_tpu_attention}


def attention_mask(
    query_segment_ids: Int[Array, " seq"],
    key_segment_ids: Int[Array, " keys"],
    query_index: Int[Array, " seq"],
    key_index: Int[Array, " keys"],
    *,
    window: int | Int[Array, ""] | None = None,
) -> Bool[Array, "seq keys"]:
    """Causal block-diagonal mask: a query sees earlier-or-equal keys of its segment;
    with a sliding `window` `W`, only those fewer than `W` places back
    (`i - W < j <= i`, as Hugging Face's sliding-window masks).

    Ids are compared by equality, so they must be document numbers
    ([`eqx_mtp.document_ids`][]) for a reused id to be another document. Padding
    (segment 0) sees only padding; the diagonal is always visible, so no row of the
    softmax is empty.
    """
    causal = key_index[None, :] <= query_index[:, None]
    same_segment = key_segment_ids[None, :] == query_segment_ids[:, None]
    if window is None:
        return causal & same_segment
    near = query_index[:, None] - key_index[None, :] < window
    return causal & same_segment & near


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


def resolve_attention_impl(impl: str, *, windowed: bool = False) -> str:
    """The implementation `impl` names on this backend: `"auto"` is the backend's
    fused kernel where it has one (GPU: `"pallas_gpu"`, TPU: `"splash_tpu"`), the
    computation runs on one device and the layer has no sliding window,
    `"blockwise"` otherwise.

    **Raises:**

    `ValueError` naming `attention_impl` when a kernel is asked for on a backend that
    lacks it, inside a multi-device mesh (the kernels are not shard-mapped yet), or
    for a layer with a sliding window (`windowed`; the kernels take none).
    """
    backend = jax.default_backend()
    if impl == "auto":
        kernels = {platform: name for name, platform in KERNEL_BACKENDS.items()}
        kernel = kernels.get(backend)
        if kernel is None or windowed or _on_a_mesh():
            return "blockwise"
        return kernel
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
        if windowed:
            raise ValueError(
                f"attention_impl={impl!r} takes no sliding window, but the model has "
                "sliding_window set; use 'blockwise' (which skips the tiles outside "
                "the window), 'reference', or 'auto'"
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
    window: int | Int[Array, ""] | None = None,
) -> Float[Array, "seq heads head_dim"]:
    """Causal self-attention over one packed row by the implementation `impl` names
    (see [`eqx_mtp.ModelConfig`][]'s `attention_impl`). The segment ids are document
    numbers ([`eqx_mtp.document_ids`][], as the trunk passes them): every
    implementation compares them by equality. `window`: a sliding window (see
    `attention_mask`), `None` for none."""
    impl = resolve_attention_impl(impl, windowed=window is not None)
    if impl == "blockwise":
        return attention_of_documents(
            queries,
            keys,
            values,
            query_segment_ids=segment_ids,
            key_segment_ids=key_segment_ids,
            block_q=block_size,
            block_k=block_size,
            window=window,
        )
    if impl in _KERNELS:
        return _KERNELS[impl](
            queries, keys, values, segment_ids=segment_ids, block_size=block_size
        )
    index = jnp.arange(queries.shape[0])
    mask = attention_mask(segment_ids, key_segment_ids, index, index, window=window)
    return grouped_attention(queries, keys, values, mask)


# A layer without a window, in a stack whose other layers have one: every distance
# `i - j` of a row is below it (masks compare `i - j < window`, which cannot overflow).
NO_WINDOW = int(jnp.iinfo(jnp.int32).max)


class LayerOptions(eqx.Module):
    """Options that differ between the layers of one scanned stack of blocks, as
    traced values: a stack is one module whose static fields every layer shares, so
    what varies per layer travels beside it, sliced by the same scan.

    - `rope`: whether the layer applies the rotary embedding (`[layers]` bool for a
        stack, a scalar for one layer), or `None`: every layer does.
    - `window`: the layer's sliding window (`NO_WINDOW` for full attention), or
        `None`: no layer has one.
    """

    rope: Bool[Array, "*layers"] | None
    window: Int[Array, "*layers"] | None

    @staticmethod
    def layout(config: ModelConfig) -> tuple[tuple | None, tuple | None]:
        """What varies between the layers of a trunk of `config`, as hashable
        tuples: whether each layer uses RoPE (`None`: all do) and each layer's
        window (`None` inside: full attention; `None` for all: no windows)."""
        layers = range(config.num_layers)
        rope = tuple(config.uses_rope(i) for i in layers)
        windows = tuple(config.window(i) for i in layers)
        return (
            rope if config.no_rope_layers else None,
            windows if config.sliding_window is not None else None,
        )

    @classmethod
    def build(cls, rope: tuple | None, windows: tuple | None) -> LayerOptions | None:
        """The options of a stack from `layout`'s tuples, as constant arrays with a
        leading layer axis; `None` when every layer uses RoPE and attends fully, so
        that such a trunk runs its blocks exactly as without options."""
        if rope is None and windows is None:
            return None
        if rope is not None:
            rope = jnp.asarray(rope, jnp.bool_)
        if windows is not None:
            windows = [NO_WINDOW if w is None else w for w in windows]
            windows = jnp.asarray(windows, jnp.int32)
        return cls(rope, windows)


class Attention(eqx.Module):
    """Causal self-attention with grouped key/value heads and rotary embeddings, and
    the options of today's dense families: q/k/v biases, q/k RMSNorms, rotary
    scaling, and (given per call, see [`eqx_mtp.nn.TransformerBlock`][]) no-RoPE
    layers and sliding windows.

    Queries are `num_heads · head_dim` wide, keys and values `num_kv_heads ·
    head_dim` (`config.head_dim`). `q_norm` and `k_norm` are `None` unless
    `config.qk_norm` is `"per_head"` (a `[head_dim]` scale shared by the heads,
    Qwen3) or `"projection"` (over the whole projection, OLMo-2); both normalise
    before the rotary embedding.
    """

    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    o_proj: eqx.nn.Linear
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True)
    rope_scaling: RopeScaling | None = eqx.field(static=True)
    qk_norm: str = eqx.field(static=True)
    impl: str = eqx.field(static=True)
    block_size: int = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        q_key, k_key, v_key, o_key = jax.random.split(key, 4)
        head_dim, bias = config.head_dim, config.qkv_bias
        q_width = config.num_heads * head_dim
        kv_width = config.num_kv_heads * head_dim
        self.q_proj = eqx.nn.Linear(config.dim, q_width, use_bias=bias, key=q_key)
        self.k_proj = eqx.nn.Linear(config.dim, kv_width, use_bias=bias, key=k_key)
        self.v_proj = eqx.nn.Linear(config.dim, kv_width, use_bias=bias, key=v_key)
        self.o_proj = eqx.nn.Linear(q_width, config.dim, use_bias=False, key=o_key)
        if config.qk_norm == "none":
            self.q_norm = self.k_norm = None
        else:
            per_head = config.qk_norm == "per_head"
            eps = config.norm_eps
            self.q_norm = RMSNorm(head_dim if per_head else q_width, eps=eps)
            self.k_norm = RMSNorm(head_dim if per_head else kv_width, eps=eps)
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = config.rope_theta
        self.rope_scaling = config.rope_scaling
        self.qk_norm = config.qk_norm
        self.impl = config.attention_impl
        self.block_size = config.attention_block_size

    def project(
        self,
        x: Float[Array, "seq dim"],
        positions: Int[Array, " seq"],
        *,
        rope: Bool[Array, ""] | None = None,
    ) -> tuple[
        Float[Array, "seq heads head_dim"],
        Float[Array, "seq kv_heads head_dim"],
        Float[Array, "seq kv_heads head_dim"],
    ]:
        """Queries, keys and values of `x`: projected (biases added), normalised
        (q/k norms), then rotated (unless `rope` is a traced `False`). A KV cache
        stores the keys and values this returns."""
        seq_len = x.shape[0]
        q, k, v = dense(self.q_proj, x), dense(self.k_proj, x), dense(self.v_proj, x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(seq_len, self.num_heads, self.head_dim)
        k = k.reshape(seq_len, self.num_kv_heads, self.head_dim)
        v = v.reshape(seq_len, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        scaling = self.rope_scaling
        q = apply_rope(q, positions, self.rope_theta, scaling, enabled=rope)
        k = apply_rope(k, positions, self.rope_theta, scaling, enabled=rope)
        return q, k, v

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        *,
        positions: Int[Array, " seq"],
        segment_ids: Int[Array, " seq"] | None,
        cache: KVCache | None = None,
        options: LayerOptions | None = None,
    ) -> Float[Array, "seq dim"] | tuple[Float[Array, "seq dim"], KVCache]:
        """Attention over one packed row; with `cache`, over `x` at the consecutive
        `positions` of a one-document row whose earlier keys and values the cache
        holds: the new ones are written first, and `(output, cache)` returned
        (`segment_ids` is not read and may be `None`). `options`: this layer's
        `LayerOptions` (scalars); `None`: RoPE and
        full attention."""
        rope = None if options is None else options.rope
        window = None if options is None else options.window
        q, k, v = self.project(x, positions, rope=rope)
        if cache is not None:
            cache = cache.write(k, v, positions[0])
            keys, values = cache.read()
            mask = cached_attention_mask(positions, cache.length, window=window)
            out = grouped_attention(q, keys, values, mask)
            return dense(self.o_proj, out.reshape(x.shape[0], -1)), cache
        # Context parallelism: each query shard attends to the whole row's keys.
        # Gathering keys and values costs O(seq · kv_dim) per layer; left to itself,
        # the partitioner splits the logits by key and exchanges O(seq²) gradients.
        k = gathered_over_context(k, head_axis=1)
        v = gathered_over_context(v, head_axis=1)
        key_segment_ids = gathered_over_context(segment_ids)
        out = attend(
            q,
            k,
            v,
            segment_ids=segment_ids,
            key_segment_ids=key_segment_ids,
            impl=self.impl,
            block_size=self.block_size,
            window=window,
        )
        return dense(self.o_proj, out.reshape(x.shape[0], -1))
