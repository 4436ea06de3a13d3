"""Held-out evaluation of every depth: loss, accuracy, agreement with the trunk."""

from __future__ import annotations

import math
from collections.abc import Iterable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Int

from .._mesh import batch_sharding
from .._model import MTPModel
from .._mtp import scan_depths
from .._roll import roll_and_mask
from .._targets import depth_targets, segment_positions
from ._distributed import replicated_input

# What `evaluate` reads of a batch.
_READ = ("tokens", "segment_ids", "positions", "loss_mask", "token_bytes")


def _depth_statistics(logits, targets, valid, trunk_guess):
    """Sums of loss, correct top-1 guesses, agreements with the trunk, and the count."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    losses = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    guess = jnp.argmax(logits, axis=-1)
    as_float = lambda x: jnp.sum(jnp.where(valid, x, False), dtype=jnp.float32)  # noqa: E731
    return jnp.stack(
        [
            jnp.sum(jnp.where(valid, losses, 0.0)),
            as_float(guess == targets),
            as_float(guess == trunk_guess),
            jnp.sum(valid, dtype=jnp.float32),
        ]
    )


@eqx.filter_jit
def batch_statistics(
    model: MTPModel,
    tokens: Int[Array, "batch seq"],
    segment_ids: Int[Array, "batch seq"],
    positions: Int[Array, "batch seq"] | None = None,
    mesh: Mesh | None = None,
    loss_mask: Bool[Array, "batch seq"] | None = None,
    token_bytes: Int[Array, "batch seq"] | None = None,
) -> tuple[Array, Array]:
    """`[num_depths + 1, 4]` sums for one batch (loss, correct, agree, count), and
    the bytes of the main objective's targets (`0` without `token_bytes`).

    Row `k` is depth `k` (row 0 the main objective, whose agreement is with itself).
    Depth `k` at position `i` agrees when its argmax equals the trunk's argmax at
    `i + k`: both guess `t_{i+k+1}` (teacher-forced agreement). Only the targets
    `loss_mask` allows count.
    """
    if positions is None:
        positions = segment_positions(segment_ids)
    trunk = model.trunk
    hidden = jax.vmap(lambda t, p, s: trunk(t, positions=p, segment_ids=s))(
        tokens, positions, segment_ids
    )
    main_logits = trunk.logits(hidden)
    trunk_guess = jnp.argmax(main_logits, axis=-1)
    targets, valid = depth_targets(
        tokens, 0, segment_ids=segment_ids, loss_mask=loss_mask
    )
    rows = [_depth_statistics(main_logits, targets, valid, trunk_guess)]
    target_bytes = jnp.zeros((), jnp.float32)
    if token_bytes is not None:
        # `valid[i]` counts `t_{i+1}`, so the bytes are read one place ahead.
        ahead = roll_and_mask(token_bytes, -1)
        target_bytes = jnp.sum(jnp.where(valid, ahead, 0), dtype=jnp.float32)
    if model.depths is not None:

        def readout(k, normed):
            logits = jnp.matmul(
                normed, trunk.unembedding_matrix.T, preferred_element_type=jnp.float32
            )
            depth_targets_k, depth_valid = depth_targets(
                tokens, k, segment_ids=segment_ids, loss_mask=loss_mask
            )
            trunk_ahead = roll_and_mask(trunk_guess, -k)
            return _depth_statistics(logits, depth_targets_k, depth_valid, trunk_ahead)

        rows.append(
            scan_depths(
                model.depths,
                hidden,
                tokens,
                embedding=trunk.embedding,
                final_norm=trunk.final_norm,
                readout=readout,
                segment_ids=segment_ids,
                positions=positions,
            )
        )
    stats = jnp.concatenate([rows[0][None], *rows[1:]], axis=0)
    if mesh is not None:
        # Replicated, so that every process can read the sums.
        stats, target_bytes = jax.lax.with_sharding_constraint(
            (stats, target_bytes), NamedSharding(mesh, PartitionSpec())
        )
    return stats, target_bytes


def evaluate(
    model: MTPModel,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    mesh: Mesh | None = None,
) -> dict:
    """Evaluate every depth on held-out batches.

    **Arguments:**

    - `model`: the model.
    - `batches`: dicts with `tokens`, `segment_ids` and optionally `positions`,
        `loss_mask` (which tokens may be targets) and `token_bytes` (the UTF-8
        bytes each token covers), each `[batch, seq]`, as
        [`eqx_mtp.train.eval_batches`][] gives them; in a multi-process run, every
        process passes the same batches.
    - `mesh`: lay each batch out on this mesh (rows over `data`, sequence over
        `context`), for a model whose arrays live on it.

    **Returns:**

    A dict of plain floats/lists:

    - `main_bits_per_token`: the main loss in bits per target token.
    - `main_bits_per_byte`, with `token_bytes` only: the main loss in bits per
        UTF-8 byte of the targets' text (the byte-level tokenizer counts each
        document delimiter as a byte, so there it equals `main_bits_per_token`).
    - `depth_losses`: nats, index 0 the main objective.
    - `depth_accuracy`: top-1 against the true token.
    - `depth_agreement`: with the trunk's own guess of the same token; 1.0 at
        index 0.
    - `tokens`: targets counted at depth 0; `bytes`, with `token_bytes`, their
        bytes.
    """
    if mesh is None:
        place = jnp.asarray
    else:
        layout = batch_sharding(mesh)
        place = lambda x: replicated_input(x, layout)  # noqa: E731
    totals, total_bytes, measures_bytes = None, 0.0, False
    for batch in batches:
        given = {k: place(batch[k]) for k in _READ if batch.get(k) is not None}
        stats, target_bytes = batch_statistics(
            model,
            given["tokens"],
            given["segment_ids"],
            given.get("positions"),
            mesh,
            given.get("loss_mask"),
            given.get("token_bytes"),
        )
        stats = np.asarray(stats, np.float64)
        totals = stats if totals is None else totals + stats
        total_bytes += float(target_bytes)
        measures_bytes = measures_bytes or batch.get("token_bytes") is not None
    if totals is None:
        raise ValueError("evaluate: batches is empty; need at least one batch")
    counts = np.maximum(totals[:, 3], 1.0)
    losses = totals[:, 0] / counts
    result = dict(
        main_bits_per_token=float(losses[0] / math.log(2)),
        depth_losses=[float(x) for x in losses],
        depth_accuracy=[float(x) for x in totals[:, 1] / counts],
        depth_agreement=[float(x) for x in totals[:, 2] / counts],
        tokens=int(totals[0, 3]),
    )
    if measures_bytes:
        per_byte = totals[0, 0] / max(total_bytes, 1.0) / math.log(2)
        result |= dict(main_bits_per_byte=float(per_byte), bytes=int(total_bytes))
    return result
