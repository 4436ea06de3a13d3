"""The cross-entropy of an output head over a device mesh: tokens local to
(`data`, `context`), the vocabulary local to `model`.

Each custom VJP wraps one `jax.shard_map`, so every collective is written out here and
none is left to the transpose of a shard-mapped program:

- a stable log-sum-exp across vocabulary shards: the local max, `pmax` of its
  stop-gradient value over `model`, `psum` of the local sums of exponentials;
- the target logit from the shard that holds it (`psum` over `model`);
- loss sums `psum`-ed over every axis; the gradient w.r.t. the hidden states `psum`-ed
  over `model`, the one w.r.t. the unembedding over `data` and `context`.

A matrix may also come as per-token-shard copies (`token_shard_copies`): one copy of
its vocabulary-padded rows per (`data`, `context`) shard. Then the heads
(`vocab_parallel_unchecked`) and the embedding lookups (`copies_lookup`) read a
device's own copy and return its gradient unreduced, the copies' gradients from every
use add up on each device, and the one reduction over the token shards is the
transpose of the broadcast that made the copies.

No device holds more than one `[chunk, vocab / model]` block of logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from ._checks import check_choice, check_chunk_size, check_head_inputs
from ._config import LOSS_IMPLS
from ._cross_entropy import naive_loss_sum
from ._fused_ce import (
    DEFAULT_CHUNK_SIZE,
    _chunked,
    _common_dtype,
    _grad_hidden,
    _grad_unembed,
    _logits,
    _unchunked,
)
from ._mesh import CONTEXT, DATA, MODEL, check_batch_fits_mesh, check_mesh

_TOKEN_AXES = (DATA, CONTEXT)
_TOKENS = PartitionSpec(DATA, CONTEXT)
_HIDDEN = PartitionSpec(DATA, CONTEXT, None)
_VOCAB = PartitionSpec(MODEL, None)
_COPIES = PartitionSpec(_TOKEN_AXES, MODEL, None)
_SCALAR = PartitionSpec()


def _local_columns(w_local: Array, vocab_size: int) -> tuple[Array, Array]:
    """Global vocabulary ids of this device's rows of the unembedding, and which of
    them are real (the vocabulary is padded to a multiple of the `model` axis)."""
    width = w_local.shape[0]
    columns = jax.lax.axis_index(MODEL) * width + jnp.arange(width, dtype=jnp.int32)
    return columns, columns < vocab_size


def _chunk_softmax(h, w, t, columns, real):
    """One chunk of tokens against the local vocabulary shard: the unnormalised
    probabilities `exp(logits - max)`, their global sum, the log-normaliser and the
    target logit, each reduced over `model`."""
    logits = jnp.where(real[None, :], _logits(h, w), -jnp.inf)
    # `pmax` has no derivative; nothing here is differentiated, but the max is a
    # constant of the log-sum-exp all the same.
    row_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), MODEL)
    exps = jnp.exp(logits - row_max[:, None])
    row_sum = jax.lax.psum(jnp.sum(exps, axis=-1), MODEL)
    is_target = columns[None, :] == t[:, None]
    target_logit = jax.lax.psum(
        jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1), MODEL
    )
    log_normalizer = row_max + jnp.log(row_sum)
    return exps, row_sum, log_normalizer, target_logit, is_target


def _flat(h, t, valid):
    return h.reshape(-1, h.shape[-1]), t.reshape(-1), valid.reshape(-1)


def _local_loss(h, w, t, valid, *, chunk, vocab_size, with_grads):
    """Per device: the global loss sum, the log-normalisers of its tokens and, when
    `with_grads`, the gradients of the sum w.r.t. its hidden states and its shard of
    the unembedding (for a unit cotangent): summed over the token shards, or this
    device's own, unreduced, when `w` is its `[1, vocab / model, dim]` copy."""
    copy = w.ndim == 3
    w = w[0] if copy else w
    rows, seq, dim = h.shape
    num_tokens = rows * seq
    dtype = _common_dtype(h, w)
    hidden_dtype, unembed_dtype = h.dtype, w.dtype
    h, t, valid = _flat(h.astype(dtype), t, valid)
    w = w.astype(dtype)
    columns, real = _local_columns(w, vocab_size)

    def body(carry, xs):
        total, grad_w = carry
        hc, tc, vc = xs
        exps, row_sum, log_normalizer, target_logit, is_target = _chunk_softmax(
            hc, w, tc, columns, real
        )
        total = total + jnp.sum(jnp.where(vc, log_normalizer - target_logit, 0.0))
        if not with_grads:
            return (total, grad_w), (log_normalizer, None)
        g = exps / row_sum[:, None] - is_target.astype(jnp.float32)
        g = jnp.where(vc[:, None], g, 0.0)
        grad_h = jax.lax.psum(_grad_hidden(g, w), MODEL).astype(hidden_dtype)
        return (total, grad_w + _grad_unembed(g, hc)), (log_normalizer, grad_h)

    init = (
        jnp.zeros((), jnp.float32),
        jnp.zeros(w.shape, jnp.float32) if with_grads else None,
    )
    (total, grad_w), (log_normalizers, grad_h) = jax.lax.scan(
        body,
        init,
        (_chunked(h, chunk, 0), _chunked(t, chunk, 0), _chunked(valid, chunk, False)),
    )
    total = jax.lax.psum(total, _TOKEN_AXES)
    log_normalizers = _unchunked(log_normalizers, num_tokens).reshape(rows, seq)
    if not with_grads:
        return total, log_normalizers
    grad_h = _unchunked(grad_h, num_tokens).reshape(rows, seq, dim)
    return total, log_normalizers, grad_h, _token_summed(grad_w, copy, unembed_dtype)


