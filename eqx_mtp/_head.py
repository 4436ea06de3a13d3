"""The shared output head of the trunk and the depths, as one record: the embedding
(read by the sequential depths), the unembedding, the final norm, how the loss is
computed (chunk size, implementation) and where (one device, or a mesh).

`Head.loss_sum` is the one place that picks how a head's cross-entropy runs: on one
device ([`eqx_mtp.head_loss_sum`][]), vocabulary-parallel over a mesh
([`eqx_mtp.vocab_parallel_loss_sum`][]), or, where the sum's cotangent is known before
the forward pass, in the weighted form that returns its unembedding gradient as a
value (`rows_weighted_loss_sum`), which `Head.inject` hands back to the unembedding in
the backward pass. On a mesh the head's lookups (`Head.lookup`) and losses read one
copy of the embedding per token shard, so that its gradient is reduced once.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array

from ._batch import PackedBatch
from ._checks import check_choice, check_chunk_size
from ._config import LOSS_IMPLS
from ._cross_entropy import head_loss_sum_unchecked, rows_weighted_loss_sum
from ._fused_ce import DEFAULT_CHUNK_SIZE, inject_gradient
from ._mesh import CONTEXT, DATA, MODEL, batch_sharding
from ._vocab_parallel import (
    copies_lookup,
    token_shard_copies,
    vocab_parallel_unchecked,
)


class Head(eqx.Module):
    """The shared head and how its loss runs.

    - `embedding`: `[vocab, dim]` token embedding (read by sequential depths).
    - `unembedding`: `[vocab, dim]` output matrix, or `None` where no loss is taken
        (`scan_depths`).
    - `final_norm`: the final norm as a function of `[batch, seq, dim]` arrays (as
        `check_final_norm` returns it).
    - `chunk_size`, `impl`: of the cross-entropy (see `head_loss_sum`).
    - `mesh`: the mesh the loss runs vocabulary-parallel on, or `None`.
    - `vocab_size`: the vocabulary, where `embedding` and `unembedding` are
        per-token-shard copies (`[data · context, padded vocab, dim]`, see
        `with_copies`); `None` where they are `[vocab, dim]` matrices.
    """

    embedding: Array
    unembedding: Array | None
    final_norm: Callable[[Array], Array]
    chunk_size: int | None = eqx.field(default=DEFAULT_CHUNK_SIZE, static=True)
    impl: str = eqx.field(default="fused", static=True)
    mesh: Mesh | None = eqx.field(default=None, static=True)
    vocab_size: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        check_chunk_size(None, "chunk_size", self.chunk_size)
        check_choice(None, "impl", self.impl, LOSS_IMPLS)

    def placed(self, hidden: Array, batch: PackedBatch):
        """`(hidden, batch, head)` laid out for the mesh: rows over `data`, the
        sequence over `context`, and the embedding and unembedding as per-token-shard
        copies (see `token_shard_copies`; one copy when they are tied), so that their
        gradients are reduced once, not once per lookup and per head. The naive loss
        reads the embedding gathered over `data` instead (`gathered_over_data`).
        Unchanged without a mesh; placing a placed head changes nothing."""
        if self.mesh is None:
            return hidden, batch, self
        batch = batch.constrained(batch_sharding(self.mesh))
        hidden = jax.lax.with_sharding_constraint(
            hidden, NamedSharding(self.mesh, PartitionSpec(DATA, CONTEXT, None))
        )
        return hidden, batch, self.with_copies()

    def with_copies(self) -> Head:
        """This head on its mesh, reading per-token-shard copies (see `placed`)."""
        if self.mesh is None or self.vocab_size is not None:
            return self
        if self.impl == "naive":
            gathered = gathered_over_data(self.embedding, self.mesh)
            return eqx.tree_at(lambda h: h.embedding, self, gathered)
        copies = token_shard_copies(self.embedding, self.mesh)
        unembedding = self.unembedding
        if unembedding is self.embedding:
            unembedding = copies
        elif unembedding is not None:
            unembedding = token_shard_copies(unembedding, self.mesh)
        return Head(
            copies,
            unembedding,
            self.final_norm,
            chunk_size=self.chunk_size,
            impl=self.impl,
            mesh=self.mesh,
            vocab_size=self.embedding.shape[0],
        )

    def lookup(self, ids: Array) -> Array:
        """The `[batch, seq, dim]` embeddings of `[batch, seq]` token ids."""
        if self.vocab_size is None:
            return self.embedding[ids]
        return copies_lookup(self.embedding, ids, self.mesh)

    def loss_sum(self, normed, batch: PackedBatch, depth, weight=None):
        """The loss sum and token count of depth `depth` (`0`: the main head) from
        its final-normed hidden states `[batch, seq, dim]`.

        With `weight` (the known cotangent of the sum; the fused loss on one device)
        it returns `(loss_sum, token_count, unembedding_grad)`: the unembedding's
        gradient times `weight` as a value, the sum differentiable w.r.t. `normed`
        only."""
        targets, valid = batch.targets(depth)
        if weight is None and self.mesh is None:
            return head_loss_sum_unchecked(
                normed.reshape(-1, normed.shape[-1]),
                self.unembedding,
                targets.reshape(-1),
                valid.reshape(-1),
                chunk_size=self.chunk_size,
                impl=self.impl,
            )
        if weight is None:
            return vocab_parallel_unchecked(
                normed,
                self.unembedding,
                targets,
                valid,
                mesh=self.mesh,
                chunk_size=self.chunk_size,
                impl=self.impl,
                vocab_size=self.vocab_size,
            )
        return rows_weighted_loss_sum(
            normed, self.unembedding, targets, valid, weight, chunk_size=self.chunk_size
        )

    def inject(self, unembedding_grad: Array) -> Array:
        """A zero whose gradient w.r.t. the unembedding is `unembedding_grad`."""
        return inject_gradient(self.unembedding, unembedding_grad)


def gathered_over_data(embedding: Array, mesh: Mesh) -> Array:
    """The embedding whole along its width (FSDP splits it over `data`), its
    vocabulary still split over `model` where that divides it. Looked up while its
    width is split, the gathered rows would come out split by width and be
    replicated whole to reach the batch's layout."""
    vocab_axis = MODEL if embedding.shape[0] % mesh.shape[MODEL] == 0 else None
    return jax.lax.with_sharding_constraint(
        embedding, NamedSharding(mesh, PartitionSpec(vocab_axis, None))
    )
