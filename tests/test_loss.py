"""`mtp_loss` / `reduce_losses`: reductions, weights, masks and input checks."""

import functools
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SEGMENT_IDS, VOCAB, tiny_config, tree_allclose
from reference import jit_once, loop_mtp_loss_sums, loop_trunk_hidden, random_model

import eqx_mtp

MAX_SEQ_LEN = 16
NUM_DEPTHS = 2
ONES = np.ones(SEGMENT_IDS.shape, np.int32)
ALL_TARGETS = np.ones(SEGMENT_IDS.shape, bool)


def _tokens(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, SEGMENT_IDS.shape).astype(np.int32)


def _loss_mask(seed=0):
    mask = np.random.default_rng(seed).random(SEGMENT_IDS.shape) < 0.8
    mask[0, 4] = mask[1, 9] = False
    return mask


@functools.cache
def _model(num_depths):
    config = tiny_config(
        vocab_size=VOCAB,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=MAX_SEQ_LEN,
        num_depths=num_depths,
    )
    return random_model(config, seed=num_depths)


@functools.cache
def _objective(num_depths):
    """One compilation per model, reused by every test with this batch shape:
    `(arrays, tokens, segment_ids, loss_mask, mtp_weight) -> (loss, aux, grads,
    pooled_loss, pooled_aux)`, `loss` with `reduction="mean"` and its gradient."""
    _, static = eqx.partition(_model(num_depths), eqx.is_array)

    def objective(arrays, tokens, segment_ids, loss_mask, mtp_weight):
        model = eqx.combine(arrays, static)

        def loss(m, reduction="mean"):
            return eqx_mtp.mtp_loss(
                m,
                tokens,
                segment_ids=segment_ids,
                loss_mask=loss_mask,
                mtp_weight=mtp_weight,
                reduction=reduction,
            )

        (value, aux), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        pooled, pooled_aux = loss(model, "pooled")
        return value, aux, grads, pooled, pooled_aux

    return jax.jit(objective, compiler_options={"xla_backend_optimization_level": 0})


def _run(tokens, segment_ids=ONES, loss_mask=ALL_TARGETS, mtp_weight=0.1, *, depths=2):
    arrays = eqx.filter(_model(depths), eqx.is_array)
    return _objective(depths)(
        arrays,
        jnp.asarray(tokens),
        jnp.asarray(segment_ids),
        jnp.asarray(loss_mask),
        jnp.asarray(mtp_weight, jnp.float32),
    )


def test_num_depths_zero_is_plain_next_token_cross_entropy():
    model = _model(0)
    tokens, loss_mask = _tokens(), _loss_mask()

    def naive(m):
        hidden = loop_trunk_hidden(m, tokens, SEGMENT_IDS)
        logits = m.trunk.final_norm(hidden) @ m.trunk.unembedding_matrix.T
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
        seg = SEGMENT_IDS
        valid = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1]) & loss_mask[:, 1:]
        return -jnp.sum(jnp.where(valid, picked, 0.0)) / float(valid.sum())

    expected, expected_grads = jit_once(eqx.filter_value_and_grad(naive))(model)
    loss, aux, grads, pooled, _ = _run(tokens, SEGMENT_IDS, loss_mask, depths=0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(pooled, expected, rtol=1e-5)
    assert aux["loss_sums"].shape == aux["token_counts"].shape == (1,)
    assert aux["mtp_loss"] == 0
    assert loss == aux["main_loss"]
    assert tree_allclose(grads, expected_grads, rtol=1e-4, atol=1e-5)


def test_reductions_match_formulas_on_loop_sums():
    model = _model(NUM_DEPTHS)
    tokens, loss_mask = _tokens(1), _loss_mask(1)
    sums, counts = jit_once(
        lambda m: loop_mtp_loss_sums(m, tokens, SEGMENT_IDS, None, loss_mask)
    )(model)
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts)
    assert len(set(counts.tolist())) > 1  # counts differ per depth here
    main = sums[0] / counts[0]
    mean_mtp = np.mean(sums[1:] / counts[1:])
    pooled_mtp = sums[1:].sum() / counts[1:].sum()

    weight = 0.3
    loss, aux, _, pooled, pooled_aux = _run(
        tokens, SEGMENT_IDS, loss_mask, mtp_weight=weight
    )
    np.testing.assert_array_equal(aux["token_counts"], counts)
    np.testing.assert_allclose(aux["loss_sums"], sums, rtol=1e-5)
    np.testing.assert_allclose(aux["depth_losses"], sums / counts, rtol=1e-5)
    np.testing.assert_allclose(aux["main_loss"], main, rtol=1e-5)
    np.testing.assert_allclose(aux["mtp_loss"], mean_mtp, rtol=1e-5)
    np.testing.assert_allclose(loss, main + weight * mean_mtp, rtol=1e-5)
    np.testing.assert_allclose(pooled_aux["mtp_loss"], pooled_mtp, rtol=1e-5)
    np.testing.assert_allclose(pooled, main + weight * pooled_mtp, rtol=1e-5)
    assert not np.isclose(mean_mtp, pooled_mtp, rtol=1e-4)


