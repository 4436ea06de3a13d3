"""Cross-entropy of an output head applied to hidden states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._checks import check_choice, check_chunk_size, check_head_inputs
from ._config import LOSS_IMPLS
from ._fused_ce import (
    DEFAULT_CHUNK_SIZE,
    loss_sum_unchecked,
    token_losses_unchecked,
    weighted_loss_sum_unchecked,
)


def naive_loss_sum(
    hidden: Float[Array, "tokens dim"],
    unembedding: Float[Array, "vocab dim"],
    targets: Int[Array, " tokens"],
    where: Bool[Array, " tokens"],
) -> Float[Array, ""]:
    """The masked loss sum from the full `[tokens, vocab]` float32 logits."""
    logits = jnp.matmul(hidden, unembedding.T, preferred_element_type=jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(where, log_normalizer - target_logits, 0.0))


def head_loss_sum(
    hidden: Float[Array, "tokens dim"],
    unembedding: Float[Array, "vocab dim"],
    targets: Int[Array, " tokens"],
    where: Bool[Array, " tokens"],
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    # Plain `str` so a wrong choice reaches the check below, which lists the choices.
    impl: str = "fused",
) -> tuple[Float[Array, ""], Int[Array, ""]]:
    """Masked sum of `-log softmax(hidden @ unembedding.T)[target]` and the number of
    counted tokens. The logits are in float32 and never all alive at once; masked tokens
    add exactly zero to the sum and to its gradient.

    A flat primitive: it takes `[tokens, …]` arrays, where the functions on a trunk's
    output ([`eqx_mtp.mtp_loss_sums_from_hidden`][], [`eqx_mtp.mtp_depth_losses`][])
    take `[batch, seq, …]`; flatten rows with `hidden.reshape(-1, dim)`.

    **Arguments:**

    - `hidden`: `[tokens, dim]` hidden states (after the final norm).
    - `unembedding`: `[vocab, dim]` output matrix.
    - `targets`: `[tokens]` target ids in `[0, vocab)`.
    - `where`: boolean `[tokens]`, which tokens count.
    - `chunk_size`: tokens per chunk of logits (`None`: one chunk).
    - `impl`: `"fused"` (the default) accumulates both matmul gradients in the forward
        pass and scales them by the cotangent in the backward: three matmuls, with
        gradient-sized residuals (`[tokens, dim]` and `[vocab, dim]`; in
        [`eqx_mtp.mtp_loss`][] and [`eqx_mtp.train.train_step`][] one `[vocab, dim]` for
        the main head and all depths together). `"chunked"` sums
        [`eqx_mtp.fused_cross_entropy`][]: four matmuls (the backward recomputes the
        logits), one float per token of residuals. `"naive"` materialises the full
        logits (a reference and a benchmark baseline).

    **Returns:**

    `(loss_sum, token_count)`: a float32 and an int32 scalar.
    """
    fn = "head_loss_sum"
    check_head_inputs(fn, hidden, unembedding, targets, where, layout="tokens")
    check_chunk_size(fn, "chunk_size", chunk_size)
    check_choice(fn, "impl", impl, LOSS_IMPLS)
    return head_loss_sum_unchecked(
        hidden, unembedding, targets, where, chunk_size=chunk_size, impl=impl
    )


def head_loss_sum_unchecked(hidden, unembedding, targets, where, *, chunk_size, impl):
    """`head_loss_sum` without its input checks, for callers that checked them."""
    if impl == "fused":
        total = loss_sum_unchecked(
            hidden, unembedding, targets, where, chunk_size=chunk_size
        )
    elif impl == "chunked":
        total = jnp.sum(
            token_losses_unchecked(
                hidden,
                unembedding,
                targets,
                where=where,
                chunk_size=chunk_size,
                vocab_chunk_size=None,
            )
        )
    else:
        total = naive_loss_sum(hidden, unembedding, targets, where)
    return total, jnp.sum(where, dtype=jnp.int32)


def rows_weighted_loss_sum(hidden, unembedding, targets, where, weight, *, chunk_size):
    """The fused head loss of `[batch, seq]` rows on one device, with its unembedding
    gradient times `weight` returned as a value (`weighted_loss_sum_unchecked`):
    `(loss_sum, token_count, unembedding_grad)`; the sum is differentiable w.r.t.
    `hidden` only."""
    total, unembedding_grad = weighted_loss_sum_unchecked(
        hidden.reshape(-1, hidden.shape[-1]),
        unembedding,
        targets.reshape(-1),
        where.reshape(-1),
        weight,
        chunk_size=chunk_size,
    )
    return total, jnp.sum(where, dtype=jnp.int32), unembedding_grad
