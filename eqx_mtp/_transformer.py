"""A Llama-style decoder trunk: RMSNorm, rotary embeddings, grouped-query attention with
a block-diagonal (packed-row) causal mask, SwiGLU, and a scanned stack of blocks; with
the options of today's dense families (see [`eqx_mtp.ModelConfig`][]).

Every module acts on one example (`[seq, dim]`); batch with `jax.vmap`.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._attention import (
    Attention as Attention,
    LayerOptions,
    attention_mask as attention_mask,
    grouped_attention as grouped_attention,
)
from ._config import ModelConfig, RematPolicy
from ._documents import checked_documents
from ._kv_cache import KVCache
from ._layers import RMSNorm as RMSNorm, SwiGLU as SwiGLU, dense as dense
from ._rope import apply_rope as apply_rope


class TransformerBlock(eqx.Module):
    """Decoder block: pre-norm `x + attn(norm(x))`, then `x + mlp(norm(x))` (Llama),
    or with `config.norm_position == "post"`, `h = x + norm(attn(x))`, then
    `h + norm(mlp(h))` (OLMo-2: each norm on its sublayer's output).

    Its call signature, `block(x, *, positions, segment_ids, key=None)` on one
    `[seq, dim]` example, is the contract for any block plugged in as an MTP depth's
    layer. `key` follows Equinox's convention (keyword-only, last, `None` means
    deterministic): a PRNG key for this example, e.g. for `eqx.nn.Dropout`. It is
    passed only when the caller has one (see [`eqx_mtp.MTPDepths`][]), so a block
    without a `key` parameter works wherever no key is given. This block has no
    randomness and ignores `key`. It computes in the dtype of `x` and of its
    parameters, which must agree (see `ModelConfig.compute_dtype`).

    The options that may differ between the layers of a trunk (no-RoPE layers,
    sliding windows) come per call as `options`, which the trunk's scan slices for
    each layer; called without them, as the MTP depths call their layer, the block
    applies RoPE and attends fully.
    """

    attention_norm: RMSNorm
    attention: Attention
    mlp_norm: RMSNorm
    mlp: SwiGLU
    norm_position: str = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        attention_key, mlp_key = jax.random.split(key)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config, key=attention_key)
        self.mlp_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.mlp_dim, key=mlp_key)
        self.norm_position = config.norm_position

    def __call__(
        self,
        x: Float[Array, "seq dim"],
        *,
        positions: Int[Array, " seq"],
        segment_ids: Int[Array, " seq"] | None,
        key: PRNGKeyArray | None = None,
        cache: KVCache | None = None,
        options: LayerOptions | None = None,
    ) -> Float[Array, "seq dim"] | tuple[Float[Array, "seq dim"], KVCache]:
        """The block on one row; with a [`eqx_mtp.nn.KVCache`][], on positions
        that continue the cached ones, returning `(output, cache)` (see
        [`eqx_mtp.nn.Attention`][]). `options`: this layer's RoPE switch and
        window, as the trunk passes them; `None`: RoPE, full attention."""
        del key  # deterministic
        post = self.norm_position == "post"
        attention_input = x if post else self.attention_norm(x)
        arguments = dict(positions=positions, segment_ids=segment_ids)
        if options is not None:
            arguments["options"] = options
        if cache is None:
            attended = self.attention(attention_input, **arguments)
        else:
            attended, cache = self.attention(attention_input, cache=cache, **arguments)
        if post:
            x = x + self.attention_norm(attended)
            x = x + self.mlp_norm(self.mlp(x))
        else:
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
    options: LayerOptions | None = None,
) -> Float[Array, "seq dim"] | tuple[Float[Array, "seq dim"], KVCache]:
    """Run a stacked module of blocks over `x` with one `jax.lax.scan`; with `cache`
    (one layer per block), block `i` reads and writes layer `i` of it, and
    `(output, cache)` is returned. `options`: `LayerOptions` with a leading layer
    axis, block `i` gets slice `i`; `None`: the blocks are called without."""
    dynamic, static = eqx.partition(blocks, eqx.is_array)

    def call(h, block_params, layer_options, **arguments):
        block = eqx.combine(block_params, static)
        if layer_options is not None:
            arguments["options"] = layer_options
        return block(h, positions=positions, segment_ids=segment_ids, **arguments)

    if cache is None:

        def body(h, xs):
            block_params, layer_options = xs
            return call(h, block_params, layer_options), None

        out, _ = jax.lax.scan(remat(body, remat_policy), x, (dynamic, options))
        return out

    def cached_body(carry, xs):
        h, cache = carry
        block_params, layer, layer_options = xs
        h, cache = call(h, block_params, layer_options, cache=cache.at_layer(layer))
        return (h, cache), None

    # Decoding runs a few tokens at a time: the scan is unrolled, so that each
    # layer's cache slice is a constant offset into the carried stack (updated in
    # place, never copied) and the loop's per-iteration overhead goes.
    layers = jnp.arange(cache.keys.shape[0])
    (out, cache), _ = jax.lax.scan(
        cached_body, (x, cache), (dynamic, layers, options), unroll=True
    )
    return out, cache.at_layer(0)


class Transformer(eqx.Module):
    """The trunk: embedding, a scanned stack of `num_layers` blocks, final norm and a
    tied or untied unembedding.

    Calling it returns the last block's output **before** the final norm (`h⁰`), which
    is what the MTP depths consume; [`eqx_mtp.nn.Transformer.logits`][] applies the
    head.

    The config's per-layer options (`no_rope_layers`, `sliding_window`,
    `full_attention_layers`) are kept as static tuples (`rope_layers`,
    `layer_windows`, `None` when no layer differs) and handed to each block by the
    scan over the stack, as constants, never as parameters.
    """

    embedding: Float[Array, "vocab dim"]
    blocks: TransformerBlock
    final_norm: RMSNorm
    unembedding: Float[Array, "vocab dim"] | None
    remat_policy: RematPolicy = eqx.field(static=True)
    rope_layers: tuple[bool, ...] | None = eqx.field(static=True)
    layer_windows: tuple[int | None, ...] | None = eqx.field(static=True)

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
        # Static tuples, turned into the scan's per-layer options at each call:
        # constants, never parameters.
        self.rope_layers, self.layer_windows = LayerOptions.layout(config)

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
        options = LayerOptions.build(self.rope_layers, self.layer_windows)
        if cache is not None:
            return scan_blocks(
                self.blocks,
                x,
                positions=positions,
                segment_ids=segment_ids,
                cache=cache,
                options=options,
            )
        segment_ids = checked_documents("Transformer", segment_ids)
        return scan_blocks(
            self.blocks,
            x,
            positions=positions,
            segment_ids=segment_ids,
            remat_policy=self.remat_policy,
            options=options,
        )

    def logits(
        self, hidden: Float[Array, "*batch dim"]
    ) -> Float[Array, "*batch vocab"]:
        """`Unembed(FinalNorm(hidden))`, in float32."""
        normed = self.final_norm(hidden)
        return jnp.matmul(
            normed, self.unembedding_matrix.T, preferred_element_type=jnp.float32
        )
