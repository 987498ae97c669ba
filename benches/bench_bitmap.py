"""DirtyBitmap indices()/runs() against numpy (target ≥ 10×) and against
memory read bandwidth (target ≥ 0.5×).

Densities 50 %, 12.5 % and 0.8 % come from ANDing 1, 3 and 7 random words.
The numpy equivalents start from the same uint64 words: unpackbits then
flatnonzero (indices), and edge detection on the unpacked bits (runs).
Bandwidth: the bytes a scan moves per second (the bitmap it reads plus the
array it writes) against memory read bandwidth: the fastest of numpy summing
the same words on one and on two threads and a native xxh3 pass over guest
memory of the same size.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import MEDIANS, measure, pair, ratio

import mig

DENSITIES = {"50%": 1, "12.5%": 3, "0.8%": 7}
NUMPY_PAGES = 1 << 26  # 8 MiB of words
BW_PAGES = 1 << 29  # 64 MiB of words: larger than the last-level cache


def words(pages: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(k)
    w = rng.integers(0, 1 << 64, size=pages // 64, dtype=np.uint64, endpoint=False)
    for _ in range(k - 1):
        w &= rng.integers(0, 1 << 64, size=pages // 64, dtype=np.uint64, endpoint=False)
    return w


def np_indices(w: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(w.view(np.uint8), bitorder="little")).astype(np.uint64)


def np_runs(w: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(w.view(np.uint8), bitorder="little").view(np.int8)
    edges = np.diff(bits, prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return np.stack([starts, ends - starts], axis=1).astype(np.uint64)


@pytest.mark.parametrize("op", ["indices", "runs"])
@pytest.mark.parametrize("density", list(DENSITIES))
@pytest.mark.parametrize("role", ["baseline", "subject"])
def test_vs_numpy(benchmark, op: str, density: str, role: str) -> None:
    w = words(NUMPY_PAGES, DENSITIES[density])
    bm = mig.DirtyBitmap.from_numpy(w, NUMPY_PAGES)
    if role == "subject":
        fn = bm.indices if op == "indices" else bm.runs
    else:
        fn = (lambda: np_indices(w)) if op == "indices" else (lambda: np_runs(w))
    group = f"bitmap {op} {density} vs numpy"
    measure(benchmark, group, role, fn, rounds=5, iterations=1)
    assert np.array_equal(fn(), np_indices(w) if op == "indices" else np_runs(w))
    if role == "subject":
        pair("bitmap", group, "baseline", "subject", 10, ">=", "numpy time / mig time")


@pytest.fixture(scope="module")
def big() -> dict[str, object]:
    return {"words": {d: words(BW_PAGES, k) for d, k in DENSITIES.items()}}


@pytest.mark.parametrize("role", ["numpy-sum", "numpy-sum-2-threads", "native-read"])
def test_read_bandwidth(benchmark, big, role: str) -> None:
    w = next(iter(big["words"].values()))
    if role == "numpy-sum":
        fn = w.sum
    elif role == "numpy-sum-2-threads":
        # The decoder uses every core on a bitmap this large: so may the baseline.
        pool = ThreadPoolExecutor(2)
        halves = np.array_split(w, 2)

        def fn() -> int:
            return sum(pool.map(np.sum, halves))
    else:
        mem = mig.GuestMemory(w.nbytes)
        mem.array[:] = w.view(np.uint8)
        fn = mem.digest
    measure(benchmark, "read bandwidth 64MiB", role, fn, rounds=7, iterations=1)


@pytest.mark.parametrize("op", ["indices", "runs"])
@pytest.mark.parametrize("density", list(DENSITIES))
def test_vs_bandwidth(benchmark, big, op: str, density: str) -> None:
    w = big["words"][density]
    bm = mig.DirtyBitmap.from_numpy(w, BW_PAGES)
    fn = bm.indices if op == "indices" else bm.runs
    t = measure(benchmark, f"bitmap {op} {density} 64MiB", "subject", fn, rounds=5, iterations=1)
    bw = MEDIANS.get("read bandwidth 64MiB", {})
    if bw and t == t:
        out = fn().nbytes
        moved = w.nbytes + out  # bitmap read + array written
        read_rate = w.nbytes / min(bw.values())
        ratio(
            "bitmap",
            f"bitmap {op} {density} vs read bandwidth",
            moved / t / read_rate,
            0.5,
            ">=",
            f"(bitmap + output bytes)/s / read bytes/s; output {out / w.nbytes:.2f}x input",
        )
