"""Independent references for the tests: plain Python loops and NumPy indexing.

No reference calls `eqx_mtp.roll_and_mask`, `eqx_mtp.depth_targets`,
`eqx_mtp.segment_positions`, `eqx_mtp.head_loss_sum` or the depth scan: the MTP loss
is written out from the objective in `docs/maths.md` with a Python loop over the
*unstacked* depths
(`jax.vmap`ped over rows), targets and validity by NumPy indexing, and a naive
full-logits cross-entropy. A few cheap test utilities follow at the end.
"""

import math

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import eqx_mtp


def documents_reference(segment_ids):
    """Number the documents of each row by a Python loop: a document is a maximal run
    of one non-zero segment id (a reused id after another id or padding starts a new
    one), numbered `1, 2, …` in its row; padding (`0`) stays `0`. Every reference
    below compares these numbers, never the raw ids."""
    seg = np.asarray(segment_ids)
    documents = np.zeros(seg.shape, np.int32)
    for b in range(seg.shape[0]):
        count = 0
        for i in range(seg.shape[1]):
            if seg[b, i] == 0:
                continue
            if i == 0 or seg[b, i] != seg[b, i - 1]:
                count += 1
            documents[b, i] = count
    return documents


def roll_and_mask_reference(x, shift, segment_ids=None):
    """`out[b, i] = x[b, i - shift]` when that source lies in the row (and, with
    segment ids, in the same document as `i`, not padding), else zero."""
    x = np.asarray(x)
    seg = None if segment_ids is None else documents_reference(segment_ids)
    out = np.zeros_like(x)
    batch, seq_len = x.shape[:2]
    for b in range(batch):
        for i in range(seq_len):
            source = i - shift
            if not 0 <= source < seq_len:
                continue
            if seg is not None and (seg[b, source] != seg[b, i] or seg[b, source] == 0):
                continue
            out[b, i] = x[b, source]
    return out


def valid_reference(segment_ids, loss_mask, k):
    """The validity rule by brute force:
    `valid(k, i) = i+k+1 < T and seg[i] != 0 and seg[i+k+1] == seg[i] and
    mask[i+k+1]`, `seg` numbering the documents (maximal runs of one id)."""
    seg = documents_reference(segment_ids)
    batch, seq_len = seg.shape
    mask = (
        np.ones((batch, seq_len), bool) if loss_mask is None else np.asarray(loss_mask)
    )
    valid = np.zeros((batch, seq_len), bool)
    for b in range(batch):
        for i in range(seq_len):
            j = i + k + 1
            valid[b, i] = bool(
                j < seq_len and seg[b, i] != 0 and seg[b, j] == seg[b, i] and mask[b, j]
            )
    return valid


def targets_reference(tokens, segment_ids, loss_mask, k):
    """`(targets, valid)` of depth `k`: `t[i+k+1]` where valid, `0` elsewhere."""
    tokens = np.asarray(tokens)
    valid = valid_reference(segment_ids, loss_mask, k)
    targets = np.zeros_like(tokens)
    batch, seq_len = tokens.shape
    for b in range(batch):
        for i in range(seq_len):
            if valid[b, i]:
                targets[b, i] = tokens[b, i + k + 1]
    return targets, valid


def segment_positions_reference(segment_ids):
    """Distance of each token from the first token of its run of equal ids."""
    seg = np.asarray(segment_ids)
    positions = np.zeros(seg.shape, np.int32)
    for b in range(seg.shape[0]):
        for i in range(1, seg.shape[1]):
            if seg[b, i] == seg[b, i - 1]:
                positions[b, i] = positions[b, i - 1] + 1
    return positions


def ahead_tokens_reference(tokens, segment_ids, k, fill=0):
    """`t[i+k]` where it lies in the row and in `i`'s document (not padding), else
    `fill`: the token whose embedding sequential depth `k` reads at position `i`."""
    tokens = np.asarray(tokens)
    seg = documents_reference(segment_ids)
    ahead = np.full_like(tokens, fill)
    batch, seq_len = tokens.shape
    for b in range(batch):
        for i in range(seq_len):
            j = i + k
            if j < seq_len and seg[b, j] == seg[b, i] and seg[b, j] != 0:
                ahead[b, i] = tokens[b, j]
    return ahead


def naive_cross_entropy_sum(normed, unembedding, targets, valid):
    """`-Σ_{valid i} log_softmax(normed @ unembedding.T)[i, targets[i]]` of one row,
    over full `[seq, vocab]` logits and a one-hot of the targets."""
    logits = normed @ unembedding.T
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    one_hot = jax.nn.one_hot(targets, unembedding.shape[0], dtype=log_probs.dtype)
    target_log_probs = jnp.sum(log_probs * one_hot, axis=-1)
    return -jnp.sum(jnp.where(valid, target_log_probs, 0.0))


