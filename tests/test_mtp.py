"""The scanned MTP forward against a loop over unstacked depths."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    SEGMENT_IDS,
    VOCAB,
    ToyLayer,
    ToyTrunk,
    packed_arrays,
    tiny_config,
    tree_allclose,
)
from reference import (
    jit_once,
    loop_depth_loss_sums,
    loop_mtp_loss_sums,
    random_like,
    random_model,
)

import eqx_mtp


def _config(**overrides):
    return tiny_config(
        **{"vocab_size": VOCAB, "num_heads": 4, "num_kv_heads": 2, **overrides}
    )


def _weights(n):
    # Distinct per-depth weights, so a mix-up between depths changes the gradient.
    return jnp.linspace(1.0, 0.3, n, dtype=jnp.float32)


def _nonzero_per_slice(leaf):
    leaf = np.asarray(leaf)
    return np.any(leaf.reshape(leaf.shape[0], -1) != 0, axis=1)


# Each combination is a fresh compile, so the list covers the options rather than
# their product: every option value appears with both MTP kinds (the linear block with
# the sequential kind only). Chunk sizes that do not divide the 24 tokens of a batch
# give ragged last chunks.
VARIANTS = [
    dict(mtp_kind="sequential", mtp_block="transformer", num_depths=3, remat="none"),
    dict(
        mtp_kind="sequential",
        mtp_block="mlp",
        shared_depth_layer=True,
        depth_final_norm=True,
        tie_embeddings=False,
        loss_impl="chunked",
        loss_chunk_size=7,
    ),
    dict(
        mtp_kind="sequential",
        mtp_block="linear",
        depth_final_norm=True,
        remat="full",
        loss_chunk_size=5,
    ),
    dict(
        mtp_kind="parallel",
        mtp_block="transformer",
        shared_depth_layer=True,
        tie_embeddings=False,
    ),
    dict(
        mtp_kind="parallel",
        mtp_block="mlp",
        depth_final_norm=True,
        remat="save_dots",
    ),
]


@pytest.mark.parametrize(
    "overrides", VARIANTS, ids=lambda o: "-".join(f"{v}" for v in o.values())
)
def test_scanned_depths_match_loop_over_unstacked_depths(overrides):
    config = _config(**overrides)
    model = random_model(config)
    tokens, loss_mask, positions = packed_arrays()
    weights = _weights(config.num_depths + 1)

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def scanned(m):
        sums, counts = eqx_mtp.mtp_loss_sums(
            m,
            jnp.asarray(tokens),
            segment_ids=jnp.asarray(SEGMENT_IDS),
            positions=jnp.asarray(positions),
            loss_mask=jnp.asarray(loss_mask),
        )
        return jnp.sum(weights * sums), (sums, counts)

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def looped(m):
        sums, counts = loop_mtp_loss_sums(m, tokens, SEGMENT_IDS, positions, loss_mask)
        return jnp.sum(weights * sums), (sums, counts)

    (_, (sums, counts)), grads = scanned(model)
    (_, (ref_sums, ref_counts)), ref_grads = looped(model)

    assert sums.shape == counts.shape == (config.num_depths + 1,)
    assert counts.dtype == jnp.int32
    np.testing.assert_array_equal(counts, ref_counts)
    assert np.all(np.asarray(ref_counts) > 0)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-5, atol=1e-5)
    assert tree_allclose(grads, ref_grads, rtol=1e-4, atol=1e-5)

    # The gradient reaches every trunk layer, the embedding and every depth.
    for leaf in jax.tree.leaves(eqx.filter(grads.trunk.blocks, eqx.is_array)):
        assert _nonzero_per_slice(leaf).all()
    assert jnp.any(grads.trunk.embedding != 0)
    depth_leaves = jax.tree.leaves(eqx.filter(grads.depths.depths, eqx.is_array))
    for leaf in depth_leaves:
        assert leaf.shape[0] == config.num_depths
        assert _nonzero_per_slice(leaf).all()
    shared_leaves = jax.tree.leaves(eqx.filter(grads.depths.shared_layer, eqx.is_array))
    assert bool(shared_leaves) == config.shared_depth_layer
    for leaf in shared_leaves:
        assert jnp.any(leaf != 0)
    if config.mtp_kind == "sequential":
        # eh_proj of every depth, in DeepSeek-V3's [dim, 2·dim] layout.
        assert grads.depths.depths.eh_proj.weight.shape == (
            config.num_depths,
            config.dim,
            2 * config.dim,
        )


# Plausible bugs: the convention ignored (the raw state fed either way), the norm
# applied to the carry but not to depth 1's input, or the trunk's final norm used for
# the carry where the depth has its own.
DEPTH_INPUTS = [
    ("sequential", "before_norm", "before_norm"),
    ("parallel", "before_norm", "before_norm"),
    ("sequential", "after_norm", "after_norm"),
    ("sequential", "after_norm", "before_norm"),
    ("parallel", "after_norm", "before_norm"),
]


@pytest.mark.parametrize(("kind", "trunk_input", "previous_input"), DEPTH_INPUTS)
def test_mtp_depth_losses_on_any_trunk(kind, trunk_input, previous_input):
    dim = 8

    def make(key):
        trunk_key, depths_key = jax.random.split(key)
        trunk = ToyTrunk(VOCAB, dim, key=trunk_key)
        depths = eqx_mtp.MTPDepths(
            3,
            dim,
            make_layer=lambda k: ToyLayer(dim, key=k),
            kind=kind,
            depth_final_norm=trunk_input == "after_norm",
            trunk_input=trunk_input,
            previous_input=previous_input,
            key=depths_key,
        )
        return trunk, depths

    trunk, depths = random_like(eqx.filter_eval_shape(make, jax.random.key(0)))
    tokens, loss_mask, positions = packed_arrays(seed=1)
    weights = _weights(3)

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def scanned(params):
        trunk, depths = params
        hidden = jax.vmap(trunk)(jnp.asarray(tokens))
        sums, counts = eqx_mtp.mtp_depth_losses(
            depths,
            hidden,
            jnp.asarray(tokens),
            embedding=trunk.embedding,
            unembedding=trunk.unembedding,
            final_norm=jax.vmap(jax.vmap(trunk.norm)),
            segment_ids=jnp.asarray(SEGMENT_IDS),
            positions=jnp.asarray(positions),
            loss_mask=jnp.asarray(loss_mask),
        )
        return jnp.sum(weights * sums), (sums, counts)

    @jit_once
    @eqx.filter_value_and_grad(has_aux=True)
    def looped(params):
        trunk, depths = params
        hidden = jax.vmap(trunk)(jnp.asarray(tokens))
        sums, counts = loop_depth_loss_sums(
            depths,
            hidden,
            tokens,
            embedding=trunk.embedding,
            unembedding=trunk.unembedding,
            final_norm=jax.vmap(trunk.norm),
            segment_ids=SEGMENT_IDS,
            positions=positions,
            loss_mask=loss_mask,
        )
        return jnp.sum(weights * sums), (sums, counts)

    (_, (sums, counts)), grads = scanned((trunk, depths))
    (_, (ref_sums, ref_counts)), ref_grads = looped((trunk, depths))
    assert sums.shape == (3,)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-5, atol=1e-5)
    assert tree_allclose(grads, ref_grads, rtol=1e-4, atol=1e-5)
    trunk_grads, depth_grads = grads
    for leaf in jax.tree.leaves(eqx.filter(trunk_grads, eqx.is_array)):
        assert jnp.any(leaf != 0)
    for leaf in jax.tree.leaves(eqx.filter(depth_grads.depths, eqx.is_array)):
        assert _nonzero_per_slice(leaf).all()
