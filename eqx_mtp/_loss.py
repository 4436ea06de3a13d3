"""The MTP training objective as pure functions of (model, batch)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from ._batch import PackedBatch, check_rows, given_batch
from ._checks import check_final_norm
from ._fused_ce import DEFAULT_CHUNK_SIZE
from ._head import Head
from ._mesh import (
    batch_sharding,
    check_batch_fits_mesh,
    check_mesh,
    map_rows,
    tracing_on,
)
from ._model import MTPModel
from ._mtp import MTPDepths, checked_inputs, depth_loss_sums
from ._objective import (
    DepthWeights,
    Objective,
    Reduction,
    reduce_losses as reduce_losses,
    resolve_mtp_weight as resolve_mtp_weight,
)
from ._precision import in_compute_dtype
from ._schedule import MTPWeight


def check_batch(
    model: MTPModel,
    tokens,
    *,
    segment_ids=None,
    positions=None,
    loss_mask=None,
    mesh=None,
) -> None:
    """Raise a `ValueError`/`TypeError` naming the argument when a batch is not one
    (see `PackedBatch.of`; `tokens` may be a `PackedBatch`, checked already) or does
    not fit `model` (the sequence length against the depths and `max_seq_len`) or
    `mesh` (rows over `data`, the sequence over `context`)."""
    if not isinstance(model, MTPModel):
        raise TypeError(f"model must be an eqx_mtp.MTPModel, got {type(model)}")
    # Messages without the function's name: mtp_loss and mtp_loss_sums share them.
    batch = given_batch(
        None, tokens, segment_ids=segment_ids, positions=positions, loss_mask=loss_mask
    )
    if batch is None:
        check_rows(tokens, segment_ids=segment_ids, positions=positions, mask=loss_mask)
    config = model.config
    seq_len = tokens.shape[-1]
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
    if mesh is not None:
        check_mesh(mesh)
        check_batch_fits_mesh(mesh, tokens.shape, name="tokens")


def model_batch(
    model: MTPModel, tokens, *, segment_ids, positions, loss_mask, mesh
) -> PackedBatch:
    """`check_batch`, then the batch's record (`tokens` itself when it is one)."""
    rows = dict(segment_ids=segment_ids, positions=positions, loss_mask=loss_mask)
    check_batch(model, tokens, mesh=mesh, **rows)
    if isinstance(tokens, PackedBatch):
        return tokens
    return PackedBatch.unchecked(tokens, **rows)