def _token_summed(grad_w, copy, dtype):
    """A device's unembedding gradient, summed over the token shards, or as the
    gradient of its own copy (`copy`: the reduction is the copies' broadcast's)."""
    if copy:
        return grad_w[None].astype(dtype)
    return jax.lax.psum(grad_w, _TOKEN_AXES).astype(dtype)


def _local_recomputed_grads(h, w, t, scales, log_normalizers, *, chunk, vocab_size):
    """Per device: the gradients of `Σ_i scales[i] · loss_i` (`scales` the sum's
    cotangent where a token counts, exactly zero elsewhere), recomputing each chunk's
    logits from the saved log-normalisers; the unembedding's as `_local_loss`'s."""
    copy = w.ndim == 3
    w = w[0] if copy else w
    rows, seq, dim = h.shape
    dtype = _common_dtype(h, w)
    hidden_dtype, unembed_dtype = h.dtype, w.dtype
    h, t, scales = _flat(h.astype(dtype), t, scales)
    w = w.astype(dtype)
    columns, real = _local_columns(w, vocab_size)

    def body(grad_w, xs):
        hc, tc, scale, log_normalizer = xs
        probs = jnp.exp(_logits(hc, w) - log_normalizer[:, None])
        g = jnp.where(columns[None, :] == tc[:, None], probs - 1.0, probs)
        g = jnp.where(real[None, :], g * scale[:, None], 0.0)
        grad_h = jax.lax.psum(_grad_hidden(g, w), MODEL).astype(hidden_dtype)
        return grad_w + _grad_unembed(g, hc), grad_h

    grad_w, grad_h = jax.lax.scan(
        body,
        jnp.zeros(w.shape, jnp.float32),
        (
            _chunked(h, chunk, 0),
            _chunked(t, chunk, 0),
            _chunked(scales, chunk, 0.0),
            _chunked(log_normalizers.reshape(-1), chunk, 0.0),
        ),
    )
    grad_h = _unchunked(grad_h, rows * seq).reshape(rows, seq, dim)
    return grad_h, _token_summed(grad_w, copy, unembed_dtype)


def _shard_mapped(fn, mesh, in_specs, out_specs):
    # The collectives are explicit and nothing inside is differentiated (each custom
    # VJP below wraps the shard_map), so the replication checker has nothing to add.
    return jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )


def _matrix_spec(w):
    """The `PartitionSpec` of an unembedding `[vocab, dim]`, or of its copies."""
    return _COPIES if w.ndim == 3 else _VOCAB


def _loss_in(w):
    return (_HIDDEN, _matrix_spec(w), _TOKENS, _TOKENS)


def _loss_only(hidden, w, targets, where, mesh, chunk, vocab_size):
    fn = functools.partial(
        _local_loss, chunk=chunk, vocab_size=vocab_size, with_grads=False
    )
    return _shard_mapped(fn, mesh, _loss_in(w), (_SCALAR, _TOKENS))(
        hidden, w, targets, where
    )


# -- "fused": both gradients accumulated in the forward pass --------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hidden, w, targets, where, mesh, chunk, vocab_size):
    total, _ = _loss_only(hidden, w, targets, where, mesh, chunk, vocab_size)
    return total


