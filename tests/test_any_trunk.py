"""MTP on any trunk in one call: `mtp_loss_sums_from_hidden`
is what `mtp_loss_sums` runs on our trunk, equals an independent Python-loop reference
on a foreign Equinox transformer, gives the plain next-token sums without depths, and
takes a per-vector `final_norm` (`eqx.nn.RMSNorm`, `eqx.nn.LayerNorm`) as the batched
norm `jax.vmap(jax.vmap(norm))`."""

import functools
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SEGMENT_IDS, VOCAB, packed_arrays, tiny_config, tree_allclose
from reference import (
    jit_once,
    loop_depth_loss_sums,
    loop_head_loss_sum,
    random_like,
    random_model,
)

import eqx_mtp

DIM, NUM_HEADS = 16, 2


class Block(eqx.Module):
    """A user's transformer block, built from Equinox's own layers: attention within
    a document (causal, by segment id), then an MLP, each behind an `eqx.nn.RMSNorm`.
    Called as an MTP depth block is: `block(x [seq, dim], *, positions,
    segment_ids)`."""

    attention_norm: eqx.nn.RMSNorm
    attention: eqx.nn.MultiheadAttention
    mlp_norm: eqx.nn.RMSNorm
    mlp: eqx.nn.MLP

    def __init__(self, dim, num_heads, *, key):
        attention_key, mlp_key = jax.random.split(key)
        self.attention_norm = eqx.nn.RMSNorm(dim)
        self.attention = eqx.nn.MultiheadAttention(num_heads, dim, key=attention_key)
        self.mlp_norm = eqx.nn.RMSNorm(dim)
        self.mlp = eqx.nn.MLP(dim, dim, 2 * dim, depth=1, key=mlp_key)

    def __call__(self, x, *, positions, segment_ids):
        index = jnp.arange(x.shape[0])
        mask = (segment_ids[:, None] == segment_ids[None, :]) & (
            index[:, None] >= index[None, :]
        )
        h = jax.vmap(self.attention_norm)(x)
        x = x + self.attention(h, h, h, mask=mask)
        return x + jax.vmap(self.mlp)(jax.vmap(self.mlp_norm)(x))


class Trunk(eqx.Module):
    """A foreign trunk: token and learned position embeddings, one `Block`, a
    per-vector `eqx.nn.RMSNorm` as its final norm, an untied unembedding."""

    embedding: jax.Array
    position_embedding: jax.Array
    block: Block
    final_norm: eqx.nn.RMSNorm
    unembedding: jax.Array

    def __init__(self, vocab, dim, num_heads, *, key):
        keys = jax.random.split(key, 4)
        self.embedding = jax.random.normal(keys[0], (vocab, dim))
        self.position_embedding = jax.random.normal(
            keys[1], (SEGMENT_IDS.shape[1], dim)
        )
        self.block = Block(dim, num_heads, key=keys[2])
        self.final_norm = eqx.nn.RMSNorm(dim)
        self.unembedding = jax.random.normal(keys[3], (vocab, dim))

    def __call__(self, tokens, *, positions, segment_ids):
        """`h⁰` of one row, before the final norm."""
        x = self.embedding[tokens] + self.position_embedding[positions]
        return self.block(x, positions=positions, segment_ids=segment_ids)


def _foreign(kind, num_depths=2):
    """A foreign trunk and `num_depths` depths of its own `Block`, random weights."""

    def make(key):
        trunk_key, depths_key = jax.random.split(key)
        trunk = Trunk(VOCAB, DIM, NUM_HEADS, key=trunk_key)
        depths = eqx_mtp.MTPDepths(
            num_depths,
            DIM,
            make_layer=lambda k: Block(DIM, NUM_HEADS, key=k),
            kind=kind,
            key=depths_key,
        )
        return trunk, depths

    return random_like(eqx.filter_eval_shape(make, jax.random.key(0)), seed=3)


def _hidden(trunk, tokens, positions):
    return jax.vmap(lambda t, p, s: trunk(t, positions=p, segment_ids=s))(
        jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(SEGMENT_IDS)
    )


