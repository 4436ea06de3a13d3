"""The MTP training objective as pure functions of (model, batch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from ._checks import (
    Shapes,
    check_choice,
    check_chunk_size,
    check_final_norm,
    check_float,
    check_ids,
    check_mask,
    check_same_shape,
    check_segment_ids,
)
from ._config import LOSS_IMPLS
from ._cross_entropy import rows_weighted_loss_sum
from ._documents import number_documents
from ._fused_ce import DEFAULT_CHUNK_SIZE, inject_gradient
from ._mesh import (
    CONTEXT,
    DATA,
    MODEL,
    batch_sharding,
    check_batch_fits_mesh,
    check_mesh,
    map_rows,
    tracing_on,
)
from ._model import MTPModel
from ._mtp import MTPDepths, _check_depth_inputs, depth_losses_unchecked
from ._precision import in_compute_dtype
from ._schedule import MTPWeight
from ._targets import segment_positions, targets_of_depth, valid_token_counts
from ._vocab_parallel import rows_head_loss_sum

Reduction = Literal["mean", "pooled"]
DepthWeights = Sequence[float] | Float[ArrayLike, " depths"]


def check_batch(
    model: MTPModel,
    tokens,
    *,
    segment_ids=None,
    positions=None,
    loss_mask=None,
    mesh=None,
) -> None:
    """Raise a `ValueError`/`TypeError` naming the argument when a batch does not fit
    `model` (shapes, dtypes, sequence length against depth and `max_seq_len`) or
    `mesh` (rows over `data`, the sequence over `context`)."""
    if not isinstance(model, MTPModel):
        raise TypeError(f"model must be an eqx_mtp.MTPModel, got {type(model)}")
    config = model.config
    # Messages without the function's name: mtp_loss and mtp_loss_sums share them.
    shape = Shapes(None).check("tokens", tokens, "batch seq")
    check_ids(None, "tokens", tokens)
    seq_len = shape[1]
    if seq_len > config.max_seq_len:
        raise ValueError(
            f"tokens: seq_len={seq_len} exceeds the model's max_seq_len="
            f"{config.max_seq_len}"
        )
    if config.num_depths + 2 > seq_len:
        raise ValueError(
            f"num_depths={config.num_depths} is too large for seq_len={seq_len}: "
            "depth D predicts the token D + 1 places ahead, so seq_len must be at "
            "least num_depths + 2"
        )
    for name, value in (
        ("segment_ids", segment_ids),
        ("positions", positions),
        ("loss_mask", loss_mask),
    ):
        if value is None:
            continue
        check_same_shape(None, name, value, shape, like="tokens")
        if name == "loss_mask":
            check_mask(None, name, value)
        elif name == "segment_ids":
            check_segment_ids(None, name, value)
        else:
            check_ids(None, name, value)
    if mesh is not None:
        check_mesh(mesh)
        check_batch_fits_mesh(mesh, tokens.shape, name="tokens")


def mtp_loss_sums(
    model: MTPModel,
    tokens: Int[Array, "batch seq"],
    *,
    segment_ids: Int[Array, "batch seq"] | None = None,
    positions: Int[Array, "batch seq"] | None = None,
    loss_mask: Bool[Array, "batch seq"] | None = None,
    mesh: Mesh | None = None,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, " depths_plus_one"], Int[Array, " depths_plus_one"]]:
    """Per-depth cross-entropy sums and valid-token counts; index 0 is the main
    (next-token) objective, index `k` depth `k`.

    Nothing is divided, so sums and counts from several devices or micro-batches can be
    added before [`eqx_mtp.reduce_losses`][] turns them into a loss.

    The model's trunk runs, and its output goes to
    [`eqx_mtp.mtp_loss_sums_from_hidden`][] with the trunk's embedding, unembedding
    and final norm and the model's depths: one code path for our trunk and any other.

    **Arguments:**

    - `model`: the [`eqx_mtp.MTPModel`][].
    - `tokens`: `[batch, seq]` integer token ids in `[0, vocab_size)`.
    - `segment_ids`: optional `[batch, seq]` segment ids of packed rows: `0` for
        padding, a positive id for a document (a negative id is an error). A document
        is a maximal run of one non-zero id, so an id reused later in a row starts
        another document, for attention, positions and the validity rule alike (see
        [`eqx_mtp.document_ids`][]). Absent, each row is one document.
    - `positions`: optional `[batch, seq]` positions; by default they restart at 0 in
        every document.
    - `loss_mask`: optional boolean `[batch, seq]`: which tokens may be targets.
    - `mesh`: optional mesh from [`eqx_mtp.make_mesh`][]. The batch is laid out rows
        over `data` and sequence over `context`, the trunk and the depths run as `jit`
        partitions them, and the cross-entropy of the main head and of every depth runs
        vocabulary-parallel under `jax.shard_map`
        ([`eqx_mtp.vocab_parallel_loss_sum`][]). Targets and their validity are
        computed on the whole row, so a document that straddles a `context` shard
        boundary trains at every depth as on one device. The results equal the
        single-device ones. `None`: one device.
    - `key`: optional PRNG key for randomness in the depths' layers (e.g. dropout in
        a block of your own): split per depth and per row (see
        [`eqx_mtp.MTPDepths`][]). `None` (the default) is deterministic. The trunk
        and our own blocks take no randomness.

    The trunk and the depths compute in `model.config.compute_dtype` (the parameters
    are cast once per call; see [`eqx_mtp.ModelConfig`][]); the logits, losses, sums
    and the gradients w.r.t. the float32 parameters are float32.

    **Returns:**

    `(loss_sums, token_counts)`, float32 and int32 arrays of shape `[num_depths + 1]`,
    summed over the whole batch (over every device of `mesh`).
    """
    check_batch(
        model,
        tokens,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
        mesh=mesh,
    )
    return _loss_sums(
        model,
        tokens,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
        mesh=mesh,
        key=key,
    )


def _loss_sums(
    model,
    tokens,
    *,
    segment_ids,
    positions,
    loss_mask,
    mesh,
    key=None,
    sum_weights=None,
):
    """`mtp_loss_sums` after `check_batch`; with `sum_weights`, the weighted form of
    `loss_sums_unchecked`."""
    vocab_size = model.config.vocab_size
    # The check runs on a scalar that the tokens then depend on, so that a sharded
    # batch stays sharded (a checked array would be gathered onto one device).
    in_range = eqx.error_if(
        jnp.zeros((), tokens.dtype),
        jnp.any((tokens < 0) | (tokens >= vocab_size)),
        f"tokens: every id must lie in [0, vocab_size={vocab_size})",
    )
    tokens = tokens + in_range
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    if mesh is not None:
        tokens, segment_ids, positions, loss_mask = _constrain(
            (tokens, segment_ids, positions, loss_mask), batch_sharding(mesh)
        )

    trunk = model.trunk
    if model.config.train_depths_only:
        # The shared embedding, unembedding and final norm are the trunk's too: the
        # depths train against a frozen trunk.
        trunk_arrays, trunk_static = eqx.partition(trunk, eqx.is_array)
        trunk = eqx.combine(jax.lax.stop_gradient(trunk_arrays), trunk_static)
    # The depths follow the trunk's output dtype (see `scan_depths`).
    trunk = in_compute_dtype(trunk, model.config.compute_dtype)
    if mesh is not None:
        # FSDP: the embedding is gathered over `data` before the lookups (of the
        # trunk and of the sequential depths). Looked up while its width is still
        # split, the gathered rows would come out split by width and be replicated
        # whole to reach the batch's layout.
        trunk = eqx.tree_at(
            lambda t: t.embedding, trunk, _gathered_over_data(trunk.embedding, mesh)
        )
    with tracing_on(mesh):
        hidden = map_rows(lambda t, p, s: trunk(t, positions=p, segment_ids=s))(
            tokens, positions, segment_ids
        )
    # Resolved as any trunk's final norm is, so that both paths run the same program.
    final_norm = check_final_norm(
        None, trunk.final_norm, model.config.dim, hidden.dtype
    )
    return loss_sums_unchecked(
        hidden,
        tokens,
        embedding=trunk.embedding,
        unembedding=trunk.unembedding_matrix,
        final_norm=final_norm,
        depths=model.depths,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
        loss_chunk_size=model.config.loss_chunk_size,
        loss_impl=model.config.loss_impl,
        mesh=mesh,
        key=key,
        sum_weights=sum_weights,
    )


def mtp_loss_sums_from_hidden(
    hidden: Float[Array, "batch seq dim"],
    tokens: Int[Array, "batch seq"],
    *,
    embedding: Float[Array, "vocab dim"],
    unembedding: Float[Array, "vocab dim"],
    final_norm: Callable[[Array], Array],
    depths: MTPDepths | None = None,
    segment_ids: Int[Array, "batch seq"] | None = None,
    positions: Int[Array, "batch seq"] | None = None,
    loss_mask: Bool[Array, "batch seq"] | None = None,
    loss_chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    loss_impl: str = "fused",
    mesh: Mesh | None = None,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, " depths_plus_one"], Int[Array, " depths_plus_one"]]:
    """The MTP objective on any trunk: per-depth cross-entropy sums and valid-token
    counts from the trunk's last hidden states, index 0 the main (next-token)
    objective, index `k` depth `k`.

    Research code with its own transformer calls its trunk, then this, then
    [`eqx_mtp.reduce_losses`][]. [`eqx_mtp.mtp_loss_sums`][] is this function
    applied to the output of our own trunk, so both give the same numbers.

    **Arguments:**

    - `hidden`: `[batch, seq, dim]` trunk output `h⁰`, before its final norm.
    - `tokens`: `[batch, seq]` integer token ids in `[0, vocab)`.
    - `embedding`: the shared `[vocab, dim]` token embedding (read by sequential
        depths).
    - `unembedding`: the shared `[vocab, dim]` output matrix (logits are
        `final_norm(h) @ unembedding.T`); the embedding itself when they are tied.
    - `final_norm`: the trunk's final norm: a per-vector norm such as
        `eqx.nn.RMSNorm(dim)` or `eqx.nn.LayerNorm(dim)` (`[dim] -> [dim]`, applied
        with `jax.vmap` over batch and sequence), or a norm over the last axis of
        `[batch, seq, dim]` arrays such as [`eqx_mtp.nn.RMSNorm`][].
    - `depths`: the [`eqx_mtp.MTPDepths`][] (their blocks called as
        `block(x [seq, dim], *, positions, segment_ids)`), or `None` for the plain
        next-token objective.
    - `segment_ids`: optional `[batch, seq]` document ids of packed rows (`0` =
        padding).
    - `positions`: optional `[batch, seq]` positions, passed to the depths' blocks; by
        default they restart at 0 in every segment.
    - `loss_mask`: optional boolean `[batch, seq]`: which tokens may be targets.
    - `loss_chunk_size`, `loss_impl`: `chunk_size` and `impl` of
        [`eqx_mtp.head_loss_sum`][].
    - `mesh`: optional mesh from [`eqx_mtp.make_mesh`][]: rows over `data`, sequence
        over `context`, and every cross-entropy vocabulary-parallel under
        `jax.shard_map` ([`eqx_mtp.vocab_parallel_loss_sum`][]). The results equal
        the single-device ones. `None`: one device.
    - `key`: optional PRNG key for the depths' layers (e.g. dropout), split per depth
        and per row; `None` calls the layers without a key (deterministic).

    **Returns:**

    `(loss_sums, token_counts)`, float32 and int32 arrays of shape
    `[num_depths + 1]` (`[1]` without depths), summed over the whole batch. Nothing
    is divided: reduce them globally, then call [`eqx_mtp.reduce_losses`][].

    **Raises:**

    `TypeError`/`ValueError` naming the function and the argument, as
    [`eqx_mtp.mtp_depth_losses`][] does, and when the batch does not fit `mesh`.
    """
    fn = "mtp_loss_sums_from_hidden"
    final_norm = _check_depth_inputs(
        fn,
        depths,
        hidden,
        tokens,
        embedding=embedding,
        unembedding=unembedding,
        final_norm=final_norm,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
        depths_optional=True,
    )
    check_chunk_size(fn, "loss_chunk_size", loss_chunk_size)
    check_choice(fn, "loss_impl", loss_impl, LOSS_IMPLS)
    if mesh is not None:
        try:
            check_mesh(mesh)
            check_batch_fits_mesh(mesh, tokens.shape, name="tokens")
        except (TypeError, ValueError) as error:
            raise type(error)(f"{fn}: {error}") from None
    return loss_sums_unchecked(
        hidden,
        tokens,
        embedding=embedding,
        unembedding=unembedding,
        final_norm=final_norm,
        depths=depths,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
        loss_chunk_size=loss_chunk_size,
        loss_impl=loss_impl,
        mesh=mesh,
        key=key,
    )


def loss_sums_unchecked(
    hidden,
    tokens,
    *,
    embedding,
    unembedding,
    final_norm,
    depths,
    segment_ids,
    positions,
    loss_mask,
    loss_chunk_size,
    loss_impl,
    mesh,
    key=None,
    sum_weights=None,
):
    """`mtp_loss_sums_from_hidden` after its checks, `final_norm` acting on
    `[batch, seq, dim]` arrays: the one code path of the objective, which
    `mtp_loss_sums` calls on its trunk's output.

    With `sum_weights` (`[num_depths + 1]`, the cotangents `c_k` of the sums, known
    in advance; `weighted_path_applies` says when this is allowed) it returns
    `(weighted, loss_sums, token_counts)`, where `weighted` equals `Σ_k c_k S_k` and
    has its gradient. Each head adds `c_k · ∂S_k/∂unembedding` into one float32
    `[vocab, dim]` accumulator in its forward pass, which `inject_gradient` hands to
    the unembedding in the backward pass; so differentiation keeps no unembedding
    gradient per depth. `loss_sums` are then differentiable w.r.t. the hidden states
    only: use them as values."""
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    if mesh is not None:
        tokens, segment_ids, positions, loss_mask = _constrain(
            (tokens, segment_ids, positions, loss_mask), batch_sharding(mesh)
        )
        (hidden,) = _constrain(
            (hidden,), NamedSharding(mesh, PartitionSpec(DATA, CONTEXT, None))
        )
        # The sequential depths look up the embedding whole along its width (see
        # `_gathered_over_data`).
        embedding = _gathered_over_data(embedding, mesh)

    targets, valid = targets_of_depth(
        tokens, 0, documents=number_documents(segment_ids), loss_mask=loss_mask
    )
    weighted = sum_weights is not None
    if weighted:
        sum_weights = jax.lax.stop_gradient(sum_weights)
        main_sum, main_count, unembedding_grad = rows_weighted_loss_sum(
            final_norm(hidden),
            unembedding,
            targets,
            valid,
            sum_weights[0],
            chunk_size=loss_chunk_size,
        )
        depth_options = dict(sum_weights=sum_weights[1:])
    else:
        main_sum, main_count = rows_head_loss_sum(
            final_norm(hidden),
            unembedding,
            targets,
            valid,
            mesh=mesh,
            chunk_size=loss_chunk_size,
            impl=loss_impl,
        )
        depth_options = dict(mesh=mesh)
    loss_sums, token_counts = main_sum[None], main_count[None]
    if depths is not None:
        if weighted:
            depth_options["unembedding_grad"] = unembedding_grad
        depth_sums, depth_counts, *accumulated = depth_losses_unchecked(
            depths,
            hidden,
            tokens,
            embedding=embedding,
            unembedding=unembedding,
            final_norm=final_norm,
            segment_ids=segment_ids,
            positions=positions,
            loss_mask=loss_mask,
            loss_chunk_size=loss_chunk_size,
            loss_impl=loss_impl,
            key=key,
            **depth_options,
        )
        if weighted:
            (unembedding_grad,) = accumulated
        loss_sums = jnp.concatenate([loss_sums, depth_sums])
        token_counts = jnp.concatenate([token_counts, depth_counts])
    if not weighted:
        return loss_sums, token_counts
    total = jnp.dot(sum_weights, loss_sums) + inject_gradient(
        unembedding, unembedding_grad
    )
    return total, loss_sums, token_counts


def _constrain(arrays, sharding):
    return tuple(
        None if x is None else jax.lax.with_sharding_constraint(x, sharding)
        for x in arrays
    )


def _gathered_over_data(embedding: Array, mesh: Mesh) -> Array:
    vocab_axis = MODEL if embedding.shape[0] % mesh.shape[MODEL] == 0 else None
    return jax.lax.with_sharding_constraint(
        embedding, NamedSharding(mesh, PartitionSpec(vocab_axis, None))
    )


def resolve_mtp_weight(
    mtp_weight: MTPWeight, step: int | Int[ArrayLike, ""] | None = None
) -> Float[Array, ""]:
    """λ as a float32 scalar: `mtp_weight` itself, or `mtp_weight(step)` when it is a
    schedule (an optax-style callable, e.g. from [`eqx_mtp.parse_mtp_weight`][])."""
    if callable(mtp_weight):
        if step is None:
            raise ValueError("mtp_weight is a schedule of the step: pass step= as well")
        mtp_weight = mtp_weight(step)
    value = jnp.asarray(mtp_weight, jnp.float32)
    if value.shape != ():
        raise ValueError(f"mtp_weight must be a scalar, got shape {value.shape}")
    return value


def _depth_weights(depth_weights: DepthWeights, num_depths: int) -> Array:
    weights = jnp.asarray(depth_weights, jnp.float32)
    if weights.shape != (num_depths,):
        raise ValueError(
            f"depth_weights must have shape ({num_depths},), one weight per MTP depth, "
            f"got {weights.shape}"
        )
    try:
        host = np.asarray(weights)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return weights  # traced values cannot be checked here
    if num_depths and (np.any(host < 0) or not np.sum(host) > 0):
        raise ValueError(
            "depth_weights must be non-negative with a positive sum, got "
            f"{host.tolist()}"
        )
    return weights


def reduce_losses(
    loss_sums: Float[Array, " depths_plus_one"],
    token_counts: Int[Array, " depths_plus_one"],
    *,
    mtp_weight: MTPWeight = 0.1,
    reduction: Reduction = "mean",
    depth_weights: DepthWeights | None = None,
    step: int | Int[ArrayLike, ""] | None = None,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Turn globally reduced per-depth sums and counts into the training loss.

    `L = S_0 / N_0 + λ · L_mtp`, with `L_mtp = (1/D) Σ_k S_k / N_k`
    (`reduction="mean"`, DeepSeek-V3) or `Σ_k S_k / Σ_k N_k` (`"pooled"`). Counts are
    clamped at 1, so a depth with no valid token contributes 0 and a zero gradient.

    With `depth_weights` `w_1 … w_D` (e.g. a geometric decay `0.5 ** k`) both become
    weighted means, so λ stays the total MTP weight and `w` may be scaled freely:

    - `"mean"`: `L_mtp = Σ_k w_k S_k / max(N_k, 1) / Σ_k w_k`;
    - `"pooled"`: `L_mtp = Σ_k w_k S_k / Σ_k w_k N_k` (a token of depth `k` counts
        `w_k` times; the denominator is taken as 1 when it is 0).

    Equal weights give the unweighted reductions.

    **Arguments:**

    - `loss_sums`, `token_counts`: `[D + 1]` sums and counts from
        [`eqx_mtp.mtp_loss_sums`][], reduced over every device and micro-batch.
    - `mtp_weight`: λ: a float, a scalar array, or a schedule `step -> λ` (e.g.
        [`eqx_mtp.parse_mtp_weight`][]'s or an optax schedule) evaluated at `step`.
    - `reduction`: `"mean"` or `"pooled"`.
    - `depth_weights`: optional `[D]` non-negative weights with a positive sum, one per
        depth; `None` weighs every depth equally.
    - `step`: the step at which a schedule `mtp_weight` is evaluated; required then,
        unused otherwise.

    **Returns:**

    `(loss, aux)`; `aux` holds `loss_sums`, `token_counts`, `depth_losses` (each
    depth's mean, index 0 the main objective), `main_loss` and `mtp_loss`.
    """
    shapes = Shapes("reduce_losses")
    shapes.check("loss_sums", loss_sums, "depths_plus_one")
    check_float("reduce_losses", "loss_sums", loss_sums)
    shapes.check("token_counts", token_counts, "depths_plus_one")
    check_ids("reduce_losses", "token_counts", token_counts)
    if loss_sums.shape[0] < 1:
        raise ValueError(
            "reduce_losses: loss_sums must hold at least the main objective's sum, "
            "got shape (0,)"
        )
    if reduction not in ("mean", "pooled"):
        raise ValueError(
            f"reduce_losses: reduction must be 'mean' or 'pooled', got {reduction!r}"
        )
    weight = resolve_mtp_weight(mtp_weight, step)
    counts = jnp.maximum(token_counts, 1).astype(jnp.float32)
    depth_losses = loss_sums / counts
    main_loss = depth_losses[0]
    num_depths = loss_sums.shape[0] - 1
    weights = None
    if depth_weights is not None:
        weights = _depth_weights(depth_weights, num_depths)
    if num_depths == 0:
        extra = jnp.zeros((), jnp.float32)
    elif weights is not None and reduction == "mean":
        extra = jnp.sum(weights * depth_losses[1:]) / jnp.sum(weights)
    elif weights is not None:
        pooled_count = jnp.sum(weights * token_counts[1:].astype(jnp.float32))
        pooled_count = jnp.where(pooled_count > 0, pooled_count, 1.0)
        extra = jnp.sum(weights * loss_sums[1:]) / pooled_count
    elif reduction == "mean":
        extra = jnp.mean(depth_losses[1:])
    else:
        pooled_count = jnp.maximum(jnp.sum(token_counts[1:]), 1).astype(jnp.float32)
        extra = jnp.sum(loss_sums[1:]) / pooled_count
    loss = main_loss + weight * extra
    aux = dict(
        loss_sums=loss_sums,
        token_counts=token_counts,
        depth_losses=depth_losses,
        main_loss=main_loss,
        mtp_loss=extra,
    )
    return loss, aux