def _fused_fwd(hidden, w, targets, where, mesh, chunk, vocab_size):
    fn = functools.partial(
        _local_loss, chunk=chunk, vocab_size=vocab_size, with_grads=True
    )
    total, _, grad_h, grad_w = _shard_mapped(
        fn, mesh, _loss_in(w), (_SCALAR, _TOKENS, _HIDDEN, _matrix_spec(w))
    )(hidden, w, targets, where)
    return total, (grad_h, grad_w)


def _fused_bwd(mesh, chunk, vocab_size, residuals, cotangent):
    grad_h, grad_w = residuals
    cotangent = cotangent.astype(jnp.float32)

    def scale(g):
        return (cotangent * g.astype(jnp.float32)).astype(g.dtype)

    return scale(grad_h), scale(grad_w), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# -- "chunked": log-normalisers kept, logits recomputed in the backward pass ----------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _recomputed(hidden, w, targets, where, mesh, chunk, vocab_size):
    total, _ = _loss_only(hidden, w, targets, where, mesh, chunk, vocab_size)
    return total


def _recomputed_fwd(hidden, w, targets, where, mesh, chunk, vocab_size):
    total, log_normalizers = _loss_only(
        hidden, w, targets, where, mesh, chunk, vocab_size
    )
    return total, (hidden, w, targets, where, log_normalizers)


def _recomputed_bwd(mesh, chunk, vocab_size, residuals, cotangent):
    hidden, w, targets, where, log_normalizers = residuals
    # Masked tokens get an exactly zero logits gradient.
    scales = jnp.where(where, cotangent.astype(jnp.float32), 0.0)
    fn = functools.partial(_local_recomputed_grads, chunk=chunk, vocab_size=vocab_size)
    grad_h, grad_w = _shard_mapped(
        fn, mesh, (*_loss_in(w), _TOKENS), (_HIDDEN, _matrix_spec(w))
    )(hidden, w, targets, scales, log_normalizers)
    return grad_h, grad_w, None, None


_recomputed.defvjp(_recomputed_fwd, _recomputed_bwd)


def vocab_parallel_loss_sum(
    hidden: Float[Array, "batch seq dim"],
    unembedding: Float[Array, "vocab dim"],
    targets: Int[Array, "batch seq"],
    where: Bool[Array, "batch seq"],
    *,
    mesh: Mesh,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    # Plain `str` so a wrong choice reaches the check below, which lists the choices.
    impl: str = "fused",
) -> tuple[Float[Array, ""], Int[Array, ""]]:
    """[`eqx_mtp.head_loss_sum`][] over a device mesh, vocabulary-parallel.

    Inside one `jax.shard_map`, each device takes the hidden states of its rows
    (`data`) and sequence shard (`context`) and its shard of the vocabulary (`model`),
    computes a chunk of `[chunk_size, vocab / model]` logits at a time, and joins the
    shards with a stable log-sum-exp (`pmax` of the stop-gradient local max, `psum` of
    the local sums of exponentials) and a `psum` of the target logit. The loss sum is
    `psum`-ed over every axis; nothing is divided. A vocabulary that the `model` axis
    does not divide is padded with masked-out rows. A device whose tokens are all
    masked adds exactly zero to the sum and to both gradients.

    **Arguments:**

    - `hidden`: `[batch, seq, dim]` hidden states after the final norm; `batch` must be
        divisible by the mesh's `data` axis and `seq` by its `context` axis.
    - `unembedding`: `[vocab, dim]` output matrix.
    - `targets`: `[batch, seq]` target ids in `[0, vocab)`.
    - `where`: boolean `[batch, seq]`, which tokens count.
    - `mesh`: the mesh from [`eqx_mtp.make_mesh`][].
    - `chunk_size`: tokens per chunk of each device's logits (`None`: one chunk).
    - `impl`: `"fused"` (gradients accumulated in the forward pass; residuals of the
        size of the gradients) or `"chunked"` (the backward recomputes the logits;
        one float per token of residuals), as for [`eqx_mtp.head_loss_sum`][].
        `"naive"` is the full-logits reference, left to `jit` to partition.

    **Returns:**

    `(loss_sum, token_count)`: a float32 and an int32 scalar, replicated.
    """
    fn = "vocab_parallel_loss_sum"
    check_head_inputs(fn, hidden, unembedding, targets, where, layout="batch seq")
    check_chunk_size(fn, "chunk_size", chunk_size)
    check_choice(fn, "impl", impl, LOSS_IMPLS)
    return vocab_parallel_unchecked(
        hidden, unembedding, targets, where, mesh=mesh, chunk_size=chunk_size, impl=impl
    )


