"""``ChannelSettling``: the destination's answer to ``settle``.

Before it pauses its guest, the source asks the destination to tell it when
everything sent so far has landed: the sync records of the last pass are in
on every channel and the chunk root is current (the stale blocks the
passes left, those the receive path could not take, are rehashed now). The guest
still runs on the source meanwhile, so neither the channels' backlog (socket
buffers, a receiver behind the sender) nor the scattered chunks of earlier
passes wait inside the downtime: only what the final pass sends does.

The answer carries what it measured: how long the channels took to land
the pass, and how many chunks the rehash took in how long, which gives the
source the per-chunk cost it plans ``dest-digest`` with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mig import faults
from mig.clock import Clock
from mig.protocol import Settle, Settled

__all__ = ["ChannelSettling", "SETTLE_POLL", "settle"]

# Seconds between looks at the channels' sync count while a settle waits.
SETTLE_POLL = 0.002


class ChannelSettling:
    def __init__(self, clock: Clock, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._pending: tuple[int, int, float] | None = None

    @property
    def waiting(self) -> bool:
        return self._pending is not None

    def request(self, number: int, syncs_due: int) -> None:
        """``settle`` for pass ``number``: the channels owe ``syncs_due`` sync records."""
        self._pending = (number, syncs_due, self.clock.now())

    def poll(self, ep: Any, syncs: int | None) -> Settled | None:
        """The answer, once the channels hold the pass (or cannot say, or
        ``timeout`` passed: the source then pays the rest in its downtime)."""
        if self._pending is None:
            return None
        number, due, since = self._pending
        now = self.clock.now()
        if syncs is not None and syncs < due and now - since < self.timeout:
            return None
        self._pending = None
        stale = int(ep.stats().get("stale-chunks", 0))
        root = getattr(ep, "memory_root", None)
        t0 = self.clock.now()
        # Rehashes exactly the stale chunks, GIL released (None: no digest kept).
        if root is None or root() is None:
            stale = 0
        return Settled(number, now - since, stale, self.clock.now() - t0)


def settle(
    control: Any,
    clock: Clock,
    number: int,
    generation: int,
    timeout: float,
    check_cancel: Callable[[], None],
) -> Settled | None:
    """Source: ask for ``settled`` on pass ``number`` and wait for it, the
    guest still running. None after ``timeout``: the switchover goes on and
    pays what is left in its downtime (``drain``, ``dest-digest``)."""
    control.send(Settle(number, generation))
    faults.point("source.settle")
    deadline = clock.now() + timeout
    while clock.now() < deadline:
        check_cancel()
        message = control.link.recv(SETTLE_POLL)
        if isinstance(message, Settled) and message.number == number:
            return message
        if message is not None:
            control.dispatch(message)
    return None
