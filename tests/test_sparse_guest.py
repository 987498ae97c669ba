"""A guest's never-written memory stays unallocated when it is migrated.

Reading a hole of the memfd through the mapping allocates it; the sender
asks the memfd for holes after a packet of zero pages and sends them as zero
pages without reading them, and the destination never writes zero pages.
"""

from __future__ import annotations

import os

import pytest

import mig
from mig.destination import MigrationDestination
from mig.source import MigrationSource

MIB = 1 << 20
CAPS = mig.capabilities()


def allocated(memory: mig.GuestMemory) -> int:
    return os.fstat(memory.fd).st_blocks * 512


@pytest.mark.parametrize("backend", ["uffd", "soft"])
def test_migrating_a_sparse_guest_allocates_no_holes(backend: str) -> None:
    if not CAPS[backend]["available"]:
        pytest.skip(f"host lacks the {backend} capability: {CAPS[backend]['reason']}")
    size = 64 * MIB
    src, dst = mig.GuestMemory(size), mig.GuestMemory(size)
    src.array[: 16 * MIB] = 7  # 16 MiB written, then 16 MiB, 16 MiB never written
    src.array[32 * MIB : 48 * MIB] = 9
    guest = mig.WorkloadGuest(src, vcpus=1, workload="idle")
    try:
        dest = MigrationDestination("tcp:127.0.0.1:0", dst)
        dest.start()
        q = MigrationSource(guest, uri=dest.uri, tracker_backend=backend).run()
        d = dest.wait(30)
    finally:
        guest.close()
    assert q["status"] == "completed" and d["status"] == "completed", q.get("error-desc")
    assert src.digest() == dst.digest()
    # A hole costs the few packets (512 KiB each) per channel that find it;
    # reading every page would allocate all 64 MiB.
    assert allocated(src) <= 40 * MIB, allocated(src)
    assert allocated(dst) <= allocated(src)
