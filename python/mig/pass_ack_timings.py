"""``PassAckTimings``: what the destination measures for the source's plan.

Every ``pass-ack`` carries three figures of this side, measured on this host
under its current load: how long the destination's loop was busy away from
the control channel (a ``complete`` may wait that long), how far the data
channels trail the control channel (the end records wait behind it the same
way), and, with ``verify`` strict only, how long one whole digest of memory
takes (the check strict runs before resuming; its cost grows as pages land).
The digest is timed in the background, at most every ``DIGEST_TIMING_EVERY``
seconds; other modes never time it, as it would only steal CPU.
"""

from __future__ import annotations

import threading
from typing import Any

from mig.clock import Clock
from mig.protocol import PassAck
from mig.stats import digest_cost

__all__ = ["DIGEST_TIMING_EVERY", "PassAckTimings"]

# Seconds between timings of our whole digest: seldom, as one that is still
# running when a switchover starts adds to its downtime.
DIGEST_TIMING_EVERY = 3.0


class PassAckTimings:
    def __init__(self, memory: Any, clock: Clock) -> None:
        self.memory = memory
        self.clock = clock
        self._busy = 0.0
        self._drain_target: tuple[int, float] | None = None
        self._drain: float | None = None
        self._timer: threading.Thread | None = None
        self._digest_seconds: float | None = None
        self._timed_at = 0.0

    def busy(self, seconds: float) -> None:
        """The loop spent ``seconds`` away from the control channel."""
        self._busy = max(self._busy, seconds)

    def pass_announced(self, syncs_due: int) -> None:
        """A ``pass`` arrived: the channels owe ``syncs_due`` sync records by now."""
        if self._drain_target is None:
            self._drain_target = (syncs_due, self.clock.now())

    def channels_hold(self, syncs: int | None) -> None:
        """The channels hold ``syncs`` sync records (None: not counted)."""
        if self._drain_target is None:
            return
        target, since = self._drain_target
        if syncs is None:
            self._drain_target = None  # an endpoint without the counter
        elif syncs >= target:
            lag = self.clock.now() - since
            self._drain = lag if self._drain is None else max(self._drain, lag)
            self._drain_target = None

    def settle(self) -> None:
        """A switchover started: a digest being timed ends before ours runs."""
        if self._timer is not None:
            self._timer.join()
            self._timer = None

    def answer(self, number: int, strict: bool) -> PassAck:
        """The ``pass-ack`` for pass ``number``; starts a digest timing when due."""
        drain, self._drain = self._drain, None
        busy, self._busy = self._busy, 0.0
        digest = None
        timer = self._timer
        if timer is not None and not timer.is_alive():
            timer.join()
            self._timer = None
            digest = self._digest_seconds
        now = self.clock.now()
        if strict and self._timer is None and now - self._timed_at >= DIGEST_TIMING_EVERY:
            self._timed_at = now

            def measure() -> None:
                self._digest_seconds = digest_cost(self.memory)

            self._timer = threading.Thread(target=measure, name="mig-digest-cost", daemon=True)
            self._timer.start()
        return PassAck(number, busy, drain, digest)
