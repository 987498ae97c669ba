"""``Switchover``: stop the guest, send the rest, commit on ``ready``, end on ``resumed``.

``max_bandwidth`` in the stopped phase: QEMU lifts the rate limit at every
switchover (``migration_switchover_start()``). mig lifts it only when
``avail_switchover_bandwidth`` is set, the user's statement that the link
carries more than the cap once the guest is stopped (QEMU: that parameter
"does not limit the bandwidth during switchover"). Without it the cap stays:
mig's users and its simulator use ``max_bandwidth`` as the capacity of the
link they model, and a stopped phase at loopback speed would report a
downtime that link could never give. A lifted cap is restored if the
switchover is abandoned.

Phases (``Phase``)::

    PRECOPY -> PAUSED [-> PRE_SWITCHOVER -> PAUSED] -> STOP_COPY -> AWAIT_READY
            -> COMMITTED -> AWAIT_RESUMED -> DONE
    STOP_COPY -> PRECOPY: over budget, abandoned, the guest runs again
    AWAIT_RESUMED -> POSTCOPY_ACTIVE <-> POSTCOPY_PAUSED -> DONE: post-copy

``PRE_SWITCHOVER`` (QEMU's ``pause-before-switchover``, ``mig.pre_switchover``):
the guest is paused and nothing is sent until the operator continues; its
wait is in the downtime, as in QEMU, and a cancel there rolls back.

Post-copy (``postcopy`` set, ``mig.postcopy_outgoing``): the stop-copy phase
takes the RAM stream's final harvest out unsent instead of sending it,
opens the page channels, sends every device's state and ``postcopy-run``
before ``complete``; after ``go`` the owed pages are served and pushed
while the guest already runs on the destination (``POSTCOPY_ACTIVE``).

Before ``COMMITTED`` any failure rolls back: the destination never resumes
without ``go``. From ``COMMITTED`` the source no longer cancels, and once
``go`` is out (``AWAIT_RESUMED``) it never resumes its guest on its own: an
unknown outcome ends in ``POSTMIGRATE`` (``docs/protocol.md``).

``verify`` decides where the source's whole-memory digest is paid. Strict:
inside the downtime, on a second thread while the stop-copy state goes out,
and nothing resumes before the destination's root equals it. After-resume:
once ``resumed`` is in (``verify_after_resume``), so it competes with
nothing in the downtime; the source guest never runs again after ``go``, so
its memory is still the frozen memory that was sent. A mismatch then is
detected, not prevented: the destination already runs the guest.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from enum import Enum

from mig import faults
from mig.clock import Clock
from mig.control import ControlSession
from mig.convergence_monitor import ConvergenceMonitor
from mig.digest_timing import DigestTiming
from mig.errors import MigrationEnded, OverBudget
from mig.guest_stops import GuestStops
from mig.notifier import Notifier
from mig.params import MigrationParams
from mig.postcopy_outgoing import PostcopyOutgoing
from mig.pre_switchover import PreSwitchover
from mig.precopy import Precopy
from mig.protocol import (
    Complete,
    Go,
    PostcopyRun,
    Ready,
    Resumed,
    Switchover,
    SwitchoverAbort,
    VerifyDigest,
    VerifyResult,
)
from mig.settling import settle

__all__ = ["Phase", "SwitchoverRun"]

# A "settled" that rehashed fewer chunks times mostly its own overhead.
_MIN_TIMED_CHUNKS = 16
# Settles before a pause: one, a catch-up pass of what its wait let the
# guest dirty, and a second (much shorter) one.
_SETTLE_ROUNDS = 2
_CATCH_UP_AFTER = 0.010
_CATCH_UP_SLICE = 16 << 20


class Phase(Enum):
    PRECOPY = "precopy"
    PAUSED = "paused"
    PRE_SWITCHOVER = "pre-switchover"  # paused, waiting for migrate-continue
    STOP_COPY = "stop-copy"
    AWAIT_READY = "await-ready"
    COMMITTED = "committed"  # "go" decided: no cancel from here
    AWAIT_RESUMED = "await-resumed"  # "go" sent: the destination may run the guest
    DONE = "done"
    POSTMIGRATE = "postmigrate"  # outcome unknown after "go": the guest stays paused
    POSTCOPY_ACTIVE = "postcopy-active"  # the destination runs; owed pages follow
    POSTCOPY_PAUSED = "postcopy-paused"  # a page channel broke; waiting for recover

    @property
    def go_decided(self) -> bool:
        return self is Phase.COMMITTED or self.go_sent

    @property
    def go_sent(self) -> bool:
        return self in (
            Phase.AWAIT_RESUMED,
            Phase.DONE,
            Phase.POSTMIGRATE,
            Phase.POSTCOPY_ACTIVE,
            Phase.POSTCOPY_PAUSED,
        )


class SwitchoverRun:
    """The switchovers of one migration; ``phase`` is where the latest stands."""

    def __init__(
        self,
        precopy: Precopy,
        control: ControlSession,
        stops: GuestStops,
        monitor: ConvergenceMonitor,
        digests: DigestTiming,
        params: MigrationParams,
        clock: Clock,
        notify: Notifier,
        fail_on_over_budget: bool,
        pre_switchover: PreSwitchover | None = None,
    ) -> None:
        self.precopy = precopy
        self.control = control
        self.stops = stops
        self.monitor = monitor
        self.digests = digests
        self.params = params
        self.clock = clock
        self.notify = notify
        self.fail_on_over_budget = fail_on_over_budget
        self.pre_switchover = pre_switchover
        self.phase = Phase.PRECOPY
        self.predicted_downtime: float | None = None
        self.downtime: float | None = None
        self.load_seconds = 0.0
        self.verified = False
        self.verify_time: float | None = None  # s from "resumed" to the verdict
        self.verify_error: str | None = None
        self.breakdown: dict[str, float] = {}
        self.plan: dict[str, float] = {}  # the predicted terms, seconds
        self.settle_time: float | None = None  # s waited for "settled", guest running
        # Set for a post-copy switchover: its pages are owed, not sent.
        self.postcopy: PostcopyOutgoing | None = None

    def run(self, budget: int | None, forced: bool, check_cancel: Callable[[], None]) -> bool:
        """One switchover; True once the destination runs the guest, False if
        abandoned over budget (the guest runs here again)."""
        precopy = self.precopy
        check_cancel()
        if not self.stops.paused and self.postcopy is not None:
            # What the guest dirties from here on is owed to post-copy, not
            # sent now: a catch-up would send pages it then sends again.
            self._settle(check_cancel)
        elif not self.stops.paused:
            self._settle_and_catch_up(check_cancel)
        if not self.stops.paused:
            self._harvest_before_pause()
        self.plan = precopy.switchover_plan()
        self.predicted_downtime = sum(self.plan.values())
        if not forced:
            self.monitor.clear_costs_reason()  # the policy chose to switch over: the costs fit
        self.digests.settle()
        if not self.stops.paused:
            self.stops.pause()
        self.phase = Phase.PAUSED
        down_start, waited = self.stops.paused_at, self._hold(check_cancel)
        link = precopy.link
        precopy_seqs = link.announce()
        self.control.send(Switchover(precopy_seqs))
        link.stop_copy = True
        cap = self.params.switchover_cap
        if cap:
            link.set_max_bandwidth(0)
        self.phase = Phase.STOP_COPY
        t0 = self.clock.now()
        strict = self.params.verify == "strict"
        digest_job: Future[int] | None = None
        try:
            for h in precopy.handlers:
                h.quiesce()
            if strict:
                digest_job = self.digests.digest_in_background()
            t_ram, sent = self._stop_copy(budget, check_cancel)
        except OverBudget as e:
            link.stop_copy = False
            if digest_job is not None:
                digest_job.result()
            if cap:
                link.set_max_bandwidth(cap)
            self._abandon(e, precopy_seqs)
            return False
        check_cancel()
        t_dev = self.clock.now()
        digest: int | None = None
        if strict:
            digest = digest_job.result() if digest_job is not None else precopy.ram.memory.digest()
        t_digest = self.clock.now()
        t_sent = self._send_end(digest, forced)
        faults.point("source.committed")
        ready, t_ready, resumed = self._commit(check_cancel)
        now = self.clock.now()
        self.stops.downtime_over()
        self.downtime = now - down_start
        self.load_seconds = resumed.load
        self.verified = resumed.verified
        self.verify_time = 0.0 if strict else None
        sync = precopy.ram.last_sync_seconds
        parts = {
            "pause": t0 - down_start - waited,
            **({"pre-switchover": waited} if waited else {}),
            "final-sync": sync,
            "final-ram": max(0.0, t_ram - t0 - sync),
            "device-state": t_dev - t_ram,
        }
        if strict:
            parts["digest"] = t_digest - t_dev
        parts["end-records"] = t_sent - t_digest
        parts.update(self._destination_terms(ready, resumed, t_ready - t_sent, now - t_ready))
        self.breakdown = parts
        self._learn(parts, ready)
        self.phase = Phase.DONE if self.postcopy is None else Phase.POSTCOPY_ACTIVE
        return True

    def _hold(self, check_cancel: Callable[[], None]) -> float:
        """pause-before-switchover: wait, guest paused, for migrate-continue.

        The wait is downtime, as in QEMU: the breakdown's ``pre-switchover``
        term (taken out of ``pause``)."""
        if self.pre_switchover is None or not self.pre_switchover.enabled:
            return 0.0
        self.phase = Phase.PRE_SWITCHOVER
        # The operator's wait may be long: the collector runs through it.
        self.stops.collector.release()
        try:
            waited = self.pre_switchover.hold(check_cancel, self.control.poll)
        finally:
            self.stops.collector.hold()
        self.phase = Phase.PAUSED
        return waited

    def _send_end(self, digest: int | None, forced: bool) -> float:
        """The end records, then ``complete``; returns when the records were out."""
        link = self.precopy.link
        faults.point("source.switchover")
        link.finish(digest or 0)
        # Before "complete": a driver that plays the destination inside the
        # send (a simulator) must not charge its work to the source's terms.
        t_sent = self.clock.now()
        self.control.send(
            Complete(
                None if digest is None else format(digest, "032x"),
                self.precopy.ram.generation,
                dict(link.last_seq),
                forced,
            )
        )
        return t_sent

    def _settle_and_catch_up(self, check_cancel: Callable[[], None]) -> None:
        """Settle; if the wait was long enough for the guest to dirty pages,
        or its devices state, that the loop has not seen, send them too,
        still running, and settle again: the stop-copy then holds only what
        the short last wait dirtied. A wait shorter than ``_CATCH_UP_AFTER``
        changed nothing the policy did not decide on.

        The devices matter as much as RAM: a device that keeps working
        (a ``nic`` rewriting its tables) dirties state all through a wait
        the destination's loop drew out, and what no precopy slice sent is
        stop-copy, inside the downtime."""
        precopy = self.precopy
        ram = precopy.ram
        for _ in range(_SETTLE_ROUNDS - 1):
            waited = self._settle(check_cancel)
            if waited < _CATCH_UP_AFTER:
                return
            ram.sync()
            devices_dirty = any(h.pending_estimate() for h in precopy.devices)
            if ram.last_sync_new_pages == 0 and ram.pending_estimate() == 0 and not devices_dirty:
                return
            # The devices' records first, so that the pass this sync records
            # announces them: the destination loads them before it answers
            # the next settle, not after the pause.
            precopy.iterate_devices()
            precopy.after_sync()
            while ram.iterate(precopy.link, _CATCH_UP_SLICE):
                check_cancel()
            precopy.reestimate()
        self._settle(check_cancel)

    def _harvest_before_pause(self) -> None:
        """One more sync, the guest still running, right before the pause.

        The settle's wait let the guest dirty pages no sync has reported. A
        written page costs the tracker's walk far more than an untouched one,
        so the final sync, inside the downtime, would pay for all of them.
        Harvested here they are still sent in the final pass, but the walk in
        the downtime only meets what the guest wrote since. A pass like any
        other sync (``MIGRATION_PASS``), not announced: the destination has
        nothing to land for it.
        """
        precopy = self.precopy
        known = precopy.ram.pending_estimate()
        precopy.ram.sync()
        precopy.record_pass(announce=False)
        # What the plan counts: what was pending (RAM and devices), plus the
        # RAM bytes this sync made known, which it no longer estimates from
        # the dirty rate since the previous sync.
        added = precopy.ram.pending_estimate() - known
        if precopy.pending_exact is not None:
            precopy.pending_exact += added
        if precopy.pending_estimate is not None:
            precopy.pending_estimate += added

    def _settle(self, check_cancel: Callable[[], None]) -> float:
        """Before the pause: wait, the guest still running, until everything
        sent so far landed and the destination's root is current
        (``mig.settling``); learn its per-chunk hash cost."""
        ram = self.precopy.ram
        timeout = self.params.switchover_timeout
        t0 = self.clock.now()
        answer = settle(self.control, self.clock, ram.sync_count, ram.generation, timeout,
                        check_cancel)  # fmt: skip
        waited = self.clock.now() - t0
        self.settle_time = (self.settle_time or 0.0) + waited
        if answer is not None:
            # The wait less the destination's own: one control round trip.
            self.control.settled(max(0.0, waited - answer.landed - answer.seconds))
        if answer is not None and answer.chunks >= _MIN_TIMED_CHUNKS:
            self.precopy.costs.chunk_seconds = answer.seconds / answer.chunks
        return waited

    @staticmethod
    def _destination_terms(
        ready: Ready, resumed: Resumed, to_ready: float, to_resumed: float
    ) -> dict[str, float]:
        """The destination's terms as it measured them, and the control round
        trips: what each wait took beyond the destination's reported work."""
        drain, dest_digest = ready.drain or 0.0, ready.digest or 0.0
        return {
            "drain": drain,
            "dest-digest": dest_digest,
            "load": max(0.0, resumed.load - drain - dest_digest),
            "handshake": max(0.0, to_ready - ready.load)
            + max(0.0, to_resumed - (resumed.load - ready.load)),
        }

    def _learn(self, parts: dict[str, float], ready: Ready) -> None:
        """What this switchover paid becomes the plan of the next one."""
        costs = self.precopy.costs
        if ready.digest is not None:
            costs.dest_root = ready.digest
        costs.end_records = parts["end-records"]
        costs.drain = parts["drain"]
        costs.dest_load = max(0.0, parts["load"] - costs.device)

    def _stop_copy(self, budget: int | None, check_cancel: Callable[[], None]) -> tuple[float, int]:
        """RAM's last pages, then every device's stop-copy state, within ``budget``."""
        precopy = self.precopy
        link = precopy.link
        if self.postcopy is not None:
            # First: the destination accepts the page channels from here on,
            # so that their connect (and TLS handshake) completes before "go".
            self.control.send(PostcopyRun())
            self.postcopy.hand_over(precopy.ram, link)
            budget, sent = None, 0
        else:
            sent = precopy.ram.complete(link, budget)
        t_ram = self.clock.now()
        precopy.record_pass(announce=False)
        for h in precopy.devices:
            check_cancel()
            faults.point("source.stop-copy", device=h.name)
            left = None if budget is None else budget - sent
            sent += precopy.timed_device_work(h, lambda h=h, left=left: h.complete(link, left))
        return t_ram, sent

    def _commit(self, check_cancel: Callable[[], None]) -> tuple[Ready, float, Resumed]:
        """Until "go" the destination never resumes: any failure rolls back."""
        timeout = self.params.switchover_timeout
        self.phase = Phase.AWAIT_READY
        what = "report its state loaded and verified ('ready')"
        ready = self.control.wait_for(Ready, what, timeout, check_cancel)
        t_ready = self.clock.now()
        faults.point("source.ready")
        check_cancel()
        # The commit point: once "go" is out the destination may run the
        # guest, so this side never resumes it on its own again. A send that
        # fails delivered no whole record (the destination acts only on a
        # complete, checksummed one): that still rolls back.
        self.phase = Phase.COMMITTED
        self.control.send(Go())
        self.phase = Phase.AWAIT_RESUMED
        if self.postcopy is not None:
            self.postcopy.start()
        faults.point("source.go")
        resumed = self.control.wait_for(Resumed, "report its guest resumed", timeout, lambda: None)
        return ready, t_ready, resumed

    def verify_after_resume(self, describe: Callable[[BaseException], str] = str) -> None:
        """After-resume: digest the frozen memory, send it, wait for the verdict.

        The destination runs the guest already, so nothing here fails the
        migration: every end (mismatch, no answer, a broken session) is
        ``verified`` false with the reason, and a ``verify-failed`` event.
        ``describe`` tells a broken session's error as what the peer did.
        """
        t0 = self.clock.now()
        timeout = self.params.verify_wait
        try:
            faults.point("source.verify")
            # Two threads: the whole read is memory-bound, and the host's
            # other cores belong to the destination and everything else.
            digest = self.precopy.ram.memory.digest(threads=2)
            self.control.send(VerifyDigest(format(digest, "032x")))
            what = "answer the source's memory digest ('verify-result')"
            result = self.control.wait_for(VerifyResult, what, timeout, lambda: None)
            ok, reason = result.ok, result.reason
        except Exception as e:
            ok, reason = False, f"no verification: {getattr(e, 'reason', None) or describe(e)}"
        self.verify_time = self.clock.now() - t0
        self.verified = ok
        if not ok:
            self.verify_error = reason or "memory digests differ"
            self.notify.event("verify-failed", reason=self.verify_error)

    def _abandon(self, e: OverBudget, precopy_seqs: dict[int, int]) -> None:
        """Over budget: tell the destination which records to drop, run the guest again."""
        link = self.precopy.link
        aborted = {
            dev: (precopy_seqs.get(dev, -1) + 1, last)
            for dev, last in link.last_seq.items()
            if last > precopy_seqs.get(dev, -1)
        }
        self.control.send(SwitchoverAbort(aborted, link.announce(), str(e)))
        self.precopy.switchover_aborts += 1
        self.notify.event("switchover-abort", reason=str(e))
        if self.fail_on_over_budget:
            raise MigrationEnded("failed", f"switchover over budget: {e}")
        self.precopy.resume_after_stop()
        self.phase = Phase.PRECOPY
