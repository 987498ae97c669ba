"""``Precopy``: the decide / exact / send loop while the guest runs.

One iteration (``decide``): read every handler's cheap estimate, ask the
policy, take exact sizes (with the guest running, or stopped) when it asks,
until the policy continues, switches over or gives up; ``send_slice`` then
sends one time slice of state. Every RAM sync ends a pass: it is recorded,
announced to the destination (``pass``) and fed to the convergence monitor.

The threshold is what the downtime limit leaves after the measured fixed
switchover costs (``mig.stats.SwitchoverCosts``), times the decision
bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mig import faults
from mig.clock import Clock
from mig.control import ControlSession
from mig.convergence_monitor import ConvergenceMonitor, SyncFigures
from mig.counting_link import CountingLink
from mig.device_stop_costs import DeviceStopCosts
from mig.guest_stops import GuestStops
from mig.handlers import RamHandler, SaveHandler
from mig.notifier import Notifier
from mig.params import MigrationParams
from mig.policies import Action, Decision, HandlerView, Policy, PolicyView
from mig.protocol import Pass
from mig.stats import BandwidthMeter, PassRecord, SwitchoverCosts

__all__ = ["Precopy"]

# One send slice lasts about this long (QEMU's ram_save_iterate MAX_WAIT).
_SLICE = 0.05
_SLICE_BYTES_BEFORE_ESTIMATE = 4 << 20
_IDLE = 0.005
# A budget no slice reaches: what a device has pending, all of it.
_NO_BUDGET = 1 << 62


class Precopy:
    """The precopy loop over ``ram`` and the ``devices``' save handlers."""

    def __init__(
        self,
        *,
        ram: RamHandler,
        devices: Sequence[SaveHandler],
        link: CountingLink,
        clock: Clock,
        params: MigrationParams,
        policy: Policy,
        stops: GuestStops,
        monitor: ConvergenceMonitor,
        control: ControlSession,
        costs: SwitchoverCosts,
        meter: BandwidthMeter,
        notify: Notifier,
        started_at: float,
    ) -> None:
        self.ram = ram
        self.devices = list(devices)
        self.link = link
        self.clock = clock
        self.params = params
        self.policy = policy
        self.stops = stops
        self.monitor = monitor
        self.control = control
        self.costs = costs
        self.meter = meter
        self.notify = notify
        self.started_at = started_at
        self.passes: list[PassRecord] = []
        self.pending_estimate: int | None = None
        self.pending_exact: int | None = None
        self._exact_cache: dict[str, tuple[int, float]] = {}
        self.stop_costs = DeviceStopCosts()
        self._bytes_at_pass = 0
        self.switchover_aborts = 0

    @property
    def handlers(self) -> list[SaveHandler]:
        """RAM first, then the devices: the order of every decision and send."""
        return [self.ram, *self.devices]

    # ----------------------------------------------------------- planning
    def bandwidth(self) -> float:
        """Bytes/s for decisions: avail_switchover_bandwidth, else the measured
        estimate less its own measured variation (``BandwidthMeter.conservative``).

        0 (nothing fits) until the meter closed its first window or the
        bulk pass ended: one slice's rate is no measure of the link (it
        varies widely from run to run on one host, and at its high end a
        whole guest of zero pages "fits"), so a decision on it goes either
        way from run to run. QEMU's switchover threshold is likewise 0
        until its first window of measurement closes."""
        if self.params.avail_switchover_bandwidth:
            return float(self.params.avail_switchover_bandwidth)
        # dirty-sync-count is 1 during the bulk pass (QEMU's is too: the
        # bitmap's start counts), 2 once it ended.
        if not self.meter.samples and self.ram.sync_count < 2:
            return 0.0
        return self.meter.conservative()

    def threshold(self) -> int:
        """Bytes that fit in the downtime limit once the fixed costs are paid."""
        left = self.params.downtime_limit_s - self.overhead()
        return int(self.bandwidth() * max(0.0, left))

    def _pending(self) -> int:
        """Bytes pending if the guest stopped now: exact when measured, else
        the estimate, plus what the guest dirtied at its measured rate since
        the last sync (a ``settle`` lets it run on after the exact size)."""
        pending = self.pending_exact if self.pending_exact is not None else self.pending_estimate
        ram = self.ram
        since = self.clock.now() - (ram.last_sync_time or self.clock.now())
        grown = ram.dirty_pages_rate * ram.page_size * max(0.0, since)
        return int(min((pending or 0) + grown, max(pending or 0, ram.memory.size)))

    def overhead(self) -> float:
        """Measured fixed switchover costs, seconds (``SwitchoverCosts``)."""
        costs = self.costs
        costs.settle_first = not self.stops.paused  # switchover.run settles a running guest
        costs.final_sync = self.ram.final_sync_estimate()
        costs.final_pages = self._pending() // self.ram.page_size
        self._expect_device_stops()
        return costs.total()

    def _expect_device_stops(self) -> None:
        """Each device not yet stopped: what its stop-copy should cost now
        (``mig.device_stop_costs``), so the plan counts it before it is paid."""
        for h in self.devices:
            if h.name in self.costs.devices:
                continue
            # Read now, not the exact size the policy last asked for: a
            # settle's wait lets the device dirty state no read takes before
            # the stop. Never a stop: with the guest running it is the device's
            # data_size(), else its estimate (or its last stopped size).
            pending = h.pending_exact(False)
            # A handler that reports no fixed stop work (RAM-like test doubles).
            report = getattr(h, "stop_copy_seconds", None)
            fixed = report() if report is not None else None
            self.costs.expected_devices[h.name] = self.stop_costs.expected(h.name, pending, fixed)

    def switchover_plan(self) -> dict[str, float]:
        """The downtime a switchover now should cost, term by term, seconds:
        the fixed costs and ``final-ram``, the pending bytes over the link's
        measured bandwidth (a prediction: not the conservative margin that
        decisions take)."""
        bw = float(self.params.avail_switchover_bandwidth or self.meter.estimate())
        self.overhead()
        return {**self.costs.terms(), "final-ram": self._pending() / bw if bw else 0.0}

    def expected_downtime(self) -> float:
        """Seconds: the sum of ``switchover_plan``."""
        return sum(self.switchover_plan().values()) if self.bandwidth() else 0.0

    def reestimate(self) -> None:
        """After a sync outside ``decide``: the plan's pending bytes are RAM's
        known set and each device's size with the guest running (never a
        stop: ``_expect_device_stops``). Not its cheap estimate: a device
        without precopy data estimates 0 and still sends its whole state."""
        ram = self.ram.pending_estimate()
        self.pending_estimate = ram + sum(h.pending_estimate() for h in self.devices)
        self.pending_exact = ram + sum(h.pending_exact(False) for h in self.devices)

    def switchover_near(self) -> bool:
        """The known pending state would fit the raw downtime budget."""
        raw = self.bandwidth() * self.params.downtime_limit_s
        return bool(raw) and (self.pending_estimate or 0) <= raw

    # ----------------------------------------------------------- decisions
    def decide(self, check_cancel: Callable[[], None]) -> Decision:
        """Ask the policy, measuring exact sizes as often as it asks."""
        estimates = {h.name: h.pending_estimate() for h in self.handlers}
        exact: dict[str, int] = {}
        self.pending_estimate = sum(estimates.values())
        self.pending_exact = None
        decision = self.policy.decide(self._view("estimate", estimates, exact))
        measured_running = False
        while True:
            action = decision.action
            if action is Action.EXACT_RUNNING and not measured_running and not self.stops.paused:
                measured_running = True
                for h in self.handlers:
                    if not h.exact_needs_stop:
                        exact[h.name] = self._exact(h, stopped=False)
            elif action is Action.STOP_AND_EXACT and not self.stops.paused:
                self.stops.pause()
                check_cancel()
                for h in self.handlers:
                    exact[h.name] = self._exact(h, stopped=True)
            else:
                return decision
            self.pending_exact = sum(exact.values())
            self.after_sync()
            decision = self.policy.decide(self._view("exact", estimates, exact))

    def _exact(self, h: SaveHandler, stopped: bool) -> int:
        if stopped and h.exact_needs_stop and h is not self.ram:
            size = self.timed_device_work(h, lambda: h.pending_exact(True))
        else:
            size = h.pending_exact(stopped)
        self._exact_cache[h.name] = (size, self.clock.now())
        return size

    def timed_device_work(self, h: SaveHandler, work: Callable[[], int]) -> int:
        """Run a device's stop-copy work; remember the time it spent outside sends.

        That time (stopping the device, producing its state) is paid again at
        every switchover whatever the bytes, so it joins the fixed costs.
        """
        t0, busy0 = self.clock.now(), self.link.busy_time()
        result = work()
        spent = self.clock.now() - t0 - (self.link.busy_time() - busy0)
        # The largest seen: a state produced at a stopped exact and sent by
        # complete() later would otherwise read as free the second time.
        self.costs.devices[h.name] = max(spent, self.costs.devices.get(h.name, 0.0))
        return result

    def _view(self, phase: str, estimates: dict[str, int], exact: dict[str, int]) -> PolicyView:
        now = self.clock.now()
        handlers = []
        for h in self.handlers:
            cached = self._exact_cache.get(h.name)
            handlers.append(
                HandlerView(
                    name=h.name,
                    role=h.role,
                    exact_needs_stop=bool(h.exact_needs_stop),
                    estimate=estimates[h.name],
                    exact=exact.get(h.name),
                    cached_exact=cached[0] if cached else None,
                    cached_at=cached[1] if cached else None,
                )
            )
        ram = self.ram
        return PolicyView(
            now=now,
            phase=phase,
            guest_stopped=self.stops.paused,
            handlers=tuple(handlers),
            bandwidth=self.bandwidth(),
            threshold=self.threshold(),
            downtime_limit=self.params.downtime_limit_s,
            dirty_rate=ram.dirty_pages_rate * ram.page_size,
            since_sync=now - (ram.last_sync_time or now),
            overhead=self.overhead(),
            pass_overhead=ram.final_sync_estimate() + self.control.rtt,
            can_switchover=self.control.switchover_acked,
            sync_count=ram.sync_count,
            passes=len(self.passes),
            guest_stops=self.stops.count,
            guest_stopped_time=self.stops.stopped_time,
            last_stop_at=self.stops.last_stop_at,
            switchover_aborts=self.switchover_aborts,
            ram_total=ram.memory.size,
            extra={"non-converging": self.monitor.reason},
        )

    # ------------------------------------------------------------- sending
    def resume_after_stop(self) -> None:
        """The policy continues after a stopped exact: devices and guest run again."""
        for h in self.handlers:
            h.resume_after_exact()
        self.stops.resume()

    def send_slice(self) -> None:
        bw = self.meter.estimate()
        budget = int(bw * _SLICE) if bw > 0 else _SLICE_BYTES_BEFORE_ESTIMATE
        sent = self.ram.iterate(self.link, budget)
        sent += self.iterate_devices(budget)
        due = self.monitor.periodic_sync_due(self.clock.now(), self.ram.last_sync_time)
        if sent == 0 or due:
            # End of a pass (nothing known left) or the throttle's periodic sync.
            self.ram.sync()
            self.after_sync()
            if sent == 0 and self.ram.pending_estimate() == 0:
                self.clock.sleep(_IDLE)

    def iterate_devices(self, budget: int = _NO_BUDGET) -> int:
        """Every device's precopy slice of up to ``budget`` bytes; by
        default what each has pending now (no bound but what the destination
        may hold unannounced)."""
        return sum(self._timed_iterate(h, budget) for h in self.devices)

    def _timed_iterate(self, h: SaveHandler, budget: int) -> int:
        """A device's precopy slice; its reading time per byte, outside the
        sends, is what its stop-copy bytes will cost (``DeviceStopCosts``)."""
        t0, busy0 = self.clock.now(), self.link.busy_time()
        sent = h.iterate(self.link, budget)
        spent = self.clock.now() - t0 - (self.link.busy_time() - busy0)
        self.stop_costs.iterated(h.name, spent, sent)
        return sent

    def record_pass(self, announce: bool = True) -> None:
        now = self.clock.now()
        sent_total = self.link.transferred()
        ram = self.ram
        record = PassRecord(
            number=ram.sync_count,
            time=now - self.started_at,
            dirty_pages=ram.last_sync_new_pages,
            remaining=ram.pending_estimate() // ram.page_size,
            bytes=sent_total - self._bytes_at_pass,
            # What the link did (smoothed); decisions use self.bandwidth(),
            # which may be avail_switchover_bandwidth or a conservative margin.
            bandwidth=self.meter.estimate(),
            estimate=self.pending_estimate,
            exact=self.pending_exact,
        )
        self._bytes_at_pass = sent_total
        self.passes.append(record)
        if announce:
            self.control.send(Pass(record.number, ram.generation, self.link.announce()))
        self.notify.passed(record.to_dict())
        if announce:
            faults.point("source.pass", number=record.number)

    def after_sync(self) -> None:
        """A RAM sync happened: record the pass, feed the convergence monitor."""
        self.record_pass()
        ram = self.ram
        self.monitor.on_sync(
            SyncFigures(
                now=self.clock.now(),
                sent_total=self.link.transferred(),
                new_dirty_bytes=ram.last_sync_new_pages * ram.page_size,
                remaining=ram.pending_estimate(),
                bandwidth=self.bandwidth(),
                threshold=self.threshold(),
                overhead=self.overhead(),
                guest_stopped=self.stops.paused,
            )
        )
