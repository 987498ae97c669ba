"""Fault injection: every fault in every phase of a migration over loopback TCP.

Faults: a reset of one data channel, the destination process killed, a source
device failing a state transition, the destination failing to load, and a
peer that stops reading (a stall, ended by a timeout). Phases, as seen by the
source (``mig.faults`` points; the destination's view for load failures):

=============== ========================= ======================================
phase           source point              destination point (load failures)
=============== ========================= ======================================
setup           ``source.setup``          ``dest.setup`` (device RESUMING arc)
early-pass      ``source.pass`` #1        ``dest.pass`` 1
switchover-ack  ``source.switchover-ack`` ``dest.switchover-ack``
late-pass       ``source.pass`` #3        ``dest.pass`` 3
settle          ``source.settle``         ``dest.settled`` (source still running)
guest-stop      ``source.guest-stop``     ``dest.switchover`` (source stopped)
stop-copy       ``source.stop-copy``      ``dest.stop-copy``
switchover      ``source.switchover``     ``dest.switchover-complete``
committed       ``source.committed``      ``dest.resume`` (device RUNNING arc)
=============== ========================= ======================================

``committed`` is the window after ``complete`` is sent and before the
destination's ``resumed`` (the acknowledgement of the switchover). A reset,
stall or kill there must land before the destination acts on ``complete``,
so the proxy holds the channel (or the destination process is frozen) from
the ``switchover`` point on and the fault lands at ``committed``.

Impossible combinations, not run: a source device makes no state transition
in the early-pass, switchover-ack and late-pass phases (it stays in PRE_COPY
while the passes run), nor in switchover and committed (it is already in STOP
once its complete() returns); its only arcs are RUNNING -> PRE_COPY (setup),
PRE_COPY -> PRE_COPY_P2P (guest stop), PRE_COPY_P2P -> STOP_COPY -> STOP
(stop-copy) and back to RUNNING on a rollback.

The commit point (``ready`` then ``go``) has cases of its own
(``test_fault_around_the_commit_point``): a fault between ``ready`` and ``go``
rolls back like the phases above; a control channel reset after ``go``, once
the destination acted on it, leaves the source guest paused with an unknown
outcome while the destination runs the only guest; a ``go`` that never
arrives leaves neither running until ``resume_source()``.

The post-copy phase (the destination already runs the guest, pages still
owed) ends in states of its own, not in a rollback:
``tests/test_faults_postcopy.py``.

Every case checks: the migration ended ``failed`` or ``cancelled`` with a
reason naming the fault; the source guest runs at the end, its memory equal to
what the test itself wrote into it, its device state unchanged; the run/pause
log of both sides never has both running; this process has as many threads
and file descriptors as before; a retry of the same migration completes
byte-exact.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from faultkit import (
    KIND_CONTROL,
    KIND_DATA,
    DestProcess,
    FaultProxy,
    RecordingGuest,
    RunLog,
    grew,
    resources,
    settle,
)

import mig
from mig import faults
from mig.destination import MigrationDestination
from mig.devices import MigState, create
from mig.source import MigrationSource

CAPS = mig.capabilities()
pytestmark = pytest.mark.skipif(
    not CAPS["uffd"]["available"],
    reason=f"host lacks the uffd capability: {CAPS['uffd']['reason']}",
)

MIB = 1 << 20
SIZE = 8 * MIB
NIC = "nic:state=256KiB,rate=0,grow=0"
LATE = 3  # the late pass; the test's guest writes until pass LATE + 1
WRITE_PAGES = 64
# phase: (source point, destination point, which hit of the point)
PHASE_POINTS: dict[str, tuple[str, str, int | None]] = {
    "setup": ("source.setup", "dest.setup", None),
    "early-pass": ("source.pass", "dest.pass", 1),
    "switchover-ack": ("source.switchover-ack", "dest.switchover-ack", None),
    "late-pass": ("source.pass", "dest.pass", LATE),
    "settle": ("source.settle", "dest.settled", None),
    "guest-stop": ("source.guest-stop", "dest.switchover", None),
    "stop-copy": ("source.stop-copy", "dest.stop-copy", None),
    "switchover": ("source.switchover", "dest.switchover-complete", None),
    "committed": ("source.committed", "dest.resume", None),
}
PHASES = tuple(PHASE_POINTS)
# Source device arcs by phase (armed at the phase's point, taken right after).
DEVICE_ARCS = {
    "setup": MigState.PRE_COPY,
    "guest-stop": MigState.PRE_COPY_P2P,
    "stop-copy": MigState.STOP_COPY,
}
# What the reason must name.
REASONS = {
    "reset": r"reset|broken pipe|closed|eof",
    "dest-killed": r"reset|broken pipe|closed|eof|did not report",
    "device-transition": r"nic0: injected failure on arc",
    "dest-load": r"destination: .*(failed to load|injected failure)",
    "stall": r"tim(e|ed) ?out|stall|within [0-9.]+ s",
}
FAULTS = tuple(REASONS)
CASES = [(f, p) for f in FAULTS for p in PHASES if f != "device-transition" or p in DEVICE_ARCS]
# A running workload: one case per fault, each in another phase.
WORKLOAD = "uniform:wss=1MiB,rate=1000"
WORKLOAD_CASES = [
    ("reset", "late-pass"),
    ("dest-killed", "stop-copy"),
    ("device-transition", "guest-stop"),
    ("dest-load", "switchover"),
    ("stall", "early-pass"),
]
TIMEOUTS = {"io_timeout": 1.0, "idle_timeout": 2.0, "accept_timeout": 10.0}
PARAMS: dict[str, Any] = {
    "multifd_channels": 2,
    "max_bandwidth": 128 * MIB,
    "downtime_limit": 1,  # ms: the test's writes keep a pass going until LATE + 1
    "io_timeout": TIMEOUTS["io_timeout"],
    "switchover_timeout": 2.0,
    "connect_timeout": 5.0,
    "timeout": 4.0,
}


STRICT = {**PARAMS, "verify": "strict"}


@dataclass
class Side:
    """The destination of one attempt: in this process or in its own."""

    uri: str
    dest: MigrationDestination | None = None
    proc: DestProcess | None = None
    memory: mig.GuestMemory | None = None
    device: Any = None

    def wait(self) -> dict[str, Any]:
        if self.dest is not None:
            return self.dest.wait(30)
        assert self.proc is not None
        return self.proc.wait(30)


@dataclass
class Case:
    fault: str
    phase: str
    workload: str = "idle"
    log: RunLog = field(default_factory=RunLog)
    fired: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.src = mig.GuestMemory(SIZE)
        rng = np.random.default_rng(1)
        self.src.array[:] = rng.integers(0, 256, SIZE, dtype=np.uint8)
        self.shadow = self.src.array.copy()  # what the guest wrote, as the test knows it
        self.raw = mig.WorkloadGuest(self.src, vcpus=1, workload=self.workload)
        self.guest = RecordingGuest(self.raw, self.log)
        self.device = create(NIC, name="nic0")
        self.device_digest = self.device.state_digest()
        self.in_process = self.fault != "dest-killed"
        if self.in_process:
            self.dst = mig.GuestMemory(SIZE)
            self.dst_device = create(NIC, name="nic0", active=False)
        self.rng = np.random.default_rng(2)
        self.passes_seen = 0

    def close(self) -> None:
        self.raw.close()
        self.device.close()
        if self.in_process:
            self.dst_device.close()

    # ------------------------------------------------------------ the guest
    def on_pass(self, record: dict[str, Any]) -> None:
        """The guest writes between passes (only while it runs) until LATE + 1,
        so that every run has a late pass; with a workload the vCPUs write too."""
        self.passes_seen += 1
        if self.passes_seen > LATE + 1 or not self.raw.running:
            return
        pages = self.rng.choice(self.src.num_pages, WRITE_PAGES, replace=False)
        page = self.src.page_size
        for p in pages:
            data = self.rng.integers(0, 256, page, dtype=np.uint8)
            self.src.array[p * page : (p + 1) * page] = data
            self.shadow[p * page : (p + 1) * page] = data

    # ------------------------------------------------------- destinations
    def destination(self) -> Side:
        if not self.in_process:
            proc = DestProcess(SIZE, NIC.replace("nic:", "nic:name=nic0,"), self.log, **TIMEOUTS)
            return Side(proc.uri, proc=proc)
        dest = MigrationDestination(
            "tcp:127.0.0.1:0",
            self.dst,
            [self.dst_device],
            on_resume=lambda: self.log.add("dest", "run"),
            **TIMEOUTS,
        )
        dest.start()
        return Side(str(dest.uri), dest=dest, memory=self.dst, device=self.dst_device)

    def migrate(self, uri: str) -> dict[str, Any]:
        self.passes_seen = 0
        source = MigrationSource(self.guest, [self.device], uri=uri, on_pass=self.on_pass, **PARAMS)
        source.start()
        return source.wait(60)

    # ------------------------------------------------------------- faults
    def once(self, point: str, nth: int | None, action: Callable[[], None]) -> None:
        """Run ``action`` at the ``nth`` time ``point`` is reached (the first if None)."""
        hits = 0

        def run(info: dict[str, Any]) -> None:
            nonlocal hits
            hits += 1
            if hits == (nth or 1):
                self.fired.append(point)
                action()

        faults.arm(point, run)

    def arm(self, side: Side, proxy: FaultProxy | None) -> None:
        point, dpoint, number = PHASE_POINTS[self.phase]
        committed = self.phase == "committed"
        if self.fault == "reset":
            assert proxy is not None
            if committed:
                self.once("source.switchover", None, lambda: proxy.hold(KIND_DATA, 0))
            self.once(point, number, lambda: proxy.reset(KIND_DATA, 0))
        elif self.fault == "stall":
            assert proxy is not None
            if committed:
                self.once("source.switchover", None, proxy.hold)
            self.once(point, number, proxy.stall)
        elif self.fault == "dest-killed":
            assert side.proc is not None
            proc = side.proc
            if committed:
                self.once("source.switchover", None, proc.stop)
            self.once(point, number, proc.kill)
        elif self.fault == "device-transition":
            arc = DEVICE_ARCS[self.phase]
            self.once(point, number, lambda: self.device.inject_fault(fail=arc))
        else:
            action = self._load_failure(side)
            if not self.fired:
                self.once(dpoint, number, action)

    def _load_failure(self, side: Side) -> Callable[[], None]:
        # Where the destination device takes an arc, the device itself fails.
        arcs = {"setup": MigState.RESUMING, "committed": MigState.RUNNING}
        if self.phase in arcs:
            side.device.inject_fault(fail=arcs[self.phase])
            self.fired.append(f"destination device arc to {arcs[self.phase].name}")
            return lambda: None

        def fail() -> None:
            raise faults.InjectedFault(f"failed to load at {self.phase}")

        return fail


def run_case(fault: str, phase: str, workload: str = "idle") -> None:
    case = Case(fault, phase, workload)
    try:
        _check_case(case)
    finally:
        faults.disarm_all()
        case.close()


def _check_case(case: Case) -> None:
    before = resources()
    side = case.destination()
    proxy = FaultProxy(side.uri) if case.fault in ("reset", "stall") else None
    case.arm(side, proxy)
    try:
        q = case.migrate(proxy.uri if proxy else side.uri)
    finally:
        faults.disarm_all()
        if proxy is not None:
            proxy.close()
    d = side.wait()
    fired = case.fired[-1] if case.fired else None
    where = f"{case.fault} at {case.phase} (fired: {case.fired})"
    assert fired is not None, f"the fault never fired: {where}; {q.get('error-desc')}"

    # status and reason
    assert q["status"] in ("failed", "cancelled"), (where, q["status"], d)
    reason = q.get("error-desc", "")
    assert re.search(REASONS[case.fault], reason, re.I), (where, reason)
    assert d.get("status") != "completed" and not d.get("verified"), (where, d)

    # the source guest runs, its memory and device state untouched by the migration
    assert case.raw.running and case.device.state is MigState.RUNNING, where
    if case.workload == "idle":
        assert case.src.digest() == _digest_of(case.shadow), f"source memory changed: {where}"
        assert case.device.state_digest() == case.device_digest, where
    else:
        writes = case.raw.stats()["writes"]
        _wait_for(lambda: case.raw.stats()["writes"] > writes, f"guest does not run: {where}")

    # never both running, nothing leaked
    assert case.log.runs("dest") == 0, (where, case.log.events)
    assert not case.log.overlaps(), case.log.events
    assert not (leak := grew(settle(before), before)), f"leaked: {where}: {leak}"

    # the same migration again, without the fault
    case.device.clear_faults()
    if case.in_process:
        case.dst_device.clear_faults()
    side = case.destination()
    q = case.migrate(side.uri)
    d = side.wait()
    assert q["status"] == "completed" and q["verified"], (where, q.get("error-desc"), d)
    assert not case.raw.running  # stays paused after completion
    digest = format(case.src.digest(), "032x")
    device = format(case.device.state_digest(), "032x")
    if side.memory is not None:
        assert format(side.memory.digest(), "032x") == digest, where
        assert format(side.device.state_digest(), "032x") == device, where
    else:
        assert d["memory-digest"] == digest and d["device-digests"] == [device], (where, d)
    if case.workload == "idle":
        assert digest == format(_digest_of(case.shadow), "032x")
    assert case.log.runs("dest") == 1 and not case.log.overlaps(), case.log.events
    assert not (leak := grew(settle(before), before)), f"leaked by the retry: {where}: {leak}"


def _digest_of(data: np.ndarray) -> int:
    mem = mig.GuestMemory(len(data))
    mem.array[:] = data
    return mem.digest()


def _wait_for(cond: Callable[[], bool], msg: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, msg
        time.sleep(0.01)


@pytest.mark.parametrize(("fault", "phase"), CASES, ids=[f"{f}@{p}" for f, p in CASES])
def test_fault_in_phase(fault: str, phase: str) -> None:
    run_case(fault, phase)


@pytest.mark.parametrize(
    ("fault", "phase"), WORKLOAD_CASES, ids=[f"{f}@{p}" for f, p in WORKLOAD_CASES]
)
def test_fault_with_a_running_workload(fault: str, phase: str) -> None:
    run_case(fault, phase, WORKLOAD)


COMMIT_CASES = ("fail-before-go", "reset-after-go", "go-lost")
AFTER_RESUME_CASES = ("digest-after-resume", "verify-lost", "dest-killed-after-go")


@pytest.mark.parametrize("fault", COMMIT_CASES)
def test_fault_around_the_commit_point(fault: str) -> None:
    """Never both running: before ``go`` the source rolls back; after it the
    source guest stays paused unless the destination said it discarded."""
    case = Case("reset", "committed")
    try:
        _check_commit_case(case, fault)
    finally:
        faults.disarm_all()
        case.close()


def _check_commit_case(case: Case, fault: str) -> None:
    before = resources()
    side = case.destination()
    assert side.dest is not None
    proxy = FaultProxy(side.uri)

    def fail_before_go() -> None:
        proxy.hold(KIND_CONTROL)  # not even the source's "failed" arrives
        raise faults.InjectedFault("source failed between ready and go")

    if fault == "fail-before-go":
        case.once("source.ready", None, fail_before_go)
    elif fault == "reset-after-go":  # the destination has "go": the reset loses "resumed"
        case.once("dest.resume", None, lambda: proxy.reset(KIND_CONTROL, 0))
    else:  # "go" waits in the stalled proxy, as would the destination's "failed"
        case.once("source.ready", None, proxy.stall)
    # Strict: "ready" means verified, so the destination's verdict is known at "go".
    source = MigrationSource(case.guest, [case.device], uri=proxy.uri, **STRICT)
    try:
        q = source.run()
        d = side.wait()
    finally:
        faults.disarm_all()
        proxy.close()
    where = f"{fault} (fired: {case.fired}): {q.get('error-desc')}; {d}"
    assert case.fired, where
    assert q["status"] == "failed", where
    assert not case.log.overlaps(), case.log.events
    if fault == "fail-before-go":
        assert "between ready and go" in q["error-desc"] and not q.get("postmigrate"), where
        assert d["status"] == "failed" and "no go from the source" in d["error-desc"], where
        assert case.log.runs("dest") == 0, where
    elif fault == "reset-after-go":
        assert q.get("postmigrate") and "outcome unknown after 'go'" in q["error-desc"], where
        assert "left paused" in q["error-desc"], where
        assert d["status"] == "completed" and d["verified"], where
        assert "'resumed' was not delivered" in d["error-desc"], where
        assert case.log.runs("dest") == 1, case.log.events
        assert not case.raw.running, where  # the destination runs the only guest
        assert side.memory is not None
        assert side.memory.digest() == case.src.digest() == _digest_of(case.shadow), where
        assert side.device.state_digest() == case.device.state_digest(), where
    else:
        assert q.get("postmigrate") and "did not report its guest resumed" in q["error-desc"]
        assert d["status"] == "failed" and "no go from the source" in d["error-desc"], where
        assert case.log.runs("dest") == 0 and not case.raw.running, where
        source.resume_source()  # the embedder knows the destination discarded
        assert case.raw.running and case.device.state is MigState.RUNNING, where
        assert not source.query().get("postmigrate"), where
        with pytest.raises(RuntimeError, match="not left paused"):
            source.resume_source()
    if fault != "reset-after-go":
        assert case.raw.running and case.device.state is MigState.RUNNING, where
        assert case.src.digest() == _digest_of(case.shadow), where
        assert case.device.state_digest() == case.device_digest, where
    assert not case.log.overlaps(), case.log.events
    del source, side  # their sockets close with them
    assert not (leak := grew(settle(before), before)), f"leaked: {where}: {leak}"


@pytest.mark.parametrize("fault", AFTER_RESUME_CASES)
def test_after_resume_verification_faults(fault: str) -> None:
    """After-resume: the source's digest comes once the destination runs the
    guest. Its delay changes nothing but the time of the verdict; a session
    lost before the verdict leaves both sides completed and unverified, with
    the reason; a destination killed after ``go`` leaves the source paused in
    postmigrate, as in strict mode."""
    case = Case("dest-killed" if fault == "dest-killed-after-go" else "reset", "committed")
    try:
        _check_after_resume_case(case, fault)
    finally:
        faults.disarm_all()
        case.close()


def _destination_looker(
    dest: MigrationDestination | None, case: Case, seen: dict[str, Any]
) -> Callable[[], None]:
    """Record the destination's state once it runs the guest."""

    def look() -> None:
        assert dest is not None
        _wait_for(lambda: dest.status == "completed", "the destination did not resume")
        seen.update(dest.query(), runs=case.log.runs("dest"))

    return look


