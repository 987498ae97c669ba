"""Convergence aids: auto-converge throttling and non-convergence detection.

Both read one ``SyncSample`` per dirty-sync period: bytes the guest dirtied,
bytes the link sent, the period, the bandwidth estimate and the throttle in
force. They return a new throttle (auto-converge) or a reason (detector).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SyncSample",
    "QemuAutoConverge",
    "ProportionalAutoConverge",
    "NonConvergenceDetector",
    "make_auto_converge",
]


@dataclass(frozen=True)
class SyncSample:
    period: float  # seconds covered
    dirty_bytes: int  # pages written in the period × page size
    sent_bytes: int  # wire bytes sent in the period
    bandwidth: float  # smoothed bytes/s
    throttle: float  # fraction of vCPU time slept during the period (0-0.99)
    remaining: int = 0  # known dirty bytes right after the sync
    threshold: int = 0  # bytes that fit the downtime limit


class QemuAutoConverge:
    """QEMU's ``migration_trigger_throttle`` + ``mig_throttle_guest_down``.

    Checked on syncs at least ``min_period`` (1 s) apart: when the guest dirtied
    more than ``trigger`` (50 %) of what was sent, twice (the counter resets
    only when it fires), set ``initial`` then add ``increment`` up to ``maximum``
    (percent), or with ``tailslow`` the smaller of the increment and the gap
    to the ideal CPU share. Periodic sync every 5 s.
    """

    mode = "qemu"
    min_period = 1.0
    sync_interval = 5.0

    def __init__(
        self,
        initial: int = 20,
        increment: int = 10,
        tailslow: bool = False,
        maximum: int = 99,
        trigger: int = 50,
    ) -> None:
        if not (1 <= initial <= 99 and 1 <= increment <= 99 and 1 <= maximum <= 99):
            raise ValueError("cpu_throttle_initial/increment/max must be in 1..99")
        self.initial = initial
        self.increment = increment
        self.tailslow = tailslow
        self.maximum = maximum
        self.trigger = trigger
        self._high = 0
        self._pct = 0

    def on_sync(self, s: SyncSample) -> float | None:
        threshold = s.sent_bytes * self.trigger / 100
        if not (s.dirty_bytes > threshold):
            return None
        self._high += 1
        if self._high < 2:
            return None
        self._high = 0
        if self._pct == 0:
            self._pct = self.initial
        elif self.tailslow and s.dirty_bytes > 0:
            cpu_now = 100 - self._pct
            cpu_ideal = cpu_now * threshold / s.dirty_bytes
            self._pct += int(min(cpu_now - cpu_ideal, self.increment))
        else:
            self._pct += self.increment
        self._pct = min(self._pct, self.maximum)
        return self._pct / 100


class ProportionalAutoConverge:
    """mig's default: set the throttle from the measured rates at once.

    With the unthrottled dirty rate D (measured rate / (1 - throttle)) and
    bandwidth B, one pass of length T leaves D(1-t)T dirty bytes while it sends
    BT: the dirty set shrinks by D(1-t)/B per pass. Choosing
    ``t = 1 - ratio·B/D`` makes that factor ``ratio`` (0.5): geometric decay
    towards the threshold, with no two-strike delay and no 10 % steps. It is
    re-evaluated on every sync (periodic sync every ``sync_interval``); it only
    rises quickly and falls by at most ``relax`` per sync, to avoid oscillation.
    """

    mode = "proportional"
    min_period = 0.2
    sync_interval = 0.5

    def __init__(self, ratio: float = 0.5, maximum: int = 99, relax: float = 0.1) -> None:
        if not 0 < ratio < 1 or not 1 <= maximum <= 99:
            raise ValueError("ratio in (0, 1) and max throttle in 1..99")
        self.ratio = ratio
        self.maximum = maximum / 100
        self.relax = relax

    def on_sync(self, s: SyncSample) -> float | None:
        if s.period <= 0 or s.bandwidth <= 0:
            return None
        rate = s.dirty_bytes / s.period
        raw = rate / max(1e-3, 1.0 - s.throttle)
        if raw <= 0:
            target = 0.0
        else:
            target = min(self.maximum, max(0.0, 1.0 - self.ratio * s.bandwidth / raw))
        if target < s.throttle:
            target = max(target, s.throttle - self.relax)
        return round(target, 3) if abs(target - s.throttle) > 1e-3 else None


class NonConvergenceDetector:
    """Reports a migration that cannot converge, early, with the reason.

    A check period strikes when, with no aid left (no throttle, or the throttle
    at its cap), either the guest dirtied at least as fast as the link sends,
    or the known dirty set after the sync did not shrink (>= 95 % of the
    previous one) while still above the threshold: the effective dirty rate
    matches what the link drains. ``strikes`` (3) in a row report.
    """

    def __init__(self, strikes: int = 3, shrink: float = 0.95) -> None:
        self.strikes = strikes
        self.shrink = shrink
        self._count = 0
        self._previous: int | None = None

    def on_sync(self, s: SyncSample, aid_exhausted: bool) -> str | None:
        if s.period <= 0 or s.bandwidth <= 0:
            return None
        rate = s.dirty_bytes / s.period
        stuck = (
            self._previous is not None
            and s.remaining >= self.shrink * self._previous
            and s.remaining > s.threshold
        )
        self._previous = s.remaining
        if aid_exhausted and (rate >= s.bandwidth or stuck):
            self._count += 1
        else:
            self._count = 0
        if self._count < self.strikes:
            return None
        return (
            f"dirty rate {rate / 1e6:.1f} MB/s exceeds what the bandwidth"
            f" {s.bandwidth / 1e6:.1f} MB/s drains: {s.remaining / 1e6:.1f} MB stay dirty,"
            f" above the {s.threshold / 1e6:.1f} MB threshold, for {self._count} periods"
        )


def make_auto_converge(
    mode: bool | str,
    initial: int = 20,
    increment: int = 10,
    tailslow: bool = False,
    maximum: int = 99,
) -> QemuAutoConverge | ProportionalAutoConverge | None:
    """``auto_converge``: False/None (off), True or "proportional", or "qemu"."""
    if mode in (False, None, "", "off"):
        return None
    if mode is True or mode == "proportional":
        return ProportionalAutoConverge(maximum=maximum)
    if mode == "qemu":
        return QemuAutoConverge(initial, increment, tailslow, maximum)
    raise ValueError(f"auto_converge must be False, True, 'proportional' or 'qemu', not {mode!r}")
