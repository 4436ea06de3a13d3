"""One row's decoding, round by round: a prefill, then rounds in which the MTP depths
draft the next tokens and one cached trunk pass verifies them.

**A round.** The row holds `n` tokens: the prompt and the tokens generated so far,
the last of which is *pending* (the trunk has not read it yet), and the trunk's KV
cache and hidden states `h⁰` for positions `≤ n - 2`.

1. *Draft* (speculative only): the depths run at position `n - 2` exactly as in
   training (the same [`eqx_mtp.MTPDepth`][] call): depth `k` reads depth `k-1`'s
   state (sequential; the trunk's, parallel) and the embedding of the token `k`
   places ahead, the pending token for depth 1 and the previous depth's draft after
   that. Draft `d_k` proposes the token at `n - 1 + k`. A depth whose layer attends
   keeps a KV cache of its own: each round recomputes a window of its last `2D`
   positions, so positions whose tokens were drafts last round are rewritten with
   the accepted (or corrected) tokens.
2. *Verify*: one cached trunk pass over `[pending, d_1 … d_D]` gives the trunk's
   distribution `p_0 … p_D` at positions `n … n + D`.
3. *Accept* the longest prefix of drafts the trunk agrees with, then add one token
   of the trunk's own (see `accept`), the new pending one. Cache entries past the
   kept tokens are overwritten by later rounds before any query reads them (a query
   at position `i` reads keys `≤ i` only).

Plain decoding is the same round with no drafts.

**Stop tokens.** A row whose last committed token is a stop token is finished. A
round commits its kept drafts and the trunk's token only up to and including the
first stop token among them: a stop the trunk accepts as a draft ends the row there,
and what the trunk would have kept after it is not committed.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._depths import LinearBlock, MLPBlock
from ._kv_cache import KVCache
from ._model import MTPModel
from ._sampling import accept, pick
from ._transformer import TransformerBlock


class DecodeState(eqx.Module):
    """Where the decoding of one row stands after a round.

    - `tokens`: `[length]` the prompt, the tokens generated so far, then scratch.
    - `count`: how many tokens of `tokens` are committed; the last is pending (or,
        in a row that ended at one, the stop token).
    - `prompt_length`: how many of them are the prompt's.
    - `cache`: the trunk's [`eqx_mtp.nn.KVCache`][], written for positions
        `≤ count - 2`.
    - `depth_cache`: the depths' cache (one layer per depth) when their layer
        attends, else `None`.
    - `hidden`: `[length, dim]` the trunk's `h⁰` of positions `≤ count - 2`.
    - `key`: the PRNG key of the next round.
    - `rounds`: rounds run after the prefill.
    - `accepted`: `[num_drafts]` (at least one entry): in how many rounds the
        drafts of depths `1 … k` were all kept.
    """

    tokens: Int[Array, " length"]
    count: Int[Array, ""]
    prompt_length: Int[Array, ""]
    cache: KVCache
    depth_cache: KVCache | None
    hidden: Float[Array, "length dim"]
    key: PRNGKeyArray
    rounds: Int[Array, ""]
    accepted: Int[Array, " depths"]


class Drafts(eqx.Module):
    """What the depths propose in a round: `tokens` (`[num_drafts]`, for positions
    `count … count + num_drafts - 1`) and, when sampling, the distributions they
    were drawn from (`[num_drafts, vocab]`, else `None`)."""

    tokens: Int[Array, " drafts"]
    probabilities: Float[Array, "drafts vocab"] | None


def layer_attends(layer: Any) -> bool:
    """Whether a depth layer attends (and so keeps a cache when decoding); a clear
    error for layers decoding does not know."""
    if isinstance(layer, TransformerBlock):
        return True
    if isinstance(layer, (MLPBlock, LinearBlock)):
        return False
    raise ValueError(
        "generate: the MTP depths' layer must be a TransformerBlock, MLPBlock or "
        f"LinearBlock to draft with; got {type(layer).__name__} (pass "
        "speculative=False to decode with the trunk alone)"
    )


def depth_layer(model: MTPModel) -> Any:
    """The layer the model's depths run (the shared one, or the stacked ones)."""
    depths = model.depths
    shared = depths.shared_layer
    return depths.depths.layer if shared is None else shared


