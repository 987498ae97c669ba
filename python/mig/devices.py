"""VFIO migration uAPI v2 model and sample devices.

`VfioDevice` follows the kernel's protocol (``include/uapi/linux/vfio.h``):
the device state machine of ``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`` with
the next-step table of ``vfio_mig_get_next_state()``, a saving data session
opened by the saving-group states and read until end of data, a resuming
session validated by RESUMING -> STOP, ``VFIO_MIG_GET_PRECOPY_INFO`` and
``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``. A real VFIO backend could sit behind the
same methods.

The sample devices (`fixed`, `nic`, `opaque`, `gpu`, `dma`) keep their state
in memory and mutate it from a worker thread of their own while the device
runs. Their stream format is device-private, as in the kernel: a header, DATA
records ``(offset, length, bytes)`` and an END record carrying the state size
and digest, which the destination checks before accepting the state.
"""

from __future__ import annotations

import enum
import re
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mig._mig import DirtyBitmap, GuestMemory, MigError, UnsupportedError, digest_bytes
from mig.units import parse_rate, parse_size

__all__ = [
    "DEVICE_KINDS",
    "DeviceError",
    "DeviceSpec",
    "DeviceSpecError",
    "DeviceStreamError",
    "DmaDevice",
    "FixedDevice",
    "GpuDevice",
    "InvalidTransition",
    "MigCap",
    "MigState",
    "NicDevice",
    "NoData",
    "OpaqueDevice",
    "ResumeStream",
    "SaveStream",
    "SampleDevice",
    "TransitionFailed",
    "VfioDevice",
    "create",
    "create_all",
    "next_state",
    "parse_specs",
]


