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
import time

import numpy as np
import pytest

import mig
from mig.prealloc import start_prealloc

SIZE = 16 << 20
PAGE = 4096


def half_random(memory: mig.GuestMemory) -> None:
    """Every other page random; the rest never written (holes)."""
    pages = memory.array.reshape(memory.num_pages, PAGE)
    rng = np.random.default_rng(5)
    pages[::2] = rng.integers(0, 256, size=(memory.num_pages // 2, PAGE), dtype=np.uint8)


def populated(memory: mig.GuestMemory, timeout: float = 30.0) -> None:
    """Waits until the background populate made every page present."""
    deadline = time.monotonic() + timeout
    while memory.data_ranges() != [(0, memory.size)]:
        assert time.monotonic() < deadline, "populate did not finish"
        time.sleep(0.01)


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
    data_ranges = start_prealloc(dst)
    assert data_ranges == []  # fresh memory: all holes
    populated(dst)
    stats = migrate(src, dst, data_ranges)
    assert stats["zero-pages"] == src.num_pages // 2
    assert stats["zero-filled"] == 0


def test_data_written_before_prealloc_is_overwritten() -> None:
    src = mig.GuestMemory(SIZE, "anon")
    half_random(src)
    dst = mig.GuestMemory(SIZE, "anon")
    # Stale data on pages 1..7, where the source has zero pages (odd) and data.
    dst.array[PAGE : 8 * PAGE] = 0xEE
    data_ranges = start_prealloc(dst)
    assert data_ranges == [(PAGE, 8 * PAGE)]
    populated(dst)
    stats = migrate(src, dst, data_ranges)
    assert stats["zero-filled"] == 4  # pages 1, 3, 5 and 7
    assert not dst.array[PAGE : 2 * PAGE].any()


def test_without_the_ranges_preallocated_memory_counts_as_data() -> None:
    """What the ranges are for: asked after populating, memory says every
    page may hold data, and every zero page is written."""
    src = mig.GuestMemory(SIZE, "anon")
    half_random(src)
    dst = mig.GuestMemory(SIZE, "anon")
    start_prealloc(dst)
    populated(dst)
    stats = migrate(src, dst, None)
    assert stats["zero-filled"] == src.num_pages // 2


def test_data_ranges_outside_memory_are_refused_at_once() -> None:
    dst = mig.GuestMemory(SIZE, "anon")
    listener = mig.Listener("tcp:127.0.0.1:0")
    for bad in ([(0, SIZE + PAGE)], [(2 * PAGE, PAGE)]):
        with pytest.raises(ValueError, match="data range"):
            listener.accept(dst, 30.0, data_ranges=bad)
