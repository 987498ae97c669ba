"""Broken and hostile streams: each gets a clear error naming the channel and
packet, nothing is written to destination memory, nothing panics, and no
size from the stream drives an allocation."""

from __future__ import annotations

import gc
import os
import random
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from streamkit import (
    KIND_CONTROL,
    KIND_DATA,
    RawSession,
    page_record,
    record,
    stream_header,
)

import mig

SIZE = 1 << 20


def memory() -> mig.GuestMemory:
    mem = mig.GuestMemory(SIZE)
    mem.array[::4096] = 0x5A  # non-trivial content that must survive
    return mem


def run_raw(feed: Callable[[RawSession, int], None], channels: int = 1) -> tuple[str, bool]:
    """Feeds a hand-made session; returns the receiver's error text and
    whether destination memory stayed unchanged."""
    listener = mig.Listener("tcp:127.0.0.1:0")
    dst = memory()
    before = dst.digest()
    session = RawSession(listener, dst, channels=channels)
    receiver = listener.accept(dst, 5.0, io_timeout=2.0)
    feed(session, dst.page_size)
    with pytest.raises(mig.MigError) as info:
        receiver.wait_end(10.0)
    session.close()
    return str(info.value), dst.digest() == before


def good_page(ps: int, number: int = 0, page: int = 1) -> bytes:
    return page_record(number=number, generation=1, normal=[(page * ps, b"\x11" * ps)])


def test_corrupt_crc() -> None:
    def feed(s: RawSession, ps: int) -> None:
        rec = bytearray(good_page(ps))
        rec[-1] ^= 0xFF  # last payload byte
        s.data[0].sendall(rec)

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and "CRC mismatch" in msg
    assert unchanged


def test_out_of_range_offset() -> None:
    def feed(s: RawSession, ps: int) -> None:
        s.data[0].sendall(page_record(number=0, generation=1, normal=[(SIZE, b"\x11" * ps)]))

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and "not a page inside memory" in msg
    assert unchanged


def test_unaligned_offset() -> None:
    def feed(s: RawSession, ps: int) -> None:
        s.data[0].sendall(page_record(number=0, generation=1, normal=[(ps + 8, b"\x11" * ps)]))

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and "offset" in msg
    assert unchanged


def test_truncated_stream() -> None:
    def feed(s: RawSession, ps: int) -> None:
        rec = good_page(ps)
        s.data[0].sendall(rec[: len(rec) // 2])
        s.data[0].shutdown(socket.SHUT_WR)

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and "truncated stream" in msg
    assert unchanged


def test_truncated_after_a_good_packet_names_the_next_packet() -> None:
    def feed(s: RawSession, ps: int) -> None:
        s.data[0].sendall(good_page(ps) + good_page(ps, number=1, page=2)[:30])
        s.data[0].shutdown(socket.SHUT_WR)

    msg, _ = run_raw(feed)
    assert "channel 0, packet 1" in msg and "truncated stream" in msg


def test_oversized_page_count() -> None:
    def feed(s: RawSession, ps: int) -> None:
        # Claims 2**31 pages and a 4 GiB body; refused from the header alone.
        s.data[0].sendall(record(b"PAGE", number=0, c0=1 << 31, body_len=0xFFFFFFFF))

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and "outside [1, 128]" in msg
    assert unchanged


def test_oversized_device_chunk() -> None:
    def feed(s: RawSession, ps: int) -> None:
        s.data[0].sendall(record(b"DEVS", number=0, c0=3, body_len=0xFFFFFFF0))

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and "exceeds the limit" in msg
    assert unchanged


def test_payload_size_must_match_the_page_count() -> None:
    def feed(s: RawSession, ps: int) -> None:
        body = struct.pack("<Q", 0) + b"\x11" * (ps - 1)
        s.data[0].sendall(record(b"PAGE", number=0, generation=1, c0=1, body=body))

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and "does not fit" in msg
    assert unchanged


def test_bad_compressed_payload() -> None:
    def feed(s: RawSession, ps: int) -> None:
        body = struct.pack("<Q", 0) + b"\xff" * 100  # not a zstd frame
        s.data[0].sendall(record(b"PAGE", number=0, generation=1, flags=1, c0=1, body=body))

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and "zstd payload" in msg
    assert unchanged


def test_record_numbers_must_not_skip() -> None:
    def feed(s: RawSession, ps: int) -> None:
        s.data[0].sendall(good_page(ps, number=5))

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and "record number 5" in msg
    assert unchanged


def test_unknown_record_tag() -> None:
    def feed(s: RawSession, ps: int) -> None:
        s.data[0].sendall(record(b"EVIL", number=0))

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and "unknown record tag" in msg
    assert unchanged


def test_error_on_second_channel_names_it() -> None:
    def feed(s: RawSession, ps: int) -> None:
        rec = bytearray(good_page(ps, page=3))
        rec[20] ^= 1  # generation field, covered by the CRC
        s.data[1].sendall(rec)

    msg, unchanged = run_raw(feed, channels=2)
    assert "channel 1, packet 0" in msg and "CRC mismatch" in msg
    assert unchanged


def test_digest_mismatch_is_reported() -> None:
    def feed(s: RawSession, ps: int) -> None:
        s.data[0].sendall(record(b"END!", number=0, body=b"\x00" * 16))

    msg, _ = run_raw(feed)
    assert "memory digest mismatch" in msg


def accept_error(headers: list[tuple[int, bytes]]) -> str:
    """Connects channels with the given stream headers; returns the error
    of an accept that cannot form a session."""
    listener = mig.Listener("tcp:127.0.0.1:0")
    host, port = listener.uri.removeprefix("tcp:").rsplit(":", 1)
    socks = []
    for _, h in headers:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(h)
        socks.append(s)
    dst = memory()
    before = dst.digest()
    with pytest.raises(TimeoutError) as info:
        listener.accept(dst, 0.5)
    assert dst.digest() == before
    for s in socks:
        s.close()
    return str(info.value)


def geometry(**kw: int) -> dict[str, int]:
    return dict(page_size=4096, memory_size=SIZE, **kw)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (dict(magic=b"QEVM"), "bad magic"),
        (dict(version=2), "unsupported version 2"),
        (dict(packet_pages=1 << 20), "packet pages"),
        (dict(index=3, count=2), "channel index"),
        (dict(count=1000), "channel count"),
    ],
)
def test_bad_stream_headers_are_refused(change: dict, expected: str) -> None:
    msg = accept_error([(0, stream_header(kind=KIND_CONTROL, **geometry(**change)))])
    assert "control channel missing" in msg and expected in msg


