"""Test helpers: an independent Python encoder of the documented wire format
(docs/wire-format.md), used to feed hand-made and broken streams to the
receiver, and a simulated guest that writes memory and records what it wrote.
"""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np

import mig

_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


KIND_CONTROL, KIND_DATA = 0, 1


def stream_header(
    *,
    kind: int,
    page_size: int,
    memory_size: int,
    index: int = 0,
    count: int = 1,
    migration_id: int = 1,
    packet_pages: int = 128,
    magic: bytes = b"MIGS",
    version: int = 1,
) -> bytes:
    head = struct.pack(
        "<4sHBxIIQHH4x16s12x",
        magic,
        version,
        kind,
        page_size,
        packet_pages,
        memory_size,
        index,
        count,
        migration_id.to_bytes(16, "little"),
    )
    return head + struct.pack("<I", crc32c(head))


def record(
    tag: bytes,
    *,
    number: int,
    generation: int = 0,
    flags: int = 0,
    arg: int = 0,
    c0: int = 0,
    c1: int = 0,
    body: bytes = b"",
    body_len: int | None = None,
) -> bytes:
    n = len(body) if body_len is None else body_len
    head = struct.pack("<4sIQQQIII", tag, flags, number, generation, arg, c0, c1, n)
    return head + struct.pack("<I", crc32c(body, crc32c(head))) + body


def page_record(
    *, number: int, generation: int, normal: list[tuple[int, bytes]], zero: list[int] = ()
) -> bytes:
    offsets = b"".join(struct.pack("<Q", off) for off, _ in normal)
    offsets += b"".join(struct.pack("<Q", off) for off in zero)
    payload = b"".join(data for _, data in normal)
    return record(
        b"PAGE",
        number=number,
        generation=generation,
        c0=len(normal),
        c1=len(zero),
        body=offsets + payload,
    )


class RawSession:
    """A hand-driven source: one control and `channels` data sockets."""

    def __init__(
        self, listener: mig.Listener, memory: mig.GuestMemory, channels: int = 1, **kw: int
    ) -> None:
        host, port = listener.uri.removeprefix("tcp:").rsplit(":", 1)
        self.addr = (host, int(port))
        geo = dict(page_size=memory.page_size, memory_size=memory.size, count=channels, **kw)
        self.control = self.connect(stream_header(kind=KIND_CONTROL, **geo))
        self.data = [
            self.connect(stream_header(kind=KIND_DATA, index=i, **geo)) for i in range(channels)
        ]

    def connect(self, header: bytes) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=10)
        s.sendall(header)
        return s

    def close(self) -> None:
        for s in [self.control, *self.data]:
            s.close()


class WritingGuest:
    """Simulates a running guest: a thread writes random pages of `memory`
    through numpy and records every page it touched (a test-only dirty set).
    `harvest()` returns and clears that set, like a dirty tracker's sync."""

    def __init__(self, memory: mig.GuestMemory, seed: int = 7) -> None:
        self.memory = memory
        self.pages = memory.array.reshape(memory.num_pages, memory.page_size)
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()
        self.dirty: set[int] = set()
        self.stop = threading.Event()
        self.writes = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        n = self.memory.num_pages
        while not self.stop.is_set():
            idx = self.rng.integers(0, n, size=16)
            # Write, then record: every write is followed by a record and so
            # by a later harvest whose send reads the written bytes.
            self.pages[idx, :64] = self.rng.integers(1, 255, size=(16, 64), dtype=np.uint8)
            with self.lock:
                self.dirty.update(int(i) for i in idx)
            self.writes += 16

    def start(self) -> WritingGuest:
        self.thread.start()
        return self

    def pause(self) -> None:
        self.stop.set()
        self.thread.join()

    def harvest(self) -> mig.DirtyBitmap:
        with self.lock:
            pages, self.dirty = sorted(self.dirty), set()
        return mig.DirtyBitmap.from_indices(pages, self.memory.num_pages)
