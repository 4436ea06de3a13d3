"""Where each array of an [`eqx_mtp.MTPModel`][] lives in a Hugging Face checkpoint
of each family: tensor names, Phi-3's fused rows, MiMo's swapped projection halves,
and the copies a checkpoint may hold of arrays the model shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import equinox as eqx
import jax
import numpy as np

from ._config import ModelConfig
from ._hf_config import WeightsError
from ._hf_config_writing import family_named
from ._hf_families import Family
from ._model import MTPModel

# A depth's own fields -> their names in each layout.
DEPTH_NAMES = {
    "deepseek_v3": {
        "enorm.weight": "enorm.weight",
        "hnorm.weight": "hnorm.weight",
        "eh_proj.weight": "eh_proj.weight",
        "norm.weight": "shared_head.norm.weight",
    },
    "mimo": {
        "enorm.weight": "token_layernorm.weight",
        "hnorm.weight": "hidden_layernorm.weight",
        "eh_proj.weight": "input_proj.weight",
        "norm.weight": "final_layernorm.weight",
    },
}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one array (or one slice of a stacked array) lives in the checkpoint:
    the tensor `name`, rows `[start, stop)` of it when fused, and whether its two
    column halves are stored the other way round (MiMo's `input_proj`)."""

    name: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False


def block_names(family: Family, config: ModelConfig) -> dict[str, Source]:
    """Our block's field path -> its tensor inside `model.layers.{i}`."""
    if config.norm_position == "post":
        norms = {
            "attention_norm.weight": "post_attention_layernorm.weight",
            "mlp_norm.weight": "post_feedforward_layernorm.weight",
        }
    else:
        norms = {
            "attention_norm.weight": "input_layernorm.weight",
            "mlp_norm.weight": "post_attention_layernorm.weight",
        }
    names = {path: Source(name) for path, name in norms.items()}
    # The depth-only MLP block: its norm plays the post-attention norm's part.
    names["norm.weight"] = Source("post_attention_layernorm.weight")
    for proj in ("q", "k", "v", "o"):
        for part in ("weight", "bias"):
            name = f"self_attn.{proj}_proj.{part}"
            names[f"attention.{proj}_proj.{part}"] = Source(name)
    for norm in ("q_norm", "k_norm"):
        names[f"attention.{norm}.weight"] = Source(f"self_attn.{norm}.weight")
    for proj in ("gate", "up", "down"):
        names[f"mlp.{proj}_proj.weight"] = Source(f"mlp.{proj}_proj.weight")
    if family.fused:
        q_width = config.num_heads * config.head_dim
        kv_width = config.num_kv_heads * config.head_dim
        bounds = {
            "q": (0, q_width),
            "k": (q_width, q_width + kv_width),
            "v": (q_width + kv_width, q_width + 2 * kv_width),
        }
        for proj, rows in bounds.items():
            names[f"attention.{proj}_proj.weight"] = Source(
                "self_attn.qkv_proj.weight", rows
            )
        names["mlp.gate_proj.weight"] = Source(
            "mlp.gate_up_proj.weight", (0, config.mlp_dim)
        )
        names["mlp.up_proj.weight"] = Source(
            "mlp.gate_up_proj.weight", (config.mlp_dim, 2 * config.mlp_dim)
        )
    return names


def depth_prefix(layout: str, num_layers: int, k: int) -> str:
    """Depth `k + 1`'s tensor prefix, in a model of `num_layers` trunk layers."""
    if layout == "mimo":
        return f"model.mtp_layers.{k}"
    return f"model.layers.{num_layers + k}"


def within(prefix: str, source: Source) -> Source:
    return dataclasses.replace(source, name=f"{prefix}.{source.name}")


def path_name(path) -> str:
    return ".".join(
        str(getattr(part, "name", getattr(part, "key", getattr(part, "idx", part))))
        for part in path
    )


def sources_of(path: str, config: ModelConfig, family: Family) -> list[Source] | Source:
    """The checkpoint source(s) of the array leaf at `path` in an `MTPModel`: a
    list, one per slice of the leading axis, for stacked leaves; one otherwise."""
    layout = family.mtp_layout
    blocks = block_names(family, config)
    if path == "trunk.embedding":
        return Source("model.embed_tokens.weight")
    if path == "trunk.final_norm.weight":
        return Source("model.norm.weight")
    if path == "trunk.unembedding":
        return Source("lm_head.weight")
    if path.startswith("trunk.blocks."):
        source = blocks[path.removeprefix("trunk.blocks.")]
        return [within(f"model.layers.{i}", source) for i in range(config.num_layers)]
    depth_prefixes = [
        depth_prefix(layout, config.num_layers, k) for k in range(config.num_depths)
    ]
    if path.startswith("depths.depths.layer."):
        source = blocks[path.removeprefix("depths.depths.layer.")]
        return [within(prefix, source) for prefix in depth_prefixes]
    if path.startswith("depths.depths."):
        field = path.removeprefix("depths.depths.")
        # MiMo's projection reads [hidden ; embedding], the other way round.
        swap = layout == "mimo" and field == "eh_proj.weight"
        source = Source(DEPTH_NAMES[layout][field], swap_halves=swap)
        return [within(prefix, source) for prefix in depth_prefixes]
    if path.startswith("depths.shared_layer."):
        if layout == "mimo":
            raise WeightsError("MiMo's layout has no shared depth layer")
        source = blocks[path.removeprefix("depths.shared_layer.")]
        return within("model.mtp_shared_layer", source)
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


