"""Decoding with a KV cache, plain or self-speculative: the MTP depths draft the next
tokens and one trunk pass over the drafts verifies them.

Every row of a batch holds one prompt (one document), left-aligned; rows run in step
inside one compiled `jax.lax.while_loop` until each has its new tokens.

**A round** (per row). The row holds `n` tokens: the prompt and the tokens generated so
far, the last of which is *pending* (the trunk has not read it yet), and the trunk's
KV cache and hidden states `h⁰` for positions `≤ n - 2`.

1. *Draft* (speculative only): the depths run at position `n - 2` exactly as in
   training: depth `k` reads depth `k-1`'s state (sequential; the trunk's, parallel)
   and the embedding of the token `k` places ahead, the pending token for depth 1 and
   the previous depth's draft after that. Draft `d_k` proposes the token at
   `n - 1 + k`. A depth whose layer attends keeps a KV cache of its own: each round
   recomputes a window of its last `2D` positions, so positions whose tokens were
   drafts last round are rewritten with the accepted (or corrected) tokens.
2. *Verify*: one cached trunk pass over `[pending, d_1 … d_D]` gives the trunk's
   distribution `p_0 … p_D` at positions `n … n + D`.
3. *Accept* the longest prefix of drafts the trunk agrees with (greedy: `d_k` equals
   the argmax of `p_{k-1}`; sampling: `d_k` is kept with probability
   `min(1, p_{k-1}(d_k) / q_k(d_k))`), then add one token of the trunk's own: the
   argmax of `p_a` (greedy), a sample of the normalised `(p_a - q_{a+1})⁺` after a
   rejection, or of `p_D` when every draft was kept. That token is the new pending
   one. Cache entries past the kept tokens are overwritten by later rounds before
   any query reads them (a query at position `i` reads keys `≤ i` only).

Plain decoding is the same round with no drafts. Greedy speculative output is the
plain greedy output; sampled output follows the trunk's distribution exactly
(Leviathan et al. 2023; Chen et al. 2023).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._attention import grouped_attention
from ._model import MTPModel
from ._mtp import LinearBlock, MLPBlock, MTPDepths
from ._transformer import Transformer, TransformerBlock, dense


class Generation(eqx.Module):
    """What [`eqx_mtp.generate`][] returns.

    - `tokens`: `[batch, max_new_tokens]` generated token ids.
    - `rounds`: `[batch]` trunk passes after the prompt's (one per round).
    - `accepted`: `[batch, num_depths]`: in how many rounds the drafts of depths
        `1 … k` were all kept (the sequential acceptance of depth `k` is
        `accepted[:, k-1] / rounds`); zero columns when not speculative.
    - `seconds`: wall time of the decoding, compilation excluded.
    - `compile_seconds`: wall time of compiling it (zero when an earlier call with
        the same shapes and options had compiled it).
    - `record`: with `generate(..., record=True)`, every round's token count `n`
        (`[batch, max_new_tokens]`, zero past the row's last round) and its drafts
        (`[batch, max_new_tokens, num_depths]`, for positions `n … n + D - 1`);
        else `None`.
    """

    tokens: Int[Array, "batch new"]
    rounds: Int[Array, " batch"]
    accepted: Int[Array, "batch depths"]
    seconds: float = eqx.field(static=True)
    compile_seconds: float = eqx.field(static=True)
    record: dict | None = None

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per trunk pass of a row, the prompt's pass included (it gives
        the first new token), over the batch: `1.0` for plain decoding. (The batch's
        wall time follows its slowest row.)"""
        passes = int(jnp.sum(self.rounds)) + self.rounds.shape[0]
        return float(self.tokens.size / passes)

    @property
    def acceptance(self) -> list[float]:
        """Per depth `k`: the share of rounds whose drafts `1 … k` were all kept."""
        rounds = max(int(jnp.sum(self.rounds)), 1)
        return [float(x) / rounds for x in np.asarray(jnp.sum(self.accepted, axis=0))]

    @property
    def tokens_per_second(self) -> float:
        """New tokens of the whole batch per second of wall time."""
        return self.tokens.size / self.seconds if self.seconds > 0 else float("inf")


# -- cached blocks ---------------------------------------------------------------------


def _cached_block(
    block: TransformerBlock,
    x: Float[Array, "n dim"],
    positions: Int[Array, " n"],
    cache_k: Float[Array, "cache kv_heads head_dim"],
    cache_v: Float[Array, "cache kv_heads head_dim"],
) -> tuple[Float[Array, "n dim"], Array, Array]:
    """The block on `n` consecutive positions: their keys and values are written into
    the cache first, then every query attends to the cached keys at or before it."""
    attention = block.attention
    q, k, v = attention.project(block.attention_norm(x), positions)
    start = positions[0]
    cache_k = jax.lax.dynamic_update_slice(
        cache_k, k.astype(cache_k.dtype), (start, 0, 0)
    )
    cache_v = jax.lax.dynamic_update_slice(
        cache_v, v.astype(cache_v.dtype), (start, 0, 0)
    )
    key_index = jnp.arange(cache_k.shape[0])
    mask = key_index[None, :] <= positions[:, None]
    out = grouped_attention(q, cache_k, cache_v, mask)
    x = x + dense(attention.o_proj, out.reshape(x.shape[0], -1))
    return x + block.mlp(block.mlp_norm(x)), cache_k, cache_v


def _empty_cache(config, count: int, length: int, dtype) -> tuple[Array, Array]:
    shape = (count, length, config.num_kv_heads, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def trunk_forward_cached(
    trunk: Transformer,
    tokens: Int[Array, " n"],
    start: Int[Array, ""],
    cache: tuple[Array, Array],
) -> tuple[Float[Array, "n dim"], tuple[Array, Array]]:
    """The trunk's hidden states `h⁰` (before the final norm) of `n` tokens at
    positions `start … start + n - 1` of one row, reading and extending its KV cache
    (`[num_layers, cache, kv_heads, head_dim]` keys and values)."""
    positions = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
    dynamic, static = eqx.partition(trunk.blocks, eqx.is_array)

    def body(h, xs):
        params, cache_k, cache_v = xs
        h, cache_k, cache_v = _cached_block(
            eqx.combine(params, static), h, positions, cache_k, cache_v
        )
        return h, (cache_k, cache_v)

    hidden, cache = jax.lax.scan(body, trunk.embedding[tokens], (dynamic, *cache))
    return hidden, cache


def _check_decodable_layer(layer: Any) -> bool:
    """Whether a depth layer attends (and so needs a cache); a clear error for layers
    decoding does not know."""
    if isinstance(layer, TransformerBlock):
        return True
    if isinstance(layer, (MLPBlock, LinearBlock)):
        return False
    raise ValueError(
        "generate: the MTP depths' layer must be a TransformerBlock, MLPBlock or "
        f"LinearBlock to draft with; got {type(layer).__name__} (pass "
        "speculative=False to decode with the trunk alone)"
    )


# -- sampling --------------------------------------------------------------------------


def _probabilities(logits: Array, temperature: float, top_k: int | None) -> Array:
    """The sampling distribution of float32 `logits [..., vocab]` (with `top_k`,
    every token tied with the `k`-th largest logit stays in)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.nn.softmax(logits, axis=-1)


def _pick(logits: Array, key: Array, temperature: float, top_k: int | None):
    """`(token, probabilities)`: the argmax when `temperature == 0`, else a sample."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    probabilities = _probabilities(logits, temperature, top_k)
    token = jax.random.categorical(key, jnp.log(probabilities), axis=-1)
    return token.astype(jnp.int32), probabilities


# -- drafting --------------------------------------------------------------------------


def _draft(
    model: MTPModel,
    h0: Float[Array, "length dim"],
    seq: Int[Array, " length"],
    window_start: Int[Array, ""],
    window: int,
    query: Int[Array, ""],
    cache: tuple[Array, Array] | None,
    key: Array,
    temperature: float,
    top_k: int | None,
):
    """Run every depth over `window` positions from `window_start` and draft at
    position `query`: `(drafts [D], draft probabilities [D, vocab] or None, cache)`.

    Depth `k` reads `seq[j + k]` at position `j` (sequential); its draft, for position
    `query + k + 1`, is written into the token row it hands the next depth.
    """
    depths: MTPDepths = model.depths
    trunk = model.trunk
    positions = window_start + jnp.arange(window, dtype=jnp.int32)
    source = jax.lax.dynamic_slice_in_dim(h0, window_start, window)
    dynamic, static = eqx.partition(depths.depths, eqx.is_array)
    sequential = depths.kind == "sequential"
    length = seq.shape[0]
    depth_keys = jax.random.split(key, depths.num_depths)
    cache_k, cache_v = cache if cache is not None else (None, None)

    def body(carry, xs):
        previous, seq = carry
        params, k, depth_key, layer_k, layer_v = xs
        depth = eqx.combine(params, static)
        layer = depths.shared_layer if depth.layer is None else depth.layer
        if sequential:
            ahead = seq[jnp.minimum(positions + k, length - 1)]
            x = depth.layer_input(previous, trunk.embedding[ahead])
        else:
            x = source
        if layer_k is None:
            h_k = layer(x, positions=positions, segment_ids=jnp.ones_like(positions))
        else:
            h_k, layer_k, layer_v = _cached_block(layer, x, positions, layer_k, layer_v)
        norm = trunk.final_norm if depth.norm is None else depth.norm
        hidden = jax.lax.dynamic_index_in_dim(h_k, query - window_start, keepdims=False)
        logits = jnp.matmul(
            norm(hidden),
            trunk.unembedding_matrix.T,
            preferred_element_type=jnp.float32,
        )
        token, probabilities = _pick(logits, depth_key, temperature, top_k)
        seq = seq.at[jnp.minimum(query + k + 1, length - 1)].set(token)
        return (h_k, seq), (token, probabilities, layer_k, layer_v)

    numbers = jnp.arange(1, depths.num_depths + 1, dtype=jnp.int32)
    (_, _), (drafts, probabilities, cache_k, cache_v) = jax.lax.scan(
        body, (source, seq), (dynamic, numbers, depth_keys, cache_k, cache_v)
    )
    return drafts, probabilities, None if cache_k is None else (cache_k, cache_v)


# -- the loop --------------------------------------------------------------------------


def _accept(
    drafts: Int[Array, " d"],
    draft_probabilities: Array | None,
    logits: Float[Array, "d1 vocab"],
    key: Array,
    temperature: float,
    top_k: int | None,
):
    """`(kept, next_token)`: how many leading drafts the trunk keeps, and its own token
    after them."""
    num_drafts = drafts.shape[0]
    choose_key, accept_key = jax.random.split(key)
    if temperature == 0:
        choices = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        agree = drafts == choices[:num_drafts]
        kept = jnp.sum(jnp.cumprod(agree.astype(jnp.int32)))
        return kept, choices[kept]
    p = _probabilities(logits, temperature, top_k)
    if num_drafts == 0:
        return jnp.int32(0), _pick(logits[0], choose_key, temperature, top_k)[0]
    q = draft_probabilities
    index = jnp.arange(num_drafts)
    p_draft = p[index, drafts]
    q_draft = q[index, drafts]
    uniform = jax.random.uniform(accept_key, (num_drafts,))
    agree = uniform * q_draft < p_draft
    kept = jnp.sum(jnp.cumprod(agree.astype(jnp.int32)))
    q_next = jnp.concatenate([q, jnp.zeros_like(q[:1])])[kept]
    residual = jnp.maximum(p[kept] - q_next, 0.0)
    total = jnp.sum(residual)
    # p == q on every token leaves no residual, but then no draft is ever rejected.
    residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1), p[kept])
    token = jax.random.categorical(choose_key, jnp.log(residual))
    return kept, token.astype(jnp.int32)


