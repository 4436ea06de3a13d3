"""Hugging Face Llama-family checkpoints in and out; MTP depths under DeepSeek-V3's
names.

A checkpoint is a directory with `config.json` and `model.safetensors` (or shards
listed in `model.safetensors.index.json`). Our arrays map one-to-one onto its tensors:
both use `[out, in]` matrices and the rotate-half RoPE layout, so nothing is
transposed. Depth `k` (1-based) of a model with `L` trunk layers is stored as
`model.layers.{L+k-1}`, as DeepSeek-V3 stores its MTP module.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray
from safetensors import safe_open
from safetensors.numpy import save_file

from ._config import ModelConfig
from ._llama_config import (
    OUR_SECTION,
    WeightsError,
    hf_config,
    model_config_from_hf,
)
from ._model import MTPModel, build_depths

__all__ = ["OUR_SECTION", "WeightsError", "hf_config", "model_config_from_hf"]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Our block's field path -> its Hugging Face name inside `model.layers.{i}`.
_BLOCK_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.q_proj.weight": "self_attn.q_proj.weight",
    "attention.k_proj.weight": "self_attn.k_proj.weight",
    "attention.v_proj.weight": "self_attn.v_proj.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    # The depth-only MLP block: its norm plays the post-attention norm's part.
    "norm.weight": "post_attention_layernorm.weight",
}
# A depth's own fields -> DeepSeek-V3's names.
_DEPTH_NAMES = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
}


def _path_name(path) -> str:
    return ".".join(
        str(getattr(part, "name", getattr(part, "key", getattr(part, "idx", part))))
        for part in path
    )


def _tensor_names(path: str, config: ModelConfig) -> list[str] | str:
    """The checkpoint name(s) of the array leaf at `path` in an `MTPModel`: a list, one
    per slice of the leading axis, for stacked leaves; one name otherwise."""
    layers = config.num_layers
    if path == "trunk.embedding":
        return "model.embed_tokens.weight"
    if path == "trunk.final_norm.weight":
        return "model.norm.weight"
    if path == "trunk.unembedding":
        return "lm_head.weight"
    if path.startswith("trunk.blocks."):
        name = _BLOCK_NAMES[path.removeprefix("trunk.blocks.")]
        return [f"model.layers.{i}.{name}" for i in range(layers)]
    if path.startswith("depths.depths.layer."):
        field = path.removeprefix("depths.depths.layer.")
        name = _BLOCK_NAMES.get(field, field)
        return [f"model.layers.{layers + k}.{name}" for k in range(config.num_depths)]
    if path.startswith("depths.depths."):
        name = _DEPTH_NAMES[path.removeprefix("depths.depths.")]
        return [f"model.layers.{layers + k}.{name}" for k in range(config.num_depths)]
    if path.startswith("depths.shared_layer."):
        field = path.removeprefix("depths.shared_layer.")
        return f"model.mtp_shared_layer.{_BLOCK_NAMES.get(field, field)}"
    raise AssertionError(f"no checkpoint name for {path}")


def is_array_or_shape(leaf) -> bool:
    """Arrays, and the shape-only leaves of an `eqx.filter_eval_shape` template."""
    return isinstance(leaf, jax.Array | jax.ShapeDtypeStruct)


def with_arrays(template, arrays: list):
    """`template` (a module, or its `eqx.filter_eval_shape`) with its array leaves
    replaced, in flattening order, by `arrays`."""
    shapes, static = eqx.partition(template, is_array_or_shape)
    treedef = jax.tree_util.tree_structure(shapes)
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, arrays), static)


def _named_leaves(model: MTPModel) -> Iterator[tuple[str, list[str] | str, object]]:
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(model, is_array_or_shape))
    for path, leaf in leaves:
        name = _path_name(path)
        yield name, _tensor_names(name, model.config), leaf


def model_tensors(model: MTPModel, *, dtype=None) -> dict[str, np.ndarray]:
    """Every array of `model` under its Hugging Face / DeepSeek-V3 name, as NumPy.

    **Arguments:**

    - `model`: the [`eqx_mtp.MTPModel`][].
    - `dtype`: cast floating arrays to this dtype (e.g. `jnp.bfloat16`); `None` keeps
        the model's.
    """
    if not isinstance(model, MTPModel):
        raise TypeError(f"model must be an eqx_mtp.MTPModel, got {type(model)}")
    tensors = {}
    for _, names, leaf in _named_leaves(model):
        if dtype is not None:
            leaf = leaf.astype(dtype)
        array = np.asarray(jax.device_get(leaf))
        if isinstance(names, str):
            tensors[names] = array
        else:
            tensors.update(zip(names, array, strict=True))
    return tensors


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

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.files:
            raise WeightsError(f"the checkpoint has no tensor {name!r}")
        with safe_open(self.files[name], framework="numpy") as file:
            tensor = file.get_tensor(name)
        if tensor.shape != shape:
            raise WeightsError(
                f"tensor {name!r} has shape {tensor.shape}, expected {shape} "
                "from config.json"
            )
        self.read.add(name)
        return tensor.astype(np.float32)


def _stored_depths(checkpoint: _Checkpoint, hf: dict) -> int:
    """DeepSeek-V3's `num_nextn_predict_layers` when the config has it, else the
    number of layers stored past the trunk's."""
    if hf.get("num_nextn_predict_layers") is not None:
        return hf["num_nextn_predict_layers"]
    num_layers = hf.get("num_hidden_layers", 0)
    count = 0
    while any(
        name.startswith(f"model.layers.{num_layers + count}.")
        for name in checkpoint.files
    ):
        count += 1
    return count


