"""Independent NumPy reference for Hugging Face Llama checkpoints and DeepSeek-V3 MTP.

Nothing here imports `eqx_mtp`: the writer produces the on-disk layout that
`transformers` produces (`config.json`, `model.safetensors` or shards plus
`model.safetensors.index.json`), and the forward passes are written out in float64
from the published architectures, so that a test can compare the library's import
against them:

* Llama: `transformers/models/llama/modeling_llama.py` (pre-norm RMSNorm, RoPE in the
  rotate-half layout, grouped-query attention with `repeat_kv`, SwiGLU MLP).
* DeepSeek-V3 multi-token prediction as stored in its Hugging Face checkpoint (depth
  `k` under `model.layers.{L+k-1}`) and run by vLLM's `deepseek_mtp.py`:
  `eh_proj(concat(enorm(embed(t_{i+k})), hnorm(h^{k-1}_i)))`, one decoder layer,
  `shared_head.norm`, then the output head.

`docs/weights.md` lists the layouts.
"""

import json
import pathlib

import numpy as np
from safetensors.numpy import load_file, save_file

_LAYER_MATRICES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


# --------------------------------------------------------------------------- writing


def llama_config(
    *,
    vocab_size,
    hidden_size,
    num_layers,
    num_heads,
    num_kv_heads,
    intermediate_size,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=64,
    extra_config=None,
    dtype=np.float32,
):
    """The `config.json` dict that `write_llama_checkpoint` writes.

    **Arguments:** as `write_llama_checkpoint`; `extra_config` is merged last, so it
    may override any key or add unsupported ones (`rope_scaling`, `head_dim`,
    `num_nextn_predict_layers`, ...).

    **Returns:** a JSON-serialisable dict in the `LlamaConfig` vocabulary.
    """
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "num_hidden_layers": int(num_layers),
        "num_attention_heads": int(num_heads),
        "num_key_value_heads": int(num_kv_heads),
        "intermediate_size": int(intermediate_size),
        "rms_norm_eps": float(rms_norm_eps),
        "rope_theta": float(rope_theta),
        "tie_word_embeddings": bool(tie_word_embeddings),
        "max_position_embeddings": int(max_position_embeddings),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        "torch_dtype": np.dtype(dtype).name,
    }
    config.update(extra_config or {})
    return config


def _sizes(config):
    dim = config["hidden_size"]
    num_heads = config["num_attention_heads"]
    num_kv_heads = config.get("num_key_value_heads") or num_heads
    head_dim = config.get("head_dim") or dim // num_heads
    return dim, num_heads, num_kv_heads, head_dim, config["intermediate_size"]


def _matrix(rng, out_features, in_features):
    # Scaled so that attention scores stay far from uniform at test sizes while large
    # sizes do not saturate the softmax.
    std = float(np.clip(1.0 / np.sqrt(in_features), 0.02, 0.1))
    return rng.normal(0.0, std, (out_features, in_features))


def _norm_weight(rng, dim):
    # Far enough from 1 that a missing, swapped or misplaced norm weight shows.
    return 1.0 + 0.1 * rng.normal(size=(dim,))


def _random_layer(rng, prefix, config):
    """Random float64 weights of one Llama decoder layer under `prefix`."""
    dim, num_heads, num_kv_heads, head_dim, hidden = _sizes(config)
    shapes = {
        "self_attn.q_proj": (num_heads * head_dim, dim),
        "self_attn.k_proj": (num_kv_heads * head_dim, dim),
        "self_attn.v_proj": (num_kv_heads * head_dim, dim),
        "self_attn.o_proj": (dim, num_heads * head_dim),
        "mlp.gate_proj": (hidden, dim),
        "mlp.up_proj": (hidden, dim),
        "mlp.down_proj": (dim, hidden),
    }
    tensors = {
        f"{prefix}.input_layernorm.weight": _norm_weight(rng, dim),
        f"{prefix}.post_attention_layernorm.weight": _norm_weight(rng, dim),
    }
    for name in _LAYER_MATRICES:
        tensors[f"{prefix}.{name}.weight"] = _matrix(rng, *shapes[name])
    return tensors


