"""Where a compiled program's time goes, op by op: JAX's profiler trace of a few
calls, summed by the kind of operation XLA ran (its fusions' names without their
numbers: `ynn_fusion`, `dot`, `transpose_copy_fusion`, …)."""

from __future__ import annotations

import collections
import pathlib
import re
import tempfile
from collections.abc import Callable

import jax

# Trace events that are not operations: the executor, loops and waits around them.
_NOT_OPS = re.compile(r"^(ThunkExecutor|while|end:|.*Await|PjitFunction|\$)")


def op_profile(program: Callable[[], object], calls: int, per: int) -> dict:
    """Microseconds per `per` (e.g. the rounds of a loop inside one call) of each
    kind of operation over `calls` calls of `program` (compiled and warm), and how
    many ran: `{"total_us": …, "ops": …, "kinds": [(kind, us, count), …]}`,
    the kinds most expensive first."""
    with tempfile.TemporaryDirectory(prefix="op-profile-") as directory:
        jax.profiler.start_trace(directory)
        for _ in range(calls):
            jax.block_until_ready(program())
        jax.profiler.stop_trace()
        path = sorted(pathlib.Path(directory).glob("**/*.xplane.pb"))[-1]
        data = jax.profiler.ProfileData.from_file(str(path))
        nanoseconds, counts = collections.Counter(), collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if line.name == "python":
                    continue
                for event in line.events:
                    if _NOT_OPS.match(event.name):
                        continue
                    kind = re.sub(r"[.\d]+$", "", event.name)
                    nanoseconds[kind] += event.duration_ns
                    counts[kind] += 1
    scale = 1e-3 / (calls * per)
    kinds = [
        (kind, ns * scale, counts[kind] / (calls * per))
        for kind, ns in nanoseconds.most_common()
    ]
    return _summary(kinds, len(kinds))


def _summary(kinds: list, kept: int) -> dict:
    """The profile of `kinds` (most expensive first): totals over all of them, the
    first `kept` listed."""
    return dict(
        total_us=sum(us for _, us, _ in kinds),
        ops=sum(count for _, _, count in kinds),
        kinds=kinds[:kept],
    )


def less(profile: dict, baseline: dict, kept: int = 12) -> dict:
    """`profile` with `baseline`'s time and counts taken off, kind by kind (e.g. a
    loop's program less its set-up alone); the totals over every kind, the `kept`
    most expensive kinds listed."""
    base = {kind: (us, count) for kind, us, count in baseline["kinds"]}
    kinds = [
        (kind, us - base.get(kind, (0, 0))[0], count - base.get(kind, (0, 0))[1])
        for kind, us, count in profile["kinds"]
    ]
    kinds.sort(key=lambda kind: -kind[1])
    return _summary(kinds, kept)


def format_profiles(profiles: dict[str, dict], top: int = 8) -> str:
    """A Markdown table: per program, its total op time and its `top` kinds."""
    lines = [
        "| part | op time µs | ops | most expensive kinds (µs, count) |",
        "|---|---|---|---|",
    ]
    for name, profile in profiles.items():
        kinds = ", ".join(
            f"{kind} {us:.0f} ({count:.0f})"
            for kind, us, count in profile["kinds"][:top]
        )
        lines.append(
            f"| {name} | {profile['total_us']:.0f} | {profile['ops']:.0f} | {kinds} |"
        )
    return "\n".join(lines)
