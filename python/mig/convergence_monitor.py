"""``ConvergenceMonitor``: after every RAM sync, feed auto-converge and the
non-convergence detector, and watch whether the fixed switchover costs alone
exceed the downtime limit.

It samples once per period (``min_period`` of the auto-converge mode, else
1 s) with the guest running, sets the throttle auto-converge asks for, and
records the first reason the migration does not converge (failing the
migration when ``non_convergence_action`` is ``fail``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mig.clock import Clock
from mig.converge import NonConvergenceDetector, SyncSample, make_auto_converge
from mig.errors import MigrationEnded
from mig.memory import Guest
from mig.notifier import Notifier
from mig.params import MigrationParams

__all__ = ["ConvergenceMonitor", "SyncFigures"]

# Periods the fixed costs must stay over the limit before it is a reason.
_COSTS_OVER_PERIODS = 3


@dataclass(frozen=True)
class SyncFigures:
    """What the loop knows right after a RAM sync."""

    now: float
    sent_total: int  # wire bytes so far
    new_dirty_bytes: int  # pages the sync found newly dirty, in bytes
    remaining: int  # known dirty bytes
    bandwidth: float
    threshold: int
    overhead: float  # fixed switchover costs, s
    guest_stopped: bool


class ConvergenceMonitor:
    def __init__(
        self, params: MigrationParams, guest: Guest, clock: Clock, notify: Notifier
    ) -> None:
        self.params = params
        self.guest = guest
        self.notify = notify
        self.auto_converge = make_auto_converge(
            params.auto_converge,
            params.cpu_throttle_initial,
            params.cpu_throttle_increment,
            params.cpu_throttle_tailslow,
            params.max_cpu_throttle,
        )
        self._detector = NonConvergenceDetector()
        self.throttle = 0.0
        self.reason: str | None = None
        self._reason_from_costs = False
        self._costs_over = 0
        self._since = clock.now()
        self._sent_at_start = 0
        self._dirty = 0

    def start(self, now: float, sent_total: int) -> None:
        self._since, self._sent_at_start, self._dirty = now, sent_total, 0

    def periodic_sync_due(self, now: float, last_sync: float | None) -> bool:
        """Auto-converge wants a sync at least every ``sync_interval``."""
        converge = self.auto_converge
        return converge is not None and now - (last_sync or 0.0) >= converge.sync_interval

    def on_sync(self, figures: SyncFigures) -> None:
        self._dirty += figures.new_dirty_bytes
        period = figures.now - self._since
        min_period = self.auto_converge.min_period if self.auto_converge else 1.0
        if period < min_period or figures.guest_stopped:
            return
        sample = SyncSample(
            period=period,
            dirty_bytes=self._dirty,
            sent_bytes=figures.sent_total - self._sent_at_start,
            bandwidth=figures.bandwidth,
            throttle=self.throttle,
            remaining=figures.remaining,
            threshold=figures.threshold,
        )
        self.start(figures.now, figures.sent_total)
        if self.auto_converge is not None:
            pct = self.auto_converge.on_sync(sample)
            if pct is not None:
                self.throttle = pct
                self.guest.set_throttle(pct)
                self.notify.event("throttle", pct=pct)
        exhausted = (
            self.auto_converge is None or self.throttle >= self.params.max_cpu_throttle / 100
        )
        detected = self._detector.on_sync(sample, exhausted)
        reason = detected or self._costs_exceed_limit(figures.overhead)
        if self._costs_over == 0 and self._reason_from_costs:
            self.clear_costs_reason()  # the fixed costs came back under the limit
        if reason and self.reason is None:
            self.reason = reason
            self._reason_from_costs = detected is None
            self.notify.event("non-convergence", reason=reason)
            if self.params.non_convergence_action == "fail":
                raise MigrationEnded("failed", f"not converging: {reason}")

    def _costs_exceed_limit(self, overhead: float) -> str | None:
        """A reason once the fixed costs alone stay over the limit for 3 periods."""
        fixed, limit = overhead * 1000, self.params.downtime_limit
        self._costs_over = self._costs_over + 1 if fixed >= limit else 0
        if self._costs_over < _COSTS_OVER_PERIODS:
            return None
        return f"fixed switchover costs of {fixed:.0f} ms exceed the downtime limit of {limit} ms"

    def clear_costs_reason(self) -> None:
        """The policy chose to switch over, or the costs fell: they fit after all."""
        if self._reason_from_costs:
            self.reason = None
            self._reason_from_costs = False

    def remove_aids(self) -> None:
        """Throttle and dirty limit off: the guest runs at full speed again."""
        if self.throttle:
            self.guest.set_throttle(0.0)
            self.throttle = 0.0
        if self.params.dirty_limit:
            self.guest.set_dirty_limit(0)  # type: ignore[attr-defined]
