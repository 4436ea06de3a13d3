"""MaxText's MTP parameters and loss mask in our conventions."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Shaped

from ._config import ModelConfig
from ._hf_names import leaf_at, with_arrays
from ._model import MTPModel

# MaxText's RMSNorm epsilon (`normalization_layer_epsilon`'s default).
MAXTEXT_NORM_EPS = 1e-5

# A depth's arrays: our field -> MaxText's names inside `mtp_block/mtp_layer_{k}`,
# older releases first (`mtp_{k}_…`), then the NNX attribute names.
_DEPTH_FIELDS = {
    "enorm": ("mtp_{k}_embedding_norm/scale", "embedding_norm/scale"),
    "hnorm": ("mtp_{k}_hidden_state_norm/scale", "hidden_state_norm/scale"),
    "eh_proj": ("mtp_{k}_projection/kernel", "projection_layer/kernel"),
}
_TRANSFORMER_LAYER = ("mtp_{k}_transformer_layer", "transformer_layer")


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    flat = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat |= _flatten(value, path + "/")
        else:
            flat[path] = value
    return flat


def _find(flat: dict, candidates: tuple[str, ...], what: str):
    for name in candidates:
        if name in flat:
            return name, np.asarray(flat[name], np.float32)
    raise ValueError(
        f"load_maxtext_mtp: params has no {what} (looked for {', '.join(candidates)})"
    )


def load_maxtext_mtp(
    model: MTPModel,
    params: Mapping,
    *,
    norm_eps: float = MAXTEXT_NORM_EPS,
    keep_depth_blocks: bool = False,
) -> MTPModel:
    """`model` with its depths' input norms and projections, the trunk's final norm,
    the token embedding and the output head taken from a MaxText parameter tree.

    MaxText stores depth `k` (1-based) under `mtp_block/mtp_layer_{k}`:
    `mtp_{k}_embedding_norm/scale` → `enorm.weight`, `mtp_{k}_hidden_state_norm/scale` →
    `hnorm.weight`, `mtp_{k}_projection/kernel` `[2·dim, dim]` → `eh_proj.weight`
    transposed (the NNX names `embedding_norm`, `hidden_state_norm`,
    `projection_layer` are accepted too). The concatenation order is the same in both,
    `[norm(embedding) ; norm(hidden)]`. `token_embedder/embedding` is the embedding;
    `decoder/decoder_norm/scale` the final norm, which MaxText's depths share (so
    `model` must not have `depth_final_norm`); `decoder/logits_dense/kernel`
    `[dim, vocab]` the unembedding transposed, absent when MaxText's
    `logits_via_embedding` ties it (then `model` must be tied too).

    **Arguments:**

    - `model`: a sequential [`eqx_mtp.MTPModel`][] of the same shape; its trunk
        blocks are kept.
    - `params`: the nested mapping of MaxText's parameters (a leading `params` level
        is allowed); leaves are arrays.
    - `norm_eps`: MaxText's RMSNorm epsilon; every norm of the returned model uses it.
    - `keep_depth_blocks`: MaxText's depth transformer layers
        (`mtp_{k}_transformer_layer`) use MaxText's own attention layout and are not
        converted; when `params` holds them this must be `True` to keep `model`'s
        depth blocks instead, so that nothing is loaded by accident.

    **Returns:**

    The new model; arrays converted to float32.
    """
    config = _check_model(model, params)
    flat = _flatten(params)
    if all(name.startswith("params/") for name in flat):
        flat = {name.removeprefix("params/"): value for name, value in flat.items()}
    stacked = _depth_layers(flat, config.num_depths, keep_depth_blocks)
    _, embedding = _find(flat, ("token_embedder/embedding",), "token embedding")
    _, final_norm = _find(flat, ("decoder/decoder_norm/scale",), "decoder norm")
    head = flat.get("decoder/logits_dense/kernel")
    if head is None and not config.tie_embeddings:
        raise ValueError(
            "load_maxtext_mtp: params has no decoder/logits_dense/kernel (MaxText's "
            "logits_via_embedding); build model with tie_embeddings=True"
        )
    if head is not None and config.tie_embeddings:
        raise ValueError(
            "load_maxtext_mtp: params has decoder/logits_dense/kernel, an untied "
            "head; build model with tie_embeddings=False"
        )
    replacements = {
        "trunk.embedding": embedding,
        "trunk.final_norm.weight": final_norm,
        "depths.depths.enorm.weight": stacked["enorm"],
        "depths.depths.hnorm.weight": stacked["hnorm"],
        "depths.depths.eh_proj.weight": np.swapaxes(stacked["eh_proj"], 1, 2),
    }
    if head is not None:
        replacements["trunk.unembedding"] = np.asarray(head, np.float32).T
    return _replaced(_with_norm_eps(model, norm_eps), replacements)


def _check_model(model, params) -> ModelConfig:
    """`model`'s config, once `model` and `params` are of the kinds MaxText's MTP
    parameters can be loaded into."""
    if not isinstance(model, MTPModel):
        raise TypeError(f"model must be an eqx_mtp.MTPModel, got {type(model)}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a nested mapping, got {type(params)}")
    config = model.config
    if config.num_depths == 0 or config.mtp_kind != "sequential":
        raise ValueError(
            "load_maxtext_mtp: model must have sequential depths (MaxText's MTP is "
            f"DeepSeek-V3's), got num_depths={config.num_depths}, "
            f"mtp_kind={config.mtp_kind!r}"
        )
    if config.depth_final_norm:
        raise ValueError(
            "load_maxtext_mtp: MaxText's depths share the decoder's final norm; build "
            "model with depth_final_norm=False"
        )
    return config


def _depth_layers(flat, num_depths: int, keep_depth_blocks: bool) -> dict:
    """MaxText's per-depth arrays of `_DEPTH_FIELDS`, stacked over the depths; its
    depth transformer layers are refused unless `keep_depth_blocks`, and depths beyond
    `num_depths` always."""
    layers = {}
    for k in range(1, num_depths + 1):
        prefix = f"mtp_block/mtp_layer_{k}/"
        inner = {
            name.removeprefix(prefix): value
            for name, value in flat.items()
            if name.startswith(prefix)
        }
        if not inner:
            raise ValueError(
                f"load_maxtext_mtp: params has no {prefix[:-1]} for depth {k} of "
                f"num_depths={num_depths}"
            )
        for field, names in _DEPTH_FIELDS.items():
            candidates = tuple(name.format(k=k) for name in names)
            _, value = _find(inner, candidates, f"{prefix}{names[0].format(k=k)}")
            layers.setdefault(field, []).append(value)
        blocks = [
            name
            for name in inner
            if name.split("/")[0] in {n.format(k=k) for n in _TRANSFORMER_LAYER}
        ]
        if blocks and not keep_depth_blocks:
            raise ValueError(
                f"load_maxtext_mtp: params holds {prefix}{blocks[0].split('/')[0]}, "
                "MaxText's depth transformer layer, which is not converted; pass "
                "keep_depth_blocks=True to keep the model's own depth blocks"
            )
    extra = sorted(
        {name.split("/")[1] for name in flat if name.startswith("mtp_block/")}
        - {f"mtp_layer_{k}" for k in range(1, num_depths + 1)}
    )
    if extra:
        raise ValueError(
            f"load_maxtext_mtp: params has {', '.join(extra)} beyond "
            f"num_depths={num_depths}"
        )
    return {field: np.stack(values) for field, values in layers.items()}


def _replaced(model: MTPModel, replacements: dict) -> MTPModel:
    """`model` with the leaf at each path of `replacements` replaced by its value, whose
    shape must be the leaf's."""
    for path, value in replacements.items():
        current = leaf_at(model, path)
        if value.shape != current.shape:
            raise ValueError(
                f"load_maxtext_mtp: {path} would take shape {value.shape} from "
                f"params, but the model's is {current.shape}"
            )
        model = eqx.tree_at(
            lambda m, path=path: leaf_at(m, path), model, jnp.asarray(value)
        )
    return model


