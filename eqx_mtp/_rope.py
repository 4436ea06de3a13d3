"""Rotary position embeddings: the frequency tables of plain and rescaled RoPE, and
their application in the "rotate half" (Llama/NeoX) layout.

The rescaled tables depend only on the static configuration, so they are computed once,
in NumPy float64, and enter the computation as float32 constants (plain RoPE keeps its
float32 formula, see `apply_rope`). The formulas are those
of Hugging Face transformers' `modeling_rope_utils` (default, `linear`, `llama3`,
`yarn`), so that a checkpoint trained with rescaled RoPE computes the same angles here.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._config import RopeScaling


@functools.lru_cache(maxsize=64)
def rope_table(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[np.ndarray, float]:
    """The inverse frequencies of the rotary embedding and the factor its cosines and
    sines are multiplied by.

    **Arguments:**

    - `head_dim`: the width of one head (even); `head_dim / 2` frequencies.
    - `theta`: the base of the frequencies, `θ^(-2i / head_dim)`.
    - `scaling`: an [`eqx_mtp.RopeScaling`][], or `None` for plain RoPE.

    **Returns:**

    `(inv_freq, attention_factor)`: a read-only float64 array `[head_dim / 2]` and a
    float (`1.0` except for `yarn`).
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    attention_factor = 1.0
    if scaling is None:
        pass
    elif scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    elif scaling.kind == "yarn":
        inv_freq, attention_factor = _yarn(inv_freq, head_dim, theta, scaling)
    else:  # RopeScaling validates the kind; a new kind must be added here
        raise ValueError(f"rope_scaling.kind={scaling.kind!r} has no frequency table")
    inv_freq.setflags(write=False)
    return inv_freq, attention_factor


def _llama3(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Llama 3.1: wavelengths longer than `original / low_freq_factor` are divided by
    `factor`, shorter than `original / high_freq_factor` kept, and those between
    blended linearly in `original / wavelength`."""
    original = scaling.original_max_position
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > original / low, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelength < original / high) & ~(wavelength > original / low)
    return np.where(medium, blended, scaled)


def _yarn(
    inv_freq: np.ndarray, head_dim: int, theta: float, scaling: RopeScaling
) -> tuple[np.ndarray, float]:
    """YaRN: interpolated (divided by `factor`) frequencies for the dimensions that
    turn fewer than `beta_slow` times over the original context, extrapolated (kept)
    ones for those that turn more than `beta_fast` times, a linear ramp between."""
    original = scaling.original_max_position

    def dimension(rotations):
        # The dimension whose frequency turns `rotations` times over `original`.
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = dimension(scaling.beta_fast), dimension(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # the published formula's guard against a zero-width ramp
    ramp = np.clip(
        (np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1
    )
    extrapolation = 1 - ramp
    inv_freq = (
        inv_freq / scaling.factor * (1 - extrapolation) + inv_freq * extrapolation
    )
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = (
            0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
        )
    return inv_freq, float(attention_factor)


def apply_rope(
    x: Float[Array, "seq heads head_dim"],
    positions: Int[Array, " seq"],
    theta: float,
    scaling: RopeScaling | None = None,
    *,
    enabled: Bool[Array, ""] | None = None,
) -> Float[Array, "seq heads head_dim"]:
    """Rotary position embedding, "rotate half" convention (Llama/NeoX layout):
    dimension `i` of the first half and `i` of the second half rotate together by
    `position · inv_freq[i]`.

    **Arguments:**

    - `x`: queries or keys of one row.
    - `positions`: their positions.
    - `theta`, `scaling`: the frequency table, see `rope_table`. With `yarn`, the
        cosines and sines are multiplied by its attention factor.
    - `enabled`: a traced boolean (a layer's "uses RoPE" in a scanned stack):
        `False` returns `x` unrotated; `None`: always rotate.

    **Returns:**

    `x` rotated, in its dtype (computed in float32).
    """
    half = x.shape[-1] // 2
    if scaling is None:
        # Plain RoPE keeps the float32 formula models were trained with here: the
        # float64 table rounds differently for head widths that are not powers of
        # two (`i / half` is inexact), and a checkpoint's numbers must not move.
        inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
        attention_factor = 1.0
    else:
        table, attention_factor = rope_table(x.shape[-1], float(theta), scaling)
        inv_freq = jnp.asarray(table, jnp.float32)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    rotated = rotated.astype(x.dtype)
    if enabled is None:
        return rotated
    return jnp.where(enabled, rotated, x)
