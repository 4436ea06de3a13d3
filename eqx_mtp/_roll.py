"""Shifting token-aligned arrays along the sequence axis without crossing documents."""

from __future__ import annotations

from jaxtyping import Array, ArrayLike, Int, Shaped

from ._batch import shift_within_documents
from ._checks import Shapes, check_integer, check_segment_ids
from ._documents import number_documents


def roll_and_mask(
    x: Shaped[Array, "batch seq *rest"],
    shift: int | Int[ArrayLike, ""] = -1,
    *,
    segment_ids: Int[Array, "batch seq"] | None = None,
) -> Shaped[Array, "batch seq *rest"]:
    """Shift `x` along its sequence axis, filling with zeros instead of wrapping.

    Position `i` of the result holds `x[:, i - shift]`: with the default `shift=-1`
    every position sees its right neighbour (the next token), and `shift=-k` the token
    `k` places ahead. Positions whose source falls outside the row are zero.

    **Arguments:**

    - `x`: array of shape `[batch, seq, ...]`.
    - `shift`: how far to move the values right (negative: left). May be a traced
        integer, so it can vary inside a `jax.lax.scan` over depths.
    - `segment_ids`: optional `[batch, seq]` segment ids of packed rows, `0` meaning
        padding; a document is a maximal run of one non-zero id (see
        [`eqx_mtp.document_ids`][]). When given, a position is also zeroed when its
        source lies in another document than its own (a later run of the same id
        included), or in padding.

    **Returns:**

    An array of the same shape and dtype as `x`.
    """
    shapes = Shapes("roll_and_mask")
    shapes.check("x", x, "batch seq ...")
    check_integer("roll_and_mask", "shift", shift)
    documents = None
    if segment_ids is not None:
        shapes.check("segment_ids", segment_ids, "batch seq")
        check_segment_ids("roll_and_mask", "segment_ids", segment_ids)
        documents = number_documents(segment_ids)
    return shift_within_documents(x, shift, documents)