def _weights(n):
    # Distinct per-depth weights, so a mix-up between depths changes the gradient.
    return jnp.linspace(1.0, 0.3, n, dtype=jnp.float32)


# -- the one call is mtp_loss_sums' code path ------------------------------------------


def test_equals_mtp_loss_sums_on_our_trunk():
    """On our trunk's output the one call gives `mtp_loss_sums`' sums, counts and
    gradients bit for bit: the same code path, with the same defaults. Catches an
    `mtp_loss_sums` that rebuilds the objective apart (or passes the call another
    loss mask, chunk size, implementation or final norm) and drifts from it. The
    knobs are not the defaults, so that one not passed on shows."""
    config = tiny_config(
        vocab_size=VOCAB,
        num_heads=4,
        num_kv_heads=2,
        tie_embeddings=False,
        loss_impl="chunked",
        loss_chunk_size=5,
    )
    model = random_model(config)
    tokens, loss_mask, _ = packed_arrays(positions="documents")
    batch = dict(segment_ids=jnp.asarray(SEGMENT_IDS), loss_mask=jnp.asarray(loss_mask))
    weights = _weights(config.num_depths + 1)

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def ours(m):
        sums, counts = eqx_mtp.mtp_loss_sums(m, jnp.asarray(tokens), **batch)
        return jnp.sum(weights * sums), (sums, counts)

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def one_call(m):
        trunk = m.trunk
        positions = eqx_mtp.segment_positions(batch["segment_ids"])
        hidden = jax.vmap(lambda t, p, s: trunk(t, positions=p, segment_ids=s))(
            jnp.asarray(tokens), positions, batch["segment_ids"]
        )
        sums, counts = eqx_mtp.mtp_loss_sums_from_hidden(
            hidden,
            jnp.asarray(tokens),
            embedding=trunk.embedding,
            unembedding=trunk.unembedding_matrix,
            final_norm=trunk.final_norm,
            depths=m.depths,
            loss_chunk_size=config.loss_chunk_size,
            loss_impl=config.loss_impl,
            **batch,
        )
        return jnp.sum(weights * sums), (sums, counts)

    (_, (sums, counts)), grads = ours(model)
    (_, (got_sums, got_counts)), got_grads = one_call(model)
    assert got_sums.shape == got_counts.shape == (config.num_depths + 1,)
    np.testing.assert_array_equal(got_counts, counts)
    np.testing.assert_array_equal(got_sums, sums)
    assert eqx.tree_equal(got_grads, grads)
    assert np.all(np.asarray(counts) > 0)


