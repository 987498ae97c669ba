"""PostcopyRegion: the destination side of post-copy on real userfaultfd faults.

A thread that touches a page not yet placed blocks in the kernel until the
page is placed; these tests make such threads with ``ctypes.memmove``, which
releases the GIL while it copies (and so while it is blocked).
"""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
import pytest
from postcopykit import needs_postcopy

import mig

CAPS = mig.capabilities()
PAGE = mig.GuestMemory(4096 * 4).page_size
WAIT = 10.0  # seconds; generous under load, never reached when things work


def addr(mem: mig.GuestMemory, page: int) -> int:
    return mem.array.ctypes.data + page * PAGE


def pattern(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, PAGE, dtype=np.uint8).tobytes()


class Reader(threading.Thread):
    """Copies one page out of guest memory, blocking while it is missing."""

    def __init__(self, mem: mig.GuestMemory, page: int) -> None:
        super().__init__(daemon=True)
        self.src = addr(mem, page)
        self.buf = ctypes.create_string_buffer(PAGE)
        self.start()

    def run(self) -> None:
        ctypes.memmove(self.buf, self.src, PAGE)

    def result(self) -> bytes:
        self.join(WAIT)
        assert not self.is_alive(), "the reader is still blocked"
        return self.buf.raw


def wait_requests(region: mig.PostcopyRegion, n: int) -> list[int]:
    got: list[int] = []
    while len(got) < n:
        more = region.next_requests(WAIT)
        assert more, f"no page request within {WAIT}s (have {got})"
        got += more
    return got


# ---- capability ----------------------------------------------------------------


def test_capability_is_reported_next_to_dirty_tracking() -> None:
    pc = CAPS["postcopy"]
    assert isinstance(pc["available"], bool) and pc["reason"]
    assert isinstance(pc["kernel_faults"], bool)
    assert pc["kernel_faults_note"]
    if pc["available"]:
        assert pc["missing"] == []
        assert "UFFDIO_COPY" in pc["reason"]


@pytest.mark.parametrize(
    ("fake", "needle", "missing"),
    [
        ("open=ENOSYS", "CONFIG_USERFAULTFD", ["userfaultfd"]),
        ("open=EPERM", "unprivileged_userfaultfd", ["userfaultfd"]),
        ("missing_shmem=EINVAL", "memfd/shmem", ["UFFDIO_REGISTER_MODE_MISSING"]),
        ("missing_ioctls=0x10", "UFFDIO_COPY", ["UFFDIO_COPY"]),
        ("missing_ioctls=0x8", "UFFDIO_ZEROPAGE", ["UFFDIO_ZEROPAGE"]),
        ("features=0", "UFFD_FEATURE_MISSING_SHMEM", ["UFFD_FEATURE_MISSING_SHMEM"]),
    ],
)
def test_faked_host_without_missing_mode_gets_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, fake: str, needle: str, missing: list[str]
) -> None:
    monkeypatch.setenv("MIG_FAKE_PROBE", fake)
    caps = mig.capabilities()
    assert caps["faked"] is True
    assert caps["postcopy"]["available"] is False
    assert needle in caps["postcopy"]["reason"]
    assert caps["postcopy"]["missing"] == missing
    region = mig.PostcopyRegion()
    with pytest.raises(mig.UnsupportedError, match=needle):
        region.register(mig.GuestMemory(PAGE * 4))
    assert not region.registered


def test_user_mode_only_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIG_FAKE_PROBE", "kernel_faults=EPERM")
    pc = mig.capabilities()["postcopy"]
    assert pc["kernel_faults"] is False
    assert "UFFD_USER_MODE_ONLY" in pc["kernel_faults_note"]
    assert "EFAULT" in pc["kernel_faults_note"]
    assert pc["available"] is CAPS["postcopy"]["available"]


def test_bad_fake_value_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIG_FAKE_PROBE", "missing_ioctls=lots")
    with pytest.raises(ValueError, match="missing_ioctls"):
        mig.capabilities()


# ---- faults and placement ---------------------------------------------------------


