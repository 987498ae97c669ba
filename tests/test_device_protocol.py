"""A device that implements only the `MigrationDevice` seam migrates byte-exact.

`ImageDevice` holds its state as plain bytes, walks the kernel's arcs with
`mig.vfio.fsm` and has its own stream format: it shares no storage, session or
stream code with the sample devices, as a real ioctl-backed device would not.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from devlink import LoopbackLink

from mig.device_handler import DeviceHandler
from mig.vfio import (
    PRECOPY_STATES,
    DeviceError,
    DeviceStreamError,
    MigCap,
    MigrationDevice,
    MigState,
    NoData,
    PrecopyInfo,
)
from mig.vfio.fsm import ArcEffect, arc_effect, path

_FRAME = struct.Struct("<I")


class _Save:
    """Saving session: one length-prefixed image of the state per phase."""

    def __init__(self, dev: ImageDevice) -> None:
        self._dev = dev
        self._buf = b""
        self._queue_image()

    def _queue_image(self) -> None:
        self._buf += _FRAME.pack(len(self._dev.data)) + self._dev.data

    def stop_copy(self) -> None:
        self._buf = b""  # anything precopy left unread is replaced by the final image
        self._queue_image()

    def pending(self) -> int:
        return len(self._buf)

    def read(self, size: int = 1 << 20) -> bytes:
        if not self._buf:
            if self._dev.state in PRECOPY_STATES:
                raise NoData("nothing pending")
            return b""
        out, self._buf = self._buf[:size], self._buf[size:]
        return out


class _Resume:
    def __init__(self, capacity: int) -> None:
        self.buf = bytearray()
        self.capacity = capacity

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if len(self.buf) + len(data) > 2 * (self.capacity + _FRAME.size):
            raise DeviceStreamError("stream longer than two images")
        self.buf += data
        return len(data)

    def last_image(self) -> bytes:
        """The last complete image; the stream must end at a frame boundary."""
        pos, image = 0, None
        while pos < len(self.buf):
            if len(self.buf) - pos < _FRAME.size:
                raise DeviceStreamError("truncated frame header")
            (n,) = _FRAME.unpack_from(self.buf, pos)
            if n > self.capacity or pos + _FRAME.size + n > len(self.buf):
                raise DeviceStreamError("truncated or oversized frame")
            image = bytes(self.buf[pos + _FRAME.size : pos + _FRAME.size + n])
            pos += _FRAME.size + n
        if image is None:
            raise DeviceStreamError("no image")
        return image


class ImageDevice(MigrationDevice):
    """The protocol seam and nothing else."""

    model = "image"

    def __init__(self, name: str, caps: MigCap, data: bytes, capacity: int = 1 << 16) -> None:
        self.name, self.caps, self.capacity = name, caps, capacity
        self.data = data
        self._state = MigState.RUNNING
        self._save: _Save | None = None
        self._resume: _Resume | None = None

    @property
    def state(self) -> MigState:
        return self._state

    def set_state(self, target: MigState | int) -> _Save | _Resume | None:
        opened: _Save | _Resume | None = None
        for nxt in path(self._state, MigState(target), self.caps):
            effect = arc_effect(self._state, nxt)
            opened = None
            if effect in (ArcEffect.OPEN_PRECOPY, ArcEffect.OPEN_STOP_COPY):
                opened = self._save = _Save(self)
            elif effect is ArcEffect.ENTER_STOP_COPY:
                assert self._save is not None
                self._save.stop_copy()
            elif effect is ArcEffect.CLOSE_SAVE:
                self._save = None
            elif effect is ArcEffect.OPEN_RESUME:
                opened = self._resume = _Resume(self.capacity)
            elif effect is ArcEffect.FINISH_RESUME:
                assert self._resume is not None
                self.data, self._resume = self._resume.last_image(), None
            self._state = nxt
        return opened

    def precopy_info(self) -> PrecopyInfo:
        if self._state not in PRECOPY_STATES or self._save is None:
            raise DeviceError("precopy_info() only in PRE_COPY states")
        return PrecopyInfo(self._save.pending(), 0)

    def data_size(self) -> int:
        return self._save.pending() if self._save else _FRAME.size + len(self.data)

    def reset(self) -> None:
        self._save = self._resume = None
        self._state = MigState.RUNNING

    def state_digest(self) -> int:
        return int.from_bytes(hashlib.blake2b(self.data, digest_size=16).digest(), "little")


CAPS = {
    "precopy+data-size": MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY | MigCap.DATA_SIZE,
    "stop-copy-only": MigCap.STOP_COPY,
}


@pytest.mark.parametrize("caps", CAPS.values(), ids=CAPS.keys())
def test_a_protocol_only_device_migrates_byte_exact(caps: MigCap) -> None:
    src_dev = ImageDevice("img", caps, bytes(range(256)) * 40)
    dst_dev = ImageDevice("img", caps, b"")
    src, dst = DeviceHandler(src_dev, 3, buffer_size=1000), DeviceHandler(dst_dev, 3)
    link = LoopbackLink()
    dst.load_setup()
    src.setup(link)
    precopy = src.iterate(link, None)
    assert (precopy > 0) == bool(caps & MigCap.PRE_COPY)
    link.deliver({3: dst})
    # Switchover-ack: the precopy image is loaded (at once without PRE_COPY).
    assert dst.precopy_initial_loaded()
    src_dev.data = b"changed while running" + src_dev.data[21:]
    src.quiesce()
    assert src.complete(link) > len(src_dev.data)
    link.deliver({3: dst}, shuffle=5)
    dst.load_complete()
    assert dst_dev.state is MigState.STOP and src_dev.state is MigState.STOP
    assert dst_dev.data == src_dev.data
    assert dst_dev.state_digest() == src_dev.state_digest()
    dst.load_resume()
    assert dst_dev.state is MigState.RUNNING
    assert src.stats()["type"] == "image" and src.stats()["device-id"] == 3


def test_a_protocol_only_device_refuses_a_truncated_stream() -> None:
    caps = CAPS["precopy+data-size"]
    src_dev = ImageDevice("img", caps, b"x" * 5000)
    dst_dev = ImageDevice("img", caps, b"")
    src, dst = DeviceHandler(src_dev, 1, buffer_size=1000), DeviceHandler(dst_dev, 1)
    link = LoopbackLink()
    dst.load_setup()
    src.setup(link)
    src.quiesce()
    src.complete(link)
    link.records.pop(2)  # a chunk lost in the middle
    link.deliver({1: dst})
    with pytest.raises(DeviceStreamError, match="final chunk never arrived"):
        dst.load_complete()
    dst.load_abort()
    assert dst_dev.state is MigState.RUNNING and dst_dev.data == b""