def _with_norm_eps(model: MTPModel, norm_eps: float) -> MTPModel:
    """The same arrays in a model whose norms use `norm_eps` (a static field)."""
    config = dataclasses.replace(model.config, norm_eps=float(norm_eps))
    template = eqx.filter_eval_shape(MTPModel, config, key=jax.random.key(0))
    return with_arrays(
        template, jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
    )


def maxtext_loss_mask(
    decoder_target_mask: Shaped[Array | np.ndarray, "batch seq"],
) -> Bool[Array, "batch seq"]:
    """Our token-indexed boolean `loss_mask` from MaxText's `decoder_target_mask`.

    MaxText's mask is target-indexed: entry `i` says whether token `i + 1`, the target
    of position `i`, counts, and it may hold segment ids (1, 2, 3) where a boolean is
    meant. Ours says whether token `j` may be a target. So `loss_mask[:, j] =
    decoder_target_mask[:, j - 1] != 0`, and `loss_mask[:, 0]` is `False` (the first
    token is nobody's target). Pass the result as `loss_mask` to
    [`eqx_mtp.mtp_loss_sums`][] or [`eqx_mtp.mtp_depth_losses`][].
    """
    mask = jnp.asarray(decoder_target_mask)
    if mask.ndim != 2:
        raise ValueError(
            "maxtext_loss_mask: decoder_target_mask must be [batch, seq], got shape "
            f"{mask.shape}"
        )
    nonzero = mask != 0
    first = jnp.zeros((mask.shape[0], 1), jnp.bool_)
    return jnp.concatenate([first, nonzero[:, :-1]], axis=1)
