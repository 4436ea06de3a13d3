"""The MTP depths: one stacked module run by one `jax.lax.scan`, on any trunk."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._checks import (
    Shapes,
    check_choice,
    check_chunk_size,
    check_final_norm,
    check_float,
    check_ids,
    check_token_arrays,
)
from ._config import LOSS_IMPLS, MTPKind, RematPolicy
from ._cross_entropy import rows_weighted_loss_sum
from ._documents import number_documents
from ._fused_ce import DEFAULT_CHUNK_SIZE
from ._mesh import map_rows, tracing_on
from ._precision import in_compute_dtype
from ._roll import shift_within_documents
from ._targets import segment_positions, targets_of_depth
from ._transformer import (
    RMSNorm,
    SwiGLU,
    dense,
    remat,
    stack_modules,
    unstack_module,
)
from ._vocab_parallel import rows_head_loss_sum

LayerFactory = Callable[[PRNGKeyArray], eqx.Module]


class MLPBlock(eqx.Module):
    """`x + SwiGLU(norm(x))`: the trunk block without attention, with its call
    signature (positions, segment ids and `key` are accepted and unused)."""

    norm: RMSNorm
    mlp: SwiGLU

    def __init__(self, dim: int, hidden_dim: int, *, eps: float = 1e-6, key):
        self.norm = RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, hidden_dim, key=key)

    def __call__(self, x, *, positions=None, segment_ids=None, key=None):
        del key  # deterministic
        return x + self.mlp(self.norm(x))


class LinearBlock(eqx.Module):
    """`x + W x`: the smallest layer with the trunk block's call signature (`key` is
    accepted and unused)."""

    proj: eqx.nn.Linear

    def __init__(self, dim: int, *, key):
        self.proj = eqx.nn.Linear(dim, dim, use_bias=False, key=key)

    def __call__(self, x, *, positions=None, segment_ids=None, key=None):
        del key  # deterministic
        return x + dense(self.proj, x)


def call_block(block, x, *, positions, segment_ids, key=None):
    """`block(x, *, positions, segment_ids, key)`, with `key` left out when it is
    `None`, so that a block written without a `key` parameter runs deterministically
    wherever no key is given."""
    if key is None:
        return block(x, positions=positions, segment_ids=segment_ids)
    return block(x, positions=positions, segment_ids=segment_ids, key=key)


class MTPDepth(eqx.Module):
    """One MTP depth, with the field names of DeepSeek-V3's released MTP weights.

    Sequential: `layer(eh_proj([enorm(E[t_{i+k}]) ; hnorm(h^{k-1}_i)]))`.
    Parallel: `layer(h⁰_i)` (`enorm`, `hnorm` and `eh_proj` are `None`).
    `layer` is `None` when the depths share one layer; `norm` is the depth's own final
    norm (`shared_head.norm`), or `None` to use the trunk's.
    """

    enorm: RMSNorm | None
    hnorm: RMSNorm | None
    eh_proj: eqx.nn.Linear | None
    layer: eqx.Module | None
    norm: RMSNorm | None

    def __init__(
        self,
        dim: int,
        *,
        make_layer: LayerFactory | None,
        kind: MTPKind = "sequential",
        depth_final_norm: bool = False,
        norm_eps: float = 1e-6,
        key: PRNGKeyArray,
    ):
        proj_key, layer_key = jax.random.split(key)
        if kind == "sequential":
            self.enorm = RMSNorm(dim, eps=norm_eps)
            self.hnorm = RMSNorm(dim, eps=norm_eps)
            # [out, in] = [dim, 2·dim], the layout of DeepSeek-V3's eh_proj.weight.
            self.eh_proj = eqx.nn.Linear(2 * dim, dim, use_bias=False, key=proj_key)
        else:
            self.enorm = self.hnorm = self.eh_proj = None
        self.layer = None if make_layer is None else make_layer(layer_key)
        self.norm = RMSNorm(dim, eps=norm_eps) if depth_final_norm else None

    def __call__(
        self,
        hidden: Float[Array, "seq dim"],
        next_embeddings: Float[Array, "seq dim"] | None,
        *,
        positions: Int[Array, " seq"],
        segment_ids: Int[Array, " seq"],
        layer: eqx.Module | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq dim"]:
        """This depth's hidden state from the previous depth's (or, parallel, the
        trunk's) and the embeddings of the tokens `k` places ahead. `key` goes to the
        layer, and only when it is not `None` (see [`eqx_mtp.MTPDepths`][])."""
        layer = self.layer if layer is None else layer
        x = self.layer_input(hidden, next_embeddings)
        return call_block(
            layer, x, positions=positions, segment_ids=segment_ids, key=key
        )

    def layer_input(
        self,
        hidden: Float[Array, "seq dim"],
        next_embeddings: Float[Array, "seq dim"] | None,
    ) -> Float[Array, "seq dim"]:
        """What the depth's layer reads: `eh_proj([enorm(e) ; hnorm(h)])`
        (sequential), or `hidden` itself (parallel)."""
        if self.eh_proj is None:
            return hidden
        assert self.enorm is not None and self.hnorm is not None
        assert next_embeddings is not None
        combined = jnp.concatenate(
            [self.enorm(next_embeddings), self.hnorm(hidden)], axis=-1
        )
        return dense(self.eh_proj, combined)


class MTPDepths(eqx.Module):
    """`num_depths` MTP depths stored as one [`eqx_mtp.MTPDepth`][] whose array leaves
    have a leading depth axis, run by one `jax.lax.scan`.

    **Arguments:**

    - `num_depths`: number of depths `D >= 1`.
    - `dim`: width of the hidden states.
    - `make_layer`: `key -> module`, the block each depth runs; any Equinox module
        with the call signature `block(x [seq, dim], *, positions, segment_ids,
        key=None)` on one example (see [`eqx_mtp.nn.TransformerBlock`][]). The `key` is
        optional: a block without that parameter runs wherever no key is given.
    - `kind`: `"sequential"` (DeepSeek-V3) or `"parallel"` (Gloeckle et al.).
    - `shared_layer`: one layer, built once, reused at every depth.
    - `depth_final_norm`: give each depth its own final norm.
    - `norm_eps`: epsilon of the depth norms.
    - `remat`: rematerialisation policy of the depth scan: each depth is recomputed
        in the backward pass as the policy says; its readout (the loss) never is.
    - `key`: PRNG key.

    **Randomness.** [`eqx_mtp.scan_depths`][], [`eqx_mtp.mtp_depth_losses`][] and
    [`eqx_mtp.mtp_loss`][] take an optional `key`. Given one, it is split into one key
    per depth (carried through the scan, so it works under every `remat` policy: the
    backward pass recomputes a depth with the same key) and each depth's key into one
    per row of the batch; the layer receives `key=` for its row. `key=None` (the
    default) calls the layer without a `key` argument: deterministic, and the
    contract of blocks written without one.

    **Dtypes.** The depths compute in the dtype of the trunk output `hidden` they are
    given: their floating-point parameters (norm scales excepted) and the looked-up
    embeddings are cast to it once per call, and each depth's output is kept in it, so
    a bfloat16 trunk works with float32 depths (gradients come back float32).
    """

    depths: MTPDepth
    shared_layer: eqx.Module | None
    num_depths: int = eqx.field(static=True)
    kind: MTPKind = eqx.field(static=True)
    remat_policy: RematPolicy = eqx.field(static=True)

    def __init__(
        self,
        num_depths: int,
        dim: int,
        *,
        make_layer: LayerFactory,
        kind: MTPKind = "sequential",
        shared_layer: bool = False,
        depth_final_norm: bool = False,
        norm_eps: float = 1e-6,
        remat: RematPolicy = "none",
        key: PRNGKeyArray,
    ):
        if not isinstance(num_depths, int) or num_depths < 1:
            raise ValueError(f"MTPDepths: num_depths must be >= 1, got {num_depths!r}")
        if kind not in ("sequential", "parallel"):
            raise ValueError(
                f"MTPDepths: kind must be 'sequential' or 'parallel', got {kind!r}"
            )
        depths_key, layer_key = jax.random.split(key)
        self.depths = stack_modules(
            lambda k: MTPDepth(
                dim,
                make_layer=None if shared_layer else make_layer,
                kind=kind,
                depth_final_norm=depth_final_norm,
                norm_eps=norm_eps,
                key=k,
            ),
            num_depths,
            key=depths_key,
        )
        self.shared_layer = make_layer(layer_key) if shared_layer else None
        self.num_depths = num_depths
        self.kind = kind
        self.remat_policy = remat

    def depth(self, index: int) -> MTPDepth:
        """Depth `index + 1` as an ordinary (unstacked) module; its `layer` is the
        shared layer when the depths share one."""
        depth = unstack_module(self.depths, index)
        if self.shared_layer is not None:
            depth = eqx.tree_at(
                lambda d: d.layer, depth, self.shared_layer, is_leaf=lambda x: x is None
            )
        return depth


def _depths_dim(depths: MTPDepths) -> int | None:
    """The width of the depths' hidden states, read from a norm's scale; `None` when
    they have no norm (parallel depths without their own final norm)."""
    for norm in (depths.depths.hnorm, depths.depths.enorm, depths.depths.norm):
        if norm is not None:
            return norm.weight.shape[-1]
    return None


def _check_depth_inputs(
    fn: str,
    depths,
    hidden,
    tokens,
    *,
    embedding,
    final_norm,
    segment_ids,
    positions,
    unembedding=None,
    loss_mask=None,
    depths_optional: bool = False,
) -> Callable[[Array], Array]:
    """The arguments of `scan_depths`, `mtp_depth_losses` and
    `mtp_loss_sums_from_hidden` (`depths_optional`: `None` is allowed), in signature
    order. Returns `final_norm` as a function of `[batch, seq, dim]` arrays
    (`check_final_norm`)."""
    if not (isinstance(depths, MTPDepths) or (depths_optional and depths is None)):
        expected = "an eqx_mtp.MTPDepths" + (" or None" if depths_optional else "")
        raise TypeError(f"{fn}: depths must be {expected}, got {type(depths).__name__}")
    shapes = Shapes(fn)
    dim = None if depths is None else _depths_dim(depths)
    if dim is not None:
        shapes.bind("dim", dim, "depths")
    shapes.check("hidden", hidden, "batch seq dim")
    check_float(fn, "hidden", hidden)
    shapes.check("tokens", tokens, "batch seq")
    check_ids(fn, "tokens", tokens)
    shapes.check("embedding", embedding, "vocab dim")
    check_float(fn, "embedding", embedding)
    if unembedding is not None:
        shapes.check("unembedding", unembedding, "vocab dim")
        check_float(fn, "unembedding", unembedding)
    batched_norm = check_final_norm(fn, final_norm, hidden.shape[-1], hidden.dtype)
    check_token_arrays(
        shapes, segment_ids=segment_ids, positions=positions, loss_mask=loss_mask
    )
    check_ids(fn, "tokens", tokens, vocab_size=embedding.shape[0], vocab_of="embedding")
    return batched_norm


def _batched_row_defaults(tokens, segment_ids, positions):
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    # On whole rows, before the depths' blocks compare ids by equality.
    segment_ids = number_documents(segment_ids)
    if positions is None:
        positions = segment_positions(segment_ids)
    return segment_ids, positions


def scan_depths(
    depths: MTPDepths,
    hidden: Float[Array, "batch seq dim"],
    tokens: Int[Array, "batch seq"],
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
    - `tokens`: `[batch, seq]` token ids.
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
    final_norm = _check_depth_inputs(
        "scan_depths",
        depths,
        hidden,
        tokens,
        embedding=embedding,
        final_norm=final_norm,
        segment_ids=segment_ids,
        positions=positions,
    )
    if not callable(readout):
        raise TypeError(
            f"scan_depths: readout must be callable, got {type(readout).__name__}"
        )
    return _scan_depths(
        depths,
        hidden,
        tokens,
        embedding=embedding,
        final_norm=final_norm,
        readout=readout,
        segment_ids=segment_ids,
        positions=positions,
        key=key,
    )


def _scan_depths(
    depths,
    hidden,
    tokens,
    *,
    embedding,
    final_norm,
    readout,
    segment_ids,
    positions,
    key=None,
    readout_init=None,
):
    """`scan_depths` without its input checks.

    With `readout_init` the readout also threads a carry through the depths:
    `readout(k, normed, carry) -> (carry, output)`, and the result is
    `(final_carry, stacked_outputs)`."""
    segment_ids, positions = _batched_row_defaults(tokens, segment_ids, positions)
    # The scan's carry is `hidden`'s dtype: the depths compute in it.
    dtype = hidden.dtype
    dynamic, static = eqx.partition(
        in_compute_dtype(depths.depths, dtype), eqx.is_array
    )
    shared_layer = in_compute_dtype(depths.shared_layer, dtype)
    sequential = depths.kind == "sequential"
    num_rows = hidden.shape[0]

    def advance(previous, xs):
        """`h^k` and its final-normed copy."""
        depth_params, k, depth_key = xs
        depth = eqx.combine(depth_params, static)
        source = previous if sequential else hidden
        if sequential:
            ahead = shift_within_documents(tokens, -k, segment_ids)
            next_embeddings = embedding[ahead].astype(dtype)
        else:
            next_embeddings = None
        # Modules act on one example: one key per row, as for any vmapped module.
        row_keys = None if depth_key is None else jax.random.split(depth_key, num_rows)

        def one_row(h, e, p, s, row_key):
            return depth(
                h, e, positions=p, segment_ids=s, layer=shared_layer, key=row_key
            )

        h_k = map_rows(one_row)(
            source, next_embeddings, positions, segment_ids, row_keys
        )
        # A user's layer may return another dtype (e.g. float32 from a float32
        # constant); the carry must not change type.
        h_k = h_k.astype(dtype)
        norm = final_norm if depth.norm is None else depth.norm
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
        if readout_init is None:
            return (h_k, None), readout(xs[1], normed)
        readout_carry, output = readout(xs[1], normed, readout_carry)
        return (h_k, readout_carry), output

    depth_numbers = jnp.arange(1, depths.num_depths + 1, dtype=jnp.int32)
    depth_keys = None if key is None else jax.random.split(key, depths.num_depths)
    (_, readout_carry), outputs = jax.lax.scan(
        body, (hidden, readout_init), (dynamic, depth_numbers, depth_keys)
    )
    return outputs if readout_init is None else (readout_carry, outputs)


def mtp_depth_losses(
    depths: MTPDepths,
    hidden: Float[Array, "batch seq dim"],
    tokens: Int[Array, "batch seq"],
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
    - `tokens`: `[batch, seq]` token ids.
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
    final_norm = _check_depth_inputs(
        "mtp_depth_losses",
        depths,
        hidden,
        tokens,
        embedding=embedding,
        unembedding=unembedding,
        final_norm=final_norm,
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=loss_mask,
    )
    check_chunk_size("mtp_depth_losses", "loss_chunk_size", loss_chunk_size)
    check_choice("mtp_depth_losses", "loss_impl", loss_impl, LOSS_IMPLS)
    return depth_losses_unchecked(
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
        mesh=mesh,
        key=key,
    )


def depth_losses_unchecked(
    depths,
    hidden,
    tokens,
    *,
    embedding,
    unembedding,
    final_norm,
    segment_ids=None,
    positions=None,
    loss_mask=None,
    loss_chunk_size=DEFAULT_CHUNK_SIZE,
    loss_impl="fused",
    mesh=None,
    key=None,
    sum_weights=None,
    unembedding_grad=None,
):
    """`mtp_depth_losses` without its input checks, for callers that checked the
    batch already (`mtp_loss_sums_from_hidden`); `final_norm` acts on
    `[batch, seq, dim]` arrays.

    With `sum_weights` (`[num_depths]`, the known cotangents of the depths' sums; the
    fused loss on one device only) and `unembedding_grad` (a float32 `[vocab, dim]`
    accumulator), returns `(loss_sums, token_counts, unembedding_grad)`: each depth
    adds `sum_weights[k - 1] · ∂S_k/∂unembedding` into the accumulator in the forward
    pass, and its sum is differentiable w.r.t. its hidden states only (see
    `loss_sums_unchecked`)."""
    segment_ids, positions = _batched_row_defaults(tokens, segment_ids, positions)

    def weighted_readout(k, normed, accumulated):
        targets, valid = targets_of_depth(
            tokens, k, documents=segment_ids, loss_mask=loss_mask
        )
        total, count, grad = rows_weighted_loss_sum(
            normed,
            unembedding,
            targets,
            valid,
            sum_weights[k - 1],
            chunk_size=loss_chunk_size,
        )
        # Not differentiated: the carry holds one accumulator, not one per depth.
        return jax.lax.stop_gradient(accumulated + grad), (total, count)

    if sum_weights is not None:
        unembedding_grad, (loss_sums, token_counts) = _scan_depths(
            depths,
            hidden,
            tokens,
            embedding=embedding,
            final_norm=final_norm,
            readout=weighted_readout,
            segment_ids=segment_ids,
            positions=positions,
            key=key,
            readout_init=jax.lax.stop_gradient(unembedding_grad),
        )
        return loss_sums, token_counts, unembedding_grad

    def readout(k, normed):
        targets, valid = targets_of_depth(
            tokens, k, documents=segment_ids, loss_mask=loss_mask
        )
        return rows_head_loss_sum(
            normed,
            unembedding,
            targets,
            valid,
            mesh=mesh,
            chunk_size=loss_chunk_size,
            impl=loss_impl,
        )

    with tracing_on(mesh):
        return _scan_depths(
            depths,
            hidden,
            tokens,
            embedding=embedding,
            final_norm=final_norm,
            readout=readout,
            segment_ids=segment_ids,
            positions=positions,
            key=key,
        )
