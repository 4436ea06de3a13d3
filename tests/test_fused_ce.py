"""The chunked cross-entropy against full-logits references written here."""

import functools

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from hypothesis import given

import eqx_mtp

# --------------------------------------------------------------------------------------
# Independent references: the full [tokens, vocab] logits in float32.
# --------------------------------------------------------------------------------------


def reference_losses(hidden, unembed, targets, where):
    hidden = hidden.astype(jnp.float32)
    unembed = unembed.astype(jnp.float32)
    logits = jnp.dot(hidden, unembed.T, precision=jax.lax.Precision.HIGHEST)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    losses = -log_probs[jnp.arange(targets.shape[0]), targets]
    return jnp.where(where, losses, 0.0)


def reference_sum(hidden, unembed, targets, where):
    return jnp.sum(reference_losses(hidden, unembed, targets, where))


def _problem(seed, num_tokens, dim, vocab, mask_kind, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(keys[0], (num_tokens, dim), jnp.float32)
    unembed = 0.5 * jax.random.normal(keys[1], (vocab, dim), jnp.float32)
    targets = jax.random.randint(keys[2], (num_tokens,), 0, vocab)
    if mask_kind == "all":
        where = jnp.ones((num_tokens,), bool)
    elif mask_kind == "none":
        where = jnp.zeros((num_tokens,), bool)
    else:
        where = jax.random.bernoulli(keys[3], 0.6, (num_tokens,))
    cotangent = jax.random.normal(keys[4], (num_tokens,), jnp.float32)
    return hidden.astype(dtype), unembed.astype(dtype), targets, where, cotangent


def _close(actual, expected, *, rtol, atol):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def _tolerances(dtype, reference_grads):
    if dtype == jnp.float32:
        return dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-4, atol=1e-5)
    # bfloat16 inputs: the logits are exact float32 products, so the value is tight;
    # the logits gradient is rounded to bfloat16 before each matmul, and the result
    # is rounded again.
    scale = max(float(jnp.max(jnp.abs(g))) for g in reference_grads) + 1e-3
    return dict(rtol=1e-4, atol=1e-4), dict(rtol=3e-2, atol=3e-2 * scale)


# Few distinct shapes, so that the jitted functions below are often reused.
chunks = st.sampled_from([None, 1, 3, 4, 16])
token_counts = st.sampled_from([1, 4, 7, 12])
vocab_sizes = st.sampled_from([2, 7, 16])
masks = st.sampled_from(["all", "none", "random"])
dtypes = st.sampled_from([jnp.float32, jnp.bfloat16])


@functools.partial(jax.jit, static_argnames=("chunk_size", "vocab_chunk_size"))
def _fused_losses_and_grads(
    hidden, unembed, targets, where, cotangent, *, chunk_size, vocab_chunk_size
):
    def loss(h, w):
        losses = eqx_mtp.fused_cross_entropy(
            h,
            w,
            targets,
            where=where,
            chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size,
        )
        return jnp.sum(cotangent * losses), losses

    (_, losses), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(hidden, unembed)
    return losses, grads


@jax.jit
def _reference_losses_and_grads(hidden, unembed, targets, where, cotangent):
    def loss(h, w):
        losses = reference_losses(h, w, targets, where)
        return jnp.sum(cotangent * losses), losses

    (_, losses), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        hidden.astype(jnp.float32), unembed.astype(jnp.float32)
    )
    return losses, grads


@functools.partial(jax.jit, static_argnames=("chunk_size", "impl"))
def _sum_and_grads(hidden, unembed, targets, where, *, chunk_size, impl):
    def loss(h, w):
        total, count = eqx_mtp.head_loss_sum(
            h, w, targets, where, chunk_size=chunk_size, impl=impl
        )
        return 3.7 * total, (total, count)

    (_, (total, count)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        hidden, unembed
    )
    return total, count, grads


