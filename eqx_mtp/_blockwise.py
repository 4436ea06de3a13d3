"""Blockwise attention (FlashAttention's algorithm) in pure JAX: memory linear in the
row length, the packed-row mask from segment ids, grouped key/value heads.

The forward pass visits one `[block_q, block_k]` tile of scores at a time with an
online softmax (float32 running max, sum and output) and keeps only the output and the
log-sum-exp of every query. The custom VJP recomputes each tile's probabilities from
that log-sum-exp. In self-attention (no explicit indices) tiles entirely above the
causal diagonal are never visited: the loops over tiles stop at the diagonal; with a
sliding window they also start at the window's far edge, so a windowed row costs
`O(seq · window)`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._checks import check_segment_ids
from ._documents import number_documents

DEFAULT_BLOCK = 128


def _pad_to(x: Array, multiple: int, fill) -> Array:
    pad = -x.shape[0] % multiple
    if not pad:
        return x
    return jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])


def _tile_mask(q_segments, q_index, k_segments, k_index, window):
    """`[block_q, block_k]`: key visible to query (same segment, not in the future,
    and with a `window`, fewer than `window` places back)."""
    same = q_segments[:, None] == k_segments[None, :]
    mask = same & (k_index[None, :] <= q_index[:, None])
    if window is None:
        return mask
    return mask & (q_index[:, None] - k_index[None, :] < window)


def _tile(x, i, size):
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=0)


def _key_tile_range(i, block_q, block_k, num_k_tiles, causal_self, window):
    """Key tiles that query tile `i` visits: in self-attention, up to the diagonal,
    and from the tile of the first query's farthest key in the window."""
    if not causal_self:
        return 0, num_k_tiles
    last_query = (i + 1) * block_q - 1
    hi = jnp.minimum(last_query // block_k + 1, num_k_tiles)
    if window is None:
        return 0, hi
    first_key = i * block_q - window + 1
    return jnp.maximum(first_key // block_k, 0), hi


def _query_tile_range(j, block_q, block_k, num_q_tiles, causal_self, window):
    """Query tiles that see key tile `j`: in self-attention, from the diagonal on,
    and up to the tile of the last query whose window reaches the tile's last key."""
    if not causal_self:
        return 0, num_q_tiles
    lo = (j * block_k) // block_q
    if window is None:
        return lo, num_q_tiles
    last_query = (j + 1) * block_k - 1 + window - 1
    return lo, jnp.minimum(last_query // block_q + 1, num_q_tiles)


def _clamped(window, length):
    """The window capped at the padded row length, so that the tile arithmetic
    (`index ± window`) stays within int32: in self-attention every distance is
    below the cap."""
    if window is None:
        return None
    return jnp.minimum(jnp.asarray(window, jnp.int32), length)


def _forward(q, k, v, masking, block_q, block_k, causal_self):
    """Padded inputs: `q [Tq, K, G, d]`, `k, v [Tk, K, d]`, `masking = (q_seg, k_seg,
    q_idx, k_idx, window)`. Returns the output `[Tq, K, G, d]` (queries that see no
    key get 0) and the log-sum-exp `[Tq, K, G]` (`-inf` there)."""
    q_seg, k_seg, q_idx, k_idx, window = masking
    span = _clamped(window, q.shape[0] + k.shape[0]) if causal_self else None
    num_q_tiles = q.shape[0] // block_q
    num_k_tiles = k.shape[0] // block_k
    _, kv_heads, group, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim)

    def query_tile(i):
        qi = _tile(q, i, block_q)
        q_seg_i, q_idx_i = _tile(q_seg, i, block_q), _tile(q_idx, i, block_q)

        def visit(j, carry):
            running_max, running_sum, acc = carry
            kj, vj = _tile(k, j, block_k), _tile(v, j, block_k)
            mask = _tile_mask(
                q_seg_i,
                q_idx_i,
                _tile(k_seg, j, block_k),
                _tile(k_idx, j, block_k),
                window,
            )
            scores = jnp.einsum(
                "tkgd,skd->tkgs", qi, kj, preferred_element_type=jnp.float32
            )
            scores = jnp.where(mask[:, None, None, :], scores * scale, -jnp.inf)
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
            # A row with nothing visible yet keeps max -inf; shift by 0 instead.
            shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
            probs = jnp.exp(scores - shift[..., None])
            correction = jnp.exp(running_max - shift)
            running_sum = running_sum * correction + jnp.sum(probs, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "tkgs,skd->tkgd",
                probs.astype(v.dtype),
                vj,
                preferred_element_type=jnp.float32,
            )
            return new_max, running_sum, acc

        init = (
            jnp.full((block_q, kv_heads, group), -jnp.inf, jnp.float32),
            jnp.zeros((block_q, kv_heads, group), jnp.float32),
            jnp.zeros((block_q, kv_heads, group, head_dim), jnp.float32),
        )
        lo, hi = _key_tile_range(i, block_q, block_k, num_k_tiles, causal_self, span)
        running_max, running_sum, acc = jax.lax.fori_loop(lo, hi, visit, init)
        seen = running_sum > 0
        out = jnp.where(
            seen[..., None], acc / jnp.where(seen, running_sum, 1.0)[..., None], 0.0
        )
        lse = jnp.where(seen, running_max + jnp.log(running_sum), -jnp.inf)
        return out.astype(q.dtype), lse

    outs, lses = jax.lax.map(query_tile, jnp.arange(num_q_tiles))
    return (
        outs.reshape((-1,) + outs.shape[2:]),
        lses.reshape((-1,) + lses.shape[2:]),
    )


def _backward(q, k, v, masking, out, lse, d_out, block_q, block_k, causal_self):
    """Gradients w.r.t. the padded `q, k, v`, one key tile at a time (outer) against
    the query tiles that see it (inner), the probabilities recomputed from `lse`."""
    q_seg, k_seg, q_idx, k_idx, window = masking
    span = _clamped(window, q.shape[0] + k.shape[0]) if causal_self else None
    num_q_tiles = q.shape[0] // block_q
    num_k_tiles = k.shape[0] // block_k
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim)
    # D_i = Σ_d dO·O, the softmax's Jacobian term, per query and head.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    safe_lse = jnp.where(jnp.isneginf(lse), 0.0, lse)

    def key_tile(d_q, j):
        kj, vj = _tile(k, j, block_k), _tile(v, j, block_k)
        k_seg_j, k_idx_j = _tile(k_seg, j, block_k), _tile(k_idx, j, block_k)

        def visit(i, carry):
            d_q, d_k, d_v = carry
            qi, d_out_i = _tile(q, i, block_q), _tile(d_out, i, block_q)
            mask = _tile_mask(
                _tile(q_seg, i, block_q),
                _tile(q_idx, i, block_q),
                k_seg_j,
                k_idx_j,
                window,
            )
            scores = jnp.einsum(
                "tkgd,skd->tkgs", qi, kj, preferred_element_type=jnp.float32
            )
            lse_i = _tile(safe_lse, i, block_q)
            probs = jnp.where(
                mask[:, None, None, :], jnp.exp(scores * scale - lse_i[..., None]), 0.0
            )
            d_v = d_v + jnp.einsum(
                "tkgs,tkgd->skd",
                probs.astype(d_out.dtype),
                d_out_i,
                preferred_element_type=jnp.float32,
            )
            d_probs = jnp.einsum(
                "tkgd,skd->tkgs", d_out_i, vj, preferred_element_type=jnp.float32
            )
            d_scores = probs * (d_probs - _tile(delta, i, block_q)[..., None]) * scale
            d_k = d_k + jnp.einsum(
                "tkgs,tkgd->skd",
                d_scores.astype(qi.dtype),
                qi,
                preferred_element_type=jnp.float32,
            )
            d_qi = jnp.einsum(
                "tkgs,skd->tkgd",
                d_scores.astype(kj.dtype),
                kj,
                preferred_element_type=jnp.float32,
            )
            d_q = jax.lax.dynamic_update_slice_in_dim(
                d_q, _tile(d_q, i, block_q) + d_qi, i * block_q, axis=0
            )
            return d_q, d_k, d_v

        zeros = jnp.zeros(kj.shape, jnp.float32)
        lo, hi = _query_tile_range(j, block_q, block_k, num_q_tiles, causal_self, span)
        d_q, d_k, d_v = jax.lax.fori_loop(lo, hi, visit, (d_q, zeros, zeros))
        return d_q, (d_k, d_v)

    d_q, (d_k, d_v) = jax.lax.scan(
        key_tile, jnp.zeros(q.shape, jnp.float32), jnp.arange(num_k_tiles)
    )
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    return (
        d_q.astype(q.dtype),
        flat(d_k).astype(k.dtype),
        flat(d_v).astype(v.dtype),
    )


# `masking` (segment ids, indices and the window, all integers) is a differentiable
# argument with no cotangent rather than a static one: the window is traced when it
# differs between the layers of a scanned stack.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, masking, block_q, block_k, causal_self):
    out, _ = _forward(q, k, v, masking, block_q, block_k, causal_self)
    return out


def _attention_fwd(q, k, v, masking, block_q, block_k, causal_self):
    out, lse = _forward(q, k, v, masking, block_q, block_k, causal_self)
    return out, (q, k, v, masking, out, lse)


def _attention_bwd(block_q, block_k, causal_self, residuals, d_out):
    q, k, v, masking, out, lse = residuals
    d_q, d_k, d_v = _backward(
        q, k, v, masking, out, lse, d_out, block_q, block_k, causal_self
    )
    no_cotangent = jax.tree.map(lambda _: None, masking)
    return d_q, d_k, d_v, no_cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(
    queries: Float[Array, "seq heads head_dim"],
    keys: Float[Array, "keys kv_heads head_dim"],
    values: Float[Array, "keys kv_heads head_dim"],
    *,
    query_segment_ids: Int[Array, " seq"],
    key_segment_ids: Int[Array, " keys"],
    query_index: Int[Array, " seq"] | None = None,
    key_index: Int[Array, " keys"] | None = None,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    window: int | Int[Array, ""] | None = None,
) -> Float[Array, "seq heads head_dim"]:
    """Causal softmax attention over packed rows, a `[block_q, block_k]` tile of scores
    at a time: memory `O(seq · head_dim)` per head instead of `O(seq²)`.

    A query sees the keys of its own document at or before it (with a `window`, only
    those fewer than `window` places back). Each key/value head
    serves `heads / kv_heads` query heads. Scores, softmax statistics and
    accumulation are float32; the output has the queries' dtype. Differentiable
    (custom VJP: the backward pass recomputes each tile from the saved log-sum-exp).

    **Arguments:**

    - `queries`: `[seq, heads, head_dim]`.
    - `keys`, `values`: `[keys, kv_heads, head_dim]`; `kv_heads` divides `heads`.
    - `query_segment_ids`, `key_segment_ids`: segment ids of the queries and keys:
        `0` for padding, a positive id for a document (a negative id is an error).
        In self-attention a document is a maximal run of one id, so an id reused
        later in the row is another document (both are numbered by
        [`eqx_mtp.document_ids`][]). With `query_index`/`key_index` the ids are
        compared as given, since queries and keys may be parts of a row: pass the
        whole row's `document_ids`, sliced.
    - `query_index`, `key_index`: positions of the queries and keys in the row, for
        the causal rule (`key_index <= query_index`). Both `None` (the default):
        self-attention over one row, `keys` being the same positions as `queries`;
        then tiles above the diagonal are skipped. Given, the keys and values may come
        from elsewhere (a KV cache, another context shard) and every tile is visited.
    - `block_q`, `block_k`: tile sizes; any row length works (the last tile is
        padded).
    - `window`: a sliding window `W` (a positive integer, or a traced integer
        scalar): the query at index `i` sees keys `j` with `i - W < j <= i`. In
        self-attention the tiles wholly outside the window are skipped too. `None`
        (the default): every earlier key of the document.

    **Returns:**

    `[seq, heads, head_dim]`; a query that sees no key gets zeros.
    """
    for name, value in (
        ("query_segment_ids", query_segment_ids),
        ("key_segment_ids", key_segment_ids),
    ):
        check_segment_ids("blockwise_attention", name, value)
    if isinstance(window, bool) or (isinstance(window, int) and window < 1):
        raise ValueError(
            f"blockwise_attention: window must be a positive integer or None, "
            f"got {window!r}"
        )
    if query_index is None and key_index is None:
        query_segment_ids = number_documents(query_segment_ids)
        key_segment_ids = number_documents(key_segment_ids)
    return attention_of_documents(
        queries,
        keys,
        values,
        query_segment_ids=query_segment_ids,
        key_segment_ids=key_segment_ids,
        query_index=query_index,
        key_index=key_index,
        block_q=block_q,
        block_k=block_k,
        window=window,
    )


def attention_of_documents(
    queries,
    keys,
    values,
    *,
    query_segment_ids,
    key_segment_ids,
    query_index=None,
    key_index=None,
    block_q=DEFAULT_BLOCK,
    block_k=DEFAULT_BLOCK,
    window=None,
):
    """`blockwise_attention` on ids that are document numbers already (equal ids: one
    document), as the trunk's blocks get them."""
    seq_len, num_heads, head_dim = queries.shape
    num_keys, num_kv_heads = keys.shape[:2]
    if num_heads % num_kv_heads:
        raise ValueError(
            f"blockwise_attention: kv_heads={num_kv_heads} must divide "
            f"heads={num_heads}"
        )
    if values.shape != keys.shape:
        raise ValueError(
            f"blockwise_attention: values must have the shape of keys {keys.shape}, "
            f"got {values.shape}"
        )
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"blockwise_attention: {name} must be a positive integer, got {value!r}"
            )
    causal_self = query_index is None and key_index is None
    if causal_self:
        if num_keys != seq_len:
            raise ValueError(
                "blockwise_attention: without query_index/key_index the keys are the "
                f"queries' positions, so there must be {seq_len} of them, got "
                f"{num_keys}"
            )
        query_index = key_index = jnp.arange(seq_len, dtype=jnp.int32)
    elif query_index is None or key_index is None:
        raise ValueError("blockwise_attention: pass both query_index and key_index")
    block_q = min(block_q, seq_len)
    block_k = min(block_k, num_keys)
    group = num_heads // num_kv_heads
    q = queries.reshape(seq_len, num_kv_heads, group, head_dim)
    # Padded queries see nothing (segment -1 matches no key); padded keys are seen by
    # nothing (segment -2 matches no query, padding's 0 included).
    masking = (
        _pad_to(query_segment_ids.astype(jnp.int32), block_q, -1),
        _pad_to(key_segment_ids.astype(jnp.int32), block_k, -2),
        _pad_to(query_index.astype(jnp.int32), block_q, 0),
        _pad_to(key_index.astype(jnp.int32), block_k, jnp.iinfo(jnp.int32).max),
        None if window is None else jnp.asarray(window, jnp.int32),
    )
    out = _attention(
        _pad_to(q, block_q, 0),
        _pad_to(keys, block_k, 0),
        _pad_to(values, block_k, 0),
        masking,
        block_q,
        block_k,
        causal_self,
    )
    return out[:seq_len].reshape(seq_len, num_heads, head_dim)
