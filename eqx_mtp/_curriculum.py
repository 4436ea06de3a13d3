"""Depth curricula: which MTP depths train, and with what weight, as a function of the
step."""

from __future__ import annotations

import bisect
import dataclasses
import math

import numpy as np

from ._schedule import piecewise_constant

_NAME = "depth_schedule"
_FORMS = (
    "'forward' or 'reverse' (optionally with one step per depth: "
    "'forward@100,200'), or per-depth weights 'DEPTH:WEIGHT@STEP,...;...' such as "
    "'1:0@0,1@200;2:0@0,1@400'"
)


@dataclasses.dataclass(frozen=True)
class DepthSchedule:
    """Per-depth weights `w_1 … w_D` as a piecewise-constant function of the
    (0-based) step, made by [`eqx_mtp.parse_depth_schedule`][].

    A depth of weight 0 is off. Off depths beyond the last one on are not computed,
    so the number of depths run (`active_depths(step)`) is the 1-based index of the
    last depth on: a sequential depth reads the one before it, so the depths that
    run are always the first few, and an off depth among them runs with weight 0.

    **Fields:**

    - `starts`: the steps at which the weights change, increasing, from 0.
    - `weights`: one tuple of `D` non-negative weights per start.
    """

    starts: tuple[int, ...]
    weights: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        starts, weights = self.starts, self.weights
        if (
            not starts
            or starts[0] != 0
            or any(b <= a for a, b in zip(starts, starts[1:]))
        ):
            raise ValueError(
                f"DepthSchedule: starts must begin at 0 and increase, got {starts}"
            )
        widths = {len(w) for w in weights}
        if len(weights) != len(starts) or len(widths) != 1:
            raise ValueError(
                "DepthSchedule: weights must hold one tuple of the same length per "
                f"start, got {len(weights)} for {len(starts)} starts"
            )
        for stage in weights:
            if not all(math.isfinite(w) and w >= 0 for w in stage):
                raise ValueError(
                    "DepthSchedule: weights must be finite and non-negative, got "
                    f"{stage}"
                )

    @property
    def num_depths(self) -> int:
        """`D`, the number of depths the schedule weighs."""
        return len(self.weights[0])

    def depth_weights(self, step: int) -> np.ndarray:
        """The `[D]` float32 weights at `step` (0-based): the `depth_weights` of
        [`eqx_mtp.train.train_step`][]."""
        if step < 0:
            raise ValueError(f"DepthSchedule: step must be >= 0, got {step}")
        stage = bisect.bisect_right(self.starts, step) - 1
        return np.asarray(self.weights[stage], np.float32)

    def stage(self, step: int) -> dict:
        """`depth_weights` and `active_depths` at `step`, as keyword arguments of
        [`eqx_mtp.train.train_step`][]: `train_step(..., **schedule.stage(step))`."""
        return dict(
            depth_weights=self.depth_weights(step),
            active_depths=self.active_depths(step),
        )

    def active_depths(self, step: int) -> int:
        """How many depths run at `step`: the 1-based index of the last depth whose
        weight is positive, 0 when none is (the `active_depths` of
        [`eqx_mtp.train.train_step`][]). It changes only where a stage starts, and
        each value is one compiled program."""
        on = np.flatnonzero(self.depth_weights(step) > 0)
        return int(on[-1]) + 1 if on.size else 0


