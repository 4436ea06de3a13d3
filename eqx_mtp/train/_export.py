"""`eqx-mtp export`: a run's model as a Hugging Face checkpoint, its tokenizer files
beside it."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys
import warnings

import jax.numpy as jnp

from .._hf_checkpoint import CONFIG_FILE, save_hf_checkpoint
from .._hf_config import WeightsError, family_of
from .._hf_config_writing import infer_family
from .._hf_families import FAMILIES
from ._checkpoint import Checkpointer, CheckpointError
from ._config import UserError
from ._data import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID
from ._run_directory import (
    RUN_TOKENIZER,
    has_checkpoints,
    newest_run_with_a_checkpoint,
)
from ._text_tokenizer import TOKENIZER_FILES, TextTokenizer, TokenizerError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass
class ExportConfig:
    """What `eqx-mtp export` takes: the run directory (`None`: the newest run under
    `runs/` that holds a checkpoint), the directory to write, which checkpoint, the
    weights' dtype and the family (`None`: the one the run started from, or the
    plainest that holds the trunk)."""

    run: str | None
    to: str
    step: int | None = None
    dtype: str = "float32"
    family: str | None = None


@dataclasses.dataclass(frozen=True)
class _Origin:
    """Where a run's model came from: the family to write, the `config.json` token ids
    to carry and the directory whose tokenizer files go along."""

    family: str
    token_ids: dict
    tokenizer_directory: pathlib.Path | None
    init_from: str | None = None


def export_run(config: ExportConfig) -> list[str]:
    """Write a run's model as a Hugging Face checkpoint of its family, with the
    tokenizer files of the run (those it trained with, kept in its `tokenizer/`
    folder) or else of the checkpoint it started from.

    **Arguments:**

    - `config`: an `ExportConfig`.

    **Returns:**

    The lines that say what was written.

    **Raises:**

    `UserError` for bad input: an unknown dtype or family, a `--to` that exists and is
    not empty, no run or no checkpoint of `--step`, a family that cannot hold the
    trunk.
    """
    if config.dtype not in DTYPES:
        raise UserError(
            f"--dtype: must be one of {', '.join(DTYPES)}, got {config.dtype!r}"
        )
    if config.family is not None and config.family not in FAMILIES:
        raise UserError(
            f"--family: must be one of {', '.join(FAMILIES)}, got {config.family!r}"
        )
    target = pathlib.Path(config.to)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise UserError(
            f"--to: {target} already exists and is not an empty directory; refusing "
            "to overwrite it"
        )
    run = pathlib.Path(config.run or newest_run_with_a_checkpoint("--run"))
    step, model, stored = _restore(run, config.step)
    origin = _origin(model, stored, config.family, run / RUN_TOKENIZER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            save_hf_checkpoint(
                model,
                target,
                family=origin.family,
                dtype=DTYPES[config.dtype],
                metadata=origin.token_ids,
            )
        except WeightsError as error:
            flag = "--family" if config.family else "--run"
            raise UserError(f"{flag}: {error}") from None
        except OSError as error:
            raise UserError(f"--to: cannot write {target}: {error}") from None
    _report_warnings(caught)
    copied = _copy_tokenizer_files(origin.tokenizer_directory, target)
    depths = model.config.num_depths
    lines = [
        f"exported step {step} of {run} to {target}: family {origin.family}, "
        f"{config.dtype}, {depths} MTP depth{'s' if depths != 1 else ''}"
    ]
    if copied:
        lines.append(
            f"tokenizer files from {origin.tokenizer_directory}: {', '.join(copied)}"
        )
    elif origin.init_from is None and model.config.vocab_size == BYTE_VOCAB_SIZE:
        lines.append("no tokenizer files: a byte-level run's ids are its bytes")
    elif origin.init_from is None:
        lines.append("no tokenizer files: the run records no --init-from checkpoint")
    elif origin.tokenizer_directory is None:
        lines.append(f"no tokenizer files: {origin.init_from} does not read")
    else:
        lines.append(f"no tokenizer files in {origin.tokenizer_directory}")
    return lines


def _copy_tokenizer_files(
    source: pathlib.Path | None, target: pathlib.Path
) -> list[str]:
    """Copy the tokenizer files `source` holds into `target`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES if source is not None else ():
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied


def _restore(run: pathlib.Path, step: int | None):
    """`(step, model, stored config)` of checkpoint `step` (`None`: newest)."""
    if not run.is_dir():
        raise UserError(f"--run: no such directory: {run}")
    if not has_checkpoints(run):
        raise UserError(f"--run: no checkpoint in {run}")
    try:
        directory = run / "checkpoints"
        with Checkpointer(directory, async_save=False, read_only=True) as checkpointer:
            steps = checkpointer.steps()
            if step is not None and step not in steps:
                raise UserError(
                    f"--step: {run} holds no checkpoint of step {step}; its steps: "
                    f"{', '.join(map(str, steps))}"
                )
            restored = checkpointer.restore(step=step)
    except CheckpointError as error:
        raise UserError(f"--run: {error}") from None
    return restored.step, restored.model, restored.config


def _origin(model, stored: dict, family: str | None, kept: pathlib.Path) -> _Origin:
    """The family, token ids and tokenizer directory of a run's model: the family
    and token ids of the checkpoint it started from (`--init-from`), or a byte-level
    run's; the tokenizer the run kept (`kept`, its token ids where that checkpoint
    gives none), else that checkpoint's."""
    origin = _started_from(model, stored, family, kept.is_dir())
    if not kept.is_dir():
        return origin
    token_ids = origin.token_ids
    if not token_ids:
        try:
            framing = TextTokenizer.load(kept).framing
        except TokenizerError as error:
            raise UserError(
                f"--run: the run's tokenizer does not read: {error}"
            ) from None
        ids = (framing.bos_id, framing.eos_id)
        token_ids = {
            name: index for name, index in zip(_TOKEN_IDS, ids) if index is not None
        }
    return dataclasses.replace(origin, token_ids=token_ids, tokenizer_directory=kept)


def _started_from(model, stored: dict, family: str | None, kept: bool) -> _Origin:
    """`_origin` without the run's kept tokenizer."""
    init_from = ((stored or {}).get("train") or {}).get("init_from")
    if init_from is None:
        byte_level = model.config.vocab_size == BYTE_VOCAB_SIZE
        ids = (BOS_ID, EOS_ID, PAD_ID) if byte_level else ()
        return _Origin(
            family=family or infer_family(model.config),
            token_ids=dict(zip(_TOKEN_IDS, ids)),
            tokenizer_directory=None,
        )
    source = pathlib.Path(init_from)
    try:
        hf = json.loads((source / CONFIG_FILE).read_text())
        origin_family = family_of(hf).name
    except (OSError, ValueError) as error:
        if family is None:
            without = "" if kept else " without that checkpoint's tokenizer files"
            raise UserError(
                f"--run: the run started from --init-from {source}, whose "
                f"{CONFIG_FILE} does not read ({error}); pass --family to export "
                f"it{without}"
            ) from None
        return _Origin(family, {}, None, init_from)
    token_ids = {name: hf[name] for name in _TOKEN_IDS if name in hf}
    return _Origin(family or origin_family, token_ids, source, init_from)


def _report_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print the save's `UserWarning`s as one line each; pass the others on."""
    for caught_warning in caught:
        if issubclass(caught_warning.category, UserWarning):
            print(f"eqx-mtp export: warning: {caught_warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(
                caught_warning.message,
                caught_warning.category,
                caught_warning.filename,
                caught_warning.lineno,
            )
