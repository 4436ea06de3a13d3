"""Independent NumPy reference for Hugging Face dense families and their MTP layouts.

Nothing here imports `eqx_mtp`. Written from `transformers`' published code (4.57 and
5.x: `src/transformers/models/{llama,mistral,qwen2,qwen3,phi3,olmo2,smollm3}/
modeling_*.py`, `modeling_rope_utils.py`, `masking_utils.py`, `modeling_layers.py`)
and, for MiMo, Xiaomi's `modeling_mimo.py` as ported by vLLM
(`vllm/model_executor/models/mimo_mtp.py`):

* `family_config` (from `hf_configs`) writes `config.json` as published
  transformers-4 files carry it (`"v4"`), as transformers 4.57 writes it
  (`"v4.57"`) or as 5.x does (`"v5"`); `random_family_tensors` and
  `write_checkpoint` add the weights under the family's names.
* `family_hidden` / `family_logits` read any layout the way transformers 5 does
  (see `hf_configs.rope_parameters`) and run the forward in float64.
* `deepseek_depth` / `mimo_depth` run one MTP depth of each layout on a given state.

Checked once against transformers itself (the suite has no torch): checkpoints written
here, loaded by transformers 4.57.1 and 5.25.0 in float64, give these logits to a
relative 3e-7 (transformers keeps the inverse frequencies in float32) for every
family and layout, each RoPE scaling, windows, biases and NoPE layers; the depths
match transformers 5's `MtpLayer` (Llama and Qwen2 blocks) and Xiaomi's
`MiMoMTPLayers.forward` on transformers' Qwen2 modules to 6e-7.
"""

import json
import math
import pathlib

import numpy as np
from hf_configs import (
    FAMILIES as FAMILIES,
    LAYOUTS as LAYOUTS,
    TINY as TINY,
    biased_projections,
    family_config as family_config,
    head_dim_of,
    rope_layers,
    rope_parameters as rope_parameters,
    tied,
    windows,
)
from llama_reference import (
    _matrix,
    _norm_weight,
    _rms_norm,
    _rotate_half,
    _silu,
    _softmax as _row_softmax,
)
from safetensors.numpy import save_file


