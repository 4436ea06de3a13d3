"""One budget for every configuration of `learning.py`: steps, seconds or model FLOPs,
and the number of steps each configuration gets under it.

A step's cost depends on how many depths it computes (a depth curriculum switches
them on and off): a configuration's cost is a table `costs[k]`, the cost of one step
that runs `k` depths, and a run of `N` steps costs `sum(costs[k_s])` over its steps'
counts `k_s` ([`active_depths`][], which reads the run's curriculum). Model FLOPs come
from the FLOP model (`_flops.step_flops`), seconds from a probe of the configuration
(`learning.py` measures them). The steps a budget gives are the largest `N` whose cost
stays within it ([`steps_within`][]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from _flops import step_flops

KINDS = ("steps", "seconds", "flops")


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every configuration may spend: `kind` (`"steps"`, `"seconds"` or
    `"flops"`) and either an `amount` of it, or a `reference`, `(name, steps)`: what
    configuration `name` spends in that many steps."""

    kind: str
    amount: float | None = None
    reference: tuple[str, int] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"budget kind must be one of {KINDS}, got {self.kind!r}")
        if (self.amount is None) == (self.reference is None):
            raise ValueError("a budget is an amount or a reference, exactly one")
        if self.amount is not None and not self.amount > 0:
            raise ValueError(f"a budget must be > 0, got {self.amount}")
        if self.reference is not None and self.reference[1] < 1:
            raise ValueError(f"a reference needs >= 1 steps, got {self.reference}")

    def describe(self) -> str:
        unit = dict(steps="steps", seconds="seconds of training", flops="model FLOPs")
        if self.amount is not None:
            return f"{self.amount:g} {unit[self.kind]}"
        name, steps = self.reference
        return f"the {unit[self.kind]} of {name} for {steps} steps"


def parse_budget(kind: str, text: str) -> Budget:
    """`--budget-<kind>`'s value: a number (`"3e15"`, `"600"`) or `"NAME:STEPS"`, what
    configuration NAME spends in STEPS steps (not for `steps`).

    **Raises:**

    `ValueError` naming the flag when the text is neither.
    """
    flag = f"--budget-{kind}"
    name, colon, steps = text.partition(":")
    if colon:
        if kind == "steps" or not steps.strip().isdigit() or not name.strip():
            raise ValueError(
                f"{flag} takes a number"
                + ("" if kind == "steps" else " or NAME:STEPS (e.g. d0:300)")
                + f", got {text!r}"
            )
        return Budget(kind, reference=(name.strip(), int(steps)))
    try:
        amount = float(text)
    except ValueError:
        raise ValueError(
            f"{flag} takes a number or NAME:STEPS (e.g. d0:300), got {text!r}"
        ) from None
    if not amount > 0 or (kind == "steps" and amount != int(amount)):
        raise ValueError(
            f"{flag} must be a positive {'integer' if kind == 'steps' else 'number'}, "
            f"got {text!r}"
        )
    return Budget(kind, amount=amount)


def active_depths(config) -> list[int]:
    """How many depths each step of a run computes (index: the 0-based step), by its
    depth curriculum; every depth at every step without one.

    **Arguments:**

    - `config`: an `eqx_mtp.train.TrainConfig`.
    """
    num_depths, steps = config.model.num_depths, config.run.steps
    spec = getattr(config.objective, "depth_schedule", None)
    if spec is None:
        return [num_depths] * steps
    curriculum = getattr(config, "depth_curriculum", None)
    if curriculum is None:
        raise NotImplementedError(
            "this TrainConfig has a depth_schedule but no depth_curriculum(): the "
            "budget cannot count its depths"
        )
    schedule = curriculum()
    return [schedule.active_depths(step) for step in range(steps)]


def flops_per_step(config) -> list[float]:
    """Model FLOPs of one training step of `config` (an
    `eqx_mtp.train.TrainConfig`) that computes `k` depths, for `k = 0 … D`.

    The FLOP model's depth part is `D` equal terms (`_flops.step_flops`), so a step
    of `k` depths costs the whole step less `D - k` of them.
    """
    model = config.model
    flops = step_flops(model, batch=config.data.batch_size, seq=config.data.seq_len)
    total, depths = flops["model"]["total"], flops["model"]["depths"]
    num_depths = model.num_depths
    if num_depths == 0:
        return [float(total)]
    per_depth = depths / num_depths
    return [float(total - (num_depths - k) * per_depth) for k in range(num_depths + 1)]


def run_cost(costs: Sequence[float], depths: Sequence[int]) -> float:
    """What a run spends: the sum over its steps of `costs[depths[step]]`."""
    return float(sum(costs[k] for k in depths))


def cumulative_cost(costs: Sequence[float], depths: Sequence[int]) -> list[float]:
    """What a run has spent after each step: entry `s` after step `s + 1`."""
    spent, total = [], 0.0
    for k in depths:
        total += costs[k]
        spent.append(total)
    return spent


def steps_within(cost: Callable[[int], float], budget: float, *, limit: int) -> int:
    """The largest number of steps `N <= limit` with `cost(N) <= budget`, for a
    `cost` that grows with `N` (a run of more steps computes more); 0 when even one
    step is over.

    **Arguments:**

    - `cost`: what a run of `N` steps spends (its curriculum may depend on `N`).
    - `budget`: what it may spend.
    - `limit`: an upper bound on the answer, e.g. `budget` over the cheapest step.
    """
    if limit < 1 or cost(1) > budget:
        return 0
    low, high = 1, limit  # cost(low) <= budget; the answer lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low
