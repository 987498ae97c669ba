"""The simulated destination's chunk root marks chunks as the receiver does."""

from __future__ import annotations

import numpy as np

from mig._mig import ChunkDigest, DirtyBitmap, GuestMemory
from mig.sim import HostModel, SimConfig, simulate
from mig.sim_chunks import CHUNK_BYTES, SETTLING_PERIOD, RecentChunks, StaleChunks

PAGE = 4096
MIB = 1 << 20


def _pages(n: int, *pages: int) -> DirtyBitmap:
    return DirtyBitmap.from_indices(np.array(pages, dtype=np.uint64), n)


def test_the_chunk_size_is_the_receivers() -> None:
    assert ChunkDigest(GuestMemory(MIB)).chunk_bytes == CHUNK_BYTES


def test_data_pages_stale_their_chunk_and_zero_pages_do_not() -> None:
    per = CHUNK_BYTES // PAGE
    n = 8 * per
    stale = StaleChunks(n * PAGE, PAGE)
    sent = _pages(n, 0, 1, per, 3 * per + 2)
    data = _pages(n, 0, 3 * per + 2)  # page `per` went out as a zero page
    stale.sent(sent, data)
    assert stale.count() == 2
    stale.sent(_pages(n, 5 * per))  # None: every page sent as data
    assert stale.count() == 3
    stale.clear()
    assert stale.count() == 0


def test_a_unit_larger_than_a_chunk_stales_every_chunk_it_covers() -> None:
    unit = 4 * CHUNK_BYTES
    stale = StaleChunks(8 * unit, unit)
    stale.sent(_pages(8, 1))
    assert stale.count() == 4


def test_recent_chunks_are_those_of_the_last_one_to_two_periods() -> None:
    per = CHUNK_BYTES // PAGE
    n = 8 * per
    recent = RecentChunks(n * PAGE, PAGE)
    recent.sent(_pages(n, 0), None, 0.0)
    recent.sent(_pages(n, per), None, 1.5 * SETTLING_PERIOD)
    assert recent.count(1.5 * SETTLING_PERIOD) == 2
    assert recent.count(2.5 * SETTLING_PERIOD) == 1  # the first settled
    assert recent.count(4.0 * SETTLING_PERIOD) == 0


def test_the_root_before_ready_costs_the_stale_chunks() -> None:
    """A scattered final pass costs the destination's root whole chunks: a
    dearer chunk rehash lengthens dest-digest in proportion."""
    config = SimConfig(
        memory=64 * MIB,
        workload="uniform:rate=4000",
        params={"max_bandwidth": 64 * MIB, "downtime_limit": 300, "timeout": 60.0},
    )
    cheap = simulate(config.with_(host=HostModel(chunk_rehash=4e-6)))
    dear = simulate(config.with_(host=HostModel(chunk_rehash=8e-6)))
    a, b = cheap["downtime-breakdown"]["dest-digest"], dear["downtime-breakdown"]["dest-digest"]
    assert a > 0
    assert b > 1.5 * a
