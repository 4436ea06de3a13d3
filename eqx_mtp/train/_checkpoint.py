"""Orbax checkpoints of a model and what a loop has beside it (optimizer state, data
iterator state, RNG key, config); resume with fall-back past a damaged checkpoint."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import warnings
import weakref
from collections.abc import Collection

import equinox as eqx
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jaxtyping import PyTree
from orbax.checkpoint.checkpoint_managers import preservation_policy

from .._config import ModelConfig
from .._model import MTPModel
from .._sharding import DEFAULT_RULES, ShardingRule
from ._checkpoint_layout import (
    _EVAL_METRIC,
    _OPT_ABSENT,
    _OPT_LEAFLESS,
    _OPT_SAVED,
    CheckpointError,
    RestoredState,
    _is_array_or_shape,
    _rng_from,
    _rng_words,
    _shapes_of,
    config_differences,
    is_step_directory,
    model_template,
    placed_template,
    rebuilt,
    stored_model_config,
    stored_target,
    write_json,
)
from ._exit_hooks import _close_at_exit, _close_manager

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "RestoredState",
    "config_differences",
    "load_checkpoint",
    "stored_model_config",
    "write_json",
]


class Checkpointer:
    """Keeps checkpoints under `directory` with an Orbax `CheckpointManager`: a
    training job's, or those of your own loop.

    A checkpoint of step `s` is the directory `directory/s`. It holds the model's
    arrays (`eqx.filter(model, eqx.is_array)`: the static part is rebuilt from a
    `ModelConfig` or a template when restoring), and whichever of the optimizer state,
    the data iterator's state and the RNG key were given, and a JSON config. The
    config's layout is yours; two layouts also say how to rebuild an
    [`eqx_mtp.MTPModel`][] ([`eqx_mtp.train.load_checkpoint`][] needs nothing else):

    - `ModelConfig.to_dict()` itself, or
    - `{"model": ModelConfig.to_dict(), ...}` with anything else beside it (the
        training job stores `{"model": ..., "train": ...}`).

    Saves are asynchronous; the last `keep` checkpoints and the one with the lowest
    eval loss are kept. A save never overwrites a checkpoint: a step that is not after
    the newest one is refused. Use it as a context manager, or call `close`, to wait
    for the last save; one never closed is closed at exit, before the interpreter
    stops the threads that write it.

    ```python
    with eqx_mtp.train.Checkpointer("runs/mine/checkpoints") as checkpointer:
        checkpointer.save(step, model=model, opt_state=opt_state)
    ```

    **Arguments:**

    - `directory`: where the step folders go (created if missing); not a step's own
        directory.
    - `keep`: how many of the latest checkpoints to keep.
    - `async_save`: save in a background thread.
    - `read_only`: only read: saving is refused and nothing is created or deleted.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if keep < 1:
            raise ValueError(f"Checkpointer: keep must be >= 1, got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        if is_step_directory(self.directory):
            raise CheckpointError(
                f"{self.directory} is the directory of one checkpoint (step "
                f"{self.directory.name}); give the directory that holds the steps, "
                f"{self.directory.parent}"
            )
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} not found")
        self.read_only = read_only
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
        # Read-only is ours (`save` refuses): Orbax's own flag logs warnings on
        # every open. Without a preservation policy nothing would be deleted anyway.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=None if read_only else policy,
            enable_async_checkpointing=async_save,
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        # Holds the manager, not `self`: a Checkpointer dropped unclosed is closed
        # when collected, and one alive at exit by the exit hook.
        self._finalizer = weakref.finalize(self, _close_manager, self._manager)
        _close_at_exit(self._finalizer)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def steps(self) -> list[int]:
        """Steps of the finished checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def _missing_step(self, step: int) -> CheckpointError:
        found = self.steps()
        return CheckpointError(
            f"no checkpoint of step {step} in {self.directory}; "
            + (f"steps found: {found}" if found else "it holds no checkpoint")
        )

    def save(
        self,
        step: int,
        *,
        model: PyTree,
        opt_state: PyTree | None = None,
        data_state: dict | None = None,
        rng: jax.Array | None = None,
        config: dict | ModelConfig | None = None,
        eval_loss: float | None = None,
    ) -> None:
        """Start saving a checkpoint of `step` (returns before the write finishes).

        **Arguments:**

        - `step`: the step; must be after every checkpoint in the directory.
        - `model`: an [`eqx_mtp.MTPModel`][] or any Equinox module (your own trunk
            with [`eqx_mtp.MTPDepths`][]); its arrays are saved.
        - `opt_state`: optional optimizer state.
        - `data_state`: optional JSON-serialisable state of your data iterator.
        - `rng`: optional PRNG key (a typed key or raw `uint32` words).
        - `config`: a JSON-serialisable dict in either layout above, or a
            `ModelConfig`; default `{"model": model.config.to_dict()}` for an
            `MTPModel`, else `{}`.
        - `eval_loss`: optional; the checkpoint with the lowest is kept beside the
            last `keep`.
        """
        if not self._finalizer.alive:
            raise CheckpointError(f"Checkpointer of {self.directory} is closed")
        if self.read_only:
            raise CheckpointError(f"Checkpointer of {self.directory} is read-only")
        steps = self.steps()
        if steps and step <= steps[-1]:
            # Orbax would skip it without a word, and never overwrites: say so.
            raise CheckpointError(
                f"cannot save step {step} in {self.directory}: checkpoints are saved "
                f"in increasing steps and never overwritten; steps found: {steps}"
            )
        if isinstance(config, ModelConfig):
            config = config.to_dict()
        elif config is None and isinstance(model, MTPModel):
            config = dict(model=model.config.to_dict())
        elif config is None:
            config = {}
        params = eqx.filter(model, eqx.is_array)
        if not jax.tree.leaves(params):
            raise CheckpointError("Checkpointer.save: the model has no arrays")
        rng_words, rng_impl = _rng_words(rng)
        if opt_state is None:
            opt_kind = _OPT_ABSENT
        elif jax.tree.leaves(opt_state):
            opt_kind = _OPT_SAVED
        else:
            # E.g. plain SGD's: nothing to write (Orbax refuses an empty tree), and
            # the template given to `restore` is the whole state.
            opt_kind = _OPT_LEAFLESS
        run_state = dict(
            data=data_state, rng=rng_words, rng_impl=rng_impl, opt_state=opt_kind
        )
        # Fail here, before any background write starts, not half-way through.
        for name, value in (("config", config), ("data_state", data_state)):
            try:
                json.dumps(value)
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"Checkpointer.save: {name} must be JSON-serialisable: {error}"
                ) from None
        items = dict(
            model=ocp.args.StandardSave(params),
            run_state=ocp.args.JsonSave(run_state),
            config=ocp.args.JsonSave(config),
        )
        if opt_kind == _OPT_SAVED:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        metrics = None if eval_loss is None else {_EVAL_METRIC: float(eval_loss)}
        self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=metrics, force=True
        )

    def wait(self) -> None:
        """Block until every started save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager (again: nothing happens)."""
        self._finalizer()

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
        if step not in self.steps():
            raise self._missing_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored.config

    def restore(
        self,
        *,
        model_config: ModelConfig | None = None,
        like: PyTree | None = None,
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
        a [`eqx_mtp.train.CheckpointError`][] naming the differing fields.

        **Arguments:**

        - `model_config`: the model configuration to restore into.
        - `like`: instead, a template of the model: the model itself, one like it, or
            `eqx.filter_eval_shape(make_model, ...)` (nothing allocated). Needed for a
            model that is not an `MTPModel`. With neither, the `ModelConfig` stored
            in the checkpoint's config is used.
        - `opt_state_template`: a pytree of the optimizer state's shapes (e.g.
            `jax.eval_shape(optimizer.init, params)`); `None` skips it.
        - `config`: the current run configuration to compare with the stored one.
        - `may_differ`: dotted names of `config` fields that need not match (e.g.
            `"model.remat"`: how a step is computed, not what).
        - `step`: a specific step; default the newest that loads.
        - `mesh`, `rules`: restore every array onto `mesh` as `rules` lay it out
            ([`eqx_mtp.partition_specs`][]); `None` restores onto this process's first
            device. Either works whatever mesh the checkpoint was saved from.

        **Returns:**

        A `RestoredState` with fields `step`, `model`, `opt_state`, `data_state`,
        `rng` and `config`; each piece that was not saved is `None`.
        """
        if model_config is not None and like is not None:
            raise ValueError(
                "Checkpointer.restore: give model_config or like, not both"
            )
        if step is not None and step not in self.steps():
            raise self._missing_step(step)
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if config is not None or (model_config is None and like is None):
            saved = self._read_config_or_none(candidates[0])
            if config is not None and saved is not None:
                differences = config_differences(saved, config, ignore=may_differ)
                if differences:
                    raise CheckpointError(
                        f"checkpoint in {self.directory} was made with another "
                        f"config; differing fields: {'; '.join(differences)}"
                    )
            if model_config is None and like is None and saved is not None:
                # Not a damaged checkpoint: no fall-back would do better.
                self._model_config_of(candidates[0], saved)
        errors = []
        for candidate in candidates:
            try:
                return self._restore_step(
                    candidate, model_config, like, opt_state_template, mesh, rules
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

    def _model_config_of(self, step: int, config: dict) -> ModelConfig:
        try:
            model_config = stored_model_config(config)
        except CheckpointError as error:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: {error}"
            ) from None
        if model_config is None:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} stores no ModelConfig "
                f"(its config has keys {sorted(config)}; a ModelConfig is stored as "
                '`{"model": ModelConfig.to_dict(), ...}` or as `ModelConfig.to_dict()`'
                "); pass `like=`, a template of the model"
            )
        return model_config

    def _restore_step(
        self, step, model_config, like, opt_state_template, mesh, rules
    ) -> RestoredState:
        if like is not None:
            template = _shapes_of(like)
        else:
            if model_config is None:
                model_config = self._model_config_of(step, self.read_config(step))
            template = model_template(model_config)
        params_template, static = eqx.partition(template, _is_array_or_shape)
        run_state = self._manager.restore(
            step, args=ocp.args.Composite(run_state=ocp.args.JsonRestore())
        ).run_state
        opt_kind = run_state.get("opt_state", _OPT_SAVED)
        step_directory = pathlib.Path(self.directory) / str(step)
        placed_model = placed_template(params_template, mesh, rules)
        items = dict(
            model=ocp.args.StandardRestore(
                stored_target(placed_model, step_directory / "model", "model")
            ),
            config=ocp.args.JsonRestore(),
        )
        opt_state = None
        if opt_state_template is not None:
            if opt_kind == _OPT_ABSENT:
                raise CheckpointError(f"step {step} was saved without opt_state")
            if opt_kind == _OPT_LEAFLESS:
                if jax.tree.leaves(opt_state_template):
                    raise CheckpointError(
                        f"step {step} was saved with an opt_state of no arrays, but "
                        "opt_state_template has some"
                    )
                opt_state = opt_state_template
            else:
                placed_opt = placed_template(opt_state_template, mesh, rules)
                items["opt_state"] = ocp.args.StandardRestore(
                    stored_target(placed_opt, step_directory / "opt_state", "opt_state")
                )
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if "opt_state" in items:
            opt_state = rebuilt(placed_opt, restored.opt_state)
        return RestoredState(
            step=step,
            model=eqx.combine(rebuilt(placed_model, restored.model), static),
            opt_state=opt_state,
            data_state=run_state["data"],
            rng=_rng_from(run_state),
            config=restored.config,
        )


