"""DirtyTracker: exact kernel tracking (uffd), soft marks, capability probing."""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mig

CAPS = mig.capabilities()
needs_uffd = pytest.mark.skipif(
    not CAPS["uffd"]["available"],
    reason=f"host lacks the uffd capability: {CAPS['uffd']['reason']}",
)
PAGE = mig.GuestMemory(4096 * 16).page_size
HUGE = 2 << 20  # a PMD-mapped THP covers this many bytes on x86-64 and arm64-4K
# With shmem THP off, the uffd backend is page exact; otherwise a write into a
# huge page reports all of it (the documented false positive).
SHMEM_THP_OFF = CAPS["shmem_thp"] in ("never", "deny")


def changed_pages(before: np.ndarray, after: np.ndarray) -> set[int]:
    diff = (before != after).reshape(-1, PAGE).any(axis=1)
    return set(np.flatnonzero(diff).tolist())


def check_reported(got: set[int], changed: set[int], mem: mig.GuestMemory) -> None:
    """No missed page ever; extra pages only inside a huge page with a real write."""
    assert changed <= got, f"missed pages {sorted(changed - got)[:10]}"
    extra = got - changed
    if SHMEM_THP_OFF:
        assert not extra, f"false positives {sorted(extra)[:10]}"
        return
    base = mem.array.ctypes.data
    block = {(base + p * PAGE) // HUGE for p in changed}
    assert all((base + p * PAGE) // HUGE in block for p in extra)


# ---- capability probing -------------------------------------------------------


def test_capabilities_shape() -> None:
    caps = mig.capabilities()
    assert caps["kernel"] == os.uname().release
    assert caps["faked"] is False
    for backend in ("uffd", "soft"):
        assert isinstance(caps[backend]["available"], bool)
        assert caps[backend]["reason"]
    assert caps["soft"]["available"]


def test_capabilities_agree_with_the_backend() -> None:
    mem = mig.GuestMemory(PAGE * 8)
    if CAPS["uffd"]["available"]:
        with mig.DirtyTracker(mem, "uffd") as t:
            assert t.backend == "uffd"
    else:
        with pytest.raises(mig.UnsupportedError):
            mig.DirtyTracker(mem, "uffd")


@pytest.mark.parametrize(
    ("fake", "needle", "missing"),
    [
        ("open=EPERM", "unprivileged_userfaultfd", []),
        ("open=ENOSYS", "CONFIG_USERFAULTFD", []),
        (
            "kernel=6.6.0,features=0x2000",
            "older than 6.7",
            ["UFFD_FEATURE_WP_ASYNC", "UFFD_FEATURE_WP_HUGETLBFS_SHMEM"],
        ),
        ("pagemap_scan=ENOTTY", "no PAGEMAP_SCAN", []),
    ],
)
def test_faked_host_without_the_feature(
    monkeypatch: pytest.MonkeyPatch, fake: str, needle: str, missing: list[str]
) -> None:
    monkeypatch.setenv("MIG_FAKE_PROBE", fake)
    caps = mig.capabilities()
    assert caps["faked"] is True
    assert caps["uffd"]["available"] is False
    assert needle in caps["uffd"]["reason"]
    assert caps["uffd"]["missing"] == missing
    assert caps["soft"]["available"] is True
    mem = mig.GuestMemory(PAGE * 8)
    # The tracker refuses with the same reason the probe gave.
    with pytest.raises(mig.UnsupportedError, match=needle):
        mig.DirtyTracker(mem, "uffd")
    with mig.DirtyTracker(mem, "soft") as t:
        t.mark([1])
        assert t.sync().indices().tolist() == [1]


def test_bad_fake_spec_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIG_FAKE_PROBE", "colour=blue")
    with pytest.raises(ValueError, match="colour"):
        mig.capabilities()


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="kvm"):
        mig.DirtyTracker(mig.GuestMemory(PAGE), "kvm")


# ---- soft backend ---------------------------------------------------------------


def test_soft_backend_reports_marks_exactly() -> None:
    mem = mig.GuestMemory(PAGE * 300)
    t = mig.DirtyTracker(mem, backend="soft")
    assert t.backend == "soft" and t.num_pages == 300
    mem.array[:] = 1  # unmarked writes are invisible to the soft backend
    assert t.sync().count() == 0
    t.mark(np.array([3, 64, 299], dtype=np.uint64))
    t.mark([3, 5])
    t.mark(mig.DirtyBitmap.from_indices([100, 101], 300))
    assert t.sync().indices().tolist() == [3, 5, 64, 100, 101, 299]
    assert t.sync().count() == 0
    with pytest.raises(ValueError, match="300"):
        t.mark([300])
    with pytest.raises(ValueError, match="does not match"):
        t.mark(mig.DirtyBitmap(10))
    t.close()
    assert t.closed
    with pytest.raises(ValueError, match="closed"):
        t.sync()


def test_soft_marks_from_threads() -> None:
    mem = mig.GuestMemory(PAGE * 4096)
    t = mig.DirtyTracker(mem, "soft")
    parts = np.array_split(np.arange(0, 4096, 3, dtype=np.uint64), 4)
    threads = [threading.Thread(target=t.mark, args=(p,)) for p in parts]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.sync().indices().tolist() == list(range(0, 4096, 3))


# ---- uffd backend ---------------------------------------------------------------


@needs_uffd
def test_first_sync_reports_writes_since_creation() -> None:
    mem = mig.GuestMemory(PAGE * 64)
    mem.array[PAGE * 2] = 9  # before the tracker: not reported
    with mig.DirtyTracker(mem) as t:
        assert t.backend == "uffd"
        assert t.sync().count() == 0
        mem.array[PAGE * 5 + 17] = 1
        mem.write(PAGE * 7, b"abc")
        got = t.sync()
        assert got.indices().tolist() == [5, 7]
        assert t.last_sync_seconds > 0
        assert t.sync().count() == 0


@needs_uffd
def test_one_uffd_tracker_per_memory() -> None:
    mem = mig.GuestMemory(PAGE * 8)
    t = mig.DirtyTracker(mem)
    with pytest.raises(ValueError, match="already tracked"):
        mig.DirtyTracker(mem)
    t.close()
    with mig.DirtyTracker(mem) as t2:
        mem.array[0] = 1
        assert t2.sync().indices().tolist() == [0]


@needs_uffd
def test_memfd_write_bypasses_tracking_and_mark_covers_it() -> None:
    """Documented limitation: write() on the memfd does not go through the
    mapping, so the kernel tracker cannot see it; mark() reports it."""
    mem = mig.GuestMemory(PAGE * 8)
    with mig.DirtyTracker(mem) as t:
        os.pwrite(mem.fd, b"hidden", PAGE * 3)
        assert mem.read(PAGE * 3, 6) == b"hidden"
        assert t.sync().count() == 0
        t.mark([3])
        assert t.sync().indices().tolist() == [3]


@needs_uffd
def test_kernel_copies_into_the_mapping_are_seen(tmp_path) -> None:
    """A syscall that copies into guest memory (readv) writes through the
    mapping, so the write-protect fault marks the pages."""
    src = tmp_path / "data"
    src.write_bytes(b"\x5a" * (PAGE * 2))
    mem = mig.GuestMemory(PAGE * 8)
    with mig.DirtyTracker(mem) as t:
        fd = os.open(src, os.O_RDONLY)
        try:
            n = os.readv(fd, [memoryview(mem.array)[PAGE * 4 : PAGE * 6]])
        finally:
            os.close(fd)
        assert n == PAGE * 2
        assert t.sync().indices().tolist() == [4, 5]


@needs_uffd
def test_huge_page_advice_keeps_reports_sound() -> None:
    """MADV_HUGEPAGE on the memfd mapping: with shmem THP disabled (the host's
    shmem_enabled) the report stays page exact; with THP a write reports its
    whole huge page, never less."""
    mem = mig.GuestMemory(HUGE * 4)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_hugepage = 14
    assert libc.madvise(mem.array.ctypes.data, mem.size, madv_hugepage) == 0
    base = mem.array.ctypes.data
    aligned = (-base) % HUGE  # offset of the first huge-page boundary
    page = (aligned + HUGE // 2) // PAGE
    with mig.DirtyTracker(mem) as t:
        before = mem.array.copy()
        mem.array[page * PAGE] = 1
        got = set(t.sync().indices().tolist())
        check_reported(got, changed_pages(before, mem.array), mem)
        assert page in got


def _write_sets() -> st.SearchStrategy[list[list[tuple[int, int]]]]:
    write = st.tuples(st.integers(0, 1023), st.integers(8, PAGE - 1))
    return st.lists(st.lists(write, max_size=60), min_size=4, max_size=4)


@needs_uffd
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(sets=_write_sets(), rounds=st.integers(1, 3))
def test_uffd_reports_random_writes_from_four_threads_exactly(
    sets: list[list[tuple[int, int]]], rounds: int
) -> None:
    """Four Python threads write random pages through numpy views while a
    native vCPU writes too; every sync reports exactly the changed pages."""
    mem = mig.GuestMemory(PAGE * 1024)
    arr = mem.array
    with (
        mig.DirtyTracker(mem) as t,
        mig.WorkloadGuest(mem, vcpus=1, workload="uniform:wss=512KiB,rate=5000") as g,
    ):
        g.pause()
        t.sync()
        for _ in range(rounds):
            before = arr.copy()
            g.resume()
            barrier = threading.Barrier(4)

            def writer(ws: list[tuple[int, int]], tid: int, start: threading.Barrier) -> None:
                view = mem.array  # each thread its own view of the mapping
                start.wait()
                for page, off in ws:
                    i = page * PAGE + off
                    # Offsets from 8 up leave the vCPU's u64 slot alone; the
                    # thread id keeps two threads from writing the same byte.
                    view[i - (i % 4) + tid] += 1

            threads = [
                threading.Thread(target=writer, args=(ws, i, barrier)) for i, ws in enumerate(sets)
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            g.pause()
            got = set(t.sync().indices().tolist())
            changed = changed_pages(before, arr)
            written = {p for ws in sets for p, _ in ws}
            assert written <= changed
            check_reported(got, changed, mem)