# -- a foreign trunk against the independent reference ---------------------------------


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_equals_loop_reference_on_a_foreign_trunk(kind):
    """A user's own Equinox transformer (`eqx.nn.MultiheadAttention`,
    `eqx.nn.RMSNorm` as its per-vector final norm, passed as it is) with two depths
    of its own block: sums, counts and gradients against a Python loop over the
    unstacked depths with a naive full-logits cross-entropy. Catches a main head
    that predicts the wrong token or ignores the mask or the documents, a wrong
    depth recurrence, and a final norm left out or applied on the wrong axis."""
    params = _foreign(kind)
    tokens, loss_mask, positions = packed_arrays(1, positions="documents")
    weights = _weights(3)

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def one_call(params):
        trunk, depths = params
        hidden = _hidden(trunk, tokens, positions)
        sums, counts = eqx_mtp.mtp_loss_sums_from_hidden(
            hidden,
            jnp.asarray(tokens),
            embedding=trunk.embedding,
            unembedding=trunk.unembedding,
            final_norm=trunk.final_norm,
            depths=depths,
            segment_ids=jnp.asarray(SEGMENT_IDS),
            positions=jnp.asarray(positions),
            loss_mask=jnp.asarray(loss_mask),
            loss_chunk_size=7,
        )
        return jnp.sum(weights * sums), (sums, counts)

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def looped(params):
        trunk, depths = params
        hidden = _hidden(trunk, tokens, positions)
        row_norm = jax.vmap(trunk.final_norm)
        main_sum, main_count = loop_head_loss_sum(
            hidden,
            tokens,
            unembedding=trunk.unembedding,
            final_norm=row_norm,
            segment_ids=SEGMENT_IDS,
            loss_mask=loss_mask,
        )
        depth_sums, depth_counts = loop_depth_loss_sums(
            depths,
            hidden,
            tokens,
            embedding=trunk.embedding,
            unembedding=trunk.unembedding,
            final_norm=row_norm,
            segment_ids=SEGMENT_IDS,
            positions=positions,
            loss_mask=loss_mask,
        )
        sums = jnp.concatenate([main_sum[None], depth_sums])
        counts = np.concatenate([[main_count], depth_counts])
        return jnp.sum(weights * sums), (sums, counts)

    (_, (sums, counts)), grads = one_call(params)
    (_, (ref_sums, ref_counts)), ref_grads = looped(params)
    assert sums.shape == counts.shape == (3,)
    assert counts.dtype == jnp.int32
    np.testing.assert_array_equal(counts, ref_counts)
    assert np.all(ref_counts > 0)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-5, atol=1e-5)
    assert tree_allclose(grads, ref_grads, rtol=1e-4, atol=1e-5)
    # Not vacuous: the gradient reaches the trunk's final norm and every depth.
    trunk_grads, depth_grads = grads
    assert np.any(np.asarray(trunk_grads.final_norm.weight) != 0)
    for leaf in jax.tree.leaves(eqx.filter(depth_grads.depths, eqx.is_array)):
        leaf = np.asarray(leaf)
        assert np.any(leaf.reshape(leaf.shape[0], -1) != 0, axis=1).all()


def test_without_depths_gives_the_next_token_sums():
    """`depths=None` (D = 0) gives `[1]` arrays: the next-token sum and count of the
    reference, and the same numbers as index 0 of the call with depths. Catches a
    plain objective that is not returned (or not as a `[1]` array), or that a depth
    changes."""
    tokens, loss_mask, positions = packed_arrays(2, positions="documents")

    @jit_once
    def run(params):
        trunk, depths = params
        hidden = _hidden(trunk, tokens, positions)
        arguments = dict(
            embedding=trunk.embedding,
            unembedding=trunk.unembedding,
            final_norm=trunk.final_norm,
            segment_ids=jnp.asarray(SEGMENT_IDS),
            loss_mask=jnp.asarray(loss_mask),
        )
        plain = eqx_mtp.mtp_loss_sums_from_hidden(
            hidden, jnp.asarray(tokens), **arguments
        )
        with_depths = eqx_mtp.mtp_loss_sums_from_hidden(
            hidden, jnp.asarray(tokens), depths=depths, **arguments
        )
        reference = loop_head_loss_sum(
            hidden,
            tokens,
            unembedding=trunk.unembedding,
            final_norm=jax.vmap(trunk.final_norm),
            segment_ids=SEGMENT_IDS,
            loss_mask=loss_mask,
        )
        return plain, with_depths, reference

    (sums, counts), (depth_sums, depth_counts), (ref_sum, ref_count) = run(
        _foreign("sequential")
    )
    assert sums.shape == counts.shape == (1,)
    assert int(counts[0]) == ref_count > 0
    np.testing.assert_allclose(sums[0], ref_sum, rtol=1e-5)
    assert depth_sums.shape == (3,)
    np.testing.assert_array_equal(depth_counts[:1], counts)
    np.testing.assert_allclose(depth_sums[:1], sums, rtol=1e-6)


# -- a per-vector final norm -----------------------------------------------------------


def _rms_without_axis(v):
    """A per-vector RMS norm written without an axis: over a whole `[batch, seq,
    dim]` array it would normalise the batch as one, so it must be taken per
    vector."""
    return v * jax.lax.rsqrt(jnp.mean(v * v) + 1e-6)