@given(
    num_tokens=token_counts,
    vocab=vocab_sizes,
    chunk_size=chunks,
    vocab_chunk_size=chunks,
    mask_kind=masks,
    dtype=dtypes,
    seed=st.integers(0, 2**16),
)
def test_fused_cross_entropy_matches_full_logits(
    num_tokens, vocab, chunk_size, vocab_chunk_size, mask_kind, dtype, seed
):
    hidden, unembed, targets, where, cotangent = _problem(
        seed, num_tokens, 8, vocab, mask_kind, dtype
    )
    losses, grads = _fused_losses_and_grads(
        hidden,
        unembed,
        targets,
        where,
        cotangent,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )
    expected, expected_grads = _reference_losses_and_grads(
        hidden, unembed, targets, where, cotangent
    )
    assert losses.dtype == jnp.float32 and losses.shape == (num_tokens,)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    value_tol, grad_tol = _tolerances(dtype, expected_grads)
    _close(losses, expected, **value_tol)
    assert jnp.all(losses[~where] == 0)
    _close(grads[0], expected_grads[0], **grad_tol)
    _close(grads[1], expected_grads[1], **grad_tol)
    # masked tokens: exactly zero gradient rows
    assert jnp.all(grads[0][~where] == 0)


@given(
    num_tokens=token_counts,
    vocab=vocab_sizes,
    chunk_size=chunks,
    impl=st.sampled_from(["fused", "chunked", "naive"]),
    mask_kind=masks,
    dtype=dtypes,
    seed=st.integers(0, 2**16),
)
def test_head_loss_sum_matches_full_logits(
    num_tokens, vocab, chunk_size, impl, mask_kind, dtype, seed
):
    hidden, unembed, targets, where, _ = _problem(
        seed, num_tokens, 8, vocab, mask_kind, dtype
    )
    total, count, grads = _sum_and_grads(
        hidden, unembed, targets, where, chunk_size=chunk_size, impl=impl
    )
    expected_losses, expected_grads = _reference_losses_and_grads(
        hidden, unembed, targets, where, jnp.full((num_tokens,), 3.7, jnp.float32)
    )
    expected = jnp.sum(expected_losses)

    assert total.dtype == jnp.float32 and total.shape == ()
    assert count.dtype == jnp.int32 and int(count) == int(jnp.sum(where))
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    value_tol, grad_tol = _tolerances(dtype, expected_grads)
    _close(total, expected, **value_tol)
    _close(grads[0], expected_grads[0], **grad_tol)
    _close(grads[1], expected_grads[1], **grad_tol)


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_head_loss_sum_under_jit_and_vmap(impl):
    batch, num_tokens, dim, vocab = 3, 7, 8, 13
    problems = [_problem(seed, num_tokens, dim, vocab, "random") for seed in (1, 2, 3)]
    hidden, unembed, targets, where, _ = (jnp.stack(x) for x in zip(*problems))
    cotangents = jnp.array([1.0, -0.5, 3.7], jnp.float32)

    def one(h, w, t, m, c):
        def loss(h, w):
            total, count = eqx_mtp.head_loss_sum(h, w, t, m, chunk_size=3, impl=impl)
            return c * total, count

        return jax.value_and_grad(loss, (0, 1), has_aux=True)(h, w)

    (values, counts), grads = jax.jit(jax.vmap(one))(
        hidden, unembed, targets, where, cotangents
    )
    for i in range(batch):

        def reference(h, w):
            return cotangents[i] * reference_sum(h, w, targets[i], where[i])

        value, (grad_h, grad_w) = jax.value_and_grad(reference, (0, 1))(
            hidden[i], unembed[i]
        )
        _close(values[i], value, rtol=1e-5, atol=1e-5)
        assert int(counts[i]) == int(jnp.sum(where[i]))
        _close(grads[0][i], grad_h, rtol=1e-4, atol=1e-5)
        _close(grads[1][i], grad_w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_fully_masked_input_gives_zero_and_zero_gradients(impl):
    hidden, unembed, targets, where, _ = _problem(0, 9, 8, 11, "none")

    def loss(h, w):
        return eqx_mtp.head_loss_sum(h, w, targets, where, chunk_size=4, impl=impl)

    (total, count), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        hidden, unembed
    )
    assert float(total) == 0.0 and int(count) == 0
    assert all(bool(jnp.all(g == 0)) for g in grads)
    losses, grads = jax.value_and_grad(
        lambda h, w: eqx_mtp.fused_cross_entropy(h, w, targets, where=where).sum(),
        (0, 1),
    )(hidden, unembed)
    assert float(losses) == 0.0 and all(bool(jnp.all(g == 0)) for g in grads)


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_masked_tokens_add_exactly_nothing(impl):
    hidden, unembed, targets, where, _ = _problem(5, 10, 8, 11, "random")
    # Different hidden states and targets at the masked tokens only.
    other_hidden = jnp.where(where[:, None], hidden, 10.0 * hidden[::-1])
    other_targets = jnp.where(where, targets, (targets + 3) % 11)

    def loss(h, t):
        def total(h, w):
            return eqx_mtp.head_loss_sum(h, w, t, where, chunk_size=4, impl=impl)[0]

        return jax.value_and_grad(total, (0, 1))(h, unembed)

    value, (grad_h, grad_w) = loss(hidden, targets)
    other_value, (other_grad_h, other_grad_w) = loss(other_hidden, other_targets)
    assert float(value) == float(other_value)
    assert bool(jnp.all(grad_w == other_grad_w))
    assert bool(jnp.all(grad_h[where] == other_grad_h[where]))
    assert bool(jnp.all(other_grad_h[~where] == 0))


