"""``MigrationSource``: the front of one outgoing migration.

``start``, ``wait``, ``cancel``, ``query`` and ``resume_source`` over the parts
that do the work, one concept each: ``MigrationParams`` (validated
parameters), ``ControlSession`` (the control channel), ``Precopy`` (the
decide / exact / send loop), ``ConvergenceMonitor``, ``SwitchoverRun`` (the
``Phase`` machine from the guest's pause to the destination's ``resumed``)
and ``MigrationStats`` (``query()``). The loop is written against
``Clock``, ``Guest`` and ``Link`` and asks a policy object for every
decision, so the same loop runs over a real stream or in virtual time.

This file decides how a migration ends: completed, rolled back (the source
guest runs again, the destination is told) or left paused after ``go``
(``postmigrate``); ``mig.rollback`` carries the last two out. Over a real
stream a ``StallWatch`` ends a precopy that makes no progress, and a failure
the destination caused is told as what it did, where (``mig.failure_reason``).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from mig import _mig, faults
from mig.clock import Clock, MonotonicClock
from mig.control import ControlSession
from mig.convergence_monitor import ConvergenceMonitor
from mig.counting_link import CountingLink
from mig.digest_timing import DigestTiming
from mig.errors import MigrationEnded
from mig.failure_reason import describe, peer_name, source_phase
from mig.guest_stops import GuestStops
from mig.handlers import RamHandler, SaveHandler
from mig.link import Link, SenderLink
from mig.memory import Guest
from mig.migration_stats import MigrationStats
from mig.notifier import Notifier, NotifierCallbacks
from mig.params import PARAMETERS, MigrationParams
from mig.policies import Action, make_policy
from mig.postcopy_commands import PostcopyCommands
from mig.postcopy_outgoing import PostcopyOutgoing
from mig.postcopy_policy import PostcopySwitch
from mig.pre_switchover import PreSwitchover
from mig.precopy import Precopy
from mig.protocol import DeviceInfo, Hello, PostcopyAdvise, SessionParams
from mig.rollback import leave_paused, roll_back
from mig.stall_watch import StallWatch
from mig.stats import BandwidthMeter, SwitchoverCosts
from mig.switchover import Phase, SwitchoverRun

__all__ = ["MigrationSource", "PARAMETERS", "STATUSES"]


def hello_message(
    migration_id: int, memory: Any, devices: Sequence[Any], params: MigrationParams, watched: bool
) -> Hello:
    """The source's ``hello``: what the destination checks before it loads anything."""
    return Hello(
        migration_id=migration_id,
        page_size=memory.page_size,
        ram_size=memory.size,
        devices=tuple(DeviceInfo(int(getattr(h, "device_id", 0)), h.name, h.role) for h in devices),
        params=SessionParams(
            params.downtime_limit,
            params.max_bandwidth,
            params.multifd_channels,
            params.compression,
            params.verify,
            stall_timeout=params.stall_timeout if watched else 0.0,
        ),
    )


STATUSES = (
    "none", "setup", "active", "pre-switchover", "device", "postcopy-active", "postcopy-paused",
    "completed", "failed", "cancelled",
)  # fmt: skip


