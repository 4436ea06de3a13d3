"""`config.json` as Hugging Face `transformers` writes it for the dense families, and
read back the way transformers 5 reads it (either layout).

Nothing here imports `eqx_mtp`. Written from `transformers` 4.57 and 5.x:
`src/transformers/models/{llama,mistral,qwen2,qwen3,phi3,olmo2,smollm3}/
configuration_*.py`, `configuration_utils.py` (`to_diff_dict`, `__post_init__`) and
`modeling_rope_utils.py` (`convert_rope_params_to_dict`, `standardize_rope_params`);
MiMo's `MiMoConfig` is Qwen2's plus `num_nextn_predict_layers`.
"""

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3", "mimo")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "mimo": "MiMoForCausalLM",
}
# `RotaryEmbeddingConfigMixin.default_theta`, overridden by SmolLM3Config.
_DEFAULT_THETA = {"smollm3": 2_000_000.0}
# The config classes' default of `tie_word_embeddings` (False elsewhere).
_TIED_BY_DEFAULT = {"smollm3": True}
# Families whose attention has the q/k/v biases hard-wired (`bias=True`), no o bias.
_QKV_BIASED = ("qwen2", "mimo")
# Families whose `attention_bias` adds biases to q, k, v and o; `mlp_bias` to the MLP.
_ATTENTION_BIAS = ("llama", "qwen3", "olmo2", "smollm3")
_MLP_BIAS = ("llama", "smollm3")
_WINDOWED_BY_LAYER_TYPES = ("qwen2", "qwen3", "mimo")

