"""`TrainConfig`'s fields as `eqx-mtp train` flags and as the keys of a `--config`
file: the one table of flag names and help lines, and the checks of a file's
values."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import tomllib
import types
import typing
from typing import Any

from .._config import ATTENTION_IMPLS, COMPUTE_DTYPES, ModelConfig, RopeScaling
from ._config import (
    DEFAULT_MODEL,
    FIELD_PLACES,
    RENAMED,
    SECTIONS,
    TrainConfig,
    UserError,
    field_type,
)

FRAMING = "framing"
"""The key of a run's `config.json` that states how its tokenizer frames documents."""


def _choices(values) -> str:
    return "one of " + ", ".join(values)


# Every flag, by section, with its help line; a flag's name is its flat name with
# `-` for `_`. The default is appended where there is one.
FLAGS: dict[str, dict[str, str]] = {
    "model": {
        "dim": "width of the residual stream",
        "num_layers": "number of trunk blocks",
        "num_heads": "attention heads; must divide --dim",
        "num_kv_heads": "key/value heads (grouped-query attention); must divide "
        "--num-heads",
        "mlp_dim": "hidden width of the SwiGLU MLP",
        "max_seq_len": "longest row the model accepts (default: --seq-len, or "
        "--init-from's max_position_embeddings)",
        "num_depths": "MTP depths D: depth k predicts the token k + 1 places ahead; "
        "0 is plain next-token training",
        "mtp_kind": "sequential (DeepSeek-V3: each depth reads the one before) or "
        "parallel (every depth reads the trunk)",
        "mtp_block": "each depth's layer: transformer, mlp or linear",
        "depth_final_norm": "give each depth its own final norm before the shared "
        "unembedding",
        "shared_depth_layer": "one layer shared by every depth",
        "depth_trunk_input": "what depth 1 reads: the trunk's last state before_norm "
        "or after_norm (its final norm applied)",
        "depth_previous_input": "what depth k > 1 reads: depth k - 1's output "
        "before_norm or after_norm",
        "remat": "what the backward pass recomputes: none, full or save_dots",
        "attention_impl": _choices(ATTENTION_IMPLS)
        + " (blockwise: memory linear in the row length; auto: the backend's kernel "
        "where it has one)",
        "attention_block_size": "query and key tile size of the blockwise attention",
        "compute_dtype": _choices(COMPUTE_DTYPES)
        + ": dtype of the matmuls and activations; parameters, gradients and losses "
        "stay float32",
        "train_depths_only": "freeze the trunk: only the MTP depths learn",
    },
    "init": {
        "init_from": "start from a Hugging Face checkpoint directory (config.json + "
        "safetensors): it sets the trunk's shape and vocabulary, and its tokenizer "
        "(tokenizer.json) encodes the text of --data unless --tokenizer is given",
    },
    "objective": {
        "mtp_weight": "λ, the weight of the depths' loss: a float, or a schedule "
        "'0.3@0,0.1@800' (0.3 from step 0, 0.1 from step 800)",
        "reduction": "how the depths' losses are combined: mean (of each depth's "
        "mean) or pooled (over all depths' tokens)",
        "depth_schedule": "depth curriculum: forward (depths switch on one by one "
        "over the run, nearest first), reverse (all on, then switched off one by "
        "one, farthest first), either with the steps of its switches "
        "('forward@100,200'), or per-depth weights '1:0@0,1@200;2:0@0,1@400'; a "
        "depth that is off is not computed (default: every depth at every step)",
    },
    "optimizer": {
        "learning_rate": "peak learning rate of AdamW",
        "warmup_steps": "steps of linear warm-up before the cosine decay",
        "min_learning_rate_ratio": "learning rate at the last step, as a share of "
        "the peak",
        "weight_decay": "AdamW's decoupled weight decay (not on norms or biases)",
        "grad_clip": "clip the gradients by this global norm",
        "depth_grad_clip": "clip the depths' gradients by their own global norm, "
        "apart from the trunk's (default: one clip over all gradients)",
    },
    "data": {
        "data": "the corpus: a directory of text files, a .txt (documents separated "
        "by blank lines) or a .jsonl (a 'text' field; 'prompt' and 'completion', "
        "trained on the completion only; or 'tokens', ids of the model's tokenizer) "
        "(default: the .py files of this Python's standard library)",
        "tokenizer": "a Hugging Face tokenizer (a tokenizer.json, or a directory "
        "holding one with its tokenizer_config.json) to encode the text with; "
        "without --init-from, a fresh model of its vocabulary is trained (default: "
        "--init-from's tokenizer, else bytes)",
        "seq_len": "tokens per packed row",
        "batch_size": "rows per step",
        "micro_batches": "gradient accumulation: split each batch into this many parts",
        "eval_fraction": "share of the documents held out for evaluation",
    },
    "run": {
        "run": "run directory (default: a new runs/<timestamp>); a directory that "
        "holds a checkpoint is continued",
        "resume": "must continue a checkpoint: of --run, or of the newest run under "
        "runs/ that holds one",
        "steps": "last step of the run",
        "seed": "seed of the initial model, the held-out split and the batch order",
        "eval_every": "evaluate every this many steps (0: only at the end)",
        "eval_batches": "held-out batches per evaluation",
        "save_every": "checkpoint every this many steps (0: only at the end)",
        "keep": "how many of the latest checkpoints to keep (and the best one)",
        "log_every": "write the training metrics every this many steps (0: never)",
    },
    "mesh": {
        "mesh": "device mesh, e.g. 'data=4,model=2,context=1'; axes left out are 1, "
        "data takes the devices left (default: every device on data)",
        "num_devices": "use only the first N devices (single-process runs; default: "
        "all)",
        "coordinator": "HOST:PORT of process 0, for a multi-process run",
        "num_processes": "number of processes of a multi-process run",
        "process_id": "this process's index in a multi-process run",
        "distributed": "join a multi-process run whose peers JAX detects (TPU pod, "
        "SLURM)",
    },
}
_TITLES = {
    "model": "model (eqx_mtp.ModelConfig)",
    "init": "pretrained start",
    "objective": "objective",
    "optimizer": "optimizer",
    "data": "data",
    "run": "run directory, length and checkpoints",
    "mesh": "devices and processes",
}


