"""The records of the loss path: `PackedBatch` (a batch checked and its documents
numbered once), the objective's coefficients, and `train_step` taking every option of
`mtp_loss` (depth weights, a dropout key).

References: `reference.py`'s NumPy document numbering and positions and its Python-loop
MTP loss, with the weighted reduction written out here."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import DropoutLayer, tiny_config, tree_allclose
from reference import (
    documents_reference,
    loop_mtp_loss_sums,
    random_model,
    segment_positions_reference,
    targets_reference,
)

import eqx_mtp
from eqx_mtp._objective import Objective

SEGMENT_IDS = np.array(
    [[1, 1, 1, 2, 2, 1, 1, 0, 3, 3, 3, 3], [4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 0, 0]],
    np.int32,
)


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 19, SEGMENT_IDS.shape), jnp.int32)
    loss_mask = jnp.asarray(rng.random(SEGMENT_IDS.shape) < 0.8)
    return tokens, jnp.asarray(SEGMENT_IDS), loss_mask


# -- PackedBatch -----------------------------------------------------------------------


def test_packed_batch_numbers_documents_and_derives_positions():
    tokens, segment_ids, loss_mask = _arrays()
    batch = eqx_mtp.PackedBatch.of(tokens, segment_ids=segment_ids, loss_mask=loss_mask)
    np.testing.assert_array_equal(batch.documents, documents_reference(SEGMENT_IDS))
    np.testing.assert_array_equal(
        batch.positions, segment_positions_reference(SEGMENT_IDS)
    )
    np.testing.assert_array_equal(batch.tokens, tokens)
    np.testing.assert_array_equal(batch.loss_mask, loss_mask)
    # Absent segment ids: one document per row, positions 0 … seq - 1.
    plain = eqx_mtp.PackedBatch.of(tokens)
    np.testing.assert_array_equal(plain.documents, np.ones(SEGMENT_IDS.shape))
    np.testing.assert_array_equal(
        plain.positions, np.broadcast_to(np.arange(12), SEGMENT_IDS.shape)
    )
    assert plain.loss_mask is None
    # Given positions are kept.
    positions = jnp.zeros_like(tokens)
    given = eqx_mtp.PackedBatch.of(tokens, positions=positions)
    np.testing.assert_array_equal(given.positions, positions)


def test_packed_batch_targets_are_those_of_the_rule():
    tokens, segment_ids, loss_mask = _arrays()
    batch = eqx_mtp.PackedBatch.of(tokens, segment_ids=segment_ids, loss_mask=loss_mask)
    for depth in range(3):
        targets, valid = batch.targets(depth)
        expected_targets, expected_valid = targets_reference(
            np.asarray(tokens), SEGMENT_IDS, np.asarray(loss_mask), depth
        )
        np.testing.assert_array_equal(valid, expected_valid)
        np.testing.assert_array_equal(targets, expected_targets)
    counts = batch.valid_token_counts(2)
    expected = [
        targets_reference(np.asarray(tokens), SEGMENT_IDS, np.asarray(loss_mask), k)[
            1
        ].sum()
        for k in range(3)
    ]
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("tokens", lambda a: a[0], r"^tokens must have shape \[batch, seq\]"),
        ("tokens", lambda a: a.astype(jnp.float32), r"^tokens must be an integer"),
        ("segment_ids", lambda a: a[:, :-1], r"^segment_ids must have the shape of"),
        ("segment_ids", lambda a: a.at[0, 0].set(-1), r"^segment_ids must hold ids"),
        ("positions", lambda a: a.astype(jnp.float32), r"^positions must be an int"),
        ("loss_mask", lambda a: a.astype(jnp.int32), r"^loss_mask must be a boolean"),
    ],
)
def test_packed_batch_of_names_the_bad_argument(name, bad, message):
    tokens, segment_ids, loss_mask = _arrays()
    arrays = dict(
        tokens=tokens,
        segment_ids=segment_ids,
        positions=eqx_mtp.segment_positions(segment_ids),
        loss_mask=loss_mask,
    )
    arrays[name] = bad(arrays[name])
    # The package's message, or the suite's runtime type checker's where the
    # annotation rules the input out, which must blame the same argument.
    with pytest.raises((TypeError, ValueError), match=rf"{message}|parameter '{name}'"):
        eqx_mtp.PackedBatch.of(arrays.pop("tokens"), **arrays)


def test_packed_batch_under_vmap_and_jit():
    """Built under `jax.vmap` over micro-batches and passed through `jax.jit`."""
    tokens, segment_ids, loss_mask = _arrays()
    stacked = jax.vmap(
        lambda t, s: eqx_mtp.PackedBatch.of(t[None], segment_ids=s[None])
    )(tokens, segment_ids)
    assert stacked.documents.shape == (2, 1, 12)
    np.testing.assert_array_equal(
        stacked.documents[:, 0], documents_reference(SEGMENT_IDS)
    )
    batch = eqx_mtp.PackedBatch.of(tokens, segment_ids=segment_ids)
    counts = jax.jit(lambda b: b.valid_token_counts(2))(batch)
    np.testing.assert_array_equal(counts, batch.valid_token_counts(2))


def test_a_packed_batch_stands_for_the_arrays_everywhere():
    """Every entry point of the loss path takes a `PackedBatch` in place of `tokens`
    and gives the reference's numbers (or the arrays' own, where those are checked
    against a reference elsewhere)."""
    tokens, segment_ids, loss_mask = _arrays()
    model = random_model(tiny_config())
    batch = eqx_mtp.PackedBatch.of(tokens, segment_ids=segment_ids, loss_mask=loss_mask)
    arrays = dict(segment_ids=segment_ids, loss_mask=loss_mask)

    sums, counts = eqx_mtp.mtp_loss_sums(model, batch)
    ref_sums, ref_counts = loop_mtp_loss_sums(
        model, np.asarray(tokens), SEGMENT_IDS, None, np.asarray(loss_mask)
    )
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-5)
    np.testing.assert_array_equal(counts, ref_counts)
    loss, _ = eqx_mtp.mtp_loss(model, batch, mtp_weight=0.3)
    expected, _ = eqx_mtp.mtp_loss(model, tokens, mtp_weight=0.3, **arrays)
    assert loss == expected

    np.testing.assert_array_equal(eqx_mtp.valid_token_counts(batch, 2), ref_counts)
    for got, want in zip(
        eqx_mtp.depth_targets(batch, 1),
        eqx_mtp.depth_targets(tokens, 1, **arrays),
    ):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        eqx_mtp.segment_positions(batch), segment_positions_reference(SEGMENT_IDS)
    )

    trunk = model.trunk
    hidden = jax.vmap(lambda t, p, s: trunk(t, positions=p, segment_ids=s))(
        tokens, batch.positions, segment_ids
    )
    head = dict(
        embedding=trunk.embedding,
        unembedding=trunk.unembedding_matrix,
        final_norm=trunk.final_norm,
    )
    from_hidden = eqx_mtp.mtp_loss_sums_from_hidden(
        hidden, batch, depths=model.depths, **head
    )
    np.testing.assert_allclose(from_hidden[0], ref_sums, rtol=1e-5)
    depth_sums = eqx_mtp.mtp_depth_losses(model.depths, hidden, batch, **head)
    np.testing.assert_allclose(depth_sums[0], ref_sums[1:], rtol=1e-5)
    scanned = eqx_mtp.scan_depths(
        model.depths,
        hidden,
        batch,
        embedding=trunk.embedding,
        final_norm=trunk.final_norm,
        readout=lambda k, normed: normed,
    )
    expected = eqx_mtp.scan_depths(
        model.depths,
        hidden,
        tokens,
        embedding=trunk.embedding,
        final_norm=trunk.final_norm,
        readout=lambda k, normed: normed,
        segment_ids=segment_ids,
    )
    np.testing.assert_array_equal(scanned, expected)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, b, h: eqx_mtp.mtp_loss(m, b, segment_ids=b.documents),
        lambda m, b, h: eqx_mtp.mtp_loss_sums(m, b, loss_mask=b.documents > 0),
        lambda m, b, h: eqx_mtp.valid_token_counts(b, 2, segment_ids=b.documents),
        lambda m, b, h: eqx_mtp.depth_targets(b, 1, loss_mask=b.documents > 0),
        lambda m, b, h: eqx_mtp.mtp_depth_losses(
            m.depths,
            h,
            b,
            embedding=m.trunk.embedding,
            unembedding=m.trunk.embedding,
            final_norm=m.trunk.final_norm,
            positions=b.positions,
        ),
    ],
)
def test_a_packed_batch_with_its_arrays_again_is_an_error(call):
    tokens, segment_ids, _ = _arrays()
    model = random_model(tiny_config())
    batch = eqx_mtp.PackedBatch.of(tokens, segment_ids=segment_ids)
    hidden = jnp.zeros(tokens.shape + (16,), jnp.float32)
    with pytest.raises(
        ValueError, match=r"(segment_ids|loss_mask|positions) must not be given with"
    ):
        call(model, batch, hidden)


def test_documents_are_numbered_and_segment_ids_checked_once(monkeypatch):
    """One `mtp_loss` call numbers the documents of its batch once and checks its
    segment ids once (the trunk numbers its own row again: it is a module of one
    row, called by users too)."""
    import eqx_mtp._batch as batch_module

    calls = dict(number=0, check=0)
    number, check = batch_module.number_documents, batch_module.check_segment_ids

    def counting_number(*args):
        calls["number"] += 1
        return number(*args)

    def counting_check(*args):
        calls["check"] += 1
        return check(*args)

    monkeypatch.setattr(batch_module, "number_documents", counting_number)
    monkeypatch.setattr(batch_module, "check_segment_ids", counting_check)
    tokens, segment_ids, loss_mask = _arrays()
    model = random_model(tiny_config())
    eqx_mtp.mtp_loss(model, tokens, segment_ids=segment_ids, loss_mask=loss_mask)
    assert calls == dict(number=1, check=1)


# -- the objective ---------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "pooled"])
def test_objective_coefficients_are_the_written_out_derivatives(reduction):
    counts = jnp.asarray([10, 7, 0], jnp.int32)
    weights = np.array([1.0, 0.25])
    objective = Objective(0.3, reduction, weights)
    got = objective.coefficients(counts)
    n = np.maximum(np.asarray(counts), 1)
    if reduction == "mean":
        expected = [1 / n[0], *(0.3 * weights / n[1:] / weights.sum())]
    else:
        pooled = (weights * np.asarray(counts[1:])).sum()
        expected = [1 / n[0], *(0.3 * weights / pooled)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    sums = jnp.asarray([20.0, 14.0, 3.0])
    loss, _ = objective.reduce(sums, counts)
    np.testing.assert_allclose(loss, np.dot(expected, sums), rtol=1e-6)


# -- train_step takes every option of mtp_loss -----------------------------------------


def _recording_optimizer():
    """Leaves the model as it is and keeps the last gradients as its state."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (
            jax.tree.map(jnp.zeros_like, grads),
            grads,
        ),
    )