def random_llama_tensors(config, *, seed=0, dtype=np.float32):
    """Random weights for `config` under their Hugging Face names.

    **Arguments:**

    - `config`: a dict as from `llama_config`.
    - `seed`: NumPy generator seed; the same seed and config give the same tensors.
    - `dtype`: storage dtype (`np.float32`, `np.float16`, `ml_dtypes.bfloat16`).

    **Returns:** `{name: array}`, torch `Linear` layout `[out, in]`; `lm_head.weight`
    only when `tie_word_embeddings` is false.
    """
    rng = np.random.default_rng(seed)
    dim = config["hidden_size"]
    vocab = config["vocab_size"]
    tensors = {"model.embed_tokens.weight": rng.normal(0.0, 0.1, (vocab, dim))}
    for layer in range(config["num_hidden_layers"]):
        tensors.update(_random_layer(rng, f"model.layers.{layer}", config))
    tensors["model.norm.weight"] = _norm_weight(rng, dim)
    if not config.get("tie_word_embeddings", False):
        tensors["lm_head.weight"] = _matrix(rng, vocab, dim)
    return {name: value.astype(dtype) for name, value in tensors.items()}


def add_random_mtp_depths(
    tensors, config, num_depths, seed=1, *, with_shared_head=False
):
    """Random DeepSeek-V3 MTP depths added to a copy of `tensors`.

    Depth `k` (1-based) goes under `model.layers.{L+k-1}` with `L =
    config["num_hidden_layers"]`: `enorm.weight`, `hnorm.weight`, `eh_proj.weight`
    `[dim, 2*dim]`, `shared_head.norm.weight` and a full decoder layer
    (`input_layernorm`, `self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`,
    `mlp.{gate,up,down}_proj`).

    **Arguments:**

    - `tensors`: the trunk's tensors (not modified); their embedding's dtype is used.
    - `config`: the trunk's config dict (set `num_nextn_predict_layers` yourself).
    - `num_depths`: how many depths to add.
    - `seed`: NumPy generator seed for the depth weights.
    - `with_shared_head`: also store `shared_head.head.weight`, a copy of the output
      head, as DeepSeek-V3's checkpoint does.

    **Returns:** a new dict, `tensors` plus the depth tensors; pass it as
    `extra_tensors` to `write_llama_checkpoint`.
    """
    rng = np.random.default_rng(seed)
    dtype = tensors["model.embed_tokens.weight"].dtype
    dim = config["hidden_size"]
    out = dict(tensors)
    for k in range(1, num_depths + 1):
        prefix = f"model.layers.{config['num_hidden_layers'] + k - 1}"
        depth = {
            f"{prefix}.enorm.weight": _norm_weight(rng, dim),
            f"{prefix}.hnorm.weight": _norm_weight(rng, dim),
            f"{prefix}.eh_proj.weight": _matrix(rng, dim, 2 * dim),
            f"{prefix}.shared_head.norm.weight": _norm_weight(rng, dim),
        }
        depth.update(_random_layer(rng, prefix, config))
        if with_shared_head:
            depth[f"{prefix}.shared_head.head.weight"] = _output_head(tensors, config)
        out.update({name: np.asarray(v).astype(dtype) for name, v in depth.items()})
    return out


TINY_LLAMA = dict(
    vocab_size=40,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=24,
    max_position_embeddings=32,
)
"""The shape of the smallest Llama checkpoint the tests write (one layer of width 16,
2 heads sharing one KV head); tests that need another shape override fields of it."""


def tiny_llama(**overrides) -> dict:
    """`TINY_LLAMA` with `overrides`: keyword arguments of `write_llama_checkpoint`."""
    return TINY_LLAMA | overrides


