"""``DestinationCore``: the destination's side of the control protocol, with no I/O.

It takes what happened (a control message, device records arriving, the end
records verified, the time) and returns ``Effect`` values: what to send and
what to do. It never reads a socket, touches memory or calls a handler, so
``MigrationDestination`` (real channels), the simulator's ``SimLink``
(virtual time) and the loop tests' ``VirtualLink`` all drive this one core
and differ only in how they carry out the effects and what time they pass.

Phases (``DestinationPhase``)::

    AWAIT_HELLO -> ACTIVE <-> SWITCHOVER -> STOP_COPY -> AWAIT_GO -> [AWAIT_VERIFY ->] RESUMED

``AWAIT_VERIFY`` (``verify`` after-resume only): the guest already runs here;
the source's digest of its frozen memory is compared with the root taken
before resume. Whatever happens then (a mismatch, a timeout, a broken
session) is reported, never a discard: the guest cannot be taken back.

Everything the protocol decides lives here: the ``hello`` checks, the device
records' bounds (``mig.reorder``), ``device-initial-done`` and
``switchover-ack``, the stop-copy completeness and digest checks before
``ready``, the commit point: resume only on ``go``, discard on a ``go``
that does not come within ``go_timeout``, and the precopy's liveness: a
source that sends nothing (no message, no data) for the ``stall_timeout``
its ``hello`` gave ends the migration (``mig.stall_watch``). Any end is a ``MigrationEnded``
(``by_peer`` when the source ended it, so there is nobody to tell).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from mig import protocol
from mig._mig import ProtocolError
from mig.errors import MigrationEnded
from mig.protocol import (
    Cancel,
    Complete,
    DeviceInitialDone,
    Failed,
    Go,
    Hello,
    HelloAck,
    Message,
    Pass,
    Ping,
    Pong,
    PostcopyAdvise,
    PostcopyRun,
    Progress,
    Ready,
    Resumed,
    Settle,
    Switchover,
    SwitchoverAbort,
    SwitchoverAck,
    VerifyDigest,
    VerifyResult,
)
from mig.reorder import DEFAULT_MAX_QUEUED_BYTES, DeviceRecord, ReorderBuffer

__all__ = [
    "DestinationPhase",
    "DestinationCore",
    "Effect",
    "Send",
    "SetStatus",
    "StartLoads",
    "Load",
    "AnswerPass",
    "EnterSwitchover",
    "FinishStopCopy",
    "Resume",
    "SettleChannels",
    "AdvisePostcopy",
]


class DestinationPhase(Enum):
    AWAIT_HELLO = "await-hello"
    ACTIVE = "active"
    SWITCHOVER = "switchover"  # guest paused on the source, stop-copy coming
    STOP_COPY = "stop-copy"  # ``complete`` received: finish loading, verify
    AWAIT_GO = "await-go"  # ``ready`` sent: the source's commit point
    AWAIT_VERIFY = "await-verify"  # resumed; the source's digest still to compare
    RESUMED = "resumed"


_PRECOPY = (DestinationPhase.ACTIVE, DestinationPhase.SWITCHOVER)
_LOADING = (*_PRECOPY, DestinationPhase.STOP_COPY)


# ----------------------------------------------------------------- effects
@dataclass(frozen=True)
class Send:
    """Send ``message`` to the source."""

    message: Message


@dataclass(frozen=True)
class SetStatus:
    """The destination's ``query()`` status is now ``status``."""

    status: str


@dataclass(frozen=True)
class StartLoads:
    """Prepare every handler to load (``load_setup``), before ``hello-ack``."""


@dataclass(frozen=True)
class Load:
    """Hand ``record`` to its device's handler (``load_state``)."""

    record: DeviceRecord


@dataclass(frozen=True)
class AnswerPass:
    """Answer pass ``number`` with a ``pass-ack`` carrying this side's timings."""

    number: int
    generation: int


@dataclass(frozen=True)
class EnterSwitchover:
    """The source paused its guest: stop background work that adds downtime."""


@dataclass(frozen=True)
class FinishStopCopy:
    """Wait for the end records, feed the last device records, then call
    ``stop_copy_received``, every ``load_complete``, and ``verify``."""


@dataclass(frozen=True)
class Resume:
    """``go`` arrived: start the guest here (``load_resume``), then call ``resumed``."""


@dataclass(frozen=True)
class SettleChannels:
    """Once the channels hold the sync records of ``generation``, make the
    root current and answer ``settled`` (the source pauses after it)."""

    number: int
    generation: int


