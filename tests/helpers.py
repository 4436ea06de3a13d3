"""Helpers shared by the tests."""

import equinox as eqx

import eqx_mtp


def tiny_config(**overrides) -> eqx_mtp.ModelConfig:
    """A model small enough to compile in seconds: vocabulary 19, dim 16, one layer,
    2 heads sharing 1 KV head, 2 depths, rows of at most 16 tokens."""
    values = dict(
        vocab_size=19,
        dim=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        mlp_dim=24,
        max_seq_len=16,
        num_depths=2,
    )
    values.update(overrides)
    return eqx_mtp.ModelConfig(**values)


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-6) -> bool:
    """Same structure and every array leaf close."""
    return bool(eqx.tree_equal(x, y, rtol=rtol, atol=atol))
