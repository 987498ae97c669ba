"""``MigrationDestination``: receive, load, verify, wait for "go", resume, or discard.

Pages land in ``memory`` through the receiver's channel threads. Device records
are buffered per device and handed to the device's handler in sequence order
once the source declares them sent (``pass``, ``switchover-abort``,
``complete``). Records of an abandoned switchover are delivered too: the
source's device handler opens a new session after them, which the destination
handler sees and restarts on. Before resuming, the destination takes the
chunk root of its memory (only the chunks written since their last hash are
rehashed), checks it against the source's digest when ``verify`` is strict,
reports "ready" and waits for the source's "go": its commit point
(``docs/protocol.md``). With ``verify`` after-resume the source's digest
comes after the guest resumed here and is compared with that root.

While the precopy runs, each side sends a ``progress`` heartbeat (the bytes
received here) when the source's ``hello`` gave a ``stall_timeout``
(``mig.stall_watch``). A failure the source caused is told as what it did,
naming it and the phase (``mig.failure_reason``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from mig import _mig, faults
from mig.clock import Clock, MonotonicClock
from mig.collector import CollectorHold
from mig.destination_core import (
    AdvisePostcopy,
    AnswerPass,
    DestinationCore,
    DestinationPhase,
    Effect,
    EnterSwitchover,
    FinishStopCopy,
    Load,
    Resume,
    Send,
    SetStatus,
    SettleChannels,
    StartLoads,
)
from mig.device_handler import DeviceHandler
from mig.errors import MigrationEnded
from mig.failure_reason import describe, destination_phase
from mig.handlers import LoadHandler
from mig.link import Endpoint, ReceiverEndpoint
from mig.pass_ack_timings import PassAckTimings
from mig.postcopy_incoming import PostcopyIncoming, require_postcopy
from mig.prealloc import accept_populated, start_prealloc
from mig.protocol import VERIFY_MODES, Failed, Progress, SwitchoverAck
from mig.reorder import DRAIN_BYTES
from mig.settling import SETTLE_POLL, ChannelSettling
from mig.stall_watch import heartbeat

__all__ = ["MigrationDestination"]

_ENDED = ("completed", "failed", "cancelled")


def memory_backing(memory: Any, huge_bytes: Callable[[], int] | None) -> dict[str, Any]:
    """Which backing the memory got; with ``huge_bytes`` (once the migration is
    over), also how many bytes the kernel actually backs with huge pages."""
    backing = getattr(memory, "backing", None)
    if backing is None:
        return {}
    out: dict[str, Any] = {"memory-backing": backing, "memory-page-size": memory.backing_page_size}
    if huge_bytes is not None:
        out["memory-huge-bytes"] = huge_bytes()
    return out


_POLL = 0.05
# What the receiver reports of the root's rehash: chunks still stale, bytes it read.
_REHASH_COUNTS = ("rehashed-chunks", "rehashed-bytes")


def _load_handlers(devices: Sequence[Any]) -> dict[int, LoadHandler]:
    """Device id -> the handler that loads it: a device given bare gets a
    ``DeviceHandler`` numbered from 1."""
    handlers: dict[int, LoadHandler] = {}
    for i, dev in enumerate(devices, start=1):
        if not isinstance(dev, LoadHandler):
            dev = DeviceHandler(dev, device_id=i)
        handlers[int(getattr(dev, "device_id", i))] = dev
    return handlers


def _queue_bounds(handlers: dict[int, LoadHandler]) -> dict[int, int]:
    """The bytes of records each device may have waiting for an announcement:
    a ``DeviceHandler`` names its bound; other handlers get the default."""
    return {
        d: h.max_queued_bytes + DRAIN_BYTES
        for d, h in handlers.items()
        if isinstance(h, DeviceHandler)
    }


class MigrationDestination:
    """Accepts one incoming migration into ``memory``.

    ``devices``: destination-side handlers (``load_*`` of the handler
    protocol, with the same names and ``device_id`` as the source's), or
    devices that ``mig.device_handler.DeviceHandler`` wraps. Once everything
    is loaded and verified it reports "ready" and resumes only on the source's
    "go"; without it within ``go_timeout`` (``idle_timeout`` by default) it
    discards everything. ``verify``: the only verify mode accepted (a
    ``hello`` with another is refused); None follows the source's.
    ``verify_timeout`` (``idle_timeout`` by default): how long, after resume,
    to wait for the source's digest in after-resume mode. ``on_resume`` is
    called after "go", just before "resumed" is reported: an embedder starts
    its vCPUs there. ``endpoint`` replaces the native listener (a simulator or
    a test passes its own). ``tls_cert``, ``tls_key`` and ``tls_ca`` (PEM
    paths) require mutual TLS on every channel.
    ``vcpus``: the guest's threads here, for ``postcopy-vcpu-blocktime``.
    ``prealloc``: populate ``memory`` first (``mig.prealloc``), and accept no
    source before that is done (``self.prealloc.wait()``).
    ``postcopy_placement``: ``mig.params.POSTCOPY_PLACEMENTS`` (docs/postcopy.md).
    """

    def __init__(
        self,
        uri: str | None,
        memory: _mig.GuestMemory,
        devices: Sequence[Any] = (),
        *,
        endpoint: Endpoint | None = None,
        clock: Clock | None = None,
        accept_timeout: float = 30.0,
        idle_timeout: float = 30.0,
        io_timeout: float = 60.0,
        go_timeout: float | None = None,
        verify: str | None = None,
        verify_timeout: float | None = None,
        on_resume: Callable[[], None] | None = None,
        on_status: Callable[[str], None] | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        vcpus: int = 0,
        prealloc: bool = False,
        postcopy_placement: str = "auto",
    ) -> None:
        if uri is None and endpoint is None:
            raise ValueError("give a uri to listen on (or an endpoint)")
        self.memory = memory
        self.clock: Clock = clock or MonotonicClock()
        self.accept_timeout = accept_timeout
        self.idle_timeout = idle_timeout
        self.io_timeout = io_timeout
        self.go_timeout = idle_timeout if go_timeout is None else go_timeout
        if verify is not None and verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
        self.on_resume = on_resume  # settable until the migration starts
        self.collector = CollectorHold()  # held from ``complete`` to ``resumed``
        self.on_status = on_status
        self._endpoint = endpoint
        self.listener = None
        if endpoint is None:
            listener_cls = getattr(_mig, "Listener", None)
            if listener_cls is None:
                raise _mig.UnsupportedError("this build of mig._mig has no Listener")
            self.listener = listener_cls(uri, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca)
        self.uri = self.listener.uri if self.listener is not None else uri
        self.handlers = _load_handlers(devices)
        self.core = DestinationCore(
            memory.page_size,
            memory.size,
            {d: h.name for d, h in self.handlers.items()},
            max_queued_bytes=_queue_bounds(self.handlers),
            hello_timeout=accept_timeout,
            idle_timeout=idle_timeout,
            go_timeout=self.go_timeout,
            verify=verify,
            verify_timeout=idle_timeout if verify_timeout is None else verify_timeout,
        )
        self.status = "none"
        self.error: str | None = None
        # Read from /proc/self/smaps: too costly to poll while pages arrive, read once at the end.
        self._huge_bytes = functools.cache(getattr(memory, "huge_bytes", lambda: 0))
        self._cancel: str | None = None
        self.timings = PassAckTimings(memory, self.clock)
        self.settling = ChannelSettling(self.clock, idle_timeout)
        self._rehashed: dict[str, int] = {}  # the root's rehash: chunks, bytes read
        self._beat_at = -float("inf")
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self.postcopy = PostcopyIncoming(memory, vcpus, io_timeout, postcopy_placement)
        self.prealloc = start_prealloc(memory) if prealloc else None  # .wait(): populated

    # The protocol's figures live in the core; these names are the API.
    @property
    def verified(self) -> bool:
        return self.core.verified

    @property
    def memory_digest(self) -> str | None:
        return self.core.memory_digest

    @property
    def load_seconds(self) -> float:
        return self.core.load_seconds

    @property
    def passes(self) -> int:
        return self.core.passes

    @property
    def migration_id(self) -> int | None:
        return self.core.migration_id

    # ---------------------------------------------------------------- API
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("destination already started")
        self._thread = threading.Thread(target=self.run, name="mig-destination", daemon=True)
        self._thread.start()

    def run(self) -> dict[str, Any]:
        ep: Endpoint | None = None
        try:
            self._set_status("setup")
            ep = self._accept()
            self._serve(ep)
        except MigrationEnded as e:
            self._discard_all(ep, e.status, e.reason, tell=not e.by_peer)
        except Exception as e:
            self._discard_all(ep, "failed", self._describe(e), tell=True)
        finally:
            self.collector.release()
            if self.listener is not None:
                self.listener.close()
            self._done.set()
        return self.query()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"destination still {self.status} after {timeout} s")
        if self._thread is not None:
            self._thread.join()
        return self.query()

    def _describe(self, error: BaseException) -> str:
        """What the source did, and when: "source 10.0.0.1:5555 closed the connection ..."."""
        where = destination_phase(self.core.phase, self.core.pass_number)
        return describe(error, self.core.source_name, where)

    def cancel(self, reason: str = "cancelled on the destination") -> None:
        self._cancel = reason

    def recover(self) -> None:
        """``postcopy-paused``: accept the source's new page channels on this
        listener (QEMU's migrate-recover); the source calls ``recover`` too."""
        self.postcopy.recover()

    def query(self) -> dict[str, Any]:
        core = self.core
        out: dict[str, Any] = {
            "status": self.status,
            "verify": core.verify_mode,
            "verified": self.verified,
            "load-time": self.load_seconds * 1000,
            "passes": self.passes,
        }
        if self.memory_digest is not None:
            out["memory-digest"] = self.memory_digest
        if core.verify_time is not None:
            out["verify-time"] = core.verify_time * 1000
        out.update(self._rehashed)
        if core.verify_error is not None:
            out["verify-error"] = core.verify_error
        out.update(memory_backing(self.memory, self._huge_bytes if self.status in _ENDED else None))
        postcopy = self.postcopy.stats()
        if postcopy:
            out["postcopy"] = postcopy
        if self.error:
            out["error-desc"] = self.error
        return out

    # ------------------------------------------------------------ serving
    def _set_status(self, status: str) -> None:
        self.status = status
        if self.on_status:
            self.on_status(status)

    def _accept(self) -> Endpoint:
        if self._endpoint is not None:
            return self._endpoint
        assert self.listener is not None
        receiver = accept_populated(self.listener, self.memory, self.prealloc,
                                    self.accept_timeout, self.io_timeout,
                                    lambda: self._cancel)  # fmt: skip
        if receiver.peer:
            self.core.source_name = f"source {receiver.peer}"
        return ReceiverEndpoint(receiver)

    def _serve(self, ep: Endpoint) -> None:
        """Carry out the core's effects until the guest runs here."""
        core = self.core
        core.await_hello(self.clock.now())
        received = _received(ep)
        while core.phase not in (DestinationPhase.RESUMED, DestinationPhase.AWAIT_VERIFY):
            if core.phase in (DestinationPhase.ACTIVE, DestinationPhase.SWITCHOVER):
                t_work = self.clock.now()
                self._take_records(ep)
                self.timings.busy(self.clock.now() - t_work)
            stat = ep.stats().get("syncs")
            syncs = None if stat is None else int(stat)
            self.timings.channels_hold(syncs)
            settled = self.settling.poll(ep, syncs)
            if settled is not None:
                ep.send(settled)
                faults.point("dest.settled")
            if self._cancel is not None:
                raise MigrationEnded("cancelled", self._cancel)
            message = ep.recv(SETTLE_POLL if self.settling.waiting else _POLL)
            now = self.clock.now()
            self._beat(ep, now)
            if message is None:
                # A first pass of a large guest outlasts the idle timeout:
                # data arriving on the channels counts as activity too.
                before, received = received, _received(ep)
                if received != before:
                    core.activity(now)
                core.tick(now)
                continue
            for effect in core.on_message(message, now):
                self._apply(ep, effect)
            if core.postcopy:  # "postcopy-run": the source opens the page channels now
                self.postcopy.accept(self.listener, getattr(ep, "native", None), self.idle_timeout)
            core.activity(self.clock.now())
        if core.postcopy:
            self._finish_postcopy()
        if core.phase is DestinationPhase.AWAIT_VERIFY:
            self._await_verify(ep)

    def _beat(self, ep: Endpoint, now: float) -> None:
        """The precopy's heartbeat to the source: the bytes received so far."""
        stall = self.core.stall_timeout
        if not stall or self.core.phase is not DestinationPhase.ACTIVE:
            return
        if now - self._beat_at >= heartbeat(stall):
            self._beat_at = now
            ep.send(Progress(_received(ep)))

    def _finish_postcopy(self) -> None:
        """The guest runs here; wait until every owed page is placed."""
        faults.point("dest.postcopy")
        try:
            root = self.postcopy.run(self._set_status, lambda: self._cancel)
        except MigrationEnded as e:
            self.error = e.reason
            self._set_status("failed")
            raise
        self.postcopy.close()
        for effect in self.core.postcopy_complete(format(root, "032x"), self.clock.now()):
            self._apply(None, effect)  # type: ignore[arg-type]

    def _await_verify(self, ep: Endpoint) -> None:
        """The guest runs here: wait for the source's digest and answer it.
        Nothing here may discard: every end is a reported verification failure."""
        core = self.core
        try:
            while core.phase is DestinationPhase.AWAIT_VERIFY:
                message = ep.recv(_POLL)
                now = self.clock.now()
                if message is None:
                    core.tick(now)
                    continue
                for effect in core.on_message(message, now):
                    self._apply(ep, effect)
        except Exception as e:
            if core.phase is DestinationPhase.AWAIT_VERIFY:
                core.verify_abandoned(self._describe(e), self.clock.now())
            else:  # the answer was decided; only its delivery failed
                self.error = f"verification answer not delivered: {self._describe(e)}"
        faults.point("dest.verified")

    def _take_records(self, ep: Endpoint) -> None:
        """Load every record now in order, then tell the source what became loaded."""
        self.core.records_arrived(ep.device_records())
        for load in self.core.loads():
            self._apply(ep, load)
        for dev, h in self.handlers.items():
            if h.precopy_initial_loaded():
                self.core.initial_loaded(dev)
        for effect in self.core.announcements():
            self._apply(ep, effect)

    def _apply(self, ep: Endpoint, effect: Effect) -> None:
        match effect:
            case Send(message=message):
                ep.send(message)
                if isinstance(message, SwitchoverAck):
                    faults.point("dest.switchover-ack")
            case SetStatus(status=status):
                self._set_status(status)
            case StartLoads():
                for h in self.handlers.values():
                    h.load_setup()
                faults.point("dest.setup")
            case Load(record=r):
                self.handlers[r.device].load_state(r.seq, r.data, r.final)
            case AnswerPass(number=number, generation=generation):
                self.timings.pass_announced(generation * self.core.channels)
                ep.send(self.timings.answer(number, strict=self.core.verify_mode == "strict"))
                faults.point("dest.pass", number=self.core.passes)
            case SettleChannels(number=number, generation=generation):
                self.settling.request(number, generation * self.core.channels)
            case EnterSwitchover():
                self.timings.settle()
                faults.point("dest.switchover")
            case FinishStopCopy():
                self._finish_stop_copy(ep)
            case Resume():
                self._resume(ep)
            case AdvisePostcopy():
                require_postcopy(self.postcopy.placement)

    # ---------------------------------------------------------- switchover
    def _finish_stop_copy(self, ep: Endpoint) -> None:
        """``complete`` arrived: the last records, every load, the digest, ``ready``."""
        # No collection from here until ``resumed`` is out (mig.collector).
        self.collector.hold()
        self.timings.settle()
        strict = self.core.verify_mode == "strict"
        t_wait = self.clock.now()
        end = ep.wait_end(self.idle_timeout, verify=strict)
        waited = self.clock.now() - t_wait
        faults.point("dest.stop-copy")
        self.core.records_arrived(ep.device_records())
        for load in self.core.loads():
            self._apply(ep, load)
        self.core.stop_copy_received()
        for h in self.handlers.values():
            h.load_complete()
        faults.point("dest.switchover-complete")
        # The receiver took the root once every channel ended, rehashing only
        # the chunks written since their last hash (and, strict, checked it
        # against the end records); a whole digest here would only add
        # downtime. An endpoint that does not report one gets it computed here.
        root = end.get("digest")
        seconds = end.get("verify-time")
        self._rehashed = {k: int(end[k]) for k in _REHASH_COUNTS if end.get(k) is not None}
        if root is None:
            t0 = self.clock.now()
            root = self.memory.digest()
            seconds = self.clock.now() - t0
        digest = format(int(root), "032x")
        seconds = None if seconds is None else float(seconds)
        # The wait for the end records less the root taken inside it: the
        # channels' backlog still landing when ``complete`` arrived.
        drain = max(0.0, waited - (seconds if "digest" in end and seconds else 0.0))
        for effect in self.core.verify(digest, self.clock.now(), seconds, drain):
            self._apply(ep, effect)
        faults.point("dest.ready")

    def _resume(self, ep: Endpoint) -> None:
        """``go``: the guest runs here from now on, whatever the report meets."""
        faults.point("dest.resume")
        if self.core.postcopy:
            receiver = getattr(ep, "native", None)
            self.postcopy.attach(self.listener, receiver, self.idle_timeout)
        for h in self.handlers.values():
            h.load_resume()
        if self.on_resume:
            self.on_resume()
        for effect in self.core.resumed(self.clock.now()):
            try:
                self._apply(ep, effect)
            except Exception as e:
                self.error = f"guest resumed, but 'resumed' was not delivered: {self._describe(e)}"
        self.collector.release()

    def _discard_all(self, ep: Endpoint | None, status: str, reason: str, tell: bool) -> None:
        """Never resume: drop buffered state, abort every load, tell the source."""
        self.collector.release()
        self.core.discard()
        for h in self.handlers.values():
            try:
                h.load_abort()
            except Exception as e:
                reason += f" (load_abort {h.name}: {e})"
        if ep is not None:
            if tell:
                try:
                    ep.send(Failed(reason))
                except Exception:
                    pass  # the session may be what failed
            try:
                ep.abort()
            except Exception as e:
                reason += f" (abort: {e})"
        self.error = reason
        self._set_status(status)


def _received(ep: Endpoint) -> int:
    """Bytes the data channels have received so far."""
    return int(ep.stats().get("transferred", 0))