def weighted_path_applies(config, mesh: Mesh | None) -> bool:
    """Whether a loss whose sums' cotangents are known takes the weighted form of
    `loss_sums_unchecked`: the fused loss on one device. Other losses keep no
    gradient-sized residuals to save, and over a mesh the vocabulary-parallel loss
    keeps its own."""
    return mesh is None and config.loss_impl == "fused"


def loss_coefficients(
    token_counts: Int[Array, " depths_plus_one"],
    *,
    mtp_weight: MTPWeight = 0.1,
    reduction: Reduction = "mean",
    depth_weights: DepthWeights | None = None,
    step: int | Int[ArrayLike, ""] | None = None,
) -> Float[Array, " depths_plus_one"]:
    """`c_k = ∂L/∂S_k` of [`eqx_mtp.reduce_losses`][] at these counts. The loss is
    linear in the sums once the counts are fixed, and the counts depend only on the
    batch (`valid_token_counts`), so the gradient of `L` is that of `Σ_k c_k S_k`
    with `c` known before the forward pass."""

    def loss(loss_sums):
        return reduce_losses(
            loss_sums,
            token_counts,
            mtp_weight=mtp_weight,
            reduction=reduction,
            depth_weights=depth_weights,
            step=step,
        )[0]

    return jax.grad(loss)(jnp.zeros(token_counts.shape, jnp.float32))


