"""``MigrationDestination``: receive, load, verify, wait for "go", resume, or discard.

Pages land in ``memory`` through the receiver's channel threads. Device records
are buffered per device and handed to the device's handler in sequence order
once the source declares them sent (``pass``, ``switchover-abort``,
``complete``). Records of an abandoned switchover are delivered too: the
source's device handler opens a new session after them, which the destination
handler sees and restarts on. Before resuming, the destination checks the
whole-memory digest against the source's, reports "ready" and waits for the
source's "go": its commit point (``docs/protocol.md``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from mig import _mig, faults
from mig.clock import Clock, MonotonicClock
from mig.handlers import StateHandler
from mig.link import Endpoint, ReceiverEndpoint
from mig.stats import digest_cost

__all__ = ["MigrationDestination"]

_POLL = 0.05
# Seconds between timings of our whole digest: seldom, as one that is still
# running when a switchover starts adds to its downtime.
_DIGEST_TIMING_EVERY = 3.0


class _Abort(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class MigrationDestination:
    """Accepts one incoming migration into ``memory``.

    ``devices``: destination-side handlers (``load_*`` of the handler
    protocol, with the same names and ``device_id`` as the source's), or
    devices that ``mig.device_handler.DeviceHandler`` wraps. Once everything
    is loaded and verified it reports "ready" and resumes only on the source's
    "go"; without it within ``go_timeout`` (``idle_timeout`` by default) it
    discards everything. ``on_resume`` is called after "go", just before
    "resumed" is reported: an embedder starts its vCPUs there. ``endpoint`` replaces the
    native listener (a simulator or a test passes its own). ``tls_cert``,
    ``tls_key`` and ``tls_ca`` (PEM paths) require mutual TLS on every channel.
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
        on_resume: Callable[[], None] | None = None,
        on_status: Callable[[str], None] | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        if uri is None and endpoint is None:
            raise ValueError("give a uri to listen on (or an endpoint)")
        self.memory = memory
        self.clock: Clock = clock or MonotonicClock()
        self.accept_timeout = accept_timeout
        self.idle_timeout = idle_timeout
        self.io_timeout = io_timeout
        self.go_timeout = idle_timeout if go_timeout is None else go_timeout
        self._on_resume = on_resume
        self._on_status = on_status
        self._endpoint = endpoint
        self.listener = None
        if endpoint is None:
            listener_cls = getattr(_mig, "Listener", None)
            if listener_cls is None:
                raise _mig.UnsupportedError("this build of mig._mig has no Listener")
            self.listener = listener_cls(uri, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca)
        self.uri = self.listener.uri if self.listener is not None else uri
        self.handlers: dict[int, StateHandler] = {}
        for i, dev in enumerate(devices, start=1):
            if not isinstance(dev, StateHandler):
                from mig.device_handler import DeviceHandler  # noqa: PLC0415

                dev = DeviceHandler(dev, device_id=i)
            self.handlers[int(getattr(dev, "device_id", i))] = dev
        self.status = "none"
        self.error: str | None = None
        self.verified = False
        self.memory_digest: str | None = None
        self._huge_bytes: int | None = None
        self.load_seconds = 0.0
        self.passes = 0
        self.migration_id: int | None = None
        self._buffer: dict[int, dict[int, tuple[bytes, bool]]] = {d: {} for d in self.handlers}
        self._loaded: dict[int, int] = {d: -1 for d in self.handlers}
        self._bound: dict[int, int] = {d: -1 for d in self.handlers}
        self._acked = False
        self._initial_done: set[int] = set()
        self._cancel: str | None = None
        self._digest_timer: threading.Thread | None = None
        self._digest_seconds: float | None = None
        self._digest_timed_at = 0.0
        self._busy = 0.0
        self._channels = 1
        self._drain_target: tuple[int, float] | None = None
        self._drain: float | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

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
        except _Abort as e:
            self._discard_all(ep, e.status, e.reason, tell=not e.reason.startswith("source:"))
        except Exception as e:
            self._discard_all(ep, "failed", f"{type(e).__name__}: {e}", tell=True)
        finally:
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

    def cancel(self, reason: str = "cancelled on the destination") -> None:
        self._cancel = reason

    def query(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "verified": self.verified,
            "load-time": self.load_seconds * 1000,
            "passes": self.passes,
        }
        if self.memory_digest is not None:
            out["memory-digest"] = self.memory_digest
        out.update(self._memory_backing())
        if self.error:
            out["error-desc"] = self.error
        return out

    def _memory_backing(self) -> dict[str, Any]:
        """Which backing the memory got; once the migration is over, also how
        many bytes the kernel actually backs with huge pages (read from
        /proc/self/smaps, too costly to poll while pages arrive)."""
        backing = getattr(self.memory, "backing", None)
        if backing is None:
            return {}
        out: dict[str, Any] = {
            "memory-backing": backing,
            "memory-page-size": self.memory.backing_page_size,
        }
        if self.status in ("completed", "failed", "cancelled"):
            if self._huge_bytes is None:
                self._huge_bytes = self.memory.huge_bytes()
            out["memory-huge-bytes"] = self._huge_bytes
        return out

    # ------------------------------------------------------------ serving
    def _set_status(self, status: str) -> None:
        self.status = status
        if self._on_status:
            self._on_status(status)

    def _accept(self) -> Endpoint:
        if self._endpoint is not None:
            return self._endpoint
        assert self.listener is not None
        receiver = self.listener.accept(
            self.memory, self.accept_timeout, io_timeout=self.io_timeout
        )
        return ReceiverEndpoint(receiver)

    def _recv(self, ep: Endpoint, timeout: float) -> dict[str, Any] | None:
        if self._cancel is not None:
            raise _Abort("cancelled", self._cancel)
        return ep.recv(timeout)

    def _serve(self, ep: Endpoint) -> None:
        hello = self._expect_hello(ep)
        self._check_hello(ep, hello)
        for h in self.handlers.values():
            h.load_setup()
        faults.point("dest.setup")
        ep.send({"type": "hello-ack", "version": 1})
        self._set_status("active")
        idle_since = self.clock.now()
        received = _received(ep)
        while True:
            t_work = self.clock.now()
            self._take_records(ep)
            self._load_ready()
            self._maybe_ack(ep)
            self._check_drained(ep)
            self._busy = max(self._busy, self.clock.now() - t_work)
            msg = self._recv(ep, _POLL)
            if msg is None:
                # A first pass of a large guest outlasts the idle timeout:
                # data arriving on the channels counts as activity too.
                now, before, received = self.clock.now(), received, _received(ep)
                if received != before:
                    idle_since = now
                elif now - idle_since > self.idle_timeout:
                    raise _Abort("failed", f"no control message or data for {self.idle_timeout} s")
                continue
            idle_since = self.clock.now()
            kind = msg["type"]
            if kind == "pass":
                self.passes += 1
                self._raise_bounds(msg.get("device_seqs", {}))
                if self._drain_target is None:
                    target = int(msg.get("generation", 0)) * self._channels
                    self._drain_target = (target, self.clock.now())
                self._ack_pass(ep, msg.get("pass"))
                faults.point("dest.pass", number=self.passes)
            elif kind == "switchover":
                self._set_status("device")
                self._finish_digest_timing()
                faults.point("dest.switchover")
            elif kind == "switchover-abort":
                self._raise_bounds(msg.get("device_seqs", {}))
                self._set_status("active")
            elif kind == "complete":
                self._complete(ep, msg)
                return
            elif kind == "cancel":
                raise _Abort("cancelled", f"source: {msg.get('reason', 'cancelled')}")
            elif kind == "failed":
                raise _Abort("failed", f"source: {msg.get('reason', 'failed')}")
            else:
                raise _mig.ProtocolError(f"unexpected control message {kind!r} on the destination")

    def _expect_hello(self, ep: Endpoint) -> dict[str, Any]:
        deadline = self.clock.now() + self.accept_timeout
        while self.clock.now() < deadline:
            msg = self._recv(ep, _POLL)
            if msg is not None:
                if msg["type"] != "hello":
                    raise _mig.ProtocolError(f"expected hello, got {msg['type']!r}")
                return msg
        raise _Abort("failed", "no hello from the source")

    def _check_hello(self, ep: Endpoint, hello: dict[str, Any]) -> None:
        problems = []
        if hello.get("version") != 1:
            problems.append(f"protocol version {hello.get('version')!r} is not 1")
        if hello.get("page_size") != self.memory.page_size:
            problems.append(f"page size {hello.get('page_size')} != {self.memory.page_size}")
        if hello.get("ram_size") != self.memory.size:
            problems.append(f"RAM size {hello.get('ram_size')} != {self.memory.size}")
        theirs = sorted((int(d["id"]), str(d["name"])) for d in hello.get("devices", []))
        ours = sorted((d, h.name) for d, h in self.handlers.items())
        if theirs != ours:
            problems.append(f"devices {theirs} != {ours}")
        if problems:
            raise _Abort("failed", "; ".join(problems))
        self.migration_id = hello.get("migration_id")
        self._channels = max(1, int(hello.get("params", {}).get("multifd_channels", 1)))

    # ---------------------------------------------------- device records
    def _take_records(self, ep: Endpoint) -> None:
        for dev, seq, data, final in ep.device_records():
            if dev not in self._buffer:
                raise _mig.ProtocolError(f"device record for unknown device id {dev}")
            if seq <= self._loaded[dev] or seq in self._buffer[dev]:
                raise _mig.ProtocolError(f"device {dev}: duplicate record seq {seq}")
            self._buffer[dev][seq] = (data, final)

    def _raise_bounds(self, seqs: dict[str, int]) -> None:
        for key, seq in seqs.items():
            dev = int(key)
            if dev not in self._bound:
                raise _mig.ProtocolError(f"pass names unknown device id {dev}")
            self._bound[dev] = max(self._bound[dev], int(seq))

    def _load_ready(self) -> None:
        """Load, in order, every buffered record the source declared precopy."""
        for dev, h in self.handlers.items():
            buf = self._buffer[dev]
            while True:
                nxt = self._next_seq(dev)
                if nxt > self._bound[dev] or nxt not in buf:
                    break
                data, final = buf.pop(nxt)
                h.load_state(nxt, data, final)
                self._loaded[dev] = nxt

    def _next_seq(self, dev: int) -> int:
        return self._loaded[dev] + 1

    def _maybe_ack(self, ep: Endpoint) -> None:
        if self._acked:
            return
        for dev, h in self.handlers.items():
            if dev not in self._initial_done and h.precopy_initial_loaded():
                self._initial_done.add(dev)
                ep.send({"type": "device-initial-done", "device": h.name})
        if len(self._initial_done) == len(self.handlers):
            self._acked = True
            ep.send({"type": "switchover-ack"})
            faults.point("dest.switchover-ack")

    # ------------------------------------------------------- load estimate
    def _finish_digest_timing(self) -> None:
        """A switchover started: let a digest being timed end before ours runs."""
        if self._digest_timer is not None:
            self._digest_timer.join()
            self._digest_timer = None

    def _check_drained(self, ep: Endpoint) -> None:
        """Time from a ``pass`` to our channels holding every sync it follows.

        That lag is how long the channels trail the control channel: after
        ``complete`` the end records wait behind it the same way.
        """
        if self._drain_target is None:
            return
        target, since = self._drain_target
        syncs = ep.stats().get("syncs")
        if syncs is None:
            self._drain_target = None  # an endpoint without the counter
        elif int(syncs) >= target:
            lag = self.clock.now() - since
            self._drain = lag if self._drain is None else max(self._drain, lag)
            self._drain_target = None

    def _ack_pass(self, ep: Endpoint, number: Any) -> None:
        """Answer a pass: how long our loop was busy away from the control
        channel since the last answer (a ``complete`` may wait that long), and
        a new timing of our whole digest when one is ready.

        The digest check runs between ``complete`` and resume and its cost
        grows as pages land, so the source learns it from here, measured on
        this host under its current load. It is timed in the background, at
        most every ``_DIGEST_TIMING_EVERY`` seconds.
        """
        ack: dict[str, Any] = {"type": "pass-ack", "pass": number, "busy": self._busy}
        if self._drain is not None:
            ack["drain"], self._drain = self._drain, None
        self._busy = 0.0
        timer = self._digest_timer
        if timer is not None and not timer.is_alive():
            timer.join()
            self._digest_timer = None
            ack["digest"] = self._digest_seconds
        now = self.clock.now()
        if self._digest_timer is None and now - self._digest_timed_at >= _DIGEST_TIMING_EVERY:
            self._digest_timed_at = now

            def measure() -> None:
                self._digest_seconds = digest_cost(self.memory)

            self._digest_timer = threading.Thread(
                target=measure, name="mig-digest-cost", daemon=True
            )
            self._digest_timer.start()
        ep.send(ack)

    # ---------------------------------------------------------- switchover
    def _complete(self, ep: Endpoint, msg: dict[str, Any]) -> None:
        t0 = self.clock.now()
        self._finish_digest_timing()
        self._set_status("device")
        end = ep.wait_end(self.idle_timeout)
        faults.point("dest.stop-copy")
        self._take_records(ep)
        self._raise_bounds(msg.get("device_seqs", {}))
        self._load_ready()
        for dev in self.handlers:
            if self._next_seq(dev) <= self._bound[dev]:
                raise _Abort("failed", f"device {dev}: stop-copy records missing")
        for h in self.handlers.values():
            h.load_complete()
        faults.point("dest.switchover-complete")
        # The receiver digested the memory once every channel ended (and checked
        # it against the end records); a second whole digest would only add
        # downtime. An endpoint that does not report one gets it computed here.
        verified = end.get("digest")
        digest = format(verified if verified is not None else self.memory.digest(), "032x")
        if digest != msg.get("digest"):
            raise _Abort("failed", f"memory digest {digest} != source {msg.get('digest')}")
        self.verified = True
        self.memory_digest = digest
        loaded = self.clock.now() - t0
        ep.send({"type": "ready", "load": loaded, "verified": True})
        faults.point("dest.ready")
        self._wait_go(ep)
        t_go = self.clock.now()
        faults.point("dest.resume")
        for h in self.handlers.values():
            h.load_resume()
        if self._on_resume:
            self._on_resume()
        # From here the guest runs here: never discard, whatever the report meets.
        self.load_seconds = loaded + self.clock.now() - t_go
        self._set_status("completed")
        try:
            ep.send({"type": "resumed", "load": self.load_seconds, "verified": True})
        except Exception as e:
            self.error = f"guest resumed, but 'resumed' was not delivered: {e}"

    def _wait_go(self, ep: Endpoint) -> None:
        """The source's commit point: without ``go`` we must never resume."""
        deadline = self.clock.now() + self.go_timeout
        while self.clock.now() < deadline:
            msg = self._recv(ep, _POLL)
            if msg is None:
                continue
            kind = msg["type"]
            if kind == "go":
                return
            if kind in ("cancel", "failed"):
                raise _Abort(
                    "cancelled" if kind == "cancel" else "failed",
                    f"source: {msg.get('reason', kind)}",
                )
            raise _mig.ProtocolError(f"expected go, got {kind!r}")
        raise _Abort("failed", f"no go from the source within {self.go_timeout} s")

    def _discard_all(self, ep: Endpoint | None, status: str, reason: str, tell: bool) -> None:
        """Never resume: drop buffered state, abort every load, tell the source."""
        for buf in self._buffer.values():
            buf.clear()
        for h in self.handlers.values():
            try:
                h.load_abort()
            except Exception as e:
                reason += f" (load_abort {h.name}: {e})"
        if ep is not None:
            if tell:
                try:
                    ep.send({"type": "failed", "reason": reason})
                except Exception:
                    pass  # the session may be what failed
            try:
                ep.abort()
            except Exception as e:
                reason += f" (abort: {e})"
        self.error = reason
        self.verified = False
        self._set_status(status)


def _received(ep: Endpoint) -> int:
    """Bytes the data channels have received so far."""
    return int(ep.stats().get("transferred", 0))