def parse_depth_schedule(
    spec: str | DepthSchedule, *, num_depths: int, steps: int | None = None
) -> DepthSchedule:
    """Read a depth curriculum (`--depth-schedule`): which of the `num_depths` MTP
    depths train at each (0-based) step, and with what weight.

    - `"forward"`: the depths switch on one by one, nearest first: the run is cut
        into `D + 1` equal stages (of `steps`), and stage `s` trains depths `1 … s`
        (stage 0 is plain next-token training). `"forward@100,200"` gives the `D`
        steps at which depth 1, 2, … switches on.
    - `"reverse"`: every depth on, then switched off one by one, farthest first: in
        stage `s` depths `1 … D - s` train (the last stage is next-token training).
        `"reverse@100,200"` gives the `D` steps at which depth `D`, `D - 1`, …
        switches off.
    - Per-depth weights: `"1:0@0,1@200;2:0@0,1@400"` — for each depth `k` named, its
        weight as a constant (`"2:0.5"`) or a schedule in the form of
        [`eqx_mtp.parse_mtp_weight`][]'s (`value@step`, from step 0); parts are
        separated by `;`, and a depth not named weighs 1 throughout.

    A depth that is on weighs 1 in `forward` and `reverse`; the weights are those of
    [`eqx_mtp.reduce_losses`][]'s `depth_weights`, so λ stays the total MTP weight
    whatever number of depths is on.

    **Arguments:**

    - `spec`: the schedule, or a [`eqx_mtp.DepthSchedule`][] (returned as it is after
        its number of depths is checked).
    - `num_depths`: the model's `D >= 1`.
    - `steps`: the run's number of steps, which `forward` and `reverse` without
        steps of their own divide into stages; it must be at least `D + 1`.

    **Returns:**

    A [`eqx_mtp.DepthSchedule`][].

    **Raises:**

    `ValueError` naming `depth_schedule` when the text cannot be read, a depth lies
    outside `1 … num_depths`, a weight is negative, or steps are missing or out of
    order.
    """
    if not isinstance(num_depths, int) or num_depths < 1:
        raise ValueError(
            f"{_NAME}: a depth curriculum needs MTP depths (num_depths >= 1), got "
            f"num_depths={num_depths!r}"
        )
    if isinstance(spec, DepthSchedule):
        if spec.num_depths != num_depths:
            raise ValueError(
                f"{_NAME}: the schedule weighs {spec.num_depths} depths, the model "
                f"has {num_depths}"
            )
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{_NAME}: expected {_FORMS}, got {spec!r}")
    text = spec.strip()
    form, _, given = text.partition("@")
    if form.strip() in ("forward", "reverse"):
        switches = _switch_steps(given, spec, num_depths, steps)
        return _stages(form.strip(), switches)
    return _per_depth(text, num_depths)


def _switch_steps(given: str, spec: str, num_depths: int, steps: int | None) -> list:
    """The `D` steps at which `forward`/`reverse` change stage: given, or the run's
    `steps` divided evenly."""
    if given.strip():
        try:
            switches = [int(part) for part in given.split(",")]
        except ValueError:
            raise ValueError(
                f"{_NAME}: cannot read the steps of {spec!r}; expected one integer "
                f"per depth, such as 'forward@100,200' for 2 depths"
            ) from None
        if len(switches) != num_depths:
            raise ValueError(
                f"{_NAME}: {spec!r} gives {len(switches)} step(s); the model has "
                f"{num_depths} depth(s), one step each"
            )
    else:
        if steps is None or steps < num_depths + 1:
            raise ValueError(
                f"{_NAME}: {spec!r} cuts the run into {num_depths + 1} stages, so it "
                f"needs the run's steps (at least {num_depths + 1}), got {steps!r}"
            )
        switches = [s * steps // (num_depths + 1) for s in range(1, num_depths + 1)]
    if switches[0] < 1 or any(b <= a for a, b in zip(switches, switches[1:])):
        raise ValueError(
            f"{_NAME}: the steps of {spec!r} must be >= 1 and increase, got {switches}"
        )
    return switches


def _stages(form: str, switches: list) -> DepthSchedule:
    num_depths = len(switches)
    weights = []
    for stage in range(num_depths + 1):
        on = stage if form == "forward" else num_depths - stage
        weights.append(tuple(1.0 if k < on else 0.0 for k in range(num_depths)))
    return DepthSchedule((0, *switches), tuple(weights))


def _per_depth(text: str, num_depths: int) -> DepthSchedule:
    pieces = {}
    for part in text.split(";"):
        depth, colon, schedule = part.partition(":")
        try:
            k = int(depth)
        except ValueError:
            k = None
        if not colon or k is None:
            raise ValueError(
                f"{_NAME}: cannot read {part.strip()!r}; expected {_FORMS}"
            )
        if not 1 <= k <= num_depths or k in pieces:
            raise ValueError(
                f"{_NAME}: depth {k} in {text!r} must be one of 1 … {num_depths}, "
                "named once"
            )
        schedule = schedule.strip()
        if "@" not in schedule:
            schedule += "@0"
        values, starts = piecewise_constant(schedule, _NAME, "'0@0,1@200'")
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(
                f"{_NAME}: the weights of depth {k} must be finite and >= 0, got "
                f"{values}"
            )
        pieces[k] = (starts, values)
    starts = sorted({s for steps, _ in pieces.values() for s in steps})
    weights = []
    for step in starts:
        stage = []
        for k in range(1, num_depths + 1):
            if k not in pieces:
                stage.append(1.0)
                continue
            steps, values = pieces[k]
            stage.append(values[bisect.bisect_right(steps, step) - 1])
        weights.append(tuple(stage))
    return DepthSchedule(tuple(starts), tuple(weights))
