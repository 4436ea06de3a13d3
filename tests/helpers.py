"""Helpers shared by the tests."""

import equinox as eqx


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-6) -> bool:
    """Same structure and every array leaf close."""
    return bool(eqx.tree_equal(x, y, rtol=rtol, atol=atol))
