"""A preallocated destination receives as fresh memory does.

Populating memory (``--prealloc``, QEMU's ``-mem-prealloc``) makes every page
present, so the page tables stop telling which pages hold data. The
destination takes that before populating and hands it to the receiver: pages
that were zeros still take the stream's pages straight from the socket and
are not written for a zero page, while pages that held data before are
overwritten with what the source has, zero pages included.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import mig
from mig.demo_destination import DemoDestination
from mig.destination import MigrationDestination
from mig.errors import MigrationEnded
from mig.prealloc import Prealloc, accept_populated, start_prealloc
from mig.source import MigrationSource

SIZE = 16 << 20
PAGE = 4096


def half_random(memory: mig.GuestMemory) -> None:
    """Every other page random; the rest never written (holes)."""
    pages = memory.array.reshape(memory.num_pages, PAGE)
    rng = np.random.default_rng(5)
    pages[::2] = rng.integers(0, 256, size=(memory.num_pages // 2, PAGE), dtype=np.uint8)


def populated(prealloc: Prealloc, timeout: float = 30.0) -> None:
    """Waits until the background populate made every page present."""
    assert prealloc.wait(timeout), "populate did not finish"
    assert prealloc.error is None


def migrate(src: mig.GuestMemory, dst: mig.GuestMemory, data_ranges: object) -> dict:
    """One pass of every page, then the end: the receiver's statistics."""
    listener = mig.Listener("tcp:127.0.0.1:0")
    got: dict[str, mig.Receiver] = {}
    t = threading.Thread(
        target=lambda: got.setdefault("r", listener.accept(dst, 20.0, data_ranges=data_ranges))
    )
    t.start()
    with mig.Sender(src, listener.uri, migration_id=7, channels=2) as sender:
        sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
        sender.sync(0)
        sender.finish(src.digest())
        t.join()
        end = got["r"].wait_end(20.0)
        stats = got["r"].stats()
    assert end["digest"] == src.digest() == dst.digest()
    return stats


@pytest.mark.parametrize("backing", ["anon", "memfd"])
def test_zero_pages_are_not_written_into_preallocated_zeros(backing: str) -> None:
    src = mig.GuestMemory(SIZE, "anon")
    half_random(src)
    dst = mig.GuestMemory(SIZE, backing)
    prealloc = start_prealloc(dst)
    data_ranges = prealloc.data_ranges
    assert data_ranges == []  # fresh memory: all holes
    populated(prealloc)
    assert dst.data_ranges() == [(0, SIZE)]
    stats = migrate(src, dst, data_ranges)
    assert stats["zero-pages"] == src.num_pages // 2
    assert stats["zero-filled"] == 0


def test_data_written_before_prealloc_is_overwritten() -> None:
    src = mig.GuestMemory(SIZE, "anon")
    half_random(src)
    dst = mig.GuestMemory(SIZE, "anon")
    # Stale data on pages 1..7, where the source has zero pages (odd) and data.
    dst.array[PAGE : 8 * PAGE] = 0xEE
    prealloc = start_prealloc(dst)
    data_ranges = prealloc.data_ranges
    assert data_ranges == [(PAGE, 8 * PAGE)]
    populated(prealloc)
    stats = migrate(src, dst, data_ranges)
    assert stats["zero-filled"] == 4  # pages 1, 3, 5 and 7
    assert not dst.array[PAGE : 2 * PAGE].any()


def test_without_the_ranges_preallocated_memory_counts_as_data() -> None:
    """What the ranges are for: asked after populating, memory says every
    page may hold data, and every zero page is written."""
    src = mig.GuestMemory(SIZE, "anon")
    half_random(src)
    dst = mig.GuestMemory(SIZE, "anon")
    populated(start_prealloc(dst))
    stats = migrate(src, dst, None)
    assert stats["zero-filled"] == src.num_pages // 2


def test_data_ranges_outside_memory_are_refused_at_once() -> None:
    dst = mig.GuestMemory(SIZE, "anon")
    listener = mig.Listener("tcp:127.0.0.1:0")
    for bad in ([(0, SIZE + PAGE)], [(2 * PAGE, PAGE)]):
        with pytest.raises(ValueError, match="data range"):
            listener.accept(dst, 30.0, data_ranges=bad)


# Large enough that its populate lasts far longer than a source takes to connect.
BIG = 256 << 20


