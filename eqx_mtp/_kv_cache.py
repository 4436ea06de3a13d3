"""The keys and values attention layers have computed, kept for decoding."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class KVCache(eqx.Module):
    """Keys and values of a stack of attention layers for positions `0 … length - 1`
    of one row, and the layer whose block reads and writes it next.

    A block called with `cache=` writes its new keys and values at their positions,
    attends to every cached key at or before each query, and returns the updated
    cache beside its output: the cache is an input and an output of the same layer,
    as Equinox's stateful layers are. The stack is updated in place, one layer at a
    time ([`eqx_mtp.nn.Transformer`][] moves `layer` along), so that a decoding loop
    carrying it never copies it.

    - `keys`, `values`: `[layers, length, kv_heads, head_dim]`.
    - `layer`: the index of the layer a block call reads and writes.
    """

    keys: Float[Array, "layers length kv_heads head_dim"]
    values: Float[Array, "layers length kv_heads head_dim"]
    layer: Int[Array, ""] = eqx.field(
        default=0, converter=lambda x: jnp.asarray(x, jnp.int32)
    )

    @classmethod
    def empty(
        cls,
        *,
        layers: int,
        length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype=jnp.float32,
    ) -> KVCache:
        """A cache of zeros for `layers` layers and `length` positions."""
        shape = (layers, length, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        """How many positions the cache holds."""
        return self.keys.shape[1]

    def at_layer(self, layer: Int[Array, ""] | int) -> KVCache:
        """The same cache, read and written by layer `layer`."""
        return KVCache(self.keys, self.values, layer)

    def write(
        self,
        keys: Float[Array, "seq kv_heads head_dim"],
        values: Float[Array, "seq kv_heads head_dim"],
        start: Int[Array, ""],
    ) -> KVCache:
        """The cache with this layer's entries at positions `start … start + seq - 1`
        replaced by `keys` and `values`."""
        at = (self.layer, start, 0, 0)
        return KVCache(
            jax.lax.dynamic_update_slice(
                self.keys, keys[None].astype(self.keys.dtype), at
            ),
            jax.lax.dynamic_update_slice(
                self.values, values[None].astype(self.values.dtype), at
            ),
            self.layer,
        )

    def read(
        self,
    ) -> tuple[Float[Array, "length kv dim"], Float[Array, "length kv dim"]]:
        """This layer's keys and values at every position."""
        index = (self.layer, 0, 0, 0)
        shape = (1, *self.keys.shape[1:])
        keys = jax.lax.dynamic_slice(self.keys, index, shape)[0]
        values = jax.lax.dynamic_slice(self.values, index, shape)[0]
        return keys, values


def cached_attention_mask(
    positions: Int[Array, " seq"],
    length: int,
    *,
    window: int | Int[Array, ""] | None = None,
) -> Array:
    """`[seq, length]`: a query at position `p` sees the cached keys at `≤ p`; with a
    sliding `window` `W`, only those at `> p - W`."""
    keys = jnp.arange(length)[None, :]
    mask = keys <= positions[:, None]
    if window is None:
        return mask
    return mask & (positions[:, None] - keys < window)
