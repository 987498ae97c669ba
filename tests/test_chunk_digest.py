"""The order-independent memory digest: the destination's running root
equals the source's full read after real transfers, a missed page is caught,
and bad input is refused."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from migratekit import migrate_loopback
from streamkit import WritingGuest

import mig

MIB = 1 << 20
CAPS = mig.capabilities()


def _fill(memory: mig.GuestMemory, seed: int) -> None:
    """Random first half, zero second half (the holes stay holes)."""
    pages = memory.array.reshape(memory.num_pages, memory.page_size)
    half = memory.num_pages // 2
    rng = np.random.default_rng(seed)
    pages[:half] = rng.integers(0, 256, size=(half, memory.page_size), dtype=np.uint8)


def _receive(dst: mig.GuestMemory) -> tuple[mig.Listener, dict]:
    """A listener on loopback that accepts into `dst` in the background."""
    listener = mig.Listener("tcp:127.0.0.1:0")
    box: dict = {}

    def accept() -> None:
        try:
            box["receiver"] = listener.accept(dst, 20.0)
        except BaseException as e:  # reported by the test
            box["error"] = e

    box["thread"] = threading.Thread(target=accept)
    box["thread"].start()
    return listener, box


def _receiver(box: dict) -> mig.Receiver:
    box["thread"].join()
    if "error" in box:
        raise box["error"]
    return box["receiver"]


def test_digest_is_the_chunk_root_and_does_not_depend_on_threads() -> None:
    mem = mig.GuestMemory(8 * MIB + mig.GuestMemory(4096).page_size)  # a partial chunk
    _fill(mem, 1)
    roots = {mem.digest(threads=t) for t in (1, 2, 3)}
    assert roots == {mig.digest_frozen(mem, threads=1)}
    assert mem.digest() != mem.digest(0, mem.num_pages)  # a range is plain xxh3
    assert mig.ChunkDigest(mem).root() == mem.digest()


def test_order_of_writes_does_not_change_the_root() -> None:
    a, b = mig.GuestMemory(4 * MIB), mig.GuestMemory(4 * MIB)
    da, db = mig.ChunkDigest(a), mig.ChunkDigest(b)
    ps, n = a.page_size, a.num_pages
    rng = np.random.default_rng(5)
    pages = rng.choice(n, size=200, replace=False)
    content = {int(p): bytes(rng.integers(1, 256, size=ps, dtype=np.uint8)) for p in pages}
    for i, p in enumerate(pages):
        a.write(int(p) * ps, content[int(p)])
        da.mark_written(int(p))
        if i % 50 == 0:
            da.root()  # hashed in between: later writes mark it stale again
    for p in sorted(content, reverse=True):
        b.write(p * ps, content[p])
        db.mark_written(p)
    assert da.root() == db.root() == a.digest() == b.digest()
    a.write(int(pages[0]) * ps, b"\x00")
    da.mark_written(int(pages[0]))
    assert da.root() != db.root()


def test_a_write_without_mark_written_is_caught_by_the_full_read() -> None:
    mem = mig.GuestMemory(4 * MIB)
    d = mig.ChunkDigest(mem)
    mem.write(10 * mem.page_size, b"\x01" * 100)
    d.mark_written(10)
    assert d.root() == mem.digest()
    mem.write(10 * mem.page_size + 5, b"\x02")  # missed
    assert d.root() != mem.digest()


def test_bad_input_is_refused() -> None:
    mem = mig.GuestMemory(1 * MIB)
    d = mig.ChunkDigest(mem)
    root = d.root()
    for first, count in [(mem.num_pages, 1), (mem.num_pages - 1, 2), (0, 2**64 - 1)]:
        with pytest.raises(ValueError, match="outside guest memory"):
            d.mark_written(first, count)
    assert d.stale_chunks == 0 and d.root() == root
    with pytest.raises(ValueError, match="power of two"):
        mig.ChunkDigest(mem, chunk_bytes=3 * mem.page_size)
    with pytest.raises(ValueError, match="power of two"):
        mig.digest_frozen(mem, chunk_bytes=4 * MIB)
    with pytest.raises(ValueError, match="threads"):
        mem.digest(threads=0)
    with pytest.raises(ValueError, match="threads"):
        mem.digest(0, 1, threads=2)
    with pytest.raises(ValueError, match="duty"):
        d.start_rehasher(duty=0)


def test_the_rehasher_leaves_root_nothing_to_do() -> None:
    mem = mig.GuestMemory(8 * MIB)
    _fill(mem, 2)
    d = mig.ChunkDigest(mem)  # the data half starts stale
    assert d.stale_chunks == d.chunks // 2
    d.start_rehasher(period=0.005, duty=1.0)
    deadline = time.monotonic() + 30
    while d.stale_chunks and time.monotonic() < deadline:
        time.sleep(0.01)
    d.stop_rehasher()
    timed = d.root_timed()
    assert timed["rehashed-chunks"] == 0 and timed["root"] == mem.digest()


def test_receiver_root_equals_the_source_after_a_transfer_with_a_writing_guest() -> None:
    src, dst = mig.GuestMemory(16 * MIB), mig.GuestMemory(16 * MIB)
    _fill(src, 3)
    listener, box = _receive(dst)
    guest = WritingGuest(src).start()
    with mig.Sender(src, listener.uri, migration_id=9, channels=2) as sender:
        sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
        sender.sync(0)
        for generation in range(1, 4):
            time.sleep(0.05)
            sender.send_pages(guest.harvest(), generation)
            sender.sync(generation)
        guest.pause()
        sender.send_pages(guest.harvest(), 4)
        sender.finish(src.digest())
        receiver = _receiver(box)
        end = receiver.wait_end(20.0)
    assert guest.writes > 0
    assert end["digest"] == end["source-digest"] == src.digest()
    assert end["digest"] == mig.digest_frozen(dst, threads=1) == receiver.memory_root()
    assert receiver.stats()["stale-chunks"] == 0


def test_a_page_the_source_missed_is_caught_at_the_end() -> None:
    src, dst = mig.GuestMemory(8 * MIB), mig.GuestMemory(8 * MIB)
    _fill(src, 4)
    for verify in (True, False):
        listener, box = _receive(dst)
        with mig.Sender(src, listener.uri, migration_id=10, channels=2) as sender:
            sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
            sender.sync(0)
            # Written after its last send and never sent again: missed.
            src.write(3 * src.page_size + 7, bytes([0xA0 + verify]))
            sender.finish(src.digest())
            receiver = _receiver(box)
            if verify:
                with pytest.raises(mig.ProtocolError, match="memory digest mismatch"):
                    receiver.wait_end(20.0)
            else:
                end = receiver.wait_end(20.0, verify=False)
                assert end["source-digest"] == src.digest() != end["digest"]
                assert end["digest"] == dst.digest()


@pytest.mark.skipif(
    not CAPS["uffd"]["available"],
    reason=f"host lacks the uffd capability: {CAPS['uffd']['reason']}",
)
def test_loopback_migration_with_a_writing_workload_verifies_the_chunk_root() -> None:
    src, dst = mig.GuestMemory(32 * MIB), mig.GuestMemory(32 * MIB)
    src.array[:: src.page_size] = 7
    q, d, _ = migrate_loopback(src, dst, "uniform:wss=8MiB,rate=3000")
    assert q["status"] == "completed" and d["status"] == "completed" and d["verified"]
    root = format(mig.digest_frozen(src, threads=1), "032x")
    assert d["memory-digest"] == root == format(mig.ChunkDigest(dst).root(), "032x")
