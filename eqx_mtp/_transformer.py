"""A Llama-style decoder trunk: RMSNorm, rotary embeddings, grouped-query attention with
a block-diagonal (packed-row) causal mask, SwiGLU, and a scanned stack of blocks.

Every module acts on one example (`[seq, dim]`); batch with `jax.vmap`.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._attention import (
    attend,
    attention_mask as attention_mask,
    grouped_attention as grouped_attention,
)
from ._config import ModelConfig, RematPolicy
from ._documents import checked_documents
from ._kv_cache import KVCache, cached_attention_mask
from ._mesh import gathered_over_context


class RMSNorm(eqx.Module):
    """Root-mean-square normalisation over the last axis with a learned scale,
    computed in float32 and returned in the input's dtype."""

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.weight = jnp.ones((dim,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        x32 = x.astype(jnp.float32)
        scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale * self.weight.astype(jnp.float32)).astype(x.dtype)


def dense(
    linear: eqx.nn.Linear, x: Float[Array, "*batch in"]
) -> Float[Array, "*batch out"]:
    """Apply a bias-free `eqx.nn.Linear` to every leading index of `x` at once."""
    return x @ linear.weight.T


def apply_rope(
    x: Float[Array, "seq heads head_dim"],
    positions: Int[Array, " seq"],
    theta: float,
) -> Float[Array, "seq heads head_dim"]:
    """Rotary position embedding, "rotate half" convention (Llama/NeoX layout)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(eqx.Module):
    """Causal self-attention with grouped key/value heads and rotary embeddings."""

    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    o_proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True)
    impl: str = eqx.field(static=True)
    block_size: int = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        q_key, k_key, v_key, o_key = jax.random.split(key, 4)
        head_dim = config.head_dim
        kv_width = config.num_kv_heads * head_dim
        self.q_proj = eqx.nn.Linear(config.dim, config.dim, use_bias=False, key=q_key)
        self.k_proj = eqx.nn.Linear(config.dim, kv_width, use_bias=False, key=k_key)
        self.v_proj = eqx.nn.Linear(config.dim, kv_width, use_bias=False, key=v_key)
        self.o_proj = eqx.nn.Linear(config.dim, config.dim, use_bias=False, key=o_key)
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.rope_theta = config.rope_theta
        self.impl = config.attention_impl
        self.block_size = config.attention_block_size

    def project(
        self, x: Float[Array, "seq dim"], positions: Int[Array, " seq"]
    ) -> tuple[
        Float[Array, "seq heads head_dim"],
        Float[Array, "seq kv_heads head_dim"],
        Float[Array, "seq kv_heads head_dim"],
    ]:
        """Queries, keys and values of `x`, with rotary embeddings applied. A KV cache
        stores the keys and values this returns."""
        seq_len = x.shape[0]
        q = dense(self.q_proj, x).reshape(seq_len, self.num_heads, -1)
        k = dense(self.k_proj, x).reshape(seq_len, self.num_kv_heads, -1)
        v = dense(self.v_proj, x).reshape(seq_len, self.num_kv_heads, -1)
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        return q, k, v

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        *,
        positions: Int[Array, " seq"],
        segment_ids: Int[Array, " seq"] | None,
        cache: KVCache | None = None,
    ) -> Float[Array, "seq dim"] | tuple[Float[Array, "seq dim"], KVCache]:
        """Attention over one packed row; with `cache`, over `x` at the consecutive
        `positions` of a one-document row whose earlier keys and values the cache
        holds: the new ones are written first, and `(output, cache)` returned
        (`segment_ids` is not read and may be `None`)."""
        q, k, v = self.project(x, positions)
        if cache is not None:
            cache = cache.write(k, v, positions[0])
            keys, values = cache.read()
            mask = cached_attention_mask(positions, cache.length)
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
        )
        return dense(self.o_proj, out.reshape(x.shape[0], -1))


class SwiGLU(eqx.Module):
    """`down(silu(gate(x)) * up(x))`, bias-free."""

    gate_proj: eqx.nn.Linear
    up_proj: eqx.nn.Linear
    down_proj: eqx.nn.Linear

    def __init__(self, dim: int, hidden_dim: int, *, key: PRNGKeyArray):
        gate_key, up_key, down_key = jax.random.split(key, 3)
        self.gate_proj = eqx.nn.Linear(dim, hidden_dim, use_bias=False, key=gate_key)
        self.up_proj = eqx.nn.Linear(dim, hidden_dim, use_bias=False, key=up_key)
        self.down_proj = eqx.nn.Linear(hidden_dim, dim, use_bias=False, key=down_key)

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        hidden = jax.nn.silu(dense(self.gate_proj, x)) * dense(self.up_proj, x)
        return dense(self.down_proj, hidden)


class TransformerBlock(eqx.Module):
    """Pre-norm decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.

    Its call signature, `block(x, *, positions, segment_ids, key=None)` on one
    `[seq, dim]` example, is the contract for any block plugged in as an MTP depth's
    layer. `key` follows Equinox's convention (keyword-only, last, `None` means
    deterministic): a PRNG key for this example, e.g. for `eqx.nn.Dropout`. It is
    passed only when the caller has one (see [`eqx_mtp.MTPDepths`][]), so a block
    without a `key` parameter works wherever no key is given. This block has no
    randomness and ignores `key`. It computes in the dtype of `x` and of its
    parameters, which must agree (see `ModelConfig.compute_dtype`).
    """

    attention_norm: RMSNorm
    attention: Attention
    mlp_norm: RMSNorm
    mlp: SwiGLU

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        attention_key, mlp_key = jax.random.split(key)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config, key=attention_key)
        self.mlp_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.mlp_dim, key=mlp_key)

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        *,
        positions: Int[Array, " seq"],
        segment_ids: Int[Array, " seq"] | None,
        key: PRNGKeyArray | None = None,
        cache: KVCache | None = None,
    ) -> Float[Array, "seq dim"] | tuple[Float[Array, "seq dim"], KVCache]:
        """The block on one row; with a [`eqx_mtp.nn.KVCache`][], on positions
        that continue the cached ones, returning `(output, cache)` (see
        [`eqx_mtp.nn.Attention`][])."""
        del key  # deterministic
        normed = self.attention_norm(x)
        if cache is None:
            attended = self.attention(
                normed, positions=positions, segment_ids=segment_ids
            )
        else:
            attended, cache = self.attention(
                normed, positions=positions, segment_ids=segment_ids, cache=cache
            )
        x = x + attended
        x = x + self.mlp(self.mlp_norm(x))
        return x if cache is None else (x, cache)


def remat(fn: Callable, policy: RematPolicy) -> Callable:
    """Wrap a scan body in `jax.checkpoint` according to a remat policy name."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    if policy == "save_dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_saveable)
    raise ValueError(f"unknown remat policy {policy!r}")


