"""What a document of a packed row is: a maximal run of one non-zero segment id.

Segment id `0` is padding; any other id marks a document, and a document ends where
the id changes. The same id may come back later in a row: that later run is another
document. Attention, positions and the validity rule of the loss all compare ids by
equality, so every entry point first numbers the runs of a row `1, 2, 3, …` (padding
stays 0), once, where the segment ids come in; equal numbers then mean one document.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Int

from ._checks import check_segment_ids


def number_documents(segment_ids: Int[Array, "*batch seq"]) -> Int[Array, "*batch seq"]:
    """[`eqx_mtp.document_ids`][] without its input checks."""
    previous = jnp.concatenate(
        [jnp.zeros_like(segment_ids[..., :1]), segment_ids[..., :-1]], axis=-1
    )
    starts = (segment_ids != 0) & (segment_ids != previous)
    numbers = jnp.cumsum(starts, axis=-1, dtype=jnp.int32)
    return jnp.where(segment_ids != 0, numbers, jnp.zeros((), jnp.int32))


def checked_documents(fn: str, segment_ids) -> Int[Array, "*batch seq"]:
    """`number_documents` after checking `segment_ids` for `fn` (integers; no
    negative id, where the values are concrete)."""
    check_segment_ids(fn, "segment_ids", segment_ids)
    return number_documents(segment_ids)


def document_ids(segment_ids: Int[Array, "*batch seq"]) -> Int[Array, "*batch seq"]:
    """Number the documents of packed rows: each maximal run of one non-zero segment
    id along the last axis gets its own id `1, 2, 3, …`, in order; padding (`0`)
    stays `0`.

    This is what segment ids mean everywhere in `eqx_mtp`: the row
    `1 1 1 2 2 1 1 0 0` holds three documents, `1 1 1 2 2 3 3 0 0`, and its third
    document sees neither of the others (in attention, positions and the validity
    rule). Every function that takes `segment_ids` applies this once, where they come
    in; call it yourself to compare ids by equality in code of your own (e.g. an
    attention mask). Idempotent: numbered ids are numbered again unchanged.

    **Arguments:**

    - `segment_ids`: `[..., seq]` integer ids, `0` for padding and positive ids for
        documents; a negative id is an error (checked on concrete arrays).

    **Returns:**

    int32 ids of the same shape: `0` on padding, elsewhere the number of document
    runs that start at or before the position in its row.
    """
    check_segment_ids("document_ids", "segment_ids", segment_ids)
    if segment_ids.ndim < 1:
        raise ValueError(
            "document_ids: segment_ids must have shape [..., seq], got shape ()"
        )
    return number_documents(segment_ids)
