"""Post-copy with two fault streams and ``postcopy_push_order`` "stream":
while the push follows one vCPU's walk, the other vCPU's requests are
answered a page at a time (``PAGE``) and its chunks still come whole later;
the destination ends byte-exact."""

from __future__ import annotations

from typing import Any

import pytest
from postcopykit import needs_postcopy, run_postcopy

import mig
from mig.destination import MigrationDestination
from mig.params import MigrationParams
from mig.source import MigrationSource

SIZE = 32 << 20


def test_the_push_order_is_checked() -> None:
    with pytest.raises(ValueError, match="postcopy_push_order"):
        MigrationParams.from_dict({"postcopy_push_order": "random"})


@needs_postcopy
@pytest.mark.parametrize("order", ["stream", "faults"])
def test_a_second_fault_stream_gets_pages_alone_and_ends_byte_exact(order: str) -> None:
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    src.array[::7] = 0x3C  # data in every chunk: none goes as a zero run
    guest = mig.WorkloadGuest(src, vcpus=1, workload="idle")
    dest = MigrationDestination("tcp:127.0.0.1:0", dst, idle_timeout=20, accept_timeout=8, vcpus=2)
    there: dict[str, Any] = {}
    # Two vCPUs, each walking its half of memory: two fault streams.
    dest.on_resume = lambda: there.setdefault(
        "guest", mig.WorkloadGuest(dst, vcpus=2, workload="sequential:rate=400000")
    )
    source = MigrationSource(
        guest,
        uri=dest.uri,
        postcopy=True,
        postcopy_push_order=order,
        timeout=60,
        max_bandwidth=32 << 20,
    )
    # Everything owed: the page channels carry all of memory; verified
    # byte-exact (pages placed alone ahead of their chunk included).
    q, d = run_postcopy(source, dest, guest, there)
    pc = q["postcopy"]
    # Only "stream" sends pages alone; "faults" (the default) whole chunks.
    assert (pc["requested-pages"] > 0) == (order == "stream"), pc
    assert pc["remaining-chunks"] == 0
    assert pc["requested-chunks"] + pc["pushed-chunks"] == pc["owed-chunks"]
    assert d["postcopy"]["placed-chunks"] == pc["owed-chunks"]
