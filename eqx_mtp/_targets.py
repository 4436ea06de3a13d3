"""Which positions count at each depth: targets and the validity rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Int

from ._checks import (
    Shapes,
    check_ids,
    check_integer,
    check_segment_ids,
    check_token_arrays,
)
from ._documents import number_documents
from ._roll import shift_within_documents


def _check_tokens(fn: str, tokens, *, segment_ids=None, loss_mask=None) -> None:
    shapes = Shapes(fn)
    shapes.check("tokens", tokens, "batch seq")
    check_ids(fn, "tokens", tokens)
    check_token_arrays(shapes, segment_ids=segment_ids, loss_mask=loss_mask)


def depth_targets(
    tokens: Int[Array, "batch seq"],
    depth: int | Int[ArrayLike, ""],
    *,
    segment_ids: Int[Array, "batch seq"] | None = None,
    loss_mask: Bool[Array, "batch seq"] | None = None,
) -> tuple[Int[Array, "batch seq"], Bool[Array, "batch seq"]]:
    """Targets and validity of MTP depth `depth` (`0` is the main objective).

    Position `i` at depth `k` predicts `t[i + k + 1]`, and counts when

    `i + k + 1 < seq and seg[i] != 0 and seg[i + k + 1] == seg[i] and mask[i + k + 1]`.

    where `seg` numbers the documents ([`eqx_mtp.document_ids`][]): a document is a
    maximal run of one non-zero segment id, so a later run of a reused id is another
    document. The check compares position `i` with the target's position directly, so
    a target in another document never counts, whatever lies between them.

    **Arguments:**

    - `tokens`: `[batch, seq]` token ids.
    - `depth`: the depth `k >= 0`; may be a traced integer.
    - `segment_ids`: optional `[batch, seq]` segment ids of packed rows: `0` for
        padding, a positive id for a document (negative ids are an error). Absent,
        the whole row is one document.
    - `loss_mask`: optional boolean `[batch, seq]`; `loss_mask[j]` says token `j` may be
        a target.

    **Returns:**

    `(targets, valid)`: the target ids (zero where invalid) and the boolean validity.
    """
    _check_tokens("depth_targets", tokens, segment_ids=segment_ids, loss_mask=loss_mask)
    check_integer("depth_targets", "depth", depth, minimum=0)
    documents = None if segment_ids is None else number_documents(segment_ids)
    return targets_of_depth(tokens, depth, documents=documents, loss_mask=loss_mask)


def targets_of_depth(tokens, depth, *, documents=None, loss_mask=None):
    """`depth_targets` without its checks, on ids that are document numbers already
    (equal ids: one document)."""
    shift = -(depth + 1)
    if documents is None:
        documents = jnp.ones(tokens.shape, jnp.int32)
    can_be_target = (
        jnp.ones(tokens.shape, jnp.bool_) if loss_mask is None else loss_mask
    )
    valid = shift_within_documents(can_be_target, shift, documents)
    targets = jnp.where(valid, jnp.roll(tokens, shift, axis=1), 0)
    return targets, valid


def segment_positions(segment_ids: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Positions that restart at 0 wherever the segment id changes along a row: at
    the start of every document (a maximal run of one non-zero id, see
    [`eqx_mtp.document_ids`][]) and of every run of padding.

    **Arguments:**

    - `segment_ids`: `[batch, seq]` segment ids of packed rows (`0` = padding; a
        negative id is an error).

    **Returns:**

    `[batch, seq]` int32 positions: the distance of each token from the first token of
    its run of equal segment ids.
    """
    Shapes("segment_positions").check("segment_ids", segment_ids, "batch seq")
    check_segment_ids("segment_positions", "segment_ids", segment_ids)
    seq_len = segment_ids.shape[1]
    index = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [
            jnp.ones(segment_ids.shape[:1] + (1,), jnp.bool_),
            segment_ids[:, 1:] != segment_ids[:, :-1],
        ],
        axis=1,
    )
    start_index = jnp.maximum.accumulate(jnp.where(starts, index, 0), axis=1)
    return index - start_index


def valid_token_counts(
    tokens: Int[Array, "batch seq"],
    num_depths: int,
    *,
    segment_ids: Int[Array, "batch seq"] | None = None,
    loss_mask: Bool[Array, "batch seq"] | None = None,
) -> Int[Array, " depths_plus_one"]:
    """How many positions count at each depth `0 … num_depths`, without running a
    model: the `token_counts` that [`eqx_mtp.mtp_loss_sums`][] will return for this
    batch. Known before the forward pass, so a loss built from globally reduced
    counts can be differentiated one micro-batch at a time. `segment_ids` and
    `loss_mask` are as for [`eqx_mtp.depth_targets`][]."""
    _check_tokens(
        "valid_token_counts", tokens, segment_ids=segment_ids, loss_mask=loss_mask
    )
    if isinstance(num_depths, bool) or not isinstance(num_depths, int):
        raise TypeError(
            "valid_token_counts: num_depths must be a Python int, got "
            f"{type(num_depths).__name__}"
        )
    if num_depths < 0:
        raise ValueError(
            f"valid_token_counts: num_depths must be >= 0, got {num_depths}"
        )

    documents = None if segment_ids is None else number_documents(segment_ids)

    def count(depth):
        _, valid = targets_of_depth(
            tokens, depth, documents=documents, loss_mask=loss_mask
        )
        return jnp.sum(valid, dtype=jnp.int32)

    return jax.vmap(count)(jnp.arange(num_depths + 1, dtype=jnp.int32))