def _check_after_resume_case(case: Case, fault: str) -> None:
    before = resources()
    side = case.destination()
    proxy = FaultProxy(side.uri) if side.dest is not None else None
    seen: dict[str, Any] = {}
    look_at_the_destination = _destination_looker(side.dest, case, seen)

    if fault == "digest-after-resume":
        case.once("source.verify", None, look_at_the_destination)
    elif fault == "verify-lost":
        assert proxy is not None
        case.once("source.verify", None, lambda: proxy.reset(KIND_CONTROL, 0))
    else:
        assert side.proc is not None
        case.once("source.ready", None, side.proc.stop)  # it cannot act on "go"
        case.once("source.go", None, side.proc.kill)
    uri = proxy.uri if proxy is not None else side.uri
    source = MigrationSource(case.guest, [case.device], uri=uri, **PARAMS)
    try:
        q = source.run()
        d = side.wait()
    finally:
        faults.disarm_all()
        if proxy is not None:
            proxy.close()
    where = f"{fault} (fired: {case.fired}): {q.get('error-desc')}; {d}"
    assert case.fired, where
    assert q["verify"] == "after-resume", where
    assert not case.log.overlaps(), case.log.events
    if fault == "dest-killed-after-go":
        assert q["status"] == "failed" and q.get("postmigrate"), where
        assert not case.raw.running and not q["verified"], where
        source.resume_source()  # the embedder knows the destination is gone
        assert case.raw.running and case.device.state is MigState.RUNNING, where
        assert case.src.digest() == _digest_of(case.shadow), where
    else:
        assert side.memory is not None
        assert q["status"] == "completed" and d["status"] == "completed", where
        assert case.log.runs("dest") == 1 and not case.raw.running, where
        assert side.memory.digest() == case.src.digest() == _digest_of(case.shadow), where
        if fault == "digest-after-resume":
            # The guest ran on the destination before the source's digest left.
            assert seen["runs"] == 1 and seen["status"] == "completed", seen
            assert seen["verified"] is False and "verify-time" not in seen, seen
            assert q["verified"] and d["verified"], where
            assert q["verify-time"] > 0 and d["verify-time"] > 0, where
        else:
            assert not q["verified"] and "no verification" in q["verify-error"], where
            assert not d["verified"] and d["verify-error"], where
    del source, side
    seen.clear()
    assert not (leak := grew(settle(before), before)), f"leaked: {where}: {leak}"