def _default(name: str) -> Any:
    section, field = FIELD_PLACES[name]
    if section == "model":
        return getattr(DEFAULT_MODEL, field)
    if section is None:
        return None
    return getattr(getattr(TrainConfig(), section), field)


def _optional_inner(kind: Any) -> tuple[Any, bool]:
    """`(X, True)` for `X | None`, `(kind, False)` otherwise."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        inner = [k for k in typing.get_args(kind) if k is not type(None)]
        return inner[0], True
    return kind, False


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per entry of `FLAGS` to `parser`, in a group per section; a flag
    not given leaves no attribute (the parser's default must be `SUPPRESS`)."""
    for section, flags in FLAGS.items():
        group = parser.add_argument_group(_TITLES[section])
        for name, help_text in flags.items():
            flag = "--" + name.replace("_", "-")
            kind, _ = _optional_inner(field_type(name))
            default = _default(name)
            if kind is bool:
                group.add_argument(flag, action="store_true", dest=name, help=help_text)
                continue
            if default is not None and name != "max_seq_len":
                help_text += f" (default: {default})"
            group.add_argument(flag, type=kind, dest=name, help=help_text)


def _type_error(name: str, value: Any, kind: Any) -> str | None:
    """Why `value` is not of the field's type `kind`, or `None` when it is."""
    kind, optional = _optional_inner(kind)
    if value is None:
        return None if optional else "must not be null"
    if kind is bool:
        ok, what = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        what = "a number"
    elif typing.get_origin(kind) is tuple:
        ok = isinstance(value, list | tuple) and all(
            isinstance(item, int) and not isinstance(item, bool) for item in value
        )
        what = "a list of integers"
    elif kind is RopeScaling:
        ok, what = (
            isinstance(value, dict | RopeScaling),
            "a table of RoPE scaling fields",
        )
    else:
        ok, what = isinstance(value, str), "a string"
    return None if ok else f"must be {what}, got {value!r}"


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    """A nested layout's fields under their flat names; a flat one as it is."""
    if isinstance(values.get("train"), dict):
        # A run's config.json from before the sections: `run` holds every field
        # (the model's as asked), `train` those a resumed run must keep, `model` the
        # model as built (with `--init-from`, the checkpoint's shape).
        old = values.get("run") if isinstance(values.get("run"), dict) else {}
        flat = dict(values["train"]) | old
        model = values.get("model")
        if isinstance(model, dict):
            flat = {k: v for k, v in flat.items() if k not in _MODEL_FIELDS} | model
        return flat
    flat = {}
    for key, value in values.items():
        if key == FRAMING:
            continue  # the tokenizer's framing, stated for the reader: derived
        if key in SECTIONS and isinstance(value, dict):
            for field, inner in value.items():
                flat[RENAMED.get((key, field), field)] = inner
        else:
            flat[key] = value
    return flat


