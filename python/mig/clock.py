"""Time as the migration loop sees it.

The loop never calls ``time.monotonic()`` or ``time.sleep()`` itself: it asks a
``Clock``. ``MonotonicClock`` is wall time; ``VirtualClock`` is advanced by the
code that models the guest and the link, so the same loop and policies run in
virtual time (simulation, deterministic tests).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "MonotonicClock", "VirtualClock"]


@runtime_checkable
class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (the origin is arbitrary)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass (a virtual clock just advances)."""
        ...


class MonotonicClock:
    """Wall time: ``time.monotonic`` and ``time.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class VirtualClock:
    """Time that moves only when someone calls ``advance`` or ``sleep``.

    Listeners registered with ``on_advance(fn)`` are called with
    ``(old, new)`` after every advance: a simulated guest uses this to dirty
    the pages it would have written in that interval.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._t = float(start)
        self._lock = threading.Lock()
        self._listeners: list = []

    def now(self) -> float:
        return self._t

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot advance a clock by {seconds} s")
        with self._lock:
            old = self._t
            self._t = old + seconds
            new = self._t
        for fn in list(self._listeners):
            fn(old, new)

    def on_advance(self, fn) -> None:
        self._listeners.append(fn)
