"""Which fault stream the push follows, in virtual time: the simulator's
twin of ``rust/src/postcopy/fault_streams.rs`` (``postcopy_push_order``
``stream``), rule for rule.

A request is answered with its chunk (the cursor moving after it and its
read-ahead) unless the push follows a live stream (a hit within
``STREAM_LIVE``) and the request is not near the cursor: then with its
page alone. A request that takes the cursor is followed when it is the
first of the phase, lands near the cursor, or lands where a recent request
that took the cursor left it (a trail): deciding from the cursor alone
made the outcome depend on the order two vCPUs faulted in (each took the
cursor away from the other's walk, so no stream was ever followed, or one
was, as it happened).
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "READ_AHEAD", "STREAM_LIVE", "STREAM_REACH", "TRAIL_REACH", "TRAILS", "Answer",
    "FaultStreams",
]  # fmt: skip

READ_AHEAD = 3  # outgoing.rs READ_AHEAD
STREAM_REACH = READ_AHEAD + 2  # fault_streams.rs: chunks either side of the cursor
STREAM_LIVE = 10e-3  # fault_streams.rs: how long after its last hit a stream lives
TRAIL_REACH = 1  # fault_streams.rs: chunks past where a request left the cursor
TRAILS = 4  # fault_streams.rs: requests that took the cursor remembered


class Answer(Enum):
    CHUNK = "chunk"  # its chunk and read-ahead; the cursor moves after them
    PAGE_ALONE = "page-alone"  # its page alone; the cursor stays


class FaultStreams:
    """``fault_streams.rs`` ``FaultStreams``: the followed stream's last hit
    and where recent requests left the cursor (chunk, time), at most ``TRAILS``."""

    def __init__(self) -> None:
        self.followed: float | None = None
        self.started = False
        self.trails: list[tuple[int, float]] = []

    def answer(self, c: int, cursor: int, now: float) -> Answer:
        """How to answer a request for chunk ``c`` at ``now``, the cursor at ``cursor``."""
        on_cursor = abs(c - cursor) <= STREAM_REACH
        if self.followed is not None and now - self.followed < STREAM_LIVE and not on_cursor:
            return Answer.PAGE_ALONE
        # The first request is the guest's first locality.
        shows_stream = not self.started or on_cursor or self._continued(c, now) is not None
        self.started = True
        self.followed = now if shows_stream else None
        return Answer.CHUNK

    def took_cursor(self, c: int, left: int, now: float) -> None:
        """The request for ``c`` left the cursor at ``left``: a trail, in place of
        the one it continued, or of the oldest."""
        i = self._continued(c, now)
        if i is None and len(self.trails) < TRAILS:
            self.trails.append((left, now))
            return
        if i is None:
            i = min(range(TRAILS), key=lambda j: self.trails[j][1])
        self.trails[i] = (left, now)

    def _continued(self, c: int, now: float) -> int | None:
        """The live trail ``c`` continues, if any."""
        for i, (left, at) in enumerate(self.trails):
            if now - at < STREAM_LIVE and left <= c <= left + TRAIL_REACH:
                return i
        return None