def weighted_loss_sums(
    model: MTPModel,
    tokens,
    *,
    sum_weights,
    segment_ids=None,
    positions=None,
    loss_mask=None,
    key=None,
):
    """`mtp_loss_sums` on one device in the weighted form of `loss_sums_unchecked`:
    `(weighted, loss_sums, token_counts)`, `weighted` equal to
    `Σ_k sum_weights[k] · loss_sums[k]` and carrying its gradient, `loss_sums` to be
    used as values. For when `weighted_path_applies`."""
    check_batch(
        model,
        tokens,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
    )
    return _loss_sums(
        model,
        tokens,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
        mesh=None,
        key=key,
        sum_weights=sum_weights,
    )


def mtp_loss(
    model: MTPModel,
    tokens: Int[Array, "batch seq"],
    *,
    segment_ids: Int[Array, "batch seq"] | None = None,
    positions: Int[Array, "batch seq"] | None = None,
    loss_mask: Bool[Array, "batch seq"] | None = None,
    mtp_weight: MTPWeight = 0.1,
    reduction: Reduction = "mean",
    depth_weights: DepthWeights | None = None,
    step: int | Int[ArrayLike, ""] | None = None,
    mesh: Mesh | None = None,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """The MTP training loss of one batch: main next-token loss plus `mtp_weight` times
    the MTP loss. A pure function of `(model, batch)`, differentiable w.r.t. `model`.

    **Arguments:**

    - `model`, `tokens`, `segment_ids`, `positions`, `loss_mask`, `mesh`, `key`: see
        [`eqx_mtp.mtp_loss_sums`][] (`key=None`: deterministic).
    - `mtp_weight`: λ: a float, a scalar array, or a schedule of `step`.
    - `reduction`, `depth_weights`, `step`: see [`eqx_mtp.reduce_losses`][].

    **Returns:**

    `(loss, aux)` as [`eqx_mtp.reduce_losses`][] returns them.

    **Memory.** With the fused loss on one device the gradient is taken as that of
    `Σ_k c_k S_k`, with `c_k = ∂L/∂S_k` known from the batch's token counts before
    the forward pass: the unembedding's gradient is accumulated there in one
    `[vocab, dim]` float32 buffer for the main head and every depth, and the loss
    keeps no such buffer per depth for the backward pass. (Not differentiated, the
    unused gradient is left out of the compiled program.)
    """
    check_batch(
        model,
        tokens,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
        mesh=mesh,
    )
    reduce_kwargs = dict(
        mtp_weight=mtp_weight,
        reduction=reduction,
        depth_weights=depth_weights,
        step=step,
    )
    if weighted_path_applies(model.config, mesh):
        counts = valid_token_counts(
            tokens,
            model.config.num_depths,
            segment_ids=segment_ids,
            loss_mask=loss_mask,
        )
        weighted, loss_sums, token_counts = _loss_sums(
            model,
            tokens,
            segment_ids=segment_ids,
            positions=positions,
            loss_mask=loss_mask,
            mesh=None,
            key=key,
            sum_weights=loss_coefficients(counts, **reduce_kwargs),
        )
        loss, aux = reduce_losses(
            jax.lax.stop_gradient(loss_sums), token_counts, **reduce_kwargs
        )
        # The value is reduce_losses', the gradient the weighted sum's (the same
        # function of the parameters at these counts).
        return loss + (weighted - jax.lax.stop_gradient(weighted)), aux
    loss_sums, token_counts = _loss_sums(
        model,
        tokens,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
        mesh=mesh,
        key=key,
    )
    return reduce_losses(loss_sums, token_counts, **reduce_kwargs)
