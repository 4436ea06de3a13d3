"""The MTP depths on any trunk: one `jax.lax.scan` over the stacked depths, and the
depths' losses read out of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._batch import PackedBatch, given_batch
from ._checks import (
    Shapes,
    check_choice,
    check_chunk_size,
    check_final_norm,
    check_float,
    check_ids,
    check_token_arrays,
)
from ._config import LOSS_IMPLS
from ._depths import (
    LayerFactory as LayerFactory,
    LinearBlock as LinearBlock,
    MLPBlock as MLPBlock,
    MTPDepth as MTPDepth,
    MTPDepths as MTPDepths,
    call_block as call_block,
    depths_dim,
)
from ._fused_ce import DEFAULT_CHUNK_SIZE
from ._head import Head
from ._mesh import map_rows, tracing_on
from ._precision import in_compute_dtype
from ._transformer import remat


def checked_inputs(
    fn: str,
    depths,
    hidden,
    tokens,
    rows: dict,
    head: dict,
    depths_optional: bool = False,
) -> tuple[PackedBatch, Head]:
    """Check the arguments of `scan_depths`, `mtp_depth_losses` and
    `mtp_loss_sums_from_hidden` (`depths_optional`: `None` is allowed), in signature
    order, and build their records once.

    `rows` holds the batch's optional arrays as given (`segment_ids`, `positions`,
    `loss_mask`), `head` the keyword arguments of `Head`; `tokens` may be a
    `PackedBatch`, whose arrays were checked when it was built."""
    batch = given_batch(fn, tokens, **rows)
    if not (isinstance(depths, MTPDepths) or (depths_optional and depths is None)):
        expected = "an eqx_mtp.MTPDepths" + (" or None" if depths_optional else "")
        raise TypeError(f"{fn}: depths must be {expected}, got {type(depths).__name__}")
    shapes = Shapes(fn)
    dim = None if depths is None else depths_dim(depths)
    if dim is not None:
        shapes.bind("dim", dim, "depths")
    shapes.check("hidden", hidden, "batch seq dim")
    check_float(fn, "hidden", hidden)
    token_ids = tokens if batch is None else batch.tokens
    shapes.check("tokens", token_ids, "batch seq")
    check_ids(fn, "tokens", token_ids)
    for name in ("embedding", "unembedding"):
        if head.get(name) is not None:
            shapes.check(name, head[name], "vocab dim")
            check_float(fn, name, head[name])
    final_norm = check_final_norm(
        fn, head["final_norm"], hidden.shape[-1], hidden.dtype
    )
    if batch is None:
        check_token_arrays(shapes, **rows)
    vocab_size = head["embedding"].shape[0]
    check_ids(fn, "tokens", token_ids, vocab_size=vocab_size, vocab_of="embedding")
    if "impl" in head:
        check_chunk_size(fn, "loss_chunk_size", head["chunk_size"])
        check_choice(fn, "loss_impl", head["impl"], LOSS_IMPLS)
    if batch is None:
        batch = PackedBatch.unchecked(tokens, **rows)
    return batch, Head(**{**head, "final_norm": final_norm})


def scan_depths(
    depths: MTPDepths,
    hidden: Float[Array, "batch seq dim"],
    tokens: Int[Array, "batch seq"] | PackedBatch,
    *,
    embedding: Float[Array, "vocab dim"],
    final_norm: Callable[[Array], Array],
    readout: Callable[[Int[Array, ""], Float[Array, "batch seq dim"]], Any],
    segment_ids: Int[Array, "batch seq"] | None = None,
    positions: Int[Array, "batch seq"] | None = None,
    key: PRNGKeyArray | None = None,
) -> Any:
    """Run every depth in one `jax.lax.scan` and stack what `readout` returns per depth.

    At depth `k` (1-based) the body builds `h^k` from `h^{k-1}` (sequential) or `h⁰`
    (parallel), applies the depth's own final norm (or `final_norm`), and calls
    `readout(k, normed_hidden)`; only that depth's readout inputs are alive at once.
    The depths compute in `hidden`'s dtype (see [`eqx_mtp.MTPDepths`][]).

    **Arguments:**

    - `depths`: the stacked depths.
    - `hidden`: `[batch, seq, dim]` trunk output `h⁰`, before its final norm.
    - `tokens`: `[batch, seq]` token ids, or a [`eqx_mtp.PackedBatch`][] (then
        without `segment_ids` and `positions`).
    - `embedding`: the shared `[vocab, dim]` token embedding.
    - `final_norm`: the trunk's final norm, used by depths without their own: a
        per-vector norm such as `eqx.nn.RMSNorm(dim)` or `eqx.nn.LayerNorm(dim)`
        (`[dim] -> [dim]`, applied with `jax.vmap` over batch and sequence), or a norm
        over the last axis of `[batch, seq, dim]` arrays such as
        [`eqx_mtp.nn.RMSNorm`][].
    - `readout`: `(depth, normed_hidden) -> pytree of arrays`.
    - `segment_ids`, `positions`: as for the trunk; derived when absent. A document
        is a maximal run of one non-zero id; the blocks get the runs numbered by
        [`eqx_mtp.document_ids`][], so they may compare ids by equality.
    - `key`: optional PRNG key for the depths' layers (e.g. dropout), split per depth
        and per row; `None` calls the layers without a key (deterministic).

    **Returns:**

    `readout`'s outputs stacked along a new leading depth axis of size `num_depths`.
    """
    batch, head = checked_inputs(
        "scan_depths",
        depths,
        hidden,
        tokens,
        dict(segment_ids=segment_ids, positions=positions),
        dict(embedding=embedding, unembedding=None, final_norm=final_norm),
    )
    if not callable(readout):
        raise TypeError(
            f"scan_depths: readout must be callable, got {type(readout).__name__}"
        )
    return run_depth_scan(depths, hidden, batch, head, readout, key)


def run_depth_scan(depths, hidden, batch, head, readout, key=None, readout_init=None):
    """`scan_depths` on checked records: `head` gives the embedding and the final
    norm (acting on `[batch, seq, dim]` arrays).

    With `readout_init` the readout also threads a carry through the depths:
    `readout(k, normed, carry) -> (carry, output)`, and the result is
    `(final_carry, stacked_outputs)`."""
    # The scan's carry is `hidden`'s dtype: the depths compute in it.
    dtype = hidden.dtype
    dynamic, static = eqx.partition(
        in_compute_dtype(depths.depths, dtype), eqx.is_array
    )
    shared_layer = in_compute_dtype(depths.shared_layer, dtype)
    sequential = depths.kind == "sequential"
    num_rows = hidden.shape[0]
    trunk_state = hidden
    if depths.trunk_input == "after_norm":
        trunk_state = head.final_norm(hidden).astype(dtype)
    carry_normed = depths.previous_input == "after_norm"

    def advance(previous, xs):
        """`h^k` and its final-normed copy."""
        depth_params, k, depth_key = xs
        depth = eqx.combine(depth_params, static)
        source = previous if sequential else trunk_state
        if sequential:
            ahead = batch.shifted(batch.tokens, -k)
            next_embeddings = head.lookup(ahead).astype(dtype)
        else:
            next_embeddings = None
        # Modules act on one example: one key per row, as for any vmapped module.
        row_keys = None if depth_key is None else jax.random.split(depth_key, num_rows)

        def one_row(h, e, p, s, row_key):
            return depth(
                h, e, positions=p, segment_ids=s, layer=shared_layer, key=row_key
            )

        h_k = map_rows(one_row)(
            source, next_embeddings, batch.positions, batch.documents, row_keys
        )
        # A user's layer may return another dtype (e.g. float32 from a float32
        # constant); the carry must not change type.
        h_k = h_k.astype(dtype)
        norm = head.final_norm if depth.norm is None else depth.norm
        return h_k, norm(h_k)

    # Only the depth is rematerialised, never its readout: under "save_dots" a
    # chunked loss would keep every chunk of its logits (one [tokens, vocab] array per
    # depth), and under "full" the fused loss would run its three vocabulary matmuls
    # again in the backward pass. Outside the checkpoint the readout keeps its own
    # residuals: the fused loss's gradients (only the hidden one when the readout
    # carries the unembedding's in `readout_init`), or the chunked loss's normed
    # hidden.
    advance_step = remat(advance, depths.remat_policy)

    def body(carry, xs):
        previous, readout_carry = carry
        h_k, normed = advance_step(previous, xs)
        passed_on = normed if carry_normed else h_k
        if readout_init is None:
            return (passed_on, None), readout(xs[1], normed)
        readout_carry, output = readout(xs[1], normed, readout_carry)
        return (passed_on, readout_carry), output

    depth_numbers = jnp.arange(1, depths.num_depths + 1, dtype=jnp.int32)
    depth_keys = None if key is None else jax.random.split(key, depths.num_depths)
    (_, readout_carry), outputs = jax.lax.scan(
        body, (trunk_state, readout_init), (dynamic, depth_numbers, depth_keys)
    )
    return outputs if readout_init is None else (readout_carry, outputs)


def mtp_depth_losses(
    depths: MTPDepths,
    hidden: Float[Array, "batch seq dim"],
    tokens: Int[Array, "batch seq"] | PackedBatch,
    *,
    embedding: Float[Array, "vocab dim"],
    unembedding: Float[Array, "vocab dim"],
    final_norm: Callable[[Array], Array],
    segment_ids: Int[Array, "batch seq"] | None = None,
    positions: Int[Array, "batch seq"] | None = None,
    loss_mask: Bool[Array, "batch seq"] | None = None,
    loss_chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    loss_impl: str = "fused",
    mesh: Mesh | None = None,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, " depths"], Int[Array, " depths"]]:
    """Per-depth cross-entropy sums and token counts of MTP depths on any trunk.

    [`eqx_mtp.mtp_loss_sums_from_hidden`][] adds the main (next-token) objective to
    these sums; this function gives the depths' alone.

    **Arguments:**

    - `depths`: the stacked [`eqx_mtp.MTPDepths`][].
    - `hidden`: `[batch, seq, dim]` trunk output `h⁰`, before the final norm.
    - `tokens`: `[batch, seq]` token ids, or a [`eqx_mtp.PackedBatch`][] (then
        without `segment_ids`, `positions` and `loss_mask`).
    - `embedding`: shared `[vocab, dim]` token embedding.
    - `unembedding`: shared `[vocab, dim]` output matrix (logits = `h @ unembedding.T`).
    - `final_norm`: the trunk's final norm, per-vector or over the last axis (see
        [`eqx_mtp.scan_depths`][]).
    - `segment_ids`, `positions`, `loss_mask`: see [`eqx_mtp.depth_targets`][].
    - `loss_chunk_size`, `loss_impl`: `chunk_size` and `impl` of
        [`eqx_mtp.head_loss_sum`][].
    - `mesh`: a mesh from [`eqx_mtp.make_mesh`][]: each depth's cross-entropy then
        runs vocabulary-parallel under `jax.shard_map`
        ([`eqx_mtp.vocab_parallel_loss_sum`][]); `None` runs on one device.
    - `key`: optional PRNG key for the depths' layers (e.g. dropout), split per depth
        and per row; `None` (the default) is deterministic. See
        [`eqx_mtp.MTPDepths`][].

    The depths compute in `hidden`'s dtype, e.g. bfloat16 from a bfloat16 trunk with
    float32 depth parameters; the logits, losses and sums are float32.

    **Returns:**

    `(loss_sums, token_counts)`, each of shape `[num_depths]`; entry `k - 1` belongs to
    depth `k`, which predicts `t_{i+k+1}`. Nothing is divided: reduce them globally.

    **Raises:**

    `TypeError`/`ValueError` naming the argument when shapes disagree, ids are not
    integers, `loss_mask` is not boolean (an integer mask, e.g. MaxText's target mask
    of segment ids, is refused: pass `loss_mask != 0`), a token id of a concrete
    `tokens` lies outside the vocabulary, or `final_norm` maps neither a `[dim]` nor
    a `[batch, seq, dim]` array to one of its own shape.
    """
    batch, head = checked_inputs(
        "mtp_depth_losses",
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
    )
    return depth_loss_sums(depths, hidden, batch, head, key)


def depth_loss_sums(
    depths, hidden, batch, head, key=None, sum_weights=None, unembedding_grad=None
):
    """`mtp_depth_losses` on checked records.

    With `sum_weights` (`[num_depths]`, the known cotangents of the depths' sums; the
    fused loss on one device only) and `unembedding_grad` (a float32 `[vocab, dim]`
    accumulator), returns `(loss_sums, token_counts, unembedding_grad)`: each depth
    adds `sum_weights[k - 1] · ∂S_k/∂unembedding` into the accumulator in the forward
    pass, and its sum is differentiable w.r.t. its hidden states only (see
    `Head.loss_sum`)."""
    if sum_weights is None:
        with tracing_on(head.mesh):
            return run_depth_scan(
                depths,
                hidden,
                batch,
                head,
                lambda k, normed: head.loss_sum(normed, batch, k),
                key,
            )

    def weighted_readout(k, normed, accumulated):
        total, count, grad = head.loss_sum(normed, batch, k, sum_weights[k - 1])
        # Not differentiated: the carry holds one accumulator, not one per depth.
        return jax.lax.stop_gradient(accumulated + grad), (total, count)

    unembedding_grad, (loss_sums, token_counts) = run_depth_scan(
        depths,
        hidden,
        batch,
        head,
        weighted_readout,
        key,
        jax.lax.stop_gradient(unembedding_grad),
    )
    return loss_sums, token_counts, unembedding_grad
