"""``GuestStops``: pausing and resuming the source guest, and what it cost.

The guest stops for an exact size (``stop-and-exact``) and for the
switchover; every stop is counted and timed for ``query()`` and the policies.
While the guest is stopped, Python's collector is held off
(``mig.collector``): a collection there would add to the stop.
"""

from __future__ import annotations

from mig import faults
from mig.clock import Clock
from mig.collector import CollectorHold
from mig.memory import Guest
from mig.notifier import Notifier
from mig.stats import SwitchoverCosts

__all__ = ["GuestStops"]


class GuestStops:
    def __init__(
        self, guest: Guest, clock: Clock, costs: SwitchoverCosts, notify: Notifier
    ) -> None:
        self.guest = guest
        self.clock = clock
        self.costs = costs
        self.notify = notify
        self.paused = False
        self.paused_at = 0.0
        self.count = 0
        self.stopped_time = 0.0
        self.last_stop_at: float | None = None
        self.collector = CollectorHold()

    def pause(self) -> None:
        self.collector.hold()
        self.paused_at = self.clock.now()
        self.paused = True
        self.costs.pause = float(self.guest.pause())
        self.notify.event("guest-stop")
        faults.point("source.guest-stop")

    def resume(self) -> None:
        """End a stop the migration survives: count it."""
        self.collector.release()
        self.guest.resume()
        self.paused = False
        now = self.clock.now()
        self.count += 1
        self.stopped_time += now - self.paused_at
        self.last_stop_at = now
        self.notify.event("guest-resume")

    def run_again(self) -> None:
        """Rollback or ``resume_source()``: the guest runs, nothing is counted."""
        self.collector.release()
        self.guest.resume()
        self.paused = False

    def downtime_over(self) -> None:
        """The guest runs on the destination (or the migration ended): the
        source's guest stays stopped, but no downtime waits on this side."""
        self.collector.release()