def stack_modules(make: Callable[[PRNGKeyArray], eqx.Module], count: int, *, key):
    """`count` independently initialised modules as one module whose array leaves carry
    a leading axis of size `count`."""
    return eqx.filter_vmap(make)(jax.random.split(key, count))


def unstack_module(stacked: eqx.Module, index: int) -> eqx.Module:
    """Slice `index` of every array leaf of a stacked module: one ordinary module."""
    return jax.tree_util.tree_map(
        lambda leaf: leaf[index] if eqx.is_array(leaf) else leaf, stacked
    )


def scan_blocks(
    blocks: eqx.Module,
    x: Float[Array, "seq dim"],
    *,
    positions: Int[Array, " seq"],
    segment_ids: Int[Array, " seq"] | None,
    remat_policy: RematPolicy = "none",
    cache: KVCache | None = None,
) -> Float[Array, "seq dim"] | tuple[Float[Array, "seq dim"], KVCache]:
    """Run a stacked module of blocks over `x` with one `jax.lax.scan`; with `cache`
    (one layer per block), block `i` reads and writes layer `i` of it, and
    `(output, cache)` is returned."""
    dynamic, static = eqx.partition(blocks, eqx.is_array)
    if cache is None:

        def body(h, block_params):
            block = eqx.combine(block_params, static)
            return block(h, positions=positions, segment_ids=segment_ids), None

        out, _ = jax.lax.scan(remat(body, remat_policy), x, dynamic)
        return out

    def cached_body(carry, xs):
        h, cache = carry
        block_params, layer = xs
        block = eqx.combine(block_params, static)
        h, cache = block(
            h, positions=positions, segment_ids=segment_ids, cache=cache.at_layer(layer)
        )
        return (h, cache), None

    # Decoding runs a few tokens at a time: the scan is unrolled, so that each
    # layer's cache slice is a constant offset into the carried stack (updated in
    # place, never copied) and the loop's per-iteration overhead goes.
    layers = jnp.arange(cache.keys.shape[0])
    (out, cache), _ = jax.lax.scan(
        cached_body, (x, cache), (dynamic, layers), unroll=True
    )
    return out, cache.at_layer(0)