def load_llama(
    directory: str | os.PathLike,
    *,
    key: PRNGKeyArray | None = None,
    **overrides,
) -> MTPModel:
    """An [`eqx_mtp.MTPModel`][] from a Hugging Face Llama-family checkpoint.

    The trunk takes the checkpoint's weights. Depths stored under DeepSeek-V3's names
    (`model.layers.{L+k-1}.enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and the
    block's own weights) are loaded; depths beyond those are new, initialised as
    [`eqx_mtp.MTPModel`][] initialises them (a transformer depth's block like a trunk
    block). Weights are converted to float32.

    **Arguments:**

    - `directory`: holds `config.json` and `model.safetensors` or the shards named by
        `model.safetensors.index.json`.
    - `key`: PRNG key for the new depths; needed only when some depth is new.
    - `overrides`: [`eqx_mtp.ModelConfig`][] fields, e.g. `num_depths=2`,
        `train_depths_only=True`; see [`eqx_mtp.interop.model_config_from_hf`][].

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
    checkpoint = _Checkpoint(directory)
    if "num_depths" not in overrides:
        overrides["num_depths"] = max(_stored_depths(checkpoint, hf), 1)
    own_norm = f"model.layers.{hf.get('num_hidden_layers')}.shared_head.norm.weight"
    if OUR_SECTION not in hf and own_norm in checkpoint:
        # DeepSeek-V3's depths have their own final norm.
        overrides.setdefault("depth_final_norm", True)
    config = model_config_from_hf(hf, **overrides)
    if not config.tie_embeddings and "lm_head.weight" not in checkpoint:
        raise WeightsError(
            "config.json says tie_word_embeddings=false but the checkpoint has no "
            "lm_head.weight"
        )
    stored = min(_stored_depths(checkpoint, hf), config.num_depths)
    if stored < config.num_depths and key is None:
        raise ValueError(
            f"load_llama: {config.num_depths - stored} depth(s) are new and need a "
            "key=; pass key=jax.random.key(...)"
        )
    depth_key = jax.random.key(0) if key is None else key
    template = eqx.filter_eval_shape(MTPModel, config, key=depth_key)
    new_depths = None
    if stored < config.num_depths:
        new_depths = build_depths(config, key=jax.random.split(depth_key)[1])

    replacements = []
    for path, names, leaf in _named_leaves(template):
        if isinstance(names, str):
            replacements.append(jnp.asarray(checkpoint.get(names, leaf.shape)))
            continue
        slices = []
        for index, name in enumerate(names):
            is_depth = path.startswith("depths.")
            if is_depth and index >= stored:
                fresh = leaf_at(new_depths, path.removeprefix("depths."))
                slices.append(np.asarray(fresh[index]))
            else:
                slices.append(checkpoint.get(name, leaf.shape[1:]))
        replacements.append(jnp.asarray(np.stack(slices)))
    _check_all_read(checkpoint, config)
    return with_arrays(template, replacements)


def leaf_at(module, path: str):
    """The attribute at a dotted `path` (`"trunk.final_norm.weight"`)."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _check_all_read(checkpoint: _Checkpoint, config: ModelConfig) -> None:
    unread = sorted(set(checkpoint.files) - checkpoint.read)
    # DeepSeek-V3 stores copies of the shared embedding and head in every depth;
    # they are accepted when they equal the ones the model shares.
    shared = {
        "embed_tokens.weight": "model.embed_tokens.weight",
        "shared_head.head.weight": (
            "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
        ),
    }
    leftover = []
    for name in unread:
        if _layer_index(name) >= config.num_layers + config.num_depths:
            continue  # a stored depth beyond num_depths: left out on request
        suffix = name.split(".", 3)[-1]
        if name.startswith("model.layers.") and suffix in shared:
            reference = checkpoint.get(shared[suffix], _shape_of(checkpoint, name))
            if np.array_equal(checkpoint.get(name, reference.shape), reference):
                continue
            raise WeightsError(
                f"tensor {name!r} differs from {shared[suffix]!r}: the depths share "
                "the trunk's embedding and head, so a depth's own copy cannot be loaded"
            )
        leftover.append(name)
    if leftover:
        shown = ", ".join(leftover[:8]) + (" …" if len(leftover) > 8 else "")
        raise WeightsError(
            f"{len(leftover)} tensor(s) have no place in the model (unsupported "
            f"parameters, or more depths than num_depths): {shown}"
        )