class Decoder(eqx.Module):
    """Decoding of one row with a model: [`eqx_mtp.generate`][] runs `prefill`,
    then `round` until `finished`, over every row of a batch. The pieces are public
    so that a round can be driven step by step, e.g. with drafts of one's own.

    **Arguments:**

    - `model`: the [`eqx_mtp.MTPModel`][].
    - `max_new_tokens`: tokens to generate after the prompt.
    - `num_drafts`: drafts per round (`0`: plain decoding, else the model's
        `num_depths`).
    - `length`: positions the caches hold: the prompt's width, `max_new_tokens`,
        and room for a last round's drafts (see `cache_length`).
    - `temperature`, `top_k`: greedy decoding at `temperature == 0`, else sampling
        (see [`eqx_mtp.generate`][]).
    - `stop_tokens`: `[stops]` int32 token ids that end a row (negative entries are
        padding and match nothing), or `None`: a row runs to `max_new_tokens`.
    """

    model: MTPModel
    max_new_tokens: int = eqx.field(static=True)
    num_drafts: int = eqx.field(static=True)
    length: int = eqx.field(static=True)
    temperature: float = eqx.field(static=True)
    top_k: int | None = eqx.field(static=True)
    stop_tokens: Int[Array, " stops"] | None = None

    @staticmethod
    def cache_length(prompt_width: int, max_new_tokens: int, num_drafts: int) -> int:
        """Positions a row needs: prompt, new tokens, and a last round's drafts and
        depth window past them."""
        return prompt_width + max_new_tokens + 2 * num_drafts + 2

    @property
    def _depths_attend(self) -> bool:
        return self.num_drafts > 0 and layer_attends(depth_layer(self.model))

    def _empty_cache(self, layers: int) -> KVCache:
        config = self.model.config
        return KVCache.empty(
            layers=layers,
            length=self.length,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            dtype=self.model.trunk.embedding.dtype,
        )

    def prefill(
        self,
        prompt: Int[Array, " width"],
        prompt_length: Int[Array, ""],
        key: PRNGKeyArray,
    ) -> DecodeState:
        """The trunk over the prompt (its first `prompt_length` tokens are read), its
        first new token, and the depths' caches over the prompt."""
        trunk, width = self.model.trunk, prompt.shape[0]
        positions = jnp.arange(width, dtype=jnp.int32)
        hidden, cache = trunk(
            prompt, positions=positions, segment_ids=None, cache=self._empty_cache(
                self.model.config.num_layers
            )
        )  # fmt: skip
        h0 = jnp.zeros((self.length, hidden.shape[-1]), hidden.dtype)
        h0 = h0.at[:width].set(hidden)
        key, pick_key, draft_key = jax.random.split(key, 3)
        last = jax.lax.dynamic_index_in_dim(hidden, prompt_length - 1, keepdims=False)
        first, _ = pick(trunk.logits(last), pick_key, self.temperature, self.top_k)
        tokens = jnp.zeros((self.length,), jnp.int32).at[:width].set(prompt)
        tokens = tokens.at[prompt_length].set(first)
        depth_cache = None
        if self._depths_attend:
            # The depths' states over the whole prompt; the last positions' are
            # provisional and rewritten by the first rounds' windows.
            _, depth_cache = self._run_depths(
                hidden,
                tokens,
                positions,
                prompt_length - 1,
                self._empty_cache(self.num_drafts),
                draft_key,
            )
        return DecodeState(
            tokens=tokens,
            count=prompt_length + 1,
            prompt_length=prompt_length,
            cache=cache,
            depth_cache=depth_cache,
            hidden=h0,
            key=key,
            rounds=jnp.int32(0),
            accepted=jnp.zeros((max(self.num_drafts, 1),), jnp.int32),
        )

    def _run_depths(
        self,
        source: Float[Array, "window dim"],
        tokens: Int[Array, " length"],
        positions: Int[Array, " window"],
        query: Int[Array, ""],
        cache: KVCache | None,
        key: PRNGKeyArray,
    ) -> tuple[Drafts, KVCache | None]:
        """Every depth over the consecutive `positions`, whose trunk states `h⁰` are
        `source`, drafting at position `query` (one of them): depth `k` reads
        `tokens[j + k]` at position `j` (sequential); its draft, for position
        `query + k + 1`, is written into the tokens it hands the next depth."""
        model = self.model
        depths, trunk = model.depths, model.trunk
        start = positions[0]
        dynamic, static = eqx.partition(depths.depths, eqx.is_array)
        sequential = depths.kind == "sequential"
        last = tokens.shape[0] - 1

        if depths.trunk_input == "after_norm":
            source = trunk.final_norm(source)

        def body(carry, xs):
            previous, tokens, cache = carry
            params, k, depth_key = xs
            depth = eqx.combine(params, static)
            ahead = tokens[jnp.minimum(positions + k, last)]
            hidden = previous if sequential else source
            embeddings = trunk.embedding[ahead] if sequential else None
            arguments = dict(
                positions=positions, segment_ids=None, layer=depths.shared_layer
            )
            if cache is None:
                h_k = depth(hidden, embeddings, **arguments)
            else:
                h_k, cache = depth(
                    hidden, embeddings, cache=cache.at_layer(k - 1), **arguments
                )
            norm = trunk.final_norm if depth.norm is None else depth.norm
            at_query = jax.lax.dynamic_index_in_dim(h_k, query - start, keepdims=False)
            logits = jnp.matmul(
                norm(at_query),
                trunk.unembedding_matrix.T,
                preferred_element_type=jnp.float32,
            )
            token, probabilities = pick(logits, depth_key, self.temperature, self.top_k)
            tokens = tokens.at[jnp.minimum(query + k + 1, last)].set(token)
            passed_on = norm(h_k) if depths.previous_input == "after_norm" else h_k
            return (passed_on, tokens, cache), (token, probabilities)

        numbers = jnp.arange(1, depths.num_depths + 1, dtype=jnp.int32)
        keys = jax.random.split(key, depths.num_depths)
        # Unrolled, as the trunk's cached scan is: a depth cache is updated in place.
        (_, _, cache), (drafts, probabilities) = jax.lax.scan(
            body, (source, tokens, cache), (dynamic, numbers, keys), unroll=True
        )
        if cache is not None:
            cache = cache.at_layer(0)
        return Drafts(drafts, probabilities), cache

    def draft(self, state: DecodeState) -> tuple[Drafts, DecodeState]:
        """The depths' drafts for positions `count … count + num_drafts - 1`, and the
        state with the depths' cache moved on (empty drafts when plain)."""
        if not self.num_drafts:
            return Drafts(jnp.zeros((0,), jnp.int32), None), state
        key, draft_key = jax.random.split(state.key)
        count = state.count
        # A layer without attention reads its own position only: no window to redo.
        window = 2 * self.num_drafts if state.depth_cache is not None else 1
        start = jnp.maximum(count - 1 - window, 0)
        drafts, depth_cache = self._run_depths(
            jax.lax.dynamic_slice_in_dim(state.hidden, start, window),
            state.tokens,
            start + jnp.arange(window, dtype=jnp.int32),
            count - 2,
            state.depth_cache,
            draft_key,
        )
        return drafts, eqx.tree_at(
            lambda s: (s.key, s.depth_cache),
            state,
            (key, depth_cache),
            is_leaf=lambda x: x is None,
        )

    def verify(self, state: DecodeState, drafts: Drafts) -> DecodeState:
        """One cached trunk pass over the pending token and `drafts`: the kept
        prefix of the drafts and the trunk's next token are committed. A row that
        has its `max_new_tokens` already is left as it is."""
        trunk, count = self.model.trunk, state.count
        key, accept_key = jax.random.split(state.key)
        pending = jax.lax.dynamic_index_in_dim(state.tokens, count - 1, keepdims=True)
        read = jnp.concatenate([pending, drafts.tokens])
        positions = count - 1 + jnp.arange(read.shape[0], dtype=jnp.int32)
        hidden, cache = trunk(
            read, positions=positions, segment_ids=None, cache=state.cache
        )
        h0 = jax.lax.dynamic_update_slice_in_dim(state.hidden, hidden, count - 1, 0)
        kept, token = accept(
            drafts.tokens,
            drafts.probabilities,
            trunk.logits(hidden),
            accept_key,
            self.temperature,
            self.top_k,
        )
        tokens = jax.lax.dynamic_update_slice(state.tokens, drafts.tokens, (count,))
        tokens = tokens.at[count + kept].set(token)
        kept, committed = self._cut_at_stop(tokens, count, kept)
        done = self.finished(state)
        accepted = state.accepted
        if self.num_drafts:
            depths = jnp.arange(1, self.num_drafts + 1)
            accepted = accepted + (depths <= kept).astype(jnp.int32)
        return DecodeState(
            tokens=jnp.where(done, state.tokens, tokens),
            count=jnp.where(done, count, count + committed),
            prompt_length=state.prompt_length,
            cache=cache,
            depth_cache=state.depth_cache,
            hidden=h0,
            key=key,
            rounds=state.rounds + jnp.where(done, 0, 1),
            accepted=jnp.where(done, state.accepted, accepted),
        )

    def _is_stop(self, tokens: Int[Array, "*shape"]) -> Bool[Array, "*shape"]:
        return jnp.any(tokens[..., None] == self.stop_tokens, axis=-1)

    def _cut_at_stop(
        self, tokens: Int[Array, " length"], count: Int[Array, ""], kept: Int[Array, ""]
    ) -> tuple[Int[Array, ""], Int[Array, ""]]:
        """`(kept, committed)`: the drafts kept and the tokens committed by a round
        whose candidates (kept drafts, then the trunk's token) fill `tokens` from
        `count`, cut after the first stop token among them."""
        if self.stop_tokens is None:
            return kept, kept + 1
        candidates = jax.lax.dynamic_slice_in_dim(tokens, count, self.num_drafts + 1)
        index = jnp.arange(self.num_drafts + 1)
        stops = self._is_stop(candidates) & (index <= kept)
        committed = jnp.where(jnp.any(stops), jnp.argmax(stops), kept) + 1
        return jnp.minimum(kept, committed), committed

    def round(self, state: DecodeState) -> DecodeState:
        """Draft, then verify."""
        drafts, state = self.draft(state)
        return self.verify(state, drafts)

    def finished(self, state: DecodeState) -> Bool[Array, ""]:
        """Whether the row has its `max_new_tokens`, or ended at a stop token."""
        full = state.count - state.prompt_length >= self.max_new_tokens
        if self.stop_tokens is None:
            return full
        return full | self._is_stop(self._last(state))

    def new_tokens(self, state: DecodeState) -> Int[Array, " new"]:
        """The `max_new_tokens` tokens generated after the prompt; in a row that
        ended at a stop token, that token repeated after it."""
        new = jax.lax.dynamic_slice_in_dim(
            state.tokens, state.prompt_length, self.max_new_tokens
        )
        if self.stop_tokens is None:
            return new
        index = jnp.arange(self.max_new_tokens)
        return jnp.where(index < self.new_length(state), new, self._last(state))

    def new_length(self, state: DecodeState) -> Int[Array, ""]:
        """How many of `new_tokens` the row generated: up to and including its stop
        token, else `max_new_tokens`."""
        return jnp.minimum(state.count - state.prompt_length, self.max_new_tokens)

    def _last(self, state: DecodeState) -> Int[Array, ""]:
        return jax.lax.dynamic_index_in_dim(
            state.tokens, state.count - 1, keepdims=False
        )