@needs_postcopy
def test_reader_blocks_until_the_page_is_placed_and_sees_exactly_it() -> None:
    mem = mig.GuestMemory(PAGE * 16)
    with mig.PostcopyRegion(vcpus=1) as region:
        region.register(mem)
        reader = Reader(mem, 5)
        assert wait_requests(region, 1) == [5]
        assert reader.is_alive(), "the reader ran before its page arrived"
        data = pattern(5)
        assert region.place(5, data) is True
        assert reader.result() == data
        assert mem.array[5 * PAGE : 6 * PAGE].tobytes() == data
        s = region.stats()
        assert s["faults-resolved"] == 1
        assert s["fault-latency-p50"] is not None and s["fault-latency-p50"] > 0
        assert s["postcopy-blocktime"] is not None and s["postcopy-blocktime"] > 0
        assert list(s["postcopy-vcpu-blocktime"]) == [reader.native_id]


@needs_postcopy
def test_zero_pages_and_pages_placed_twice() -> None:
    mem = mig.GuestMemory(PAGE * 8)
    with mig.PostcopyRegion() as region:
        region.register(mem)
        reader = Reader(mem, 2)
        assert wait_requests(region, 1) == [2]
        assert region.place_zero(2) is True
        assert reader.result() == bytes(PAGE)
        first = pattern(1)
        assert region.place(3, first) is True
        # A second placement is a no-op: the first content stays, whole.
        assert region.place(3, pattern(2)) is False
        assert region.place_zero(3) is False
        assert region.place(2, first) is False
        assert mem.array[3 * PAGE : 4 * PAGE].tobytes() == first
        assert mem.array[2 * PAGE : 3 * PAGE].tobytes() == bytes(PAGE)
        assert region.is_placed(3) and not region.is_placed(4)


@needs_postcopy
def test_discard_drops_stale_content() -> None:
    mem = mig.GuestMemory(PAGE * 8)
    mem.array[:] = 0xEE
    region = mig.PostcopyRegion()
    with pytest.raises(ValueError, match="exceed"):
        region.register(mem, discard=[(6, 3)])
    assert not region.registered
    region.register(mem, discard=[(2, 3), (7, 1)])
    try:
        # Kept pages are readable at once, without a request.
        assert mem.array[: 2 * PAGE].tobytes() == b"\xee" * (2 * PAGE)
        assert mem.array[5 * PAGE : 7 * PAGE].tobytes() == b"\xee" * (2 * PAGE)
        assert region.next_requests(0.05) == []
        # Discarded pages are missing: stale bytes are gone.
        readers = {p: Reader(mem, p) for p in (3, 7)}
        assert sorted(wait_requests(region, 2)) == [3, 7]
        region.place(3, pattern(3))
        region.place_zero(7)
        assert readers[3].result() == pattern(3)
        assert readers[7].result() == bytes(PAGE)
        # Held pages are not overwritten by a late copy.
        assert region.place(0, pattern(0)) is False
        assert mem.array[:PAGE].tobytes() == b"\xee" * PAGE
        assert region.stats()["pages-discarded"] == 4
    finally:
        region.close()


@needs_postcopy
def test_stats_count_exactly() -> None:
    mem = mig.GuestMemory(PAGE * 32)
    with mig.PostcopyRegion(vcpus=2) as region:
        region.register(mem, discard=[(0, 32)])
        a, b = Reader(mem, 9), Reader(mem, 9)  # two threads, one page
        c = Reader(mem, 10)
        reqs = wait_requests(region, 2)
        assert sorted(reqs) == [9, 10]
        # The second thread's fault may still be on its way: wait for it.
        for _ in range(500):
            if region.stats()["postcopy-faults"] == 3:
                break
            time.sleep(0.01)
        region.place(9, pattern(9))
        region.place_zero(10)
        for p in range(11, 15):
            region.place(p, pattern(p))
        region.place(11, pattern(0))
        region.place_zero(12)
        assert a.result() == b.result() == pattern(9)
        assert c.result() == bytes(PAGE)
        s = region.stats()
        assert s["postcopy-requests"] == 2
        assert s["postcopy-faults"] == 3
        assert s["faults-resolved"] == 3
        assert s["pages-placed"] == 5
        assert s["zero-pages-placed"] == 1
        assert s["already-present"] == 2
        assert s["pages-discarded"] == 32
        assert set(s["postcopy-vcpu-blocktime"]) == {a.native_id, b.native_id, c.native_id}
    # The figures outlive close().
    assert region.stats()["pages-placed"] == 5


