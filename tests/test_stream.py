"""Sender → Listener/Receiver end to end over tcp, unix and file, with the
guest writing memory during the transfer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from streamkit import WritingGuest

import mig

SIZE = 16 << 20


def fill(memory: mig.GuestMemory, seed: int = 3) -> None:
    """Half random pages, a quarter compressible pages, the rest zero."""
    pages = memory.array.reshape(memory.num_pages, memory.page_size)
    rng = np.random.default_rng(seed)
    n = memory.num_pages
    pages[: n // 2] = rng.integers(0, 256, size=(n // 2, memory.page_size), dtype=np.uint8)
    pages[n // 2 : 3 * n // 4] = np.arange(memory.page_size, dtype=np.uint8) % 7


def uri_for(kind: str, tmp_path: Path) -> str:
    return {
        "tcp": "tcp:127.0.0.1:0",
        "unix": f"unix:{tmp_path}/mig.sock",
        "file": f"file:{tmp_path}/snapshot.mig",
    }[kind]


class Destination:
    """Accepts in a background thread (sockets) or after the source is done
    (a file snapshot is read once it is complete)."""

    def __init__(self, uri: str, memory: mig.GuestMemory) -> None:
        self.listener = mig.Listener(uri)
        self.memory = memory
        self.receiver: mig.Receiver | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.accept)
        if not uri.startswith("file:"):
            self.thread.start()

    def accept(self) -> None:
        try:
            self.receiver = self.listener.accept(self.memory, 20.0)
        except BaseException as e:  # reported by get()
            self.error = e

    def get(self) -> mig.Receiver:
        if self.thread.is_alive() or self.listener.uri.startswith("file:"):
            if not self.thread.ident:
                self.thread.start()
            self.thread.join()
        if self.error:
            raise self.error
        assert self.receiver is not None
        return self.receiver


@pytest.mark.parametrize("kind", ["tcp", "unix", "file"])
def test_live_transfer_is_byte_exact(kind: str, tmp_path: Path) -> None:
    src = mig.GuestMemory(SIZE)
    fill(src)
    dst = mig.GuestMemory(SIZE)
    dest = Destination(uri_for(kind, tmp_path), dst)
    guest = WritingGuest(src).start()
    with mig.Sender(src, dest.listener.uri, migration_id=0xC0FFEE, channels=3) as sender:
        sent = sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
        sender.sync(0)
        generation = 0
        for generation in range(1, 4):
            time.sleep(0.05)
            sent += sender.send_pages(guest.harvest(), generation)
            sender.sync(generation)
        guest.pause()
        generation += 1
        sender.send_pages(guest.harvest(), generation)
        sender.sync(generation)
        sender.send_device_state(1, 0, b"\x01" * 1000, False)
        sender.send_device_state(1, 1, b"\x02" * 10, True)
        sender.control_send(b'{"event": "complete"}')
        sender.finish(src.digest())
        stats = sender.stats()
        receiver = dest.get()
        end = receiver.wait_end(20.0)
    assert guest.writes > 0
    assert end["digest"] == src.digest() == dst.digest()
    assert receiver.control_recv(5.0) == b'{"event": "complete"}'
    records = receiver.device_records()
    assert [(r[0], r[1], len(r[2]), r[3]) for r in records] == [
        (1, 0, 1000, False),
        (1, 1, 10, True),
    ]
    # The guest dirties some zero pages before the first pass reads them.
    assert stats["zero-pages"] > 0
    assert stats["normal"] >= src.num_pages // 2
    assert stats["normal"] + stats["zero-pages"] >= src.num_pages
    assert len(stats["channel-packets"]) == 3 and all(p > 0 for p in stats["channel-packets"])
    assert stats["transferred"] >= sent
    # Zero pages cost an offset, not a page.
    assert stats["transferred"] < stats["normal-bytes"] + stats["zero-pages"] * 64 + (1 << 20)


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_compression_roundtrip_and_saves_bytes(compression: str) -> None:
    src = mig.GuestMemory(SIZE)
    fill(src)
    dst = mig.GuestMemory(SIZE)
    dest = Destination("tcp:127.0.0.1:0", dst)
    with mig.Sender(
        src, dest.listener.uri, migration_id=5, channels=2, compression=compression
    ) as sender:
        sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 1)
        sender.finish(src.digest())
        stats = sender.stats()
        dest.get().wait_end(20.0)
    assert dst.digest() == src.digest()
    assert stats["compression"] == compression
    # The compressible quarter shrinks; random pages are sent raw.
    assert stats["payload-bytes"] < stats["normal-bytes"] - SIZE // 8


def test_file_snapshot_refuses_compression(tmp_path: Path) -> None:
    mem = mig.GuestMemory(1 << 20)
    with pytest.raises(mig.UnsupportedError, match="compress"):
        mig.Sender(mem, f"file:{tmp_path}/s", migration_id=1, compression="zstd")


def test_file_snapshot_overwrites_pages_in_place(tmp_path: Path) -> None:
    src = mig.GuestMemory(SIZE)
    fill(src)
    path = tmp_path / "snap"
    with mig.Sender(src, f"file:{path}", migration_id=1, channels=2) as sender:
        sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
        sender.sync(0)
        # A page that turns from data to zero must read back as zero.
        src.array[: src.page_size * 8] = 0
        src.array[SIZE - src.page_size :] = 9
        changed = list(range(8)) + [src.num_pages - 1]
        sender.send_pages(mig.DirtyBitmap.from_indices(changed, src.num_pages), 1)
        sender.finish(src.digest())
    # Fixed offsets: rewriting pages does not grow the file.
    assert path.stat().st_size < SIZE + (2 << 20)
    dst = mig.GuestMemory(SIZE)
    dst.array[:] = 0xEE  # restore must also clear pages absent from the file
    receiver = mig.Listener(f"file:{path}").accept(dst, 5.0)
    assert receiver.wait_end(20.0)["digest"] == src.digest()
    with pytest.raises(mig.UnsupportedError):
        receiver.control_send(b"x")


def test_generation_rules_are_enforced_by_the_sender() -> None:
    src = mig.GuestMemory(1 << 20)
    dst = mig.GuestMemory(1 << 20)
    dest = Destination("tcp:127.0.0.1:0", dst)
    with mig.Sender(src, dest.listener.uri, migration_id=9, channels=2) as sender:
        bm = mig.DirtyBitmap.from_indices([1, 2, 3], src.num_pages)
        sender.send_pages(bm, 4)
        with pytest.raises(ValueError, match="already sent in generation 4"):
            sender.send_pages(mig.DirtyBitmap.from_indices([3], src.num_pages), 4)
        with pytest.raises(ValueError, match="without sync"):
            sender.send_pages(mig.DirtyBitmap.from_indices([9], src.num_pages), 5)
        with pytest.raises(ValueError, match="backwards"):
            sender.sync(3)
        sender.sync(4)
        with pytest.raises(ValueError, match="closed by sync"):
            sender.send_pages(bm, 4)
        sender.send_pages(bm, 5)
        with pytest.raises(ValueError, match="bitmap covers"):
            sender.send_pages(mig.DirtyBitmap(3), 5)
        sender.finish(src.digest())
        dest.get().wait_end(10.0)


def test_control_channel_both_ways() -> None:
    dst = mig.GuestMemory(1 << 20)
    dest = Destination("tcp:127.0.0.1:0", dst)
    src = mig.GuestMemory(1 << 20)
    with mig.Sender(src, dest.listener.uri, migration_id="12345678-1234-5678-1234-567812345678"):
        pass
    receiver = dest.get()
    assert receiver.migration_id == 0x12345678123456781234567812345678
    dest2 = Destination("tcp:127.0.0.1:0", dst)
    with mig.Sender(src, dest2.listener.uri, migration_id=b"\x01" * 16) as sender:
        r = dest2.get()
        assert sender.control_recv(0.05) is None
        r.control_send(b"switchover-ack")
        assert sender.control_recv(5.0) == b"switchover-ack"
        sender.control_send(b"x" * 100_000)
        assert r.control_recv(5.0) == b"x" * 100_000
        with pytest.raises(ValueError, match="exceeds"):
            sender.control_send(b"x" * (2 << 20))


def test_max_bandwidth_is_enforced_and_changeable() -> None:
    src = mig.GuestMemory(8 << 20)
    fill(src)
    dst = mig.GuestMemory(8 << 20)
    dest = Destination("tcp:127.0.0.1:0", dst)
    rate = 16 << 20
    with mig.Sender(
        src, dest.listener.uri, migration_id=3, channels=2, max_bandwidth=rate
    ) as sender:
        first = mig.DirtyBitmap(src.num_pages)
        first.set_range(0, src.num_pages // 2)  # 4 MiB of random pages
        t0 = time.perf_counter()
        sent = sender.send_pages(first, 0)
        limited = time.perf_counter() - t0
        sender.sync(0)
        assert sender.stats()["max-bandwidth"] == rate
        sender.set_max_bandwidth(0)
        rest = mig.DirtyBitmap(src.num_pages)
        rest.set_range(src.num_pages // 2, src.num_pages // 2)
        sender.send_pages(rest, 1)
        sender.finish(src.digest())
        dest.get().wait_end(10.0)
    # 4 MiB at 16 MiB/s with a 50 ms burst allowance.
    assert limited >= sent / rate - 0.1
    assert dst.digest() == src.digest()


def test_stalled_destination_is_an_error_not_a_hang() -> None:
    # A listener that never accepts: the kernel queues the connections and
    # the socket buffers fill, then the send times out.
    listener = mig.Listener("tcp:127.0.0.1:0")
    src = mig.GuestMemory(64 << 20)
    fill(src)
    sender = mig.Sender(src, listener.uri, migration_id=1, channels=1, io_timeout=0.5)
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"channel 0, packet \d+.*stalled"):
        sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ValueError, match="already failed"):
        sender.sync(0)
    sender.abort()
    listener.close()


def test_accept_times_out_without_a_source() -> None:
    listener = mig.Listener("tcp:127.0.0.1:0")
    with pytest.raises(TimeoutError, match="control channel missing"):
        listener.accept(mig.GuestMemory(1 << 20), 0.2)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    mem = mig.GuestMemory(1 << 20)
    with pytest.raises(ValueError, match="unsupported migration URI"):
        mig.Sender(mem, "rdma:x", migration_id=1)
    with pytest.raises(ValueError, match="compression"):
        mig.Sender(mem, f"file:{tmp_path}/x", migration_id=1, compression="zlib")
    with pytest.raises(ValueError, match="channels"):
        mig.Sender(mem, f"file:{tmp_path}/x", migration_id=1, channels=0)
    with pytest.raises(ValueError, match="packet_pages"):
        mig.Sender(mem, f"file:{tmp_path}/x", migration_id=1, packet_pages=5000)
    with pytest.raises(ValueError, match="migration_id"):
        mig.Sender(mem, f"file:{tmp_path}/x", migration_id="nope")
    with pytest.raises(ConnectionRefusedError):
        mig.Sender(mem, "tcp:127.0.0.1:1", migration_id=1, connect_timeout=0.1)


def test_device_state_is_capped_and_back_pressured() -> None:
    """Undrained device state never exceeds device_buffer: the channel waits
    for device_records() to make room, and fails if nobody drains."""
    mem = mig.GuestMemory(1 << 20)
    listener = mig.Listener("tcp:127.0.0.1:0")
    got: dict[str, mig.Receiver] = {}
    t = threading.Thread(
        target=lambda: got.setdefault(
            "r", listener.accept(mem, 10.0, io_timeout=5.0, device_buffer=100_000)
        )
    )
    t.start()
    chunk = b"d" * 40_000
    with mig.Sender(mem, listener.uri, migration_id=4, channels=1) as sender:
        t.join()
        receiver = got["r"]

        def send_all() -> None:
            for seq in range(5):
                sender.send_device_state(2, seq, chunk, seq == 4)

        feeder = threading.Thread(target=send_all)
        feeder.start()
        time.sleep(0.5)
        # Two chunks fit in 100 kB; the third waits.
        assert receiver.stats()["device-bytes"] == 80_000
        drained = []
        while len(drained) < 5:
            drained += receiver.device_records()
            time.sleep(0.05)
        feeder.join()
        assert [r[1] for r in drained] == [0, 1, 2, 3, 4] and drained[-1][3]
        with pytest.raises(ValueError, match="exceeds the limit"):
            sender.send_device_state(2, 5, b"x" * (9 << 20), True)
        sender.send_device_state(2, 6, b"x" * 200_000, True)  # larger than the cap
        sender.finish(mem.digest())
        with pytest.raises(mig.ProtocolError, match="channel 0, packet 5.*exceeds the buffer"):
            receiver.wait_end(10.0)


def test_pages_rewritten_during_a_live_send_are_resent_not_refused() -> None:
    # Uncompressed pages go out straight from guest memory, their CRC read
    # from the mapping just before the write. A vCPU rewriting a page in
    # between makes the payload differ from that CRC: the destination must
    # apply it (the tracker has the page dirty again, and the next
    # generation carries it), not refuse the stream.
    size = 4 << 20
    src = mig.GuestMemory(size)
    fill(src)
    dst = mig.GuestMemory(size)
    dest = Destination("tcp:127.0.0.1:0", dst)
    tracker = mig.DirtyTracker(src)
    tracker.sync()
    guest = mig.WorkloadGuest(src, vcpus=1, workload="uniform")
    try:
        with mig.Sender(src, dest.listener.uri, migration_id=0xFEED, channels=2) as sender:
            receiver = dest.get()
            todo = mig.DirtyBitmap.full(src.num_pages)
            generation = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                sender.send_pages(todo, generation)
                sender.sync(generation)
                generation += 1
                todo = tracker.sync()
                if receiver.stats()["live-rewritten"] > 0 and generation >= 3:
                    break
            guest.pause()
            sender.send_pages(todo | tracker.sync(), generation)
            sender.sync(generation)
            sender.finish(src.digest())
            end = receiver.wait_end(20.0)
    finally:
        guest.close()
        tracker.close()
    assert receiver.stats()["live-rewritten"] > 0, "no page was rewritten during a send"
    assert end["digest"] == src.digest() == dst.digest()


def test_zero_copy_send_is_byte_exact_and_reports_the_loopback_copy() -> None:
    src = mig.GuestMemory(SIZE)
    fill(src)
    dst = mig.GuestMemory(SIZE)
    dest = Destination("tcp:127.0.0.1:0", dst)
    with mig.Sender(
        src, dest.listener.uri, migration_id=0x2C, channels=2, zero_copy_send=True
    ) as sender:
        sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
        sender.sync(0)
        stats = sender.stats()
        sender.finish(src.digest())
        end = dest.get().wait_end(20.0)
    assert end["digest"] == src.digest() == dst.digest()
    # Completions were reaped at the sync; on loopback the kernel copied them.
    assert stats["zero-copy-completions"] > 0
    assert stats["zero-copy-copied"] == stats["zero-copy-completions"]


def test_zero_copy_send_refuses_what_copies_anyway(tmp_path: Path) -> None:
    mem = mig.GuestMemory(1 << 20)
    with pytest.raises(mig.UnsupportedError, match="compression or TLS"):
        mig.Sender(mem, "tcp:127.0.0.1:1", migration_id=1, compression="lz4", zero_copy_send=True)
    with pytest.raises(mig.UnsupportedError, match="tcp:"):
        mig.Sender(mem, f"unix:{tmp_path}/x.sock", migration_id=1, zero_copy_send=True)
