"""Finishing the saves of Checkpointers left open at exit, before the interpreter
stops the threads that write them."""

from __future__ import annotations

# Imported before this module registers its exit hook, so that the hook runs first:
# threading's exit hooks run in reverse order, and concurrent.futures' hook refuses
# every later thread-pool job, which Orbax's background saves still need.
import concurrent.futures.thread  # noqa: F401 - see above
import sys
import threading
import weakref

import orbax.checkpoint as ocp


def _close_manager(manager: ocp.CheckpointManager) -> None:
    manager.close()


# Finalizers of the Checkpointers not closed yet (dead ones are pruned as new ones
# come), run by a threading exit hook: see `Checkpointer.__init__`.
_unclosed: list[weakref.finalize] = []
_exit_hook = threading.Lock()
_exit_hook_registered = False


def _finish_saves_at_exit() -> None:
    for finalizer in reversed(_unclosed):
        try:
            finalizer()
        except Exception as error:  # noqa: BLE001 - report, and close the others
            print(
                f"eqx_mtp: a checkpoint save did not finish at exit: "
                f"{type(error).__name__}: {error}",
                file=sys.stderr,
            )


def _close_at_exit(finalizer: weakref.finalize) -> None:
    global _exit_hook_registered
    with _exit_hook:
        _unclosed[:] = [f for f in _unclosed if f.alive]
        _unclosed.append(finalizer)
        if not _exit_hook_registered:
            # `atexit` (and `weakref.finalize`'s own exit call) run only after the
            # interpreter has joined Orbax's save threads and shut the thread pools
            # they need: too late. threading's exit hooks run before both.
            register = getattr(threading, "_register_atexit", None)
            if register is None:  # pragma: no cover - every CPython since 3.9 has it
                import atexit

                register = atexit.register
            register(_finish_saves_at_exit)
            _exit_hook_registered = True