def _defaults(tokens, segment_ids, positions):
    """Tokens, document numbers (the blocks compare ids by equality) and positions."""
    tokens = np.asarray(tokens)
    seg = (
        np.ones(tokens.shape, np.int32)
        if segment_ids is None
        else documents_reference(segment_ids)
    )
    pos = segment_positions_reference(seg) if positions is None else positions
    return tokens, seg, np.asarray(pos)


def _stacked_targets(tokens, seg, loss_mask, depths):
    pairs = [targets_reference(tokens, seg, loss_mask, k) for k in depths]
    targets = np.stack([t for t, _ in pairs], axis=1)
    valid = np.stack([v for _, v in pairs], axis=1)
    return targets, valid


def loop_depth_loss_sums(
    depths,
    hidden,
    tokens,
    *,
    embedding,
    unembedding,
    final_norm,
    segment_ids=None,
    positions=None,
    loss_mask=None,
    fill=0,
):
    """Per-depth loss sums `[D]` (a JAX array, differentiable) and counts `[D]`
    (NumPy) of the stacked `depths` on the trunk output `hidden` `[batch, seq, dim]`:
    a Python loop over the unstacked `depths.depth(j)` for one row, `jax.vmap`ped
    over rows.

    `final_norm` acts on one row `[seq, dim]`; the depths' `trunk_input` and
    `previous_input` say which states they read. Sequential depth `k` reads the
    embedding of `t[i+k]`, or of `fill` where that token is outside the row or in
    another segment.
    """
    tokens, seg, pos = _defaults(tokens, segment_ids, positions)
    num_depths = depths.num_depths
    sequential = depths.kind == "sequential"
    unstacked = [depths.depth(j) for j in range(num_depths)]
    depth_numbers = range(1, num_depths + 1)
    ahead = np.stack(
        [ahead_tokens_reference(tokens, seg, k, fill) for k in depth_numbers], axis=1
    )
    targets, valid = _stacked_targets(tokens, seg, loss_mask, depth_numbers)

    def one_row(h0, ahead_row, targets_row, valid_row, positions_row, segments_row):
        sums = []
        # What depth 1 (every depth, parallel) reads: the trunk state before or
        # after the final norm; what depth k > 1 reads: h^{k-1} before or after the
        # norm its logits use.
        if depths.trunk_input == "after_norm":
            h0 = final_norm(h0)
        previous = h0
        for k in depth_numbers:
            depth = unstacked[k - 1]
            if sequential:
                next_embeddings = embedding[ahead_row[k - 1]]
                # Embedding first, hidden second; eh_proj is [out, in].
                combined = jnp.concatenate(
                    [depth.enorm(next_embeddings), depth.hnorm(previous)], axis=-1
                )
                x = jax.vmap(depth.eh_proj)(combined)
            else:
                assert depth.enorm is None and depth.hnorm is None
                assert depth.eh_proj is None
                x = h0
            h_k = depth.layer(x, positions=positions_row, segment_ids=segments_row)
            norm = final_norm if depth.norm is None else depth.norm
            sums.append(
                naive_cross_entropy_sum(
                    norm(h_k), unembedding, targets_row[k - 1], valid_row[k - 1]
                )
            )
            previous = norm(h_k) if depths.previous_input == "after_norm" else h_k
        return jnp.stack(sums)

    row_sums = jax.vmap(one_row)(
        hidden,
        jnp.asarray(ahead),
        jnp.asarray(targets),
        jnp.asarray(valid),
        jnp.asarray(pos),
        jnp.asarray(seg),
    )
    return jnp.sum(row_sums, axis=0), valid.sum(axis=(0, 2))


def loop_trunk_hidden(model, tokens, segment_ids=None, positions=None):
    """`h⁰` `[batch, seq, dim]`: `model.trunk` called on each row."""
    tokens, seg, pos = _defaults(tokens, segment_ids, positions)

    def one_row(t, p, s):
        return model.trunk(t, positions=p, segment_ids=s)

    return jax.vmap(one_row)(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))


def loop_main_loss_sum(model, hidden, tokens, segment_ids=None, loss_mask=None):
    """Depth-0 (next-token) loss sum and count of the trunk output `hidden`."""
    tokens, seg, _ = _defaults(tokens, segment_ids, None)
    trunk = model.trunk
    targets, valid = targets_reference(tokens, seg, loss_mask, 0)

    def one_row(h, t, v):
        normed = trunk.final_norm(h)
        return naive_cross_entropy_sum(normed, trunk.unembedding_matrix, t, v)

    row_sums = jax.vmap(one_row)(hidden, jnp.asarray(targets), jnp.asarray(valid))
    return jnp.sum(row_sums), int(valid.sum())


def loop_head_loss_sum(
    hidden, tokens, *, unembedding, final_norm, segment_ids=None, loss_mask=None
):
    """Depth-0 (next-token) loss sum (a JAX array) and count (an int) of any trunk's
    output `hidden` `[batch, seq, dim]`; `final_norm` acts on one row `[seq, dim]`."""
    tokens, seg, _ = _defaults(tokens, segment_ids, None)
    targets, valid = targets_reference(tokens, seg, loss_mask, 0)

    def one_row(h, t, v):
        return naive_cross_entropy_sum(final_norm(h), unembedding, t, v)

    row_sums = jax.vmap(one_row)(hidden, jnp.asarray(targets), jnp.asarray(valid))
    return jnp.sum(row_sums), int(valid.sum())