LAYOUTS = ("v4", "v4.57", "v5")
TINY = dict(
    vocab_size=48,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=40,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
"""Sizes of the tiny checkpoints; an epsilon other than every family's default."""


# --------------------------------------------------------------------------- config


def family_config(family, *, layout, **options):
    """The `config.json` dict transformers writes for a tiny model of `family`.

    **Arguments:**

    - `family`: one of `FAMILIES`.
    - `layout`: `"v4"` (transformers 4.x as most published checkpoints carry it:
        top-level `rope_theta`, `rope_scaling`, `torch_dtype`, no derived fields),
        `"v4.57"` (what transformers 4.57 writes: `dtype`, and the derived `head_dim`,
        possibly `null`, and `layer_types` written out) or `"v5"` (transformers 5.x:
        `rope_parameters`, `dtype`, the derived fields written out).
    - `options`: any `config.json` field, in the transformers-4 vocabulary:
        sizes (`TINY` by default), `rope_theta`, `rope_scaling` (a dict with
        `rope_type`; merged into `rope_parameters` for `"v5"`), `head_dim`,
        `sliding_window`, `use_sliding_window`, `max_window_layers`, `layer_types`,
        `no_rope_layers`, `tie_word_embeddings`, `num_nextn_predict_layers`, ...;
        `legacy_type_key=True` writes `rope_scaling`'s `type` instead of `rope_type`
        (older v4 files); `extra` is a dict merged last, verbatim.

    **Returns:** a JSON-serialisable dict.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    extra = options.pop("extra", {})
    legacy_type_key = options.pop("legacy_type_key", False)
    config = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        **TINY,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "use_cache": True,
        "attention_dropout": 0.0,
        "tie_word_embeddings": _TIED_BY_DEFAULT.get(family, False),
        "rope_theta": _DEFAULT_THETA.get(family, 10_000.0),
        "rope_scaling": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config.update(_family_fields(family))
    config.update(options)
    if layout == "v5":
        config = _to_v5(family, config)
    else:
        scaling = config["rope_scaling"]
        if legacy_type_key and scaling is not None:
            scaling = dict(scaling)
            scaling["type"] = scaling.pop("rope_type")
            config["rope_scaling"] = scaling
        config["torch_dtype"] = "float32"
        config["transformers_version"] = "4.44.2"
    if layout == "v4.57":
        config = _to_v457(family, config)
    config.update(extra)
    return config


def _family_fields(family):
    if family in ("llama", "smollm3", "olmo2", "qwen3"):
        fields = {"attention_bias": False}
        if family in ("llama", "smollm3"):
            fields["mlp_bias"] = False
        if family == "llama":
            fields["pretraining_tp"] = 1
        if family == "qwen3":
            # An explicit head_dim other than hidden_size / heads, as Qwen3 ships.
            fields.update(head_dim=12, use_sliding_window=False, sliding_window=None)
            fields.update(max_window_layers=28)
        if family == "smollm3":
            fields.update(
                no_rope_layers=[1, 0],
                no_rope_layer_interval=4,
                use_sliding_window=False,
                sliding_window=None,
            )
        return fields
    if family == "mistral":
        return {"sliding_window": None}
    if family == "phi3":
        return {
            "original_max_position_embeddings": TINY["max_position_embeddings"],
            "partial_rotary_factor": 1.0,
            "sliding_window": None,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
        }
    # qwen2, mimo: published Qwen2.5 / MiMo files carry an unused window.
    fields = dict(use_sliding_window=False, sliding_window=4096, max_window_layers=28)
    if family == "mimo":
        fields.update(
            attention_bias=True,
            num_nextn_predict_layers=1,
            auto_map={
                "AutoConfig": "configuration_mimo.MiMoConfig",
                "AutoModel": "modeling_mimo.MiMoModel",
                "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM",
            },
        )
    return fields


def _to_v457(family, config):
    """What transformers 4.57's `save_pretrained` writes for `config` (its
    `to_diff_dict` leaves out values equal to `PretrainedConfig`'s defaults)."""
    config = dict(config)
    config["dtype"] = config.pop("torch_dtype")
    config["transformers_version"] = "4.57.1"
    if family == "llama":
        config["head_dim"] = head_dim_of(config)
    if family == "mistral":
        config.setdefault("head_dim", None)
    if family in _WINDOWED_BY_LAYER_TYPES + ("smollm3",):
        config["layer_types"] = _layer_types(family, config)
        if family != "smollm3" and not config.get("use_sliding_window"):
            config["sliding_window"] = None
    # Dropped when equal to both PretrainedConfig's default (True) and the class's.
    if config["tie_word_embeddings"] and _TIED_BY_DEFAULT.get(family, False):
        del config["tie_word_embeddings"]
    return config


def _to_v5(family, config):
    """What transformers 5's `save_pretrained` writes for a config loaded from `config`
    (`PreTrainedConfig.__post_init__`, `convert_rope_params_to_dict`, the family's
    `__post_init__`)."""
    config = dict(config)
    theta = config.pop("rope_theta")
    parameters = dict(config.pop("rope_scaling") or {})
    parameters.setdefault("rope_type", parameters.pop("type", "default"))
    parameters["rope_theta"] = theta
    if family == "phi3":
        parameters["partial_rotary_factor"] = config["partial_rotary_factor"]
    elif parameters["rope_type"] in ("llama3", "yarn"):
        parameters.setdefault(
            "original_max_position_embeddings", config["max_position_embeddings"]
        )
    config["rope_parameters"] = parameters
    if family in ("llama", "mistral"):
        config["head_dim"] = config.get("head_dim") or (
            config["hidden_size"] // config["num_attention_heads"]
        )
    if family in _WINDOWED_BY_LAYER_TYPES + ("smollm3",):
        config["layer_types"] = _layer_types(family, config)
        if family != "smollm3" and not config.get("use_sliding_window"):
            config["sliding_window"] = None
    config["dtype"] = "float32"
    config["transformers_version"] = "5.25.0"
    return config


# --------------------------------------------------------------------------- reading


def _layer_types(family, config):
    """`config.layer_types` as the family's config class derives it when absent."""
    if config.get("layer_types") is not None:
        return list(config["layer_types"])
    layers = config["num_hidden_layers"]
    if family == "smollm3":
        uses_rope = rope_layers(family, config)
        windowed = config.get("use_sliding_window") and config.get("sliding_window")
        return [
            "sliding_attention" if windowed and not uses_rope[i] else "full_attention"
            for i in range(layers)
        ]
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    first = config.get("max_window_layers", 28)
    return [
        "sliding_attention" if window is not None and i >= first else "full_attention"
        for i in range(layers)
    ]


def rope_layers(family, config):
    """Whether each layer rotates (SmolLM3's `no_rope_layers`: 1 = uses RoPE)."""
    layers = config["num_hidden_layers"]
    if family != "smollm3":
        return [True] * layers
    flags = config.get("no_rope_layers")
    if flags is None:
        interval = config.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(layers)]
    return [bool(flags[i]) for i in range(layers)]


