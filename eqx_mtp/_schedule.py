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
    values, starts = piecewise_constant(text, "mtp_weight", "'0.3@0,0.1@800'")

    def schedule(step):
        index = jnp.sum(jnp.asarray(step) >= jnp.asarray(starts[1:], jnp.int32))
        return jnp.asarray(values, jnp.float32)[index]

    return schedule


def piecewise_constant(
    text: str, name: str, example: str
) -> tuple[list[float], list[int]]:
    """The values and start steps of `"value@step,..."`; the steps must start at 0 and
    increase. Errors name `name` and show `example`."""
    values, starts = [], []
    for part in text.split(","):
        value, _, start = part.partition("@")
        try:
            values.append(float(value))
            starts.append(int(start))
        except ValueError:
            raise ValueError(
                f"{name}: cannot read {part.strip()!r} in {text!r}; expected "
                f"'value@step' pairs such as {example}"
            ) from None
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(
            f"{name}: schedule steps must start at 0 and increase, got {text!r}"
        )
    return values, starts