class MigState(enum.IntEnum):
    """``enum vfio_device_mig_state``, with the kernel's numeric values."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigCap(enum.IntFlag):
    """Migration capabilities: ``VFIO_MIGRATION_*`` flags plus DATA_SIZE.

    STOP_COPY, P2P and PRE_COPY are the kernel's ``VFIO_MIGRATION_*`` bits.
    DATA_SIZE marks support of the separate ``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``
    feature; it takes the next free bit here.
    """

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2
    DATA_SIZE = 1 << 3


S = MigState
SAVING_STATES = frozenset({S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY})
PRECOPY_STATES = frozenset({S.PRE_COPY, S.PRE_COPY_P2P})
# States in which a device initiates DMA and its internal state changes.
ACTIVE_STATES = frozenset({S.RUNNING, S.PRE_COPY})

# vfio_from_fsm_table[cur][target]: next single step from cur toward target.
_ORDER = (S.STOP, S.RUNNING, S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P)
_E = S.ERROR
_NEXT_ROWS: dict[MigState, tuple[MigState, ...]] = {
    S.STOP: (S.STOP, S.RUNNING_P2P, S.RUNNING_P2P, S.RUNNING_P2P, S.STOP_COPY, S.RESUMING,
             S.RUNNING_P2P),
    S.RUNNING: (S.RUNNING_P2P, S.RUNNING, S.PRE_COPY, S.RUNNING_P2P, S.RUNNING_P2P,
                S.RUNNING_P2P, S.RUNNING_P2P),
    S.PRE_COPY: (S.RUNNING, S.RUNNING, S.PRE_COPY, S.PRE_COPY_P2P, S.PRE_COPY_P2P, S.RUNNING,
                 S.RUNNING),
    S.PRE_COPY_P2P: (S.RUNNING_P2P, S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY,
                     S.RUNNING_P2P, S.RUNNING_P2P),
    S.STOP_COPY: (S.STOP, S.STOP, _E, _E, S.STOP_COPY, S.STOP, S.STOP),
    S.RESUMING: (S.STOP, S.STOP, S.STOP, S.STOP, S.STOP, S.RESUMING, S.STOP),
    S.RUNNING_P2P: (S.STOP, S.RUNNING, S.RUNNING, S.PRE_COPY_P2P, S.STOP, S.STOP,
                    S.RUNNING_P2P),
}  # fmt: skip
_NEXT: dict[tuple[MigState, MigState], MigState] = {
    (cur, tgt): row[i] for cur, row in _NEXT_ROWS.items() for i, tgt in enumerate(_ORDER)
}
# state_flags_table: the capabilities a state needs. ERROR needs every bit, so
# it is never a supported target.
_STATE_NEEDS: dict[MigState, int] = {
    S.STOP: MigCap.STOP_COPY,
    S.RUNNING: MigCap.STOP_COPY,
    S.PRE_COPY: MigCap.STOP_COPY | MigCap.PRE_COPY,
    S.PRE_COPY_P2P: MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY,
    S.STOP_COPY: MigCap.STOP_COPY,
    S.RESUMING: MigCap.STOP_COPY,
    S.RUNNING_P2P: MigCap.STOP_COPY | MigCap.P2P,
    S.ERROR: ~0,
}


def _supported(state: MigState, caps: int) -> bool:
    need = _STATE_NEEDS[state]
    return need != ~0 and (need & caps) == need


def next_state(cur: MigState, target: MigState, caps: int) -> MigState:
    """``vfio_mig_get_next_state()``: the next single arc from ``cur`` to ``target``.

    Unsupported optional states on the way are skipped by re-applying the
    table. Raises `InvalidTransition` where the kernel returns ``-EINVAL``.
    The skip loop stops at ERROR (blocked arcs such as STOP_COPY -> PRE_COPY),
    which the kernel fixed after it looped forever there.
    """
    cur, target = MigState(cur), MigState(target)
    if not _supported(cur, caps):
        raise InvalidTransition(cur, target, f"the device is in {cur.name}; it needs a reset")
    if not _supported(target, caps):
        why = (
            "ERROR cannot be requested"
            if target is S.ERROR
            else f"{target.name} needs capabilities {MigCap(_STATE_NEEDS[target])!r}"
        )
        raise InvalidTransition(cur, target, why)
    nxt = _NEXT[cur, target]
    while nxt is not S.ERROR and not _supported(nxt, caps):
        nxt = _NEXT[nxt, target]
    if nxt is S.ERROR:
        raise InvalidTransition(cur, target, "the kernel blocks this arc")
    return nxt


class DeviceError(MigError):
    """A device operation failed."""


class InvalidTransition(DeviceError):
    """The requested state change is not allowed (the kernel's ``-EINVAL``)."""

    def __init__(self, cur: MigState, target: MigState, why: str) -> None:
        super().__init__(f"cannot move device from {cur.name} to {target.name}: {why}")
        self.cur, self.target = cur, target


class TransitionFailed(DeviceError):
    """The driver failed an arc; ``state`` is where the device was left."""

    def __init__(self, msg: str, state: MigState) -> None:
        super().__init__(msg)
        self.state = state


class DeviceStreamError(DeviceError):
    """A migration data stream is malformed, oversized or fails validation."""


class NoData(DeviceError):
    """No precopy data available right now (``read()`` failing with ENOMSG)."""


class DeviceSpecError(ValueError):
    """A device spec string is invalid."""


# --- stream format ------------------------------------------------------------

MAGIC = b"MIGVFIO1"
_HDR = struct.Struct("<8sB7x")  # magic, kind id
_TAG = struct.Struct("<B")
_DATA = struct.Struct("<QI")  # offset, length
_END = struct.Struct("<Q16s")  # state size, xxh3-128 of the state
TAG_DATA, TAG_END = 1, 2
DATA_OVERHEAD = _TAG.size + _DATA.size
END_BYTES = _TAG.size + _END.size
MAX_RECORD = 16 << 20


def _state_hash(buf: np.ndarray) -> bytes:
    # xxh3-128, as guest memory: the hash runs at switchover on both sides,
    # inside the downtime, so it must cost milliseconds, not a slow crypto hash.
    return digest_bytes(buf).to_bytes(16, "little")


# --- the base class -----------------------------------------------------------


@dataclass
class _Fault:
    fail_state: MigState | None = None  # fail the arc entering this state
    fail_into_error: bool = False
    corrupt: bool = False
    oversize: int = 0
    once: bool = True


class VfioDevice:
    """A VFIO migration uAPI v2 device.

    Subclasses provide the state storage; this class owns the state machine,
    the data sessions and their accounting. ``caps`` is a `MigCap`. Every
    method is thread-safe against the device's worker thread.
    """

    kind_id = 0
    kind = "device"

    def __init__(
        self,
        name: str,
        caps: MigCap,
        *,
        size: int,
        capacity: int,
        chunk: int = 64 << 10,
        seed: int = 0,
    ) -> None:
        if not caps & MigCap.STOP_COPY:
            raise ValueError("VFIO_MIGRATION_STOP_COPY is mandatory")
        if not 0 < size <= capacity:
            raise ValueError(f"state size {size} must be in 1..{capacity}")
        if chunk <= 0 or chunk > MAX_RECORD:
            raise ValueError(f"chunk must be in 1..{MAX_RECORD}")
        self.name = name
        self.caps = MigCap(caps)
        self.chunk = chunk
        self.capacity = capacity
        self._lock = threading.RLock()
        self._state = S.RUNNING
        self._rng = np.random.default_rng(seed)
        self._data = np.zeros(capacity, dtype=np.uint8)
        self._data[:size] = self._rng.integers(0, 256, size, dtype=np.uint8)
        self._size = size
        nchunks = -(-capacity // chunk)
        # Chunks still to send from the initial image / re-dirtied after being sent.
        self._initial = np.zeros(nchunks, dtype=bool)
        self._dirty = np.zeros(nchunks, dtype=bool)
        self._save: SaveStream | None = None
        self._resume: ResumeStream | None = None
        self._fault = _Fault()
        self.arcs: deque[tuple[MigState, MigState]] = deque(maxlen=1024)
        self.active = True  # the guest driver has armed the device

    # -- introspection -----------------------------------------------------
    @property
    def state(self) -> MigState:
        return self._state

    @property
    def state_size(self) -> int:
        with self._lock:
            return self._size

    def state_digest(self) -> int:
        """Digest of the device's functional state (its bytes, hence its size)."""
        with self._lock:
            return digest_bytes(self._data[: self._size])

    def state_bytes(self) -> bytes:
        with self._lock:
            return self._data[: self._size].tobytes()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} {self._state.name} "
            f"size={self._size} caps={self.caps!r}>"
        )

    # -- faults ------------------------------------------------------------
    def inject_fault(
        self,
        *,
        fail: MigState | str | None = None,
        into_error: bool = False,
        corrupt: bool = False,
        oversize: int = 0,
        once: bool = True,
    ) -> None:
        """Arm a fault.

        ``fail``: the arc entering this state fails (the device stays in the
        state before that arc, or goes to ERROR with ``into_error``).
        ``corrupt``: the STOP_COPY stream carries flipped payload bytes.
        ``oversize``: STOP_COPY emits this many bytes of records beyond the
        device's state bound (and `data_size` does not count them).
        ``once``: a failing arc fails only the first time.
        """
        if isinstance(fail, str):
            fail = _state_by_name(fail)
        if oversize < 0:
            raise ValueError("oversize must be >= 0")
        with self._lock:
            self._fault = _Fault(fail, into_error, corrupt, oversize, once)

    def clear_faults(self) -> None:
        with self._lock:
            self._fault = _Fault()

    # -- the state machine -------------------------------------------------
    def set_state(self, target: MigState | int) -> SaveStream | ResumeStream | None:
        """``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`` SET.

        Walks the kernel's path one arc at a time. Returns the data session
        opened by the final arc (the ``data_fd``), else None. On a failing arc
        raises `TransitionFailed` with the device left in the last state it
        reached (or ERROR); an arc the kernel refuses raises `InvalidTransition`
        before anything moves.
        """
        target = MigState(target)
        with self._lock:
            opened: SaveStream | ResumeStream | None = None
            while self._state is not target:
                nxt = next_state(self._state, target, self.caps)
                opened = self._step(self._state, nxt)
            return opened

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: drop every data session and return to RUNNING.

        The model keeps the functional state bytes, so a source device that hit
        ERROR during a failed migration keeps serving the guest.
        """
        with self._lock:
            self._close_save()
            self._resume = None
            self.arcs.append((self._state, S.RUNNING))
            self._state = S.RUNNING
            self._state_changed()

    def _step(self, cur: MigState, nxt: MigState) -> SaveStream | ResumeStream | None:
        f = self._fault
        if f.fail_state is nxt:
            if f.once:
                self._fault = _Fault(corrupt=f.corrupt, oversize=f.oversize)
            if f.fail_into_error:
                self._close_save()
                self._resume = None
                self._state = S.ERROR
            raise TransitionFailed(
                f"{self.name}: injected failure on arc {cur.name} -> {nxt.name}", self._state
            )
        opened: SaveStream | ResumeStream | None = None
        if cur is S.RESUMING and nxt is S.STOP:
            assert self._resume is not None
            try:
                self._resume._finish()
            except DeviceStreamError:
                self._resume = None
                self._state = S.ERROR
                raise
            self._resume = None
        if nxt in SAVING_STATES and cur not in SAVING_STATES:
            opened = self._open_save(precopy=nxt in PRECOPY_STATES)
        elif cur in SAVING_STATES and nxt not in SAVING_STATES:
            self._close_save()
        elif nxt is S.STOP_COPY and self._save is not None:
            self._save._enter_stop_copy()
        if nxt is S.RESUMING:
            opened = self._resume = ResumeStream(self)
        self.arcs.append((cur, nxt))
        self._state = nxt
        self._state_changed()
        return opened

    def _state_changed(self) -> None:
        """Hook for subclasses (wake the worker)."""

    # -- saving ------------------------------------------------------------
    def _open_save(self, precopy: bool) -> SaveStream:
        n = self._nchunks()
        self._initial[:] = False
        self._initial[:n] = True
        self._dirty[:] = False
        self._save = SaveStream(self, precopy)
        return self._save

    def _close_save(self) -> None:
        if self._save is not None:
            self._save._closed = True
            self._save = None
        self._initial[:] = False
        self._dirty[:] = False

    def _nchunks(self) -> int:
        return -(-self._size // self.chunk)

    def _chunk_cost(self, mask: np.ndarray) -> int:
        """Stream bytes of the DATA records for the chunks set in ``mask``."""
        n = self._nchunks()
        count = int(np.count_nonzero(mask[:n]))
        if not count:
            return 0
        cost = count * (DATA_OVERHEAD + self.chunk)
        tail = self._size - (n - 1) * self.chunk
        if mask[n - 1]:
            cost -= self.chunk - tail
        return cost

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record a change of ``[offset, offset + length)``; call with the lock held."""
        if self._save is None or length <= 0:
            return
        first, last = offset // self.chunk, (offset + length - 1) // self.chunk
        sel = slice(first, last + 1)
        self._dirty[sel] |= ~self._initial[sel]

    def resize(self, new_size: int) -> None:
        """Change the state size (growing tables); call with the lock held."""
        new_size = max(1, min(new_size, self.capacity))
        old = self._size
        if new_size == old:
            return
        if new_size > old:
            self._data[old:new_size] = self._rng.integers(0, 256, new_size - old, dtype=np.uint8)
        self._size = new_size
        n = self._nchunks()
        self._initial[n:] = False
        self._dirty[n:] = False
        if new_size > old:
            self.mark_dirty(old, new_size - old)
        elif self._save is not None and n:
            # The last chunk shrank: send its new extent again.
            self.mark_dirty((n - 1) * self.chunk, 1)

    def precopy_info(self) -> tuple[int, int]:
        """``VFIO_MIG_GET_PRECOPY_INFO``: ``(initial_bytes, dirty_bytes)``.

        Valid only in PRE_COPY and PRE_COPY_P2P (``-EINVAL`` otherwise).
        """
        with self._lock:
            if self._state not in PRECOPY_STATES or self._save is None:
                raise DeviceError(
                    f"{self.name}: precopy_info() is valid only in PRE_COPY states, "
                    f"device is {self._state.name}"
                )
            return self._save._precopy_info()

    def data_size(self) -> int:
        """``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``: bytes STOP_COPY would still produce."""
        if not self.caps & MigCap.DATA_SIZE:
            raise UnsupportedError(
                f"{self.name}: device does not support VFIO_DEVICE_FEATURE_MIG_DATA_SIZE"
            )
        with self._lock:
            if self._save is not None:
                return self._save._remaining()
            if self._state is S.ERROR:
                raise DeviceError(f"{self.name}: device is in ERROR")
            return _HDR.size + self._chunk_cost(np.ones(self._nchunks(), dtype=bool)) + END_BYTES

    def close(self) -> None:
        """Release the device (stops a worker thread if any)."""


