"""RamStream through Python stand-ins for the tracker and the link (the
simulator's path): the same pass and generation logic as the native one."""

from __future__ import annotations

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