def _copy(tree):
    """`train_step` donates the model and the optimizer state: each call gets its
    own copy."""
    return jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, tree)


def _micro_batches(tokens, segment_ids, loss_mask):
    return dict(
        tokens=tokens.reshape(2, 1, 12),
        segment_ids=segment_ids.reshape(2, 1, 12),
        loss_mask=loss_mask.reshape(2, 1, 12),
    )


def test_train_step_with_depth_weights_equals_the_reference_loss():
    """`train_step(..., depth_weights=w)`: loss and gradients of the Python-loop MTP
    loss reduced with the weighted mean written out here."""
    tokens, segment_ids, loss_mask = _arrays(1)
    model = random_model(tiny_config(num_depths=2))
    weights = np.array([1.0, 0.5], np.float32)
    mtp_weight = 0.3

    def reference_loss(m):
        sums, counts = loop_mtp_loss_sums(
            m, np.asarray(tokens), SEGMENT_IDS, None, np.asarray(loss_mask)
        )
        means = sums / np.maximum(counts, 1).astype(np.float32)
        return means[0] + mtp_weight * jnp.sum(weights * means[1:]) / weights.sum()

    expected_loss, expected_grads = eqx.filter_jit(
        eqx.filter_value_and_grad(reference_loss)
    )(model)
    optimizer = _recording_optimizer()
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    _, grads, metrics = eqx_mtp.train.train_step(
        optimizer,
        _copy(model),
        opt_state,
        _micro_batches(tokens, segment_ids, loss_mask),
        mtp_weight,
        depth_weights=weights,
    )
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-6)
    assert tree_allclose(
        jax.tree.leaves(grads),
        jax.tree.leaves(eqx.filter(expected_grads, eqx.is_array)),
        rtol=1e-5,
        atol=1e-7,
    )
    # Unequal weights matter: the unweighted step differs.
    _, unweighted, _ = eqx_mtp.train.train_step(
        optimizer,
        _copy(model),
        optimizer.init(eqx.filter(model, eqx.is_array)),
        _micro_batches(tokens, segment_ids, loss_mask),
        mtp_weight,
    )
    assert not tree_allclose(unweighted, grads, rtol=1e-5, atol=1e-7)


