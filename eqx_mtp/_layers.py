"""The trunk's elementary layers: RMSNorm, a linear map over leading axes, SwiGLU."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class RMSNorm(eqx.Module):
    """Root-mean-square normalisation over the last axis with a learned scale,
    computed in float32 and returned in the input's dtype."""

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.weight = jnp.ones((dim,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        x32 = x.astype(jnp.float32)
        scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale * self.weight.astype(jnp.float32)).astype(x.dtype)


def dense(
    linear: eqx.nn.Linear, x: Float[Array, "*batch in"]
) -> Float[Array, "*batch out"]:
    """Apply an `eqx.nn.Linear` to every leading index of `x` at once (its bias
    added when it has one)."""
    y = x @ linear.weight.T
    if linear.bias is not None:
        y = y + linear.bias
    return y


class SwiGLU(eqx.Module):
    """`down(silu(gate(x)) * up(x))`, bias-free."""

    gate_proj: eqx.nn.Linear
    up_proj: eqx.nn.Linear
    down_proj: eqx.nn.Linear

    def __init__(self, dim: int, hidden_dim: int, *, key: PRNGKeyArray):
        gate_key, up_key, down_key = jax.random.split(key, 3)
        self.gate_proj = eqx.nn.Linear(dim, hidden_dim, use_bias=False, key=gate_key)
        self.up_proj = eqx.nn.Linear(dim, hidden_dim, use_bias=False, key=up_key)
        self.down_proj = eqx.nn.Linear(hidden_dim, dim, use_bias=False, key=down_key)

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        hidden = jax.nn.silu(dense(self.gate_proj, x)) * dense(self.up_proj, x)
        return dense(self.down_proj, hidden)
