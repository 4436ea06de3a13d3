"""Stopping a run cleanly when its host is preempted: SIGTERM (or SIGINT) is turned
into a request to stop after the current step, agreed on by every process."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_PREEMPTED = 75
"""The exit code of a run stopped by SIGTERM or SIGINT after checkpointing the step it
was at (`EX_TEMPFAIL`: "try again"): a scheduler restarts the same command."""

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint of `step`."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(
            f"stopped by {signal_name} after step {step}, whose checkpoint is saved; "
            "run the same command to continue"
        )
        self.step = step
        self.signal_name = signal_name


class StopRequests:
    """While active (`with StopRequests() as stops:`), SIGTERM and SIGINT set a flag
    instead of killing the process; a second signal acts as usual (SIGINT interrupts
    at once). `stops.agreed()` tells, at the end of a step, whether any process of the
    run was signalled, so that every process stops after the same step.

    Signal handlers can only be installed from the main thread; elsewhere the flag is
    never set.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        # A second signal of either kind is not caught again.
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in _SIGNALS:
                self._previous[number] = signal.getsignal(number)
                signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        return False

    def agreed(self) -> bool:
        """Whether the run should stop now: this process was signalled, or, in a
        multi-process run, any process was (every process must call this at the same
        step: it is a collective)."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
        if np.any(flags) and self.signal_name is None:
            self.signal_name = "SIGTERM to another process"
        return bool(np.any(flags))
