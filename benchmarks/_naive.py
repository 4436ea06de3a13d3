"""A naive multi-token-prediction loss, written the way public MTP code writes it.

MaxText's `multi_token_prediction.py`, Megatron-Core's `multi_token_prediction.py` and
DeepSeek-V3's reference `model.py` all share the same shape, reproduced here in plain
`jax.numpy`, on the parameters of a sequential, transformer-block
`eqx_mtp.MTPModel` (read as arrays; none of `eqx_mtp`'s modules or functions runs):

- a Python `for` loop over the trunk's layers and over the MTP depths, unrolled in
    the traced program (one copy of a block per layer and per depth);
- full `[batch, seq, vocab]` logits for the main head and for every depth, through
    `jax.nn.log_softmax`;
- materialised `[batch, heads, seq, seq]` attention with a causal + document mask;
- no rematerialisation.

The forward is the published architecture: Llama's pre-norm block (RMSNorm, RoPE in
the rotate-half layout, grouped-query attention, SwiGLU) and DeepSeek-V3's depth `k`:
`h^k = Block_k(eh_proj([enorm(E[t_{i+k}]) ; hnorm(h^{k-1}_i)]))`, then the shared
final norm and the shared head. Which positions count and how the per-depth losses
are reduced follow the validity rule and reductions of `docs/maths.md` (the same rule
and reduction as `eqx_mtp.mtp_loss`):
position `i` of depth `k` predicts `t_{i+k+1}` and counts when that token lies in the
row, in `i`'s document and `i` is not padding; `L = S_0/N_0 + λ · (1/D) Σ_k S_k/N_k`.

`tests/test_naive_baseline.py` checks loss and gradients against `eqx_mtp.mtp_loss`,
which makes this module an independent reference for our loss as well as the
baseline of `benchmarks/naive_baseline.py`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_MASKED = -1e30  # a large negative logit rather than -inf: no NaN in any gradient


def _layers_of(stacked, index: int) -> dict:
    """The arrays of block `index` of a stacked `eqx_mtp.nn.TransformerBlock`, by the
    names Hugging Face Llama checkpoints use. Linear weights are `[out, in]`."""
    attention, mlp = stacked.attention, stacked.mlp
    return dict(
        input_layernorm=stacked.attention_norm.weight[index],
        q_proj=attention.q_proj.weight[index],
        k_proj=attention.k_proj.weight[index],
        v_proj=attention.v_proj.weight[index],
        o_proj=attention.o_proj.weight[index],
        post_attention_layernorm=stacked.mlp_norm.weight[index],
        gate_proj=mlp.gate_proj.weight[index],
        up_proj=mlp.up_proj.weight[index],
        down_proj=mlp.down_proj.weight[index],
    )


def naive_params(model) -> dict:
    """A sequential, transformer-block `eqx_mtp.MTPModel`'s arrays as a dict of
    plain per-layer and per-depth arrays (differentiable: indexing only)."""
    config = model.config
    if config.mtp_kind != "sequential" or config.mtp_block != "transformer":
        raise ValueError(
            "naive_params: only sequential depths with transformer blocks, got "
            f"mtp_kind={config.mtp_kind!r}, mtp_block={config.mtp_block!r}"
        )
    if config.shared_depth_layer:
        raise ValueError("naive_params: shared_depth_layer is not supported")
    trunk = model.trunk
    params = dict(
        embed_tokens=trunk.embedding,
        layers=[_layers_of(trunk.blocks, i) for i in range(config.num_layers)],
        norm=trunk.final_norm.weight,
        lm_head=trunk.embedding if trunk.unembedding is None else trunk.unembedding,
        mtp=[],
    )
    if config.num_depths:
        depths = model.depths.depths
        for k in range(config.num_depths):
            params["mtp"].append(
                dict(
                    enorm=depths.enorm.weight[k],
                    hnorm=depths.hnorm.weight[k],
                    eh_proj=depths.eh_proj.weight[k],  # [dim, 2·dim]
                    block=_layers_of(depths.layer, k),
                    # DeepSeek-V3's shared_head.norm, when the depths have their own.
                    norm=None if depths.norm is None else depths.norm.weight[k],
                )
            )
    return params


def rms_norm(x, weight, eps):
    variance = jnp.mean(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(variance + eps) * weight


def rope(x, positions, theta):
    """Rotate-half rotary embedding of `x` `[batch, seq, heads, head_dim]`."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * jnp.cos(angles) + rotated * jnp.sin(angles)


