"""The training job behind `eqx-mtp train`: data, model, optimiser, checkpoints,
evaluation, metrics and plots."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import sys
import time
import tomllib
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from .._config import ModelConfig
from .._llama_weights import CONFIG_FILE, WeightsError, load_llama, model_config_from_hf
from .._mesh import batch_sharding, make_mesh
from .._model import MTPModel
from .._schedule import parse_mtp_weight
from .._sharding import named_shardings
from ._checkpoint import Checkpointer, CheckpointError, write_json
from ._data import (
    BYTE_VOCAB_SIZE,
    TrainBatches,
    eval_batches,
    is_token_corpus,
    load_documents,
    max_token_id,
    split_documents,
)
from ._distributed import global_array, initialize, is_primary, process_box
from ._eval import evaluate
from ._preemption import Preempted, StopRequests
from ._train_step import make_optimizer, train_step

DAMAGED_DIRECTORY = "damaged-checkpoints"


class UserError(Exception):
    """Bad input to the training job: reported as one line, without a traceback."""


@dataclasses.dataclass
class TrainConfig:
    """Everything `eqx-mtp train` needs; CLI flags and `--config FILE` override it.

    Model fields go to [`eqx_mtp.ModelConfig`][]; `mtp_weight` is a float or a
    schedule `"0.3@0,0.1@800"` (λ = 0.3 from step 0, 0.1 from step 800). `mesh` is
    `"data=4,model=2,context=1"` (axes left out are 1, except `data`, which takes the
    devices the others leave) over every device, or over the first `num_devices` of a
    single-process run; `coordinator`, `num_processes` and `process_id` start a
    multi-process run, `distributed` one whose peers JAX detects (TPU pods, SLURM).
    `remat`, `attention_impl`, `attention_block_size` and `compute_dtype` default to
    `ModelConfig`'s; like the mesh, they may change when a run continues (they change
    how a step is computed and its rounding, not what it computes). `init_from`
    starts from a Hugging Face Llama-family checkpoint (see
    [`eqx_mtp.interop.load_llama`][]): its `config.json` sets the trunk's shape and
    vocabulary, and the documents are token ids (a `.jsonl` with a `tokens` field);
    `train_depths_only` freezes the trunk.
    """

    data: str | None = None
    run: str | None = None
    resume: bool = False
    steps: int = 300
    batch_size: int = 12
    micro_batches: int = 1
    seq_len: int = 256
    max_seq_len: int | None = None
    dim: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_dim: int = 512
    num_depths: int = 2
    mtp_kind: str = "sequential"
    mtp_block: str = "transformer"
    depth_final_norm: bool = False
    shared_depth_layer: bool = False
    remat: str = ModelConfig.remat
    attention_impl: str = ModelConfig.attention_impl
    attention_block_size: int = ModelConfig.attention_block_size
    compute_dtype: str = ModelConfig.compute_dtype
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    depth_grad_clip: float | None = None
    init_from: str | None = None
    train_depths_only: bool = False
    mtp_weight: str = "0.3"
    reduction: str = "mean"
    seed: int = 0
    eval_fraction: float = 0.02
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep: int = 3
    log_every: int = 10
    mesh: str | None = None
    num_devices: int | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size", "micro_batches", "seq_len", "keep"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{_flag(name)} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("eval_every", "save_every", "log_every", "eval_batches"):
            if getattr(self, name) < 0:
                raise UserError(
                    f"--{_flag(name)} must be >= 0, got {getattr(self, name)}"
                )
        if self.batch_size % self.micro_batches:
            raise UserError(
                f"--micro-batches={self.micro_batches} must divide "
                f"--batch-size={self.batch_size}"
            )
        if self.max_seq_len is not None and self.seq_len > self.max_seq_len:
            raise UserError(
                f"--seq-len={self.seq_len} exceeds the model's "
                f"--max-seq-len={self.max_seq_len}"
            )
        if self.num_depths >= self.seq_len:
            raise UserError(
                f"--num-depths={self.num_depths} must be smaller than "
                f"--seq-len={self.seq_len} (depth D predicts D + 1 tokens ahead)"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise UserError(
                f"--eval-fraction must lie in (0, 1), got {self.eval_fraction}"
            )
        if self.reduction not in ("mean", "pooled"):
            raise UserError(
                f"--reduction must be 'mean' or 'pooled', got {self.reduction!r}"
            )
        if self.depth_grad_clip is not None and not (
            isinstance(self.depth_grad_clip, int | float)
            and self.depth_grad_clip > 0
            and math.isfinite(self.depth_grad_clip)
        ):
            raise UserError(
                f"--depth-grad-clip must be a number > 0, got {self.depth_grad_clip!r}"
            )
        try:
            parse_mtp_weight(self.mtp_weight)
        except ValueError as error:
            raise UserError(str(error)) from None
        self.mesh_axes()
        if self.num_devices is not None and self.num_devices < 1:
            raise UserError(f"--num-devices must be >= 1, got {self.num_devices}")
        if self.num_processes is not None and self.num_processes < 1:
            raise UserError(f"--num-processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and not (
            0 <= self.process_id < (self.num_processes or 1)
        ):
            raise UserError(
                f"--process-id must lie in [0, --num-processes), got {self.process_id}"
            )

    def mesh_axes(self) -> dict[str, int]:
        """`--mesh` as keyword arguments of [`eqx_mtp.make_mesh`][]."""
        axes = dict(data=-1, model=1, context=1)
        if not self.mesh:
            return axes
        for part in self.mesh.split(","):
            name, _, size = part.partition("=")
            name = name.strip()
            if name not in axes or not size.strip().lstrip("-").isdigit():
                raise UserError(
                    f"--mesh must look like 'data=4,model=2,context=1' (axes data, "
                    f"model, context), got {self.mesh!r}"
                )
            axes[name] = int(size)
        return axes

    def model_config(self) -> ModelConfig:
        """The model this run trains: byte-level, or shaped by `init_from`'s
        `config.json`."""
        if self.init_from is not None:
            return self._pretrained_config()
        try:
            return ModelConfig(
                vocab_size=BYTE_VOCAB_SIZE,
                dim=self.dim,
                num_layers=self.num_layers,
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                mlp_dim=self.mlp_dim,
                max_seq_len=self.max_seq_len or self.seq_len,
                **self._depth_and_step_options(),
            )
        except ValueError as error:
            raise UserError(str(error).replace("ModelConfig.", "--")) from None

    def _depth_and_step_options(self) -> dict[str, Any]:
        """The `ModelConfig` fields this config sets whatever shapes the trunk: the
        depths, and how a step is computed."""
        names = (
            "num_depths",
            "mtp_kind",
            "mtp_block",
            "depth_final_norm",
            "shared_depth_layer",
            "remat",
            "attention_impl",
            "attention_block_size",
            "compute_dtype",
            "train_depths_only",
        )
        return {name: getattr(self, name) for name in names}

    def _pretrained_config(self) -> ModelConfig:
        config_file = pathlib.Path(self.init_from) / CONFIG_FILE
        try:
            hf = json.loads(config_file.read_text())
        except (OSError, ValueError) as error:
            message = f"--init-from: cannot read {config_file}: {error}"
            raise UserError(message) from None
        options = self._depth_and_step_options()
        if self.max_seq_len is not None:
            options["max_seq_len"] = self.max_seq_len
        try:
            config = model_config_from_hf(hf, **options)
        except ValueError as error:
            message = str(error).replace("ModelConfig.", "--")
            raise UserError(f"--init-from {self.init_from}: {message}") from None
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        for name in ("dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
            asked, stored = getattr(self, name), getattr(config, name)
            if asked != defaults[name] and asked != stored:
                raise UserError(
                    f"--{_flag(name)}={asked} disagrees with --init-from's "
                    f"config.json ({stored}); the checkpoint sets the trunk's shape"
                )
        if self.seq_len > config.max_seq_len:
            raise UserError(
                f"--seq-len={self.seq_len} exceeds --init-from's "
                f"max_position_embeddings={config.max_seq_len}"
            )
        return config


# Fields that may change between a run and its resumption: they do not change what
# the next step computes (except `steps`, which only stretches the cosine decay).
RESUMABLE_FIELDS = frozenset(
    {
        "run",
        "resume",
        "steps",
        "eval_every",
        "save_every",
        "keep",
        "log_every",
        "eval_batches",
        # Any mesh and any number of processes compute the same step.
        "mesh",
        "num_devices",
        "coordinator",
        "num_processes",
        "process_id",
        "distributed",
        # How each step is computed, not what it computes (up to rounding).
        "remat",
        "attention_impl",
        "attention_block_size",
        # Parameters, optimizer state and gradients are float32 either way.
        "compute_dtype",
    }
)
# The same four as stored in the model's config.
RESUMABLE_MODEL_FIELDS = frozenset(
    f"model.{name}"
    for name in ("remat", "attention_impl", "attention_block_size", "compute_dtype")
)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON or TOML file of [`eqx_mtp.train.TrainConfig`][] fields."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"--config: no such file: {path}")
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(path.read_text())
        else:
            values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"--config: cannot parse {path}: {error}") from None
    if not isinstance(values, dict):
        raise UserError(f"--config: {path} must hold a table/object of fields")
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"--config: unknown fields in {path}: {', '.join(unknown)}")
    return values


def _resolve_run_directory(config: TrainConfig) -> pathlib.Path:
    if config.run is not None:
        run = pathlib.Path(config.run)
    elif config.resume:
        runs = sorted(p for p in pathlib.Path("runs").glob("*") if p.is_dir())
        if not runs:
            raise UserError("--resume: no run to continue under runs/; pass --run DIR")
        run = runs[-1]
    elif jax.process_count() > 1:
        raise UserError("--run: a multi-process run needs one run directory; pass it")
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run = pathlib.Path("runs") / stamp
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write-test-{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--run: cannot write to {run}: {error.strerror}") from None
    return run


def _has_checkpoints(run: pathlib.Path) -> bool:
    directory = run / "checkpoints"
    return directory.is_dir() and any(
        p.name.isdigit() for p in directory.iterdir() if p.is_dir()
    )


def _stored_config(config: TrainConfig) -> dict:
    train_fields = {
        k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_FIELDS
    }
    return dict(model=config.model_config().to_dict(), train=train_fields)


def _format_losses(losses) -> str:
    return " ".join(f"{x:.3f}" for x in losses)


def _log(metrics_file, record: dict) -> None:
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()


def train(
    config: TrainConfig, *, stop_after: int | None = None, progress: bool = True
) -> dict:
    """Start a training job, or continue it from the newest checkpoint of its run
    directory that loads, and return its summary.

    **Arguments:**

    - `config`: the [`eqx_mtp.train.TrainConfig`][].
    - `stop_after`: stop (after checkpointing) once this step is done, as if the job
        were pre-empted; `None` runs to `config.steps`.
    - `progress`: show a tqdm progress bar.

    **Returns:**

    A dict with the run directory, the final step, the last training metrics, the
    final eval and the mean tokens/s.

    **Raises:**

    `Preempted` when SIGTERM or SIGINT stopped the run (in any of its processes): the
    step it was at is checkpointed, and the same call continues it.
    """
    model_config = config.model_config()
    try:
        initialize(
            coordinator=config.coordinator,
            num_processes=config.num_processes,
            process_id=config.process_id,
            auto=config.distributed,
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    mesh = _make_mesh(config)
    _check_batch_fits(config, mesh)
    primary = is_primary()
    run = _resolve_run_directory(config)
    # Start or continue, as MaxText and Levanter do: a scheduler restarts a
    # preempted job with the command that first launched it.
    continuing = _has_checkpoints(run)
    if config.resume and not continuing:
        raise UserError(f"--resume: no checkpoint to continue in {run}")

    documents = load_documents(config.data)
    _check_corpus_fits_model(documents, config, model_config)
    train_docs, held_out = split_documents(
        documents, eval_fraction=config.eval_fraction, seed=config.seed
    )
    micro = config.micro_batches
    batch_shape = (micro, config.batch_size // micro, config.seq_len)
    batch_layout = batch_sharding(mesh, 3)
    _, local_rows, local_columns = process_box(batch_layout, batch_shape)
    batches = TrainBatches(
        train_docs,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        seed=config.seed,
        rows=[
            m * batch_shape[1] + row
            for m in range(micro)
            for row in range(local_rows.start, local_rows.stop)
        ],
        columns=local_columns,
    )
    evaluation = eval_batches(
        held_out, seq_len=config.seq_len, batch_size=config.batch_size
    )[: max(config.eval_batches, 1)]

    rng = jax.random.key(config.seed)
    # One device runs the plain program; otherwise the loss is vocabulary-parallel.
    loss_mesh = mesh if mesh.size > 1 else None
    model = _init_model(model_config, config.seed, loss_mesh, config.init_from)
    optimizer = make_optimizer(
        model,
        learning_rate=config.learning_rate,
        total_steps=config.steps,
        warmup_steps=config.warmup_steps,
        min_learning_rate_ratio=config.min_learning_rate_ratio,
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
        depth_grad_clip=config.depth_grad_clip,
    )
    opt_state = _init_opt_state(optimizer, model, loss_mesh)
    stored_config = _stored_config(config)
    checkpointer = Checkpointer(run / "checkpoints", keep=config.keep)
    start_step = 0
    if continuing:
        try:
            restored = checkpointer.restore(
                model_config=model_config,
                opt_state_template=jax.eval_shape(lambda: opt_state),
                config=stored_config,
                may_differ=RESUMABLE_MODEL_FIELDS,
                mesh=loss_mesh,
            )
        except CheckpointError as error:
            checkpointer.close()
            raise UserError(str(error)) from None
        model, opt_state, rng = restored.model, restored.opt_state, restored.rng
        batches.set_state(restored.data_state)
        start_step = restored.step
        set_aside = checkpointer.set_aside_after(start_step, run / DAMAGED_DIRECTORY)
        if set_aside and primary:
            print(
                f"checkpoints of steps {set_aside} did not load; kept under "
                f"{run / DAMAGED_DIRECTORY}",
                file=sys.stderr,
            )
    if primary:
        write_json(
            run / "config.json", dict(stored_config, run=dataclasses.asdict(config))
        )
        print("eqx-mtp train: effective config", file=sys.stderr)
        print(json.dumps(dataclasses.asdict(config), indent=2), file=sys.stderr)
        how = (
            f"continuing from the checkpoint of step {start_step}"
            if continuing
            else "starting fresh (no checkpoint)"
        )
        print(
            f"run directory: {run}, {how}; mesh {dict(mesh.shape)} over "
            f"{jax.process_count()} process(es)",
            file=sys.stderr,
        )

    mtp_weight = parse_mtp_weight(config.mtp_weight)
    last_step = config.steps if stop_after is None else min(stop_after, config.steps)
    tokens_per_step = config.batch_size * config.seq_len
    timed_tokens, timed_seconds = 0, 0.0
    last_metrics: dict = {}
    final_eval = None

    def save(step, eval_loss=None):
        checkpointer.save(
            step,
            model=model,
            opt_state=opt_state,
            data_state=batches.get_state(),
            rng=rng,
            config=stored_config,
            eval_loss=eval_loss,
        )

    def run_eval(step):
        result = evaluate(model, evaluation, mesh=loss_mesh)
        _log(metrics_file, dict(step=step, eval=result))
        return result

    metrics_path = run / "metrics.jsonl"
    preempted_at = None
    with (
        StopRequests() as stops,
        _open_metrics(metrics_path) if primary else _Discard() as metrics_file,
        tqdm(
            total=config.steps,
            initial=start_step,
            disable=not (progress and primary),
            dynamic_ncols=True,
            desc="train",
        ) as bar,
    ):
        for step in range(start_step + 1, last_step + 1):
            batch = next(batches)
            shaped = {
                k: global_array(
                    v.reshape(micro, -1, v.shape[-1]), batch_layout, batch_shape
                )
                for k, v in batch.items()
            }
            weight = float(mtp_weight(step - 1) if callable(mtp_weight) else mtp_weight)
            started = time.perf_counter()
            model, opt_state, metrics = train_step(
                optimizer,
                model,
                opt_state,
                shaped,
                np.asarray(weight, np.float32),
                config.reduction,
                loss_mesh,
            )
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - started
            if step > start_step + 1:  # the first step includes compilation
                timed_tokens += tokens_per_step
                timed_seconds += elapsed
            tokens_per_second = timed_tokens / timed_seconds if timed_seconds else 0.0
            depth_losses = [float(x) for x in metrics["depth_losses"]]
            last_metrics = dict(
                step=step,
                loss=float(metrics["loss"]),
                main_loss=depth_losses[0],
                depth_losses=depth_losses,
                mtp_weight=weight,
                grad_norm=float(metrics["grad_norm"]),
                tokens_per_second=tokens_per_second,
            )
            if not all(math.isfinite(x) for x in depth_losses):
                save(step)
                checkpointer.close()
                raise FloatingPointError(
                    f"non-finite loss at step {step}: {depth_losses}"
                )
            bar.update(1)
            bar.set_postfix_str(
                f"main {depth_losses[0]:.3f} | depths "
                f"{_format_losses(depth_losses[1:]) or '-'} | "
                f"{tokens_per_second:,.0f} tok/s"
            )
            if config.log_every and (step % config.log_every == 0 or step == last_step):
                _log(metrics_file, last_metrics)
            eval_loss = None
            if config.eval_every and step % config.eval_every == 0 and step < last_step:
                result = run_eval(step)
                eval_loss = result["depth_losses"][0]
                if primary:
                    bar.write(
                        f"step {step}: eval {result['main_bits_per_byte']:.3f} "
                        f"bits/byte, depth losses "
                        f"{_format_losses(result['depth_losses'])}"
                    )
            saved = (
                config.save_every and step % config.save_every == 0 and step < last_step
            )
            if saved:
                save(step, eval_loss)
            if stops.agreed():
                if not saved:
                    save(step)
                _log(metrics_file, last_metrics)
                preempted_at = step
                break
        final_step = max(last_step, start_step)
        if preempted_at is None and (
            final_step > start_step or not checkpointer.steps()
        ):
            final_eval = run_eval(final_step)
            save(final_step, final_eval["depth_losses"][0])
    checkpointer.close()
    if preempted_at is not None:
        raise Preempted(preempted_at, stops.signal_name)

    summary = dict(
        run=str(run),
        step=final_step,
        last_train=last_metrics,
        eval=final_eval,
        tokens_per_second=timed_tokens / timed_seconds if timed_seconds else None,
    )
    if final_eval is not None and primary:
        write_json(run / "summary.json", summary)
        from ._plot import plot_losses

        plot_losses(metrics_path, run / "losses.png")
        print(format_summary(summary))
    return summary


def _open_metrics(path: pathlib.Path):
    """Open the metrics log for appending, on a line of its own: a process killed
    mid-write leaves a partial last line, which readers skip."""
    metrics_file = open(path, "a+")
    if metrics_file.tell():
        metrics_file.seek(metrics_file.tell() - 1)
        if metrics_file.read(1) != "\n":
            metrics_file.write("\n")
    return metrics_file


class _Discard:
    """Stands in for the metrics file in processes other than the first."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _make_mesh(config: TrainConfig) -> Mesh:
    devices = jax.devices()
    if config.num_devices is not None:
        if jax.process_count() > 1:
            raise UserError("--num-devices is for single-process runs")
        if config.num_devices > len(devices):
            raise UserError(
                f"--num-devices={config.num_devices}, but there are {len(devices)}"
            )
        devices = devices[: config.num_devices]
    try:
        return make_mesh(**config.mesh_axes(), devices=devices)
    except ValueError as error:
        raise UserError(f"--mesh: {error}".replace("make_mesh: ", "")) from None


