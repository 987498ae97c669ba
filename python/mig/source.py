"""``MigrationSource``: the pre-copy iteration loop and the switchover.

The loop is written against ``Clock``, ``Guest`` and ``Link`` and asks a policy
object for every decision, so the same loop runs over a real stream or in
virtual time. One iteration: read every handler's cheap estimate, ask the
policy, take exact sizes (with the guest running, or stopped) when it asks,
then either switch over, fail, or send one time slice of state.

The threshold is what the downtime limit leaves after the measured fixed
switchover costs (``mig.stats.SwitchoverCosts``), times the decision bandwidth.

``max_bandwidth`` in the stopped phase: QEMU lifts the rate limit at every
switchover (``migration_switchover_start()``). mig lifts it only when
``avail_switchover_bandwidth`` is set, the user's statement that the link
carries more than the cap once the guest is stopped (QEMU: that parameter
"does not limit the bandwidth during switchover"). Without it the cap stays:
mig's users and its simulator use ``max_bandwidth`` as the capacity of the
link they model, and a stopped phase at loopback speed would report a
downtime that link could never give. A lifted cap is restored if the
switchover is abandoned.
"""

from __future__ import annotations

import statistics
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from mig import _mig, faults
from mig.clock import Clock, MonotonicClock
from mig.converge import NonConvergenceDetector, SyncSample, make_auto_converge
from mig.handlers import OverBudget, RamHandler, StateHandler
from mig.link import Link, SenderLink
from mig.memory import Guest
from mig.policies import (
    DEFAULT_POLICY,
    Action,
    Decision,
    HandlerView,
    PolicyView,
    make_policy,
)
from mig.stats import BandwidthMeter, PassRecord, SwitchoverCosts, digest_cost

__all__ = ["MigrationSource", "PARAMETERS", "STATUSES"]

PARAMETERS: dict[str, Any] = {
    "downtime_limit": 300,  # ms
    "max_bandwidth": 0,  # bytes/s, 0 = unlimited
    "avail_switchover_bandwidth": 0,  # bytes/s, decisions only, 0 = measured
    "multifd_channels": 2,
    "compression": "none",
    "auto_converge": False,  # False, True (= "proportional"), "proportional", "qemu"
    "cpu_throttle_initial": 20,
    "cpu_throttle_increment": 10,
    "cpu_throttle_tailslow": False,
    "max_cpu_throttle": 99,
    "dirty_limit": 0,  # page writes/s per vCPU, 0 = none
    "policy": DEFAULT_POLICY,
    "policy_options": None,
    "timeout": 0.0,  # s, 0 = none
    "timeout_action": "cancel",  # or "force"
    "non_convergence_action": "report",  # or "fail"
    "tracker_backend": "uffd",
    "connect_timeout": 10.0,
    "switchover_timeout": 30.0,  # s to wait for the destination's "resumed"
    "io_timeout": 60.0,  # s a channel may block on a peer that stops reading
    # MSG_ZEROCOPY sends (QEMU's zero-copy-send): tcp:, no compression, no TLS;
    # on loopback the kernel copies anyway, so it cannot pay there.
    "zero_copy_send": False,
}

STATUSES = ("none", "setup", "active", "device", "completed", "failed", "cancelled")

# One send slice lasts about this long (QEMU's ram_save_iterate MAX_WAIT).
_SLICE = 0.05
_SLICE_BYTES_BEFORE_ESTIMATE = 4 << 20
_IDLE = 0.005
_POLL = 0.05
# Destination loop latencies kept; the switchover plans for the longest.
_BUSY_SAMPLES = 8