def _with_random_affine(norm):
    """`norm` with a non-trivial scale (and shift), so that a norm left out, or its
    parameters misplaced, changes the result."""
    rng = np.random.default_rng(4)
    for name in ("weight", "bias"):
        if getattr(norm, name, None) is not None:
            values = 1.0 + 0.3 * rng.standard_normal(DIM)
            norm = eqx.tree_at(
                lambda n: getattr(n, name), norm, jnp.asarray(values, jnp.float32)
            )
    return norm


NORMS = {
    "eqx.nn.RMSNorm": lambda: _with_random_affine(eqx.nn.RMSNorm(DIM)),
    "eqx.nn.LayerNorm": lambda: _with_random_affine(eqx.nn.LayerNorm(DIM)),
    "rms-without-axis": lambda: _rms_without_axis,
}


@functools.cache
def _norm_inputs():
    """Hidden states, tables and two sequential depths of a small `LinearBlock`: the
    depths have no final norm of their own, so every depth reads `final_norm`."""
    rng = np.random.default_rng(5)
    tokens, loss_mask, positions = packed_arrays(5, positions="documents")

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    depths = eqx_mtp.MTPDepths(
        2,
        DIM,
        make_layer=lambda key: eqx_mtp.nn.LinearBlock(DIM, key=key),
        key=jax.random.key(5),
    )
    return dict(
        hidden=3.0 * normal(*SEGMENT_IDS.shape, DIM),
        tokens=jnp.asarray(tokens),
        embedding=normal(VOCAB, DIM),
        unembedding=normal(VOCAB, DIM),
        depths=depths,
        segment_ids=jnp.asarray(SEGMENT_IDS),
        positions=jnp.asarray(positions),
        loss_mask=jnp.asarray(loss_mask),
    )


def _with_each_function(final_norm):
    """What each public function that takes `final_norm` returns with it, in one
    program."""

    def run(inputs):
        inputs = dict(inputs)
        hidden, tokens, depths = (inputs.pop(k) for k in ("hidden", "tokens", "depths"))
        unembedding, loss_mask = inputs.pop("unembedding"), inputs.pop("loss_mask")
        losses = dict(unembedding=unembedding, loss_mask=loss_mask)
        common = dict(final_norm=final_norm, **inputs)
        return {
            "mtp_loss_sums_from_hidden": eqx_mtp.mtp_loss_sums_from_hidden(
                hidden, tokens, depths=depths, **common, **losses
            ),
            "mtp_depth_losses": eqx_mtp.mtp_depth_losses(
                depths, hidden, tokens, **common, **losses
            ),
            "scan_depths": eqx_mtp.scan_depths(
                depths, hidden, tokens, readout=lambda k, normed: normed, **common
            ),
        }

    return jit_once(run)(_norm_inputs())


@pytest.mark.parametrize("norm", list(NORMS))
def test_per_vector_final_norm_gives_the_batched_norms_result(norm):
    """A per-vector norm passed as it is gives, in every function that takes
    `final_norm`, exactly what `jax.vmap(jax.vmap(norm))` passed explicitly gives,
    and not what no norm gives. Catches a per-vector norm that is refused, applied
    to the whole batch at once (the norm without an axis), or left out."""
    norm = NORMS[norm]()
    got = _with_each_function(norm)
    expected = _with_each_function(jax.vmap(jax.vmap(norm)))
    unnormed = _with_each_function(lambda x: x)
    for name in got:
        assert eqx.tree_equal(got[name], expected[name]), name
        assert not tree_allclose(got[name], unnormed[name]), name


# -- bad inputs ------------------------------------------------------------------------


@functools.cache
def _arguments():
    trunk, depths = _foreign("sequential")
    tokens, loss_mask, positions = packed_arrays(positions="documents")
    return dict(
        hidden=_hidden(trunk, tokens, positions),
        tokens=jnp.asarray(tokens),
        embedding=trunk.embedding,
        unembedding=trunk.unembedding,
        final_norm=trunk.final_norm,
        depths=depths,
        segment_ids=jnp.asarray(SEGMENT_IDS),
        loss_mask=jnp.asarray(loss_mask),
    )