def vocab_parallel_unchecked(
    hidden, unembedding, targets, where, *, mesh, chunk_size, impl, vocab_size=None
):
    """`vocab_parallel_loss_sum` without its input checks, but with the mesh's, which
    the shapes of a batch split over it must meet. `unembedding` may also be the
    per-token-shard copies of a `vocab_size` vocabulary (`token_shard_copies`; not
    with `impl="naive"`), whose gradient then comes unreduced."""
    check_mesh(mesh)
    batch, seq_len, dim = hidden.shape
    check_batch_fits_mesh(mesh, (batch, seq_len), name="hidden")
    if impl == "naive":
        total = naive_loss_sum(
            hidden.reshape(-1, dim), unembedding, targets.reshape(-1), where.reshape(-1)
        )
        return total, jnp.sum(where, dtype=jnp.int32)
    if unembedding.ndim == 3:
        w = unembedding
    else:
        vocab_size = unembedding.shape[0]
        w = padded_vocabulary(unembedding, mesh)
    local_tokens = (batch // mesh.shape[DATA]) * (seq_len // mesh.shape[CONTEXT])
    chunk = local_tokens if chunk_size is None else min(chunk_size, local_tokens)
    loss = _fused if impl == "fused" else _recomputed
    total = loss(hidden, w, targets, where, mesh, chunk, vocab_size)
    return total, jnp.sum(where, dtype=jnp.int32)


def padded_vocabulary(matrix: Array, mesh: Mesh) -> Array:
    """A `[vocab, dim]` matrix with zero rows up to a multiple of the `model` axis."""
    pad = -matrix.shape[0] % mesh.shape[MODEL]
    return jnp.pad(matrix, ((0, pad), (0, 0))) if pad else matrix


def token_shard_copies(matrix: Array, mesh: Mesh) -> Array:
    """`[data · context, padded vocab, dim]`: one copy of the vocabulary-padded
    `matrix` per token shard, its vocabulary split over `model`. Every head and
    lookup that reads the copies returns its gradient unreduced, so the transpose of
    this broadcast is the one reduction of the matrix's gradient over the token
    shards (per step, not per use)."""
    shards = mesh.shape[DATA] * mesh.shape[CONTEXT]
    padded = padded_vocabulary(matrix, mesh)
    copies = jnp.broadcast_to(padded[None], (shards, *padded.shape))
    return jax.lax.with_sharding_constraint(copies, NamedSharding(mesh, _COPIES))


def _local_lookup(copy, ids):
    """This device's tokens' rows of its copy, zero where another `model` shard holds
    the row, and the in-shard row numbers."""
    width = copy.shape[1]
    local = ids - jax.lax.axis_index(MODEL) * width
    inside = (local >= 0) & (local < width)
    return jnp.clip(local, 0, width - 1), inside


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def copies_lookup(copies, ids, mesh):
    """The `[batch, seq, dim]` embeddings of `[batch, seq]` token ids, rows over
    `data` and the sequence over `context`, from the per-token-shard `copies`
    (`token_shard_copies`); its gradient w.r.t. the copies is each device's own,
    unreduced."""

    def lookup(copy, ids):
        local, inside = _local_lookup(copy, ids)
        rows = jnp.where(inside[..., None], copy[0][local], 0)
        return jax.lax.psum(rows, MODEL)

    return _shard_mapped(lookup, mesh, (_COPIES, _TOKENS), _HIDDEN)(copies, ids)


def _copies_lookup_fwd(copies, ids, mesh):
    # The copies only for their shape and dtype; they live on for the heads anyway.
    return copies_lookup(copies, ids, mesh), (copies, ids)


def _copies_lookup_bwd(mesh, residuals, cotangent):
    copies, ids = residuals

    def scatter(copy, ids, cotangent):
        local, inside = _local_lookup(copy, ids)
        rows = jnp.where(inside[..., None], cotangent, 0).astype(copy.dtype)
        return jnp.zeros_like(copy).at[0, local].add(rows)

    grad = _shard_mapped(scatter, mesh, (_COPIES, _TOKENS, _HIDDEN), _COPIES)(
        copies, ids, cotangent
    )
    return grad, None


copies_lookup.defvjp(_copies_lookup_fwd, _copies_lookup_bwd)
