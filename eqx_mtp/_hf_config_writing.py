"""[`eqx_mtp.ModelConfig`][] to the `config.json` of a Hugging Face family: which
family holds a trunk, and the file that family's transformers class reads back as
the same model, in transformers 4's and 5's layouts at once."""

from __future__ import annotations

from typing import Any

from ._config import ModelConfig
from ._hf_config import OUR_FIELDS, OUR_SECTION, WeightsError
from ._hf_families import FAMILIES, Family


def infer_family(config: ModelConfig) -> str:
    """The plainest family whose transformers class computes `config`'s trunk."""
    if config.norm_position == "post" or config.qk_norm == "projection":
        return "olmo2"
    if config.qk_norm == "per_head":
        return "qwen3"
    if config.qkv_bias:
        return "qwen2"
    if config.no_rope_layers:
        return "smollm3"
    if config.sliding_window is not None:
        return "mistral" if not config.full_attention_layers else "qwen2"
    return "llama"


def family_named(family: str | None, config: ModelConfig) -> Family:
    """The family called `family`, or the plainest that holds `config`'s trunk
    when it is `None`; another name is a `ValueError` that lists the families."""
    name = infer_family(config) if family is None else family
    if name not in FAMILIES:
        raise ValueError(
            f"family must be one of {', '.join(map(repr, FAMILIES))} or None, "
            f"got {family!r}"
        )
    return FAMILIES[name]


def _check_representable(config: ModelConfig, family: Family) -> None:
    """Refuse, by option and family, a trunk the family's class would compute
    differently."""
    name = family.name
    wants = dict(
        qkv_bias=name in ("qwen2", "mimo"),
        qk_norm={"qwen3": "per_head", "olmo2": "projection"}.get(name, "none"),
        norm_position="post" if name == "olmo2" else "pre",
    )
    for field, value in wants.items():
        if getattr(config, field) != value:
            raise WeightsError(
                f"family={name!r} cannot hold a trunk with {field}="
                f"{getattr(config, field)!r} (it has {field}={value!r}); pick the "
                "family that has it"
            )
    if config.no_rope_layers and name != "smollm3":
        raise WeightsError(f"family={name!r} cannot hold no_rope_layers")
    if config.sliding_window is not None:
        windowed = [i for i in range(config.num_layers) if config.window(i)]
        if name in ("llama", "olmo2"):
            raise WeightsError(f"family={name!r} cannot hold a sliding_window")
        if name in ("mistral", "phi3") and config.full_attention_layers:
            raise WeightsError(
                f"family={name!r} windows every layer; full_attention_layers="
                f"{config.full_attention_layers} needs qwen2 or qwen3"
            )
        if name in ("qwen2", "qwen3", "mimo") and windowed != list(
            range(config.num_layers - len(windowed), config.num_layers)
        ):
            raise WeightsError(
                f"family={name!r} windows the layers from max_window_layers on; "
                f"full_attention_layers={config.full_attention_layers} is not a prefix"
            )
        if name == "smollm3" and set(windowed) != set(config.no_rope_layers):
            raise WeightsError("family='smollm3' windows exactly its no-RoPE layers")
    if name == "phi3" and config.rope_scaling is not None:
        raise WeightsError(
            "family='phi3' reads a RoPE scaling as LongRoPE; save this trunk as llama"
        )
    if name in ("phi3", "olmo2") and config.head_dim * config.num_heads != config.dim:
        raise WeightsError(
            f"family={name!r} has no head_dim field: head_dim must be dim / num_heads"
        )


def _rope_dict(config: ModelConfig) -> dict | None:
    scaling = config.rope_scaling
    if scaling is None:
        return None
    rope: dict[str, Any] = {"rope_type": scaling.kind, "factor": scaling.factor}
    if scaling.kind == "llama3":
        rope |= dict(
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
        )
    if scaling.kind == "yarn":
        rope |= dict(beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow)
        if scaling.attention_factor is not None:
            rope["attention_factor"] = scaling.attention_factor
        if not scaling.truncate:
            rope["truncate"] = False
    if scaling.kind != "linear":
        rope["original_max_position_embeddings"] = scaling.original_max_position
    return rope


def _family_keys(config: ModelConfig, family: Family) -> dict:
    name = family.name
    if name in ("llama", "olmo2", "qwen3", "smollm3"):
        keys: dict[str, Any] = dict(attention_bias=False)
    else:
        keys = {}
    if name in ("llama", "smollm3"):
        keys["mlp_bias"] = False
    if name in ("mistral", "phi3"):
        keys["sliding_window"] = config.sliding_window
    if name in ("qwen2", "qwen3", "mimo", "smollm3"):
        window = config.sliding_window
        keys |= dict(
            use_sliding_window=window is not None,
            sliding_window=window,
            layer_types=[
                "sliding_attention" if config.window(i) else "full_attention"
                for i in range(config.num_layers)
            ],
        )
        if name != "smollm3":
            full = len(config.full_attention_layers) if window else config.num_layers
            keys["max_window_layers"] = full
    if name == "smollm3":
        keys["no_rope_layers"] = [
            int(config.uses_rope(i)) for i in range(config.num_layers)
        ]
    return keys


def hf_config(config: ModelConfig, *, family: str | None = None) -> dict:
    """The `config.json` of `config` as a checkpoint of `family`'s transformers class.

    RoPE settings are written in both layouts (top-level `rope_theta` and
    `rope_scaling` for transformers 4, `rope_parameters` for 5), the number of MTP
    depths as `num_nextn_predict_layers`, and our depth options under `"eqx_mtp"`.

    **Arguments:**

    - `config`: the [`eqx_mtp.ModelConfig`][].
    - `family`: one of `"llama"`, `"mistral"`, `"qwen2"`, `"qwen3"`, `"phi3"`,
        `"olmo2"`, `"smollm3"`, `"mimo"`; `None`: the plainest that holds the trunk.
        A trunk the family computes differently is a `WeightsError` naming the
        option.
    """
    chosen = family_named(family, config)
    _check_representable(config, chosen)
    rope = _rope_dict(config)
    return {
        "architectures": [chosen.architecture],
        "model_type": chosen.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.mlp_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        # transformers 4's OLMo-2 reads the older `type` key only.
        "rope_scaling": None if rope is None else rope | {"type": rope["rope_type"]},
        "rope_parameters": {"rope_type": "default"}
        | (rope or {})
        | {"rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        # The family's default token ids may lie outside this vocabulary.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **_family_keys(config, chosen),
        "num_nextn_predict_layers": config.num_depths,
        OUR_SECTION: {field: getattr(config, field) for field in OUR_FIELDS},
    }
