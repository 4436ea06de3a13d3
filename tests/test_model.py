import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import tiny_config

import eqx_mtp


def _config(**overrides):
    values = dict(num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32)
    return tiny_config(**{**values, **overrides})


def test_model_arrays_are_plain_leaves(getkey):
    model = eqx_mtp.MTPModel(_config(), key=getkey())
    arrays, static = eqx.partition(model, eqx.is_array)
    assert all(not eqx.is_array(x) for x in jax.tree.leaves(static))
    # every depth array carries the depth axis
    for leaf in jax.tree.leaves(eqx.filter(model.depths.depths, eqx.is_array)):
        assert leaf.shape[0] == 2


def test_fully_masked_batch_gives_finite_loss_and_zero_gradient(getkey):
    model = eqx_mtp.MTPModel(_config(), key=getkey())
    tokens = jax.random.randint(getkey(), (2, 12), 0, 19)
    mask = jnp.zeros(tokens.shape, bool)

    def loss_fn(m):
        return eqx_mtp.mtp_loss(m, tokens, loss_mask=mask)[0]

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    assert jnp.isfinite(loss)
    assert all(jnp.all(g == 0) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    "field,value",
    [
        ("dim", 0),
        ("num_heads", 3),
        ("num_kv_heads", 3),
        ("num_depths", -1),
        ("num_depths", 31),
        ("mtp_kind", "diagonal"),
        ("mtp_block", "conv"),
        ("remat", "some"),
        ("vocab_size", 0),
        ("rope_theta", -1.0),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _config(**{field: value})