def rope_frequencies(config):
    """`(inv_freq, attention_scaling)` of the family's rotary embedding.

    Transcribes `compute_default_rope_parameters` and `ROPE_INIT_FUNCTIONS`
    (`linear`, `llama3`, `yarn`) of `modeling_rope_utils.py`; the attention scaling
    multiplies both cosines and sines (`LlamaRotaryEmbedding.forward`).
    """
    family = config["model_type"]
    p = rope_parameters(config)
    kind, base = p["rope_type"], float(p["rope_theta"])
    head_dim = head_dim_of(config)
    fraction = p.get("partial_rotary_factor", 1.0)
    if family != "phi3" and fraction != 1.0:
        raise NotImplementedError("partial_rotary_factor outside Phi-3")
    dim = int(head_dim * fraction)
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / p["factor"], 1.0
    if kind == "llama3":
        factor, old = p["factor"], p["original_max_position_embeddings"]
        low, high = p["low_freq_factor"], p["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(p, dim, base)
    raise NotImplementedError(f"rope_type {kind!r} is not in the reference")


def _yarn(p, dim, base):
    """`_compute_yarn_parameters`: interpolation and extrapolation blended over a ramp
    of dimensions, and the attention factor `0.1 ln(factor) + 1` (or from `mscale`)."""
    factor, original = p["factor"], p["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            ratio = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
            attention = ratio
        else:
            attention = mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        turns = math.log(original / (rotations * 2 * math.pi))
        return dim * turns / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1 / pos_freqs
    ) * extrapolation
    return inv_freq, float(attention)


# --------------------------------------------------------------------------- tensors


def _bias(rng, size):
    # Random, never 0: a dropped bias must change the output.
    return rng.normal(0.0, 0.2, (size,))


def _block_tensors(rng, prefix, config):
    """The tensors of one decoder layer of `config["model_type"]` under `prefix`."""
    family = config["model_type"]
    dim, inner = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = head_dim_of(config)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    t = {}
    if family != "olmo2":
        t["input_layernorm"] = _norm_weight(rng, dim)
    t["post_attention_layernorm"] = _norm_weight(rng, dim)
    if family == "olmo2":
        t["post_feedforward_layernorm"] = _norm_weight(rng, dim)
    if family == "phi3":
        t["self_attn.qkv_proj"] = _matrix(rng, q_size + 2 * kv_size, dim)
        t["mlp.gate_up_proj"] = _matrix(rng, 2 * inner, dim)
    else:
        t["self_attn.q_proj"] = _matrix(rng, q_size, dim)
        t["self_attn.k_proj"] = _matrix(rng, kv_size, dim)
        t["self_attn.v_proj"] = _matrix(rng, kv_size, dim)
        t["mlp.gate_proj"] = _matrix(rng, inner, dim)
        t["mlp.up_proj"] = _matrix(rng, inner, dim)
    t["self_attn.o_proj"] = _matrix(rng, dim, q_size)
    t["mlp.down_proj"] = _matrix(rng, dim, inner)
    tensors = {f"{prefix}.{name}.weight": value for name, value in t.items()}
    if family == "qwen3":
        tensors[f"{prefix}.self_attn.q_norm.weight"] = _norm_weight(rng, head_dim)
        tensors[f"{prefix}.self_attn.k_norm.weight"] = _norm_weight(rng, head_dim)
    if family == "olmo2":
        tensors[f"{prefix}.self_attn.q_norm.weight"] = _norm_weight(rng, q_size)
        tensors[f"{prefix}.self_attn.k_norm.weight"] = _norm_weight(rng, kv_size)
    sizes = {"q": q_size, "k": kv_size, "v": kv_size, "o": dim}
    for name in biased_projections(config):
        size = sizes[name[-6]] if name.endswith("_proj") and "attn" in name else None
        if size is None:
            size = inner if name.split(".")[-1] in ("gate_proj", "up_proj") else dim
        tensors[f"{prefix}.{name}.bias"] = _bias(rng, size)
    return tensors


def random_family_tensors(config, *, seed, depths=0, depth_layout="deepseek_v3"):
    """Random float32 weights of `config`'s model under its transformers names.

    **Arguments:**

    - `config`: a dict as from `family_config`.
    - `seed`: NumPy generator seed.
    - `depths`: MTP depths to add.
    - `depth_layout`: `"deepseek_v3"` (depth `k`, 1-based, under
        `model.layers.{L+k-1}`: `enorm`, `hnorm`, `eh_proj` `[dim, 2·dim]`,
        `shared_head.norm` and the family's decoder-layer tensors) or `"mimo"` (depth
        `k` under `model.mtp_layers.{k-1}`: `token_layernorm`, `hidden_layernorm`,
        `input_proj` `[dim, 2·dim]`, the family's decoder-layer tensors,
        `final_layernorm`).

    **Returns:** `{name: float32 array}`; norms are `1 + 0.1·N(0, 1)`, biases
    `0.2·N(0, 1)`; `lm_head.weight` only when `tie_word_embeddings` is false.
    """
    rng = np.random.default_rng(seed)
    dim, vocab = config["hidden_size"], config["vocab_size"]
    layers = config["num_hidden_layers"]
    tensors = {"model.embed_tokens.weight": rng.normal(0.0, 0.5, (vocab, dim))}
    for layer in range(layers):
        tensors.update(_block_tensors(rng, f"model.layers.{layer}", config))
    tensors["model.norm.weight"] = _norm_weight(rng, dim)
    if not tied(config):
        tensors["lm_head.weight"] = _matrix(rng, vocab, dim)
    for k in range(1, depths + 1):
        if depth_layout == "deepseek_v3":
            p = f"model.layers.{layers + k - 1}"
            names = ("enorm", "hnorm", "eh_proj", "shared_head.norm")
        elif depth_layout == "mimo":
            p = f"model.mtp_layers.{k - 1}"
            names = ("token_layernorm", "hidden_layernorm", "input_proj")
            names += ("final_layernorm",)
        else:
            raise ValueError(f"unknown depth_layout {depth_layout!r}")
        tensors[f"{p}.{names[0]}.weight"] = _norm_weight(rng, dim)
        tensors[f"{p}.{names[1]}.weight"] = _norm_weight(rng, dim)
        tensors[f"{p}.{names[2]}.weight"] = _matrix(rng, dim, 2 * dim)
        tensors[f"{p}.{names[3]}.weight"] = _norm_weight(rng, dim)
        tensors.update(_block_tensors(rng, p, config))
    return {name: value.astype(np.float32) for name, value in tensors.items()}


def write_checkpoint(directory, config, tensors):
    """Write `config.json` and `model.safetensors` (`{"format": "pt"}` metadata) as
    `save_pretrained` does; stale `model*.safetensors*` files are removed first.

    **Returns:** `directory` as a `pathlib.Path`.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("model*.safetensors*"):
        stale.unlink()
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    stored = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(stored, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


# --------------------------------------------------------------------------- forward


def _f64(tensors, name):
    return np.asarray(tensors[name]).astype(np.float64)


def _check_supported(config):
    if config.get("hidden_act", "silu") != "silu":
        raise NotImplementedError("the reference has only hidden_act='silu'")
    if config["model_type"] not in FAMILIES:
        raise NotImplementedError(f"model_type {config['model_type']!r}")


def _rotate(x, positions, inv_freq, scaling):
    """`apply_rotary_pos_emb` (rotate-half) on the first `2·len(inv_freq)` features of
    `x` `[seq, heads, head_dim]`; the rest pass through (Phi-3's partial rotary)."""
    freqs = positions[:, None].astype(np.float64) * inv_freq[None, :]
    angles = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    cos, sin = np.cos(angles) * scaling, np.sin(angles) * scaling
    width = 2 * inv_freq.shape[0]
    rotated, passed = x[..., :width], x[..., width:]
    rotated = rotated * cos + _rotate_half(rotated) * sin
    return np.concatenate([rotated, passed], axis=-1)


def _decoder_layer(tensors, prefix, config, x, *, rope, window):
    """One decoder layer of `config["model_type"]` on `x` `[seq, dim]`, positions 0...

    `rope` is `(inv_freq, scaling)` or `None` (a SmolLM3 NoPE layer); `window` the
    sliding window or `None`; the mask is `kv <= q` and `kv > q - window`
    (`masking_utils.sliding_window_overlay`)."""
    family = config["model_type"]
    eps = config["rms_norm_eps"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = head_dim_of(config)
    seq = x.shape[0]
    biased = biased_projections(config)

    def linear(name, inputs):
        out = inputs @ _f64(tensors, f"{prefix}.{name}.weight").T
        return out + _f64(tensors, f"{prefix}.{name}.bias") if name in biased else out

    def norm(name, inputs):
        return _rms_norm(inputs, _f64(tensors, f"{prefix}.{name}.weight"), eps)

    h = x if family == "olmo2" else norm("input_layernorm", x)
    if family == "phi3":
        qkv = linear("self_attn.qkv_proj", h)
        q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
        q, k, v = qkv[:, :q_end], qkv[:, q_end:k_end], qkv[:, k_end:]
    else:
        q = linear("self_attn.q_proj", h)
        k = linear("self_attn.k_proj", h)
        v = linear("self_attn.v_proj", h)
    if family == "olmo2":  # over the whole projection, before the head split
        q, k = norm("self_attn.q_norm", q), norm("self_attn.k_norm", k)
    q = q.reshape(seq, heads, head_dim)
    k = k.reshape(seq, kv_heads, head_dim)
    v = v.reshape(seq, kv_heads, head_dim)
    if family == "qwen3":  # per head, over head_dim, before RoPE
        q, k = norm("self_attn.q_norm", q), norm("self_attn.k_norm", k)
    if rope is not None:
        positions = np.arange(seq)
        q, k = _rotate(q, positions, *rope), _rotate(k, positions, *rope)
    groups = heads // kv_heads  # repeat_kv: kv head j serves heads j*groups ...
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * head_dim**-0.5
    query, key = np.arange(seq)[:, None], np.arange(seq)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    scores = np.where(allowed[None], scores, -np.inf)
    attn = np.einsum("hqk,khd->qhd", _row_softmax(scores), v)
    attn = linear("self_attn.o_proj", attn.reshape(seq, heads * head_dim))
    if family == "olmo2":
        x = x + norm("post_attention_layernorm", attn)
        h = x
    else:
        x = x + attn
        h = norm("post_attention_layernorm", x)
    if family == "phi3":
        gate, up = np.split(linear("mlp.gate_up_proj", h), 2, axis=-1)
    else:
        gate, up = linear("mlp.gate_proj", h), linear("mlp.up_proj", h)
    mlp = linear("mlp.down_proj", _silu(gate) * up)
    if family == "olmo2":
        return x + norm("post_feedforward_layernorm", mlp)
    return x + mlp


def _output_head(tensors, config):
    if tied(config):
        return _f64(tensors, "model.embed_tokens.weight")
    return _f64(tensors, "lm_head.weight")


def family_hidden(tensors, config, tokens):
    """The last decoder layer's output, before `model.norm`, of one row.

    **Arguments:**

    - `tensors`: transformers names to arrays (computed in float64).
    - `config`: a `config.json` dict in either layout.
    - `tokens`: int token ids `[seq]`, positions `0..seq-1`, no padding.

    **Returns:** float64 `[seq, hidden_size]`.
    """
    _check_supported(config)
    family = config["model_type"]
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one row [seq], got shape {tokens.shape}")
    rope = rope_frequencies(config)
    uses_rope, layer_windows = rope_layers(family, config), windows(family, config)
    x = _f64(tensors, "model.embed_tokens.weight")[tokens]
    for layer in range(config["num_hidden_layers"]):
        x = _decoder_layer(
            tensors,
            f"model.layers.{layer}",
            config,
            x,
            rope=rope if uses_rope[layer] else None,
            window=layer_windows[layer],
        )
    return x


def family_logits(tensors, config, tokens):
    """`*ForCausalLM` logits of one row: `model.norm`, then `lm_head` (the embedding
    when `tie_word_embeddings`).

    **Arguments:** as `family_hidden`.

    **Returns:** float64 `[seq, vocab_size]`.
    """
    x = family_hidden(tensors, config, tokens)
    x = _rms_norm(x, _f64(tensors, "model.norm.weight"), config["rms_norm_eps"])
    return x @ _output_head(tensors, config).T


def final_norm(tensors, config, hidden):
    """`model.norm` applied to `hidden` (the trunk state "after the final norm")."""
    eps = config["rms_norm_eps"]
    hidden = np.asarray(hidden, np.float64)
    return _rms_norm(hidden, _f64(tensors, "model.norm.weight"), eps)


# ------------------------------------------------------------------------ MTP depths


def _depth(tensors, config, tokens, state, k, *, names, embedding_first):
    """The shared shape of both layouts: norms, projection, one block (full causal,
    RoPE at positions `0..seq-k-1`), the depth's norm, the output head."""
    tokens = np.asarray(tokens)
    state = np.asarray(state, np.float64)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    length = tokens.shape[0] - k
    if length < 1 or state.shape[0] < length:
        raise ValueError(
            f"need seq > k and at least seq - k = {length} state rows, got "
            f"seq={tokens.shape[0]}, k={k}, state rows={state.shape[0]}"
        )
    prefix, e_norm, h_norm, proj, out_norm, head = names
    eps = config["rms_norm_eps"]
    embedded = _f64(tensors, "model.embed_tokens.weight")[tokens[k:]]
    e = _rms_norm(embedded, _f64(tensors, f"{prefix}.{e_norm}.weight"), eps)
    h = _rms_norm(state[:length], _f64(tensors, f"{prefix}.{h_norm}.weight"), eps)
    joined = np.concatenate([e, h] if embedding_first else [h, e], axis=-1)
    x = joined @ _f64(tensors, f"{prefix}.{proj}.weight").T
    block = _decoder_layer(
        tensors, prefix, config, x, rope=rope_frequencies(config), window=None
    )
    normed = _rms_norm(block, _f64(tensors, f"{prefix}.{out_norm}.weight"), eps)
    return block, normed, normed @ head.T


def deepseek_depth(tensors, config, tokens, state, k):
    """MTP depth `k` (1-based) stored under DeepSeek-V3's names, on a given state.

    With `p = model.layers.{L+k-1}`, for `i < seq - k`:
    `x_i = p.eh_proj @ [p.enorm(E[tokens[i+k]]) ; p.hnorm(state[i])]` (embedding
    first), `b = ` the family's decoder layer under `p` (full causal attention, RoPE at
    positions `0..seq-k-1`), `n = p.shared_head.norm(b)`, logits `n @ head.T` with
    `head = p.shared_head.head` when stored, else the model's output head.
    Transcribed from transformers 5's `MtpLayer.forward` (`modeling_layers.py`) and
    vLLM's `DeepSeekMultiTokenPredictorLayer` (`deepseek_mtp.py`).

    Which `state` each implementation feeds (see the conventions table of the docs):
    depth 1 reads the trunk after `model.norm` in vLLM, SGLang and Megatron-Core
    (`final_norm(...)`), before it in MaxText (`family_hidden(...)`); depth `k > 1`
    reads the previous depth's `n` in transformers' `MtpModel`, SGLang and
    Megatron-Core, its raw `b` in vLLM and MaxText.

    **Arguments:**

    - `tensors`, `config`: as `family_hidden`.
    - `tokens`: int token ids `[seq]`.
    - `state`: the state depth `k` reads, at least `seq - k` rows.
    - `k`: the depth, `>= 1`.

    **Returns:** `(b, n, logits)`: float64 `[seq-k, dim]`, `[seq-k, dim]`,
    `[seq-k, vocab]`; row `i` predicts `tokens[i + k + 1]`.
    """
    prefix = f"model.layers.{config['num_hidden_layers'] + k - 1}"
    head_name = f"{prefix}.shared_head.head.weight"
    head = (
        _f64(tensors, head_name)
        if head_name in tensors
        else _output_head(tensors, config)
    )
    names = (prefix, "enorm", "hnorm", "eh_proj", "shared_head.norm", head)
    return _depth(tensors, config, tokens, state, k, names=names, embedding_first=True)


def mimo_depth(tensors, config, tokens, state, k):
    """MTP depth `k` (1-based) stored under Xiaomi MiMo's names, on a given state.

    With `p = model.mtp_layers.{k-1}`, for `i < seq - k`:
    `x_i = p.input_proj @ [p.hidden_layernorm(state[i]) ;
    p.token_layernorm(E[tokens[i+k]])]`
    (hidden first, the reverse of DeepSeek-V3), `b = ` the Qwen2 decoder layer under
    `p` (`input_layernorm`, `self_attn.*` with q/k/v biases, `post_attention_layernorm`,
    `mlp.*`; full causal attention, RoPE at positions `0..seq-k-1`),
    `n = p.final_layernorm(b)`, logits `n @ lm_head.T`. Transcribed from
    `MiMoMTPLayers.forward` (Xiaomi's `modeling_mimo.py`) and vLLM's
    `MiMoMultiTokenPredictorLayer` (`mimo_mtp.py`, which maps `model.mtp_layers.{k}`,
    0-based, to layer `L + k`).

    Which `state` is fed: vLLM and SGLang give depth 1 the trunk after `model.norm`
    (`final_norm(...)`) and depth `k > 1` the previous depth's `n` (the layer returns
    its output after `final_layernorm`); Xiaomi's file defines no drafting loop. Not
    transcribed: vLLM zeroes the embedding at position 0 (a serving detail; every
    row here starts at position 0 of the depth's own window) and drafts one depth.

    **Arguments:** as `deepseek_depth`.

    **Returns:** `(b, n, logits)` as `deepseek_depth`.
    """
    prefix = f"model.mtp_layers.{k - 1}"
    names = (
        prefix,
        "token_layernorm",
        "hidden_layernorm",
        "input_proj",
        "final_layernorm",
        _output_head(tensors, config),
    )
    return _depth(tensors, config, tokens, state, k, names=names, embedding_first=False)
