"""Hugging Face Llama-family `config.json` to and from [`eqx_mtp.ModelConfig`][]:
the fields that map, and those our trunk refuses."""

from __future__ import annotations

from ._config import ModelConfig

# Our options that Hugging Face's config has no field for, kept in config.json under
# this key so that a saved model loads back as it was.
OUR_SECTION = "eqx_mtp"
_OUR_FIELDS = (
    "mtp_kind",
    "mtp_block",
    "shared_depth_layer",
    "depth_final_norm",
)

# Configurations our trunk cannot represent: the field, and the value it must have.
_UNSUPPORTED = {
    "attention_bias": "attention biases",
    "mlp_bias": "MLP biases",
    "rope_scaling": "RoPE scaling",
    "sliding_window": "sliding-window attention",
    "num_local_experts": "mixture of experts",
    "n_routed_experts": "mixture of experts",
    "num_experts": "mixture of experts",
    "moe_layer_freq": "mixture of experts",
    "qk_layernorm": "query/key norms",
    "use_qk_norm": "query/key norms",
}
_ACTIVATIONS = ("silu", "swish")


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded into, or a model that cannot be saved as, the
    Hugging Face Llama layout; the message names the field or tensor."""


def hf_config(config: ModelConfig) -> dict:
    """The `config.json` of a Hugging Face Llama checkpoint for `config`, with the
    number of MTP depths as DeepSeek-V3's `num_nextn_predict_layers` and our depth
    options under `"eqx_mtp"`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "num_nextn_predict_layers": config.num_depths,
        OUR_SECTION: {name: getattr(config, name) for name in _OUR_FIELDS},
    }


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """The [`eqx_mtp.ModelConfig`][] of a Hugging Face Llama-family `config.json`.

    Fields the trunk cannot represent (attention or MLP biases, RoPE scaling, sliding
    windows, mixture of experts, query/key norms, an activation other than SiLU, a head
    width other than `hidden_size / num_attention_heads`) raise a `WeightsError` that
    names the field. `overrides` set any other `ModelConfig` field (e.g.
    `num_depths`, `remat`); `num_depths` defaults to the checkpoint's
    `num_nextn_predict_layers`, or 1.
    """
    for field, what in _UNSUPPORTED.items():
        value = hf.get(field)
        if value not in (None, False, 0):
            if field == "sliding_window" and hf.get("use_sliding_window") is False:
                continue
            raise WeightsError(
                f"config.json: {field}={value!r} ({what}) is not supported by the "
                "eqx_mtp trunk; refusing to load it"
            )
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise WeightsError(
            f"config.json: hidden_act={act!r} is not supported (the trunk's MLP is "
            "SwiGLU with SiLU)"
        )
    try:
        dim = hf["hidden_size"]
        num_heads = hf["num_attention_heads"]
        values = dict(
            vocab_size=hf["vocab_size"],
            dim=dim,
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            mlp_dim=hf["intermediate_size"],
        )
    except KeyError as error:
        raise WeightsError(f"config.json has no {error.args[0]!r} field") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * num_heads != dim:
        raise WeightsError(
            f"config.json: head_dim={head_dim} is not hidden_size / "
            f"num_attention_heads = {dim}/{num_heads} (not supported)"
        )
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise WeightsError(
            "config.json: partial_rotary_factor="
            f"{hf['partial_rotary_factor']!r} is not supported (full-width RoPE only)"
        )
    optional = dict(
        max_seq_len=hf.get("max_position_embeddings"),
        rope_theta=hf.get("rope_theta"),
        norm_eps=hf.get("rms_norm_eps"),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )
    values |= {name: value for name, value in optional.items() if value is not None}
    values |= hf.get(OUR_SECTION, {})
    values |= overrides
    try:
        return ModelConfig(**values)
    except TypeError as error:
        raise WeightsError(f"model_config_from_hf: {error}") from None
