"""Cross-entropy from hidden states and an unembedding matrix, computed in chunks of
tokens so that the `[tokens, vocab]` logits are never materialised.

Two custom VJPs:

- [`eqx_mtp.fused_cross_entropy`][] returns per-token losses. Its forward keeps one
    float per token (the log-normaliser); its backward recomputes one chunk of logits
    at a time: four matmuls in all.
- `fused_loss_sum` returns a masked *sum*. Its logits gradient `softmax - one_hot` is
    known in the forward pass, so both matmul gradients are accumulated there, chunk by
    chunk, and the backward only scales them by the scalar cotangent: three matmuls, no
    recompute, at the price of keeping gradient-sized residuals.

Where the sum's cotangent is known in advance too (`mtp_loss` and `train_step`: the
loss is linear in the per-depth sums once the counts are fixed),
`weighted_loss_sum_unchecked` returns the unembedding gradient as a value instead of
keeping it, so the main head and every depth add into one `[vocab, dim]` accumulator,
and `inject_gradient` hands it to the unembedding in the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._checks import check_chunk_size, check_head_inputs

DEFAULT_CHUNK_SIZE = 256


def _logits(h: Array, w: Array) -> Array:
    """`h @ w.T` in float32: `[chunk, dim] x [vocab, dim] -> [chunk, vocab]`."""
    return jax.lax.dot_general(
        h, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def _target_logits(h: Array, w: Array, targets: Array) -> Array:
    """`(h @ w.T)[i, targets[i]]` as one dot product per token."""
    return jnp.einsum("td,td->t", h, w[targets], preferred_element_type=jnp.float32)


def _grad_hidden(g: Array, w: Array) -> Array:
    """`g @ w`, float32 accumulation: `[chunk, vocab] x [vocab, dim]`."""
    return jnp.matmul(g.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _grad_unembed_transposed(g: Array, h: Array) -> Array:
    """`(g.T @ h).T = h.T @ g`, float32 accumulation: `[dim, chunk] x [chunk, vocab]`.

    `g.T @ h` contracts both operands' first axis, which XLA's CPU backend runs as a
    slow generic dot; so does `h.T @ g` once XLA folds the transpose into the dot.
    Transposing the small `[chunk, dim]` operand for real (the barrier keeps XLA from
    folding it) gives the plain layout its fast matmul kernel takes. In one run on
    this CPU (8 192 tokens, dim 256, V = 32 768, loss + both gradients against the
    full-logits loss): 0.77× as `g.T @ h`, 0.74× as `h.T @ g`, 0.68× this way."""
    h_t = jax.lax.optimization_barrier(h.T)
    return jnp.matmul(h_t, g.astype(h.dtype), preferred_element_type=jnp.float32)


def _grad_unembed(g: Array, h: Array) -> Array:
    """`g.T @ h`, float32 accumulation: `[chunk, vocab] x [chunk, dim]`."""
    return jax.lax.dot_general(
        g.astype(h.dtype),
        h,
        (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def _chunked(x: Array, chunk: int, fill) -> Array:
    """Pad axis 0 of `x` with `fill` to a multiple of `chunk`, then split it into
    `[num_chunks, chunk, ...]`."""
    pad = -x.shape[0] % chunk
    if pad:
        x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    return x.reshape((-1, chunk) + x.shape[1:])


def _unchunked(x: Array, length: int) -> Array:
    return x.reshape((-1,) + x.shape[2:])[:length]


def _common_dtype(hidden: Array, unembed: Array):
    # Both operands of every matmul share a dtype (bfloat16 with float32 is float32);
    # accumulation is float32 regardless.
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(hidden.dtype, unembed.dtype)


# --------------------------------------------------------------------------------------
# Per-token losses: forward keeps the log-normaliser, backward recomputes the logits.
# --------------------------------------------------------------------------------------


def _token_losses_fwd_impl(hidden, unembed, targets, where, chunk, vocab_chunk):
    """Per-token losses and log-normalisers, `[tokens]` each, float32."""
    num_tokens = hidden.shape[0]
    vocab_size = unembed.shape[0]
    dtype = _common_dtype(hidden, unembed)
    hidden = hidden.astype(dtype)
    unembed = unembed.astype(dtype)
    w_chunks = _chunked(unembed, vocab_chunk, 0)
    starts = jnp.arange(w_chunks.shape[0], dtype=jnp.int32) * vocab_chunk
    pads_vocab = vocab_size % vocab_chunk != 0

    def token_body(_, xs):
        h, t, valid = xs

        # Online log-sum-exp over vocabulary chunks (one chunk when not splitting).
        def vocab_body(carry, ys):
            running_max, running_sum = carry
            w, start = ys
            logits = _logits(h, w)
            if pads_vocab:
                columns = start + jnp.arange(vocab_chunk, dtype=jnp.int32)
                logits = jnp.where(columns < vocab_size, logits, -jnp.inf)
            new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
            running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
                jnp.exp(logits - new_max[:, None]), axis=-1
            )
            return (new_max, running_sum), None

        init = (
            jnp.full((h.shape[0],), -jnp.inf, jnp.float32),
            jnp.zeros((h.shape[0],), jnp.float32),
        )
        if w_chunks.shape[0] == 1:
            (row_max, row_sum), _ = vocab_body(init, (w_chunks[0], starts[0]))
        else:
            (row_max, row_sum), _ = jax.lax.scan(vocab_body, init, (w_chunks, starts))
        log_normalizer = row_max + jnp.log(row_sum)
        losses = log_normalizer - _target_logits(h, unembed, t)
        return None, (jnp.where(valid, losses, 0.0), log_normalizer)

    _, (losses, log_normalizers) = jax.lax.scan(
        token_body,
        None,
        (
            _chunked(hidden, chunk, 0),
            _chunked(targets, chunk, 0),
            _chunked(where, chunk, False),
        ),
    )
    return _unchunked(losses, num_tokens), _unchunked(log_normalizers, num_tokens)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _token_losses(hidden, unembed, targets, where, chunk, vocab_chunk):
    losses, _ = _token_losses_fwd_impl(
        hidden, unembed, targets, where, chunk, vocab_chunk
    )
    return losses


def _token_losses_fwd(hidden, unembed, targets, where, chunk, vocab_chunk):
    losses, log_normalizers = _token_losses_fwd_impl(
        hidden, unembed, targets, where, chunk, vocab_chunk
    )
    return losses, (hidden, unembed, targets, where, log_normalizers)


def _token_losses_bwd(chunk, vocab_chunk, residuals, cotangent):
    hidden, unembed, targets, where, log_normalizers = residuals
    num_tokens, dim = hidden.shape
    dtype = _common_dtype(hidden, unembed)
    h_all = hidden.astype(dtype)
    w_chunks = _chunked(unembed.astype(dtype), vocab_chunk, 0)
    starts = jnp.arange(w_chunks.shape[0], dtype=jnp.int32) * vocab_chunk
    # Masked tokens get an exactly zero logits gradient.
    scales = jnp.where(where, cotangent.astype(jnp.float32), 0.0)

    def token_body(grad_w_chunks, xs):
        h, t, scale, log_normalizer = xs

        def vocab_body(grad_h, ys):
            w, grad_w, start = ys
            probs = jnp.exp(_logits(h, w) - log_normalizer[:, None])
            columns = start + jnp.arange(w.shape[0], dtype=jnp.int32)
            # Padded vocabulary rows of `w` are zero: their columns add nothing to
            # `grad_h`, and their rows of `grad_w` are cut off below.
            g = jnp.where(columns == t[:, None], probs - 1.0, probs) * scale[:, None]
            grad_h = grad_h + _grad_hidden(g, w)
            return grad_h, grad_w + _grad_unembed(g, h)

        grad_h, grad_w_chunks = jax.lax.scan(
            vocab_body,
            jnp.zeros(h.shape, jnp.float32),
            (w_chunks, grad_w_chunks, starts),
        )
        return grad_w_chunks, grad_h.astype(hidden.dtype)

    grad_w_chunks, grad_h = jax.lax.scan(
        token_body,
        jnp.zeros(w_chunks.shape, jnp.float32),
        (
            _chunked(h_all, chunk, 0),
            _chunked(targets, chunk, 0),
            _chunked(scales, chunk, 0.0),
            _chunked(log_normalizers, chunk, 0.0),
        ),
    )
    grad_w = _unchunked(grad_w_chunks, unembed.shape[0]).astype(unembed.dtype)
    return _unchunked(grad_h, num_tokens), grad_w, None, None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def fused_cross_entropy(
    hidden: Float[Array, "tokens dim"],
    unembed: Float[Array, "vocab dim"],
    targets: Int[Array, " tokens"],
    *,
    where: Bool[Array, " tokens"] | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = None,
) -> Float[Array, " tokens"]:
    """Per-token cross-entropy `-log softmax(hidden @ unembed.T)[target]`, computed a
    chunk of tokens at a time so that neither the forward nor the backward pass holds
    more than one `[chunk_size, vocab_chunk_size]` block of logits.

    The forward pass keeps one float per token (the log-normaliser); the backward pass
    recomputes each chunk's logits. Inputs may be float32 or bfloat16; logits, softmax
    and gradient accumulation are float32, and the gradients w.r.t. `hidden` and
    `unembed` come back in their input dtypes.

    A flat primitive: it takes `[tokens, …]` arrays, where the functions on a trunk's
    output ([`eqx_mtp.mtp_loss_sums_from_hidden`][], [`eqx_mtp.mtp_depth_losses`][])
    take `[batch, seq, …]`; flatten rows with `hidden.reshape(-1, dim)`.

    **Arguments:**

    - `hidden`: `[tokens, dim]` hidden states (after the final norm).
    - `unembed`: `[vocab, dim]` output matrix; logits are `hidden @ unembed.T`.
    - `targets`: `[tokens]` integer target ids in `[0, vocab)`.
    - `where`: optional boolean `[tokens]`; tokens where it is `False` get loss `0` and
        add exactly zero to both gradients.
    - `chunk_size`: tokens per chunk; any number of tokens works (the last chunk is
        padded). `None` is one chunk.
    - `vocab_chunk_size`: vocabulary entries per chunk (an online log-sum-exp joins
        them); `None` keeps the whole vocabulary in one chunk.

    **Returns:**

    `[tokens]` float32 losses, `0` where `where` is `False`.
    """
    fn = "fused_cross_entropy"
    check_head_inputs(
        fn, hidden, unembed, targets, where, layout="tokens", unembedding_name="unembed"
    )
    check_chunk_size(fn, "chunk_size", chunk_size)
    check_chunk_size(fn, "vocab_chunk_size", vocab_chunk_size)
    return token_losses_unchecked(
        hidden,
        unembed,
        targets,
        where=where,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )


def token_losses_unchecked(
    hidden, unembed, targets, *, where, chunk_size, vocab_chunk_size
):
    """`fused_cross_entropy` without its input checks."""
    num_tokens = hidden.shape[0]
    if where is None:
        where = jnp.ones((num_tokens,), jnp.bool_)
    if num_tokens == 0:
        return jnp.zeros((0,), jnp.float32)
    chunk = num_tokens if chunk_size is None else min(chunk_size, num_tokens)
    vocab_size = unembed.shape[0]
    vocab_chunk = (
        vocab_size if vocab_chunk_size is None else min(vocab_chunk_size, vocab_size)
    )
    return _token_losses(hidden, unembed, targets, where, chunk, vocab_chunk)


# --------------------------------------------------------------------------------------
# Loss sum: gradients accumulated in the forward pass, scaled in the backward.
# --------------------------------------------------------------------------------------


def _loss_sum_impl(hidden, unembed, targets, where, chunk, with_grads):
    """The masked loss sum and, when `with_grads`, its gradients for a unit cotangent:
    w.r.t. `hidden` in its dtype, w.r.t. `unembed` in float32."""
    num_tokens = hidden.shape[0]
    dtype = _common_dtype(hidden, unembed)
    h_all = hidden.astype(dtype)
    w = unembed.astype(dtype)

    def body(carry, xs):
        total, grad_w = carry
        h, t, valid = xs
        logits = _logits(h, w)
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        exps = jnp.exp(logits - row_max)
        row_sum = jnp.sum(exps, axis=-1, keepdims=True)
        log_normalizer = row_max[:, 0] + jnp.log(row_sum[:, 0])
        losses = log_normalizer - _target_logits(h, w, t)
        total = total + jnp.sum(jnp.where(valid, losses, 0.0))
        if not with_grads:
            return (total, grad_w), None
        columns = jnp.arange(w.shape[0], dtype=jnp.int32)
        probs = exps / row_sum
        g = jnp.where(columns == t[:, None], probs - 1.0, probs)
        g = jnp.where(valid[:, None], g, 0.0)
        grad_h = _grad_hidden(g, w).astype(hidden.dtype)
        # Accumulated as `[dim, vocab]`, transposed once at the end: see
        # `_grad_unembed_transposed`.
        return (total, grad_w + _grad_unembed_transposed(g, h)), grad_h

    init = (
        jnp.zeros((), jnp.float32),
        jnp.zeros(w.shape[::-1], jnp.float32) if with_grads else None,
    )
    (total, grad_w), grad_h = jax.lax.scan(
        body,
        init,
        (
            _chunked(h_all, chunk, 0),
            _chunked(targets, chunk, 0),
            _chunked(where, chunk, False),
        ),
    )
    if not with_grads:
        return total, None
    # `grad_w` stays float32: `_loss_sum_fwd` casts it, the weighted sum accumulates it.
    return total, (_unchunked(grad_h, num_tokens), grad_w.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss_sum(hidden, unembed, targets, where, chunk):
    total, _ = _loss_sum_impl(hidden, unembed, targets, where, chunk, False)
    return total


def _loss_sum_fwd(hidden, unembed, targets, where, chunk):
    total, (grad_h, grad_w) = _loss_sum_impl(
        hidden, unembed, targets, where, chunk, True
    )
    return total, (grad_h, grad_w.astype(unembed.dtype))


def _loss_sum_bwd(chunk, residuals, cotangent):
    grad_h, grad_w = residuals
    cotangent = cotangent.astype(jnp.float32)

    def scale(g):
        return (cotangent * g.astype(jnp.float32)).astype(g.dtype)

    return scale(grad_h), scale(grad_w), None, None


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd)


def fused_loss_sum(
    hidden: Float[Array, "tokens dim"],
    unembed: Float[Array, "vocab dim"],
    targets: Int[Array, " tokens"],
    where: Bool[Array, " tokens"],
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Float[Array, ""]:
    """`sum(where * -log softmax(hidden @ unembed.T)[target])` in chunks of tokens, with
    both matmul gradients accumulated in the forward pass (three matmuls in all).

    Under differentiation it keeps gradient-sized residuals (`[tokens, dim]` and
    `[vocab, dim]`) instead of recomputing the logits; without differentiation it is a
    single chunked matmul. Arguments as for [`eqx_mtp.fused_cross_entropy`][], except
    that `where` is required and the vocabulary is never split.

    Each call keeps its own `[vocab, dim]` residual, since its cotangent is known only
    in the backward pass. [`eqx_mtp.mtp_loss`][] and [`eqx_mtp.train.train_step`][]
    know the
    cotangents of their per-depth sums before the forward pass and keep one such
    array for the main head and all depths together.
    """
    fn = "fused_loss_sum"
    check_head_inputs(
        fn, hidden, unembed, targets, where, layout="tokens", unembedding_name="unembed"
    )
    check_chunk_size(fn, "chunk_size", chunk_size)
    return loss_sum_unchecked(hidden, unembed, targets, where, chunk_size=chunk_size)


def loss_sum_unchecked(hidden, unembed, targets, where, *, chunk_size):
    """`fused_loss_sum` without its input checks."""
    num_tokens = hidden.shape[0]
    if num_tokens == 0:
        return jnp.zeros((), jnp.float32)
    chunk = num_tokens if chunk_size is None else min(chunk_size, num_tokens)
    return _loss_sum(hidden, unembed, targets, where, chunk)


# --------------------------------------------------------------------------------------
# Weighted loss sum: the unembedding gradient returned as a value, not kept.
# --------------------------------------------------------------------------------------
#
# Where the cotangent `c` of a loss sum is known before the sum is computed (the loss is
# linear in the per-depth sums once the token counts are fixed), `c · ∂S/∂unembed` can
# be computed in the forward pass and added into one `[vocab, dim]` float32
# accumulator shared by the main head and every depth. Differentiation then keeps only
# the `[tokens, dim]` hidden gradient of each head, and `inject_gradient` hands the
# accumulator to the unembedding in the backward pass.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _weighted_loss_sum(hidden, unembed, targets, where, weight, chunk):
    total, (_, grad_w) = _loss_sum_impl(hidden, unembed, targets, where, chunk, True)
    return total, weight * grad_w


def _weighted_loss_sum_fwd(hidden, unembed, targets, where, weight, chunk):
    total, (grad_h, grad_w) = _loss_sum_impl(
        hidden, unembed, targets, where, chunk, True
    )
    return (total, weight * grad_w), grad_h


def _weighted_loss_sum_bwd(chunk, grad_h, cotangents):
    # The weighted unembedding gradient is a value, not a function to differentiate;
    # the unembedding and the weight come in under `stop_gradient`.
    cotangent, _ = cotangents
    cotangent = cotangent.astype(jnp.float32)
    grad_h = (cotangent * grad_h.astype(jnp.float32)).astype(grad_h.dtype)
    return grad_h, None, None, None, None


_weighted_loss_sum.defvjp(_weighted_loss_sum_fwd, _weighted_loss_sum_bwd)


def weighted_loss_sum_unchecked(hidden, unembed, targets, where, weight, *, chunk_size):
    """`(loss_sum, unembed_grad)`: the sum of `fused_loss_sum`, differentiable w.r.t.
    `hidden` only, and `weight · ∂loss_sum/∂unembed` as a float32 `[vocab, dim]` value
    (not differentiable), both from one chunked pass of three matmuls.

    Under differentiation only the `[tokens, dim]` hidden gradient is kept. The caller
    adds `unembed_grad` into an accumulator and hands it to the unembedding with
    `inject_gradient`; that is exact when the sum's cotangent is `weight`, as it is in
    a loss `Σ_k weight_k · loss_sum_k + inject_gradient(unembed, accumulator)`.
    """
    num_tokens = hidden.shape[0]
    if num_tokens == 0:
        return jnp.zeros((), jnp.float32), jnp.zeros(unembed.shape, jnp.float32)
    chunk = num_tokens if chunk_size is None else min(chunk_size, num_tokens)
    total, unembed_grad = _weighted_loss_sum(
        hidden,
        jax.lax.stop_gradient(unembed),
        targets,
        where,
        jax.lax.stop_gradient(jnp.asarray(weight, jnp.float32)),
        chunk,
    )
    return total, jax.lax.stop_gradient(unembed_grad)


@jax.custom_vjp
def _inject(x, gradient):
    del x, gradient
    return jnp.zeros((), jnp.float32)


def _inject_fwd(x, gradient):
    # An empty array of `x`'s dtype: residuals are arrays, not dtypes.
    return _inject(x, gradient), (gradient, jnp.zeros((0,), x.dtype))


def _inject_bwd(residuals, cotangent):
    gradient, like_x = residuals
    return (cotangent.astype(jnp.float32) * gradient).astype(like_x.dtype), None


_inject.defvjp(_inject_fwd, _inject_bwd)


def inject_gradient(x: Array, gradient: Array) -> Array:
    """A float32 zero whose gradient w.r.t. `x` is `gradient` (times the cotangent);
    `gradient` itself gets none. Adding it to a loss hands `x` a gradient computed in
    the forward pass."""
    return _inject(x, jax.lax.stop_gradient(gradient))
