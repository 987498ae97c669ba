"""Python's cyclic garbage collector, held off while a side's part of the downtime runs.

A collection runs on whichever thread's allocation sets it off, and holds
the interpreter while it walks its generation; a collection of the older
generations walks every tracked object the process holds (modules, numpy's,
the migration's own) and takes milliseconds. Nothing bounds when one is set
off, so one could land between the source's pause and the destination's
``resumed``: a ``mig demo`` destination that collected while it sent
``ready`` and ``resumed`` stretched the switchover's handshake term several
times over.

Each side holds the collector off (``CollectorHold``) while its part of the
downtime runs: the source from the guest's pause until the guest runs again
on either side, the destination from ``complete`` until ``resumed`` is out.
Holds count across the sides of an in-process migration: the collector runs
again once the last one is released, and then catches up, outside the
downtime. Meanwhile reference counting still frees every object that is not
in a cycle.
"""

from __future__ import annotations

import gc
import threading

__all__ = ["CollectorHold", "holds"]

_lock = threading.Lock()
_holds = 0
_was_enabled = False


def holds() -> int:
    """Holds taken and not yet released, in this process."""
    return _holds


class CollectorHold:
    """One owner's hold on the collector: ``hold`` and ``release`` are
    idempotent, so every path out of a downtime may release."""

    def __init__(self) -> None:
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def hold(self) -> None:
        global _holds, _was_enabled
        if self._held:
            return
        with _lock:
            if _holds == 0:
                # A collector its embedder disabled stays disabled after.
                _was_enabled = gc.isenabled()
                gc.disable()
            _holds += 1
            self._held = True

    def release(self) -> None:
        global _holds
        if not self._held:
            return
        with _lock:
            self._held = False
            _holds -= 1
            if _holds == 0 and _was_enabled:
                gc.enable()
