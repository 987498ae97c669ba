"""The data sessions of a sample device: its saving and resuming ``data_fd``.

Each session works on the device's `StateStorage` through its public
methods, under the device's lock, and closes when the device leaves the
state that opened it.
"""

from __future__ import annotations

import threading

from mig.sample_devices.storage import StateStorage
from mig.sample_devices.stream import (
    END_BYTES,
    StreamDecoder,
    data_record,
    end_record,
    header,
)
from mig.vfio.device import PrecopyInfo
from mig.vfio.errors import DeviceError, DeviceStreamError, NoData

__all__ = ["ResumeStream", "SaveStream"]


class SaveStream:
    """The saving data session (the ``data_fd`` of PRE_COPY/STOP_COPY)."""

    def __init__(self, storage: StateStorage, lock: threading.RLock, name: str, model: str) -> None:
        self._storage = storage
        self._lock = lock
        self._name = name
        self._buf = bytearray(header(model))
        self._buf_initial = len(self._buf)  # leading bytes of _buf that count as initial
        self._stop_copy = False
        self._end_sent = False
        self._extra = 0
        self._corrupt = False
        self._closed = False
        self.bytes_read = 0
        storage.start_tracking()

    def enter_stop_copy(self, *, oversize: int = 0, corrupt: bool = False) -> None:
        """STOP_COPY: the rest of the state, then the END record.

        ``oversize``: emit that many bytes of records past the state bound;
        ``corrupt``: flip a payload byte of each record (injected faults).
        """
        self._stop_copy = True
        self._extra = oversize
        self._corrupt = corrupt

    def close(self) -> None:
        self._closed = True
        self._storage.stop_tracking()

    def precopy_info(self) -> PrecopyInfo:
        initial, dirty = self._storage.pending_cost()
        return PrecopyInfo(self._buf_initial + initial, len(self._buf) - self._buf_initial + dirty)

    def remaining(self) -> int:
        """Bytes this session will still produce if it ran STOP_COPY now."""
        initial, dirty = self.precopy_info()
        return initial + dirty + (0 if self._end_sent else END_BYTES)

    def read(self, size: int = 1 << 20) -> bytes:
        """Read up to ``size`` bytes.

        PRE_COPY states: raises `NoData` when nothing is pending (ENOMSG); more
        may come as the device dirties state. STOP_COPY: ``b""`` is the end.
        """
        if size <= 0:
            raise ValueError("size must be positive")
        with self._lock:
            if self._closed:
                raise DeviceError(f"{self._name}: data session is closed")
            while len(self._buf) < size and self._fill():
                pass
            if not self._buf:
                if not self._stop_copy:
                    raise NoData(f"{self._name}: no precopy data pending")
                return b""
            out = bytes(self._buf[:size])
            del self._buf[:size]
            self._buf_initial = max(0, self._buf_initial - len(out))
            self.bytes_read += len(out)
            return out

    def _fill(self) -> bool:
        """Append the next record to the buffer; False when nothing is left."""
        storage = self._storage
        chunk = storage.take_next()
        if chunk is not None:
            off, payload, initial = chunk
            if self._stop_copy and self._corrupt:
                payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
            rec = data_record(off, payload)
            if initial:
                # Keep initial bytes at the front of the accounting.
                self._buf_initial += len(rec)
            self._buf += rec
            return True
        if not self._stop_copy:
            return False
        if self._extra > 0:
            # Oversized stream: records past the state bound.
            length = min(self._extra, storage.chunk)
            self._extra -= length
            self._buf += data_record(storage.capacity, bytes(length))
            return True
        if not self._end_sent:
            self._end_sent = True
            self._buf += end_record(storage.size, storage.digest().to_bytes(16, "little"))
            return True
        return False


class ResumeStream:
    """The resuming data session: write the source's stream in order.

    Validation happens as bytes arrive (bounded buffering, records must stay
    inside the device's own state bound) and at RESUMING -> STOP (END record,
    size and digest), when `finish` installs the state into the storage.
    """

    def __init__(self, storage: StateStorage, lock: threading.RLock, name: str, model: str) -> None:
        self._storage = storage
        self._lock = lock
        self._name = name
        self._decoder = StreamDecoder(name, model, storage.capacity, storage.load_staging())
        self._error: str | None = None
        self._closed = False
        self.bytes_written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self._lock:
            if self._closed:
                raise DeviceError(f"{self._name}: resuming session is closed")
            if self._error:
                raise DeviceStreamError(self._error)
            self.bytes_written += len(data)
            try:
                self._decoder.feed(data)
            except DeviceStreamError as e:
                self._error = str(e)
                raise
            return len(data)

    def close(self) -> None:
        self._closed = True

    def finish(self) -> None:
        """RESUMING -> STOP: validate the whole stream and install the state.

        Closes the session whatever the outcome.
        """
        self._closed = True
        if self._error:
            raise DeviceStreamError(self._error)
        size, digest = self._decoder.finish()
        self._storage.install(self._decoder.staging, size, self._decoder.cells, digest)
