"""DirtyBitmap: scans and set operations against plain numpy/Python models."""

import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mig


def naive_runs(pages: set[int], n: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if i in pages:
            s = i
            while i < n and i in pages:
                i += 1
            runs.append((s, i - s))
        else:
            i += 1
    return runs


page_sets = st.integers(1, 700).flatmap(
    lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), max_size=n))
)


@settings(max_examples=200, deadline=None)
@given(page_sets)
def test_scans_match_models(case: tuple[int, set[int]]) -> None:
    n, pages = case
    bm = mig.DirtyBitmap.from_indices(sorted(pages), n)
    assert bm.count() == len(pages) == len(bm.indices())
    assert bm.indices().dtype == np.uint64
    assert bm.indices().tolist() == sorted(pages)
    runs = bm.runs()
    assert runs.shape == (len(runs), 2)
    assert [tuple(r) for r in runs.tolist()] == naive_runs(pages, n)
    # Words round-trip through numpy, and bits past the end are rejected.
    words = bm.to_numpy()
    assert mig.DirtyBitmap.from_numpy(words, n) == bm
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:n]
    assert set(np.flatnonzero(bits).tolist()) == pages


@settings(max_examples=100, deadline=None)
@given(page_sets, st.data())
def test_set_algebra(case: tuple[int, set[int]], data: st.DataObject) -> None:
    n, a = case
    b = data.draw(st.sets(st.integers(0, n - 1)))
    start = data.draw(st.integers(0, n))
    length = data.draw(st.integers(0, n - start))
    ba = mig.DirtyBitmap.from_indices(sorted(a), n)
    bb = mig.DirtyBitmap.from_indices(sorted(b), n)
    assert set((ba | bb).indices().tolist()) == a | b
    c = ba.copy()
    c |= bb
    assert set(c.indices().tolist()) == a | b
    c.and_not(bb)
    assert set(c.indices().tolist()) == a - b
    d = ba.copy()
    taken = d.test_and_clear(start, length)
    inside = {p for p in a if start <= p < start + length}
    assert set(taken.indices().tolist()) == inside
    assert set(d.indices().tolist()) == a - inside
    e = ba.copy()
    moved = e.take()
    assert e.count() == 0 and moved == ba


def test_bounds_are_checked() -> None:
    bm = mig.DirtyBitmap(100)
    with pytest.raises(ValueError, match="100"):
        bm.set(100)
    with pytest.raises(ValueError):
        bm.set_range(90, 20)
    with pytest.raises(ValueError, match="differ"):
        bm |= mig.DirtyBitmap(101)
    with pytest.raises(ValueError):
        mig.DirtyBitmap.from_numpy(np.array([0, 1 << 40], dtype=np.uint64), 70)
    full = mig.DirtyBitmap.full(70)
    assert full.count() == 70 and full.runs().tolist() == [[0, 70]]
    bm.set_range(10, 5)
    assert bm.get(12) and not bm.get(15) and len(bm) == 100
    bm.clear()
    assert bm.count() == 0


def test_large_outputs_reuse_freed_arrays_without_stale_data() -> None:
    # Outputs of 4 MiB or more write into the buffer of a freed earlier
    # array: a later, smaller result must hold exactly its own pages.
    n = 1 << 20
    full = mig.DirtyBitmap.full(n).indices()
    address = full.ctypes.data
    del full
    rng = np.random.default_rng(5)
    pages = np.unique(rng.integers(0, n, size=900_000, dtype=np.uint64))
    bm = mig.DirtyBitmap.from_indices(pages, n)
    got = bm.indices()
    assert got.ctypes.data == address  # the freed array's pages, reused
    assert np.array_equal(got, pages)
    runs = bm.runs()
    bits = np.zeros(n + 2, dtype=np.int8)
    bits[pages.astype(np.int64) + 1] = 1
    edges = np.flatnonzero(np.diff(bits))
    assert np.array_equal(runs[:, 0], edges[0::2])
    assert np.array_equal(runs[:, 1], edges[1::2] - edges[0::2])
    # An array kept alive (or a view of it) keeps its memory.
    view = got[:10].copy()
    del runs
    assert np.array_equal(got[:10], view)


GIL_PAGES = 1 << 26


def _gil_ops() -> dict[str, Callable[[], object]]:
    """Every O(n) method, each on 2^26-page bitmaps."""
    rng = np.random.default_rng(9)
    a = mig.DirtyBitmap.from_indices(
        np.unique(rng.integers(0, GIL_PAGES, 1 << 18, dtype=np.uint64)), GIL_PAGES
    )
    b = mig.DirtyBitmap.full(GIL_PAGES)
    words = b.to_numpy()
    idx = np.arange(0, GIL_PAGES, 64, dtype=np.uint64)

    def ior() -> None:
        c = a.copy()
        c |= b

    def and_not() -> None:
        a.copy().and_not(b)

    return {
        "|=": ior,
        "|": lambda: a | b,
        "and_not": and_not,
        "copy": a.copy,
        "take": lambda: b.copy().take(),
        "test_and_clear": lambda: b.copy().test_and_clear(0, GIL_PAGES),
        "from_indices": lambda: mig.DirtyBitmap.from_indices(idx, GIL_PAGES),
        "from_numpy": lambda: mig.DirtyBitmap.from_numpy(words, GIL_PAGES),
        "to_numpy": b.to_numpy,
        "==": lambda: a == b,
        "set_range": lambda: mig.DirtyBitmap(GIL_PAGES).set_range(1, GIL_PAGES - 2),
    }


def _ticks_during(op: Callable[[], object], seconds: float = 0.25) -> int:
    """How often another Python thread ran while this one called ``op`` in a loop.

    The switch interval is raised so that the interpreter never takes the
    GIL from this thread by itself: the ticker only runs while ``op``
    releases it.
    """
    ticks = 0
    stop = threading.Event()

    def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.0001)

    old = sys.getswitchinterval()
    t = threading.Thread(target=ticker)
    t.start()
    try:
        time.sleep(0.01)
        sys.setswitchinterval(30.0)
        # A GIL drop already requested under the old interval may still hand
        # the ticker one turn; let it happen (the sleep releases the GIL)
        # before counting.
        time.sleep(0.005)
        before = ticks
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            op()
        during = ticks - before
    finally:
        sys.setswitchinterval(old)
        stop.set()
        t.join()
    return during


def test_the_gil_test_sees_an_operation_that_holds_the_gil() -> None:
    # The control: an O(1) method holds the GIL, so nothing else runs.
    bm = mig.DirtyBitmap(GIL_PAGES)
    assert _ticks_during(lambda: bm.get(5)) == 0


@pytest.mark.parametrize("name", list(_gil_ops()))
def test_o_n_bitmap_methods_release_the_gil(name: str) -> None:
    op = _gil_ops()[name]
    assert _ticks_during(op) >= 3, f"{name} held the GIL for its whole 2^26-page run"