def loop_mtp_loss_sums(
    model, tokens, segment_ids=None, positions=None, loss_mask=None, fill=0
):
    """`(loss_sums [D+1], token_counts [D+1])` of an `eqx_mtp.MTPModel`, index 0 the
    main objective: the trunk row by row, then `loop_depth_loss_sums`."""
    hidden = loop_trunk_hidden(model, tokens, segment_ids, positions)
    main_sum, main_count = loop_main_loss_sum(
        model, hidden, tokens, segment_ids, loss_mask
    )
    if model.depths is None:
        return main_sum[None], np.array([main_count])
    trunk = model.trunk
    depth_sums, depth_counts = loop_depth_loss_sums(
        model.depths,
        hidden,
        tokens,
        embedding=trunk.embedding,
        unembedding=trunk.unembedding_matrix,
        final_norm=trunk.final_norm,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
        fill=fill,
    )
    return (
        jnp.concatenate([main_sum[None], depth_sums]),
        np.concatenate([[main_count], depth_counts]),
    )


def visible_reference(query_segments, key_segments, query_index, key_index):
    """`visible[t, s]` by a Python loop: key `s` is in query `t`'s document and not
    after it (padding, segment 0, sees padding only, as in the trunk). The ids of
    queries and keys are each numbered by `documents_reference` (the same row for
    both in self-attention)."""
    query_segments = documents_reference(np.asarray(query_segments)[None])[0]
    key_segments = documents_reference(np.asarray(key_segments)[None])[0]
    visible = np.zeros((len(query_segments), len(key_segments)), bool)
    for t in range(len(query_segments)):
        for s in range(len(key_segments)):
            visible[t, s] = (
                query_segments[t] == key_segments[s] and key_index[s] <= query_index[t]
            )
    return visible


def naive_attention(queries, keys, values, visible):
    """Head by head: `softmax(q k^T / sqrt(d))` over the visible keys only, in float32;
    a query that sees no key gets zeros. Query head `h` reads key/value head
    `h // (heads / kv_heads)`."""
    num_heads, head_dim = queries.shape[1], queries.shape[2]
    group = num_heads // keys.shape[1]
    visible = jnp.asarray(visible)
    heads = []
    for h in range(num_heads):
        q = queries[:, h].astype(jnp.float32)
        k = keys[:, h // group].astype(jnp.float32)
        v = values[:, h // group].astype(jnp.float32)
        scores = jnp.where(visible, q @ k.T / math.sqrt(head_dim), -jnp.inf)
        top = jnp.max(jnp.where(visible, scores, -1e30), axis=-1, keepdims=True)
        weights = jnp.where(visible, jnp.exp(scores - top), 0.0)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        heads.append((weights / jnp.where(total > 0, total, 1.0)) @ v)
    return jnp.stack(heads, axis=1)


# -- test utilities --------------------------------------------------------------


def jit_once(fn):
    """`fn(tree)` compiled with XLA's backend optimisations off: the test graphs run
    once or twice, so compile time is what counts. Arrays of `tree` are traced, the
    rest is static."""

    def call(tree):
        arrays, static = eqx.partition(tree, eqx.is_array)
        compiled = jax.jit(
            lambda a: fn(eqx.combine(a, static)),
            compiler_options={"xla_backend_optimization_level": 0},
        )
        return compiled(arrays)

    return call


def random_like(shapes, seed=0):
    """Fill the `jax.ShapeDtypeStruct` leaves of `eqx.filter_eval_shape(...)`'s
    output with random values: scales `1 + 0.2·N(0, 1)` for anything named `*norm*`
    (so that, e.g., `enorm` and `hnorm` differ), `N(0, 1/fan_in)` elsewhere. Cheaper
    than running the initialisers, which cost seconds of eager dispatch per shape."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if "norm" in jax.tree_util.keystr(path):
            values = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
        else:
            values = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-1])
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def random_model(config, seed=0):
    """An `eqx_mtp.MTPModel` of `config` with random weights (see `random_like`)."""
    key = jax.random.key(0)
    return random_like(eqx.filter_eval_shape(eqx_mtp.MTPModel, config, key=key), seed)


@st.composite
def segment_rows(draw, batch, seq_len):
    """Hypothesis strategy of `[batch, seq_len]` int32 segment ids: runs of ids in
    `0..3` (`0` = padding), i.e. packed documents with padding between and after
    them, and also equal ids recurring after a gap and single-token runs."""
    rows = []
    for _ in range(batch):
        row = []
        while len(row) < seq_len:
            length = draw(st.integers(1, seq_len))
            row += [draw(st.integers(0, 3))] * length
        rows.append(row[:seq_len])
    return np.array(rows, np.int32)