BAD = {
    "depths": (lambda a: a["depths"].depths, TypeError, "must be an eqx_mtp.MTPDepths"),
    "unembedding": (lambda a: a["unembedding"][:-1], ValueError, "vocab = 19"),
    "final_norm": (
        lambda a: eqx.nn.RMSNorm(DIM + 1),
        ValueError,
        r"per-vector norm.*on a \[16\] array it failed.*on a \[2, 3, 16\] array",
    ),
    "loss_mask": (lambda a: a["loss_mask"].astype(jnp.int32), TypeError, "boolean"),
    "loss_chunk_size": (lambda a: 0, ValueError, "positive integer"),
    "loss_impl": (lambda a: "dense", ValueError, "must be one of"),
    # 2 rows cannot be split over a data axis of 4.
    "mesh": (
        lambda a: eqx_mtp.make_mesh(4, 2, 1),
        ValueError,
        "2 rows cannot be split",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_an_error_naming_the_function_and_argument(name):
    """Each bad argument fails before anything runs, with a message that starts with
    the function's name and names the argument (the mesh's names the batch that
    does not fit it) and says what was wrong. tests/test_input_checks.py tries the
    array arguments' cases of every function, this one among them."""
    arguments = dict(_arguments())
    change, error, says = BAD[name]
    arguments[name] = change(arguments)
    blamed = "tokens" if name == "mesh" else name
    with pytest.raises(error, match=rf"^mtp_loss_sums_from_hidden: {blamed}\b.*{says}"):
        fn = inspect.unwrap(eqx_mtp.mtp_loss_sums_from_hidden)
        fn(arguments.pop("hidden"), arguments.pop("tokens"), **arguments)


# -- over a mesh -----------------------------------------------------------------------


def test_on_a_mesh_equals_one_device():
    """On a (2, 2, 2) mesh (rows, vocabulary and sequence split) the one call on a
    foreign trunk gives the single-device sums, counts and gradients. Catches a
    sharded path that drops a target at a context-shard boundary or reduces a sum
    over too few axes."""
    params = _foreign("sequential")
    tokens, loss_mask, positions = packed_arrays(6, positions="documents")
    tokens = np.concatenate([tokens, tokens[::-1]])  # 4 rows: 2 per data shard
    loss_mask = np.concatenate([loss_mask, loss_mask[::-1]])
    segment_ids = np.concatenate([SEGMENT_IDS, SEGMENT_IDS[::-1]])
    positions = np.asarray(eqx_mtp.segment_positions(jnp.asarray(segment_ids)))

    def objective(mesh):
        @eqx.filter_value_and_grad(has_aux=True)
        def loss(params, tokens, segment_ids, loss_mask, positions):
            trunk, depths = params
            hidden = jax.vmap(lambda t, p, s: trunk(t, positions=p, segment_ids=s))(
                tokens, positions, segment_ids
            )
            sums, counts = eqx_mtp.mtp_loss_sums_from_hidden(
                hidden,
                tokens,
                embedding=trunk.embedding,
                unembedding=trunk.unembedding,
                final_norm=trunk.final_norm,
                depths=depths,
                segment_ids=segment_ids,
                positions=positions,
                loss_mask=loss_mask,
                loss_chunk_size=5,
                mesh=mesh,
            )
            return jnp.sum(_weights(3) * sums), (sums, counts)

        inputs = tuple(
            jnp.asarray(x) for x in (tokens, segment_ids, loss_mask, positions)
        )
        if mesh is not None:
            inputs = jax.device_put(inputs, eqx_mtp.batch_sharding(mesh))
        return jit_once(lambda tree: loss(*tree))((params, *inputs))

    (_, (sums, counts)), grads = objective(eqx_mtp.make_mesh(2, 2, 2))
    (_, (ref_sums, ref_counts)), ref_grads = objective(None)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-5)
    # Float noise of a different summation order is ~1e-6 on gradients of ~10.
    assert tree_allclose(grads, ref_grads, rtol=1e-4, atol=1e-5)