def test_train_step_key_drives_dropout_reproducibly(getkey):
    """A key reaches the depths' dropout through `train_step` (one key per
    micro-batch): the same key gives the same step, another key or none another."""
    tokens, segment_ids, loss_mask = _arrays(2)
    model = random_model(tiny_config(num_depths=2))
    config = model.config
    depths = eqx_mtp.MTPDepths(
        config.num_depths,
        config.dim,
        make_layer=lambda k: DropoutLayer(config.dim, key=k),
        key=jax.random.key(1),
    )
    model = eqx.tree_at(lambda m: m.depths, model, depths)
    optimizer = _recording_optimizer()
    batch = _micro_batches(tokens, segment_ids, loss_mask)

    def step(key):
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        _, grads, metrics = eqx_mtp.train.train_step(
            optimizer, _copy(model), opt_state, batch, 0.3, key=key
        )
        return grads, metrics["loss_sums"]

    key, other = getkey(), getkey()
    grads, sums = step(key)
    again_grads, again_sums = step(key)
    assert eqx.tree_equal(again_grads, grads)
    np.testing.assert_array_equal(again_sums, sums)
    other_grads, other_sums = step(other)
    none_grads, none_sums = step(None)
    np.testing.assert_array_equal(other_sums[0], sums[0])  # the trunk has no dropout
    assert np.all(other_sums[1:] != sums[1:])
    assert np.all(none_sums[1:] != sums[1:])
    # Without a key the depths run deterministically: the reference's sums.
    ref_sums, _ = loop_mtp_loss_sums(
        model, np.asarray(tokens), SEGMENT_IDS, None, np.asarray(loss_mask)
    )
    np.testing.assert_allclose(none_sums, ref_sums, rtol=1e-5)