def test_wrong_migration_id_is_refused() -> None:
    msg = accept_error(
        [
            (0, stream_header(kind=KIND_CONTROL, migration_id=1, **geometry(count=1))),
            (1, stream_header(kind=KIND_DATA, migration_id=2, **geometry(count=1))),
        ]
    )
    assert "0/1 data channels" in msg
    assert "data channel 0 of migration " + f"{2:032x}" in msg


def test_foreign_channels_do_not_disturb_a_session() -> None:
    """A stray source with another migration id connects to the same
    listener; its channels are refused and the real session completes."""
    listener = mig.Listener("tcp:127.0.0.1:0")
    src = mig.GuestMemory(SIZE)
    src.array[::7] = 3
    dst = mig.GuestMemory(SIZE)
    out: dict[str, mig.Receiver] = {}
    t = threading.Thread(target=lambda: out.setdefault("r", listener.accept(dst, 10.0)))
    t.start()
    sender = mig.Sender(src, listener.uri, migration_id=1, channels=2)
    t.join()
    stray = mig.Sender(src, listener.uri, migration_id=2, channels=1, io_timeout=1.0)
    sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
    sender.finish(src.digest())
    assert out["r"].wait_end(10.0)["digest"] == src.digest()
    stray.abort()
    sender.close()


def test_memory_geometry_mismatch() -> None:
    listener = mig.Listener("tcp:127.0.0.1:0")
    src = mig.GuestMemory(2 * SIZE)
    sender = mig.Sender(src, listener.uri, migration_id=1, channels=1)
    dst = memory()
    with pytest.raises(mig.ProtocolError, match=f"source has {2 * SIZE} bytes"):
        listener.accept(dst, 5.0)
    sender.abort()


