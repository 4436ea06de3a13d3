"""Blockwise attention against a naive attention written here from its definition:
values and gradients over ragged row lengths, tile sizes, grouped heads, packed rows
with padding, key/value blocks from elsewhere, bfloat16; and a whole model whose
attention is blockwise against the same model with the materialised one."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, tree_allclose
from hypothesis import given, settings
from reference import (
    naive_attention,
    random_model,
    segment_rows,
    visible_reference,
)

import eqx_mtp


def _inputs(rng, seq_len, num_heads, num_kv_heads, head_dim, dtype, num_keys=None):
    num_keys = seq_len if num_keys is None else num_keys

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return (
        normal(seq_len, num_heads, head_dim),
        normal(num_keys, num_kv_heads, head_dim),
        normal(num_keys, num_kv_heads, head_dim),
        normal(seq_len, num_heads, head_dim),  # the output's cotangent
    )


def _values_and_grads(fn, q, k, v, cotangent):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(cotangent.astype(out.dtype))


HEADS = st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4)])
BLOCKS = st.sampled_from([1, 3, 4, 8, 16])


@settings(max_examples=12)
@given(
    data=st.data(),
    seq_len=st.integers(1, 40),
    heads=HEADS,
    block_q=BLOCKS,
    block_k=BLOCKS,
)
def test_blockwise_equals_naive_attention(data, seq_len, heads, block_q, block_k):
    """Self-attention over a packed row (documents, padding, lengths that are not a
    multiple of the tile): the bugs caught include a causal test off by one (`<` for
    `<=`), a skipped diagonal tile, a segment check dropped, a softmax correction
    factor missing when the running max changes, and a backward without the `D_i`
    term."""
    num_heads, num_kv_heads = heads
    segments = data.draw(segment_rows(1, seq_len))[0]
    rng = np.random.default_rng(seq_len * 100 + block_q * 10 + block_k)
    q, k, v, cotangent = _inputs(rng, seq_len, num_heads, num_kv_heads, 8, jnp.float32)
    index = np.arange(seq_len)
    visible = visible_reference(segments, segments, index, index)
    segments = jnp.asarray(segments)

    def blockwise(q, k, v):
        return eqx_mtp.nn.blockwise_attention(
            q,
            k,
            v,
            query_segment_ids=segments,
            key_segment_ids=segments,
            block_q=block_q,
            block_k=block_k,
        )

    expected = _values_and_grads(
        lambda q, k, v: naive_attention(q, k, v, visible), q, k, v, cotangent
    )
    got = _values_and_grads(jax.jit(blockwise), q, k, v, cotangent)
    assert tree_allclose(got, expected, rtol=1e-5, atol=2e-6)


def test_keys_and_values_from_elsewhere():
    """Queries of the second half of a row against keys and values of the whole row
    passed as separate blocks with explicit indices (a KV cache, another context
    shard): the rows of the naive attention over the whole row. Catches an index
    rule that assumes queries and keys start together."""
    rng = np.random.default_rng(0)
    seq_len, start = 24, 13
    q, k, v, cotangent = _inputs(rng, seq_len, 4, 2, 8, jnp.float32)
    segments = np.array([1] * 9 + [2] * 12 + [0] * 3, np.int32)
    index = np.arange(seq_len)
    visible = visible_reference(segments, segments, index, index)

    def blockwise(q_part, k, v):
        return eqx_mtp.nn.blockwise_attention(
            q_part,
            k,
            v,
            query_segment_ids=jnp.asarray(segments[start:]),
            key_segment_ids=jnp.asarray(segments),
            query_index=jnp.asarray(index[start:]),
            key_index=jnp.asarray(index),
            block_q=4,
            block_k=5,
        )

    expected = _values_and_grads(
        lambda q, k, v: naive_attention(q, k, v, visible[start:]),
        q[start:],
        k,
        v,
        cotangent[start:],
    )
    got = _values_and_grads(blockwise, q[start:], k, v, cotangent[start:])
    assert tree_allclose(got, expected, rtol=1e-5, atol=2e-6)


def test_bfloat16_inputs():
    """bfloat16 queries, keys and values (float32 inside): the output and gradients
    within bfloat16's resolution of the float32 naive attention (2⁻⁸ relative, so
    rtol 3e-2 after a few roundings), and in bfloat16."""
    rng = np.random.default_rng(1)
    q, k, v, cotangent = _inputs(rng, 33, 4, 2, 16, jnp.bfloat16)
    segments = np.array([1] * 20 + [2] * 13, np.int32)
    index = np.arange(33)
    visible = visible_reference(segments, segments, index, index)

    def blockwise(q, k, v):
        return eqx_mtp.nn.blockwise_attention(
            q,
            k,
            v,
            query_segment_ids=jnp.asarray(segments),
            key_segment_ids=jnp.asarray(segments),
            block_q=8,
            block_k=16,
        )

    got = _values_and_grads(blockwise, q, k, v, cotangent)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    as32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)  # noqa: E731
    expected = _values_and_grads(
        lambda q, k, v: naive_attention(q, k, v, visible), *as32((q, k, v, cotangent))
    )
    assert tree_allclose(as32(got), expected, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("mtp_kind", ["sequential", "parallel"])
@pytest.mark.parametrize("num_depths", [0, 2])
def test_model_with_blockwise_attention_equals_reference(mtp_kind, num_depths):
    """The whole MTP loss and every gradient with `attention_impl="blockwise"` (tiles
    of 4 over rows of 16: padded-free but multi-tile) equal the materialised
    attention's, on packed rows with padding."""
    config = dict(num_depths=num_depths, mtp_kind=mtp_kind, attention_block_size=4)
    reference = random_model(tiny_config(**config))
    blockwise = random_model(tiny_config(**config, attention_impl="blockwise"))
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 19, (3, 16)), jnp.int32)
    segment_ids = jnp.asarray(
        [[1] * 7 + [2] * 9, [1] * 16, [1] * 5 + [2] * 6 + [0] * 5], jnp.int32
    )

    def loss(model):
        return eqx_mtp.mtp_loss(model, tokens, segment_ids=segment_ids, mtp_weight=0.3)

    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    (expected, _), expected_grads = value_and_grad(reference)
    (got, _), grads = value_and_grad(blockwise)
    assert np.isclose(float(got), float(expected), rtol=1e-5)
    # The configurations differ (`attention_impl`), so compare the arrays.
    leaves, expected_leaves = jax.tree.leaves(grads), jax.tree.leaves(expected_grads)
    assert len(leaves) == len(expected_leaves)
    assert tree_allclose(leaves, expected_leaves, rtol=1e-5, atol=1e-6)