def write_llama_checkpoint(
    directory,
    *,
    vocab_size,
    hidden_size,
    num_layers,
    num_heads,
    num_kv_heads,
    intermediate_size,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=64,
    seed=0,
    shards=1,
    extra_config=None,
    extra_tensors=None,
    dtype=np.float32,
):
    """Write a random Llama checkpoint in the Hugging Face layout.

    Writes `config.json` (see `llama_config`) and either `model.safetensors`
    (`shards == 1`) or `model-0000k-of-0000n.safetensors` plus
    `model.safetensors.index.json` = `{"metadata": {"total_size": bytes},
    "weight_map": {name: file}}`, as `transformers`' `save_pretrained` does. Each
    file carries the `{"format": "pt"}` metadata `transformers` expects. Existing
    `model*.safetensors*` files in `directory` are removed first so that a rewrite
    leaves no stale shard behind.

    **Arguments:**

    - `directory`: created if missing.
    - sizes and `rms_norm_eps`, `rope_theta`, `tie_word_embeddings`,
      `max_position_embeddings`: the `LlamaConfig` fields of the same meaning
      (`num_layers` = `num_hidden_layers`, `num_heads` = `num_attention_heads`,
      `num_kv_heads` = `num_key_value_heads`).
    - `seed`: seed of `random_llama_tensors`.
    - `shards`: number of safetensors files (contiguous runs of tensors).
    - `extra_config`: merged last into `config.json`.
    - `extra_tensors`: merged last into the tensors (e.g. from
      `add_random_mtp_depths`); stored as given.
    - `dtype`: storage dtype of the random tensors; also `torch_dtype`.

    **Returns:** `{name: array}` of every tensor written, as stored.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = llama_config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        extra_config=extra_config,
        dtype=dtype,
    )
    tensors = random_llama_tensors(config, seed=seed, dtype=dtype)
    extra_tensors = extra_tensors or {}
    tensors.update({k: np.ascontiguousarray(v) for k, v in extra_tensors.items()})

    for stale in directory.glob("model*.safetensors*"):
        stale.unlink()
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    names = list(tensors)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return tensors
    if not 1 < shards <= len(names):
        raise ValueError(f"shards must be in [1, {len(names)}], got {shards}")
    weight_map = {}
    for index, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {names[i]: tensors[names[i]] for i in chunk}
        save_file(part, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    index = {
        "metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"
    )
    return tensors


def read_llama_checkpoint(directory):
    """Read back `(tensors, config)` from a single-file or sharded checkpoint."""
    directory = pathlib.Path(directory)
    config = json.loads((directory / "config.json").read_text())
    index_path = directory / "model.safetensors.index.json"
    if not index_path.exists():
        return load_file(directory / "model.safetensors"), config
    weight_map = json.loads(index_path.read_text())["weight_map"]
    tensors = {}
    for filename in sorted(set(weight_map.values())):
        tensors.update(load_file(directory / filename))
    return tensors, config


# --------------------------------------------------------------------------- forward


def _check_supported(config):
    if config.get("rope_scaling") is not None:
        raise NotImplementedError("the reference has no rope_scaling")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise NotImplementedError("the reference has no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise NotImplementedError("the reference has only hidden_act='silu'")


def _f64(tensors, name):
    return np.asarray(tensors[name]).astype(np.float64)


def _rms_norm(x, weight, eps):
    """`LlamaRMSNorm`: `weight * x / sqrt(mean(x**2) + eps)` over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope(x, theta):
    """`apply_rotary_pos_emb` on `x` `[seq, heads, head_dim]`, positions `0..seq-1`."""
    seq_len, _, head_dim = x.shape
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    return x * np.cos(angles) + _rotate_half(x) * np.sin(angles)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def _decoder_layer(tensors, prefix, config, x):
    """`LlamaDecoderLayer` on `x` `[seq, dim]` (float64), causal, positions from 0."""
    _, num_heads, num_kv_heads, head_dim, _ = _sizes(config)
    eps = config["rms_norm_eps"]
    theta = config.get("rope_theta", 10000.0)
    seq_len = x.shape[0]

    def linear(name, inputs):
        return inputs @ _f64(tensors, f"{prefix}.{name}.weight").T

    h = _rms_norm(x, _f64(tensors, f"{prefix}.input_layernorm.weight"), eps)
    q = linear("self_attn.q_proj", h).reshape(seq_len, num_heads, head_dim)
    k = linear("self_attn.k_proj", h).reshape(seq_len, num_kv_heads, head_dim)
    v = linear("self_attn.v_proj", h).reshape(seq_len, num_kv_heads, head_dim)
    q, k = _rope(q, theta), _rope(k, theta)
    # `repeat_kv`: kv head j serves query heads j*groups .. (j+1)*groups - 1.
    groups = num_heads // num_kv_heads
    k = np.repeat(k, groups, axis=1)
    v = np.repeat(v, groups, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim)
    causal = np.tril(np.ones((seq_len, seq_len), bool))
    scores = np.where(causal[None], scores, -np.inf)
    attn = np.einsum("hqk,khd->qhd", _softmax(scores), v)
    x = x + linear("self_attn.o_proj", attn.reshape(seq_len, num_heads * head_dim))

    h = _rms_norm(x, _f64(tensors, f"{prefix}.post_attention_layernorm.weight"), eps)
    mlp = _silu(linear("mlp.gate_proj", h)) * linear("mlp.up_proj", h)
    return x + linear("mlp.down_proj", mlp)


def _output_head(tensors, config):
    if config.get("tie_word_embeddings", False):
        return tensors["model.embed_tokens.weight"]
    return tensors["lm_head.weight"]