def _check_batch_fits(config: TrainConfig, mesh: Mesh) -> None:
    rows = config.batch_size // config.micro_batches
    if rows % mesh.shape["data"]:
        raise UserError(
            f"--batch-size={config.batch_size} / --micro-batches="
            f"{config.micro_batches} = {rows} rows per micro-batch cannot be split "
            f"over the mesh's data axis of size {mesh.shape['data']}"
        )
    if config.seq_len % mesh.shape["context"]:
        raise UserError(
            f"--seq-len={config.seq_len} cannot be split over the mesh's context axis "
            f"of size {mesh.shape['context']}"
        )


def _check_corpus_fits_model(
    documents, config: TrainConfig, model_config: ModelConfig
) -> None:
    tokens = is_token_corpus(documents)
    if config.init_from is not None and not tokens:
        raise UserError(
            "--init-from: a pretrained model reads its own tokenizer's ids; give "
            "--data as a .jsonl file with a 'tokens' list per line"
        )
    if config.init_from is None and tokens:
        raise UserError(
            "--data holds token ids ('tokens' fields), which only a model loaded "
            "with --init-from reads; the byte-level model reads text"
        )
    largest = max_token_id(documents)
    if largest >= model_config.vocab_size:
        raise UserError(
            f"--data: token id {largest} is outside the vocabulary of "
            f"{model_config.vocab_size} of --init-from's config.json"
        )


