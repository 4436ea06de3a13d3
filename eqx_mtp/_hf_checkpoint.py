"""Hugging Face checkpoints in and out, for every family `model_config_from_hf`
reads, with MTP depths under DeepSeek-V3's names or MiMo's.

A checkpoint is a directory with `config.json` and `model.safetensors` (or shards
listed in `model.safetensors.index.json`). Our arrays map onto its tensors: both use
`[out, in]` matrices and the rotate-half RoPE layout, so nothing is transposed; Phi-3's
fused projections are split on load and joined on save, and MiMo's depth projection
has its two input halves swapped.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray
from safetensors import safe_open
from safetensors.numpy import save_file

from ._config import ModelConfig
from ._hf_config import (
    FOREIGN_DEPTHS,
    OUR_SECTION,
    WeightsError,
    family_of,
    model_config_from_hf,
)
from ._hf_config_writing import family_named, hf_config
from ._hf_families import METADATA_KEYS, Family
from ._hf_names import (
    DEPTH_NAMES,
    Source,
    copies_of,
    depth_index,
    depth_prefix,
    leaf_at,
    model_tensors,
    named_leaves,
    swapped,
    with_arrays,
)
from ._model import MTPModel, build_depths

__all__ = ["OUR_SECTION", "WeightsError", "hf_config", "model_config_from_hf"]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _check_directory(directory) -> pathlib.Path:
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(
            f"directory must be a path (str or os.PathLike), got {type(directory)}"
        )
    return pathlib.Path(directory)


class _Checkpoint:
    """The tensors of a safetensors checkpoint, read one at a time."""

    def __init__(self, directory: pathlib.Path):
        index = directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif (directory / SINGLE_FILE).is_file():
            with safe_open(directory / SINGLE_FILE, framework="numpy") as file:
                names = list(file.keys())
            self.files = dict.fromkeys(names, directory / SINGLE_FILE)
        else:
            raise WeightsError(
                f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}"
            )
        self.read: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise WeightsError(f"the checkpoint has no tensor {name!r}")
        with safe_open(self.files[name], framework="numpy") as file:
            tensor = file.get_tensor(name)
        self.read.add(name)
        return tensor

    def get(self, source: Source | str, shape: tuple[int, ...]) -> np.ndarray:
        source = Source(source) if isinstance(source, str) else source
        tensor = self.tensor(source.name)
        if source.rows is not None:
            start, stop = source.rows
            if tensor.ndim != 2 or tensor.shape[0] < stop:
                raise WeightsError(
                    f"fused tensor {source.name!r} has shape {tensor.shape}; rows "
                    f"{start}:{stop} expected from config.json"
                )
            tensor = tensor[start:stop]
        if tensor.shape != shape:
            raise WeightsError(
                f"tensor {source.name!r} has shape {tensor.shape}, expected {shape} "
                "from config.json"
            )
        if source.swap_halves:
            tensor = swapped(tensor)
        return tensor.astype(np.float32)


def _stored_depths(checkpoint: _Checkpoint, hf: dict, layout: str) -> int:
    """How many depths the checkpoint holds, counted from its tensor names."""
    num_layers = hf.get("num_hidden_layers", 0)
    count = 0
    while True:
        prefix = depth_prefix(layout, num_layers, count) + "."
        if not any(name.startswith(prefix) for name in checkpoint.files):
            return count
        count += 1


def _depth_overrides(
    hf: dict, checkpoint: _Checkpoint, family: Family, overrides: dict
) -> int:
    """Set the depth options a foreign checkpoint implies (its layout's depth
    inputs, the depths' own final norm) in `overrides`; return how many depths it
    holds."""
    layout = family.mtp_layout
    stored = _stored_depths(checkpoint, hf, layout)
    announced = hf.get("num_nextn_predict_layers") or 0
    if OUR_SECTION in hf:
        # Ours: parallel depths sharing one layer have no tensors of their own.
        stored = max(stored, announced)
    if announced > stored and "num_depths" not in overrides:
        warnings.warn(
            f"config.json announces {announced} MTP depth(s) "
            "(num_nextn_predict_layers) but the checkpoint holds "
            f"{stored}; loading the trunk with {stored} depth(s)",
            stacklevel=3,
        )
    overrides.setdefault("num_depths", stored)
    if OUR_SECTION not in hf and stored:
        for field, value in FOREIGN_DEPTHS[layout].items():
            if field != "depth_final_norm":
                overrides.setdefault(field, value)
        first = depth_prefix(layout, hf.get("num_hidden_layers", 0), 0)
        norm = f"{first}.{DEPTH_NAMES[layout]['norm.weight']}"
        overrides.setdefault("depth_final_norm", norm in checkpoint)
    return stored


def load_hf_checkpoint(
    directory: str | os.PathLike,
    *,
    key: PRNGKeyArray | None = None,
    **overrides,
) -> MTPModel:
    """An [`eqx_mtp.MTPModel`][] from a Hugging Face checkpoint of any family
    [`eqx_mtp.interop.model_config_from_hf`][] reads.

    The trunk takes the checkpoint's weights. Depths stored under DeepSeek-V3's names
    (`model.layers.{L+k-1}.enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and the
    block's own weights) or, for MiMo, under `model.mtp_layers.{k-1}` are loaded,
    with the depth inputs of the implementation that reads that layout (the trunk's
    and the previous depth's states after their norms) unless `config.json` records
    ours. Depths beyond those are new, initialised as [`eqx_mtp.MTPModel`][]
    initialises them. Weights are converted to float32.

    **Arguments:**

    - `directory`: holds `config.json` and `model.safetensors` or the shards named by
        `model.safetensors.index.json`.
    - `key`: PRNG key for new depths; needed only when some depth is new.
    - `overrides`: [`eqx_mtp.ModelConfig`][] fields, e.g. `num_depths=2`,
        `train_depths_only=True`. `num_depths` defaults to the depths the checkpoint
        holds (0 for a plain model); a `config.json` that announces more
        (`num_nextn_predict_layers`) than it holds loads with a warning.

    **Returns:**

    The model. A configuration the trunk cannot represent, a missing or misshapen
    tensor, and a tensor the model has no place for are each a `WeightsError` that
    names it; nothing is loaded approximately. Stored depths beyond `num_depths` are
    left out.
    """
    directory = _check_directory(directory)
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise WeightsError(f"{directory} has no {CONFIG_FILE}")
    hf = json.loads(config_file.read_text())
    family = family_of(hf)
    checkpoint = _Checkpoint(directory)
    stored = _depth_overrides(hf, checkpoint, family, overrides)
    config = model_config_from_hf(hf, **overrides)
    if not config.tie_embeddings and "lm_head.weight" not in checkpoint:
        raise WeightsError(
            "config.json says tie_word_embeddings=false but the checkpoint has no "
            "lm_head.weight"
        )
    stored = min(stored, config.num_depths)
    if stored < config.num_depths and key is None:
        raise ValueError(
            f"load_hf_checkpoint: {config.num_depths - stored} depth(s) are new and "
            "need a key=; pass key=jax.random.key(...)"
        )
    depth_key = jax.random.key(0) if key is None else key
    template = eqx.filter_eval_shape(MTPModel, config, key=depth_key)
    new_depths = None
    if stored < config.num_depths:
        new_depths = build_depths(config, key=jax.random.split(depth_key)[1])

    replacements = []
    for path, sources, leaf in named_leaves(template, family):
        if isinstance(sources, Source):
            replacements.append(jnp.asarray(checkpoint.get(sources, leaf.shape)))
            continue
        slices = []
        for index, source in enumerate(sources):
            if path.startswith("depths.") and index >= stored:
                fresh = leaf_at(new_depths, path.removeprefix("depths."))
                slices.append(np.asarray(fresh[index]))
            else:
                slices.append(checkpoint.get(source, leaf.shape[1:]))
        replacements.append(jnp.asarray(np.stack(slices)))
    _check_all_read(checkpoint, config, family)
    return with_arrays(template, replacements)


def _check_all_read(
    checkpoint: _Checkpoint, config: ModelConfig, family: Family
) -> None:
    unread = sorted(set(checkpoint.files) - checkpoint.read)
    copies = copies_of(config, family)
    layout = family.mtp_layout
    leftover = []
    for name in unread:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers saved; derived from the config
        if depth_index(name, config, layout) >= config.num_depths:
            continue  # a stored depth beyond num_depths: left out on request
        if name in copies:
            original = checkpoint.tensor(copies[name])
            if np.array_equal(checkpoint.tensor(name), original):
                continue
            raise WeightsError(
                f"tensor {name!r} differs from {copies[name]!r}, which it must copy: "
                "the model shares one, so the copy cannot be loaded"
            )
        leftover.append(name)
    if leftover:
        shown = ", ".join(leftover[:8]) + (" …" if len(leftover) > 8 else "")
        raise WeightsError(
            f"{len(leftover)} tensor(s) have no place in the model (unsupported "
            f"parameters, or more depths than num_depths): {shown}"
        )


def save_hf_checkpoint(
    model: MTPModel,
    directory: str | os.PathLike,
    *,
    family: str | None = None,
    dtype=None,
    max_shard_bytes: int | None = None,
    metadata: dict | None = None,
) -> None:
    """Write `model` as a checkpoint that `family`'s transformers class loads (the
    depths are extra tensors to it), its depths under DeepSeek-V3's names (MiMo's for
    `family="mimo"`); [`eqx_mtp.interop.load_hf_checkpoint`][] reads it back bit for
    bit.

    Depths whose inputs differ from what the readers of that layout feed them (see
    `depth_trunk_input`, `depth_previous_input`) are written with a warning: the
    options are recorded in `config.json` for our loader, but another engine would
    draft from other states.

    **Arguments:**

    - `model`: the [`eqx_mtp.MTPModel`][].
    - `directory`: created if absent; must not already hold a checkpoint.
    - `family`: `"llama"`, `"mistral"`, `"qwen2"`, `"qwen3"`, `"phi3"`, `"olmo2"`,
        `"smollm3"` or `"mimo"`; `None`: the plainest family that holds the trunk
        (see [`eqx_mtp.interop.hf_config`][]).
    - `dtype`: cast the weights (e.g. `jnp.bfloat16`); `None` keeps float32.
    - `max_shard_bytes`: split the tensors over `model-0000k-of-0000n.safetensors` files
        of at most about this size, listed in `model.safetensors.index.json`; `None`
        writes one `model.safetensors`.
    - `metadata`: `config.json` keys that do not change the computation, written
        as given, e.g. `{"eos_token_id": 2, "bos_token_id": 1}` (token ids are
        `null` otherwise: the family's defaults may lie outside the vocabulary).
    """
    directory = _check_directory(directory)
    unknown = sorted(set(metadata or {}) - METADATA_KEYS)
    if unknown:
        raise ValueError(
            f"save_hf_checkpoint: metadata may hold only keys that do not change the "
            f"computation (token ids, generation defaults, ...); got {unknown}"
        )
    if max_shard_bytes is not None and (
        not isinstance(max_shard_bytes, int) or max_shard_bytes < 1
    ):
        raise ValueError(
            f"save_hf_checkpoint: max_shard_bytes must be a positive integer or None, "
            f"got {max_shard_bytes!r}"
        )
    if (directory / SINGLE_FILE).exists() or (directory / INDEX_FILE).exists():
        raise FileExistsError(
            f"save_hf_checkpoint: {directory} already holds a checkpoint; refusing "
            "to overwrite it"
        )
    if not isinstance(model, MTPModel):
        raise TypeError(f"model must be an eqx_mtp.MTPModel, got {type(model)}")
    hf = hf_config(model.config, family=family)
    chosen = family_named(family, model.config)
    _warn_foreign_depth_inputs(model.config, chosen)
    tensors = model_tensors(model, family=chosen.name, dtype=dtype)
    directory.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        hf["torch_dtype"] = jnp.dtype(dtype).name
    hf |= metadata or {}
    (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2))
    # safetensors writes its files readable by the owner only; give them the mode
    # config.json got from the umask, as every other file the user writes.
    mode = (directory / CONFIG_FILE).stat().st_mode & 0o777
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
        os.chmod(directory / SINGLE_FILE, mode)
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        os.chmod(directory / file, mode)
        weight_map |= dict.fromkeys(shard, file)
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _warn_foreign_depth_inputs(config: ModelConfig, family: Family) -> None:
    if not config.num_depths or config.mtp_kind != "sequential":
        return
    layout = family.mtp_layout
    foreign = FOREIGN_DEPTHS[layout]
    expected = (foreign["depth_trunk_input"], foreign["depth_previous_input"])
    ours = (config.depth_trunk_input, config.depth_previous_input)
    if ours != expected:
        warnings.warn(
            f"this model's depths read (depth_trunk_input, depth_previous_input) = "
            f"{ours}; readers of the {layout} layout feed them {expected}. eqx_mtp "
            "loads the file as it was trained; another engine would draft from "
            f"other states (train with depth_trunk_input={expected[0]!r}, "
            f"depth_previous_input={expected[1]!r} to serve it there)",
            stacklevel=3,
        )


def _shards(tensors: dict[str, np.ndarray], max_bytes: int | None) -> list[dict]:
    if max_bytes is None:
        return [tensors]
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(tensor)
        size += tensor.nbytes
    return shards


def load_llama(
    directory: str | os.PathLike, *, key: PRNGKeyArray | None = None, **overrides
) -> MTPModel:
    """The first release's name of [`eqx_mtp.interop.load_hf_checkpoint`][], which
    reads every family."""
    return load_hf_checkpoint(directory, key=key, **overrides)


def save_llama(model: MTPModel, directory: str | os.PathLike, **options) -> None:
    """The first release's name of [`eqx_mtp.interop.save_hf_checkpoint`][], which
    writes every family."""
    save_hf_checkpoint(model, directory, **options)