class SaveStream:
    """The saving data session (the ``data_fd`` of PRE_COPY/STOP_COPY)."""

    def __init__(self, dev: VfioDevice, precopy: bool) -> None:
        self._dev = dev
        self._buf = bytearray(_HDR.pack(MAGIC, dev.kind_id))
        self._buf_initial = len(self._buf)  # leading bytes of _buf that count as initial
        self._stop_copy = not precopy
        self._end_sent = False
        self._extra = 0
        self._closed = False
        self.bytes_read = 0
        if not precopy:
            self._enter_stop_copy()

    def _enter_stop_copy(self) -> None:
        self._stop_copy = True
        self._extra = self._dev._fault.oversize
        self._corrupt = self._dev._fault.corrupt

    def _precopy_info(self) -> tuple[int, int]:
        d = self._dev
        initial = self._buf_initial + d._chunk_cost(d._initial)
        dirty = len(self._buf) - self._buf_initial + d._chunk_cost(d._dirty)
        return initial, dirty

    def _remaining(self) -> int:
        init, dirty = self._precopy_info()
        return init + dirty + (0 if self._end_sent else END_BYTES)

    def read(self, size: int = 1 << 20) -> bytes:
        """Read up to ``size`` bytes.

        PRE_COPY states: raises `NoData` when nothing is pending (ENOMSG); more
        may come as the device dirties state. STOP_COPY: ``b""`` is the end.
        """
        if size <= 0:
            raise ValueError("size must be positive")
        d = self._dev
        with d._lock:
            if self._closed:
                raise DeviceError(f"{d.name}: data session is closed")
            while len(self._buf) < size and self._fill():
                pass
            if not self._buf:
                if not self._stop_copy:
                    raise NoData(f"{d.name}: no precopy data pending")
                return b""
            out = bytes(self._buf[:size])
            del self._buf[:size]
            self._buf_initial = max(0, self._buf_initial - len(out))
            self.bytes_read += len(out)
            return out

    def _fill(self) -> bool:
        """Append the next record to the buffer; False when nothing is left."""
        d = self._dev
        n = d._nchunks()
        for mask, initial in ((d._initial, True), (d._dirty, False)):
            idx = np.flatnonzero(mask[:n])
            if idx.size:
                c = int(idx[0])
                mask[c] = False
                self._append_chunk(c, initial)
                return True
        if not self._stop_copy:
            return False
        if self._extra > 0:
            # Oversized stream: records past the state bound.
            length = min(self._extra, d.chunk)
            self._extra -= length
            self._buf += _TAG.pack(TAG_DATA) + _DATA.pack(d.capacity, length) + bytes(length)
            return True
        if not self._end_sent:
            self._end_sent = True
            state = d._data[: d._size]
            self._buf += _TAG.pack(TAG_END) + _END.pack(d._size, _state_hash(state))
            return True
        return False

    def _append_chunk(self, c: int, initial: bool) -> None:
        d = self._dev
        off = c * d.chunk
        end = min(off + d.chunk, d._size)
        payload = d._data[off:end].tobytes()
        if self._stop_copy and self._corrupt:
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        rec = _TAG.pack(TAG_DATA) + _DATA.pack(off, end - off) + payload
        if initial:
            # Keep initial bytes at the front of the accounting.
            self._buf_initial += len(rec)
        self._buf += rec


