"""The switchover's final sync reports without write-protecting again
(``DirtyTracker.sync_final``): nothing the guest writes afterwards is lost
if the switchover rolls back and the guest runs on."""

from __future__ import annotations

import time

import pytest

import mig
from mig._mig import RamStream

CAPS = mig.capabilities()
pytestmark = pytest.mark.skipif(
    not CAPS["uffd"]["available"],
    reason=f"host lacks the uffd capability: {CAPS['uffd']['reason']}",
)
MIB = 1 << 20
# A page outside the workload's 1 MiB working set: only the test writes it.
PAGE = 1500


def test_final_sync_reports_written_pages_and_again_until_a_sync() -> None:
    mem = mig.GuestMemory(4 * MIB)
    ps = mem.page_size
    with mig.DirtyTracker(mem) as tracker:
        for p in (0, 1, 300, 1023):
            mem.array[p * ps] = 1
        assert tracker.sync_final().indices().tolist() == [0, 1, 300, 1023]
        # Left writable: a rewrite makes no fault, yet nothing is lost.
        mem.array[300 * ps] = 2
        mem.array[5 * ps] = 2
        assert tracker.sync().indices().tolist() == [0, 1, 5, 300, 1023]
        assert tracker.sync().count() == 0


class CopyLink:
    """Stands for the channels and the destination: each page sent is
    copied from the source memory as it is at the send."""

    def __init__(self, src: mig.GuestMemory, dst: mig.GuestMemory) -> None:
        self.src, self.dst = src, dst

    def send_pages(self, bitmap: mig.DirtyBitmap, generation: int) -> int:
        ps = self.src.page_size
        for p in bitmap.indices().tolist():
            self.dst.write(p * ps, self.src.read(p * ps, ps))
        return bitmap.count() * ps

    def sync(self, generation: int) -> None:
        pass


def _precopy(stream: RamStream) -> None:
    stream.sync()
    while stream.iterate(1 * MIB):
        pass


def test_switchovers_rolled_back_after_the_final_sync_stay_byte_exact() -> None:
    """Two rolled-back switchovers, each after a final harvest: one over
    budget (nothing sent), one whose final pass went out (the commit failed).
    The guest runs on between them, rewriting pages the final harvest left
    writable; the last switchover still leaves the copy byte for byte equal."""
    size = 8 * MIB
    src, dst = mig.GuestMemory(size), mig.GuestMemory(size)
    ps = src.page_size
    src.array[::ps] = 7
    tracker = mig.DirtyTracker(src)
    stream = RamStream(src.num_pages, ps, tracker)
    stream.sync()
    stream.start(CopyLink(src, dst))
    guest = mig.WorkloadGuest(src, vcpus=1, workload="hotset:wss=1MiB,rate=50000")
    try:
        _precopy(stream)
        for rolled_back in ("over-budget", "commit-failed"):
            time.sleep(0.05)
            guest.pause()
            src.write(PAGE * ps, rolled_back.encode())  # a page the final harvest reports
            sent, _, _ = stream.complete(0 if rolled_back == "over-budget" else None)
            assert (sent is None) == (rolled_back == "over-budget")
            guest.resume()
            src.write(PAGE * ps, b"rewritten while left writable")
            time.sleep(0.05)
            _precopy(stream)
        time.sleep(0.05)
        guest.pause()
        sent, _, (count, _) = stream.complete(None)
        assert sent is not None and count > 0
        assert stream.pending() == 0
        assert dst.read(PAGE * ps, 29) == b"rewritten while left writable"
        assert dst.digest() == src.digest()
    finally:
        guest.close()
        stream.close()
