"""The state handler that plugs a `MigrationDevice` into a migration.

Source side, as QEMU's ``hw/vfio/migration.c`` does: setup enters PRE_COPY,
the estimate is the precopy ``initial + dirty`` bytes, iterate() sends
precopy data, quiesce() moves the device to a P2P state so its DMA stops
before the final RAM sync, complete() runs STOP_COPY and sends the rest.

The exact pending size is ``data_size()`` (``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``).
A device without it is the case of the QEMU thread on calling
``state_pending_exact()`` with the guest stopped: its size is known only once
it is stopped and its STOP_COPY state produced (``exact_needs_stop``). The
handler then keeps that produced state, so complete() sends it without
producing it twice, or resume_after_exact() discards it and runs the device
again; VFIO forbids STOP_COPY -> PRE_COPY, so that costs a new precopy
session, which the destination is told to restart.

Each chunk sent carries a one-byte flag header: ``INIT_DONE`` when the
device's precopy initial bytes have all been read (switchover-ack: the
destination reports them loaded), ``NEW_SESSION`` when a new saving session
starts. Destination chunks may arrive out of order over parallel channels;
the destination's `mig.reorder.ReorderBuffer` puts them back in sequence
(within ``max_queued_bytes``) before ``load_state`` sees them, so this
handler only checks that each chunk is the next one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, cast

from mig._mig import ProtocolError
from mig.counting_link import CountingLink
from mig.errors import OverBudget
from mig.vfio import (
    PRECOPY_STATES,
    DeviceError,
    DeviceStreamError,
    MigCap,
    MigrationDevice,
    MigState,
    NoData,
    ResumeSession,
    SaveSession,
)

__all__ = ["FLAG_INIT_DONE", "FLAG_NEW_SESSION", "DeviceHandler", "DeviceLink"]

FLAG_INIT_DONE = 1
FLAG_NEW_SESSION = 2
_KNOWN_FLAGS = FLAG_INIT_DONE | FLAG_NEW_SESSION


class DeviceLink(Protocol):
    """What a device handler needs from the link (a `mig.Sender` provides it)."""

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None: ...


class DeviceHandler:
    """State handler for one VFIO device, on the source or the destination."""

    role = "device"

    def __init__(
        self,
        device: MigrationDevice,
        device_id: int = 0,
        *,
        buffer_size: int = 1 << 20,
        max_queued_bytes: int | None = None,
    ) -> None:
        if buffer_size <= 0:
            raise ValueError("buffer_size must be positive")
        self.device = device
        self.device_id = device_id
        self.buffer_size = buffer_size
        # Bounds what an out-of-order sender can make the destination hold
        # for this device (the destination's ReorderBuffer enforces it).
        self.max_queued_bytes = (
            max_queued_bytes if max_queued_bytes is not None else 2 * device.capacity + (16 << 20)
        )
        self._reset_source()
        self._reset_dest()
        self._precopy_bytes = 0
        self._stop_copy_bytes = 0
        self._exact_stops = 0
        self._sessions = 0

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def exact_needs_stop(self) -> bool:
        return not self.device.caps & MigCap.DATA_SIZE

    # -- source --------------------------------------------------------------
    def _reset_source(self) -> None:
        self._link: DeviceLink | None = None
        self._stream: SaveSession | None = None
        self._seq = 0
        self._flags = 0  # flags for the next chunk
        self._init_announced = False
        self._produced: list[bytes] | None = None
        self._last_exact = 0

    def setup(self, link: DeviceLink) -> None:
        dev = self.device
        if dev.state is not MigState.RUNNING:
            raise DeviceError(f"{self.name}: setup needs a RUNNING device, it is {dev.state.name}")
        self._reset_source()
        self._link = link
        self._start_precopy()

    def _start_precopy(self) -> None:
        self._init_announced = False
        if self.device.caps & MigCap.PRE_COPY:
            opened = self.device.set_state(MigState.PRE_COPY)
            assert opened is not None and hasattr(opened, "read")
            self._stream = cast(SaveSession, opened)
            self._sessions += 1
        else:
            self._stream = None

    def _send(self, data: bytes, final: bool = False) -> int:
        assert self._link is not None, "setup() first"
        chunk = bytes([self._flags]) + data
        self._flags = 0
        self._link.send_device_state(self.device_id, self._seq, chunk, final)
        self._seq += 1
        return len(chunk)

    def pending_estimate(self) -> int:
        if self._produced is not None:
            return sum(len(c) + 1 for c in self._produced)
        if self.device.state in PRECOPY_STATES:
            initial, dirty = self.device.precopy_info()
            return initial + dirty
        return 0

    def pending_exact(self, guest_stopped: bool) -> int:
        """Exact bytes still to send.

        With DATA_SIZE: ``data_size()`` in any state. Without it, only with the
        guest stopped: the device is stopped, its STOP_COPY state produced and
        kept; called with the guest running it returns the larger of the
        estimate and the last stopped measurement.
        """
        if not self.exact_needs_stop:
            return self.device.data_size()
        if self._produced is None:
            if not guest_stopped:
                return max(self.pending_estimate(), self._last_exact)
            self._produced = list(self._read_stop_copy())
            self._exact_stops += 1
        size = sum(len(c) + 1 for c in self._produced)
        self._last_exact = size
        return size

    def _read_stop_copy(self) -> Iterator[bytes]:
        opened = self.device.set_state(MigState.STOP_COPY)
        stream = cast(SaveSession, opened) if opened is not None else self._stream
        assert stream is not None
        self._stream = stream
        while data := stream.read(self.buffer_size):
            yield data

    def resume_after_exact(self) -> None:
        """Run the device again after a stopped measurement or an over-budget complete.

        Drops any produced state. A closed saving session cannot be continued
        (no STOP_COPY -> PRE_COPY), so precopy restarts and the destination is
        told to start a new session.
        """
        self._produced = None
        dev = self.device
        st = dev.state
        if st is MigState.PRE_COPY_P2P:
            dev.set_state(MigState.PRE_COPY)
            return
        if st in (MigState.RUNNING, MigState.PRE_COPY):
            return
        dev.set_state(MigState.RUNNING)
        self._stream = None
        if self._seq:
            self._flags |= FLAG_NEW_SESSION
        self._start_precopy()

    def iterate(self, link: DeviceLink, budget: int | None = None) -> int:
        """Send precopy data, up to ``budget`` bytes (None: all pending now)."""
        self._link = link
        stream = self._stream
        if stream is None or self.device.state not in PRECOPY_STATES:
            return 0
        room = self._unannounced_room(link)
        budget = room if budget is None else min(budget, room)
        sent = 0
        while sent < budget:
            n = min(self.buffer_size, budget - sent)
            try:
                data = stream.read(max(1, n - 1))
            except NoData:
                break
            if not self._init_announced and self.device.precopy_info()[0] == 0:
                self._init_announced = True
                self._flags |= FLAG_INIT_DONE
            sent += self._send(data)
        self._precopy_bytes += sent
        return sent

    def _unannounced_room(self, link: DeviceLink) -> int:
        """Precopy bytes this device may still send before the next announcement.

        The destination holds records until a control message announces them
        (``mig.reorder.ReorderBuffer``) and refuses more than
        ``max_queued_bytes`` waiting; a device that produces state faster than
        a long pass ends would overrun it. What is not sent now stays pending
        in the device and goes after the pass is announced.
        """
        if not isinstance(link, CountingLink):
            return self.max_queued_bytes
        return max(0, self.max_queued_bytes - link.unannounced_bytes(self.device_id))

    def stop_copy_seconds(self) -> float | None:
        """The device's own measure of its fixed stop-copy work (None: unreported)."""
        return self.device.stop_copy_seconds()

    def quiesce(self) -> None:
        """Stop the device's DMA (P2P state; STOP/STOP_COPY without P2P)."""
        dev = self.device
        p2p = bool(dev.caps & MigCap.P2P)
        if dev.state is MigState.PRE_COPY:
            dev.set_state(MigState.PRE_COPY_P2P if p2p else MigState.STOP_COPY)
        elif dev.state is MigState.RUNNING:
            dev.set_state(MigState.RUNNING_P2P if p2p else MigState.STOP)

    def complete(self, link: DeviceLink, budget: int | None = None) -> int:
        """Stop-copy: send the rest, the last chunk marked final.

        With a ``budget``, raise `mig.errors.OverBudget` before sending the
        chunk that would take this call's total over it.
        """
        self._link = link
        produced, self._produced = self._produced, None
        chunks = iter(produced) if produced is not None else self._read_stop_copy()
        total = 0
        cur = next(chunks, None)
        if cur is None:
            raise DeviceStreamError(f"{self.name}: STOP_COPY produced no data")
        while cur is not None:
            nxt = next(chunks, None)
            if budget is not None and total + len(cur) + 1 > budget:
                raise OverBudget(
                    f"device {self.name!r}: stop-copy state exceeds the budget of "
                    f"{budget} bytes after {total} bytes"
                )
            total += self._send(cur, final=nxt is None)
            cur = nxt
        self._stop_copy_bytes += total
        self._stream = None
        self.device.set_state(MigState.STOP)
        return total

    def abort(self) -> None:
        """Return the device to RUNNING whatever happened (reset if needed)."""
        self._produced = None
        self._stream = None
        dev = self.device
        try:
            if dev.state is MigState.ERROR:
                dev.reset()
            else:
                dev.set_state(MigState.RUNNING)
        except DeviceError:
            dev.reset()
        self._link = None

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.device.model,
            "device-id": self.device_id,
            "state": self.device.state.name.lower(),
            "precopy-bytes": self._precopy_bytes,
            "stop-copy-bytes": self._stop_copy_bytes,
            "exact-stops": self._exact_stops,
            "precopy-sessions": self._sessions,
        }

    # -- destination ---------------------------------------------------------
    def _reset_dest(self) -> None:
        self._writer: ResumeSession | None = None
        self._expect = 0
        self._final_seen = False
        self._initial_loaded = False

    def load_setup(self) -> None:
        self._reset_dest()
        self._open_resume()

    def _open_resume(self) -> None:
        dev = self.device
        if dev.state is MigState.RESUMING:
            dev.reset()
        opened = dev.set_state(MigState.RESUMING)
        assert opened is not None and hasattr(opened, "write")
        self._writer = cast(ResumeSession, opened)
        # Without PRE_COPY there is no initial data to wait for.
        self._initial_loaded = not dev.caps & MigCap.PRE_COPY

    def load_state(self, seq: int, chunk: bytes, final: bool) -> None:
        """Write the next chunk in sequence into the device."""
        if self._writer is None:
            raise ProtocolError(f"device {self.name!r}: state arrived before load_setup()")
        if not chunk or chunk[0] & ~_KNOWN_FLAGS:
            raise ProtocolError(f"device {self.name!r}: malformed chunk {seq}")
        if seq < self._expect:
            raise ProtocolError(f"device {self.name!r}: duplicate chunk {seq}")
        if self._final_seen:
            raise ProtocolError(f"device {self.name!r}: chunk {seq} after the final one")
        if seq != self._expect:
            raise ProtocolError(
                f"device {self.name!r}: chunk {seq} out of sequence, expected {self._expect} "
                "(the destination's ReorderBuffer orders chunks before loading)"
            )
        self._expect += 1
        if chunk[0] & FLAG_NEW_SESSION:
            self._open_resume()
        assert self._writer is not None
        self._writer.write(memoryview(chunk)[1:])
        if chunk[0] & FLAG_INIT_DONE:
            self._initial_loaded = True
        if final:
            self._final_seen = True

    def precopy_initial_loaded(self) -> bool:
        """True once the source's precopy initial data is loaded (switchover-ack)."""
        return self._initial_loaded

    def load_complete(self) -> None:
        """RESUMING -> STOP: the device validates the whole stream."""
        if not self._final_seen:
            raise DeviceStreamError(
                f"device {self.name!r}: state incomplete, the final chunk never arrived "
                f"({self._expect} loaded in sequence)"
            )
        self.device.set_state(MigState.STOP)
        self._writer = None

    def load_resume(self) -> None:
        self.device.set_state(MigState.RUNNING)

    def load_abort(self) -> None:
        """Discard whatever was loaded; the device is left RUNNING and idle."""
        self._reset_dest()
        self.device.active = False
        self.device.reset()
