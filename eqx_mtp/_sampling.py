"""Choosing tokens from logits, and the speculative acceptance rule that keeps a
sampled output distributed as the trunk's (Leviathan et al. 2023; Chen et al.
2023)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def probabilities(logits: Array, temperature: float, top_k: int | None) -> Array:
    """The sampling distribution of float32 `logits [..., vocab]` (with `top_k`,
    every token tied with the `k`-th largest logit stays in)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.nn.softmax(logits, axis=-1)


def pick(logits: Array, key: Array, temperature: float, top_k: int | None):
    """`(token, probabilities)`: the argmax when `temperature == 0` (probabilities
    `None`), else a sample and the distribution it was drawn from."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    p = probabilities(logits, temperature, top_k)
    token = jax.random.categorical(key, jnp.log(p), axis=-1)
    return token.astype(jnp.int32), p


def accept(
    drafts: Int[Array, " d"],
    draft_probabilities: Array | None,
    logits: Float[Array, "d1 vocab"],
    key: Array,
    temperature: float,
    top_k: int | None,
) -> tuple[Int[Array, ""], Int[Array, ""]]:
    """`(kept, next_token)`: how many leading drafts the trunk keeps, given its
    `logits` at the pending token and at each draft, and its own token after them.

    Greedy: a draft is kept while it is the trunk's argmax, and the next token is
    the argmax after the kept ones. Sampling: draft `d_k` is kept with probability
    `min(1, p_{k-1}(d_k) / q_k(d_k))`; after a rejection the next token is drawn
    from the normalised `(p - q)⁺`, after a fully kept round from `p_D`."""
    num_drafts = drafts.shape[0]
    choose_key, accept_key = jax.random.split(key)
    if temperature == 0:
        choices = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        agree = drafts == choices[:num_drafts]
        kept = jnp.sum(jnp.cumprod(agree.astype(jnp.int32)))
        return kept, choices[kept]
    if num_drafts == 0:
        return jnp.int32(0), pick(logits[0], choose_key, temperature, top_k)[0]
    p = probabilities(logits, temperature, top_k)
    q = draft_probabilities
    index = jnp.arange(num_drafts)
    uniform = jax.random.uniform(accept_key, (num_drafts,))
    agree = uniform * q[index, drafts] < p[index, drafts]
    kept = jnp.sum(jnp.cumprod(agree.astype(jnp.int32)))
    q_next = jnp.concatenate([q, jnp.zeros_like(q[:1])])[kept]
    residual = jnp.maximum(p[kept] - q_next, 0.0)
    total = jnp.sum(residual)
    # p == q on every token leaves no residual, but then no draft is ever rejected.
    residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1), p[kept])
    token = jax.random.categorical(choose_key, jnp.log(residual))
    return kept, token.astype(jnp.int32)
