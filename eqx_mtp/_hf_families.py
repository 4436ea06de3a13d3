"""The Hugging Face model families a checkpoint may come from: which `config.json` keys
each one's transformers class reads (the allow-list), their defaults, and the options
of our trunk each one implies."""

from __future__ import annotations

import dataclasses
import types


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face model family.

    - `name`: what callers pass as `family=` (`"llama"`, `"qwen2"`, ...).
    - `model_type`, `architecture`: what its `config.json` says.
    - `keys`: the keys beyond `COMMON_KEYS` that its configuration class reads and
        that change the forward pass; every one is interpreted below.
    - `defaults`: the configuration class's defaults of keys a file may leave out.
    - `implies`: [`eqx_mtp.ModelConfig`][] fields the family's modeling code fixes.
    - `ignored`: keys its files carry that its modeling code never reads.
    - `fused`: its attention and MLP input projections are stored fused (Phi-3).
    - `mtp_layout`: where its checkpoints keep MTP depths: `"deepseek_v3"` (those
        names after the trunk's layers; written only by us for these families) or
        `"mimo"`.
    """

    name: str
    model_type: str
    architecture: str
    keys: frozenset[str]
    defaults: types.MappingProxyType
    implies: types.MappingProxyType
    ignored: frozenset[str] = frozenset()
    fused: bool = False
    mtp_layout: str = "deepseek_v3"


# Keys every family reads and we interpret: the sizes, the norm, RoPE, the head.
SIZE_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "partial_rotary_factor",
        "num_nextn_predict_layers",
    }
)
# Keys that do not change what the model computes from token ids: metadata, token
# ids, generation defaults, dropout (off at inference), initialisation.
METADATA_KEYS = frozenset(
    {
        "_name_or_path",
        "_attn_implementation_autoset",
        "architectures",
        "model_type",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "auto_map",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "tokenizer_class",
        "use_cache",
        "initializer_range",
        "attention_dropout",
        "hidden_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "id2label",
        "label2id",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "tie_encoder_decoder",
        "cross_attention_hidden_size",
        "problem_type",
        "finetuning_task",
        "task_specific_params",
        "prefix",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
    }
)
# Keys that must hold this value: they are read, and anything else is another model.
REQUIRED_VALUES = {
    "attention_bias": False,  # Llama's and Qwen3's bias on q, k, v *and* o
    "mlp_bias": False,
    "pruned_heads": {},
}
_WINDOW_KEYS = frozenset(
    {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
)


def _family(name, model_type, architecture, keys=(), defaults=None, **rest) -> Family:
    base = {
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10_000.0,
    }
    return Family(
        name=name,
        model_type=model_type,
        architecture=architecture,
        keys=frozenset(keys),
        defaults=types.MappingProxyType(base | (defaults or {})),
        implies=types.MappingProxyType(rest.pop("implies", {})),
        **rest,
    )


_QWEN2_WINDOWS = {
    "num_key_value_heads": 32,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
}
# Qwen2's attention always has q/k/v biases and never an o_proj bias, whatever a
# file's `attention_bias` says (MiMo's files say true).
_QWEN2_IGNORED = frozenset({"attention_bias"})
FAMILIES = {
    family.name: family
    for family in (
        _family(
            "llama",
            "llama",
            "LlamaForCausalLM",
            {"attention_bias", "mlp_bias", "pretraining_tp"},
        ),
        _family(
            "mistral",
            "mistral",
            "MistralForCausalLM",
            {"sliding_window"},
            {"sliding_window": 4096, "num_key_value_heads": 8},
        ),
        _family(
            "qwen2",
            "qwen2",
            "Qwen2ForCausalLM",
            _WINDOW_KEYS,
            _QWEN2_WINDOWS,
            implies={"qkv_bias": True},
            ignored=_QWEN2_IGNORED,
        ),
        _family(
            "qwen3",
            "qwen3",
            "Qwen3ForCausalLM",
            _WINDOW_KEYS | {"attention_bias"},
            _QWEN2_WINDOWS | {"head_dim": 128},
            implies={"qk_norm": "per_head"},
        ),
        _family(
            "phi3",
            "phi3",
            "Phi3ForCausalLM",
            {"sliding_window", "original_max_position_embeddings"},
            {"rms_norm_eps": 1e-5, "sliding_window": None},
            fused=True,
        ),
        _family(
            "olmo2",
            "olmo2",
            "Olmo2ForCausalLM",
            {"attention_bias"},
            {"rms_norm_eps": 1e-5},
            implies={"qk_norm": "projection", "norm_position": "post"},
        ),
        _family(
            "smollm3",
            "smollm3",
            "SmolLM3ForCausalLM",
            _WINDOW_KEYS
            | {"no_rope_layers", "no_rope_layer_interval", "attention_bias"}
            | {"mlp_bias"},
            {
                "rope_theta": 2_000_000.0,
                "tie_word_embeddings": True,
                "use_sliding_window": False,
                "sliding_window": None,
                "no_rope_layer_interval": 4,
            },
        ),
        _family(
            "mimo",
            "mimo",
            "MiMoForCausalLM",
            _WINDOW_KEYS,
            _QWEN2_WINDOWS,
            implies={"qkv_bias": True},
            ignored=_QWEN2_IGNORED,
            mtp_layout="mimo",
        ),
    )
}
BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES.values()}

# Families seen in the wild that our trunk does not compute, and why.
REFUSED_MODEL_TYPES = {
    "gemma": "Gemma (embedding scaled by √dim, `1 + w` norms, GeLU-tanh MLP)",
    "gemma2": "Gemma-2 (embedding scale, `1 + w` norms, GeLU-tanh, logit soft-capping)",
    "gemma3": "Gemma-3 (embedding scale, `1 + w` norms, GeLU-tanh, pre+post norms, "
    "local/global RoPE)",
    "gemma3_text": "Gemma-3 (embedding scale, `1 + w` norms, GeLU-tanh, pre+post "
    "norms, local/global RoPE)",
    "deepseek_v3": "DeepSeek-V3 (multi-head latent attention, mixture of experts)",
    "deepseek_v2": "DeepSeek-V2 (multi-head latent attention, mixture of experts)",
    "mixtral": "Mixtral (mixture of experts)",
    "qwen2_moe": "Qwen2-MoE (mixture of experts)",
    "qwen3_moe": "Qwen3-MoE (mixture of experts)",
    "qwen3_next": "Qwen3-Next (linear attention, mixture of experts)",
    "olmo": "OLMo-1 (non-parametric layer norm)",
    "phi": "Phi-1/2 (LayerNorm, partial RoPE, GeLU)",
}