@needs_postcopy
def test_bad_input_is_refused_without_damage() -> None:
    mem = mig.GuestMemory(PAGE * 4)
    region = mig.PostcopyRegion()
    with pytest.raises(ValueError, match="not registered"):
        region.place(0, pattern(0))
    region.register(mem)
    try:
        with pytest.raises(ValueError, match="already registered"):
            region.register(mem)
        with pytest.raises(ValueError, match="outside"):
            region.place(4, pattern(0))
        with pytest.raises(ValueError, match="bytes"):
            region.place(1, b"short")
        with pytest.raises(ValueError):
            region.next_requests(-1.0)
        assert region.place(1, pattern(1)) is True
        assert mem.array[PAGE : 2 * PAGE].tobytes() == pattern(1)
    finally:
        region.close()
    region.close()  # idempotent
    # A dirty tracker and a post-copy region cannot both own the memory.
    if CAPS["uffd"]["available"]:
        with mig.DirtyTracker(mem, "uffd"):
            with pytest.raises(ValueError, match="already registered with another"):
                mig.PostcopyRegion().register(mem)


# ---- a guest running on the destination ----------------------------------------------


@needs_postcopy
def test_vcpu_writer_with_a_serving_source_ends_identical() -> None:
    """The destination holds some pages from pre-copy (some of them stale,
    some never sent). A vCPU-like thread reads and writes every page while a
    source thread serves its requests first and pushes the rest in the
    background; the result equals the source with the same writes applied."""
    n = 256
    rng = np.random.default_rng(7)
    src = mig.GuestMemory(PAGE * n)
    src.array[:] = rng.integers(0, 256, PAGE * n, dtype=np.uint8)
    zero = rng.choice(n, 24, replace=False)
    for p in zero:
        src.array[p * PAGE : (p + 1) * PAGE] = 0
    dst = mig.GuestMemory(PAGE * n)
    held = rng.random(n) < 0.5  # pages pre-copy delivered...
    stale = held & (rng.random(n) < 0.3)  # ...of which the source dirtied these later
    for p in np.flatnonzero(held):
        dst.array[p * PAGE : (p + 1) * PAGE] = src.array[p * PAGE : (p + 1) * PAGE]
    for p in np.flatnonzero(stale):
        src.array[p * PAGE : p * PAGE + 8] ^= 0xFF
    discard = [(int(p), 1) for p in np.flatnonzero(stale)]
    frozen = src.array.copy()
    src_pages = [frozen[p * PAGE : (p + 1) * PAGE].tobytes() for p in range(n)]
    order = rng.permutation(n)

    expected = frozen.copy()
    for p in order:
        expected[p * PAGE : p * PAGE + 8] ^= 0x5A

    region = mig.PostcopyRegion(vcpus=1)
    region.register(dst, discard=discard)
    done = threading.Event()
    errors: list[BaseException] = []

    def serve(p: int) -> None:
        if not frozen[p * PAGE : (p + 1) * PAGE].any():
            region.place_zero(p)
        else:
            region.place(p, src_pages[p])

    def source() -> None:
        try:
            push = iter(range(n))
            while not done.is_set():
                for p in region.next_requests(0.002):
                    serve(p)  # requests before the background push
                p = next(push, None)
                if p is not None:
                    serve(p)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)

    def vcpu() -> None:
        buf = ctypes.create_string_buffer(8)
        for p in order:
            a = addr(dst, int(p))
            ctypes.memmove(buf, a, 8)  # faults here if missing
            word = bytes(x ^ 0x5A for x in buf.raw)
            ctypes.memmove(a, word, 8)

    s = threading.Thread(target=source, daemon=True)
    v = threading.Thread(target=vcpu, daemon=True)
    s.start()
    v.start()
    v.join(60)
    assert not v.is_alive(), "the vCPU thread is still blocked"
    done.set()
    s.join(WAIT)
    assert not errors, errors
    # Every page the source had pushed or served is present.
    for p in range(n):
        serve(p)
    stats = region.stats()
    region.close()
    assert mig._mig.digest_bytes(expected) == dst.digest(0, dst.num_pages)  # plain xxh3
    assert np.array_equal(dst.array, expected)
    assert stats["postcopy-requests"] > 0
    missing_at_start = int(n - held.sum() + stale.sum())
    placed = stats["pages-placed"] + stats["zero-pages-placed"]
    assert placed == missing_at_start
    assert stats["postcopy-requests"] <= missing_at_start
