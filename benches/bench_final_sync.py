"""The switchover's final sync on a 4 GiB guest against the walk it replaced.

Before each round a `hotset:rate=20000` workload runs for a short interval,
as between the last pre-copy sync and the pause, and is paused. Subject:
`DirtyTracker.sync_final()`, the final sync a migration now makes: the walk
split in parts on disjoint ranges, reporting without write-protecting again,
and the bitmap built. Baseline: the bare harvest the final sync used to be,
one walk re-protecting every written page (`scan_bare(parts=1)`, without
even the bitmap). Target: <= 0.75.
"""

from __future__ import annotations

import time

import pytest
from conftest import measure, pair

import mig

GIB = 1 << 30
CAPS = mig.capabilities()
pytestmark = pytest.mark.skipif(
    not CAPS["uffd"]["available"],
    reason=f"host lacks the uffd capability: {CAPS['uffd']['reason']}",
)
# As long as the guest runs between the last pre-copy sync and the pause.
RUN_BEFORE_PAUSE = 0.1


@pytest.fixture(scope="module")
def guest():
    mem = mig.GuestMemory(4 * GIB)
    mem.array[:: 2 * mem.page_size] = 1  # every other page populated, as an image
    tracker = mig.DirtyTracker(mem)
    guest = mig.WorkloadGuest(mem, vcpus=1, workload="hotset:rate=20000")
    guest.pause()
    yield tracker, guest
    guest.close()
    tracker.close()


@pytest.mark.parametrize("role", ["baseline", "subject"])
def test_final_sync_4gib_hotset(benchmark, guest, role: str) -> None:
    tracker, g = guest
    found: list[int] = []

    def setup() -> None:
        tracker.sync()
        g.resume()
        time.sleep(RUN_BEFORE_PAUSE)
        g.pause()

    if role == "subject":

        def run() -> None:
            found.append(tracker.sync_final().count())
    else:

        def run() -> None:
            found.append(tracker.scan_bare(parts=1))

    group = "final sync 4GiB hotset"
    measure(benchmark, group, role, run, setup=setup, rounds=15, iterations=1)
    assert found and all(f > 0 for f in found)
    if role == "subject":
        pair(
            "tracker",
            group,
            "subject",
            "baseline",
            0.75,
            "<=",
            "sync_final() / one re-protecting walk",
        )