def decoder_layer(layer, x, positions, mask, config):
    """Llama's pre-norm block on `x` `[batch, seq, dim]`; `mask` `[batch, seq, seq]`."""
    batch, seq, _ = x.shape
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    h = rms_norm(x, layer["input_layernorm"], config.norm_eps)
    q = (h @ layer["q_proj"].T).reshape(batch, seq, heads, head_dim)
    k = (h @ layer["k_proj"].T).reshape(batch, seq, kv_heads, head_dim)
    v = (h @ layer["v_proj"].T).reshape(batch, seq, kv_heads, head_dim)
    q = rope(q, positions, config.rope_theta)
    k = rope(k, positions, config.rope_theta)
    # repeat_kv: query head h reads key/value head h // (heads / kv_heads).
    k = jnp.repeat(k, heads // kv_heads, axis=2)
    v = jnp.repeat(v, heads // kv_heads, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    scores = jnp.where(mask[:, None], scores, _MASKED)
    weights = jax.nn.softmax(scores, axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, -1)
    x = x + attended @ layer["o_proj"].T
    h = rms_norm(x, layer["post_attention_layernorm"], config.norm_eps)
    gated = jax.nn.silu(h @ layer["gate_proj"].T) * (h @ layer["up_proj"].T)
    return x + gated @ layer["down_proj"].T


def documents(segment_ids):
    """Number the documents of each row 1, 2, … (a document is a maximal run of one
    non-zero id, so a reused id starts another); padding stays 0."""
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    starts = (segment_ids != 0) & (segment_ids != previous)
    return jnp.where(segment_ids != 0, jnp.cumsum(starts, axis=1), 0)


def positions_of(segment_ids):
    """Positions restarting at 0 wherever the segment id changes along the row."""
    seq = segment_ids.shape[1]
    index = jnp.arange(seq)[None, :]
    starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    starts = starts.at[:, 0].set(True)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def shift_left(x, k):
    """`x[:, i + k]`, zero past the row's end (MaxText's `roll_and_mask`)."""
    return jnp.pad(x[:, k:], ((0, 0), (0, k)))


def cross_entropy_sum(hidden, norm_weight, lm_head, tokens, docs, k, eps):
    """Sum and count of `-log p(t_{i+k+1})` over the positions that count at depth
    `k`, from full `[batch, seq, vocab]` logits."""
    logits = rms_norm(hidden, norm_weight, eps) @ lm_head.T
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = shift_left(tokens, k + 1)
    target_docs = shift_left(docs, k + 1)
    # The validity rule: compare i with the target's own position, not with a neighbour.
    valid = (docs != 0) & (target_docs == docs)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid, dtype=jnp.float32)


def naive_mtp_loss(model, tokens, segment_ids, *, mtp_weight=0.3):
    """`(loss, depth_losses)` of a batch of packed rows, as `eqx_mtp.mtp_loss` with
    `reduction="mean"` defines it, computed the naive way (see the module docstring).

    **Arguments:**

    - `model`: a sequential, transformer-block `eqx_mtp.MTPModel` (float32).
    - `tokens`, `segment_ids`: int32 `[batch, seq]`; segment id 0 is padding.
    - `mtp_weight`: λ.

    **Returns:**

    The scalar loss and the `[D + 1]` per-depth mean losses (index 0 the main head).
    """
    config = model.config
    params = naive_params(model)
    eps = config.norm_eps
    docs = documents(segment_ids)
    positions = positions_of(segment_ids)
    index = jnp.arange(tokens.shape[1])
    causal = index[None, :] <= index[:, None]
    mask = causal[None] & (docs[:, :, None] == docs[:, None, :])

    hidden = params["embed_tokens"][tokens]
    for layer in params["layers"]:
        hidden = decoder_layer(layer, hidden, positions, mask, config)

    loss_sum, count = cross_entropy_sum(
        hidden, params["norm"], params["lm_head"], tokens, docs, 0, eps
    )
    losses = [loss_sum / jnp.maximum(count, 1.0)]
    for k, depth in enumerate(params["mtp"], start=1):
        # The embedding of t_{i+k}; beyond the row, token 0 (never a counted target).
        ahead = params["embed_tokens"][shift_left(tokens, k)]
        # Embedding first, hidden second (DeepSeek-V3's weights).
        normed_ahead = rms_norm(ahead, depth["enorm"], eps)
        normed_hidden = rms_norm(hidden, depth["hnorm"], eps)
        combined = jnp.concatenate([normed_ahead, normed_hidden], axis=-1)
        hidden = decoder_layer(
            depth["block"], combined @ depth["eh_proj"].T, positions, mask, config
        )
        norm = params["norm"] if depth["norm"] is None else depth["norm"]
        loss_sum, count = cross_entropy_sum(
            hidden, norm, params["lm_head"], tokens, docs, k, eps
        )
        losses.append(loss_sum / jnp.maximum(count, 1.0))
    depth_losses = jnp.stack(losses)
    mtp = jnp.mean(depth_losses[1:]) if len(losses) > 1 else 0.0
    return depth_losses[0] + mtp_weight * mtp, depth_losses