def load_checkpoint(
    path: str | os.PathLike, *, step: int | None = None, like: PyTree | None = None
) -> tuple[PyTree, dict]:
    """Load a model from a checkpoint directory alone; nothing there is changed.

    **Arguments:**

    - `path`: a run directory (with `checkpoints/` inside), its checkpoint directory,
        or one checkpoint's own directory (`checkpoints/<step>`).
    - `step`: which checkpoint; default the newest that loads (or the one `path`
        names).
    - `like`: a template of the model (the model, one like it, or
        `eqx.filter_eval_shape` of its constructor); needed when it is not an
        [`eqx_mtp.MTPModel`][] whose `ModelConfig` the checkpoint's config holds
        (see [`eqx_mtp.train.Checkpointer`][] for the two layouts).

    **Returns:**

    `(model, config)`: the model, and the whole stored configuration.
    """
    directory = pathlib.Path(path)
    if not directory.exists():
        raise CheckpointError(f"checkpoint path {directory} does not exist")
    if is_step_directory(directory):
        if not directory.name.isdigit():
            raise CheckpointError(
                f"{directory} looks like one checkpoint's directory but its name is "
                "not a step"
            )
        named = int(directory.name)
        if step is not None and step != named:
            raise CheckpointError(
                f"{directory} is the checkpoint of step {named}, not of step {step}"
            )
        directory, step = directory.parent, named
    elif (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    checkpointer = Checkpointer(directory, async_save=False, read_only=True)
    try:
        restored = checkpointer.restore(like=like, step=step)
        return restored.model, restored.config
    finally:
        checkpointer.close()


logging.getLogger("absl").setLevel(logging.WARNING)
