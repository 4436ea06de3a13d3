"""The dtype policy: float32 parameters, a compute dtype for the trunk and the depths,
float32 norms, logits, losses and reductions."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ._transformer import RMSNorm

# Norms keep float32 scales: a learned scale near 1 moves by less than bfloat16's
# spacing there (2⁻⁷), so a bfloat16 copy would round every update away.
_NORMS = (RMSNorm, eqx.nn.RMSNorm, eqx.nn.LayerNorm)


def _is_norm(node) -> bool:
    return isinstance(node, _NORMS)


def in_compute_dtype(tree, dtype):
    """`tree` with every floating-point array leaf cast to `dtype`, except those of
    norms ([`eqx_mtp.nn.RMSNorm`][], `eqx.nn.RMSNorm`, `eqx.nn.LayerNorm`), which stay
    as they are and compute in float32 internally. Other leaves are unchanged.

    Cast once at the top of a step, the matmuls and activations that use these
    parameters run in `dtype`; the cast's derivative brings the gradients back to the
    parameters' own dtype (float32).
    """
    dtype = jnp.dtype(dtype)

    def cast(node):
        if _is_norm(node) or not eqx.is_array(node):
            return node
        if jnp.issubdtype(node.dtype, jnp.floating) and node.dtype != dtype:
            return node.astype(dtype)
        return node

    return jax.tree.map(cast, tree, is_leaf=_is_norm)
