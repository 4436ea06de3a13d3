"""The job's initial model and optimizer state, built straight into their shards."""

from __future__ import annotations

import equinox as eqx
import jax
from jax.sharding import Mesh

from .._config import ModelConfig
from .._hf_checkpoint import WeightsError, load_hf_checkpoint
from .._model import MTPModel
from .._sharding import named_shardings
from ._config import UserError


def init_model(
    config: ModelConfig, seed: int, mesh: Mesh | None, init_from: str | None = None
) -> MTPModel:
    """The initial model, built straight into its shards on `mesh` (every process
    computes the same values from `seed`), or loaded from `init_from` (every process
    reads the same files) and placed there."""
    if init_from is not None:
        overrides = {k: v for k, v in config.to_dict().items() if k != "vocab_size"}
        try:
            model = load_hf_checkpoint(init_from, key=jax.random.key(seed), **overrides)
        except WeightsError as error:
            raise UserError(f"--init-from {init_from}: {error}") from None
        if mesh is None:
            return model
        arrays, static = eqx.partition(model, eqx.is_array)
        placed = jax.device_put(arrays, named_shardings(arrays, mesh))
        return eqx.combine(placed, static)
    if mesh is None:
        return MTPModel(config, key=jax.random.key(seed))

    def arrays():
        return eqx.filter(MTPModel(config, key=jax.random.key(seed)), eqx.is_array)

    shapes = jax.eval_shape(arrays)
    placed = jax.jit(arrays, out_shardings=named_shardings(shapes, mesh))()
    static = eqx.filter(
        eqx.filter_eval_shape(MTPModel, config, key=jax.random.key(seed)),
        lambda leaf: not isinstance(leaf, jax.ShapeDtypeStruct),
    )
    return eqx.combine(placed, static)


def init_opt_state(optimizer, model: MTPModel, mesh: Mesh | None):
    """`optimizer.init` of the model's arrays, laid out on `mesh` like them."""
    params = eqx.filter(model, eqx.is_array)
    if mesh is None:
        return optimizer.init(params)
    shapes = jax.eval_shape(optimizer.init, params)
    return jax.jit(optimizer.init, out_shardings=named_shardings(shapes, mesh))(params)


def parameter_counts(model: MTPModel) -> tuple[int, int]:
    """`(trunk, depths)`: the number of parameters of each (the shared embedding and
    head counted in the trunk)."""

    def count(tree) -> int:
        return sum(
            leaf.size for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array))
        )

    return count(model.trunk), count(model.depths)
