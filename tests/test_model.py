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


def test_rms_norm_of_bfloat16_input_rounds_once_from_float32():
    """`RMSNorm` computes in float32 whatever its input's dtype and rounds once to it.

    Catches the norm computing in bfloat16 (the input not upcast, the scale cast to
    the input's dtype): every intermediate then rounds to 8 bits of mantissa and the
    result lands one or more bfloat16 steps away from the correctly rounded value.
    """
    import ml_dtypes
    import numpy as np

    dim = 1024
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, dim)).astype(ml_dtypes.bfloat16)
    weight = (1 + 0.1 * rng.normal(size=dim)).astype(np.float32)
    norm = eqx.tree_at(lambda n: n.weight, eqx_mtp.nn.RMSNorm(dim), jnp.asarray(weight))
    got = np.asarray(norm(jnp.asarray(x))).astype(np.float64)

    # The same function in float64 from the same bfloat16 inputs, rounded once.
    x64 = x.astype(np.float64)
    exact = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + norm.eps)
    expected = (exact * weight).astype(ml_dtypes.bfloat16).astype(np.float64)
    # float32 arithmetic may straddle a rounding tie now and then, never more.
    assert np.mean(got == expected) > 0.99
    step = np.abs(expected) * 2.0**-7
    assert np.all(np.abs(got - expected) <= step)