class ResumeStream:
    """The resuming data session: write the source's stream in order.

    Validation happens as bytes arrive (bounded buffering, records must stay
    inside the device's own state bound) and at RESUMING -> STOP (END record,
    size and digest).
    """

    def __init__(self, dev: VfioDevice) -> None:
        self._dev = dev
        self._buf = bytearray()
        self._staging = np.zeros(dev.capacity, dtype=np.uint8)
        self._extent = 0
        self._header = False
        self._end: tuple[int, bytes] | None = None
        self._error: str | None = None
        self.bytes_written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        d = self._dev
        with d._lock:
            if d._resume is not self:
                raise DeviceError(f"{d.name}: resuming session is closed")
            if self._error:
                raise DeviceStreamError(self._error)
            self._buf += data
            self.bytes_written += len(data)
            try:
                self._parse()
            except DeviceStreamError as e:
                self._error = str(e)
                raise
            return len(data)

    def _fail(self, why: str) -> None:
        raise DeviceStreamError(f"{self._dev.name}: invalid migration stream: {why}")

    def _parse(self) -> None:
        d, buf = self._dev, self._buf
        pos = 0
        if not self._header:
            if len(buf) < _HDR.size:
                return
            magic, kind = _HDR.unpack_from(buf)
            if magic != MAGIC:
                self._fail("bad magic")
            if kind != d.kind_id:
                src = _KIND_NAMES.get(kind, f"kind {kind}")
                self._fail(f"stream is from a {src!r} device, this is a {d.kind!r} device")
            self._header = True
            pos = _HDR.size
        while pos < len(buf):
            if self._end is not None:
                self._fail("data after the END record")
            tag = buf[pos]
            if tag == TAG_DATA:
                if len(buf) - pos < DATA_OVERHEAD:
                    break
                off, length = _DATA.unpack_from(buf, pos + 1)
                if length > MAX_RECORD or off + length > d.capacity:
                    self._fail(
                        f"record [{off}, {off + length}) exceeds the device state bound "
                        f"{d.capacity}"
                    )
                if len(buf) - pos < DATA_OVERHEAD + length:
                    break
                start = pos + DATA_OVERHEAD
                self._staging[off : off + length] = np.frombuffer(buf, np.uint8, length, start)
                self._extent = max(self._extent, off + length)
                pos = start + length
            elif tag == TAG_END:
                if len(buf) - pos < END_BYTES:
                    break
                size, digest = _END.unpack_from(buf, pos + 1)
                if not 0 < size <= d.capacity:
                    self._fail(f"state size {size} outside 1..{d.capacity}")
                self._end = (size, digest)
                pos += END_BYTES
            else:
                self._fail(f"unknown record tag {tag}")
        del buf[:pos]

    def _finish(self) -> None:
        """RESUMING -> STOP: validate and install the state (lock held)."""
        d = self._dev
        if self._error:
            raise DeviceStreamError(self._error)
        if self._buf or not self._header:
            self._fail("truncated stream")
        if self._end is None:
            self._fail("missing END record")
        size, digest = self._end
        if _state_hash(self._staging[:size]) != digest:
            self._fail("state digest mismatch (corrupt data)")
        d._data = self._staging
        d._size = size
        d.active = True