def windows(family, config):
    """The sliding window of each layer (`None`: full causal attention), as the eager
    attention masks it: Mistral and Phi-3 on every layer (Mistral's class default is
    4096), the others where `layer_types` says `sliding_attention`."""
    layers = config["num_hidden_layers"]
    if family in ("mistral", "phi3"):
        default = 4096 if family == "mistral" else None
        return [config.get("sliding_window", default)] * layers
    if family not in _WINDOWED_BY_LAYER_TYPES + ("smollm3",):
        return [None] * layers
    window = config.get("sliding_window", 4096 if family != "smollm3" else None)
    if family != "smollm3" and not config.get("use_sliding_window"):
        window = None
    types = _layer_types(family, config)
    if "sliding_attention" in types and (
        window is None or not config.get("use_sliding_window")
    ):
        # transformers' eager mask and its flash-attention path disagree here.
        raise NotImplementedError("sliding_attention layers without a window")
    return [window if t == "sliding_attention" else None for t in types]


def rope_parameters(config):
    """The standardised `rope_parameters` of `config`, read as transformers 5 does.

    **Returns:** a dict with `rope_type`, `rope_theta` and the scaling fields. For
    `llama3`, `yarn` and `longrope`, `original_max_position_embeddings` is the
    top-level field when there is one (`standardize_rope_params`, run again when the
    rotary tables are built, lets it win; Phi-3 always has one, default 4096), else
    the dict's, else `max_position_embeddings`.
    """
    family = config["model_type"]
    parameters = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    theta = config.get("rope_theta", _DEFAULT_THETA.get(family, 10_000.0))
    parameters.setdefault("rope_theta", theta)
    if config.get("partial_rotary_factor") is not None:
        parameters.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    parameters.setdefault("rope_type", parameters.get("type", "default"))
    if family == "phi3" and parameters["rope_type"] in ("su", "yarn"):
        parameters["rope_type"] = "longrope"
    if parameters["rope_type"] in ("llama3", "yarn", "longrope"):
        top = config.get("original_max_position_embeddings")
        if top is None and family == "phi3":
            top = 4096
        if top is not None:
            parameters["original_max_position_embeddings"] = top
        parameters.setdefault(
            "original_max_position_embeddings", config["max_position_embeddings"]
        )
    return parameters


def head_dim_of(config):
    """The attention head width: `head_dim` when set, else Qwen3's class default 128,
    else `hidden_size / num_attention_heads`."""
    if config.get("head_dim") is not None:
        return config["head_dim"]
    if config["model_type"] == "qwen3":
        return 128
    return config["hidden_size"] // config["num_attention_heads"]


def biased_projections(config):
    """The projections of one layer that carry a bias, by the family's code."""
    family = config["model_type"]
    names = []
    if family in _QKV_BIASED:
        names += ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    if family in _ATTENTION_BIAS and config.get("attention_bias"):
        names += [f"self_attn.{x}_proj" for x in "qkvo"]
    if family in _MLP_BIAS and config.get("mlp_bias"):
        names += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return names


def tied(config):
    """`tie_word_embeddings`, with the family's default when the file leaves it out."""
    default = _TIED_BY_DEFAULT.get(config["model_type"], False)
    return bool(config.get("tie_word_embeddings", default))