class Transformer(eqx.Module):
    """The trunk: embedding, a scanned stack of `num_layers` blocks, final norm and a
    tied or untied unembedding.

    Calling it returns the last block's output **before** the final norm (`h⁰`), which
    is what the MTP depths consume; [`eqx_mtp.nn.Transformer.logits`][] applies the
    head.
    """

    embedding: Float[Array, "vocab dim"]
    blocks: TransformerBlock
    final_norm: RMSNorm
    unembedding: Float[Array, "vocab dim"] | None
    remat_policy: RematPolicy = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        embed_key, blocks_key, unembed_key = jax.random.split(key, 3)
        # Unit-RMS rows keep tied logits O(1) at initialisation.
        std = config.dim**-0.5
        self.embedding = std * jax.random.normal(
            embed_key, (config.vocab_size, config.dim), jnp.float32
        )
        self.blocks = stack_modules(
            lambda k: TransformerBlock(config, key=k), config.num_layers, key=blocks_key
        )
        self.final_norm = RMSNorm(config.dim, eps=config.norm_eps)
        if config.tie_embeddings:
            self.unembedding = None
        else:
            self.unembedding = std * jax.random.normal(
                unembed_key, (config.vocab_size, config.dim), jnp.float32
            )
        self.remat_policy = config.remat

    @property
    def unembedding_matrix(self) -> Float[Array, "vocab dim"]:
        """The `[vocab, dim]` matrix of the output head (the embedding when tied)."""
        return self.embedding if self.unembedding is None else self.unembedding

    def __call__(
        self,
        tokens: Int[Array, " seq"],
        *,
        positions: Int[Array, " seq"],
        segment_ids: Int[Array, " seq"] | None,
        embeddings: Float[Array, "seq dim"] | None = None,
        cache: KVCache | None = None,
    ) -> Float[Array, "seq dim"] | tuple[Float[Array, "seq dim"], KVCache]:
        """`h⁰` of one row. `segment_ids`: `0` for padding, a positive id for a
        document; a document is a maximal run of one id (the runs are numbered here,
        see [`eqx_mtp.document_ids`][], so a reused id is another document).
        `embeddings`: the row's input embeddings, looked up already (on a mesh the
        loss looks them up from its own copies of the embedding); `None`: from
        `self.embedding`.

        `cache`: a [`eqx_mtp.nn.KVCache`][] of `num_layers` layers holding the
        keys and values of positions `< positions[0]` of a one-document row, to
        decode: the tokens are at the consecutive `positions` that follow, and
        `(h⁰, cache)` is returned, the cache extended by them (`segment_ids` is not
        read and may be `None`). The same blocks compute both ways."""
        x = self.embedding[tokens] if embeddings is None else embeddings
        if cache is not None:
            return scan_blocks(
                self.blocks,
                x,
                positions=positions,
                segment_ids=segment_ids,
                cache=cache,
            )
        segment_ids = checked_documents("Transformer", segment_ids)
        return scan_blocks(
            self.blocks,
            x,
            positions=positions,
            segment_ids=segment_ids,
            remat_policy=self.remat_policy,
        )

    def logits(
        self, hidden: Float[Array, "*batch dim"]
    ) -> Float[Array, "*batch vocab"]:
        """`Unembed(FinalNorm(hidden))`, in float32."""
        normed = self.final_norm(hidden)
        return jnp.matmul(
            normed, self.unembedding_matrix.T, preferred_element_type=jnp.float32
        )
