"""What a checkpoint holds and how it is laid out: stored configs, templates that
place restored arrays, the RNG key's words; shared by the `Checkpointer` and its
readers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Collection
from typing import Any

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding
from jaxtyping import PyTree

from .._config import ModelConfig
from .._model import MTPModel
from .._sharding import ShardingRule, named_shardings

CONFIG_FILE = "config.json"
_EVAL_METRIC = "eval_loss"
# Written by Orbax into every step directory, and only there.
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
# `run_state["opt_state"]`: how the optimizer state was stored. Checkpoints written
# before the field existed always had a saved one.
_OPT_SAVED, _OPT_LEAFLESS, _OPT_ABSENT = "saved", "leafless", "absent"
# `run_state["rng_impl"]` of a key given as raw uint32 words (`jax.random.PRNGKey`).
_RAW_KEY = "raw"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, damaged, or from another config."""


@dataclasses.dataclass
class RestoredState:
    """What [`eqx_mtp.train.Checkpointer.restore`][] returns. A piece that was not saved
    (or, for `opt_state`, not asked for with a template) is `None`."""

    step: int
    model: PyTree
    opt_state: PyTree | None
    data_state: dict | None
    rng: jax.Array | None
    config: dict


def config_differences(
    saved: dict, current: dict, prefix: str = "", *, ignore: Collection[str] = ()
) -> list[str]:
    """Names (dotted for nested dicts) of the fields whose values differ, leaving out
    the dotted names in `ignore`."""
    names = []
    for name in sorted(set(saved) | set(current)):
        a, b = saved.get(name), current.get(name)
        if f"{prefix}{name}" in ignore:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            names += config_differences(a, b, f"{prefix}{name}.", ignore=ignore)
        elif a != b:
            names.append(f"{prefix}{name} (saved {a!r}, now {b!r})")
    return names


def stored_model_config(config: dict) -> ModelConfig | None:
    """The [`eqx_mtp.ModelConfig`][] in a checkpoint's stored config, in either
    layout: `{"model": ModelConfig.to_dict(), ...}` or a bare `ModelConfig.to_dict()`;
    `None` when it holds neither."""
    if isinstance(config.get("model"), dict):
        values = config["model"]
    elif "vocab_size" in config:
        values = config
    else:
        return None
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        message = f"its stored ModelConfig does not load: {error}"
        raise CheckpointError(message) from None


def _is_array_or_shape(leaf) -> bool:
    return eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def model_template(config: ModelConfig) -> MTPModel:
    """The model's structure with `jax.ShapeDtypeStruct` leaves: nothing allocated."""
    return eqx.filter_eval_shape(MTPModel, config, key=jax.random.key(0))


def _shapes_of(tree: PyTree) -> PyTree:
    """`tree` with every array replaced by its `jax.ShapeDtypeStruct`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if eqx.is_array(x) else x,
        tree,
    )


def placed_template(
    template: PyTree, mesh: Mesh | None, rules: tuple[ShardingRule, ...]
) -> PyTree:
    """`template`'s array leaves as `jax.ShapeDtypeStruct`s that say where each
    restored array goes: on `mesh` as `rules` lay it out, or on this process's first
    device when `mesh` is `None` (whatever mesh the checkpoint was saved from)."""
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, template)
    else:
        shardings = named_shardings(template, mesh, rules=rules)

    def place(leaf, sharding):
        if not _is_array_or_shape(leaf):
            return leaf
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(place, template, shardings)


def is_step_directory(path: str | os.PathLike) -> bool:
    """Whether `path` is one checkpoint's own directory (`<checkpoints>/<step>`)."""
    return (pathlib.Path(path) / _STEP_METADATA_FILE).is_file()


def _rng_words(rng: jax.Array | None) -> tuple[list | None, str | None]:
    """`(words, impl)`: a PRNG key (typed, or raw `uint32` words) as JSON."""
    if rng is None:
        return None, None
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(rng)).tolist(), str(
            jax.random.key_impl(rng)
        )
    return np.asarray(rng, np.uint32).tolist(), _RAW_KEY


def _rng_from(run_state: dict) -> jax.Array | None:
    words = run_state.get("rng")
    if words is None:
        return None
    words = np.asarray(words, np.uint32)
    impl = run_state.get("rng_impl")
    if impl == _RAW_KEY:
        return jax.numpy.asarray(words)
    # Checkpoints written before `rng_impl` existed hold the default implementation.
    return jax.random.wrap_key_data(words, impl=impl)


def write_json(path: str | os.PathLike, values: Any) -> None:
    """Write `values` as indented JSON, atomically (write then rename)."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _key_name(entry) -> str:
    for attribute in ("name", "key", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _named(tree: PyTree) -> dict[tuple[str, ...], Any]:
    """Every leaf of `tree`, `None`s included, under its path of key names."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {tuple(map(_key_name, path)): leaf for path, leaf in leaves}


def stored_target(placed: PyTree, item_directory: pathlib.Path, item: str) -> PyTree:
    """`placed` (a template's `jax.ShapeDtypeStruct`s) in the tree structure the
    checkpoint item at `item_directory` was saved with, to restore into.

    A field added since a checkpoint was written that holds no array here (`None`,
    such as the q/k norms of a trunk without them) is absent from the stored tree:
    it is left out, and `rebuilt` puts it back. An array either side lacks is a
    `CheckpointError` that names it.
    """
    # The item's own directory has no step metadata file, which Orbax reports as a
    # warning on every restore; the tree metadata it reads is there.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        stored = ocp.PyTreeCheckpointer().metadata(item_directory).item_metadata.tree
    finally:
        absl.setLevel(level)
    ours = _named(placed)

    def pick(path, value):
        name = tuple(map(_key_name, path))
        if value is None:
            return None
        if ours.get(name) is None:
            raise CheckpointError(
                f"its {item} holds an array at {'.'.join(name)} that the model "
                "being restored has no place for"
            )
        return ours[name]

    target = jax.tree_util.tree_map_with_path(pick, stored, is_leaf=lambda x: x is None)
    present = {name for name, leaf in _named(target).items() if leaf is not None}
    missing = [
        ".".join(name)
        for name, leaf in ours.items()
        if leaf is not None and name not in present
    ]
    if missing:
        raise CheckpointError(
            f"its {item} has no array for {', '.join(missing[:4])}"
            + (" …" if len(missing) > 4 else "")
        )
    return target


def rebuilt(placed: PyTree, restored: PyTree) -> PyTree:
    """`placed`'s structure with the arrays of `restored` (as `stored_target` laid it
    out) at their places."""
    arrays = _named(restored)
    leaves = jax.tree_util.tree_flatten_with_path(placed, is_leaf=lambda x: x is None)
    values = [
        None if leaf is None else arrays[tuple(map(_key_name, path))]
        for path, leaf in leaves[0]
    ]
    return jax.tree_util.tree_unflatten(leaves[1], values)