class MigrationSource(NotifierCallbacks, PostcopyCommands):
    """Migrates ``guest`` (its memory and ``devices``) to ``uri``.

    ``devices`` are device handlers (objects with the ``SaveHandler``
    protocol and an integer ``device_id``) or devices that
    ``mig.device_handler.DeviceHandler`` wraps. ``params`` are QEMU's
    migration parameters (see ``PARAMETERS``). ``tls_cert``, ``tls_key`` and
    ``tls_ca`` (PEM paths) make every channel mutual TLS. ``link``, ``tracker`` and
    ``clock`` replace the real stream, dirty tracker and wall clock (a
    simulator passes its own). Callbacks run on the migration thread:
    ``on_status(status)``, ``on_pass(record)``, ``on_event(name, info)``
    (also settable as attributes of the same names before ``start``).
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
        self.settings = MigrationParams.from_dict(params)
        if uri is None and link is None:
            raise ValueError("give a destination uri (or a link)")
        if self.settings.dirty_limit and not callable(getattr(guest, "set_dirty_limit", None)):
            raise ValueError("dirty_limit needs a guest with set_dirty_limit()")
        self.params = self.settings.as_dict()
        self.guest = guest
        self.memory = guest.memory
        self.uri = uri
        self.peer = f"destination {peer_name(uri)}"
        self.tls = {"tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca}
        self.clock: Clock = clock or MonotonicClock()
        self.notify = Notifier(on_status, on_pass, on_event)
        self.policy = make_policy(self.settings.policy, **(self.settings.policy_options or {}))
        if self.settings.postcopy:
            self.policy = PostcopySwitch(
                self.policy,
                self.settings.postcopy_after_passes,
                link_cap=lambda: self.settings.max_bandwidth,
            )
        self._postcopy_requested = False
        self.meter = BandwidthMeter()
        self.costs = SwitchoverCosts(source_digest=self.settings.verify == "strict")
        self.migration_id = uuid.uuid4().int & ((1 << 63) - 1)
        self.devices: list[SaveHandler] = _device_handlers(devices)
        self.stops = GuestStops(guest, self.clock, self.costs, self.notify)
        self.monitor = ConvergenceMonitor(self.settings, guest, self.clock, self.notify)
        self.stats = MigrationStats(
            self.memory, self.policy.name, self.devices, self.costs, self.meter,
            self.monitor, self.stops, self.settings.verify,
        )  # fmt: skip
        self._link_override = link
        self._tracker_override = tracker
        self.control: ControlSession | None = None
        self.precopy: Precopy | None = None
        self.switchover: SwitchoverRun | None = None
        self.pre_switchover = PreSwitchover(
            self.settings.pause_before_switchover, self.clock, self._set_status
        )
        self.watch: StallWatch | None = None
        self._cancel: str | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    # The callbacks, settable until the migration starts.
    @property
    def status(self) -> str:
        return self.stats.status

    @property
    def error(self) -> str | None:
        return self.stats.error

    @property
    def phase(self) -> Phase:
        return self.switchover.phase if self.switchover else Phase.PRECOPY

    @property
    def postmigrate(self) -> bool:
        return self.phase is Phase.POSTMIGRATE

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
                # Every step may write (a send slice, an exact size's sync barrier).
                with self.watch.sending() if self.watch else contextlib.nullcontext():
                    self._iteration()
        except MigrationEnded as e:
            self._end(e.status, e.reason, discarded=e.by_peer)
        except Exception as e:  # every failure rolls back, with the reason
            stalled = self.watch.reason if self.watch else None
            reason = stalled or describe(e, self.peer, self._where())
            peer = self.control.peer_reason() if self.control and not stalled else None
            if peer:
                reason = f"{peer} ({reason})"
            status = "cancelled" if self._cancel and not self.phase.go_sent else "failed"
            self._end(status, self._cancel or reason, discarded=peer is not None)
        finally:
            self.stops.downtime_over()
            if self.watch is not None:
                self.watch.close()
            if self.stats.ended_at is None or self.status != "completed":
                self.stats.ended_at = self.clock.now()
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
        """Ask the loop to cancel; False once ``go`` is decided (the destination may run).

        In ``postcopy-paused`` a cancel ends the migration: the guest is lost."""
        if self._done.is_set():
            return False
        if self.phase.go_decided and self.phase is not Phase.POSTCOPY_PAUSED:
            return False
        self._cancel = reason
        return True

    def migrate_continue(self) -> None:
        """QEMU's ``migrate-continue``: end the ``pre-switchover`` pause of
        ``pause_before_switchover`` (``cancel()`` there rolls back instead)."""
        if not self.pre_switchover.release():
            raise RuntimeError(f"migration not in pre-switchover (status {self.status})")

    def query(self) -> dict[str, Any]:
        """``query-migrate``: QEMU's field names plus mig's own keys."""
        return self.stats.to_qmp(self.clock.now())

    def resume_source(self) -> None:
        """Run the source guest again after an unknown outcome.

        When ``resumed`` does not arrive after ``go``, the migration ends
        ``failed`` with ``query()["postmigrate"]`` true and the source guest
        left paused (QEMU's ``postmigrate``): the destination may run it. Only
        the embedder can learn that the destination does not (its own status,
        or the process is gone); then this call returns the devices to
        RUNNING, resumes the guest and removes throttles and dirty limits.
        """
        if not self._done.is_set() or not self.postmigrate or self.switchover is None:
            raise RuntimeError("the source guest is not left paused by an unknown outcome")
        errors = []
        for h in self.devices:
            try:
                h.abort()
            except Exception as e:
                errors.append(f"{h.name}: {e}")
        self.stops.run_again()
        self.switchover.phase = Phase.PRECOPY
        self.stats.postmigrate = False
        self.monitor.remove_aids()
        if errors:
            raise _mig.MigError(f"source guest resumed; devices: {'; '.join(errors)}")

    # -------------------------------------------------------------- setup
    def _set_status(self, status: str) -> None:
        self.stats.status = status
        self.notify.status(status)

    def _check_cancel(self) -> None:
        if self._cancel is not None:
            raise MigrationEnded("cancelled", self._cancel)
        if self.watch is not None and self.watch.reason is not None:
            raise MigrationEnded("failed", self.watch.reason)

    def _where(self) -> str:
        """The phase for a reason ("during pass 3"); from the pass records, as
        the stall watch asks while a blocked send holds the RAM stream."""
        records = self.precopy.passes if self.precopy else []
        passes = records[-1].number if records else 1  # the bulk pass is pass 1
        return source_phase(self.status, self.phase, passes)

    def _setup(self) -> None:
        started = self.stats.started_at = self.clock.now()
        self._set_status("setup")
        link = self.stats.link = CountingLink(self._open_link())
        tracker = self._tracker_override
        if tracker is None:
            tracker_cls = getattr(_mig, "DirtyTracker", None)
            if tracker_cls is None:
                raise _mig.UnsupportedError("this build of mig._mig has no DirtyTracker")
            tracker = tracker_cls(self.memory, backend=self.settings.tracker_backend)
        ram = RamHandler(self.memory, tracker, self.clock)
        self.control = ControlSession(link, self.clock, self.costs, self.notify)
        self.precopy = self.stats.precopy = Precopy(
            ram=ram, devices=self.devices, link=link, clock=self.clock, params=self.settings,
            policy=self.policy, stops=self.stops, monitor=self.monitor, control=self.control,
            costs=self.costs, meter=self.meter, notify=self.notify, started_at=started,
        )  # fmt: skip
        digests = DigestTiming(
            self.memory, self.clock, self.costs, bool(getattr(link, "concurrent_digest", False))
        )
        self.switchover = self.stats.switchover = SwitchoverRun(
            self.precopy, self.control, self.stops, self.monitor, digests, self.settings,
            self.clock, self.notify, self.policy.fail_on_over_budget, self.pre_switchover,
        )  # fmt: skip
        # Only a real stream can stall (and a thread must not read a virtual clock).
        if getattr(link, "concurrent_digest", False):
            self.watch = StallWatch(
                link, self.clock, self.settings.stall_timeout, self.peer,
                self.control.peer_progress,
                lambda: self.status, self._where,
            )  # fmt: skip
        self._check_cancel()
        watched = self.watch is not None
        hello = hello_message(self.migration_id, self.memory, self.devices, self.settings, watched)
        self.control.handshake(hello, self.settings.connect_timeout, self._check_cancel)
        if self.watch is not None:
            self.watch.start()
        faults.point("source.setup")
        if self.settings.postcopy:
            # The destination checks now that it can fetch pages on demand.
            self.control.send(PostcopyAdvise())
        for h in self.precopy.handlers:
            h.setup(link)
        if self.costs.source_digest:
            digests.measure()
        if self.settings.dirty_limit:
            self.guest.set_dirty_limit(self.settings.dirty_limit)  # type: ignore[attr-defined]
        now = self.clock.now()
        self.stats.setup_time = now - started
        self.monitor.start(now, link.transferred())
        self._set_status("active")

    def _open_link(self) -> Link:
        params = self.settings
        if self._link_override is not None:
            if params.max_bandwidth:  # the native sender takes it at construction
                self._link_override.set_max_bandwidth(int(params.max_bandwidth))
            # The native sender opens its channels when built, before hello:
            # a given link that models that work (the simulator's) does it now.
            connect = getattr(self._link_override, "connect_channels", None)
            if connect is not None:
                connect()
            return self._link_override
        sender_cls = getattr(_mig, "Sender", None)
        if sender_cls is None:
            raise _mig.UnsupportedError("this build of mig._mig has no Sender")
        sender = sender_cls(
            self.memory,
            self.uri,
            channels=int(params.multifd_channels),
            migration_id=self.migration_id,
            compression=params.compression,
            max_bandwidth=int(params.max_bandwidth),
            connect_timeout=float(params.connect_timeout),
            **self.tls,
            io_timeout=float(params.io_timeout),
            zero_copy_send=params.zero_copy_send,
        )
        return SenderLink(sender, self.clock)

    # ----------------------------------------------------------- the loop
    def _iteration(self) -> None:
        precopy, control = self.precopy, self.control
        assert precopy is not None and control is not None and self.switchover is not None
        self._check_cancel()
        control.poll()
        cap = self.settings.max_bandwidth
        self.meter.update(precopy.link.transferred(), precopy.link.busy_time(), cap)
        if self._timed_out():
            if self.settings.timeout_action == "cancel":
                raise MigrationEnded("cancelled", f"timeout after {self.settings.timeout} s")
            if self.settings.timeout_action == "postcopy":
                self.notify.event("postcopy-start", reason=f"timeout {self.settings.timeout} s")
                self._switch_over(None, forced=False, postcopy=True)
                return
            self.notify.event("timeout-force")
            self._switch_over(None, forced=True)
            return
        decision = precopy.decide(self._check_cancel)
        if precopy.switchover_near() and self.costs.source_digest:
            self.switchover.digests.refresh()
        if self._postcopy_requested or decision.action is Action.POSTCOPY:
            self.notify.event("postcopy-start", reason=decision.reason or "requested")
            self._switch_over(None, forced=False, postcopy=True)
            return
        if decision.action is Action.COMPLETE:
            self._switch_over(decision.budget, forced=False)
            return
        if decision.action is Action.FAIL:
            raise MigrationEnded("failed", decision.reason or f"policy {self.policy.name} gave up")
        if self.stops.paused:
            precopy.resume_after_stop()
        precopy.send_slice()

    def _timed_out(self) -> bool:
        limit = float(self.settings.timeout)
        started = self.stats.started_at or 0.0
        return bool(limit) and self.clock.now() - started >= limit

    def _switch_over(self, budget: int | None, forced: bool, postcopy: bool = False) -> None:
        assert self.switchover is not None and self.precopy is not None
        if postcopy:
            s = self.settings
            # A link may bring its own post-copy phase (the simulator's).
            make = getattr(self.precopy.link, "postcopy_outgoing", None) or PostcopyOutgoing
            self.switchover.postcopy = make(
                self.uri, s.max_bandwidth, s.max_postcopy_bandwidth, s.postcopy_recover_timeout
            )
            self.switchover.postcopy.one_stream = s.postcopy_push_order == "stream"
        if not self.pre_switchover.enabled:  # else pre-switchover comes first, then device
            self._set_status("device")
        if not self.switchover.run(budget, forced, self._check_cancel):
            self._set_status("active")
            return
        if self.switchover.postcopy is not None:
            self._run_postcopy(self.switchover.postcopy)
        self.monitor.remove_aids()
        self.stats.ended_at = self.clock.now()
        # Cleanup after total-time, as QEMU stops dirty logging after its
        # completion: releasing the tracker walks the guest's page tables.
        self.precopy.ram.abort()
        self._set_status("completed")
        if self.settings.verify == "after-resume":
            # The guest runs on the destination now; wait() returns after the verdict.
            self.switchover.verify_after_resume(lambda e: describe(e, self.peer, self._where()))
        try:
            self.precopy.link.close()
        except Exception as e:  # the migration is complete; report, do not fail
            self.notify.event("close-error", error=str(e))

    def _run_postcopy(self, postcopy: PostcopyOutgoing) -> None:
        """The guest runs on the destination: serve and push until every page is placed."""
        assert self.switchover is not None

        def status(s: str) -> None:
            paused = s == "postcopy-paused"
            self.switchover.phase = Phase.POSTCOPY_PAUSED if paused else Phase.POSTCOPY_ACTIVE  # type: ignore[union-attr]
            self._set_status(s)

        status("postcopy-active")
        faults.point("source.postcopy")
        postcopy.run(status, lambda: self._cancel)
        self.switchover.phase = Phase.DONE

    # ----------------------------------------------------------- the end
    def _end(self, status: str, reason: str, discarded: bool) -> None:
        """Roll back, unless ``go`` is out and the destination may run the guest."""
        if self.watch is not None:
            self.watch.close()  # no heartbeat after the end
        if not self.phase.go_sent or discarded:
            self._rollback(status, reason)
        elif self.status != "completed":
            self._postmigrate(reason)

    def _postmigrate(self, reason: str) -> None:
        """Outcome unknown after ``go``: the source guest stays paused (QEMU's
        ``postmigrate``); ``resume_source()`` runs it again on request."""
        assert self.switchover is not None and self.precopy is not None
        self.switchover.phase = Phase.POSTMIGRATE
        self.stats.postmigrate = True
        self.stats.error = leave_paused(reason, ram=self.precopy.ram, link=self.precopy.link)
        self.stats.status = "failed"
        self.notify.status_while_ending("failed")

    def _rollback(self, status: str, reason: str) -> None:
        """Source guest runs again, the destination is told, nothing is left half-done."""
        if self.switchover is not None:
            self.switchover.phase = Phase.PRECOPY
            if self.switchover.postcopy is not None:
                self.switchover.postcopy.abort()
        self.stats.error = roll_back(
            status,
            reason,
            stops=self.stops,
            monitor=self.monitor,
            handlers=self.precopy.handlers if self.precopy else self.devices,
            link=self.stats.link,
        )
        self.stats.status = status
        self.notify.status_while_ending(status)


def _device_handlers(devices: Sequence[Any]) -> list[SaveHandler]:
    handlers: list[SaveHandler] = []
    for i, dev in enumerate(devices, start=1):
        if isinstance(dev, SaveHandler):
            handlers.append(dev)
        else:
            from mig.device_handler import DeviceHandler  # noqa: PLC0415

            handlers.append(DeviceHandler(dev, device_id=i))
    names = [h.name for h in handlers]
    if len(set(names)) != len(names) or "ram" in names:
        raise ValueError(f"device names must be unique and not 'ram': {names}")
    return handlers