def named_leaves(model, family: Family) -> Iterator[tuple[str, object, object]]:
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(model, is_array_or_shape))
    for path, leaf in leaves:
        name = path_name(path)
        yield name, sources_of(name, model.config, family), leaf


def swapped(array: np.ndarray) -> np.ndarray:
    half = array.shape[-1] // 2
    return np.concatenate([array[..., half:], array[..., :half]], axis=-1)


def model_tensors(
    model: MTPModel, *, family: str | None = None, dtype=None
) -> dict[str, np.ndarray]:
    """Every array of `model` under its Hugging Face name in `family`'s layout, as
    NumPy: fused projections joined, and a depth without its own final norm given a
    copy of the trunk's (every reader of these layouts expects one).

    **Arguments:**

    - `model`: the [`eqx_mtp.MTPModel`][].
    - `family`: as for [`eqx_mtp.interop.save_hf_checkpoint`][].
    - `dtype`: cast floating arrays to this dtype (e.g. `jnp.bfloat16`); `None` keeps
        the model's.
    """
    if not isinstance(model, MTPModel):
        raise TypeError(f"model must be an eqx_mtp.MTPModel, got {type(model)}")
    chosen = family_named(family, model.config)
    parts: dict[str, list[tuple[Source, np.ndarray]]] = {}
    for _, sources, leaf in named_leaves(model, chosen):
        if dtype is not None:
            leaf = leaf.astype(dtype)
        array = np.asarray(jax.device_get(leaf))
        pairs = (
            [(sources, array)]
            if isinstance(sources, Source)
            else zip(sources, array, strict=True)
        )
        for source, piece in pairs:
            if source.swap_halves:
                piece = swapped(piece)
            parts.setdefault(source.name, []).append((source, piece))
    tensors = {}
    for name, pieces in parts.items():
        pieces.sort(key=lambda pair: (pair[0].rows or (0, 0))[0])
        tensors[name] = (
            np.concatenate([piece for _, piece in pieces], axis=0)
            if (pieces[0][0].rows is not None)
            else pieces[0][1]
        )
    config = model.config
    sequential = config.mtp_kind == "sequential"
    if config.num_depths and sequential and not config.depth_final_norm:
        layout = chosen.mtp_layout
        norm_name = DEPTH_NAMES[layout]["norm.weight"]
        for k in range(config.num_depths):
            prefix = depth_prefix(layout, config.num_layers, k)
            tensors[f"{prefix}.{norm_name}"] = tensors["model.norm.weight"].copy()
    return tensors


def leaf_at(module, path: str):
    """The attribute at a dotted `path` (`"trunk.final_norm.weight"`)."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


def copies_of(config: ModelConfig, family: Family) -> dict[str, str]:
    """Tensors a checkpoint may hold that copy one the model has: accepted when
    equal to it. DeepSeek-V3 stores the shared embedding and head in every depth; a
    depth without its own final norm is written with a copy of the trunk's; a tied
    model's `lm_head` is the embedding."""
    head = "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
    copies = {"lm_head.weight": "model.embed_tokens.weight"}
    layout = family.mtp_layout
    for k in range(config.num_depths):
        prefix = depth_prefix(layout, config.num_layers, k)
        copies[f"{prefix}.embed_tokens.weight"] = "model.embed_tokens.weight"
        copies[f"{prefix}.shared_head.head.weight"] = head
        if not config.depth_final_norm:
            norm = DEPTH_NAMES[layout]["norm.weight"]
            copies[f"{prefix}.{norm}"] = "model.norm.weight"
    return copies


def depth_index(name: str, config: ModelConfig, layout: str) -> int:
    """The 0-based depth a tensor belongs to; -1 for the trunk's."""
    parts = name.split(".")
    if layout == "mimo":
        if parts[:2] == ["model", "mtp_layers"] and parts[2].isdigit():
            return int(parts[2])
        return -1
    if parts[:2] == ["model", "layers"] and parts[2].isdigit():
        index = int(parts[2]) - config.num_layers
        return index if index >= 0 else -1
    return -1
