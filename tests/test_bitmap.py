"""DirtyBitmap: scans and set operations against plain numpy/Python models."""

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