def test_mixed_dtypes_give_gradients_in_each_input_dtype():
    hidden, unembed, targets, where, _ = _problem(3, 6, 8, 9, "random")
    hidden = hidden.astype(jnp.bfloat16)
    for fn in (
        lambda h, w: eqx_mtp.head_loss_sum(h, w, targets, where, chunk_size=4)[0],
        lambda h, w: eqx_mtp.fused_cross_entropy(
            h, w, targets, where=where, chunk_size=4, vocab_chunk_size=4
        ).sum(),
    ):
        grad_h, grad_w = jax.grad(fn, (0, 1))(hidden, unembed)
        assert grad_h.dtype == jnp.bfloat16 and grad_w.dtype == jnp.float32
        expected = jax.grad(lambda h, w: reference_sum(h, w, targets, where), (0, 1))(
            hidden.astype(jnp.float32), unembed
        )
        # the float32 operand is rounded to bfloat16 for the matmuls
        _close(grad_h, expected[0], rtol=3e-2, atol=3e-2)
        _close(grad_w, expected[1], rtol=3e-2, atol=3e-2)


def test_zero_tokens_and_bad_chunk_sizes():
    unembed = jnp.ones((5, 4), jnp.float32)
    empty = eqx_mtp.fused_cross_entropy(
        jnp.zeros((0, 4), jnp.float32), unembed, jnp.zeros((0,), jnp.int32)
    )
    assert empty.shape == (0,)
    hidden, targets = jnp.ones((3, 4), jnp.float32), jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match="chunk_size"):
        eqx_mtp.fused_cross_entropy(hidden, unembed, targets, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        eqx_mtp.fused_cross_entropy(hidden, unembed, targets, vocab_chunk_size=-1)
    with pytest.raises(ValueError, match="impl"):
        eqx_mtp.head_loss_sum(
            hidden, unembed, targets, jnp.ones((3,), bool), impl="flash"
        )


def test_model_loss_is_the_same_with_the_fused_loss(getkey):
    values = dict(vocab_size=23, mtp_block="linear")
    key = getkey()
    tokens = jax.random.randint(getkey(), (2, 9), 0, 23)
    loss_mask = jax.random.bernoulli(getkey(), 0.8, tokens.shape)

    @eqx.filter_jit
    def sums_and_grads(model):
        def total(m):
            sums, counts = eqx_mtp.mtp_loss_sums(m, tokens, loss_mask=loss_mask)
            return jnp.sum(sums * jnp.array([1.0, 0.5, 0.25])), (sums, counts)

        return eqx.filter_value_and_grad(total, has_aux=True)(model)

    def model(**config):
        return eqx_mtp.MTPModel(tiny_config(**values, **config), key=key)

    (_, (ref_sums, ref_counts)), ref_grads = sums_and_grads(model(loss_impl="naive"))
    # "chunked" shares this threading; head_loss_sum's tests cover it.
    for loss_impl in ("fused",):
        (_, (sums, counts)), grads = sums_and_grads(
            model(loss_impl=loss_impl, loss_chunk_size=5)
        )
        assert bool(jnp.all(counts == ref_counts))
        _close(sums, ref_sums, rtol=1e-5, atol=1e-5)
        for g, ref in zip(
            jax.tree.leaves(eqx.filter(grads, eqx.is_array)),
            jax.tree.leaves(eqx.filter(ref_grads, eqx.is_array)),
            strict=True,
        ):
            _close(g, ref, rtol=1e-4, atol=1e-5)