def test_a_first_pass_longer_than_the_idle_timeout_completes() -> None:
    """Data arriving counts as activity: only a silent link is idle."""
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    src.array[:: src.page_size] = 9
    guest = mig.WorkloadGuest(src, vcpus=1, workload="idle")
    try:
        dest = MigrationDestination("tcp:127.0.0.1:0", dst, idle_timeout=0.5)
        dest.start()
        # 8 MiB at 4 MiB/s: the first pass alone lasts two seconds.
        source = MigrationSource(guest, uri=dest.uri, max_bandwidth=4 * MIB, timeout=30)
        q = source.run()
        d = dest.wait(10)
    finally:
        guest.close()
    assert q["status"] == "completed" and d["status"] == "completed", (q.get("error-desc"), d)
    assert q["total-time"] > 1500 and src.digest() == dst.digest()


def test_a_destination_no_source_reached_says_so() -> None:
    """No source connects within ``accept_timeout``: the reason is the
    listener's (what was missing), not a stall blamed on a silent source."""
    dest = MigrationDestination("tcp:127.0.0.1:0", mig.GuestMemory(SIZE), accept_timeout=0.3)
    dest.start()
    d = dest.wait(10)
    reason = d["error-desc"]
    assert d["status"] == "failed" and "no complete migration session within" in reason, reason
    assert "control channel missing" in reason and "stopped answering" not in reason