def test_mean_and_pooled_agree_when_every_depth_counts_the_same():
    # Only targets at positions >= D + 1: each depth k >= 0 keeps the targets
    # D+1 .. T-1, so every depth counts T - 1 - D tokens.
    seq_len = SEGMENT_IDS.shape[1]
    loss_mask = np.zeros(SEGMENT_IDS.shape, bool)
    loss_mask[:, NUM_DEPTHS + 1 :] = True
    loss, aux, _, pooled, pooled_aux = _run(_tokens(2), ONES, loss_mask, 0.5)
    expected_count = 2 * (seq_len - 1 - NUM_DEPTHS)
    np.testing.assert_array_equal(aux["token_counts"], [expected_count] * 3)
    np.testing.assert_allclose(pooled, loss, rtol=1e-6)
    np.testing.assert_allclose(pooled_aux["mtp_loss"], aux["mtp_loss"], rtol=1e-6)


@pytest.mark.parametrize(
    "counts", [[4, 4, 4, 4], [10, 3, 0, 7], [0, 0, 0, 0], [5, 1, 2, 3]]
)
@pytest.mark.parametrize("reduction", ["mean", "pooled"])
def test_reduce_losses_formulas(counts, reduction):
    counts = np.array(counts, np.int32)
    sums = np.where(counts > 0, np.array([7.5, 2.25, 3.0, 11.0]), 0.0)
    weight = 0.25
    loss, aux = eqx_mtp.reduce_losses(
        jnp.asarray(sums, jnp.float32),
        jnp.asarray(counts),
        mtp_weight=weight,
        reduction=reduction,
    )
    # Counts are clamped at 1: an empty depth contributes 0.
    depth_losses = sums / np.maximum(counts, 1)
    if reduction == "mean":
        mtp = depth_losses[1:].mean()
    else:
        mtp = sums[1:].sum() / max(counts[1:].sum(), 1)
    np.testing.assert_allclose(aux["depth_losses"], depth_losses, rtol=1e-6)
    np.testing.assert_allclose(aux["main_loss"], depth_losses[0], rtol=1e-6)
    np.testing.assert_allclose(aux["mtp_loss"], mtp, rtol=1e-6)
    np.testing.assert_allclose(loss, depth_losses[0] + weight * mtp, rtol=1e-6)
    assert np.isfinite(loss)


def test_reduce_losses_rejects_unknown_reduction():
    reduce_losses = inspect.unwrap(eqx_mtp.reduce_losses)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'pooled'"):
        reduce_losses(jnp.ones(3), jnp.ones(3, jnp.int32), reduction="average")


def test_mtp_weight_scales_exactly():
    tokens, loss_mask = _tokens(3), _loss_mask(3)
    runs = {w: _run(tokens, SEGMENT_IDS, loss_mask, w) for w in (0.0, 0.3, 1.0)}
    main, mtp = runs[0.0][1]["main_loss"], runs[0.0][1]["mtp_loss"]
    assert mtp > 0
    assert runs[0.0][0] == main
    for weight, (loss, aux, _, pooled, pooled_aux) in runs.items():
        assert aux["main_loss"] == main and aux["mtp_loss"] == mtp
        np.testing.assert_allclose(loss, main + weight * mtp, rtol=1e-6)
        np.testing.assert_allclose(
            pooled, main + weight * pooled_aux["mtp_loss"], rtol=1e-6
        )
    # The gradient is affine in the weight: g(λ) = g(0) + λ (g(1) - g(0)).
    g0, g3, g1 = (runs[w][2] for w in (0.0, 0.3, 1.0))
    expected = jax.tree.map(lambda a, b: a + 0.3 * (b - a), g0, g1)
    assert tree_allclose(g3, expected, rtol=1e-5, atol=1e-6)
    assert not tree_allclose(g3, g0, rtol=1e-3, atol=1e-4)


