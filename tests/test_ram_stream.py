"""RamStream through Python stand-ins for the tracker and the link (the
simulator's path): the same pass and generation logic as the native one;
and a native pass into a receiver, whose digest it keeps current."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import mig
from mig._mig import RamStream

PAGES = 1000


class Tracker:
    def __init__(self) -> None:
        self.written = mig.DirtyBitmap(PAGES)
        self.last_sync_seconds = 0.25
        self.closed = False

    def sync(self) -> mig.DirtyBitmap:
        return self.written.take()

    def close(self) -> None:
        self.closed = True


class Link:
    def __init__(self) -> None:
        self.sent: list[tuple[int, list[int]]] = []
        self.syncs: list[int] = []
        self.fail = False

    def send_pages(self, bitmap: mig.DirtyBitmap, generation: int) -> int:
        if self.fail:
            raise OSError("link aborted")
        self.sent.append((generation, bitmap.indices().tolist()))
        return bitmap.count() * 10

    def sync(self, generation: int) -> None:
        self.syncs.append(generation)


def test_a_python_tracker_and_link_drive_the_same_passes() -> None:
    tracker, link = Tracker(), Link()
    stream = RamStream(PAGES, 4096, tracker)
    stream.sync()
    stream.start(link)
    assert stream.pending() == PAGES * 4096
    assert stream.iterate(320 * 4096) == 3200
    tracker.written.set_range(0, 5)
    new, count, cost = stream.sync()
    assert (count, cost, new.indices().tolist()) == (5, 0.25, [0, 1, 2, 3, 4])
    assert stream.generation == 1 and link.syncs == [0]
    sent, known, (count, _) = stream.complete(None)
    assert count == 0 and sent == known == (PAGES - 320 + 5) * 10
    assert link.syncs == [0, 1]
    pages = sorted(p for g, chunk in link.sent if g == 1 for p in chunk)
    assert pages == [0, 1, 2, 3, 4, *range(320, PAGES)]
    stats = stream.stats()
    assert stats["pages-sent"] == PAGES + 5 and stats["final-pages"] == PAGES - 320 + 5
    stream.close()
    assert tracker.closed


def test_a_link_error_comes_back_as_itself_and_loses_no_page() -> None:
    tracker, link = Tracker(), Link()
    stream = RamStream(PAGES, 4096, tracker)
    stream.sync()
    stream.start(link)
    link.fail = True
    with pytest.raises(OSError, match="link aborted"):
        stream.iterate(100 * 4096)
    assert stream.pending() == PAGES * 4096
    link.fail = False
    assert stream.iterate(128 * 4096) == 1280


def test_complete_over_budget_sends_nothing() -> None:
    tracker, link = Tracker(), Link()
    stream = RamStream(PAGES, 4096, tracker)
    stream.sync()
    stream.start(link)
    sent, known, _ = stream.complete(4096)
    assert sent is None and known == PAGES * 4096 and link.sent == []
    assert stream.pending() == PAGES * 4096


def test_a_dense_pass_leaves_no_chunk_stale_at_the_destination() -> None:
    """Spans end on multiples of 64 pages whatever the budget, so every
    packet of a dense pass holds whole 64 KiB digest chunks, which the
    receive threads hash as they land: nothing is left for the settle."""
    size = 16 << 20
    src, dst = mig.GuestMemory(size, "anon"), mig.GuestMemory(size, "anon")
    rng = np.random.default_rng(3)
    pages = src.array.reshape(src.num_pages, 4096)
    pages[::2] = rng.integers(0, 256, size=(src.num_pages // 2, 4096), dtype=np.uint8)
    listener = mig.Listener("tcp:127.0.0.1:0")
    got: dict[str, mig.Receiver] = {}
    accept = threading.Thread(target=lambda: got.setdefault("r", listener.accept(dst, 20.0)))
    accept.start()
    stream = RamStream(src.num_pages, 4096, mig.DirtyTracker(src, backend="soft"))
    stream.sync()
    with mig.Sender(src, listener.uri, migration_id=9, channels=2) as sender:
        stream.start(sender)
        while stream.iterate(1000 * 4096 + 123):  # a budget off every boundary
            pass
        stream.sync()  # the generation's barrier on both channels
        accept.join()
        receiver = got["r"]
        deadline = time.monotonic() + 20
        while receiver.stats()["syncs"] < 2:
            assert time.monotonic() < deadline, "the barrier did not land"
            time.sleep(0.01)
        assert receiver.stats()["stale-chunks"] == 0
        sender.finish(src.digest())
        assert receiver.wait_end(20.0)["digest"] == src.digest() == dst.digest()