# --- sample devices ------------------------------------------------------------


class SampleDevice(VfioDevice):
    """A device with a worker thread that changes its state while active.

    ``rate`` bytes/s of state are rewritten; ``grow`` bytes/s are added (or,
    when negative, shrink) between ``min_size`` and the capacity.
    """

    tick = 0.005

    def __init__(
        self,
        name: str,
        caps: MigCap,
        *,
        size: int,
        capacity: int,
        rate: float,
        grow: float = 0.0,
        min_size: int = 1,
        chunk: int = 64 << 10,
        seed: int = 0,
        active: bool = True,
        clock: Any = None,
    ) -> None:
        super().__init__(name, caps, size=size, capacity=capacity, chunk=chunk, seed=seed)
        self.rate = rate
        self.grow = grow
        self.min_size = max(1, min_size)
        self._carry = self._gcarry = 0.0
        self.active = active
        self.writes = 0
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._setup_worker()
        self._thread: threading.Thread | None = None
        self._vt_due = 0.0
        if clock is not None and callable(getattr(clock, "on_advance", None)):
            # Virtual time: the clock drives the device, no worker thread.
            clock.on_advance(self._on_clock)
        else:
            self._thread = threading.Thread(target=self._run, name=f"dev-{name}", daemon=True)
            self._thread.start()

    def _on_clock(self, old: float, new: float) -> None:
        # Work in steps of ``tick``, as the worker thread does: a write marks
        # whole chunks dirty, so finer steps would dirty more state.
        with self._lock:
            if self._stop or not self._running():
                self._vt_due = 0.0
                return
            self._vt_due += new - old
            if self._vt_due >= self.tick:
                self._advance(self._vt_due)
                self._vt_due = 0.0

    def _setup_worker(self) -> None:
        """Hook: finish subclass state before the worker thread starts."""

    def _state_changed(self) -> None:
        self._wake.notify_all()

    def _running(self) -> bool:
        return self.active and self._state in ACTIVE_STATES

    def _run(self) -> None:
        last = time.monotonic()
        with self._lock:
            while not self._stop:
                if not self._running():
                    self._wake.wait()
                    last = time.monotonic()
                    continue
                self._wake.wait(self.tick)
                if self._stop or not self._running():
                    continue
                now = time.monotonic()
                self._advance(now - last)
                last = now

    def _advance(self, dt: float) -> None:
        """Run the device for ``dt`` seconds of work (lock held)."""
        self._carry += self.rate * dt
        self._gcarry += self.grow * dt
        # Whole chunks, so a partial chunk still pending as initial data never grows.
        step = int(self._gcarry / self.chunk) * self.chunk
        if step:
            self.resize(max(self.min_size, self._size + step))
            self._gcarry -= step
        if self._carry >= 1:
            self._work(int(self._carry))
            self._carry -= int(self._carry)
            self.writes += 1

    def _work(self, nbytes: int) -> None:
        """Rewrite ``nbytes`` of state in chunk-sized pieces (lock held)."""
        while nbytes > 0:
            n = min(nbytes, self.chunk, self._size)
            off = int(self._rng.integers(0, self._size - n + 1))
            self._data[off : off + n] = self._rng.integers(0, 256, n, dtype=np.uint8)
            self.mark_dirty(off, n)
            nbytes -= n

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> SampleDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FixedDevice(SampleDevice):
    """Small fixed register state, no precopy (like hisi_acc)."""

    kind, kind_id = "fixed", 1


