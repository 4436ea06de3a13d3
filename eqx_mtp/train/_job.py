"""The training job behind `eqx-mtp train`: set-up (data, model, optimiser, run
directory, checkpoint), the loop of steps, and the finish (final eval, summary,
plot)."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import time
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from .._config import ModelConfig
from .._curriculum import DepthSchedule
from .._mesh import batch_sharding
from .._model import MTPModel
from .._schedule import parse_mtp_weight
from ._checkpoint import Checkpointer, CheckpointError, write_json
from ._config import TrainConfig, UserError
from ._data import TrainBatches
from ._distributed import global_array, initialize, is_primary
from ._eval import evaluate
from ._flags import FRAMING, RESUMABLE_FIELDS, resume_differences, stored_config
from ._framing import Framed
from ._init import init_model, init_opt_state, parameter_counts
from ._inputs import job_data, job_mesh, job_tokenizer
from ._preemption import Preempted, StopRequests
from ._run_directory import (
    RUN_TOKENIZER,
    Discard,
    create_run_directory,
    format_summary,
    has_checkpoints,
    log,
    main_loss_units,
    open_metrics,
    read_summary,
    run_directory,
)
from ._text_tokenizer import TextTokenizer
from ._train_step import make_optimizer, train_step

DAMAGED_DIRECTORY = "damaged-checkpoints"
# The model's fields among them, as a checkpoint's stored config names them.
RESUMABLE_MODEL_FIELDS = frozenset(
    f"model.{name}" for name in RESUMABLE_FIELDS if name in ModelConfig.__annotations__
)


@dataclasses.dataclass
class _Job:
    """What the set-up builds and the loop advances."""

    config: TrainConfig
    run: pathlib.Path
    mesh: Mesh
    # `None` on one device (the plain program), else `mesh`: vocabulary-parallel loss.
    loss_mesh: Mesh | None
    batches: TrainBatches
    evaluation: list
    # What encodes the text (`None`: a corpus of token ids, tokenizer unknown).
    tokenizer: Framed | None
    optimizer: Any
    model: Any
    opt_state: Any
    rng: jax.Array
    checkpointer: Checkpointer
    stored: dict
    start_step: int = 0
    # The depth curriculum (`None`: every depth at every step), and how many depths
    # the last step ran.
    curriculum: DepthSchedule | None = None
    running: int | None = None

    def save(self, step: int, eval_loss: float | None = None) -> None:
        self.checkpointer.save(
            step,
            model=self.model,
            opt_state=self.opt_state,
            data_state=self.batches.get_state(),
            rng=self.rng,
            config=self.stored,
            eval_loss=eval_loss,
        )


def train(
    config: TrainConfig, *, stop_after: int | None = None, progress: bool = True
) -> dict:
    """Start a training job, or continue it from the newest checkpoint of its run
    directory that loads, and return its summary.

    **Arguments:**

    - `config`: the [`eqx_mtp.train.TrainConfig`][].
    - `stop_after`: stop (after checkpointing) once this step is done, as if the job
        were pre-empted; `None` runs to `config.run.steps`.
    - `progress`: show a tqdm progress bar.

    **Returns:**

    A dict with the run directory, the final step, the last training metrics, the
    final eval and the mean tokens/s. A run already complete (a checkpoint at
    `config.run.steps` and its summary) is not loaded: its summary is printed and
    returned.

    **Raises:**

    `Preempted` when SIGTERM or SIGINT stopped the run (in any of its processes): the
    step it was at is checkpointed, and the same call continues it.
    """
    job = _set_up(config)
    if isinstance(job, dict):
        return job
    try:
        outcome = _loop(job, stop_after=stop_after, progress=progress)
    finally:
        job.checkpointer.close()
    return _finish(job, outcome)


def _set_up(config: TrainConfig) -> _Job | dict:
    """Everything before the first step; the run directory is created only once
    nothing failed. A complete run's summary instead of a job."""
    try:
        initialize(
            coordinator=config.mesh.coordinator,
            num_processes=config.mesh.num_processes,
            process_id=config.mesh.process_id,
            auto=config.mesh.distributed,
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    mesh = job_mesh(config)
    run = run_directory(config.run.directory, resume=config.run.resume)
    # Start or continue, as MaxText and Levanter do: a scheduler restarts a
    # preempted job with the command that first launched it.
    continuing = has_checkpoints(run)
    if config.run.resume and not continuing:
        raise UserError(f"--resume: no checkpoint to continue in {run}")
    stored = stored_config(config)
    checkpointer = None
    if continuing:
        checkpointer = Checkpointer(run / "checkpoints", keep=config.run.keep)
        try:
            _check_resumable(checkpointer, stored)
        except UserError:
            checkpointer.close()
            raise
        summary = _complete_summary(run, checkpointer, config.run.steps)
        if summary is not None:
            checkpointer.close()
            return summary
    try:
        job = _build(config, run, mesh, checkpointer, stored)
    except BaseException:
        if checkpointer is not None:
            checkpointer.close()
        raise
    if is_primary():
        _announce(job, continuing)
    return job


def job_optimizer(config: TrainConfig, model: MTPModel) -> optax.GradientTransformation:
    """The optimizer the job builds for `model` from `config`'s optimizer section and
    its number of steps."""
    return make_optimizer(
        model,
        learning_rate=config.optimizer.learning_rate,
        total_steps=config.run.steps,
        warmup_steps=config.optimizer.warmup_steps,
        min_learning_rate_ratio=config.optimizer.min_learning_rate_ratio,
        weight_decay=config.optimizer.weight_decay,
        grad_clip=config.optimizer.grad_clip,
        depth_grad_clip=config.optimizer.depth_grad_clip,
    )


def _build(config, run, mesh, checkpointer, stored) -> _Job:
    """Data, model and optimizer state, fresh or restored from `checkpointer`."""
    tokenizer = job_tokenizer(config)
    batches, evaluation = job_data(config, mesh, tokenizer)
    loss_mesh = mesh if mesh.size > 1 else None
    model = init_model(config.model, config.run.seed, loss_mesh, config.init_from)
    optimizer = job_optimizer(config, model)
    opt_state = init_opt_state(optimizer, model, loss_mesh)
    fresh = checkpointer is None
    if fresh:
        create_run_directory(run)
        checkpointer = Checkpointer(run / "checkpoints", keep=config.run.keep)
    job = _Job(
        config=config,
        run=run,
        mesh=mesh,
        loss_mesh=loss_mesh,
        batches=batches,
        evaluation=evaluation,
        tokenizer=tokenizer,
        optimizer=optimizer,
        model=model,
        opt_state=opt_state,
        rng=jax.random.key(config.run.seed),
        checkpointer=checkpointer,
        stored=stored,
        curriculum=config.depth_curriculum(),
    )
    if not fresh:
        _restore(job)
    if loss_mesh is None:
        # The batches lie on the one-device mesh, and so do the step's outputs; the
        # model and optimizer state start there too, so that the first step runs
        # the program of every later step instead of compiling one of its own.
        job.model, job.opt_state = _on_one_device_mesh((job.model, job.opt_state), mesh)
    return job


def _on_one_device_mesh(tree, mesh: Mesh):
    """`tree`'s arrays placed, whole, on the one device of `mesh`."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    placed = jax.device_put(arrays, NamedSharding(mesh, PartitionSpec()))
    return eqx.combine(placed, static)


def _check_resumable(checkpointer: Checkpointer, stored: dict) -> None:
    newest = checkpointer.steps()[-1]
    try:
        saved = checkpointer.read_config(newest)
    except Exception:  # noqa: BLE001 - a damaged config is handled by the fall-back
        return
    differences = resume_differences(saved, stored)
    if differences:
        raise UserError(
            f"the checkpoint in {checkpointer.directory} was made with another "
            f"config; differing fields: {'; '.join(differences)}. To start fresh, "
            "pass --run NEWDIR"
        )


def _complete_summary(
    run: pathlib.Path, checkpointer: Checkpointer, steps: int
) -> dict | None:
    """The summary of a run whose newest checkpoint is its last step, else `None`."""
    newest = checkpointer.steps()[-1]
    summary = read_summary(run)
    if newest < steps or summary is None or summary.get("step") != newest:
        return None
    if is_primary():
        print(
            f"run {run} is complete: its checkpoint of step {newest} is at --steps "
            f"{steps}; pass a larger --steps to train on",
            file=sys.stderr,
        )
        print(format_summary(summary))
    return summary


def _restore(job: _Job) -> None:
    try:
        restored = job.checkpointer.restore(
            model_config=job.config.model,
            opt_state_template=jax.eval_shape(lambda: job.opt_state),
            mesh=job.loss_mesh,
        )
    except CheckpointError as error:
        raise UserError(str(error)) from None
    job.model, job.opt_state, job.rng = restored.model, restored.opt_state, restored.rng
    job.batches.set_state(restored.data_state)
    job.start_step = restored.step
    damaged = job.run / DAMAGED_DIRECTORY
    set_aside = job.checkpointer.set_aside_after(job.start_step, damaged)
    if set_aside and is_primary():
        print(
            f"checkpoints of steps {set_aside} did not load; kept under {damaged}",
            file=sys.stderr,
        )


def _announce(job: _Job, continuing: bool) -> None:
    """Write the effective config (and how the tokenizer frames documents) and the
    tokenizer's files to the run directory, and say what starts."""
    effective = dataclasses.replace(
        job.config, run=dataclasses.replace(job.config.run, directory=str(job.run))
    )
    written = effective.to_dict()
    if job.tokenizer is not None:
        written[FRAMING] = job.tokenizer.describe()
    if isinstance(job.tokenizer, TextTokenizer) and not continuing:
        # The run keeps its tokenizer: `generate` and `export` read it from here.
        job.tokenizer.save(job.run / RUN_TOKENIZER)
    write_json(job.run / "config.json", written)
    how = (
        f"continuing from the checkpoint of step {job.start_step}"
        if continuing
        else "starting fresh (no checkpoint)"
    )
    print(
        f"run directory: {job.run}, {how}; mesh {dict(job.mesh.shape)} over "
        f"{jax.process_count()} process(es); config in {job.run / 'config.json'}",
        file=sys.stderr,
    )
    trunk, depths = parameter_counts(job.model)
    print(
        f"model: {trunk + depths:,} parameters (trunk {trunk:,}, depths {depths:,})",
        file=sys.stderr,
    )


@dataclasses.dataclass
class _Outcome:
    """How the loop ended."""

    final_step: int
    last_metrics: dict
    final_eval: dict | None
    tokens_per_second: float | None
    preempted_at: int | None = None
    signal_name: str | None = None


class _Throughput:
    """Tokens per second over the steps after the first (which compiles)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.tokens, self.seconds = tokens_per_step, 0, 0.0

    def add(self, seconds: float) -> None:
        self.tokens += self.tokens_per_step
        self.seconds += seconds

    def rate(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None


def _loop(job: _Job, *, stop_after: int | None, progress: bool) -> _Outcome:
    """Train from `job.start_step` to the last step, evaluating, logging and saving
    on schedule; a stop request checkpoints the step it ends and stops."""
    config, primary = job.config, is_primary()
    steps = config.run.steps
    last_step = steps if stop_after is None else min(stop_after, steps)
    throughput = _Throughput(config.data.batch_size * config.data.seq_len)
    metrics = {}
    with (
        StopRequests() as stops,
        open_metrics(job.run / "metrics.jsonl") if primary else Discard() as log_file,
        tqdm(
            total=steps,
            initial=job.start_step,
            disable=not (progress and primary),
            dynamic_ncols=True,
            desc="train",
        ) as bar,
    ):
        for step in range(job.start_step + 1, last_step + 1):
            metrics = _step(job, step, throughput)
            _show(bar, metrics)
            logged = bool(config.run.log_every) and (
                step % config.run.log_every == 0 or step == last_step
            )
            if logged:
                log(log_file, metrics)
            saved = _periodic(job, step, last_step, log_file, bar)
            if stops.agreed():
                if not saved:
                    job.save(step)
                if not logged:
                    log(log_file, metrics)
                return _Outcome(
                    step, metrics, None, throughput.rate(), step, stops.signal_name
                )
        final_step = max(last_step, job.start_step)
        final_eval = None
        if final_step > job.start_step or not job.checkpointer.steps():
            final_eval = _evaluate(job, final_step, log_file)
            job.save(final_step, final_eval["depth_losses"][0])
    return _Outcome(final_step, metrics, final_eval, throughput.rate())


def _step(job: _Job, step: int, throughput: _Throughput) -> dict:
    """One training step; its metrics as the log records them."""
    config = job.config
    batch = next(job.batches)
    micro = config.data.micro_batches
    shape = (micro, config.data.batch_size // micro, config.data.seq_len)
    layout = batch_sharding(job.mesh, 3)
    shaped = {
        k: global_array(v.reshape(micro, -1, v.shape[-1]), layout, shape)
        for k, v in batch.items()
    }
    mtp_weight = parse_mtp_weight(config.objective.mtp_weight)
    weight = float(mtp_weight(step - 1) if callable(mtp_weight) else mtp_weight)
    stage = {} if job.curriculum is None else job.curriculum.stage(step - 1)
    started = time.perf_counter()
    job.model, job.opt_state, metrics = train_step(
        job.optimizer,
        job.model,
        job.opt_state,
        shaped,
        np.asarray(weight, np.float32),
        config.objective.reduction,
        job.loss_mesh,
        **stage,
    )
    metrics = jax.device_get(metrics)
    elapsed = time.perf_counter() - started
    # The first step, and the first of each curriculum stage, include compilation.
    running, previous = stage.get("active_depths"), job.running
    job.running = running
    if step > job.start_step + 1 and running == previous:
        throughput.add(elapsed)
    # A depth the curriculum did not run has no training loss: `null` in the log.
    depth_losses = [float(x) for x in metrics["depth_losses"]]
    ran = len(depth_losses) if running is None else running + 1
    depth_losses = [x if k < ran else None for k, x in enumerate(depth_losses)]
    record = dict(
        step=step,
        loss=float(metrics["loss"]),
        main_loss=depth_losses[0],
        depth_losses=depth_losses,
        mtp_weight=weight,
        grad_norm=float(metrics["grad_norm"]),
        tokens_per_second=throughput.rate() or 0.0,
    )
    if stage:
        record["depth_weights"] = [float(w) for w in stage["depth_weights"]]
    if not all(math.isfinite(x) for x in depth_losses[:ran]):
        job.save(step)
        raise FloatingPointError(f"non-finite loss at step {step}: {depth_losses}")
    return record


def _show(bar, metrics: dict) -> None:
    losses = metrics["depth_losses"]
    bar.update(1)
    bar.set_postfix_str(
        f"main {losses[0]:.3f} | depths {_format_losses(losses[1:]) or '-'} | "
        f"{metrics['tokens_per_second']:,.0f} tok/s"
    )


def _periodic(job: _Job, step: int, last_step: int, log_file, bar) -> bool:
    """The eval and checkpoint due after `step` (the last step's come after the
    loop); whether a checkpoint was saved."""
    run = job.config.run
    eval_loss = None
    if run.eval_every and step % run.eval_every == 0 and step < last_step:
        result = _evaluate(job, step, log_file)
        eval_loss = result["depth_losses"][0]
        if is_primary():
            bar.write(
                f"step {step}: eval {main_loss_units(result)}, "
                f"depth losses {_format_losses(result['depth_losses'])}"
            )
    saved = bool(run.save_every) and step % run.save_every == 0 and step < last_step
    if saved:
        job.save(step, eval_loss)
    return saved


def _evaluate(job: _Job, step: int, log_file) -> dict:
    result = evaluate(job.model, job.evaluation, mesh=job.loss_mesh)
    log(log_file, dict(step=step, eval=result))
    return result


def _finish(job: _Job, outcome: _Outcome) -> dict:
    """The summary of a finished run, written with the plot; or `Preempted`."""
    if outcome.preempted_at is not None:
        raise Preempted(outcome.preempted_at, outcome.signal_name)
    summary = dict(
        run=str(job.run),
        step=outcome.final_step,
        last_train=outcome.last_metrics,
        eval=outcome.final_eval,
        tokens_per_second=outcome.tokens_per_second,
    )
    if outcome.final_eval is not None and is_primary():
        write_json(job.run / "summary.json", summary)
        from ._plot import plot_losses

        plot_losses(job.run / "metrics.jsonl", job.run / "losses.png")
        print(format_summary(summary))
    return summary


def _format_losses(losses) -> str:
    return " ".join("off" if x is None else f"{x:.3f}" for x in losses)