def flat_fields(values: dict[str, Any], *, where: str = "") -> dict[str, Any]:
    """`values` (flat or nested) under the fields' flat names, each checked against
    its field's type.

    **Raises:**

    `UserError` naming an unknown field or one of the wrong type.
    """
    prefix = f"{where}: " if where else ""
    flat = _flatten(values)
    if "max_seq_len" in flat and flat["max_seq_len"] is None:
        del flat["max_seq_len"]  # null, as the flat layout writes it: follow seq_len
    unknown = sorted(set(flat) - set(FIELD_PLACES))
    if unknown:
        raise UserError(f"{prefix}unknown fields: {', '.join(unknown)}")
    checked = {}
    for name, value in flat.items():
        kind = field_type(name)
        problem = _type_error(name, value, kind)
        if problem is not None:
            raise UserError(f"{prefix}{name} {problem}")
        inner, _ = _optional_inner(kind)
        checked[name] = float(value) if inner is float and value is not None else value
    return checked


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The fields of a JSON or TOML file, nested or flat (see
    `eqx_mtp.train.TrainConfig.from_dict`), under their flat names."""
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
    return flat_fields(values, where=f"--config {path}")


# Flat names of the fields that may change between a run and its resumption: they
# do not change what the next step computes (except `steps`, which only stretches
# the cosine decay).
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
_MODEL_FIELDS = frozenset(field.name for field in dataclasses.fields(ModelConfig))


def stored_config(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint stores to check a resumption against: the model, and the
    other fields a resumed run must keep, flat."""
    flat = {}
    for name, (section, field) in FIELD_PLACES.items():
        if section == "model" or name in RESUMABLE_FIELDS:
            continue
        owner = config if section is None else getattr(config, section)
        flat[name] = getattr(owner, field)
    return dict(model=config.model.to_dict(), train=flat)


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields, each named once (by its flag where it has one), in which a
    checkpoint's stored config differs from this run's; `train` fields that repeat
    the model's (stored before the sections existed) are read from `model`."""
    differences = []
    for part in ("model", "train"):
        a, b = saved.get(part) or {}, current.get(part) or {}
        if part == "model":
            a, b = _normalised_model(a), _normalised_model(b)
        for name in sorted(set(a) | set(b)):
            if name in RESUMABLE_FIELDS or (part == "train" and name in _MODEL_FIELDS):
                continue
            if a.get(name) != b.get(name):
                flagged = any(name in flags for flags in FLAGS.values())
                label = "--" + name.replace("_", "-") if flagged else f"{part}.{name}"
                differences.append(
                    f"{label} (saved {a.get(name)!r}, now {b.get(name)!r})"
                )
    return differences


def _normalised_model(values: dict[str, Any]) -> dict[str, Any]:
    """A stored model config as `ModelConfig.to_dict` writes it today: a field added
    since it was saved takes its default (which the saved model had), and a head
    width derived from `dim / num_heads` is left out (a change of `dim` is one
    difference, not two)."""
    try:
        normalised = ModelConfig.from_dict(values).to_dict()
    except (TypeError, ValueError):
        return values
    if normalised["head_dim"] * normalised["num_heads"] == normalised["dim"]:
        del normalised["head_dim"]
    return normalised