def _generate_rows(
    model: MTPModel,
    prompts: Int[Array, "batch prompt"],
    lengths: Int[Array, " batch"],
    keys: Array,
    *,
    max_new_tokens: int,
    num_drafts: int,
    temperature: float,
    top_k: int | None,
    override: tuple[Array, Array] | None = None,
    record: bool = False,
):
    """The compiled loop over a batch of rows (see the module docstring).

    `override`: `([batch, L] tokens, [batch, L] use)`: a draft for position `i` is
    replaced by `tokens[i]` where `use[i]` (greedy only; for tests). `record`: also
    return every round's `n` and the depths' drafts (before any override)."""
    config = model.config
    trunk = model.trunk
    batch, prompt_len = prompts.shape
    dtype = trunk.embedding.dtype
    depth_cache = num_drafts > 0 and _check_decodable_layer(
        model.depths.shared_layer
        if model.depths.shared_layer is not None
        else model.depths.depths.layer
    )
    # A layer without attention reads its own position only: no window to redo.
    window = 2 * num_drafts if depth_cache else 1
    size = max(prompt_len + max_new_tokens + 2 * num_drafts + 2, window)

    def prefill(prompt, length, key):
        seq = jnp.zeros((size,), jnp.int32).at[:prompt_len].set(prompt)
        cache = _empty_cache(config, config.num_layers, size, dtype)
        hidden, cache = trunk_forward_cached(trunk, prompt, jnp.int32(0), cache)
        h0 = jnp.zeros((size, config.dim), hidden.dtype).at[:prompt_len].set(hidden)
        key, pick_key, draft_key = jax.random.split(key, 3)
        last = jax.lax.dynamic_index_in_dim(hidden, length - 1, keepdims=False)
        first, _ = _pick(trunk.logits(last), pick_key, temperature, top_k)
        seq = seq.at[length].set(first)
        depths = None
        if depth_cache:
            depths = _empty_cache(config, config.num_depths, size, dtype)
            # The depths' states over the whole prompt; the last positions' are
            # provisional and rewritten by the first rounds' windows.
            _, _, depths = _draft(
                model,
                h0,
                seq,
                jnp.int32(0),
                prompt_len,
                length - 1,
                depths,
                draft_key,
                temperature,
                top_k,
            )
        return dict(
            seq=seq,
            n=length + 1,
            cache=cache,
            depth_cache=depths,
            h0=h0,
            key=key,
            rounds=jnp.int32(0),
            accepted=jnp.zeros((max(num_drafts, 1),), jnp.int32),
            log_n=jnp.zeros((max_new_tokens,), jnp.int32),
            log_drafts=jnp.zeros((max_new_tokens, num_drafts), jnp.int32),
        )

    def round_(state, length, row_override):
        n, seq = state["n"], state["seq"]
        key, draft_key, accept_key = jax.random.split(state["key"], 3)
        depths = state["depth_cache"]
        if num_drafts:
            window_start = jnp.maximum(n - 1 - window, 0)
            drafts, q, depths = _draft(
                model,
                state["h0"],
                seq,
                window_start,
                window,
                n - 2,
                depths,
                draft_key,
                temperature,
                top_k,
            )
            drafted = drafts
            if row_override is not None:
                tokens, use = row_override
                at = n + jnp.arange(num_drafts)
                drafts = jnp.where(use[at], tokens[at], drafts)
        else:
            drafts, q = jnp.zeros((0,), jnp.int32), None
            drafted = drafts
        pending = jax.lax.dynamic_index_in_dim(seq, n - 1, keepdims=True)
        verify = jnp.concatenate([pending, drafts])
        hidden, cache = trunk_forward_cached(trunk, verify, n - 1, state["cache"])
        h0 = jax.lax.dynamic_update_slice_in_dim(state["h0"], hidden, n - 1, axis=0)
        kept, token = _accept(
            drafts, q, trunk.logits(hidden), accept_key, temperature, top_k
        )
        new_seq = jax.lax.dynamic_update_slice(seq, drafts, (n,))
        new_seq = new_seq.at[n + kept].set(token)
        done = n - length >= max_new_tokens
        accepted = state["accepted"]
        if num_drafts:
            accepted = accepted + (jnp.arange(1, num_drafts + 1) <= kept).astype(
                jnp.int32
            )
        log_n, log_drafts = state["log_n"], state["log_drafts"]
        if record:
            at = jnp.minimum(state["rounds"], max_new_tokens - 1)
            log_n = jnp.where(done, log_n, log_n.at[at].set(n))
            log_drafts = jnp.where(done, log_drafts, log_drafts.at[at].set(drafted))
        return dict(
            seq=jnp.where(done, seq, new_seq),
            n=jnp.where(done, n, n + kept + 1),
            cache=cache,
            depth_cache=depths,
            h0=h0,
            key=key,
            rounds=state["rounds"] + jnp.where(done, 0, 1),
            accepted=jnp.where(done, state["accepted"], accepted),
            log_n=log_n,
            log_drafts=log_drafts,
        )

    state = jax.vmap(prefill)(prompts, lengths, keys)

    def unfinished(state):
        return jnp.any(state["n"] - lengths < max_new_tokens)

    def step(state):
        if override is None:
            return jax.vmap(lambda s, length: round_(s, length, None))(state, lengths)
        return jax.vmap(round_)(state, lengths, override)

    state = jax.lax.while_loop(unfinished, step, state)
    new_tokens = jax.vmap(
        lambda seq, length: jax.lax.dynamic_slice_in_dim(seq, length, max_new_tokens)
    )(state["seq"], lengths)
    accepted = state["accepted"][:, :num_drafts]
    if record:
        return (
            new_tokens,
            state["rounds"],
            accepted,
            state["log_n"],
            state["log_drafts"],
        )
    return new_tokens, state["rounds"], accepted


