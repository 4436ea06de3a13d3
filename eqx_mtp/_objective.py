"""How the per-depth sums and counts become the training loss: λ or its schedule, the
reduction over depths and the depth weights, as one record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ._checks import Shapes, check_float, check_ids
from ._schedule import MTPWeight

Reduction = Literal["mean", "pooled"]
DepthWeights = Sequence[float] | Float[ArrayLike, " depths"]


def resolve_mtp_weight(
    mtp_weight: MTPWeight, step: int | Int[ArrayLike, ""] | None = None
) -> Float[Array, ""]:
    """λ as a float32 scalar: `mtp_weight` itself, or `mtp_weight(step)` when it is a
    schedule (an optax-style callable, e.g. from [`eqx_mtp.parse_mtp_weight`][])."""
    if callable(mtp_weight):
        if step is None:
            raise ValueError("mtp_weight is a schedule of the step: pass step= as well")
        mtp_weight = mtp_weight(step)
    value = jnp.asarray(mtp_weight, jnp.float32)
    if value.shape != ():
        raise ValueError(f"mtp_weight must be a scalar, got shape {value.shape}")
    return value


def _depth_weights(depth_weights: DepthWeights, num_depths: int) -> Array:
    weights = jnp.asarray(depth_weights, jnp.float32)
    if weights.shape != (num_depths,):
        raise ValueError(
            f"depth_weights must have shape ({num_depths},), one weight per MTP depth, "
            f"got {weights.shape}"
        )
    try:
        host = np.asarray(weights)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return weights  # traced values cannot be checked here
    if num_depths and (np.any(host < 0) or not np.sum(host) > 0):
        raise ValueError(
            "depth_weights must be non-negative with a positive sum, got "
            f"{host.tolist()}"
        )
    return weights


def _check_reduction(reduction) -> None:
    if reduction not in ("mean", "pooled"):
        raise ValueError(
            f"reduce_losses: reduction must be 'mean' or 'pooled', got {reduction!r}"
        )


class Objective(eqx.Module):
    """The loss as a function of the per-depth sums and counts:
    `L = S_0 / N_0 + λ · L_mtp` (see [`eqx_mtp.reduce_losses`][]).

    **Fields:**

    - `mtp_weight`: λ: a float, a scalar array, or a schedule `step -> λ`.
    - `reduction`: `"mean"` or `"pooled"`.
    - `depth_weights`: optional `[D]` non-negative weights with a positive sum.
    """

    mtp_weight: MTPWeight = 0.1
    # `str`, so that a wrong choice reaches the check below, which lists the choices.
    reduction: str = eqx.field(default="mean", static=True)
    depth_weights: DepthWeights | None = None

    def __check_init__(self):
        _check_reduction(self.reduction)

    def reduce(
        self,
        loss_sums: Float[Array, " depths_plus_one"],
        token_counts: Int[Array, " depths_plus_one"],
        step: int | Int[ArrayLike, ""] | None = None,
    ) -> tuple[Float[Array, ""], dict[str, Array]]:
        """`(loss, aux)` of globally reduced sums and counts, as
        [`eqx_mtp.reduce_losses`][] returns them; `step` evaluates a schedule λ."""
        reduction = self.reduction
        weight = resolve_mtp_weight(self.mtp_weight, step)
        counts = jnp.maximum(token_counts, 1).astype(jnp.float32)
        depth_losses = loss_sums / counts
        main_loss = depth_losses[0]
        num_depths = loss_sums.shape[0] - 1
        weights = None
        if self.depth_weights is not None:
            weights = _depth_weights(self.depth_weights, num_depths)
        if num_depths == 0:
            extra = jnp.zeros((), jnp.float32)
        elif weights is not None and reduction == "mean":
            extra = jnp.sum(weights * depth_losses[1:]) / jnp.sum(weights)
        elif weights is not None:
            pooled_count = jnp.sum(weights * token_counts[1:].astype(jnp.float32))
            pooled_count = jnp.where(pooled_count > 0, pooled_count, 1.0)
            extra = jnp.sum(weights * loss_sums[1:]) / pooled_count
        elif reduction == "mean":
            extra = jnp.mean(depth_losses[1:])
        else:
            pooled_count = jnp.maximum(jnp.sum(token_counts[1:]), 1).astype(jnp.float32)
            extra = jnp.sum(loss_sums[1:]) / pooled_count
        loss = main_loss + weight * extra
        aux = dict(
            loss_sums=loss_sums,
            token_counts=token_counts,
            depth_losses=depth_losses,
            main_loss=main_loss,
            mtp_loss=extra,
        )
        return loss, aux

    def coefficients(
        self,
        token_counts: Int[Array, " depths_plus_one"],
        step: int | Int[ArrayLike, ""] | None = None,
    ) -> Float[Array, " depths_plus_one"]:
        """`c_k = ∂L/∂S_k` at these counts. The loss is linear in the sums once the
        counts are fixed, and the counts depend only on the batch, so the gradient of
        `L` is that of `Σ_k c_k S_k` with `c` known before the forward pass."""

        def loss(loss_sums):
            return self.reduce(loss_sums, token_counts, step)[0]

        return jax.grad(loss)(jnp.zeros(token_counts.shape, jnp.float32))


def reduce_losses(
    loss_sums: Float[Array, " depths_plus_one"],
    token_counts: Int[Array, " depths_plus_one"],
    *,
    mtp_weight: MTPWeight = 0.1,
    reduction: Reduction = "mean",
    depth_weights: DepthWeights | None = None,
    step: int | Int[ArrayLike, ""] | None = None,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Turn globally reduced per-depth sums and counts into the training loss.

    `L = S_0 / N_0 + λ · L_mtp`, with `L_mtp = (1/D) Σ_k S_k / N_k`
    (`reduction="mean"`, DeepSeek-V3) or `Σ_k S_k / Σ_k N_k` (`"pooled"`). Counts are
    clamped at 1, so a depth with no valid token contributes 0 and a zero gradient.

    With `depth_weights` `w_1 … w_D` (e.g. a geometric decay `0.5 ** k`) both become
    weighted means, so λ stays the total MTP weight and `w` may be scaled freely:

    - `"mean"`: `L_mtp = Σ_k w_k S_k / max(N_k, 1) / Σ_k w_k`;
    - `"pooled"`: `L_mtp = Σ_k w_k S_k / Σ_k w_k N_k` (a token of depth `k` counts
        `w_k` times; the denominator is taken as 1 when it is 0).

    Equal weights give the unweighted reductions.

    **Arguments:**

    - `loss_sums`, `token_counts`: `[D + 1]` sums and counts from
        [`eqx_mtp.mtp_loss_sums`][], reduced over every device and micro-batch.
    - `mtp_weight`: λ: a float, a scalar array, or a schedule `step -> λ` (e.g.
        [`eqx_mtp.parse_mtp_weight`][]'s or an optax schedule) evaluated at `step`.
    - `reduction`: `"mean"` or `"pooled"`.
    - `depth_weights`: optional `[D]` non-negative weights with a positive sum, one per
        depth; `None` weighs every depth equally.
    - `step`: the step at which a schedule `mtp_weight` is evaluated; required then,
        unused otherwise.

    **Returns:**

    `(loss, aux)`; `aux` holds `loss_sums`, `token_counts`, `depth_losses` (each
    depth's mean, index 0 the main objective), `main_loss` and `mtp_loss`.
    """
    shapes = Shapes("reduce_losses")
    shapes.check("loss_sums", loss_sums, "depths_plus_one")
    check_float("reduce_losses", "loss_sums", loss_sums)
    shapes.check("token_counts", token_counts, "depths_plus_one")
    check_ids("reduce_losses", "token_counts", token_counts)
    if loss_sums.shape[0] < 1:
        raise ValueError(
            "reduce_losses: loss_sums must hold at least the main objective's sum, "
            "got shape (0,)"
        )
    _check_reduction(reduction)
    objective = Objective(mtp_weight, reduction, depth_weights)
    return objective.reduce(loss_sums, token_counts, step)