def test_bad_attention_input():
    with pytest.raises(ValueError, match="attention_impl.*'reference', 'blockwise'"):
        eqx_mtp.ModelConfig(vocab_size=8, attention_impl="flash")
    with pytest.raises(ValueError, match="attention_block_size"):
        eqx_mtp.ModelConfig(vocab_size=8, attention_block_size=0)
    q = jnp.zeros((4, 3, 8))
    kv = jnp.zeros((4, 2, 8))
    segments = jnp.ones(4, jnp.int32)
    with pytest.raises(ValueError, match="kv_heads=2 must divide heads=3"):
        eqx_mtp.nn.blockwise_attention(
            q, kv, kv, query_segment_ids=segments, key_segment_ids=segments
        )
    with pytest.raises(ValueError, match="block_q"):
        eqx_mtp.nn.blockwise_attention(
            q[:, :2],
            kv,
            kv,
            query_segment_ids=segments,
            key_segment_ids=segments,
            block_q=0,
        )


def test_blockwise_attention_on_a_context_mesh():
    """Rows split over `context` (keys and values gathered, then tiled): the loss and
    gradients of one device, D = 2, documents straddling the shards."""
    model = random_model(
        tiny_config(num_depths=2, attention_impl="blockwise", attention_block_size=4)
    )
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 19, (2, 16)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 6 + [3] * 5, [1] * 13 + [0] * 3])

    def loss(model, mesh):
        return eqx_mtp.mtp_loss(
            model, tokens, segment_ids=segment_ids, mtp_weight=0.3, mesh=mesh
        )[0]

    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    expected = value_and_grad(model, None)
    mesh = eqx_mtp.make_mesh(2, 1, 4)
    got = value_and_grad(eqx_mtp.shard_tree(model, mesh), mesh)
    assert tree_allclose(got, expected, rtol=1e-5, atol=1e-6)
