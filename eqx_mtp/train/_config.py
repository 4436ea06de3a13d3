"""The training job's configuration: one section per concern, composed into
`TrainConfig`, and read from a flat or nested dict (flags, a `--config` file, a run's
`config.json`)."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import typing
from typing import Any

from .._config import ModelConfig
from .._curriculum import DepthSchedule, parse_depth_schedule
from .._hf_checkpoint import CONFIG_FILE, model_config_from_hf
from .._schedule import parse_mtp_weight
from ._data import BYTE_VOCAB_SIZE


class UserError(Exception):
    """Bad input to the training job: reported as one line, without a traceback."""


def _at_least(name: str, value: int, least: int) -> None:
    if value < least:
        raise UserError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """How the depths' losses join the main loss: λ (`mtp_weight`, a float or a
    schedule `"0.3@0,0.1@800"`: 0.3 from step 0, 0.1 from step 800), the
    reduction over depths (`"mean"` or `"pooled"`, see [`eqx_mtp.mtp_loss`][]), and
    an optional depth curriculum (`depth_schedule`: `"forward"`, `"reverse"` or
    per-depth weights, see [`eqx_mtp.parse_depth_schedule`][]; `None` trains every
    depth at every step)."""

    mtp_weight: str = "0.3"
    reduction: str = "mean"
    depth_schedule: str | None = None

    def __post_init__(self):
        if self.reduction not in ("mean", "pooled"):
            raise UserError(
                f"--reduction must be 'mean' or 'pooled', got {self.reduction!r}"
            )
        try:
            parse_mtp_weight(self.mtp_weight)
        except ValueError as error:
            raise UserError(str(error)) from None


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warm-up and cosine decay, see [`eqx_mtp.train.make_optimizer`][]."""

    learning_rate: float = 2e-3
    warmup_steps: int = 30
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    depth_grad_clip: float | None = None

    def __post_init__(self):
        clip = self.depth_grad_clip
        if clip is not None and not (clip > 0 and math.isfinite(clip)):
            raise UserError(f"--depth-grad-clip must be a number > 0, got {clip!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The corpus (`path`, see [`eqx_mtp.train.load_documents`][]; `None` is the
    standard library's `.py` files), the tokenizer that encodes its text
    (`tokenizer`, see [`eqx_mtp.train.TextTokenizer.load`][]; `None`: the
    `--init-from` checkpoint's, else bytes), the rows it is packed into, and the
    share held out for evaluation."""

    path: str | None = None
    tokenizer: str | None = None
    seq_len: int = 256
    batch_size: int = 12
    micro_batches: int = 1
    eval_fraction: float = 0.02

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "micro_batches"):
            _at_least(name, getattr(self, name), 1)
        if self.path == "":
            raise UserError(
                "--data must name a directory, a .txt or a .jsonl file, got an empty "
                "string; leave --data out for the default corpus"
            )
        if self.tokenizer == "":
            raise UserError(
                "--tokenizer must name a tokenizer.json or a directory holding one, "
                "got an empty string"
            )
        if self.batch_size % self.micro_batches:
            raise UserError(
                f"--micro-batches={self.micro_batches} must divide "
                f"--batch-size={self.batch_size}"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise UserError(
                f"--eval-fraction must lie in (0, 1), got {self.eval_fraction}"
            )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The run directory (`directory`; default `runs/<timestamp>`), how long the run
    is, its seed, and how often it logs, evaluates and checkpoints (0: never)."""

    directory: str | None = None
    resume: bool = False
    steps: int = 300
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep: int = 3
    log_every: int = 10

    def __post_init__(self):
        for name in ("steps", "keep"):
            _at_least(name, getattr(self, name), 1)
        for name in ("eval_every", "save_every", "log_every", "eval_batches"):
            _at_least(name, getattr(self, name), 0)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Where the job runs: `axes` as `"data=4,model=2,context=1"` (axes left out are
    1, except `data`, which takes the devices the others leave) over every device, or
    over the first `num_devices` of a single-process run; `coordinator`,
    `num_processes` and `process_id` start a multi-process run, `distributed` one
    whose peers JAX detects (TPU pods, SLURM)."""

    axes: str | None = None
    num_devices: int | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed: bool = False

    def __post_init__(self):
        self.axis_sizes()
        for name in ("num_devices", "num_processes"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.process_id is not None and not (
            0 <= self.process_id < (self.num_processes or 1)
        ):
            raise UserError(
                f"--process-id must lie in [0, --num-processes), got {self.process_id}"
            )

    def axis_sizes(self) -> dict[str, int]:
        """`--mesh` as keyword arguments of [`eqx_mtp.make_mesh`][]."""
        axes = dict(data=-1, model=1, context=1)
        if not self.axes:
            return axes
        for part in self.axes.split(","):
            name, _, size = part.partition("=")
            name = name.strip()
            if name not in axes or not size.strip().lstrip("-").isdigit():
                raise UserError(
                    f"--mesh must look like 'data=4,model=2,context=1' (axes data, "
                    f"model, context), got {self.axes!r}"
                )
            axes[name] = int(size)
        return axes


# The byte-level model `eqx-mtp train` trains unless told otherwise; `max_seq_len`
# follows `--seq-len` unless given.
DEFAULT_MODEL = ModelConfig(
    vocab_size=BYTE_VOCAB_SIZE,
    dim=192,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=512,
    max_seq_len=DataConfig.seq_len,
    num_depths=2,
)
# Set by `--init-from`'s config.json, not by the job's flags.
TRUNK_SHAPE = ("dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim")
# What a checkpoint's stored depths are: kept from it unless the job asks otherwise.
DEPTH_SHAPE = (
    "num_depths",
    "mtp_kind",
    "mtp_block",
    "depth_final_norm",
    "shared_depth_layer",
    "depth_trunk_input",
    "depth_previous_input",
)
# Set by the job whatever shapes the trunk: the depths, and how a step is computed.
JOB_MODEL_FIELDS = DEPTH_SHAPE + (
    "remat",
    "attention_impl",
    "attention_block_size",
    "compute_dtype",
    "train_depths_only",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `eqx-mtp train` needs, in sections; build it from flags or a file
    with `eqx_mtp.train.TrainConfig.from_dict`.

    **Arguments:**

    - `model`: the [`eqx_mtp.ModelConfig`][] trained; with `init_from`, the one its
        `config.json` gives (the trunk's shape and vocabulary), with this job's depths
        and step options.
    - `init_from`: a Hugging Face checkpoint directory to start from (see
        [`eqx_mtp.interop.load_hf_checkpoint`][]); its tokenizer encodes the text
        unless `data.tokenizer` names another, and a corpus of token ids (a `.jsonl`
        with a `tokens` field) is read as it is.
    - `objective`: an `eqx_mtp.train.ObjectiveConfig`.
    - `optimizer`: an `eqx_mtp.train.OptimizerConfig`.
    - `data`: an `eqx_mtp.train.DataConfig`.
    - `run`: an `eqx_mtp.train.RunConfig`.
    - `mesh`: an `eqx_mtp.train.MeshConfig`.

    `model.remat`, `attention_impl`, `attention_block_size` and `compute_dtype`, like
    the mesh, may change when a run continues: they change how a step is computed and
    its rounding, not what it computes.
    """

    model: ModelConfig = DEFAULT_MODEL
    init_from: str | None = None
    objective: ObjectiveConfig = ObjectiveConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        seq_len, model = self.data.seq_len, self.model
        if seq_len > model.max_seq_len:
            which = (
                "--init-from's max_position_embeddings"
                if self.init_from
                else ("the model's --max-seq-len")
            )
            raise UserError(f"--seq-len={seq_len} exceeds {which}={model.max_seq_len}")
        if model.num_depths >= seq_len:
            raise UserError(
                f"--num-depths={model.num_depths} must be smaller than "
                f"--seq-len={seq_len} (depth D predicts D + 1 tokens ahead)"
            )
        self.depth_curriculum()

    def depth_curriculum(self) -> DepthSchedule | None:
        """The depth curriculum `objective.depth_schedule` names, for this model and
        number of steps; `None` without one.

        **Raises:**

        `UserError` naming `--depth-schedule` when it cannot be read.
        """
        spec = self.objective.depth_schedule
        if spec is None:
            return None
        try:
            return parse_depth_schedule(
                spec, num_depths=self.model.num_depths, steps=self.run.steps
            )
        except ValueError as error:
            message = str(error).removeprefix("depth_schedule: ")
            raise UserError(f"--depth-schedule: {message}") from None

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a nested, JSON-serialisable dict (the layout
        `from_dict` reads and the run directory's `config.json` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "") -> TrainConfig:
        """Build a configuration from a dict, nested (`to_dict`'s layout) or flat
        (one key per `eqx-mtp train` flag, `-` written `_`: `{"steps": 300, "dim":
        192}`), or the `config.json` of a run written before the sections existed.
        Fields left out keep their defaults; `max_seq_len` follows `seq_len` unless
        given. With `init_from`, its `config.json` is read for the model.

        **Arguments:**

        - `values`: the fields.
        - `where`: where they come from, to start error messages with (`"--config
            FILE"`).

        **Raises:**

        `UserError` naming the field: an unknown name, a value of the wrong type, or
        one out of range.
        """
        from ._flags import flat_fields

        flat = flat_fields(values, where=where)
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for name, value in flat.items():
            section, field = FIELD_PLACES[name]
            if section is not None:
                sections[section][field] = value
        init_from = flat.get("init_from")
        built = {
            name: SECTIONS[name](**fields)
            for name, fields in sections.items()
            if name != "model"
        }
        model = _model_config(sections["model"], init_from, built["data"])
        return cls(model=model, init_from=init_from, **built)


SECTIONS: dict[str, type] = dict(
    model=ModelConfig,
    objective=ObjectiveConfig,
    optimizer=OptimizerConfig,
    data=DataConfig,
    run=RunConfig,
    mesh=MeshConfig,
)
# A field's flat name (its flag without `--`, `_` for `-`) where it is not the
# field's own name.
RENAMED = {
    ("data", "path"): "data",
    ("run", "directory"): "run",
    ("mesh", "axes"): "mesh",
}
# Flat name -> (section, field); `init_from` is a field of `TrainConfig` itself.
FIELD_PLACES: dict[str, tuple[str | None, str]] = {"init_from": (None, "init_from")}
for _section, _cls in SECTIONS.items():
    for _field in dataclasses.fields(_cls):
        _name = RENAMED.get((_section, _field.name), _field.name)
        FIELD_PLACES[_name] = (_section, _field.name)


def field_type(name: str) -> Any:
    """The annotated type of the field of flat name `name`."""
    section, field = FIELD_PLACES[name]
    owner = TrainConfig if section is None else SECTIONS[section]
    return typing.get_type_hints(owner)[field]


def _model_error(error: ValueError) -> UserError:
    message = str(error)
    for field in dataclasses.fields(ModelConfig):
        message = message.replace(
            f"ModelConfig.{field.name}", "--" + field.name.replace("_", "-")
        )
    return UserError(message)


def _model_config(
    given: dict[str, Any], init_from: str | None, data: DataConfig
) -> ModelConfig:
    """The model: `init_from`'s, or the byte-level default with `given` fields (the
    vocabulary of `data.tokenizer`'s where there is one)."""
    if init_from is not None:
        return _pretrained_config(given, init_from)
    defaults = dict(max_seq_len=data.seq_len, head_dim=None)
    if data.tokenizer is not None:
        defaults["vocab_size"] = tokenizer_vocab_size(data.tokenizer, given)
    values = DEFAULT_MODEL.to_dict() | defaults | given
    try:
        return ModelConfig.from_dict(values)
    except ValueError as error:
        raise _model_error(error) from None


def tokenizer_vocab_size(path: str, given: dict[str, Any]) -> int:
    """The vocabulary of a fresh model for the tokenizer at `path`: the tokenizer's,
    or a larger `vocab_size` given (padding)."""
    from ._text_tokenizer import TextTokenizer, TokenizerError

    try:
        needed = TextTokenizer.load(path).vocab_size
    except TokenizerError as error:
        raise UserError(f"--tokenizer: {error}") from None
    asked = given.get("vocab_size", needed)
    if asked < needed:
        raise UserError(
            f"--vocab-size={asked} is smaller than the vocabulary of --tokenizer "
            f"{path} ({needed} ids)"
        )
    return asked


def _pretrained_config(given: dict[str, Any], init_from: str) -> ModelConfig:
    config_file = pathlib.Path(init_from) / CONFIG_FILE
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        message = f"--init-from: cannot read {config_file}: {error}"
        raise UserError(message) from None
    options = {name: getattr(DEFAULT_MODEL, name) for name in JOB_MODEL_FIELDS}
    if hf.get("num_nextn_predict_layers"):
        # The checkpoint's depths keep their own shape and inputs unless asked.
        for name in DEPTH_SHAPE:
            options.pop(name)
    options |= {k: v for k, v in given.items() if k in JOB_MODEL_FIELDS}
    if "max_seq_len" in given:
        options["max_seq_len"] = given["max_seq_len"]
    try:
        config = model_config_from_hf(hf, **options)
    except ValueError as error:
        raise UserError(f"--init-from {init_from}: {_model_error(error)}") from None
    for name, asked in given.items():
        stored = getattr(config, name)
        if name not in options and asked != stored:
            raise UserError(
                f"--{name.replace('_', '-')}={asked} disagrees with --init-from's "
                f"config.json ({stored}); the checkpoint sets the trunk's shape"
            )
    return config
