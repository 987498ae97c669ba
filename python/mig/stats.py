"""Statistics: bandwidth windows, pass records, ``query-migrate`` fields.

Bandwidth choice: the loop samples ``bytes sent / seconds spent inside send
calls`` over windows of at least ``WINDOW`` (100 ms, QEMU's ``BUFFER_DELAY``)
of send time, then smooths the samples with an exponentially weighted moving
average (``ALPHA`` = 0.3: a new sample moves the estimate by 30 %, so one
outlier window cannot halve or double the threshold, while a real change is
followed within ~5 windows). The denominator is send time, not wall time:
the loop's own work (dirty syncs, policy decisions, guest stops for an exact
size) would otherwise read as a slower link, which is the underestimate the
QEMU thread complains about. A link capped by ``max_bandwidth`` spends the
cap's waits inside the send calls, so the estimate converges to the cap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["WINDOW", "ALPHA", "BandwidthMeter", "PassRecord"]

WINDOW = 0.100
ALPHA = 0.3


class BandwidthMeter:
    """Smoothed bandwidth from cumulative (bytes, send-seconds) readings."""

    def __init__(self, window: float = WINDOW, alpha: float = ALPHA) -> None:
        if window <= 0 or not 0 < alpha <= 1:
            raise ValueError("window must be > 0 and alpha in (0, 1]")
        self.window = window
        self.alpha = alpha
        self.smoothed = 0.0
        self.last_sample = 0.0
        self.samples = 0
        self._bytes0 = 0
        self._busy0 = 0.0
        self._bytes = 0
        self._busy = 0.0

    def update(self, transferred: int, busy: float) -> bool:
        """Feed cumulative totals; returns True when a window closed."""
        self._bytes, self._busy = transferred, busy
        span = busy - self._busy0
        if span < self.window:
            return False
        sample = (transferred - self._bytes0) / span
        self.last_sample = sample
        self.smoothed = (
            sample
            if self.samples == 0
            else (self.alpha * sample + (1 - self.alpha) * self.smoothed)
        )
        self.samples += 1
        self._bytes0, self._busy0 = transferred, busy
        return True

    def estimate(self) -> float:
        """Bytes/s: the smoothed value, or the open window's rate before the first one closes."""
        if self.samples:
            return self.smoothed
        span = self._busy - self._busy0
        return (self._bytes - self._bytes0) / span if span > 0 else 0.0


@dataclass(frozen=True)
class PassRecord:
    """One pass: the dirty sync that ends it and what was sent since the last one."""

    number: int
    time: float
    dirty_pages: int
    remaining: int
    bytes: int
    bandwidth: float
    estimate: int | None
    exact: int | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dirty-pages"] = d.pop("dirty_pages")
        return d
