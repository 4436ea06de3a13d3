"""`MTPModel`: our Llama-style trunk plus its stacked MTP depths."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._config import ModelConfig
from ._depths import LinearBlock, MLPBlock, MTPDepths, replaced
from ._precision import in_compute_dtype
from ._transformer import Transformer, TransformerBlock


def depth_layer_factory(config: ModelConfig):
    """`key -> layer` for the depth block named by `config.mtp_block`."""
    if config.mtp_block == "transformer":
        return lambda key: TransformerBlock(config, key=key)
    if config.mtp_block == "mlp":
        return lambda key: MLPBlock(
            config.dim, config.mlp_dim, eps=config.norm_eps, key=key
        )
    return lambda key: LinearBlock(config.dim, key=key)


def build_depths(config: ModelConfig, *, key: PRNGKeyArray) -> MTPDepths | None:
    """The `config.num_depths` depths of an [`eqx_mtp.MTPModel`][], freshly
    initialised (`None` when there are none)."""
    if config.num_depths == 0:
        return None
    return MTPDepths(
        config.num_depths,
        config.dim,
        make_layer=depth_layer_factory(config),
        kind=config.mtp_kind,
        shared_layer=config.shared_depth_layer,
        depth_final_norm=config.depth_final_norm,
        norm_eps=config.norm_eps,
        trunk_input=config.depth_trunk_input,
        previous_input=config.depth_previous_input,
        remat=config.remat,
        key=key,
    )


class MTPModel(eqx.Module):
    """A decoder trunk with `config.num_depths` multi-token-prediction depths.

    Its arrays are plain leaves (no static arrays), so `eqx.filter(model, eqx.is_array)`
    is everything a checkpoint needs; the rest is rebuilt from `config`.

    **Arguments:**

    - `config`: the [`eqx_mtp.ModelConfig`][].
    - `key`: PRNG key.
    """

    trunk: Transformer
    depths: MTPDepths | None
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        if not isinstance(config, ModelConfig):
            raise TypeError(
                f"MTPModel: config must be an eqx_mtp.ModelConfig, got {type(config)}"
            )
        trunk_key, depths_key = jax.random.split(key)
        self.trunk = Transformer(config, key=trunk_key)
        self.depths = build_depths(config, key=depths_key)
        self.config = config

    def __call__(
        self,
        tokens: Int[Array, " seq"],
        *,
        positions: Int[Array, " seq"],
        segment_ids: Int[Array, " seq"],
    ) -> Float[Array, "seq dim"]:
        """The trunk's last hidden states `h⁰` of one row, before the final norm, in
        `config.compute_dtype`. `segment_ids` as for [`eqx_mtp.nn.Transformer`][]: a
        document is a maximal run of one non-zero id."""
        trunk = in_compute_dtype(self.trunk, self.config.compute_dtype)
        return trunk(tokens, positions=positions, segment_ids=segment_ids)


def with_first_depths(model: MTPModel, count: int) -> MTPModel:
    """`model` with only its first `count` depths (none for 0), its config saying so;
    the arrays are `model`'s (sliced), so differentiating through this gives the
    depths left out a zero gradient."""
    if count == model.config.num_depths:
        return model
    config = dataclasses.replace(model.config, num_depths=count)
    depths = None if count == 0 else model.depths.first(count)
    return replaced(model, depths=depths, config=config)
