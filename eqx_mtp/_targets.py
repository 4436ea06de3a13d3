"""Which positions count at each depth: targets and the validity rule."""

from __future__ import annotations

from jaxtyping import Array, ArrayLike, Bool, Int

from ._batch import PackedBatch, given_batch, positions_in_runs
from ._checks import (
    Shapes,
    check_ids,
    check_integer,
    check_segment_ids,
    check_token_arrays,
)


def _batch(fn: str, tokens, *, segment_ids=None, loss_mask=None) -> PackedBatch:
    """`tokens` when it is a `PackedBatch`, else the record of the checked arrays."""
    batch = given_batch(fn, tokens, segment_ids=segment_ids, loss_mask=loss_mask)
    if batch is not None:
        return batch
    shapes = Shapes(fn)
    shapes.check("tokens", tokens, "batch seq")
    check_ids(fn, "tokens", tokens)
    check_token_arrays(shapes, segment_ids=segment_ids, loss_mask=loss_mask)
    return PackedBatch.unchecked(tokens, segment_ids, loss_mask=loss_mask)


def depth_targets(
    tokens: Int[Array, "batch seq"] | PackedBatch,
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

    - `tokens`: `[batch, seq]` token ids, or a [`eqx_mtp.PackedBatch`][] (then
        without `segment_ids` and `loss_mask`).
    - `depth`: the depth `k >= 0`; may be a traced integer.
    - `segment_ids`: optional `[batch, seq]` segment ids of packed rows: `0` for
        padding, a positive id for a document (negative ids are an error). Absent,
        the whole row is one document.
    - `loss_mask`: optional boolean `[batch, seq]`; `loss_mask[j]` says token `j` may be
        a target.

    **Returns:**

    `(targets, valid)`: the target ids (zero where invalid) and the boolean validity.
    """
    batch = _batch(
        "depth_targets", tokens, segment_ids=segment_ids, loss_mask=loss_mask
    )
    check_integer("depth_targets", "depth", depth, minimum=0)
    return batch.targets(depth)


def segment_positions(
    segment_ids: Int[Array, "batch seq"] | PackedBatch,
) -> Int[Array, "batch seq"]:
    """Positions that restart at 0 wherever the segment id changes along a row: at
    the start of every document (a maximal run of one non-zero id, see
    [`eqx_mtp.document_ids`][]) and of every run of padding.

    **Arguments:**

    - `segment_ids`: `[batch, seq]` segment ids of packed rows (`0` = padding; a
        negative id is an error), or a [`eqx_mtp.PackedBatch`][], whose documents
        are taken.

    **Returns:**

    `[batch, seq]` int32 positions: the distance of each token from the first token of
    its run of equal segment ids.
    """
    if isinstance(segment_ids, PackedBatch):
        return positions_in_runs(segment_ids.documents)
    Shapes("segment_positions").check("segment_ids", segment_ids, "batch seq")
    check_segment_ids("segment_positions", "segment_ids", segment_ids)
    return positions_in_runs(segment_ids)


def valid_token_counts(
    tokens: Int[Array, "batch seq"] | PackedBatch,
    num_depths: int,
    *,
    segment_ids: Int[Array, "batch seq"] | None = None,
    loss_mask: Bool[Array, "batch seq"] | None = None,
) -> Int[Array, " depths_plus_one"]:
    """How many positions count at each depth `0 … num_depths`, without running a
    model: the `token_counts` that [`eqx_mtp.mtp_loss_sums`][] will return for this
    batch. Known before the forward pass, so a loss built from globally reduced
    counts can be differentiated one micro-batch at a time. `segment_ids` and
    `loss_mask` are as for [`eqx_mtp.depth_targets`][]; `tokens` may be a
    [`eqx_mtp.PackedBatch`][] (then without them)."""
    batch = _batch(
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
    return batch.valid_token_counts(num_depths)