# (num_depths, mtp_kind, tie_embeddings, reduction, mtp_weight, depth_weights)
_GRADIENT_CASES = [
    (0, "sequential", True, "mean", 0.1, None),
    (0, "sequential", False, "pooled", 0.1, None),
    (2, "sequential", True, "mean", 0.3, (1.0, 0.25)),
    (2, "sequential", False, "pooled", 0.7, None),
    (2, "parallel", True, "pooled", 0.3, (0.5, 1.0)),
    (2, "parallel", False, "mean", 0.1, None),
]


@pytest.mark.parametrize(
    "num_depths, mtp_kind, tie_embeddings, reduction, mtp_weight, depth_weights",
    _GRADIENT_CASES,
)
def test_fused_gradient_equals_chunked_and_naive(
    num_depths, mtp_kind, tie_embeddings, reduction, mtp_weight, depth_weights
):
    """The fused loss takes `mtp_loss`'s gradient from the sums' cotangents, known
    from the counts, with one unembedding gradient accumulated in the forward pass
    over the main head and every depth; the chunked and naive losses differentiate
    the sums themselves."""
    tokens, loss_mask = jnp.asarray(_tokens(6)), jnp.asarray(_loss_mask(6))
    segment_ids = jnp.asarray(SEGMENT_IDS)

    def loss_and_grads(loss_impl):
        config = tiny_config(
            vocab_size=VOCAB,
            max_seq_len=MAX_SEQ_LEN,
            num_depths=num_depths,
            mtp_kind=mtp_kind,
            mtp_block="linear",
            tie_embeddings=tie_embeddings,
            loss_impl=loss_impl,
            loss_chunk_size=5,
        )

        def loss(m):
            return eqx_mtp.mtp_loss(
                m,
                tokens,
                segment_ids=segment_ids,
                loss_mask=loss_mask,
                mtp_weight=mtp_weight,
                reduction=reduction,
                depth_weights=depth_weights,
            )

        value_and_grad = eqx.filter_value_and_grad(loss, has_aux=True)
        (value, aux), grads = jit_once(value_and_grad)(random_model(config, seed=6))
        return value, aux["loss_sums"], grads

    value, sums, grads = loss_and_grads("fused")
    for reference in ("chunked", "naive"):
        ref_value, ref_sums, ref_grads = loss_and_grads(reference)
        np.testing.assert_allclose(value, ref_value, rtol=1e-6)
        np.testing.assert_allclose(sums, ref_sums, rtol=1e-6)
        # Leaves: the static configs differ in `loss_impl`.
        assert tree_allclose(
            jax.tree.leaves(grads), jax.tree.leaves(ref_grads), rtol=1e-5, atol=1e-7
        ), reference
    # The shared matrix gets the head's gradient (not only the lookups').
    head = grads.trunk.embedding if tie_embeddings else grads.trunk.unembedding
    assert float(jnp.max(jnp.abs(head))) > 1e-3


@pytest.mark.parametrize("what", ["loss_mask", "segment_ids"])
def test_fully_masked_batch_has_finite_loss_and_zero_gradients(what):
    if what == "loss_mask":
        batch = dict(segment_ids=SEGMENT_IDS, loss_mask=np.zeros_like(ALL_TARGETS))
    else:  # every token is padding
        batch = dict(segment_ids=np.zeros_like(ONES), loss_mask=ALL_TARGETS)
    loss, aux, grads, pooled, _ = _run(_tokens(4), **batch)
    np.testing.assert_array_equal(aux["token_counts"], [0, 0, 0])
    assert loss == 0 and pooled == 0
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(g == 0)) for g in leaves)


def test_segment_ids_are_never_weights():
    tokens, loss_mask = _tokens(5), _loss_mask(5)
    one = _run(tokens, ONES, loss_mask)
    three = _run(tokens, 3 * ONES, loss_mask)
    assert bool(eqx.tree_equal(one, three))
    # Relabelling the documents of packed rows changes nothing either.
    relabel = np.array([0, 7, 2, 5], np.int32)
    packed = _run(tokens, SEGMENT_IDS, loss_mask)
    relabelled = _run(tokens, relabel[SEGMENT_IDS], loss_mask)
    assert bool(eqx.tree_equal(packed, relabelled))
    assert not np.isclose(packed[0], one[0])


