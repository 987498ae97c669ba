"""The sample devices' migration data stream: its records, encoder and decoder.

As in the kernel, the stream of a VFIO device is private to its driver; this
is the format of the sample devices. A header names the device model; DATA
records ``(u8 1, u64 offset, u32 length, bytes)`` carry state bytes; the END
record ``(u8 2, u64 size, 16-byte digest of the state)`` closes it, the
digest a `mig.sample_devices.cell_digest.CellDigest` root (xxh3-128 over the
xxh3-128 of each 64 KiB cell and the size), so that neither side hashes the
whole state inside the downtime. The decoder bounds every record by the
destination device's own state bound before it buffers the record, hashes
the cells records fill as they land, and checks size and digest at the end.
"""

from __future__ import annotations

import struct

import numpy as np

from mig._mig import digest_bytes
from mig.sample_devices.cell_digest import CellDigest
from mig.vfio.errors import DeviceStreamError

__all__ = [
    "DATA_OVERHEAD",
    "END_BYTES",
    "HEADER_BYTES",
    "MAX_RECORD",
    "MODEL_IDS",
    "StreamDecoder",
    "data_record",
    "end_record",
    "header",
    "state_hash",
]

MAGIC = b"MIGVFIO2"  # 2: the END digest is a cell root
# Version 1's END record carried the whole state's xxh3-128. Streams saved in
# it (snapshot files) still load: their END digest is checked the old way.
MAGIC_V1 = b"MIGVFIO1"
_HDR = struct.Struct("<8sB7x")  # magic, model id
_TAG = struct.Struct("<B")
_DATA = struct.Struct("<QI")  # offset, length
_END = struct.Struct("<Q16s")  # state size, xxh3-128 of the state
TAG_DATA, TAG_END = 1, 2
HEADER_BYTES = _HDR.size
DATA_OVERHEAD = _TAG.size + _DATA.size
END_BYTES = _TAG.size + _END.size
MAX_RECORD = 16 << 20

# The model id each stream header carries, so a destination refuses the
# state of another model. 0: a device of no sample model.
MODEL_IDS: dict[str, int] = {"fixed": 1, "nic": 2, "opaque": 3, "gpu": 4, "dma": 5}
_MODEL_NAMES = {v: k for k, v in MODEL_IDS.items()}


def state_hash(buf: np.ndarray) -> bytes:
    """xxh3-128 of a whole buffer, as guest memory: what validating a whole
    state at once costs (the stream's END record carries a cell root instead)."""
    return digest_bytes(buf).to_bytes(16, "little")


def header(model: str) -> bytes:
    return _HDR.pack(MAGIC, MODEL_IDS.get(model, 0))


def data_record(offset: int, payload: bytes) -> bytes:
    return _TAG.pack(TAG_DATA) + _DATA.pack(offset, len(payload)) + payload


def end_record(size: int, digest: bytes) -> bytes:
    return _TAG.pack(TAG_END) + _END.pack(size, digest)


class StreamDecoder:
    """Decodes a stream written in pieces into a staging copy of the state.

    ``capacity`` is the destination device's state bound: no record may reach
    past it, so a hostile stream cannot make the decoder buffer more.
    """

    def __init__(
        self, name: str, model: str, capacity: int, staging: np.ndarray | None = None
    ) -> None:
        self._name = name
        self._model = model
        self._capacity = capacity
        self._buf = bytearray()
        # ``staging``: a zeroed buffer of ``capacity`` bytes to decode into.
        if staging is None:
            staging = np.zeros(capacity, dtype=np.uint8)
        if staging.shape != (capacity,):
            raise ValueError(f"a staging buffer of {capacity} bytes, not {staging.shape}")
        self.staging = staging
        self.cells = CellDigest(capacity)
        self._header = False
        self._whole_state_digest = False  # a version 1 stream
        self._end: tuple[int, bytes] | None = None

    def _fail(self, why: str) -> None:
        raise DeviceStreamError(f"{self._name}: invalid migration stream: {why}")

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Decode every whole record in ``data`` plus what was left over."""
        self._buf += data
        buf = self._buf
        pos = 0
        if not self._header:
            if len(buf) < HEADER_BYTES:
                return
            self._check_header(buf)
            pos = HEADER_BYTES
        while pos < len(buf):
            if self._end is not None:
                self._fail("data after the END record")
            used = self._record(buf, pos)
            if not used:
                break
            pos += used
        del buf[:pos]

    def _check_header(self, buf: bytearray) -> None:
        magic, model_id = _HDR.unpack_from(buf)
        if magic not in (MAGIC, MAGIC_V1):
            self._fail("bad magic")
        self._whole_state_digest = magic == MAGIC_V1
        if model_id != MODEL_IDS.get(self._model, 0):
            src = _MODEL_NAMES.get(model_id, f"model {model_id}")
            self._fail(f"stream is from a {src!r} device, this is a {self._model!r} device")
        self._header = True

    def _record(self, buf: bytearray, pos: int) -> int:
        """Decode the record at ``pos``; its length, or 0 when it is incomplete."""
        tag = buf[pos]
        if tag == TAG_DATA:
            if len(buf) - pos < DATA_OVERHEAD:
                return 0
            off, length = _DATA.unpack_from(buf, pos + 1)
            if length > MAX_RECORD or off + length > self._capacity:
                self._fail(
                    f"record [{off}, {off + length}) exceeds the device state bound "
                    f"{self._capacity}"
                )
            if len(buf) - pos < DATA_OVERHEAD + length:
                return 0
            start = pos + DATA_OVERHEAD
            self.staging[off : off + length] = np.frombuffer(buf, np.uint8, length, start)
            self.cells.rehash_whole(self.staging, off, length)
            return DATA_OVERHEAD + length
        if tag == TAG_END:
            if len(buf) - pos < END_BYTES:
                return 0
            size, digest = _END.unpack_from(buf, pos + 1)
            if not 0 < size <= self._capacity:
                self._fail(f"state size {size} outside 1..{self._capacity}")
            self._end = (size, digest)
            return END_BYTES
        self._fail(f"unknown record tag {tag}")
        return 0

    def finish(self) -> tuple[int, int]:
        """Check the whole stream arrived and matches its digest; the state
        size and that digest (the cell root of the staged state)."""
        if self._buf or not self._header:
            self._fail("truncated stream")
        if self._end is None:
            self._fail("missing END record")
        assert self._end is not None
        size, digest = self._end
        root = self.cells.root(self.staging, size)
        expected = (
            state_hash(self.staging[:size])
            if self._whole_state_digest
            else root.to_bytes(16, "little")
        )
        if expected != digest:
            self._fail("state digest mismatch (corrupt data)")
        return size, root