class RecordingListener:
    """The destination's listener, noting what memory held when it accepted."""

    def __init__(self, listener: mig.Listener, memory: mig.GuestMemory) -> None:
        self.listener, self.memory = listener, memory
        self.at_accept: list[tuple[int, int]] | None = None

    def accept(self, memory: mig.GuestMemory, timeout: float, **kw: object) -> mig.Receiver:
        self.at_accept = self.memory.data_ranges()
        return self.listener.accept(memory, timeout, **kw)

    def __getattr__(self, name: str) -> object:
        return getattr(self.listener, name)


def migrate_into(dest: MigrationDestination, src: mig.GuestMemory) -> dict:
    """A real migration of idle ``src`` into ``dest``, checked byte for byte."""
    with mig.WorkloadGuest(src, vcpus=1, workload="idle") as guest:
        source = MigrationSource(guest, uri=dest.uri, multifd_channels=2, timeout=60)
        dest.start()
        source.start()
        q = source.wait(90)
        d = dest.wait(30)
    assert q["status"] == d["status"] == "completed", (q.get("error-desc"), d.get("error-desc"))
    assert d["memory-digest"] == format(src.digest(), "032x")
    assert np.array_equal(src.array, dest.memory.array)
    return q


def every_fourth_page(size: int) -> mig.GuestMemory:
    src = mig.GuestMemory(size, "anon")
    src.array.reshape(-1, PAGE)[::4] = 0x5A
    return src


def test_a_prealloc_destination_accepts_its_source_only_once_populated() -> None:
    """The populate never runs beside the migration: when the first channel
    is accepted every page is present already, so the source's setup and
    first pass do not share the host with it."""
    src = every_fourth_page(BIG)
    dst = mig.GuestMemory(BIG, "anon")
    dest = MigrationDestination("tcp:127.0.0.1:0", dst, accept_timeout=60, prealloc=True)
    assert dest.prealloc is not None and dest.prealloc.data_ranges == []
    recording = RecordingListener(dest.listener, dst)
    dest.listener = recording
    q = migrate_into(dest, src)
    assert recording.at_accept == [(0, BIG)]
    assert q["ram"]["duplicate"] == BIG // PAGE * 3 // 4  # zero pages still sent as such


class Unsupported:
    """Memory on a kernel without MADV_POPULATE_WRITE."""

    def __init__(self, memory: mig.GuestMemory) -> None:
        self.memory = memory

    def data_ranges(self) -> list[tuple[int, int]]:
        return self.memory.data_ranges()

    def populate(self) -> None:
        raise OSError(22, "MADV_POPULATE_WRITE: Invalid argument")


def test_a_populate_that_fails_still_lets_the_destination_accept() -> None:
    src = every_fourth_page(SIZE)
    dst = mig.GuestMemory(SIZE, "anon")
    dest = MigrationDestination("tcp:127.0.0.1:0", dst, accept_timeout=30)
    dest.prealloc = start_prealloc(Unsupported(dst))
    assert dest.prealloc.wait(10) and "MADV_POPULATE_WRITE" in str(dest.prealloc.error)
    migrate_into(dest, src)  # the stream faults the pages in instead


def test_a_cancel_while_populating_ends_the_accept() -> None:
    class Slow:
        """Memory whose populate lasts until the test lets it end."""

        gate = threading.Event()

        def data_ranges(self) -> list[tuple[int, int]]:
            return []

        def populate(self) -> None:
            self.gate.wait(30)

    class NeverAccept:
        def accept(self, *args: object, **kw: object) -> None:
            raise AssertionError("accepted before the populate ended")

    prealloc = start_prealloc(Slow())
    try:
        with pytest.raises(MigrationEnded, match="stop"):
            accept_populated(NeverAccept(), None, prealloc, 30.0, 30.0, lambda: "stop")
        assert not prealloc.wait(0)
    finally:
        Slow.gate.set()


def test_the_demo_destination_reports_ready_once_its_memory_is_populated() -> None:
    """``mig serve --prealloc``'s ready line (what ``mig demo``'s source waits
    for) comes after the populate: the process holds the whole guest by then."""
    dest = DemoDestination(BIG, "none", "warning", {})
    try:
        assert dest.uri() is not None
        status = open(f"/proc/{dest.child.pid}/status").read()
        rss = int(
            next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]
        )
        assert rss * 1024 >= BIG
    finally:
        dest.kill()
