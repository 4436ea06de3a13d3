"""`depth_targets` and `segment_positions` against brute force."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from reference import (
    segment_positions_reference,
    segment_rows,
    targets_reference,
    valid_reference,
)

import eqx_mtp

VOCAB = 19


@st.composite
def packed_batches(draw):
    batch = draw(st.integers(1, 3))
    seq_len = draw(st.integers(2, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Ids from 1, so that a target is never mistaken for the zero fill.
    tokens = rng.integers(1, VOCAB, (batch, seq_len)).astype(np.int32)
    segment_ids = draw(st.none() | segment_rows(batch, seq_len))
    loss_mask = draw(st.none() | st.just(rng.random((batch, seq_len)) < 0.7))
    return tokens, segment_ids, loss_mask


def _as_jax(x):
    return None if x is None else jnp.asarray(x)


# Jitted with a traced depth, as in the depth scan: one compilation per drawn shape.
_jitted_depth_targets = jax.jit(eqx_mtp.depth_targets)


@given(packed_batches())
def test_depth_targets_match_brute_force(batch):
    tokens, segment_ids, loss_mask = batch
    seg = np.ones(tokens.shape, np.int32) if segment_ids is None else segment_ids
    for depth in range(5):
        targets, valid = _jitted_depth_targets(
            jnp.asarray(tokens),
            jnp.asarray(depth, jnp.int32),
            segment_ids=_as_jax(segment_ids),
            loss_mask=_as_jax(loss_mask),
        )
        ref_targets, ref_valid = targets_reference(tokens, seg, loss_mask, depth)
        assert valid.dtype == jnp.bool_ and targets.dtype == tokens.dtype
        np.testing.assert_array_equal(valid, ref_valid)
        np.testing.assert_array_equal(np.where(ref_valid, targets, 0), ref_targets)


def _neighbour_only_valid(segment_ids, k):
    """A bug seen in public implementations: only the pair (target - 1,
    target) is compared, as when depth 0's boundary mask is shifted k places."""
    seg = np.asarray(segment_ids)
    batch, seq_len = seg.shape
    valid = np.zeros((batch, seq_len), bool)
    for b in range(batch):
        for i in range(seq_len - k - 1):
            j = i + k + 1
            valid[b, i] = seg[b, j] != 0 and seg[b, j - 1] == seg[b, j]
    return valid


def test_target_in_next_document_never_counts():
    # Every neighbour pair inside a segment agrees; documents of length 2 and 4.
    segment_ids = np.array([[1, 1, 2, 2, 2, 2, 3, 3, 0, 0]], np.int32)
    tokens = np.arange(1, 11, dtype=np.int32)[None]
    for depth in (2, 3):
        _, valid = eqx_mtp.depth_targets(
            jnp.asarray(tokens), depth, segment_ids=jnp.asarray(segment_ids)
        )
        expected = valid_reference(segment_ids, None, depth)
        np.testing.assert_array_equal(valid, expected)
        # Position 0 (document 1) would read a target of document 2 under the
        # neighbour-only rule; the validity rule rejects it.
        assert _neighbour_only_valid(segment_ids, depth)[0, 0]
        assert not expected[0, 0] and not valid[0, 0]
    # Depth 2 in document 2: positions 2 and 3 reach positions 5 and 6; 6 is
    # document 3.
    _, valid = eqx_mtp.depth_targets(
        jnp.asarray(tokens), 2, segment_ids=jnp.asarray(segment_ids)
    )
    np.testing.assert_array_equal(np.nonzero(np.asarray(valid[0]))[0], [2])


def test_loss_mask_applies_to_the_target_position():
    tokens = jnp.arange(1, 9, dtype=jnp.int32)[None]
    loss_mask = np.ones((1, 8), bool)
    loss_mask[0, 5] = False
    for depth in range(4):
        _, valid = eqx_mtp.depth_targets(
            tokens, depth, loss_mask=jnp.asarray(loss_mask)
        )
        np.testing.assert_array_equal(
            valid, valid_reference(np.ones((1, 8), np.int32), loss_mask, depth)
        )
        # Position 5 - depth - 1 predicts the masked token 5.
        assert not valid[0, 4 - depth]


def test_traced_depth_under_jit():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, (2, 11)).astype(np.int32)
    segment_ids = np.array(
        [[1, 1, 2, 2, 2, 2, 2, 0, 3, 3, 3], [4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0]],
        np.int32,
    )
    loss_mask = rng.random(tokens.shape) < 0.7
    traces = []

    @jax.jit
    def targets_at(depth):
        traces.append(depth)
        return eqx_mtp.depth_targets(
            jnp.asarray(tokens),
            depth,
            segment_ids=jnp.asarray(segment_ids),
            loss_mask=jnp.asarray(loss_mask),
        )

    for depth in range(5):
        targets, valid = targets_at(jnp.asarray(depth, jnp.int32))
        ref_targets, ref_valid = targets_reference(
            tokens, segment_ids, loss_mask, depth
        )
        np.testing.assert_array_equal(valid, ref_valid)
        np.testing.assert_array_equal(np.where(ref_valid, targets, 0), ref_targets)
    assert len(traces) == 1


def test_targets_are_zero_where_invalid():
    tokens = jnp.arange(1, 7, dtype=jnp.int32)[None]
    loss_mask = jnp.array([[True, True, False, True, True, True]])
    targets, valid = eqx_mtp.depth_targets(tokens, 0, loss_mask=loss_mask)
    assert not valid[0, 1]
    np.testing.assert_array_equal(np.where(valid, 0, targets), 0)


@st.composite
def segment_batches(draw):
    return draw(segment_rows(draw(st.integers(1, 3)), draw(st.integers(1, 12))))


@given(segment_batches())
def test_segment_positions_match_loop(segment_ids):
    positions = jax.jit(eqx_mtp.segment_positions)(jnp.asarray(segment_ids))
    assert positions.dtype == jnp.int32
    np.testing.assert_array_equal(positions, segment_positions_reference(segment_ids))