class _Stop(Exception):
    """Ends the migration. ``discarded``: the destination said it discarded
    everything (its ``failed``), so a rollback is safe even after ``go``."""

    def __init__(self, status: str, reason: str, discarded: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.discarded = discarded


class _AccountingLink:
    """Counts device bytes and sequence numbers on their way to the real link."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.stop_copy = False
        self.last_seq: dict[int, int] = {}
        self.precopy_bytes: dict[int, int] = {}
        self.stop_copy_bytes: dict[int, int] = {}

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
        self.link.send_device_state(device_id, seq, data, final)
        self.last_seq[device_id] = seq
        bucket = self.stop_copy_bytes if self.stop_copy else self.precopy_bytes
        bucket[device_id] = bucket.get(device_id, 0) + len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.link, name)


class MigrationSource:
    """Migrates ``guest`` (its memory and ``devices``) to ``uri``.

    ``devices`` are device handlers (objects with the ``StateHandler``
    protocol and an integer ``device_id``) or devices that
    ``mig.device_handler.DeviceHandler`` wraps. ``params`` are QEMU's
    migration parameters (see ``PARAMETERS``). ``tls_cert``, ``tls_key`` and
    ``tls_ca`` (PEM paths) make every channel mutual TLS. ``link``, ``tracker`` and
    ``clock`` replace the real stream, dirty tracker and wall clock (a
    simulator passes its own). Callbacks run on the migration thread:
    ``on_status(status)``, ``on_pass(record)``, ``on_event(name, info)``.
    An exception raised by a callback fails the migration with its message.
    """

    def __init__(
        self,
        guest: Guest,
        devices: Sequence[Any] = (),
        uri: str | None = None,
        *,
        link: Link | None = None,
        tracker: Any = None,
        clock: Clock | None = None,
        on_status: Callable[[str], None] | None = None,
        on_pass: Callable[[dict[str, Any]], None] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        **params: Any,
    ) -> None:
        unknown = set(params) - set(PARAMETERS)
        if unknown:
            raise ValueError(f"unknown migration parameters: {', '.join(sorted(unknown))}")
        if uri is None and link is None:
            raise ValueError("give a destination uri (or a link)")
        self.params = {**PARAMETERS, **params}
        p = self.params
        if not 0 < p["downtime_limit"] <= 2_000_000_000:
            raise ValueError(f"downtime_limit must be in (0, 2e9] ms, not {p['downtime_limit']}")
        if not p["io_timeout"] > 0:
            raise ValueError(f"io_timeout must be > 0, not {p['io_timeout']}")
        for key in ("max_bandwidth", "avail_switchover_bandwidth", "dirty_limit", "timeout"):
            if p[key] < 0:
                raise ValueError(f"{key} must be >= 0, not {p[key]}")
        if int(p["multifd_channels"]) < 1:
            raise ValueError("multifd_channels must be >= 1")
        if p["timeout_action"] not in ("cancel", "force"):
            raise ValueError("timeout_action must be 'cancel' or 'force'")
        if p["non_convergence_action"] not in ("report", "fail"):
            raise ValueError("non_convergence_action must be 'report' or 'fail'")
        if p["dirty_limit"] and not callable(getattr(guest, "set_dirty_limit", None)):
            raise ValueError("dirty_limit needs a guest with set_dirty_limit()")
        self.guest = guest
        self.memory = guest.memory
        self.uri = uri
        self.tls = {"tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca}
        self.clock: Clock = clock or MonotonicClock()
        self.policy = make_policy(p["policy"], **(p["policy_options"] or {}))
        self.converge = make_auto_converge(
            p["auto_converge"],
            p["cpu_throttle_initial"],
            p["cpu_throttle_increment"],
            p["cpu_throttle_tailslow"],
            p["max_cpu_throttle"],
        )
        self._detector = NonConvergenceDetector()
        self._link_given = link
        self._tracker_given = tracker
        self._devices_given = list(devices)
        self.link: _AccountingLink | None = None
        self.ram: RamHandler | None = None
        self._on_status = on_status
        self._on_pass = on_pass
        self._on_event = on_event
        self.meter = BandwidthMeter()
        self.migration_id = uuid.uuid4().int & ((1 << 63) - 1)

        self.status = "none"
        self.error: str | None = None
        self._cancel: str | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._committed = False
        self._go_sent = False
        self.postmigrate = False
        self.handlers: list[StateHandler] = self._device_handlers()
        self._exact_cache: dict[str, tuple[int, float]] = {}
        self.can_switchover = False
        self.passes: list[PassRecord] = []
        self.throttle = 0.0
        self.non_convergence: str | None = None
        self.guest_stops = 0
        self.guest_stopped_time = 0.0
        self.last_stop_at: float | None = None
        self.switchover_aborts = 0
        self._paused = False
        self._pause_started = 0.0
        self._pause_cost = 0.0
        self.rtt = 0.0
        self.costs = SwitchoverCosts()
        self.predicted_downtime: float | None = None
        self._digest_job: threading.Thread | None = None
        self._dest_busy: deque[float] = deque(maxlen=_BUSY_SAMPLES)
        self._dest_drain: deque[float] = deque(maxlen=_BUSY_SAMPLES)
        self._costs_over = 0
        self._nc_from_costs = False  # non_convergence holds the fixed-costs reason
        self._digest_measured_at = 0.0
        self.load_seconds = 0.0
        self.downtime: float | None = None
        self.breakdown: dict[str, float] = {}
        self.verified = False
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.setup_time = 0.0
        self._check_time = 0.0
        self._check_bytes = 0
        self._check_pages = 0
        self._pending_estimate: int | None = None
        self._pending_exact: int | None = None
        self._bytes_at_pass = 0

    # ---------------------------------------------------------------- API
    def start(self) -> None:
        """Start the migration on its own thread."""
        if self._thread is not None or self.status != "none":
            raise RuntimeError("migration already started")
        self._thread = threading.Thread(target=self.run, name="mig-source", daemon=True)
        self._thread.start()

    def run(self) -> dict[str, Any]:
        """Run the whole migration on the calling thread; returns ``query()``."""
        try:
            self._setup()
            while self.status != "completed":
                self._iteration()
        except _Stop as e:
            self._end(e.status, e.reason, e.discarded)
        except Exception as e:  # every failure rolls back, with the reason
            reason = f"{type(e).__name__}: {e}"
            peer = self._peer_reason()
            if peer:
                reason = f"{peer} ({reason})"
            status = "cancelled" if self._cancel and not self._go_sent else "failed"
            self._end(status, self._cancel or reason, discarded=peer is not None)
        finally:
            self.t_end = self.clock.now()
            self._done.set()
        return self.query()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the end (completed, failed or cancelled); returns ``query()``."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"migration still {self.status} after {timeout} s")
        if self._thread is not None:
            self._thread.join()
        return self.query()

    def cancel(self, reason: str = "cancelled by request") -> bool:
        """Ask the loop to cancel; False once ``go`` is sent (the destination may run)."""
        if self._committed or self._done.is_set():
            return False
        self._cancel = reason
        return True

    def resume_source(self) -> None:
        """Run the source guest again after an unknown outcome.

        When ``resumed`` does not arrive after ``go``, the migration ends
        ``failed`` with ``query()["postmigrate"]`` true and the source guest
        left paused (QEMU's ``postmigrate``): the destination may run it. Only
        the embedder can learn that the destination does not (its own status,
        or the process is gone); then this call returns the devices to
        RUNNING, resumes the guest and removes throttles and dirty limits.
        """
        if not self._done.is_set() or not self.postmigrate:
            raise RuntimeError("the source guest is not left paused by an unknown outcome")
        errors = []
        for h in self.handlers[1:]:
            try:
                h.abort()
            except Exception as e:
                errors.append(f"{h.name}: {e}")
        self.guest.resume()
        self._paused = False
        self.postmigrate = False
        self._finish_guest_aids()
        if errors:
            raise _mig.MigError(f"source guest resumed; devices: {'; '.join(errors)}")

    # ------------------------------------------------------------- events
    def _set_status(self, status: str) -> None:
        self.status = status
        if self._on_status:
            self._on_status(status)

    def _event(self, name: str, **info: Any) -> None:
        if self._on_event:
            self._on_event(name, info)

    def _check_cancel(self) -> None:
        if self._cancel is not None:
            raise _Stop("cancelled", self._cancel)

    # -------------------------------------------------------------- setup
    def _setup(self) -> None:
        self.t_start = self.clock.now()
        self._digest_measured_at = self.t_start
        self._set_status("setup")
        if self._link_given is not None:
            link = self._link_given
        else:
            sender_cls = getattr(_mig, "Sender", None)
            if sender_cls is None:
                raise _mig.UnsupportedError("this build of mig._mig has no Sender")
            p = self.params
            sender = sender_cls(
                self.memory,
                self.uri,
                channels=int(p["multifd_channels"]),
                migration_id=self.migration_id,
                compression=p["compression"],
                max_bandwidth=int(p["max_bandwidth"]),
                connect_timeout=float(p["connect_timeout"]),
                **self.tls,
                io_timeout=float(p["io_timeout"]),
                zero_copy_send=bool(p["zero_copy_send"]),
            )
            link = SenderLink(sender, self.clock)
        self.link = _AccountingLink(link)
        if self._link_given is not None and self.params["max_bandwidth"]:
            self.link.set_max_bandwidth(int(self.params["max_bandwidth"]))
        tracker = self._tracker_given
        if tracker is None:
            tracker_cls = getattr(_mig, "DirtyTracker", None)
            if tracker_cls is None:
                raise _mig.UnsupportedError("this build of mig._mig has no DirtyTracker")
            tracker = tracker_cls(self.memory, backend=self.params["tracker_backend"])
        self.ram = RamHandler(self.memory, tracker, self.clock)
        self.handlers = [self.ram, *self.handlers]
        self._check_cancel()
        self._handshake()
        faults.point("source.setup")
        for h in self.handlers:
            h.setup(self.link)
        self._measure_digest()
        if self.params["dirty_limit"]:
            self.guest.set_dirty_limit(self.params["dirty_limit"])  # type: ignore[attr-defined]
        now = self.clock.now()
        self.setup_time = now - self.t_start
        self._check_time = now
        self._check_bytes = self.link.transferred()
        self._set_status("active")

    def _device_handlers(self) -> list[StateHandler]:
        handlers: list[StateHandler] = []
        for i, dev in enumerate(self._devices_given, start=1):
            if isinstance(dev, StateHandler):
                handlers.append(dev)
            else:
                from mig.device_handler import DeviceHandler  # noqa: PLC0415

                handlers.append(DeviceHandler(dev, device_id=i))
        names = [h.name for h in handlers]
        if len(set(names)) != len(names) or "ram" in names:
            raise ValueError(f"device names must be unique and not 'ram': {names}")
        return handlers

    def _handshake(self) -> None:
        assert self.link is not None
        t0 = self.clock.now()
        self.link.send(
            {
                "type": "hello",
                "version": 1,
                "migration_id": self.migration_id,
                "page_size": self.memory.page_size,
                "ram_size": self.memory.size,
                "devices": [
                    {"id": getattr(h, "device_id", 0), "name": h.name, "kind": h.kind}
                    for h in self.handlers[1:]
                ],
                "params": {
                    k: self.params[k]
                    for k in ("downtime_limit", "max_bandwidth", "multifd_channels", "compression")
                },
            }
        )
        deadline = t0 + float(self.params["connect_timeout"])
        while True:
            self._check_cancel()
            msg = self.link.recv(_POLL)
            if msg is not None:
                if msg["type"] == "hello-ack":
                    break
                self._handle_control(msg)
            if self.clock.now() > deadline:
                raise _Stop("failed", "destination did not answer hello")
        self.rtt = self.clock.now() - t0
        self.costs.handshake = 2 * self.rtt  # complete/ready and go/resumed

    def _measure_digest(self) -> None:
        """The switchover digests all of RAM: time one whole digest now.

        A sample of a few pages misleads: holes digest far faster than data,
        so only the whole memory gives its real cost.
        """
        if self._link_given is None:
            self.costs.digest = digest_cost(self.memory)
            return
        t0 = self.clock.now()  # a simulator charges the digest to its clock
        self.memory.digest()
        self.costs.digest = self.clock.now() - t0

    def _refresh_digest_cost(self) -> None:
        """Time the digest again, in the background, once a switchover is near.

        Its cost changes as the guest populates memory (holes digest faster
        than data), so the setup figure can be far off by the switchover.
        At most one measurement a second, and only over the real stream (a
        simulator's digest cost is a constant of its host model).
        """
        if self._link_given is not None or self._digest_job is not None:
            return
        now = self.clock.now()
        if now - self._digest_measured_at < 1.0:
            return
        raw = self.bandwidth() * self.params["downtime_limit"] / 1000
        if not raw or (self._pending_estimate or 0) > raw:
            return

        def measure() -> None:
            self.costs.digest = digest_cost(self.memory)
            self._digest_measured_at = self.clock.now()
            self._digest_job = None

        self._digest_job = threading.Thread(target=measure, name="mig-digest-cost", daemon=True)
        self._digest_job.start()

    # ----------------------------------------------------------- the loop
    def _iteration(self) -> None:
        assert self.link is not None and self.ram is not None
        self._check_cancel()
        self._poll_control()
        self.meter.update(self.link.transferred(), self.link.busy_time())
        if self._timed_out():
            if self.params["timeout_action"] == "cancel":
                raise _Stop("cancelled", f"timeout after {self.params['timeout']} s")
            self._event("timeout-force")
            self._switchover(None, forced=True)
            return
        decision = self._decide()
        self._refresh_digest_cost()
        if decision.action is Action.COMPLETE:
            self._switchover(decision.budget)
            return
        if decision.action is Action.FAIL:
            raise _Stop("failed", decision.reason or f"policy {self.policy.name} gave up")
        if self._paused:
            self._resume_after_stop()
        self._send_slice()

    def _timed_out(self) -> bool:
        limit = float(self.params["timeout"])
        return bool(limit) and self.clock.now() - (self.t_start or 0.0) >= limit

    def _decide(self) -> Decision:
        estimates = {h.name: sum(h.pending_estimate()) for h in self.handlers}
        exact: dict[str, int] = {}
        self._pending_estimate = sum(estimates.values())
        self._pending_exact = None
        decision = self.policy.decide(self._view("estimate", estimates, exact))
        measured_running = False
        while True:
            action = decision.action
            if action is Action.EXACT_RUNNING and not measured_running and not self._paused:
                measured_running = True
                for h in self.handlers:
                    if not h.exact_needs_stop:
                        exact[h.name] = self._exact(h, stopped=False)
            elif action is Action.STOP_AND_EXACT and not self._paused:
                self._pause()
                self._check_cancel()
                for h in self.handlers:
                    exact[h.name] = self._exact(h, stopped=True)
            else:
                return decision
            self._pending_exact = sum(exact.values())
            self._after_sync()
            decision = self.policy.decide(self._view("exact", estimates, exact))

    def _exact(self, h: StateHandler, stopped: bool) -> int:
        if stopped and h.exact_needs_stop and h is not self.ram:
            size = self._timed_device_work(h, lambda: sum(h.pending_exact(True)))
        else:
            size = sum(h.pending_exact(stopped))
        self._exact_cache[h.name] = (size, self.clock.now())
        return size

    def bandwidth(self) -> float:
        """Bytes/s for decisions: avail_switchover_bandwidth, else the measured
        estimate less its own measured variation (``BandwidthMeter.conservative``)."""
        return float(self.params["avail_switchover_bandwidth"] or self.meter.conservative())

    def threshold(self) -> int:
        """Bytes that fit in the downtime limit once the fixed costs are paid."""
        left = self.params["downtime_limit"] / 1000 - self.overhead()
        return int(self.bandwidth() * max(0.0, left))

    def overhead(self) -> float:
        """Measured fixed switchover costs, seconds (``SwitchoverCosts``)."""
        if self.ram is not None:
            self.costs.final_sync = self.ram.last_sync_seconds
        return self.costs.total()

    def _timed_device_work(self, h: StateHandler, work: Callable[[], int]) -> int:
        """Run a device's stop-copy work; remember the time it spent outside sends.

        That time (stopping the device, producing its state) is paid again at
        every switchover whatever the bytes, so it joins the fixed costs.
        """
        assert self.link is not None
        t0, busy0 = self.clock.now(), self.link.busy_time()
        result = work()
        spent = self.clock.now() - t0 - (self.link.busy_time() - busy0)
        # The largest seen: a state produced at a stopped exact and sent by
        # complete() later would otherwise read as free the second time.
        self.costs.devices[h.name] = max(spent, self.costs.devices.get(h.name, 0.0))
        return result

    def _view(self, phase: str, estimates: dict[str, int], exact: dict[str, int]) -> PolicyView:
        assert self.ram is not None
        now = self.clock.now()
        handlers = []
        for h in self.handlers:
            cached = self._exact_cache.get(h.name)
            handlers.append(
                HandlerView(
                    name=h.name,
                    kind=h.kind,
                    exact_needs_stop=bool(h.exact_needs_stop),
                    estimate=estimates[h.name],
                    exact=exact.get(h.name),
                    cached_exact=cached[0] if cached else None,
                    cached_at=cached[1] if cached else None,
                )
            )
        return PolicyView(
            now=now,
            phase=phase,
            guest_stopped=self._paused,
            handlers=tuple(handlers),
            bandwidth=self.bandwidth(),
            threshold=self.threshold(),
            downtime_limit=self.params["downtime_limit"] / 1000,
            dirty_rate=self.ram.dirty_pages_rate * self.memory.page_size,
            since_sync=now - (self.ram.last_sync_time or now),
            overhead=self.overhead(),
            can_switchover=self.can_switchover,
            sync_count=self.ram.sync_count,
            passes=len(self.passes),
            guest_stops=self.guest_stops,
            guest_stopped_time=self.guest_stopped_time,
            last_stop_at=self.last_stop_at,
            switchover_aborts=self.switchover_aborts,
            ram_total=self.memory.size,
        )

    def _send_slice(self) -> None:
        assert self.link is not None and self.ram is not None
        bw = self.meter.estimate()
        budget = int(bw * _SLICE) if bw > 0 else _SLICE_BYTES_BEFORE_ESTIMATE
        sent = sum(h.iterate(self.link, budget) for h in self.handlers)
        due = self.converge is not None and (
            self.clock.now() - (self.ram.last_sync_time or 0.0) >= self.converge.sync_interval
        )
        if sent == 0 or due:
            # End of a pass (nothing known left) or the throttle's periodic sync.
            self.ram.sync()
            self._after_sync()
            if sent == 0 and self.ram.pending_estimate()[0] == 0:
                self.clock.sleep(_IDLE)

    def _record_pass(self, announce: bool = True) -> None:
        assert self.link is not None and self.ram is not None
        now = self.clock.now()
        sent_total = self.link.transferred()
        record = PassRecord(
            number=self.ram.sync_count,
            time=now - (self.t_start or now),
            dirty_pages=self.ram.last_sync_new_pages,
            remaining=self.ram.pending_estimate()[0] // self.memory.page_size,
            bytes=sent_total - self._bytes_at_pass,
            # What the link did (smoothed); decisions use self.bandwidth(),
            # which may be avail_switchover_bandwidth or a conservative margin.
            bandwidth=self.meter.estimate(),
            estimate=self._pending_estimate,
            exact=self._pending_exact,
        )
        self._bytes_at_pass = sent_total
        self.passes.append(record)
        if announce:
            self.link.send(
                {
                    "type": "pass",
                    "pass": record.number,
                    "generation": self.ram.generation,
                    "device_seqs": _str_keys(self.link.last_seq),
                }
            )
        if self._on_pass:
            self._on_pass(record.to_dict())
        if announce:
            faults.point("source.pass", number=record.number)

    def _after_sync(self) -> None:
        """A RAM sync happened: record the pass, feed auto-converge and the detector."""
        assert self.link is not None and self.ram is not None
        self._record_pass()
        now = self.clock.now()
        sent_total = self.link.transferred()
        self._check_pages += self.ram.last_sync_new_pages
        period = now - self._check_time
        min_period = self.converge.min_period if self.converge else 1.0
        if period < min_period or self._paused:
            return
        sample = SyncSample(
            period=period,
            dirty_bytes=self._check_pages * self.memory.page_size,
            sent_bytes=sent_total - self._check_bytes,
            bandwidth=self.bandwidth(),
            throttle=self.throttle,
            remaining=self.ram.pending_estimate()[0],
            threshold=self.threshold(),
        )
        self._check_time, self._check_bytes, self._check_pages = now, sent_total, 0
        if self.converge is not None:
            pct = self.converge.on_sync(sample)
            if pct is not None:
                self.throttle = pct
                self.guest.set_throttle(pct)
                self._event("throttle", pct=pct)
        exhausted = self.converge is None or self.throttle >= self.params["max_cpu_throttle"] / 100
        detected = self._detector.on_sync(sample, exhausted)
        reason = detected or self._costs_exceed_limit()
        if self._costs_over == 0 and self._nc_from_costs:
            self._clear_costs_reason()  # the fixed costs came back under the limit
        if reason and self.non_convergence is None:
            self.non_convergence = reason
            self._nc_from_costs = detected is None
            self._event("non-convergence", reason=reason)
            if self.params["non_convergence_action"] == "fail":
                raise _Stop("failed", f"not converging: {reason}")

    def _on_pass_ack(self, msg: dict[str, Any]) -> None:
        """The destination's loop latency and digest timing.

        ``handshake`` is the two control round trips of the switchover
        (``complete``/``ready``, ``go``/``resumed``) plus the median recent
        time the destination's loop spent away from the control channel
        (loading device state): ``complete`` meets that loop wherever it is,
        and a single long load (the initial device state) must not stand for
        every later one.

        ``dest_digest`` keeps the fastest timing reported: the destination
        times its digest while pages arrive and the guest runs, which the
        switchover, with the guest stopped and the sends done, does not
        compete with (timed under that load the figure read twice the cost).
        """
        self._dest_busy.append(float(msg.get("busy", 0.0)))
        self.costs.handshake = 2 * self.rtt + statistics.median(self._dest_busy)
        if msg.get("drain") is not None:
            self._dest_drain.append(float(msg["drain"]))
            self.costs.drain = max(self._dest_drain)
        if msg.get("digest") is not None:
            seen = self.costs.dest_digest
            digest = float(msg["digest"])
            self.costs.dest_digest = digest if seen is None else min(seen, digest)

    def _costs_exceed_limit(self) -> str | None:
        """A reason once the fixed costs alone stay over the limit for 3 periods."""
        fixed, limit = self.overhead() * 1000, self.params["downtime_limit"]
        self._costs_over = self._costs_over + 1 if fixed >= limit else 0
        if self._costs_over < 3:
            return None
        return f"fixed switchover costs of {fixed:.0f} ms exceed the downtime limit of {limit} ms"

    def _clear_costs_reason(self) -> None:
        if self._nc_from_costs:
            self.non_convergence = None
            self._nc_from_costs = False

    # --------------------------------------------------- control channel
    def _poll_control(self) -> None:
        assert self.link is not None
        while (msg := self.link.recv(0)) is not None:
            self._handle_control(msg)

    def _handle_control(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "switchover-ack":
            self.can_switchover = True
            self._event("switchover-ack")
            faults.point("source.switchover-ack")
        elif kind == "pass-ack":
            self._on_pass_ack(msg)
        elif kind == "device-initial-done":
            self._event("device-initial-done", device=msg.get("device"))
        elif kind in ("failed", "cancel"):
            raise _Stop("failed", f"destination: {msg.get('reason', kind)}")
        else:
            raise _mig.ProtocolError(f"unexpected control message {kind!r} on the source")

    # ------------------------------------------------------- guest stops
    def _pause(self) -> None:
        self._pause_started = self.clock.now()
        self._paused = True
        self._pause_cost = float(self.guest.pause())
        self.costs.pause = self._pause_cost
        self._event("guest-stop")
        faults.point("source.guest-stop")

    def _resume_after_stop(self) -> None:
        for h in self.handlers:
            h.resume_after_exact()
        self.guest.resume()
        self._paused = False
        now = self.clock.now()
        self.guest_stops += 1
        self.guest_stopped_time += now - self._pause_started
        self.last_stop_at = now
        self._event("guest-resume")

    # --------------------------------------------------------- switchover
    def _switchover(self, budget: int | None, forced: bool = False) -> None:
        assert self.link is not None and self.ram is not None
        link = self.link
        self._set_status("device")
        self._check_cancel()
        self.predicted_downtime = self._expected_downtime()
        if not forced:
            self._clear_costs_reason()  # the policy chose to switch over: the costs fit
        job = self._digest_job
        if job is not None:
            job.join()  # not two digests at once in the downtime
        if not self._paused:
            self._pause()
        down_start = self._pause_started
        precopy_seqs = dict(link.last_seq)
        link.send({"type": "switchover", "device_seqs": _str_keys(precopy_seqs)})
        link.stop_copy = True
        cap = int(self.params["max_bandwidth"]) if self.params["avail_switchover_bandwidth"] else 0
        if cap:
            link.set_max_bandwidth(0)
        t0 = self.clock.now()
        digest_job: Future[int] | None = None
        try:
            for h in self.handlers:
                h.quiesce()
            digest_job = self._digest_in_background()
            sent = self.ram.complete(link, budget)
            t_ram = self.clock.now()
            self._record_pass(announce=False)
            for h in self.handlers[1:]:
                self._check_cancel()
                faults.point("source.stop-copy", device=h.name)
                left = None if budget is None else budget - sent
                sent += self._timed_device_work(h, lambda h=h, left=left: h.complete(link, left))
        except OverBudget as e:
            link.stop_copy = False
            if digest_job is not None:
                digest_job.result()
            if cap:
                link.set_max_bandwidth(cap)
            self._abort_switchover(e, precopy_seqs)
            return
        self._check_cancel()
        t_dev = self.clock.now()
        digest = digest_job.result() if digest_job is not None else self.memory.digest()
        faults.point("source.switchover")
        link.finish(digest)
        t_sent = self.clock.now()
        link.send(
            {
                "type": "complete",
                "digest": format(digest, "032x"),
                "generation": self.ram.generation,
                "device_seqs": _str_keys(link.last_seq),
                "forced": forced,
            }
        )
        faults.point("source.committed")
        # Until "go" the destination never resumes: any failure rolls back.
        self._wait_for("ready", "report its state loaded and verified ('ready')")
        faults.point("source.ready")
        self._check_cancel()
        # The commit point: once "go" is out the destination may run the
        # guest, so this side never resumes it on its own again. A send that
        # fails delivered no whole record (the destination acts only on a
        # complete, checksummed one): that still rolls back.
        self._committed = True
        link.send({"type": "go"})
        self._go_sent = True
        faults.point("source.go")
        resumed = self._wait_for("resumed", "report its guest resumed")
        now = self.clock.now()
        self.downtime = now - down_start
        self.load_seconds = float(resumed.get("load", 0.0))
        self.verified = bool(resumed.get("verified", False))
        sync = self.ram.last_sync_seconds
        parts = {
            "pause": t0 - down_start,
            "final-sync": sync,
            "final-ram": max(0.0, t_ram - t0 - sync),
            "device-state": t_dev - t_ram,
            "digest": t_sent - t_dev,
            "load": self.load_seconds,
        }
        parts["handshake"] = max(0.0, self.downtime - sum(parts.values()))
        self.breakdown = parts
        self._finish_guest_aids()
        self.ram.abort()
        try:
            link.close()
        except Exception as e:  # the migration is complete; report, do not fail
            self._event("close-error", error=str(e))
        self.t_end = now
        self._set_status("completed")

    def _digest_in_background(self) -> Future[int] | None:
        """Digest RAM while the stop-copy state goes out (memory is frozen now).

        Only over the real stream: a simulator charges the digest to its
        virtual clock, which must not advance from a second thread.
        """
        if self._link_given is not None:
            return None
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mig-digest")
        job = pool.submit(self.memory.digest)
        pool.shutdown(wait=False)
        return job

    def _expected_downtime(self) -> float:
        """Seconds: pending bytes (exact when measured) over bandwidth, plus fixed costs."""
        bw = self.bandwidth()
        pending = self._pending_exact if self._pending_exact is not None else self._pending_estimate
        return (pending or 0) / bw + self.overhead() if bw else 0.0

    def _wait_for(self, kind: str, what: str) -> dict[str, Any]:
        """The destination's ``kind`` within ``switchover_timeout``; its
        ``failed`` means it discarded everything and never resumed."""
        assert self.link is not None
        timeout = float(self.params["switchover_timeout"])
        deadline = self.clock.now() + timeout
        while self.clock.now() < deadline:
            if not self._go_sent:
                self._check_cancel()
            msg = self.link.recv(_POLL)
            if msg is None:
                continue
            if msg["type"] == kind:
                return msg
            if msg["type"] in ("failed", "cancel"):
                reason = f"destination: {msg.get('reason', msg['type'])}"
                raise _Stop("failed", reason, discarded=True)
        raise _Stop("failed", f"destination did not {what} within {timeout} s (switchover_timeout)")

    def _abort_switchover(self, e: OverBudget, precopy_seqs: dict[int, int]) -> None:
        assert self.link is not None
        aborted = {
            str(dev): [precopy_seqs.get(dev, -1) + 1, last]
            for dev, last in self.link.last_seq.items()
            if last > precopy_seqs.get(dev, -1)
        }
        self.link.send(
            {
                "type": "switchover-abort",
                "aborted": aborted,
                "device_seqs": _str_keys(self.link.last_seq),
                "reason": str(e),
            }
        )
        self.switchover_aborts += 1
        self._event("switchover-abort", reason=str(e))
        if self.policy.fail_on_over_budget:
            raise _Stop("failed", f"switchover over budget: {e}")
        self._resume_after_stop()
        self._set_status("active")

    def _peer_reason(self) -> str | None:
        """A broken stream is often the destination failing first: find why it said."""
        if self.link is None:
            return None
        for _ in range(8):
            try:
                msg = self.link.recv(_POLL)
            except Exception:
                return None
            if msg is None:
                return None
            if msg["type"] in ("failed", "cancel"):
                return f"destination: {msg.get('reason', msg['type'])}"
        return None

    # ----------------------------------------------------------- rollback
    def _end(self, status: str, reason: str, discarded: bool) -> None:
        """Roll back, unless ``go`` is out and the destination may run the guest."""
        if not self._go_sent or discarded:
            self._rollback(status, reason)
        elif self.status != "completed":
            self._postmigrate(reason)

    def _postmigrate(self, reason: str) -> None:
        """Outcome unknown after ``go``: the source guest stays paused (QEMU's
        ``postmigrate``); ``resume_source()`` runs it again on request."""
        self.postmigrate = True
        errors = []
        if self.ram is not None:
            try:
                self.ram.abort()  # no more dirty syncs: free the tracker
            except Exception as e:
                errors.append(f"ram: {e}")
        if self.link is not None:
            try:
                self.link.abort()  # no "failed": the destination may run the guest
            except Exception as e:
                errors.append(f"link: {e}")
        self.error = (
            f"outcome unknown after 'go': {reason}; the destination may run the guest, "
            "so the source guest is left paused (postmigrate): call resume_source() "
            "only once the destination is known not to run it"
            + (f" ({'; '.join(errors)})" if errors else "")
        )
        self.status = "failed"
        if self._on_status:
            try:
                self._on_status("failed")
            except Exception:
                pass  # already ending

    def _finish_guest_aids(self) -> None:
        if self.throttle:
            self.guest.set_throttle(0.0)
            self.throttle = 0.0
        if self.params["dirty_limit"]:
            self.guest.set_dirty_limit(0)  # type: ignore[attr-defined]

    def _rollback(self, status: str, reason: str) -> None:
        """Source guest runs again, the destination is told, nothing is left half-done."""
        self._committed = False
        errors = []
        if self._paused:
            try:
                self.guest.resume()
            except Exception as e:
                errors.append(f"resume: {e}")
            self._paused = False
        try:
            self._finish_guest_aids()
        except Exception as e:
            errors.append(f"throttle: {e}")
        for h in self.handlers:
            try:
                h.abort()
            except Exception as e:
                errors.append(f"{h.name}: {e}")
        if self.link is not None:
            try:
                self.link.send(
                    {"type": "cancel" if status == "cancelled" else "failed", "reason": reason}
                )
            except Exception:
                pass  # the link may be what failed
            try:
                self.link.abort()
            except Exception as e:
                errors.append(f"link: {e}")
        self.error = reason + (f" (rollback: {'; '.join(errors)})" if errors else "")
        self.status = status
        if self._on_status:
            try:
                self._on_status(status)
            except Exception:
                pass  # already ending; a failing callback changes nothing now

    # -------------------------------------------------------------- stats
    def query(self) -> dict[str, Any]:
        """``query-migrate``: QEMU's field names plus mig's own keys."""
        now = self.clock.now() if self.t_end is None else self.t_end
        start = self.t_start if self.t_start is not None else now
        ram = self.ram
        link = self.link
        page = self.memory.page_size
        transferred = link.transferred() if link else 0
        link_stats = _safe_stats(link)
        normal = int(link_stats.get("normal", ram.pages_sent if ram else 0))
        active_time = (link.busy_time() if link else 0.0) or 0.0
        out: dict[str, Any] = {
            "status": self.status,
            "total-time": (now - start) * 1000,
            "setup-time": self.setup_time * 1000,
            "cpu-throttle-percentage": int(round(self.throttle * 100)),
            "policy": self.policy.name,
            "guest-stops": self.guest_stops,
            "guest-stopped-time": self.guest_stopped_time * 1000,
            "downtime-breakdown": {k: v * 1000 for k, v in self.breakdown.items()},
            "verified": self.verified,
            "non-convergence": self.non_convergence,
            "switchover-aborts": self.switchover_aborts,
            "passes": [p.to_dict() for p in self.passes],
            "devices": self._device_stats(),
        }
        if self.status == "completed" and self.downtime is not None:
            out["downtime"] = self.downtime * 1000
        else:
            out["expected-downtime"] = self._expected_downtime() * 1000 if ram else 0
        if self.predicted_downtime is not None:
            out["predicted-downtime"] = self.predicted_downtime * 1000
        out["switchover-costs"] = {k: v * 1000 for k, v in self.costs.terms().items()}
        if self.error:
            out["error-desc"] = self.error
        if self.postmigrate:
            out["postmigrate"] = True
        if ram is not None:
            out["ram"] = {
                "transferred": transferred,
                "remaining": ram.pending_estimate()[0] if self.status != "completed" else 0,
                "total": self.memory.size,
                "duplicate": int(link_stats.get("duplicate", link_stats.get("zero-pages", 0))),
                "normal": normal,
                "normal-bytes": normal * page,
                "dirty-sync-count": ram.sync_count,
                "mbps": self._mbps(transferred, now - start),
                "dirty-pages-rate": ram.dirty_pages_rate,
                "pages-per-second": ram.pages_sent / active_time if active_time else 0.0,
                "precopy-bytes": ram.precopy_bytes,
                "downtime-bytes": ram.downtime_bytes,
                "sync-time": ram.sync_seconds * 1000,
                "page-size": page,
            }
        return out

    def _mbps(self, transferred: int, total: float) -> float:
        if self.status == "completed":
            span = total - self.setup_time
            return transferred * 8 / span / 1e6 if span > 0 else 0.0
        return self.meter.last_sample * 8 / 1e6

    def _device_stats(self) -> list[dict[str, Any]]:
        link = self.link
        out = []
        for h in self.handlers[1:]:
            dev = getattr(h, "device_id", None)
            out.append(
                {
                    "name": h.name,
                    "type": _device_type(h),
                    "precopy-bytes": link.precopy_bytes.get(dev, 0) if link else 0,
                    "stop-copy-bytes": link.stop_copy_bytes.get(dev, 0) if link else 0,
                }
            )
        return out


def _device_type(h: StateHandler) -> str:
    """The device's own type (nic, gpu, ...), else the handler's kind."""
    device = getattr(h, "device", None)
    return str(getattr(device, "kind", None) or h.kind)


def _str_keys(d: dict[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in d.items()}


def _safe_stats(link: Any) -> dict[str, Any]:
    if link is None:
        return {}
    try:
        return dict(link.stats())
    except Exception:
        return {}