class NicDevice(SampleDevice):
    """PRE_COPY with data_size() while running; state grows with traffic (like mlx5)."""

    kind, kind_id = "nic", 2


class OpaqueDevice(SampleDevice):
    """No data_size(): the size is known only once STOP_COPY has produced it.

    Its state (a context table) grows and shrinks with the workload, so no
    earlier figure predicts it.
    """

    kind, kind_id = "opaque", 3

    def _work(self, nbytes: int) -> None:
        super()._work(nbytes)
        step = int(self._rng.integers(-self.chunk, self.chunk + 1))
        self.resize(max(self.min_size, self._size + step))


class GpuDevice(SampleDevice):
    """Large state (256 MiB and up by default) dirtied by its worker, with PRE_COPY."""

    kind, kind_id = "gpu", 4


class DmaDevice(SampleDevice):
    """A passed-through VF that DMA-writes guest RAM while RUNNING or PRE_COPY.

    Stopping vCPUs does not stop it: only moving it to a P2P or stopped state
    does. Each write stamps a page with the device's sequence number, which
    lives in the device state, so the destination continues the sequence.
    ``dma_log`` is the device's own dirty log of guest pages (DMA logging).
    """

    kind, kind_id = "dma", 5

    def __init__(self, name: str, caps: MigCap, *, memory: GuestMemory, dma_rate: float,
                 **kw: Any) -> None:  # fmt: skip
        self.memory = memory
        self.dma_rate = dma_rate
        self.dma_log = DirtyBitmap(memory.num_pages)
        self.dma_pages_written = 0
        self._dma_carry = 0.0
        self._mem = memory.array
        super().__init__(name, caps, **kw)

    def _setup_worker(self) -> None:
        self.dma_progress = threading.Condition(self._lock)

    def wait_dma(self, pages_written: int, timeout: float = 10.0) -> bool:
        """Wait until the device has DMA-written more than ``pages_written`` pages."""
        with self._lock:
            return self.dma_progress.wait_for(
                lambda: self.dma_pages_written > pages_written, timeout
            )

    def _advance(self, dt: float) -> None:
        super()._advance(dt)
        self._dma_carry += self.dma_rate * dt / self.memory.page_size
        pages = int(self._dma_carry)
        self._dma_carry -= pages
        ps, num = self.memory.page_size, self.memory.num_pages
        for _ in range(pages):
            seq = int.from_bytes(self._data[:8].tobytes(), "little") + 1
            self._data[:8] = np.frombuffer(seq.to_bytes(8, "little"), np.uint8)
            self.mark_dirty(0, 8)
            page = (seq * 2654435761) % num
            stamp = np.frombuffer(seq.to_bytes(8, "little") * (ps // 8), np.uint8)
            self._mem[page * ps : (page + 1) * ps] = stamp
            self.dma_log.set(page)
            self.dma_pages_written += 1
        if pages:
            self.dma_progress.notify_all()


DEVICE_KINDS: dict[str, type[SampleDevice]] = {
    c.kind: c for c in (FixedDevice, NicDevice, OpaqueDevice, GpuDevice, DmaDevice)
}
_KIND_NAMES = {c.kind_id: c.kind for c in DEVICE_KINDS.values()}


def _state_by_name(name: str) -> MigState:
    try:
        return MigState[name.strip().upper().replace("-", "_")]
    except KeyError:
        raise ValueError(
            f"unknown device state {name!r}; expected one of "
            + ", ".join(s.name.lower() for s in MigState)
        ) from None


# --- specs ----------------------------------------------------------------------


@dataclass
class _Kind:
    caps: MigCap
    state: int
    rate: int
    grow: int = 0
    max: int = 0  # 0: same as state
    chunk: int = 64 << 10


_DEFAULTS: dict[str, _Kind] = {
    "fixed": _Kind(MigCap.STOP_COPY | MigCap.P2P | MigCap.DATA_SIZE, 4 << 10, 16 << 10,
                   chunk=4 << 10),
    "nic": _Kind(MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY | MigCap.DATA_SIZE, 64 << 20,
                 20 << 20, grow=1 << 20, max=128 << 20),
    "opaque": _Kind(MigCap.STOP_COPY | MigCap.P2P, 16 << 20, 8 << 20, max=32 << 20),
    "gpu": _Kind(MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY | MigCap.DATA_SIZE, 256 << 20,
                 64 << 20, chunk=1 << 20),
    "dma": _Kind(MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY | MigCap.DATA_SIZE, 64 << 10,
                 64 << 10, chunk=4 << 10),
}  # fmt: skip

_CAP_OPTS = {"p2p": MigCap.P2P, "precopy": MigCap.PRE_COPY, "data_size": MigCap.DATA_SIZE}
_SIZE_OPTS = ("state", "max", "chunk", "oversize")
_RATE_OPTS = ("rate", "grow", "dma")
_OTHER_OPTS = ("name", "seed", "fail", "fail_into", "corrupt", "min")


@dataclass
class DeviceSpec:
    """A parsed device spec: kind plus options (strings as written)."""

    kind: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ",".join(k if v == "" else f"{k}={v}" for k, v in self.options.items())
        return f"{self.kind}:{opts}" if opts else self.kind


def _parse_one(kind: str, opts: list[str], whole: str) -> DeviceSpec:
    if kind not in DEVICE_KINDS:
        raise DeviceSpecError(
            f"unknown device type {kind!r} in {whole!r}; expected one of " + ", ".join(DEVICE_KINDS)
        )
    spec = DeviceSpec(kind)
    for opt in opts:
        key, _, val = opt.partition("=")
        key = key.strip().replace("-", "_")
        if key not in _CAP_OPTS and key not in _SIZE_OPTS + _RATE_OPTS + _OTHER_OPTS:
            raise DeviceSpecError(f"{kind}: unknown field {key!r} in {whole!r}")
        spec.options[key] = val.strip()
    _build_kwargs(spec)  # validate every field now
    return spec


def parse_specs(text: str | list[str] | tuple[str, ...]) -> list[DeviceSpec]:
    """Parse one or more device specs.

    ``"nic:state=64MiB,rate=20MiB/s,fixed"`` is two devices: a comma-separated
    item that names a device type starts a new device, other items are fields
    of the current one. ``;`` and whitespace also separate devices.
    """
    if isinstance(text, list | tuple):
        return [s for t in text for s in parse_specs(t)]
    specs: list[DeviceSpec] = []
    cur: tuple[str, list[str]] | None = None
    for item in (i for part in re.split(r"[;\s]+", text) for i in part.split(",")):
        item = item.strip()
        if not item:
            continue
        head, colon, rest = item.partition(":")
        if head in DEVICE_KINDS and (colon or "=" not in item):
            if cur:
                specs.append(_parse_one(cur[0], cur[1], text))
            cur = (head, [rest] if rest else [])
        elif colon and "=" not in head:
            raise DeviceSpecError(
                f"unknown device type {head!r} in {text!r}; expected one of "
                + ", ".join(DEVICE_KINDS)
            )
        elif cur is None:
            raise DeviceSpecError(
                f"device spec {text!r} must start with a device type ("
                + ", ".join(DEVICE_KINDS)
                + f"), got {item!r}"
            )
        else:
            cur[1].append(item)
    if cur:
        specs.append(_parse_one(cur[0], cur[1], text))
    return specs


def _flag(kind: str, key: str, val: str) -> bool:
    v = val.lower()
    if v in ("", "1", "on", "yes", "true"):
        return True
    if v in ("0", "off", "no", "false"):
        return False
    raise DeviceSpecError(f"{kind}: field {key!r}: expected on/off, got {val!r}")


def _build_kwargs(spec: DeviceSpec) -> dict[str, Any]:
    d = _DEFAULTS[spec.kind]
    o = spec.options
    vals: dict[str, int] = {}
    for key in _SIZE_OPTS + _RATE_OPTS:
        if key not in o:
            continue
        text = o[key].strip()
        neg = key == "grow" and text.startswith("-")
        parse = parse_rate if key in _RATE_OPTS else parse_size
        try:
            vals[key] = parse(text.lstrip("-") if neg else text)
        except ValueError as e:
            raise DeviceSpecError(f"{spec.kind}: field {key!r}: {e}") from None
        if neg:
            vals[key] = -vals[key]
    caps = d.caps
    for key, bit in _CAP_OPTS.items():
        if key in o:
            caps = caps | bit if _flag(spec.kind, key, o[key]) else caps & ~bit
    state = vals.get("state", d.state)
    growable = bool(d.grow) or spec.kind == "opaque"
    default_max = (2 * state if growable else state) if "state" in o else max(d.max, state)
    cap_max = vals.get("max", default_max)
    chunk = vals.get("chunk", min(d.chunk, state))
    if state <= 0:
        raise DeviceSpecError(f"{spec.kind}: field 'state': must be > 0")
    if cap_max < state:
        raise DeviceSpecError(f"{spec.kind}: field 'max': {cap_max} is below state={state}")
    if not 0 < chunk <= MAX_RECORD:
        raise DeviceSpecError(f"{spec.kind}: field 'chunk': must be in 1..{MAX_RECORD}")
    out: dict[str, Any] = {}
    for key in ("seed", "min"):
        if key in o:
            try:
                out[key] = int(parse_size(o[key])) if key == "min" else int(o[key])
            except ValueError:
                raise DeviceSpecError(f"{spec.kind}: field {key!r}: bad value {o[key]!r}") from None
    out["min_size"] = out.pop("min", state // 2 if spec.kind == "opaque" else 1)
    out.update(
        caps=caps,
        size=state,
        capacity=cap_max,
        rate=vals.get("rate", d.rate),
        grow=vals.get("grow", d.grow),
        chunk=chunk,
    )
    if spec.kind == "dma":
        out["dma_rate"] = vals.get("dma", 4 << 20)
    fault: dict[str, Any] = {}
    if "fail" in o:
        try:
            fault["fail"] = _state_by_name(o["fail"])
        except ValueError as e:
            raise DeviceSpecError(f"{spec.kind}: field 'fail': {e}") from None
    if "fail_into" in o:
        if o["fail_into"].lower() != "error":
            raise DeviceSpecError(f"{spec.kind}: field 'fail_into': only 'error' is allowed")
        fault["into_error"] = True
    if "corrupt" in o:
        fault["corrupt"] = _flag(spec.kind, "corrupt", o["corrupt"])
    if "oversize" in o:
        fault["oversize"] = vals["oversize"]
    out["fault"] = fault
    return out


def create(
    spec: str | DeviceSpec,
    memory: GuestMemory | None = None,
    name: str | None = None,
    *,
    active: bool = True,
    clock: Any = None,
) -> SampleDevice:
    """Build one sample device from a spec such as ``"nic:state=64MiB,rate=20MiB/s"``.

    ``memory`` is the guest RAM a `dma` device writes. ``active=False`` builds
    a device whose guest driver has not armed it yet (a destination device:
    it starts working once a migrated state is loaded). Fault fields of the
    spec arm the source device only; a destination twin built from the same
    spec gets faults through `VfioDevice.inject_fault`. ``clock``: a clock
    with ``on_advance`` (``mig.clock.VirtualClock``) drives the device's
    activity in virtual time instead of a worker thread.
    """
    if isinstance(spec, str):
        specs = parse_specs(spec)
        if len(specs) != 1:
            raise DeviceSpecError(f"expected one device in {spec!r}, got {len(specs)}")
        spec = specs[0]
    kw = _build_kwargs(spec)
    fault = kw.pop("fault")
    caps = kw.pop("caps")
    dev_name = name or spec.options.get("name") or spec.kind
    cls = DEVICE_KINDS[spec.kind]
    if cls is DmaDevice:
        if memory is None:
            raise DeviceSpecError("dma: a dma device needs the guest memory it writes (memory=)")
        dev: SampleDevice = DmaDevice(
            dev_name, caps, memory=memory, active=active, clock=clock, **kw
        )
    else:
        kw.pop("dma_rate", None)
        dev = cls(dev_name, caps, active=active, clock=clock, **kw)
    if fault and active:
        dev.inject_fault(**fault)
    return dev


def create_all(
    specs: str | list[str] | list[DeviceSpec],
    memory: GuestMemory | None = None,
    *,
    active: bool = True,
    clock: Any = None,
) -> list[SampleDevice]:
    """Build every device of a spec list, named ``<kind><n>`` unless named in the spec."""
    parsed: list[DeviceSpec] = []
    for s in [specs] if isinstance(specs, str) else specs:
        parsed += [s] if isinstance(s, DeviceSpec) else parse_specs(s)
    counts: dict[str, int] = {}
    out: list[SampleDevice] = []
    try:
        for s in parsed:
            n = counts.get(s.kind, 0)
            counts[s.kind] = n + 1
            name = s.options.get("name") or f"{s.kind}{n}"
            out.append(create(s, memory, name, active=active, clock=clock))
    except BaseException:
        for d in out:
            d.close()
        raise
    return out
