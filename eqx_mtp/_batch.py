"""What a packed row is: its tokens, its documents, its positions and which tokens may
be targets, as one record built and checked once where the arrays come in.

A document is a maximal run of one non-zero segment id (see `_documents.py`); the
record holds the runs numbered once, so everything downstream (attention, the targets
of each depth, the shifts of the sequential depths) compares ids by equality.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Int

from ._checks import (
    Shapes,
    check_ids,
    check_mask,
    check_same_shape,
    check_segment_ids,
)
from ._documents import number_documents


class PackedBatch(eqx.Module):
    """A batch of packed rows: tokens, their documents numbered once, positions and
    the loss mask, all `[batch, seq]`.

    Build it with [`eqx_mtp.PackedBatch.of`][], which checks the arrays and derives
    what is absent; every function of the loss path that takes `tokens` also takes a
    `PackedBatch` in their place (then without `segment_ids`, `positions` or
    `loss_mask`, which it holds). It is a pytree of arrays: it passes through
    `jax.jit`, `jax.vmap` and `jax.lax.scan` like the arrays it holds.

    **Fields:**

    - `tokens`: `[batch, seq]` token ids.
    - `documents`: `[batch, seq]` int32 document numbers
        ([`eqx_mtp.document_ids`][] of the segment ids): `0` on padding, equal
        numbers for one document.
    - `positions`: `[batch, seq]` positions, given or restarting at 0 in every
        document.
    - `loss_mask`: optional boolean `[batch, seq]`: which tokens may be targets
        (`None`: all).
    """

    tokens: Int[Array, "batch seq"]
    documents: Int[Array, "batch seq"]
    positions: Int[Array, "batch seq"]
    loss_mask: Bool[Array, "batch seq"] | None

    @classmethod
    def of(
        cls,
        tokens: Int[Array, "batch seq"],
        *,
        segment_ids: Int[Array, "batch seq"] | None = None,
        positions: Int[Array, "batch seq"] | None = None,
        loss_mask: Bool[Array, "batch seq"] | None = None,
    ) -> PackedBatch:
        """Check a batch of packed rows and build its record.

        **Arguments:**

        - `tokens`: `[batch, seq]` integer token ids.
        - `segment_ids`: optional `[batch, seq]` segment ids: `0` for padding, a
            positive id for a document (a negative id is an error); a document is a
            maximal run of one id. Absent, each row is one document.
        - `positions`: optional `[batch, seq]` integer positions; by default they
            restart at 0 in every document.
        - `loss_mask`: optional boolean `[batch, seq]`: which tokens may be targets.

        **Returns:**

        The `PackedBatch`.

        **Raises:**

        `TypeError`/`ValueError` naming the argument when it is not an array of the
        expected rank, shape or dtype.
        """
        check_rows(tokens, segment_ids=segment_ids, positions=positions, mask=loss_mask)
        return cls.unchecked(tokens, segment_ids, positions, loss_mask)

    @classmethod
    def unchecked(cls, tokens, segment_ids=None, positions=None, loss_mask=None):
        """`of` without its checks, for callers that checked the arrays: the one
        place where the defaults of a row are derived."""
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        documents = number_documents(segment_ids)
        if positions is None:
            positions = positions_in_runs(documents)
        return cls(tokens, documents, positions, loss_mask)

    @property
    def shape(self) -> tuple[int, ...]:
        """`(batch, seq)`."""
        return tuple(self.tokens.shape)

    def targets(self, depth) -> tuple[Array, Array]:
        """`(targets, valid)` of depth `depth` (`0`: the main objective), as
        [`eqx_mtp.depth_targets`][] defines them; `depth` may be traced."""
        shift = -(depth + 1)
        can_be_target = (
            jnp.ones(self.tokens.shape, jnp.bool_)
            if self.loss_mask is None
            else self.loss_mask
        )
        valid = self.shifted(can_be_target, shift)
        targets = jnp.where(valid, jnp.roll(self.tokens, shift, axis=1), 0)
        return targets, valid

    def shifted(self, x, shift):
        """`x` (`[batch, seq, ...]`) shifted along the sequence by `shift` within the
        documents of this batch, zero where the source lies in another document, in
        padding or outside the row."""
        return shift_within_documents(x, shift, self.documents)

    def valid_token_counts(self, num_depths: int) -> Int[Array, " depths_plus_one"]:
        """How many positions count at each depth `0 … num_depths`."""

        def count(depth):
            _, valid = self.targets(depth)
            return jnp.sum(valid, dtype=jnp.int32)

        return jax.vmap(count)(jnp.arange(num_depths + 1, dtype=jnp.int32))

    def constrained(self, sharding) -> PackedBatch:
        """Every array laid out by `sharding` (`with_sharding_constraint`)."""
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(x, sharding), self
        )


def shift_within_documents(x, shift, documents=None):
    """`roll_and_mask` without its checks, on ids that are document numbers already
    (equal ids: one document)."""
    seq_len = x.shape[1]
    source = jnp.arange(seq_len) - shift
    keep = ((source >= 0) & (source < seq_len))[None, :]
    if documents is not None:
        source_document = jnp.roll(documents, shift, axis=1)
        keep = keep & (source_document == documents) & (source_document != 0)
    keep = keep.reshape(keep.shape + (1,) * (x.ndim - 2))
    return jnp.where(keep, jnp.roll(x, shift, axis=1), jnp.zeros((), x.dtype))


def positions_in_runs(segment_ids: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """`segment_positions` without its checks: the distance of each token from the
    first token of its run of equal ids."""
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


def check_rows(tokens, *, segment_ids=None, positions=None, mask=None) -> None:
    """The arrays of a batch, with messages that name the argument alone (shared by
    `PackedBatch.of`, `mtp_loss` and `mtp_loss_sums`)."""
    shape = Shapes(None).check("tokens", tokens, "batch seq")
    check_ids(None, "tokens", tokens)
    for name, value in (
        ("segment_ids", segment_ids),
        ("positions", positions),
        ("loss_mask", mask),
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


def given_batch(
    fn: str | None,
    tokens: ArrayLike | PackedBatch,
    **companions,
) -> PackedBatch | None:
    """`tokens` when it is a `PackedBatch` (then none of `companions`, the arrays it
    holds, may be given too), else `None`."""
    if not isinstance(tokens, PackedBatch):
        return None
    given = [name for name, value in companions.items() if value is not None]
    if given:
        at = f"{fn}: " if fn else ""
        raise ValueError(
            f"{at}{', '.join(given)} must not be given with a PackedBatch in place of "
            "tokens: the batch holds them already"
        )
    return tokens