def mtp_loss_sums(
    model: MTPModel,
    tokens: Int[Array, "batch seq"] | PackedBatch,
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
    - `tokens`: `[batch, seq]` integer token ids in `[0, vocab_size)`, or a
        [`eqx_mtp.PackedBatch`][] (then without `segment_ids`, `positions` and
        `loss_mask`, which it holds).
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
        ([`eqx_mtp.vocab_parallel_loss_sum`][]). The embedding lookups and the heads
        read one copy of the embedding per (`data`, `context`) shard, so its
        gradient is reduced over the devices once, not once per lookup and per head.
        Targets and their validity are computed on the whole row, so a document that
        straddles a `context` shard boundary trains at every depth as on one device.
        The results equal the single-device ones. `None`: one device.
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
    batch = model_batch(
        model,
        tokens,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
        mesh=mesh,
    )
    return model_loss_sums(model, batch, mesh, key)


def model_loss_sums(model, batch, mesh, key=None, sum_weights=None):
    """`mtp_loss_sums` on a checked batch; with `sum_weights`, the weighted form of
    `loss_sums_of_hidden`."""
    vocab_size = model.config.vocab_size
    # The check runs on a scalar that the tokens then depend on, so that a sharded
    # batch stays sharded (a checked array would be gathered onto one device).
    in_range = eqx.error_if(
        jnp.zeros((), batch.tokens.dtype),
        jnp.any((batch.tokens < 0) | (batch.tokens >= vocab_size)),
        f"tokens: every id must lie in [0, vocab_size={vocab_size})",
    )
    batch = eqx.tree_at(lambda b: b.tokens, batch, batch.tokens + in_range)
    if mesh is not None:
        batch = batch.constrained(batch_sharding(mesh))

    trunk = model.trunk
    if model.config.train_depths_only:
        # The shared embedding, unembedding and final norm are the trunk's too: the
        # depths train against a frozen trunk.
        trunk_arrays, trunk_static = eqx.partition(trunk, eqx.is_array)
        trunk = eqx.combine(jax.lax.stop_gradient(trunk_arrays), trunk_static)
    # The depths follow the trunk's output dtype (see `scan_depths`).
    config = model.config
    trunk = in_compute_dtype(trunk, config.compute_dtype)
    head = Head(
        trunk.embedding,
        trunk.unembedding_matrix,
        trunk.final_norm,
        chunk_size=config.loss_chunk_size,
        impl=config.loss_impl,
        mesh=mesh,
    )
    if mesh is None:
        hidden = map_rows(lambda t, p, s: trunk(t, positions=p, segment_ids=s))(
            batch.tokens, batch.positions, batch.documents
        )
    else:
        # The trunk, the sequential depths and the heads all read the head's one
        # per-token-shard copy of the embedding, so its gradient is reduced once.
        head = head.with_copies()
        embedded = head.lookup(batch.tokens)
        with tracing_on(mesh):
            hidden = map_rows(
                lambda t, p, s, e: trunk(t, positions=p, segment_ids=s, embeddings=e)
            )(batch.tokens, batch.positions, batch.documents, embedded)
    # Resolved as any trunk's final norm is, so that both paths run the same program.
    final_norm = check_final_norm(None, trunk.final_norm, config.dim, hidden.dtype)
    head = dataclasses.replace(head, final_norm=final_norm)
    return loss_sums_of_hidden(hidden, batch, head, model.depths, key, sum_weights)


def mtp_loss_sums_from_hidden(
    hidden: Float[Array, "batch seq dim"],
    tokens: Int[Array, "batch seq"] | PackedBatch,
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
    - `tokens`: `[batch, seq]` integer token ids in `[0, vocab)`, or a
        [`eqx_mtp.PackedBatch`][] (then without `segment_ids`, `positions` and
        `loss_mask`).
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
    batch, head = checked_inputs(
        fn,
        depths,
        hidden,
        tokens,
        dict(segment_ids=segment_ids, positions=positions, loss_mask=loss_mask),
        dict(
            embedding=embedding,
            unembedding=unembedding,
            final_norm=final_norm,
            chunk_size=loss_chunk_size,
            impl=loss_impl,
            mesh=mesh,
        ),
        depths_optional=True,
    )
    if mesh is not None:
        try:
            check_mesh(mesh)
            check_batch_fits_mesh(mesh, batch.shape, name="tokens")
        except (TypeError, ValueError) as error:
            raise type(error)(f"{fn}: {error}") from None
    return loss_sums_of_hidden(hidden, batch, head, depths, key)


def loss_sums_of_hidden(hidden, batch, head, depths, key=None, sum_weights=None):
    """`mtp_loss_sums_from_hidden` on checked records: the one code path of the
    objective, which `mtp_loss_sums` calls on its trunk's output.

    With `sum_weights` (`[num_depths + 1]`, the cotangents `c_k` of the sums, known
    in advance; `weighted_path_applies` says when this is allowed) it returns
    `(weighted, loss_sums, token_counts)`, where `weighted` equals `Σ_k c_k S_k` and
    has its gradient. Each head adds `c_k · ∂S_k/∂unembedding` into one float32
    `[vocab, dim]` accumulator in its forward pass, which `Head.inject` hands to
    the unembedding in the backward pass; so differentiation keeps no unembedding
    gradient per depth. `loss_sums` are then differentiable w.r.t. the hidden states
    only: use them as values."""
    hidden, batch, head = head.placed(hidden, batch)
    weighted = sum_weights is not None
    if weighted:
        sum_weights = jax.lax.stop_gradient(sum_weights)
    main_sum, main_count, *accumulated = head.loss_sum(
        head.final_norm(hidden), batch, 0, sum_weights[0] if weighted else None
    )
    loss_sums, token_counts = main_sum[None], main_count[None]
    if depths is not None:
        depth_sums, depth_counts, *accumulated = depth_loss_sums(
            depths,
            hidden,
            batch,
            head,
            key,
            sum_weights[1:] if weighted else None,
            *accumulated,
        )
        loss_sums = jnp.concatenate([loss_sums, depth_sums])
        token_counts = jnp.concatenate([token_counts, depth_counts])
    if not weighted:
        return loss_sums, token_counts
    total = jnp.dot(sum_weights, loss_sums) + head.inject(*accumulated)
    return total, loss_sums, token_counts


def weighted_path_applies(config, mesh: Mesh | None) -> bool:
    """Whether a loss whose sums' cotangents are known takes the weighted form of
    `loss_sums_of_hidden`: the fused loss on one device. Other losses keep no
    gradient-sized residuals to save, and over a mesh the vocabulary-parallel loss
    keeps its own."""
    return mesh is None and config.loss_impl == "fused"


def mtp_loss(
    model: MTPModel,
    tokens: Int[Array, "batch seq"] | PackedBatch,
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
    batch = model_batch(
        model,
        tokens,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
        mesh=mesh,
    )
    objective = Objective(mtp_weight, reduction, depth_weights)
    return objective_loss(model, batch, objective, step, mesh, key)


def objective_loss(model, batch, objective, step=None, mesh=None, key=None):
    """`mtp_loss` on checked records."""
    if not weighted_path_applies(model.config, mesh):
        loss_sums, token_counts = model_loss_sums(model, batch, mesh, key)
        return objective.reduce(loss_sums, token_counts, step)
    counts = batch.valid_token_counts(model.config.num_depths)
    weighted, loss_sums, token_counts = model_loss_sums(
        model, batch, None, key, objective.coefficients(counts, step)
    )
    loss, aux = objective.reduce(jax.lax.stop_gradient(loss_sums), token_counts, step)
    # The value is reduce_losses', the gradient the weighted sum's (the same function
    # of the parameters at these counts).
    return loss + (weighted - jax.lax.stop_gradient(weighted)), aux
