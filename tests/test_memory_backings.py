"""Guest memory on every backing the host offers: what it reports, that
uffd dirty tracking works on it (one test per backing), and that a stream
received into it is byte exact. A backing the host does not offer is
skipped with the reason the host gives."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from migratekit import migrate_loopback

import mig

PAGE = mig.GuestMemory(4096).page_size
HUGE = 2 << 20
OFFERS = {o["backing"]: o for o in mig.memory_backings()}
CAPS = mig.capabilities()
BACKINGS = ["memfd", "memfd-thp", "anon", "anon-thp", "hugetlb"]


def offered(backing: str) -> dict:
    offer = OFFERS[backing]
    if not offer["available"]:
        pytest.skip(f"host does not offer the {backing} backing: {offer['reason']}")
    return offer


def free_page_reporting() -> bool:
    """Whether a virtio balloon negotiated free page reporting (feature bit 5)."""
    return any(
        f.read_text()[5:6] == "1"
        for f in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*/features")
    )


def test_every_backing_has_an_offer_and_auto_picks_an_available_one() -> None:
    # Where the hypervisor takes back free huge-page-sized blocks, fresh
    # transparent huge pages are the slowest to fill: base pages come first.
    expect = (
        ["hugetlb", "anon", "memfd", "anon-thp", "memfd-thp"]
        if free_page_reporting()
        else ["hugetlb", "anon-thp", "memfd-thp", "anon", "memfd"]
    )
    assert [o["backing"] for o in mig.memory_backings()] == expect
    assert OFFERS["memfd"]["available"] and OFFERS["anon"]["available"]
    auto = mig.GuestMemory(HUGE * 2, "auto")
    assert OFFERS[auto.backing]["available"]
    assert auto.backing == mig.fastest_backing(HUGE * 2)


def test_unknown_backing_is_refused() -> None:
    with pytest.raises(ValueError, match="tmpfs"):
        mig.GuestMemory(PAGE, "tmpfs")


@pytest.mark.parametrize("backing", BACKINGS)
def test_backing_reports_what_it_got(backing: str) -> None:
    offer = offered(backing)
    mem = mig.GuestMemory(HUGE * 4, backing)
    assert mem.backing == backing
    assert mem.backing_page_size == offer["page-size"]
    assert (mem.fd is None) == backing.startswith("anon")
    mem.array[:] = 7
    huge = mem.huge_bytes()
    if backing in ("anon", "memfd") and offer["page-size"] == PAGE:
        assert huge == 0
    if backing == "hugetlb":
        assert huge == mem.size
    assert 0 <= huge <= mem.size


@pytest.mark.parametrize("backing", BACKINGS)
def test_populate_keeps_content(backing: str) -> None:
    offered(backing)
    mem = mig.GuestMemory(HUGE * 2, backing)
    mem.write(PAGE * 3, b"kept")
    mem.populate()
    assert mem.read(PAGE * 3, 4) == b"kept"
    with pytest.raises(ValueError, match="outside"):
        mem.populate(mem.size - PAGE, 2 * PAGE)


def changed_pages(before: np.ndarray, after: np.ndarray) -> set[int]:
    diff = (before != after).reshape(-1, PAGE).any(axis=1)
    return set(np.flatnonzero(diff).tolist())


@pytest.mark.skipif(
    not CAPS["uffd"]["available"], reason=f"host lacks uffd: {CAPS['uffd']['reason']}"
)
@pytest.mark.parametrize("backing", BACKINGS)
def test_uffd_tracking_sees_every_write(backing: str) -> None:
    """No write is ever missed. Extra pages may be reported only inside a
    huge page that had a real write (the write-protect bit of a huge page
    covers all of it)."""
    offer = offered(backing)
    mem = mig.GuestMemory(HUGE * 4, backing)
    mem.array[: HUGE * 2] = 1  # populated before tracking: some present, some not
    rng = np.random.default_rng(7)
    with mig.DirtyTracker(mem, "uffd") as t:
        assert t.sync().count() == 0
        for _ in range(3):
            before = mem.array.copy()
            for p in rng.choice(mem.num_pages, size=40, replace=False):
                mem.array[int(p) * PAGE + int(rng.integers(PAGE))] ^= 0xFF
            got = set(t.sync().indices().tolist())
            changed = changed_pages(before, mem.array)
            assert changed <= got, f"missed pages {sorted(changed - got)[:10]}"
            extra = got - changed
            if offer["page-size"] == PAGE:
                assert not extra, f"false positives {sorted(extra)[:10]}"
            else:
                per = offer["page-size"] // PAGE
                assert {p // per for p in extra} <= {p // per for p in changed}


@pytest.mark.parametrize("backing", BACKINGS)
def test_stream_into_backing_is_byte_exact(backing: str) -> None:
    offered(backing)
    size = HUGE * 8
    src = mig.GuestMemory(size)
    pages = src.array.reshape(-1, PAGE)
    rng = np.random.default_rng(5)
    pages[::2] = rng.integers(0, 256, size=pages[::2].shape, dtype=np.uint8)
    dst = mig.GuestMemory(size, backing)
    listener = mig.Listener("tcp:127.0.0.1:0")
    out: dict[str, mig.Receiver] = {}
    th = threading.Thread(target=lambda: out.update(r=listener.accept(dst, 10.0)))
    th.start()
    with mig.Sender(src, listener.uri, migration_id=9, channels=2) as sender:
        sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 1)
        sender.sync(1)
        pages[1::4] = 3  # rewritten pages go again in generation 2
        again = mig.DirtyBitmap.from_indices(range(1, src.num_pages, 4), src.num_pages)
        sender.send_pages(again, 2)
        sender.sync(2)
        sender.finish(src.digest())
    th.join()
    assert out["r"].wait_end(10.0)["digest"] == src.digest()
    assert np.array_equal(dst.array, src.array)


def test_info_lists_the_backings() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "mig.cli", "info", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    listed = {o["backing"]: o for o in json.loads(p.stdout)["memory-backings"]}
    assert listed == OFFERS


@pytest.mark.skipif(
    not CAPS["uffd"]["available"], reason=f"host lacks uffd: {CAPS['uffd']['reason']}"
)
@pytest.mark.parametrize("backing", ["anon", "anon-thp"])
def test_migration_into_a_backing_reports_what_it_got(backing: str) -> None:
    """A live migration into destination memory of another backing is byte
    exact, and the destination's query() says what its memory got."""
    offered(backing)
    size = HUGE * 16
    src, dst = mig.GuestMemory(size), mig.GuestMemory(size, backing)
    src.array[::PAGE] = 7
    q, d, _ = migrate_loopback(src, dst)
    assert q["status"] == "completed" and d["status"] == "completed" and d["verified"]
    assert src.digest() == dst.digest()
    assert d["memory-backing"] == backing
    assert d["memory-page-size"] == OFFERS[backing]["page-size"]
    assert d["memory-huge-bytes"] == dst.huge_bytes()
    if backing == "anon":
        assert d["memory-huge-bytes"] == 0


def test_demo_destination_uses_the_fastest_backing_and_says_so() -> None:
    size = 64 << 20
    p = subprocess.run(
        [sys.executable, "-m", "mig.cli", "demo", "--size", "64MiB", "--workload", "idle"]
        + ["--devices", "none", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    q = json.loads(p.stdout)
    assert q["status"] == "completed" and q["end-to-end-check"] == "passed"
    got = q["destination-memory"]
    assert got["memory-backing"] == mig.fastest_backing(size)
    assert got["memory-page-size"] == OFFERS[got["memory-backing"]]["page-size"]
    assert 0 <= got["memory-huge-bytes"] <= size