def _layer_index(name: str) -> int:
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return -1


def _shape_of(checkpoint: _Checkpoint, name: str) -> tuple[int, ...]:
    with safe_open(checkpoint.files[name], framework="numpy") as file:
        return tuple(file.get_slice(name).get_shape())


def save_llama(
    model: MTPModel,
    directory: str | os.PathLike,
    *,
    dtype=None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write `model` as a Hugging Face Llama checkpoint, its depths under DeepSeek-V3's
    names; [`eqx_mtp.interop.load_llama`][] reads it back bit for bit.

    **Arguments:**

    - `model`: the [`eqx_mtp.MTPModel`][].
    - `directory`: created if absent; must not already hold a checkpoint.
    - `dtype`: cast the weights (e.g. `jnp.bfloat16`); `None` keeps float32.
    - `max_shard_bytes`: split the tensors over `model-0000k-of-0000n.safetensors` files
        of at most about this size, listed in `model.safetensors.index.json`; `None`
        writes one `model.safetensors`.
    """
    directory = _check_directory(directory)
    if max_shard_bytes is not None and (
        not isinstance(max_shard_bytes, int) or max_shard_bytes < 1
    ):
        raise ValueError(
            f"save_llama: max_shard_bytes must be a positive integer or None, got "
            f"{max_shard_bytes!r}"
        )
    if (directory / SINGLE_FILE).exists() or (directory / INDEX_FILE).exists():
        raise FileExistsError(
            f"save_llama: {directory} already holds a checkpoint; refusing to "
            "overwrite it"
        )
    tensors = model_tensors(model, dtype=dtype)
    directory.mkdir(parents=True, exist_ok=True)
    hf = hf_config(model.config)
    if dtype is not None:
        hf["torch_dtype"] = jnp.dtype(dtype).name
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / file, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, file)
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
            "weight_map": weight_map,
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2))


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