def llama_hidden(tensors, config, tokens):
    """Output of the last decoder layer, before `model.norm`, of one row.

    Follows `LlamaModel.forward` of `transformers` (no cache, no padding).

    **Arguments:**

    - `tensors`: Hugging Face names to arrays (any float dtype; computed in float64).
    - `config`: the `config.json` dict.
    - `tokens`: int token ids `[seq]`.

    **Returns:** float64 `[seq, hidden_size]`.
    """
    _check_supported(config)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one row [seq], got shape {tokens.shape}")
    x = _f64(tensors, "model.embed_tokens.weight")[tokens]
    for layer in range(config["num_hidden_layers"]):
        x = _decoder_layer(tensors, f"model.layers.{layer}", config, x)
    return x


def llama_logits(tensors, config, tokens):
    """`LlamaForCausalLM` logits of one row: `model.norm` then `lm_head` (or the
    embedding when `tie_word_embeddings`).

    **Arguments:** as `llama_hidden`.

    **Returns:** float64 `[seq, vocab_size]`.
    """
    x = llama_hidden(tensors, config, tokens)
    x = _rms_norm(x, _f64(tensors, "model.norm.weight"), config["rms_norm_eps"])
    return x @ np.asarray(_output_head(tensors, config)).astype(np.float64).T


def deepseek_mtp_depth_logits(
    tensors, config, tokens, hidden, depth_index, *, num_layers
):
    """One DeepSeek-V3 MTP depth as stored in its Hugging Face checkpoint.

    With `k = depth_index` (1-based) and `p = model.layers.{num_layers + k - 1}`, for
    `i = 0 .. seq-1-k`:
    `x_i = p.eh_proj.weight @ concat(p.enorm(E[tokens[i+k]]), p.hnorm(hidden[i]))`
    (embedding first), then `h^k = ` the Llama decoder layer under `p` over those
    `seq - k` positions (causal, positions from 0), and
    `logits = p.shared_head.norm(h^k) @ head.T`, where `head` is
    `p.shared_head.head.weight` when present, else `lm_head` (or the embedding when
    tied). Follows vLLM's `DeepSeekMultiTokenPredictorLayer`; `h^k_i` predicts
    `tokens[i + k + 1]`.

    **Arguments:**

    - `tensors`, `config`: as `llama_hidden`; the depth's layer uses the trunk's
      attention sizes, `rms_norm_eps` and `rope_theta`.
    - `tokens`: int token ids `[seq]`.
    - `hidden`: `h^{k-1}` with at least `seq - k` rows: `llama_hidden(...)` for
      `k = 1`, else the previous depth's `h^{k-1}` (`seq - k + 1` rows); only the
      first `seq - k` rows are used.
    - `depth_index`: `k >= 1`.
    - `num_layers`: the trunk's number of layers `L`.

    **Returns:** `(h^k, logits)`, float64 `[seq - k, hidden_size]` and
    `[seq - k, vocab_size]`.
    """
    _check_supported(config)
    k = int(depth_index)
    if k < 1:
        raise ValueError(f"depth_index must be >= 1, got {depth_index}")
    tokens = np.asarray(tokens)
    hidden = np.asarray(hidden).astype(np.float64)
    length = tokens.shape[0] - k
    if length < 1 or hidden.shape[0] < length:
        raise ValueError(
            f"need seq > k and at least seq - k = {length} hidden rows, got "
            f"seq={tokens.shape[0]}, k={k}, hidden rows={hidden.shape[0]}"
        )
    p = f"model.layers.{num_layers + k - 1}"
    eps = config["rms_norm_eps"]
    embedded = _f64(tensors, "model.embed_tokens.weight")[tokens[k:]]
    joined = np.concatenate(
        [
            _rms_norm(embedded, _f64(tensors, f"{p}.enorm.weight"), eps),
            _rms_norm(hidden[:length], _f64(tensors, f"{p}.hnorm.weight"), eps),
        ],
        axis=-1,
    )
    x = joined @ _f64(tensors, f"{p}.eh_proj.weight").T
    h = _decoder_layer(tensors, p, config, x)
    head_name = f"{p}.shared_head.head.weight"
    head = tensors[head_name] if head_name in tensors else _output_head(tensors, config)
    normed = _rms_norm(h, _f64(tensors, f"{p}.shared_head.norm.weight"), eps)
    return h, normed @ np.asarray(head).astype(np.float64).T