# -- input checks -----------------------------------------------------------------

# The package's own checks, as users see them without the test suite's runtime type
# checker (which would reject some of these inputs first).
_unchecked_loss_sums = inspect.unwrap(eqx_mtp.mtp_loss_sums)


def _out_of_vocab(value):
    tokens = _tokens(6)
    tokens[1, 5] = value
    return tokens


@pytest.mark.parametrize("value", [-1, VOCAB, VOCAB + 100])
def test_token_outside_vocabulary_raises_naming_tokens(value):
    tokens = jnp.asarray(_out_of_vocab(value))
    message = rf"tokens: every id must lie in \[0, vocab_size={VOCAB}\)"
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        eqx_mtp.mtp_loss_sums(_model(NUM_DEPTHS), tokens)
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        eqx_mtp.mtp_loss(_model(NUM_DEPTHS), tokens)
    # Under jax.jit the same message comes back inside XLA's runtime error: a
    # JaxRuntimeError, or a ValueError from an already-compiled call under the strict
    # dtype promotion set in conftest.py (JAX's behaviour, not the package's).
    with pytest.raises((jax.errors.JaxRuntimeError, ValueError), match=message):
        jax.block_until_ready(_run(tokens))


def test_token_outside_vocabulary_raises_under_filter_jit():
    model = _model(0)
    loss_sums = eqx.filter_jit(eqx_mtp.mtp_loss_sums)
    sums, _ = loss_sums(model, jnp.asarray(_tokens(6)))
    assert np.isfinite(sums).all()
    with pytest.raises(eqx.EquinoxRuntimeError, match="tokens: every id"):
        jax.block_until_ready(loss_sums(model, jnp.asarray(_out_of_vocab(VOCAB))))


def _good_batch():
    return dict(
        segment_ids=jnp.asarray(SEGMENT_IDS),
        positions=jnp.zeros(SEGMENT_IDS.shape, jnp.int32),
        loss_mask=jnp.asarray(ALL_TARGETS),
    )


@pytest.mark.parametrize("name", ["segment_ids", "positions", "loss_mask"])
def test_mismatched_shapes_name_the_argument(name):
    batch = _good_batch()
    batch[name] = batch[name][:, :-1]
    with pytest.raises(ValueError, match=rf"^{name} must have the shape of tokens"):
        _unchecked_loss_sums(_model(NUM_DEPTHS), jnp.asarray(_tokens()), **batch)


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("tokens", jnp.asarray(_tokens(), jnp.float32), "integer"),
        ("segment_ids", jnp.asarray(SEGMENT_IDS, jnp.float32), "integer"),
        ("positions", jnp.zeros(SEGMENT_IDS.shape, jnp.float32), "integer"),
        ("loss_mask", jnp.ones(SEGMENT_IDS.shape, jnp.int32), "boolean"),
    ],
)
def test_wrong_dtypes_name_the_argument(name, value, expected):
    batch = dict(tokens=jnp.asarray(_tokens()), **_good_batch())
    batch[name] = value
    tokens = batch.pop("tokens")
    with pytest.raises(TypeError, match=rf"^{name} must be an? {expected} array"):
        _unchecked_loss_sums(_model(NUM_DEPTHS), tokens, **batch)


def test_one_dimensional_tokens_raise():
    with pytest.raises(ValueError, match=r"^tokens must have shape \[batch, seq\]"):
        _unchecked_loss_sums(_model(NUM_DEPTHS), jnp.asarray(_tokens()[0]))


def test_sequence_too_short_for_the_depths_raises():
    tokens = jnp.asarray(_tokens()[:, : NUM_DEPTHS + 1])
    message = rf"num_depths={NUM_DEPTHS} is too large for seq_len={NUM_DEPTHS + 1}"
    with pytest.raises(ValueError, match=message):
        eqx_mtp.mtp_loss(_model(NUM_DEPTHS), tokens)


def test_sequence_longer_than_max_seq_len_raises():
    tokens = jnp.zeros((1, MAX_SEQ_LEN + 1), jnp.int32)
    message = rf"^tokens: seq_len={MAX_SEQ_LEN + 1} exceeds .*max_seq_len={MAX_SEQ_LEN}"
    with pytest.raises(ValueError, match=message):
        eqx_mtp.mtp_loss(_model(NUM_DEPTHS), tokens)