def _init_model(
    config: ModelConfig, seed: int, mesh: Mesh | None, init_from: str | None = None
) -> MTPModel:
    """The initial model, built straight into its shards on `mesh` (every process
    computes the same values from `seed`), or loaded from `init_from` (every process
    reads the same files) and placed there."""
    if init_from is not None:
        overrides = {k: v for k, v in config.to_dict().items() if k != "vocab_size"}
        try:
            model = load_llama(init_from, key=jax.random.key(seed), **overrides)
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


def _init_opt_state(optimizer, model: MTPModel, mesh: Mesh | None):
    params = eqx.filter(model, eqx.is_array)
    if mesh is None:
        return optimizer.init(params)
    shapes = jax.eval_shape(optimizer.init, params)
    return jax.jit(optimizer.init, out_shardings=named_shardings(shapes, mesh))(params)


def format_summary(summary: dict) -> str:
    """The final eval as a Markdown table: one row per depth."""
    result = summary["eval"]
    lines = [
        f"run {summary['run']}, step {summary['step']}, "
        f"{summary['tokens_per_second'] or 0:,.0f} tokens/s, held-out main loss "
        f"{result['main_bits_per_byte']:.3f} bits/byte",
        "",
        "| depth | predicts | loss (nats) | top-1 accuracy | agreement with trunk |",
        "|---|---|---|---|---|",
    ]
    for k, (loss, accuracy, agreement) in enumerate(
        zip(result["depth_losses"], result["depth_accuracy"], result["depth_agreement"])
    ):
        agree = "—" if k == 0 else f"{agreement:.3f}"
        lines.append(f"| {k} | t+{k + 1} | {loss:.3f} | {accuracy:.3f} | {agree} |")
    return "\n".join(lines)
