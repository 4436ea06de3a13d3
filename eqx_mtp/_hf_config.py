"""Hugging Face `config.json` to and from [`eqx_mtp.ModelConfig`][], for every family
in `FAMILIES`, in both layouts transformers writes: 4.x (top-level `rope_theta` and
`rope_scaling`) and 5.x (`rope_parameters`). Keys are read by allow-list: a key that
may change the computation is interpreted or refused by name."""

from __future__ import annotations

import math
from typing import Any

from ._config import ModelConfig, RopeScaling
from ._hf_families import (
    BY_MODEL_TYPE,
    METADATA_KEYS,
    REFUSED_MODEL_TYPES,
    REQUIRED_VALUES,
    SIZE_KEYS,
    Family,
)

# Our options that Hugging Face's config has no field for, kept in config.json under
# this key so that a saved model loads back as it was.
OUR_SECTION = "eqx_mtp"
OUR_FIELDS = (
    "mtp_kind",
    "mtp_block",
    "shared_depth_layer",
    "depth_final_norm",
    "depth_trunk_input",
    "depth_previous_input",
)
_ACTIVATIONS = ("silu", "swish")
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    },
    "yarn": {
        "factor",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "original_max_position_embeddings",
        "truncate",
    },
}
_LAYER_TYPES = ("full_attention", "sliding_attention")
# What depth 1 and depth k > 1 read in the code that serves each layout:
# transformers' `MtpModel` for DeepSeek-V3's names (SGLang and Megatron-Core agree),
# vLLM's and SGLang's drafters for MiMo's. docs/weights.md cites the code.
FOREIGN_DEPTHS = {
    layout: dict(
        depth_final_norm=True,
        depth_trunk_input="after_norm",
        depth_previous_input="after_norm",
    )
    for layout in ("deepseek_v3", "mimo")
}


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded into, or a model that cannot be saved as, a
    Hugging Face layout; the message names the field or tensor."""


def family_of(hf: dict) -> Family:
    """The family of a `config.json`, by its `model_type`; an unknown or refused one
    is a `WeightsError` that names it."""
    model_type = hf.get("model_type")
    if model_type in REFUSED_MODEL_TYPES:
        why = REFUSED_MODEL_TYPES[model_type]
        raise WeightsError(
            f"config.json: model_type={model_type!r}: {why} is not supported by the "
            "eqx_mtp trunk; refusing to load it"
        )
    if model_type not in BY_MODEL_TYPE:
        known = ", ".join(sorted(BY_MODEL_TYPE))
        raise WeightsError(
            f"config.json: model_type={model_type!r} is not a family eqx_mtp reads "
            f"(it reads {known})"
        )
    return BY_MODEL_TYPE[model_type]


class _Reader:
    """A `config.json` and its family: `get` reads a key as the family's
    configuration class would, its default where the file leaves it out."""

    def __init__(self, hf: dict, family: Family):
        self.hf = hf
        self.family = family

    def get(self, key: str) -> Any:
        if key in self.hf:
            return self.hf[key]
        return self.family.defaults.get(key)

    def require(self, key: str) -> Any:
        if self.hf.get(key) is None:
            raise WeightsError(f"config.json has no {key!r} field")
        return self.hf[key]

    def refuse(self, key: str, why: str):
        raise WeightsError(
            f"config.json ({self.family.name}): {key}={self.hf.get(key)!r} {why}; "
            "refusing to load it"
        )


def _check_keys(reader: _Reader) -> None:
    family = reader.family
    for key, value in reader.hf.items():
        if key in family.ignored:
            continue
        if key in REQUIRED_VALUES:
            if value not in (REQUIRED_VALUES[key], None):
                reader.refuse(key, "is not supported by the eqx_mtp trunk")
            continue
        if key in METADATA_KEYS or key in SIZE_KEYS or key in family.keys:
            continue
        if key == OUR_SECTION:
            continue
        reader.refuse(
            key,
            f"is not a key eqx_mtp understands for the {family.name} family, and it "
            "may change the computation",
        )
    if reader.get("hidden_act") not in _ACTIVATIONS:
        reader.refuse("hidden_act", "is not supported (the trunk's MLP is SwiGLU/SiLU)")
    ours = reader.hf.get(OUR_SECTION, {})
    unknown = sorted(set(ours) - set(OUR_FIELDS))
    if unknown:
        raise WeightsError(
            f"config.json: unknown fields in {OUR_SECTION!r}: {', '.join(unknown)}"
        )


def _sizes(reader: _Reader) -> dict:
    num_heads = reader.require("num_attention_heads")
    dim = reader.require("hidden_size")
    values = dict(
        vocab_size=reader.require("vocab_size"),
        dim=dim,
        num_layers=reader.require("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=reader.get("num_key_value_heads") or num_heads,
        mlp_dim=reader.require("intermediate_size"),
        head_dim=reader.get("head_dim") or dim // num_heads,
        norm_eps=reader.get("rms_norm_eps"),
        tie_embeddings=bool(reader.get("tie_word_embeddings")),
    )
    if reader.get("max_position_embeddings") is not None:
        values["max_seq_len"] = reader.get("max_position_embeddings")
    return values


def _rope_parameters(reader: _Reader) -> dict:
    """The one RoPE dict transformers 5 builds from either layout: `rope_scaling`
    first, else `rope_parameters`, with `rope_theta` and `partial_rotary_factor`
    from the top level where the dict lacks them."""
    scaling = reader.hf.get("rope_scaling")
    parameters = reader.hf.get("rope_parameters")
    if scaling and parameters:
        shared = set(scaling) & set(parameters)
        if any(scaling[key] != parameters[key] for key in shared):
            reader.refuse(
                "rope_scaling",
                f"disagrees with rope_parameters={parameters!r} (transformers 4 and 5 "
                "would read different models)",
            )
    chosen = dict(scaling or parameters or {})
    if any(isinstance(value, dict) for value in chosen.values()):
        reader.refuse("rope_parameters", "holds one RoPE per layer type")
    chosen.setdefault("rope_theta", reader.get("rope_theta"))
    if reader.hf.get("partial_rotary_factor") is not None:
        chosen.setdefault("partial_rotary_factor", reader.hf["partial_rotary_factor"])
    return chosen


def _rope(reader: _Reader, max_seq_len: int | None) -> dict:
    rope = _rope_parameters(reader)
    key = "rope_scaling" if reader.hf.get("rope_scaling") else "rope_parameters"
    theta = rope.pop("rope_theta")
    partial = rope.pop("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise WeightsError(
            f"config.json ({reader.family.name}): partial_rotary_factor={partial!r} "
            "rotates part of each head, which the eqx_mtp trunk does not; refusing "
            "to load it"
        )
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    if reader.family.name == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # transformers' Phi-3 reads both as LongRoPE
    if kind not in _ROPE_KEYS:
        reader.refuse(key, f"has rope_type={kind!r}, which eqx_mtp does not compute")
    unknown = sorted(set(rope) - _ROPE_KEYS[kind])
    if unknown:
        reader.refuse(key, f"has keys {unknown} that rope_type={kind!r} does not read")
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling=None)
    original = reader.hf.get(
        "original_max_position_embeddings",
        rope.get("original_max_position_embeddings", max_seq_len),
    )
    try:
        scaling = _scaling(kind, rope, original, max_seq_len)
    except (KeyError, TypeError, ValueError) as error:
        reader.refuse(key, f"is not a valid {kind!r} RoPE scaling ({error})")
    return dict(rope_theta=theta, rope_scaling=scaling)


def _scaling(kind: str, rope: dict, original, max_seq_len) -> RopeScaling:
    if kind == "linear":
        return RopeScaling("linear", float(rope["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(rope["factor"]),
            original_max_position=original,
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
        )
    factor = rope.get("factor")
    if factor is None:
        factor = max_seq_len / original
    attention = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if attention is None and mscale and mscale_all_dim:
        attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return RopeScaling(
        "yarn",
        float(factor),
        original_max_position=original,
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        attention_factor=None if attention is None else float(attention),
        truncate=bool(rope.get("truncate", True)),
    )


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _windowed_layers(reader: _Reader, num_layers: int, no_rope: tuple) -> tuple:
    """Which layers attend within `sliding_window`, as each family's config class
    decides, and that window."""
    family = reader.family.name
    window = reader.get("sliding_window")
    if family in ("mistral", "phi3"):
        return (window, tuple(range(num_layers)) if window else ())
    if family == "llama" or family == "olmo2":
        return None, ()
    if not reader.get("use_sliding_window"):
        window = None
    types = reader.hf.get("layer_types")
    if types is None:
        if family == "smollm3":
            types = [
                "sliding_attention" if window and i in no_rope else "full_attention"
                for i in range(num_layers)
            ]
        else:
            first = reader.get("max_window_layers")
            types = [
                "sliding_attention" if window and i >= first else "full_attention"
                for i in range(num_layers)
            ]
    if len(types) != num_layers or any(kind not in _LAYER_TYPES for kind in types):
        reader.refuse(
            "layer_types", f"must list {num_layers} of {', '.join(_LAYER_TYPES)}"
        )
    if window is None:
        return None, ()
    return window, tuple(i for i, kind in enumerate(types) if kind != "full_attention")


def _no_rope_layers(reader: _Reader, num_layers: int) -> tuple:
    if reader.family.name != "smollm3":
        return ()
    flags = reader.get("no_rope_layers")
    if flags is None:
        interval = reader.get("no_rope_layer_interval")
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(flags) != num_layers or any(flag not in (0, 1) for flag in flags):
        reader.refuse("no_rope_layers", f"must list {num_layers} flags of 0 or 1")
    # SmolLM3's flag is 1 where the layer *uses* RoPE.
    return tuple(i for i, flag in enumerate(flags) if not flag)


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """The [`eqx_mtp.ModelConfig`][] of a Hugging Face `config.json`.

    The family comes from `model_type` (Llama, SmolLM2: `"llama"`; `"mistral"`,
    `"qwen2"`, `"qwen3"`, `"phi3"`, `"olmo2"`, `"smollm3"`, `"mimo"`); both layouts
    of the RoPE settings are read, as transformers 5 reads them. Every key is either
    understood or refused: a key the family's transformers class reads that changes
    the computation in a way the trunk cannot follow (an attention or MLP bias
    beyond Qwen2's, a RoPE type other than default / linear / llama3 / yarn,
    partial rotation, an activation other than SiLU), a key the family does not
    read, and a refused family (Gemma, mixtures of experts) each raise a
    `WeightsError` that names it.

    **Arguments:**

    - `hf`: the parsed `config.json`.
    - `overrides`: any [`eqx_mtp.ModelConfig`][] field, e.g. `num_depths`, `remat`.
        `num_depths` defaults to the file's `num_nextn_predict_layers`, else 0.
    """
    if not isinstance(hf, dict):
        raise TypeError(f"hf must be a dict (a parsed config.json), got {type(hf)}")
    reader = _Reader(hf, family_of(hf))
    _check_keys(reader)
    values = _sizes(reader)
    num_layers = values["num_layers"]
    values |= _rope(reader, values.get("max_seq_len"))
    no_rope = _no_rope_layers(reader, num_layers)
    window, windowed = _windowed_layers(reader, num_layers, no_rope)
    values |= dict(
        no_rope_layers=no_rope,
        sliding_window=window,
        full_attention_layers=tuple(
            i for i in range(num_layers) if window and i not in windowed
        ),
        num_depths=hf.get("num_nextn_predict_layers") or 0,
    )
    values |= dict(reader.family.implies)
    if OUR_SECTION not in hf and values["num_depths"]:
        # Foreign depths: a final norm each, and their readers' inputs.
        values |= FOREIGN_DEPTHS[reader.family.mtp_layout]
    values |= hf.get(OUR_SECTION, {})
    values |= overrides
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise WeightsError(f"model_config_from_hf: {error}") from None
