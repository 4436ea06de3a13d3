"""λ, the MTP loss weight: a constant or a piecewise-constant schedule of the step."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import ArrayLike, Float, Int

# λ: a constant, a scalar array, or an optax-style schedule of the (0-based) step.
MTPWeight = float | Float[ArrayLike, ""] | Callable[[Int[ArrayLike, ""]], ArrayLike]


def parse_mtp_weight(spec: str | float) -> MTPWeight:
    """Read `--mtp-weight`: a float (`"0.3"`), or a schedule `"0.3@0,0.1@800"` — λ is
    0.3 from step 0 and 0.1 from step 800 on (DeepSeek-V3's pair).

    **Returns:**

    A float, or a function of the (0-based) step returning λ as a float32 scalar; it
    accepts traced steps.
    """
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return float(spec)
    text = str(spec).strip()
    if "@" not in text:
        try:
            return float(text)
        except ValueError:
            raise ValueError(
                f"mtp_weight: expected a float or 'value@step,...', got {spec!r}"
            ) from None
    values, starts = [], []
    for part in text.split(","):
        value, sep, start = part.partition("@")
        try:
            values.append(float(value))
            starts.append(int(start))
        except ValueError:
            raise ValueError(
                f"mtp_weight: cannot read {part.strip()!r} in {spec!r}; expected "
                "'value@step' pairs such as '0.3@0,0.1@800'"
            ) from None
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(
            f"mtp_weight: schedule steps must start at 0 and increase, got {spec!r}"
        )

    def schedule(step):
        index = jnp.sum(jnp.asarray(step) >= jnp.asarray(starts[1:], jnp.int32))
        return jnp.asarray(values, jnp.float32)[index]

    return schedule
