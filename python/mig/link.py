"""The ``Link``: how the loop and the handlers reach the destination.

The source loop and every state handler talk to the destination only through
this protocol. ``SenderLink`` adapts the native ``Sender`` (control records
become JSON messages, wire bytes and busy time are counted); a simulator
provides its own ``Link`` that charges virtual time instead.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from mig import protocol
from mig._mig import DirtyBitmap, Sender
from mig.clock import Clock
from mig.protocol import Message
from mig.reorder import DeviceRecord

__all__ = ["Link", "SenderLink", "Endpoint", "ReceiverEndpoint"]


@runtime_checkable
class Link(Protocol):
    """Source side of one migration session.

    ``concurrent_digest``: the memory may be digested on another thread while
    this link sends, and that costs wall time (a real stream). A link that
    charges virtual time says False: a second thread must not advance its
    clock, and the digest's cost is charged to that clock instead. A link
    without the attribute counts as False.

    A link given to the source may have ``connect_channels()``: the source
    calls it where it would build (and so connect) its native sender, before
    ``hello``, so a link that models that setup charges it outside hello's
    round trip.
    """

    concurrent_digest: bool

    def send_pages(self, bitmap: DirtyBitmap, generation: int) -> int:
        """Send the pages set in ``bitmap``; return the wire bytes."""
        ...

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
        """One device-state record; ``device_id`` is a u32, carried in the record header."""
        ...

    def sync(self, generation: int) -> None:
        """Barrier: pages of ``generation`` are applied before any later one."""
        ...

    def finish(self, digest: int) -> None:
        """End of stream with the whole-memory digest."""
        ...

    def send(self, message: Message) -> None: ...

    def recv(self, timeout: float) -> Message | None: ...

    def set_max_bandwidth(self, bytes_per_s: int) -> None: ...

    def transferred(self) -> int:
        """Wire bytes sent so far (pages and device state)."""
        ...

    def busy_time(self) -> float:
        """Seconds spent inside send calls (the bandwidth denominator)."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class SenderLink:
    """A ``Link`` over a native ``Sender`` (or anything with its methods)."""

    concurrent_digest = True

    def __init__(self, sender: Any, clock: Clock) -> None:
        self._s = sender
        self._clock = clock
        self._bytes = 0
        self._busy = 0.0

    def send_pages(self, bitmap: DirtyBitmap, generation: int) -> int:
        t0 = self._clock.now()
        n = int(self._s.send_pages(bitmap, generation))
        self._busy += self._clock.now() - t0
        self._bytes += n
        return n

    def ram_target(self) -> Sender | None:
        """The native ``Sender`` the RAM stream may drive directly (then it
        reports its bytes through ``account_pages``), or None."""
        return self._s if isinstance(self._s, Sender) else None

    def account_pages(self, nbytes: int, seconds: float) -> None:
        """Counts bytes the RAM stream sent on the native sender itself."""
        self._bytes += int(nbytes)
        self._busy += float(seconds)

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
        t0 = self._clock.now()
        n = self._s.send_device_state(device_id, seq, data, final)
        self._busy += self._clock.now() - t0
        self._bytes += int(n) if n is not None else len(data)

    def sync(self, generation: int) -> None:
        n = self._s.sync(generation)
        self._bytes += int(n or 0)

    def finish(self, digest: int) -> None:
        n = self._s.finish(digest)
        self._bytes += int(n or 0)

    def send(self, message: Message) -> None:
        self._s.control_send(protocol.encode(message))

    def recv(self, timeout: float) -> Message | None:
        data = self._s.control_recv(timeout)
        return None if data is None else protocol.decode(bytes(data))

    def set_max_bandwidth(self, bytes_per_s: int) -> None:
        self._s.set_max_bandwidth(int(bytes_per_s))

    def transferred(self) -> int:
        return self._bytes

    def busy_time(self) -> float:
        return self._busy

    def stats(self) -> dict[str, Any]:
        return dict(self._s.stats())

    def abort(self) -> None:
        self._s.abort()

    def close(self) -> None:
        self._s.close()


@runtime_checkable
class Endpoint(Protocol):
    """Destination side of one migration session."""

    def send(self, message: Message) -> None: ...

    def recv(self, timeout: float) -> Message | None: ...

    def device_records(self) -> list[DeviceRecord]: ...

    def wait_end(self, timeout: float, verify: bool = True) -> dict[str, Any]:
        """The end records are in: the destination's root (``digest``), and
        with ``verify`` raise unless it equals the source's."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def abort(self) -> None: ...


class ReceiverEndpoint:
    """An ``Endpoint`` over a native ``Receiver`` (or anything with its methods)."""

    def __init__(self, receiver: Any) -> None:
        self._r = receiver

    @property
    def native(self) -> Any:
        """The native ``Receiver`` (post-copy takes its digest of held pages)."""
        return self._r

    def send(self, message: Message) -> None:
        self._r.control_send(protocol.encode(message))

    def recv(self, timeout: float) -> Message | None:
        data = self._r.control_recv(timeout)
        return None if data is None else protocol.decode(bytes(data))

    def device_records(self) -> list[DeviceRecord]:
        return [
            DeviceRecord(int(dev), int(seq), bytes(data), bool(final))
            for dev, seq, data, final in self._r.device_records()
        ]

    def wait_end(self, timeout: float, verify: bool = True) -> dict[str, Any]:
        return dict(self._r.wait_end(timeout, verify=verify))

    def stats(self) -> dict[str, Any]:
        return dict(self._r.stats())

    def memory_root(self) -> int | None:
        """The chunk root of destination memory now (rehashes the stale
        chunks); None from a receiver that keeps no chunk digest."""
        root = getattr(self._r, "memory_root", None)
        return None if root is None else int(root())

    def abort(self) -> None:
        self._r.abort()
