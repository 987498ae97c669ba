"""WorkloadGuest: spec parsing, content-changing writes, pause/resume, pacing,
throttle and dirty limit."""

from __future__ import annotations

import time

import numpy as np
import pytest

import mig

PAGE = mig.GuestMemory(4096 * 16).page_size


def slot_sum(mem: mig.GuestMemory) -> int:
    """Sum of every vCPU's u64 counter slot: each page write adds exactly one."""
    words = mem.array.view(np.uint64).reshape(-1, PAGE // 8)
    return int(words.sum(dtype=np.uint64))


def run_for(g: mig.WorkloadGuest, seconds: float) -> dict:
    """Achieved rate over `seconds` of running, from the writes counter."""
    g.resume()
    # A change applies from each vCPU's next batch; let in-flight batches land.
    time.sleep(0.05)
    a = g.stats()["writes"]
    t0 = time.monotonic()
    time.sleep(seconds)
    b = g.stats()["writes"]
    return {"rate": (b - a) / (time.monotonic() - t0), "stats": g.stats()}


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("sequental:rate=5", "unknown workload"),
        ("uniform:wss=12XB", "wss"),
        ("uniform:rate=fast", "rate=fast"),
        ("uniform:rate=0", "rate=0"),
        ("hotset:hot=1.5", "hot=1.5"),
        ("hotset:hotprob=2", "hotprob=2"),
        ("zipf:s=-1", "s=-1"),
        ("uniform:hot=0.1", 'no field "hot"'),
        ("uniform:wss=2MiB", "exceeds guest memory"),
        ("uniform:wss=5000", "multiple of the page size"),
    ],
)
def test_bad_specs_name_the_field(spec: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        mig.WorkloadGuest(mig.GuestMemory(1 << 20), vcpus=1, workload=spec)


def test_bad_vcpu_count() -> None:
    with pytest.raises(ValueError, match="vcpus"):
        mig.WorkloadGuest(mig.GuestMemory(1 << 20), vcpus=0)


@pytest.mark.parametrize(
    "spec",
    [
        "sequential:wss=64KiB,rate=max",
        "uniform:wss=64KiB,rate=max",
        "hotset:wss=64KiB,hot=0.25,hotprob=0.9,rate=max",
        "zipf:wss=64KiB,s=1.1,rate=max",
    ],
)
def test_every_write_changes_content_inside_the_working_set(spec: str) -> None:
    mem = mig.GuestMemory(1 << 20)
    zero = mig.GuestMemory(1 << 20)
    wss_pages = (64 << 10) // PAGE
    with mig.WorkloadGuest(mem, vcpus=2, workload=spec) as g:
        assert isinstance(g, mig.Guest) and g.workload == spec and g.vcpus == 2
        time.sleep(0.05)
        latency = g.pause()
        assert 0 < latency < 1.0
        st = g.stats()
        assert st["writes"] > 0 and st["running"] is False
        assert st["writes"] == sum(st["vcpu-writes"])
        # Every counted write is in memory, and nothing outside the set moved.
        assert slot_sum(mem) == st["writes"]
        n = mem.num_pages - wss_pages
        assert mem.digest(wss_pages, n) == zero.digest(wss_pages, n)


def test_sequential_sweeps_each_page() -> None:
    mem = mig.GuestMemory(PAGE * 64)
    with mig.WorkloadGuest(mem, vcpus=2, workload="sequential:rate=max") as g:
        time.sleep(0.02)
        g.pause()
        slots = mem.array.view(np.uint64).reshape(-1, PAGE // 8)[:, :2]
        # Each vCPU sweeps its own half round-robin: within it, page counts
        # differ by at most one; it never writes the other half.
        for vcpu, (lo, hi) in enumerate([(0, 32), (32, 64)]):
            mine = slots[lo:hi, vcpu]
            assert int(mine.min()) > 0 and int(mine.max()) - int(mine.min()) <= 1
            assert not slots[:lo, vcpu].any() and not slots[hi:, vcpu].any()


def test_hotset_concentrates_writes() -> None:
    mem = mig.GuestMemory(PAGE * 1000)
    spec = "hotset:hot=0.1,hotprob=0.9,rate=max"
    with mig.WorkloadGuest(mem, vcpus=1, workload=spec) as g:
        time.sleep(0.05)
        g.pause()
        per_page = mem.array.view(np.uint64).reshape(-1, PAGE // 8)[:, 0]
        share = per_page[:100].sum() / per_page.sum()
        assert 0.85 < share < 0.95


def test_pause_stops_writes_and_counts_paused_time() -> None:
    mem = mig.GuestMemory(1 << 20)
    with mig.WorkloadGuest(mem, vcpus=3, workload="uniform:rate=max") as g:
        assert g.running and g.memory is mem
        time.sleep(0.02)
        assert g.pause() > 0
        assert g.pause() == 0.0  # already paused
        d, w = mem.digest(), g.stats()["writes"]
        time.sleep(0.1)
        st = g.stats()
        assert mem.digest() == d and st["writes"] == w
        assert st["paused-time"] >= 0.1 and st["stop-latency"] > 0
        g.resume()
        time.sleep(0.02)
        assert g.stats()["writes"] > w
    assert g.closed and not g.running
    with pytest.raises(ValueError, match="closed"):
        g.pause()
    g.close()  # idempotent


def test_idle_never_writes_and_still_pauses() -> None:
    mem = mig.GuestMemory(1 << 16)
    with mig.WorkloadGuest(mem, vcpus=2) as g:
        time.sleep(0.02)
        assert g.pause() < 1.0
        assert g.stats()["writes"] == 0 and g.stats()["rate"] == 0
        assert mem.digest() == mig.GuestMemory(1 << 16).digest()


def test_paced_rate_is_held() -> None:
    """A paced guest on an idle-ish core lands near its target. The 5 % figure
    over 1 k–1 M writes/s is measured in benches/bench_workload.py."""
    mem = mig.GuestMemory(1 << 22)
    with mig.WorkloadGuest(mem, vcpus=2, workload="uniform:rate=4000") as g:
        got = run_for(g, 0.5)
        assert 0.75 * 4000 < got["rate"] < 1.25 * 4000
        assert got["stats"]["target-rate"] == 4000


def test_throttle_sleeps_its_share_and_pause_interrupts_it() -> None:
    mem = mig.GuestMemory(1 << 22)
    with mig.WorkloadGuest(mem, vcpus=1, workload="uniform:rate=20000") as g:
        g.set_throttle(0.5)
        got = run_for(g, 0.5)
        assert got["stats"]["throttle"] == 0.5
        assert 0.3 * 20000 < got["rate"] < 0.7 * 20000
        g.set_throttle(0.99)  # ~1 s naps; pause must not wait for them
        time.sleep(0.05)
        assert g.pause() < 0.5
        with pytest.raises(ValueError, match="throttle"):
            g.set_throttle(1.0)


def test_dirty_limit_caps_each_vcpu() -> None:
    mem = mig.GuestMemory(1 << 22)
    with mig.WorkloadGuest(mem, vcpus=2, workload="uniform:rate=max") as g:
        g.set_dirty_limit(1000)
        got = run_for(g, 0.5)
        assert got["stats"]["dirty-limit"] == 1000
        assert 0.75 * 2000 < got["rate"] < 1.25 * 2000
        g.set_dirty_limit(0)
        assert run_for(g, 0.1)["rate"] > 10 * 2000
        with pytest.raises(ValueError, match="dirty limit"):
            g.set_dirty_limit(-1)