def snapshot(tmp_path: Path) -> tuple[Path, mig.GuestMemory]:
    src = mig.GuestMemory(SIZE)
    src.array[: SIZE // 2] = 7
    path = tmp_path / "snap"
    with mig.Sender(src, f"file:{path}", migration_id=1) as s:
        s.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
        s.send_device_state(3, 0, b"abc", True)
        s.finish(src.digest())
    return path, src


def restore_error(path: Path) -> tuple[str, bool]:
    dst = memory()
    before = dst.digest()
    with pytest.raises(mig.MigError) as info:
        mig.Listener(f"file:{path}").accept(dst, 1.0).wait_end(10.0)
    return str(info.value), dst.digest() == before


def test_snapshot_roundtrip_reference(tmp_path: Path) -> None:
    path, src = snapshot(tmp_path)
    dst = memory()
    r = mig.Listener(f"file:{path}").accept(dst, 1.0)
    assert r.wait_end(10.0)["digest"] == src.digest()
    assert r.device_records() == [(3, 0, b"abc", True)]


def test_snapshot_bad_magic(tmp_path: Path) -> None:
    path, _ = snapshot(tmp_path)
    with path.open("r+b") as f:
        f.write(b"XXXX")
    msg, unchanged = restore_error(path)
    assert "bad magic" in msg and unchanged


def test_snapshot_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "torn"
    src = mig.GuestMemory(SIZE)
    s = mig.Sender(src, f"file:{path}", migration_id=1)
    s.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
    s.close()  # never finished
    msg, unchanged = restore_error(path)
    assert "incomplete" in msg and unchanged


def test_snapshot_truncated(tmp_path: Path) -> None:
    path, _ = snapshot(tmp_path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 10)
    msg, unchanged = restore_error(path)
    assert "truncated stream" in msg and unchanged


def test_snapshot_corrupt_bitmap(tmp_path: Path) -> None:
    path, _ = snapshot(tmp_path)
    with path.open("r+b") as f:
        f.seek(4096)
        f.write(b"\x00")
    msg, unchanged = restore_error(path)
    assert "presence bitmap: CRC mismatch" in msg and unchanged


def test_snapshot_corrupt_record_log(tmp_path: Path) -> None:
    path, _ = snapshot(tmp_path)
    with path.open("r+b") as f:
        f.seek(-20, 2)  # inside the end record
        f.write(b"\xff")
    msg, _ = restore_error(path)
    assert "channel 0, packet 1" in msg and "CRC mismatch" in msg


def test_snapshot_corrupt_page_fails_the_digest(tmp_path: Path) -> None:
    path, _ = snapshot(tmp_path)
    with path.open("r+b") as f:
        f.seek((1 << 20) + 4096 * 3 + 5)  # pages start at the first MiB
        f.write(b"\x00")
    msg, _ = restore_error(path)
    assert "memory digest mismatch" in msg


# ------------------------------------------------------------ hostile peers
def page_bytes(mem: mig.GuestMemory, page: int) -> bytes:
    ps = mem.page_size
    return mem.read(page * ps, ps)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_bytes_after_a_valid_header(seed: int) -> None:
    rng = random.Random(seed)

    def feed(s: RawSession, ps: int) -> None:
        s.data[0].sendall(rng.randbytes(rng.randrange(1, 64 << 10)))
        s.data[0].shutdown(socket.SHUT_WR)

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg
    assert unchanged


def test_random_bytes_instead_of_stream_headers() -> None:
    """Strangers that send noise (or nothing) never form a session."""
    rng = random.Random(5)
    listener = mig.Listener("tcp:127.0.0.1:0")
    host, port = listener.uri.removeprefix("tcp:").rsplit(":", 1)
    socks = []
    for n in (0, 1, 63, 64, 65, 4096, 100_000):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(rng.randbytes(n))
        s.shutdown(socket.SHUT_WR)
        socks.append(s)
    dst = memory()
    before = dst.digest()
    with pytest.raises(TimeoutError) as info:
        listener.accept(dst, 1.0, io_timeout=0.5)
    msg = str(info.value)
    assert "control channel missing" in msg
    assert msg.count("a new channel: ") == 7, msg
    assert "truncated stream: peer closed after 0 of 64 bytes" in msg
    assert dst.digest() == before
    for s in socks:
        s.close()


def test_replayed_packet_is_refused() -> None:
    """A packet recorded from this stream and sent again is refused by its
    record number; the original was applied, nothing else."""
    listener = mig.Listener("tcp:127.0.0.1:0")
    dst = memory()
    session = RawSession(listener, dst)
    receiver = listener.accept(dst, 5.0, io_timeout=2.0)
    ps = dst.page_size
    rec = good_page(ps, page=2)
    session.data[0].sendall(rec + rec)
    with pytest.raises(mig.ProtocolError, match="channel 0, packet 1: record number 0 where 1"):
        receiver.wait_end(10.0)
    assert page_bytes(dst, 2) == b"\x11" * ps
    expected = memory()
    expected.write(2 * ps, b"\x11" * ps)
    assert dst.digest() == expected.digest()
    session.close()


def test_packet_of_an_earlier_generation_replayed_after_its_sync() -> None:
    """Renumbered with a fresh CRC (anyone can compute a CRC), an old
    generation's packet is still refused once its sync has passed."""
    listener = mig.Listener("tcp:127.0.0.1:0")
    dst = memory()
    session = RawSession(listener, dst)
    receiver = listener.accept(dst, 5.0, io_timeout=2.0)
    ps = dst.page_size
    old = page_record(number=0, generation=1, normal=[(3 * ps, b"\x22" * ps)])
    new = page_record(number=2, generation=2, normal=[(3 * ps, b"\x33" * ps)])
    replay = page_record(number=3, generation=1, normal=[(3 * ps, b"\x22" * ps)])
    session.data[0].sendall(old + record(b"SYNC", number=1, generation=1) + new + replay)
    with pytest.raises(mig.ProtocolError, match="packet 3: generation 1 pages after sync"):
        receiver.wait_end(10.0)
    assert page_bytes(dst, 3) == b"\x33" * ps  # the newer copy stands
    session.close()


def test_stream_replayed_into_another_migration_is_refused() -> None:
    """Channels recorded from migration 1 replayed next to a control channel
    of migration 2: refused by id, the session never forms."""
    dst = memory()
    geo = dict(page_size=dst.page_size, memory_size=dst.size, count=1)
    recorded = stream_header(kind=KIND_DATA, migration_id=1, **geo) + good_page(dst.page_size)
    msg = accept_error(
        [
            (0, stream_header(kind=KIND_CONTROL, migration_id=2, **geo)),
            (1, recorded),
        ]
    )
    assert "data channel 0 of migration " + f"{1:032x}" in msg


@pytest.mark.parametrize(
    ("c0", "c1", "body_len", "expected"),
    [
        (0, 1 << 31, 0xFFFFFFFF, "outside [1, 128]"),
        (0xFFFFFFFF, 0xFFFFFFFF, 8, "outside [1, 128]"),
        (0, 0, 0, "outside [1, 128]"),
        (4, 0, 16, "cannot hold 4 offsets"),
        (1, 0, 0xFFFFFFFF, "does not fit"),
    ],
)
def test_oversized_or_inconsistent_counts(c0: int, c1: int, body_len: int, expected: str) -> None:
    def feed(s: RawSession, ps: int) -> None:
        s.data[0].sendall(record(b"PAGE", number=0, generation=1, c0=c0, c1=c1, body_len=body_len))

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and expected in msg
    assert unchanged


@pytest.mark.parametrize("offset", [SIZE, SIZE + 4096, 1 << 63, (1 << 64) - 4096])
@pytest.mark.parametrize("as_zero", [False, True])
def test_offsets_outside_memory(offset: int, as_zero: bool) -> None:
    def feed(s: RawSession, ps: int) -> None:
        good = (ps, b"\x11" * ps)  # a valid page in the same packet is not applied either
        if as_zero:
            rec = page_record(number=0, generation=1, normal=[good], zero=[offset])
        else:
            rec = page_record(number=0, generation=1, normal=[good, (offset, b"\x11" * ps)])
        s.data[0].sendall(rec)

    msg, unchanged = run_raw(feed)
    assert "channel 0, packet 0" in msg and "not a page inside memory" in msg
    assert unchanged


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_hostile_sessions_keep_memory_bounded() -> None:
    """Sessions whose channels claim huge bodies, stall mid-record or send
    noise: each fails, and the process's resident memory does not grow with
    what they claim or with their number."""
    rng = random.Random(9)
    mib = 1 << 20

    def hostile(s: RawSession, ps: int) -> None:
        claims = [
            record(b"PAGE", number=0, generation=1, c0=128, body_len=128 * (8 + ps)),
            record(b"DEVS", number=0, c0=3, body_len=8 * mib + 3),
            record(b"CTRL", number=0, body_len=1 << 20),
            rng.randbytes(4096),
        ]
        for sock, head in zip(s.data, claims, strict=True):
            sock.sendall(head + b"\x00" * 100_000)  # part of the claimed body
            sock.shutdown(socket.SHUT_WR)

    def one_round() -> None:
        listener = mig.Listener("tcp:127.0.0.1:0")
        dst = memory()
        before = dst.digest()
        session = RawSession(listener, dst, channels=4)
        receiver = listener.accept(dst, 5.0, io_timeout=2.0, device_buffer=16 * mib)
        hostile(session, dst.page_size)
        with pytest.raises(mig.ProtocolError):
            receiver.wait_end(10.0)
        receiver.abort()
        session.close()
        assert dst.digest() == before

    for _ in range(3):
        one_round()
    gc.collect()
    start = rss()
    for _ in range(15):
        one_round()
    gc.collect()
    grown = rss() - start
    # The sessions claimed 15 x (8 MiB + 1 MiB + 0.5 MiB + noise); what may
    # stay resident is the allocator's per-thread arenas keeping freed
    # buffers of one session's size (bounded by device_buffer + packets),
    # never an amount that grows with the claims or the session count.
    assert grown < 40 * mib, f"resident memory grew by {grown / mib:.1f} MiB"


@pytest.mark.parametrize("device_id", [-1, 1 << 32])
def test_device_id_outside_u32_is_refused_by_name(device_id: int, tmp_path: Path) -> None:
    src = mig.GuestMemory(SIZE)
    with mig.Sender(src, f"file:{tmp_path / 'snap'}", migration_id=1) as s:
        with pytest.raises(ValueError, match=r"device id must be in \[0, 4294967295\]"):
            s.send_device_state(device_id, 0, b"abc", True)