@dataclass(frozen=True)
class AdvisePostcopy:
    """``postcopy-advise``: check that memory can be registered for
    missing-page faults here; fail the migration naming what is missing."""


Effect = (
    Send
    | SetStatus
    | StartLoads
    | Load
    | AnswerPass
    | EnterSwitchover
    | FinishStopCopy
    | Resume
    | SettleChannels
    | AdvisePostcopy
)


class DestinationCore:
    """The protocol state of one incoming migration.

    ``devices``: device id -> name, as the destination has them;
    ``max_queued_bytes``: device id -> the bytes of its records the
    destination may hold out of order (`mig.reorder.ReorderBuffer`'s bound).
    ``initially_loaded``: devices with no precopy initial data to wait for
    (more can be marked with ``initial_loaded``). Timeouts are in seconds of
    whatever clock the driver passes as ``now``; ``tick`` enforces them.
    """

    def __init__(
        self,
        page_size: int,
        ram_size: int,
        devices: Mapping[int, str],
        *,
        max_queued_bytes: Mapping[int, int] | None = None,
        initially_loaded: Iterable[int] = (),
        hello_timeout: float = math.inf,
        idle_timeout: float = math.inf,
        go_timeout: float = math.inf,
        verify: str | None = None,
        verify_timeout: float = math.inf,
    ) -> None:
        self.page_size = page_size
        self.ram_size = ram_size
        self.devices = dict(devices)
        self.hello_timeout = hello_timeout
        self.idle_timeout = idle_timeout
        self.go_timeout = go_timeout
        # ``verify``: the only mode this side accepts (None: the source's).
        self.required_verify = verify
        self.verify_timeout = verify_timeout
        self.verify_mode = verify or "after-resume"
        self.stall_timeout = 0.0  # from hello; 0: the source sends no heartbeats
        self.source_name = "source"  # who, for the reasons: "source 10.0.0.1:5555"
        self.verify_error: str | None = None
        self.verify_time: float | None = None
        self.phase = DestinationPhase.AWAIT_HELLO
        bounds = max_queued_bytes or {}
        self.records = ReorderBuffer(
            {d: bounds.get(d, DEFAULT_MAX_QUEUED_BYTES) for d in self.devices}
        )
        self.migration_id: int | None = None
        self.channels = 1
        self.passes = 0
        self.pass_number = 1  # the source's pass in progress: the bulk pass is pass 1
        self.verified = False
        self.memory_digest: str | None = None
        self.load_seconds = 0.0
        # ``postcopy-run`` came: the guest resumes with pages still owed.
        self.postcopy = False
        self._initial_done: list[int] = [d for d in initially_loaded if d in self.devices]
        self._announced = 0
        self._acked = False
        self._expected: Complete | None = None
        self._complete_at = 0.0
        self._ready_at = 0.0
        self._go_at = 0.0
        self._loaded = 0.0
        self._hello_deadline = math.inf
        self._last_activity = 0.0

    @classmethod
    def matching(cls, hello: Hello, **kw: object) -> DestinationCore:
        """A core configured exactly as ``hello`` describes the source (test kits)."""
        devices = {d.id: d.name for d in hello.devices}
        return cls(hello.page_size, hello.ram_size, devices, **kw)  # type: ignore[arg-type]

    # ------------------------------------------------------------ time
    def await_hello(self, now: float) -> None:
        """The session is open: ``hello`` is due within ``hello_timeout``."""
        self._hello_deadline = now + self.hello_timeout

    def activity(self, now: float) -> None:
        """Data arrived on the channels: a long first pass is not idleness."""
        self._last_activity = now

    def tick(self, now: float) -> None:
        """Nothing arrived: end the migration if the phase's wait ran out."""
        match self.phase:
            case DestinationPhase.AWAIT_HELLO if now >= self._hello_deadline:
                raise MigrationEnded("failed", "no hello from the source")
            case DestinationPhase.ACTIVE if (
                self.stall_timeout and now - self._last_activity > self.stall_timeout
            ):
                raise MigrationEnded(
                    "failed",
                    f"precopy stalled during pass {self.pass_number}: the {self.source_name} sent "
                    f"nothing for {self.stall_timeout:g} s (stall-timeout)",
                )
            case DestinationPhase.ACTIVE | DestinationPhase.SWITCHOVER if (
                now - self._last_activity > self.idle_timeout
            ):
                raise MigrationEnded(
                    "failed",
                    f"no control message or data for {self.idle_timeout} s "
                    f"from the {self.source_name}",
                )
            case DestinationPhase.AWAIT_GO if now - self._ready_at >= self.go_timeout:
                raise MigrationEnded("failed", f"no go from the source within {self.go_timeout} s")
            case DestinationPhase.AWAIT_VERIFY if now - self._go_at >= self.verify_timeout:
                self.verify_abandoned(
                    f"no memory digest from the source within {self.verify_timeout} s", now
                )

    # -------------------------------------------------------- messages
    def on_message(self, message: Message, now: float) -> list[Effect]:
        self._last_activity = now
        if isinstance(message, Progress):  # a heartbeat: its arrival is the point
            return []
        if self.phase is DestinationPhase.AWAIT_VERIFY:
            return self._verify_digest(message, now)
        match message:
            case Cancel(reason=reason) | Failed(reason=reason):
                status = "cancelled" if isinstance(message, Cancel) else "failed"
                raise MigrationEnded(status, f"source: {reason}", by_peer=True)
            case Hello() if self.phase is DestinationPhase.AWAIT_HELLO:
                return self._hello(message)
            case _ if self.phase is DestinationPhase.AWAIT_HELLO:
                raise ProtocolError(f"expected hello, got {protocol.type_name(message)!r}")
            case Go() if self.phase is DestinationPhase.AWAIT_GO:
                after = self.verify_mode == "after-resume"
                self.phase = DestinationPhase.AWAIT_VERIFY if after else DestinationPhase.RESUMED
                self._go_at = now
                return [Resume()]
            case _ if self.phase is DestinationPhase.AWAIT_GO:
                raise ProtocolError(f"expected go, got {protocol.type_name(message)!r}")
            case Ping(value=value) if self.phase in _PRECOPY:
                return [Send(Pong(value))]
            case _ if self.phase in _PRECOPY:
                return self._precopy_message(message, now)
        raise ProtocolError(
            f"unexpected control message {protocol.type_name(message)!r} on the destination"
        )

    def _hello(self, hello: Hello) -> list[Effect]:
        problems = []
        if hello.version != protocol.VERSION:
            problems.append(f"protocol version {hello.version!r} is not {protocol.VERSION}")
        if hello.page_size != self.page_size:
            problems.append(f"page size {hello.page_size} != {self.page_size}")
        if hello.ram_size != self.ram_size:
            problems.append(f"RAM size {hello.ram_size} != {self.ram_size}")
        theirs = sorted((d.id, d.name) for d in hello.devices)
        ours = sorted(self.devices.items())
        if theirs != ours:
            problems.append(f"devices {theirs} != {ours}")
        mode = hello.params.verify
        if self.required_verify is not None and mode != self.required_verify:
            problems.append(f"verify mode {mode!r} != {self.required_verify!r} required here")
        if problems:
            raise MigrationEnded("failed", "; ".join(problems))
        self.migration_id = hello.migration_id
        self.verify_mode = mode
        self.stall_timeout = hello.params.stall_timeout
        self.channels = max(1, hello.params.multifd_channels)
        self.phase = DestinationPhase.ACTIVE
        return [StartLoads(), Send(HelloAck()), SetStatus("active")]

    def _precopy_message(self, message: Message, now: float) -> list[Effect]:
        match message:
            case Pass():
                self.passes += 1
                self.pass_number = message.number
                self.records.announce(message.device_seqs)
                return [AnswerPass(message.number, message.generation)]
            case Settle():
                return [SettleChannels(message.number, message.generation)]
            case Switchover():
                self.phase = DestinationPhase.SWITCHOVER
                return [SetStatus("device"), EnterSwitchover()]
            case PostcopyAdvise():
                return [AdvisePostcopy()]
            case PostcopyRun() if self.phase is DestinationPhase.SWITCHOVER:
                self.postcopy = True
                return []
            case SwitchoverAbort():
                self.records.announce(message.device_seqs)
                self.phase = DestinationPhase.ACTIVE
                return [SetStatus("active")]
            case Complete() if (message.digest is None) == (self.verify_mode == "strict"):
                raise ProtocolError(
                    f"complete {'without' if message.digest is None else 'with'} a digest "
                    f"in verify mode {self.verify_mode!r}"
                )
            case Complete():
                self.records.announce(message.device_seqs)
                self.phase = DestinationPhase.STOP_COPY
                self._expected = message
                self._complete_at = now
                return [SetStatus("device"), FinishStopCopy()]
        raise ProtocolError(
            f"unexpected control message {protocol.type_name(message)!r} on the destination"
        )

    # ---------------------------------------------------- device records
    def records_arrived(self, records: Iterable[DeviceRecord]) -> None:
        for record in records:
            self.records.add(record)

    def loads(self) -> list[Load]:
        """The records to load now, in order (only between ``hello`` and ``ready``)."""
        if self.phase not in _LOADING:
            return []
        return [Load(r) for r in self.records.release()]

    def initial_loaded(self, device: int) -> None:
        """``device`` reports its precopy initial data loaded."""
        if device in self.devices and device not in self._initial_done:
            self._initial_done.append(device)

    def announcements(self) -> list[Effect]:
        """``device-initial-done`` for each device newly loaded, then
        ``switchover-ack`` once every device is: the source completes only after it."""
        if self._acked or self.phase not in _PRECOPY:
            return []
        fresh = self._initial_done[self._announced :]
        self._announced = len(self._initial_done)
        out: list[Effect] = [Send(DeviceInitialDone(self.devices[d])) for d in fresh]
        if len(self._initial_done) == len(self.devices):
            self._acked = True
            out.append(Send(SwitchoverAck()))
        return out

    @property
    def expected_digest(self) -> str | None:
        """The source's memory digest, once ``complete`` brought it."""
        return None if self._expected is None else self._expected.digest

    # ------------------------------------------------------ switchover
    def stop_copy_received(self) -> None:
        """Every device record the ``complete`` announced must be loaded by now."""
        missing = self.records.missing()
        if missing:
            raise MigrationEnded("failed", f"device {missing[0]}: stop-copy records missing")

    def verify(
        self,
        memory_digest: str,
        now: float,
        digest_seconds: float | None = None,
        drain_seconds: float | None = None,
    ) -> list[Effect]:
        """The end records are in and every device loaded; ``memory_digest`` is
        the root of the memory the guest will start from (taken in
        ``digest_seconds``, after ``drain_seconds`` waiting for the end
        records). Strict: it must equal the source's. Then report ``ready``
        and wait for ``go``."""
        if self.phase is not DestinationPhase.STOP_COPY or self._expected is None:
            raise ProtocolError(f"verify in phase {self.phase.value}")
        if self.verify_mode == "strict":
            expected = self._expected.digest
            if memory_digest != expected:
                raise MigrationEnded(
                    "failed", f"memory digest {memory_digest} != source {expected}"
                )
            self.verified = True
            self.verify_time = 0.0
        self.memory_digest = memory_digest
        self._loaded = now - self._complete_at
        self._ready_at = now
        self.phase = DestinationPhase.AWAIT_GO
        return [Send(Ready(self._loaded, self.verified, digest_seconds, drain_seconds))]

    def resumed(self, now: float) -> list[Effect]:
        """The guest runs here now. ``load``: our work from ``complete`` to
        ``ready`` and from ``go`` to here, not our wait for ``go``."""
        self.load_seconds = self._loaded + now - self._go_at
        self._go_at = now  # the after-resume verification is timed from here
        status = "postcopy-active" if self.postcopy else "completed"
        return [SetStatus(status), Send(Resumed(self.load_seconds, self.verified))]

    def postcopy_complete(self, root: str, now: float) -> list[Effect]:
        """Every page owed has been placed: ``root`` is the digest of memory as
        it resumed (held pages and placed ones), the one ``verify`` checks."""
        self.memory_digest = root
        self._go_at = now
        return [SetStatus("completed")]

    def _verify_digest(self, message: Message, now: float) -> list[Effect]:
        """The guest runs here: compare the source's digest with our root
        taken before resume; any other end is reported, never a discard."""
        match message:
            case VerifyDigest(digest=digest) if digest == self.memory_digest:
                self.verified = True
                self._verify_done(now)
                return [Send(VerifyResult(True, ""))]
            case VerifyDigest(digest=digest):
                reason = (
                    f"memory digest mismatch: the destination resumed from {self.memory_digest},"
                    f" the source's frozen memory is {digest}"
                )
                self.verify_abandoned(reason, now)
                return [Send(VerifyResult(False, reason))]
            case Cancel(reason=reason) | Failed(reason=reason):
                self.verify_abandoned(f"source: {reason}", now)
                return []
        raise ProtocolError(f"expected verify, got {protocol.type_name(message)!r}")

    def verify_abandoned(self, reason: str, now: float) -> None:
        """The after-resume verification ends unverified (mismatch, timeout, lost session)."""
        self.verified = False
        self.verify_error = reason
        self._verify_done(now)

    def _verify_done(self, now: float) -> None:
        self.verify_time = now - self._go_at
        self.phase = DestinationPhase.RESUMED

    def discard(self) -> None:
        """Never resume: drop every record held."""
        self.records.clear()
        self.verified = False
