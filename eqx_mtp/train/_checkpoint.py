"""Orbax checkpoints of a training run: model arrays, optimizer state, step, data
iterator state, RNG and config; resume with fall-back past a damaged checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import warnings
from collections.abc import Collection
from typing import Any

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding
from jaxtyping import PyTree
from orbax.checkpoint.checkpoint_managers import preservation_policy

from .._config import ModelConfig
from .._model import MTPModel
from .._sharding import DEFAULT_RULES, ShardingRule, named_shardings

CONFIG_FILE = "config.json"
_EVAL_METRIC = "eval_loss"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, damaged, or from another config."""


@dataclasses.dataclass
class RestoredState:
    """What [`eqx_mtp.Checkpointer.restore`][] returns."""

    step: int
    model: MTPModel
    opt_state: PyTree
    data_state: dict
    rng: jax.Array
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


def _is_array_or_shape(leaf) -> bool:
    return eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def model_template(config: ModelConfig) -> MTPModel:
    """The model's structure with `jax.ShapeDtypeStruct` leaves: nothing allocated."""
    return eqx.filter_eval_shape(MTPModel, config, key=jax.random.key(0))


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


class Checkpointer:
    """Keeps a run's checkpoints under `directory` with an Orbax `CheckpointManager`.

    Saves are asynchronous; the last `keep` checkpoints and the one with the lowest
    eval loss are kept. Every checkpoint also stores the run's configuration, so a
    checkpoint directory alone is enough to rebuild the model
    ([`eqx_mtp.load_checkpoint`][]).

    **Arguments:**

    - `directory`: where the step folders go (created if missing).
    - `keep`: how many of the latest checkpoints to keep.
    - `async_save`: save in a background thread.
    """

    def __init__(
        self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True
    ):
        if keep < 1:
            raise ValueError(f"Checkpointer: keep must be >= 1, got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        policy = preservation_policy.AnyPreservationPolicy(
            [
                preservation_policy.LatestN(keep),
                # Orbax sorts by the metric and keeps the last `n` in that order;
                # reverse=True puts the lowest loss last.
                preservation_policy.BestN(
                    get_metric_fn=lambda metrics: metrics[_EVAL_METRIC],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps of the finished checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        *,
        model: MTPModel,
        opt_state: PyTree,
        data_state: dict,
        rng: jax.Array,
        config: dict,
        eval_loss: float | None = None,
    ) -> None:
        """Start saving a checkpoint of `step` (returns before the write finishes)."""
        metrics = None if eval_loss is None else {_EVAL_METRIC: float(eval_loss)}
        rng_words = np.asarray(jax.random.key_data(rng)).tolist()
        self._manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(eqx.filter(model, eqx.is_array)),
                opt_state=ocp.args.StandardSave(opt_state),
                run_state=ocp.args.JsonSave(dict(data=data_state, rng=rng_words)),
                config=ocp.args.JsonSave(config),
            ),
            metrics=metrics,
        )

    def wait(self) -> None:
        """Block until every started save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def set_aside_after(self, step: int, destination: str | os.PathLike) -> list[int]:
        """Move the checkpoints newer than `step` (ones that failed to restore, so
        that a run fell back to `step`) into `destination`, where they are kept, out
        of this manager's sight: later saves of those steps, and keep-last-N, then
        see only checkpoints that load. Call it in every process of a run.

        **Returns:**

        The steps moved.
        """
        newer = [s for s in self.steps() if s > step]
        if newer and jax.process_index() == 0:
            destination = pathlib.Path(destination)
            destination.mkdir(parents=True, exist_ok=True)
            for moved in newer:
                target = destination / str(moved)
                suffix = 0
                while target.exists():
                    suffix += 1
                    target = destination / f"{moved}.{suffix}"
                os.replace(self.directory / str(moved), target)
        if newer:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("eqx_mtp set aside checkpoints")
            self._manager.reload()
        return newer

    def read_config(self, step: int) -> dict:
        """The configuration stored with checkpoint `step`."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored.config

    def restore(
        self,
        *,
        model_config: ModelConfig,
        opt_state_template: PyTree | None = None,
        config: dict | None = None,
        may_differ: Collection[str] = (),
        step: int | None = None,
        mesh: Mesh | None = None,
        rules: tuple[ShardingRule, ...] = DEFAULT_RULES,
    ) -> RestoredState:
        """Restore the newest usable checkpoint (or exactly `step`).

        A checkpoint that fails to load falls back to the one before it, with a
        warning. A checkpoint whose stored config differs from `config` is refused with
        a [`eqx_mtp.CheckpointError`][] naming the differing fields.

        **Arguments:**

        - `model_config`: the model configuration to restore into.
        - `opt_state_template`: a pytree of the optimizer state's shapes (e.g.
            `jax.eval_shape(optimizer.init, params)`); `None` skips it.
        - `config`: the current run configuration to compare with the stored one.
        - `may_differ`: dotted names of `config` fields that need not match (e.g.
            `"model.remat"`: how a step is computed, not what).
        - `step`: a specific step; default the newest that loads.
        - `mesh`, `rules`: restore every array onto `mesh` as `rules` lay it out
            ([`eqx_mtp.partition_specs`][]); `None` restores onto this process's first
            device. Either works whatever mesh the checkpoint was saved from.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if config is not None:
            saved = self._read_config_or_none(candidates[0])
            if saved is not None:
                differences = config_differences(saved, config, ignore=may_differ)
                if differences:
                    raise CheckpointError(
                        f"checkpoint in {self.directory} was made with another "
                        f"config; differing fields: {'; '.join(differences)}"
                    )
        errors = []
        for candidate in candidates:
            try:
                return self._restore_step(
                    candidate, model_config, opt_state_template, mesh, rules
                )
            except Exception as error:  # noqa: BLE001 - any failure means "damaged"
                message = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                errors.append(f"step {candidate}: {message}")
                warnings.warn(
                    f"checkpoint step {candidate} in {self.directory} could not be "
                    f"restored ({message}); falling back to the one before",
                    stacklevel=2,
                )
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be restored: " + "; ".join(errors)
        )

    def _read_config_or_none(self, step: int) -> dict | None:
        try:
            return self.read_config(step)
        except Exception:  # noqa: BLE001 - a damaged config is handled by the fall-back
            return None

    def _restore_step(
        self, step, model_config, opt_state_template, mesh, rules
    ) -> RestoredState:
        params_template, static = eqx.partition(
            model_template(model_config), _is_array_or_shape
        )
        items = dict(
            model=ocp.args.StandardRestore(
                placed_template(params_template, mesh, rules)
            ),
            run_state=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        if opt_state_template is not None:
            items["opt_state"] = ocp.args.StandardRestore(
                placed_template(opt_state_template, mesh, rules)
            )
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        run_state = restored.run_state
        return RestoredState(
            step=step,
            model=eqx.combine(restored.model, static),
            opt_state=restored.opt_state if opt_state_template is not None else None,
            data_state=run_state["data"],
            rng=jax.random.wrap_key_data(np.asarray(run_state["rng"], np.uint32)),
            config=restored.config,
        )


def load_checkpoint(
    path: str | os.PathLike, *, step: int | None = None
) -> tuple[MTPModel, dict]:
    """Load a model from a checkpoint directory alone.

    **Arguments:**

    - `path`: a run directory (with `checkpoints/` inside) or its checkpoint directory.
    - `step`: which checkpoint; default the newest that loads.

    **Returns:**

    `(model, config)`: the model rebuilt from its stored configuration, and the whole
    stored run configuration.
    """
    directory = pathlib.Path(path)
    if not directory.exists():
        raise CheckpointError(f"checkpoint path {directory} does not exist")
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        steps = [step] if step is not None else checkpointer.steps()[::-1]
        if not steps:
            raise CheckpointError(f"no checkpoint found in {directory}")
        config = checkpointer._read_config_or_none(steps[0])
        if config is None or "model" not in config:
            raise CheckpointError(f"checkpoint {directory} has no readable config")
        model_config = ModelConfig.from_dict(config["model"])
        restored = checkpointer.restore(model_config=model_config, step=step)
        return restored.model, restored.config
    finally:
        checkpointer.close()


def write_json(path: str | os.PathLike, values: Any) -> None:
    """Write `values` as indented JSON, atomically (write then rename)."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


logging.getLogger("absl").setLevel(logging.WARNING)