_generate_jit = eqx.filter_jit(_generate_rows)
_COMPILED: dict = {}
_COMPILED_KEPT = 8


def _leaf_signature(leaf) -> Any:
    if eqx.is_array(leaf):
        return leaf.shape, str(leaf.dtype)
    try:
        hash(leaf)
    except TypeError:
        return id(leaf)
    return leaf


def _compiled(arguments: tuple, options: dict):
    """`_generate_jit` compiled ahead of time for these shapes and options (kept for
    the next call with the same), so that `generate` times compilation apart."""
    leaves, structure = jax.tree_util.tree_flatten(arguments)
    signature = (
        structure,
        tuple(_leaf_signature(x) for x in leaves),
        tuple(sorted(options.items())),
    )
    if signature not in _COMPILED:
        if len(_COMPILED) >= _COMPILED_KEPT:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[signature] = _generate_jit.lower(*arguments, **options).compile()
    return _COMPILED[signature]


def _is_integer(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _as_prompts(prompt_tokens, prompt_lengths) -> tuple[np.ndarray, np.ndarray]:
    """A `[batch, prompt]` int32 array and `[batch]` lengths from an array or from a
    list of token lists of different lengths."""
    if isinstance(prompt_tokens, Sequence) and not isinstance(prompt_tokens, str):
        rows = [np.asarray(row) for row in prompt_tokens]
        if any(row.ndim != 1 for row in rows) or not rows:
            raise ValueError(
                "generate: prompt_tokens must be a [batch, prompt] array or a "
                "non-empty list of 1-D token lists"
            )
        if prompt_lengths is not None:
            raise ValueError(
                "generate: prompt_lengths is taken from the lists; pass it only with "
                "an array"
            )
        for row in rows:
            if row.size and not np.issubdtype(row.dtype, np.integer):
                raise ValueError(
                    "generate: prompt_tokens must be integer token ids, got "
                    f"{row.dtype}"
                )
        lengths = np.array([row.shape[0] for row in rows], np.int64)
        width = int(lengths.max())
        prompts = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            prompts[i, : row.shape[0]] = row
    else:
        prompts = np.asarray(prompt_tokens)
        if prompts.ndim != 2:
            raise ValueError(
                "generate: prompt_tokens must be a [batch, prompt] array, got shape "
                f"{prompts.shape}"
            )
        lengths = (
            np.full((prompts.shape[0],), prompts.shape[1], np.int64)
            if prompt_lengths is None
            else np.asarray(prompt_lengths)
        )
        if lengths.shape != (prompts.shape[0],) or not np.issubdtype(
            lengths.dtype, np.integer
        ):
            raise ValueError(
                f"generate: prompt_lengths must be ({prompts.shape[0]},) integers, got "
                f"shape {lengths.shape} of {lengths.dtype}"
            )
    if not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(
            f"generate: prompt_tokens must be integer token ids, got {prompts.dtype}"
        )
    return prompts, lengths


def generate(
    model: MTPModel,
    prompt_tokens: Any,
    *,
    max_new_tokens: int,
    prompt_lengths: Any = None,
    speculative: bool = True,
    temperature: float | int = 0.0,
    top_k: int | None = None,
    key: PRNGKeyArray | None = None,
    record: bool = False,
) -> Generation:
    """Generate `max_new_tokens` tokens after each prompt, with a KV cache, and with
    the model's MTP depths drafting when `speculative`.

    Greedy output (`temperature=0`) is the trunk's greedy output, speculative or not;
    sampled output follows the trunk's distribution (softmax of logits / temperature,
    restricted to the `top_k` most likely tokens) exactly, speculative or not.

    **Arguments:**

    - `model`: an [`eqx_mtp.MTPModel`][] (e.g. from
        [`eqx_mtp.train.load_checkpoint`][]).
    - `prompt_tokens`: `[batch, prompt]` token ids, left-aligned, or a list of token
        lists of different lengths. Each prompt is one document.
    - `max_new_tokens`: tokens to generate per prompt, `>= 1`; with the longest
        prompt at most `model.config.max_seq_len`.
    - `prompt_lengths`: `[batch]` lengths of the prompts in an array (default: all of
        its columns), each `>= 1`.
    - `speculative`: draft with the depths (a model without depths decodes plainly).
    - `temperature`: `0` for greedy decoding, `> 0` to sample.
    - `top_k`: sample among the `top_k` most likely tokens only.
    - `key`: PRNG key, required when sampling.
    - `record`: also return every round's drafts (see [`eqx_mtp.Generation`][]).

    **Returns:**

    A [`eqx_mtp.Generation`][]: the tokens and the decoding statistics.
    """
    if not isinstance(model, MTPModel):
        raise TypeError(
            f"generate: model must be an eqx_mtp.MTPModel, got {type(model)}"
        )
    config = model.config
    prompts, lengths = _as_prompts(prompt_tokens, prompt_lengths)
    if not _is_integer(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(
            "generate: max_new_tokens must be a positive integer, got "
            f"{max_new_tokens!r}"
        )
    if prompts.shape[0] == 0 or prompts.shape[1] == 0 or np.any(lengths < 1):
        raise ValueError("generate: every prompt must hold at least one token")
    if np.any(lengths > prompts.shape[1]):
        raise ValueError(
            f"generate: prompt_lengths must be at most the prompt width "
            f"{prompts.shape[1]}, got {lengths.max()}"
        )
    read = np.arange(prompts.shape[1])[None, :] < lengths[:, None]
    if np.any(((prompts < 0) | (prompts >= config.vocab_size)) & read):
        raise ValueError(
            f"generate: prompt_tokens must lie in [0, {config.vocab_size}), the "
            "model's vocabulary"
        )
    longest = int(lengths.max()) + max_new_tokens
    if longest > config.max_seq_len:
        raise ValueError(
            f"generate: the longest prompt ({int(lengths.max())} tokens) plus "
            f"max_new_tokens ({max_new_tokens}) is {longest}, beyond the model's "
            f"max_seq_len {config.max_seq_len}"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.floating, np.integer))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(
            f"generate: temperature must be a finite number >= 0, got {temperature!r}"
        )
    if top_k is not None and (not _is_integer(top_k) or top_k < 1):
        raise ValueError(f"generate: top_k must be a positive integer, got {top_k!r}")
    if temperature > 0 and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs a key")
    num_drafts = config.num_depths if speculative and model.depths is not None else 0
    if num_drafts:
        depths = model.depths
        _check_decodable_layer(
            depths.shared_layer
            if depths.shared_layer is not None
            else depths.depths.layer
        )
    keys = jax.random.split(
        key if key is not None else jax.random.key(0), prompts.shape[0]
    )
    arguments = (
        model,
        jnp.asarray(prompts, jnp.int32),
        jnp.asarray(lengths, jnp.int32),
        keys,
    )
    options = dict(
        max_new_tokens=int(max_new_tokens),
        num_drafts=num_drafts,
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
        record=record,
    )
    start = time.perf_counter()
    compiled = _compiled(arguments, options)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    outputs = compiled(*arguments, **options)
    tokens, rounds, accepted = jax.block_until_ready(outputs[:3])
    seconds = time.perf_counter() - start
    log = dict(n=outputs[3], drafts=outputs[4]) if record else None
    return Generation(
        tokens=tokens,
        rounds=rounds,
        accepted=accepted,
        seconds=seconds,
        compile_seconds=compile_seconds,
        record=log,
    )
