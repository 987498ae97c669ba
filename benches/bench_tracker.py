"""Tracker sync() on 1 GiB against the bare PAGEMAP_SCAN harvest loop.

Both run the same kernel walk with the same flags, masks and region buffer;
sync() also builds the DirtyBitmap and hands it to Python. Target: ≤ 1.2×.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import measure, pair

import mig

GIB = 1 << 30
CAPS = mig.capabilities()
pytestmark = pytest.mark.skipif(
    not CAPS["uffd"]["available"],
    reason=f"host lacks the uffd capability: {CAPS['uffd']['reason']}",
)


@pytest.fixture(scope="module")
def tracked() -> tuple[mig.GuestMemory, mig.DirtyTracker]:
    mem = mig.GuestMemory(GIB)
    mem.array[:: mem.page_size] = 1  # populate every page once
    return mem, mig.DirtyTracker(mem)


def dirtier(mem: mig.GuestMemory, pct: int):
    n = mem.num_pages
    rng = np.random.default_rng(pct)
    if pct == 100:
        offsets = np.arange(n, dtype=np.int64) * mem.page_size
    else:
        pages = rng.choice(n, size=n * pct // 100, replace=False)
        offsets = np.sort(pages).astype(np.int64) * mem.page_size
    arr = mem.array

    def setup() -> None:
        arr[offsets] += 1

    return setup, len(offsets)


@pytest.mark.parametrize("pct", [1, 10, 100])
@pytest.mark.parametrize("role", ["baseline", "subject"])
def test_sync_1gib(benchmark, tracked, pct: int, role: str) -> None:
    mem, t = tracked
    setup, expected = dirtier(mem, pct)
    t.sync()
    found: list[int] = []
    if role == "subject":

        def run() -> None:
            found.append(t.sync().count())
    else:

        def run() -> None:
            found.append(t.scan_bare())

    group = f"tracker sync 1GiB {pct}% dirty"
    measure(benchmark, group, role, run, setup=setup, rounds=7, iterations=1)
    assert found and all(f == expected for f in found)
    if role == "subject":
        pair("tracker", group, "subject", "baseline", 1.2, "<=", "sync() / bare PAGEMAP_SCAN")
