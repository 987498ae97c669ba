"""The simulator: workload grammar, models, and the real loop in virtual time."""

from __future__ import annotations

import pytest

import mig
from mig.policies import policy_names
from mig.sim import LinkModel, SimConfig, parse_workload, simulate

MIB = 1 << 20


def small(**kw) -> SimConfig:
    base = dict(
        memory=64 * MIB,
        workload="uniform:rate=4000",
        params={"max_bandwidth": 64 * MIB, "downtime_limit": 300, "timeout": 60.0},
    )
    base.update(kw)
    return SimConfig(**base)


@pytest.mark.parametrize(
    "spec",
    ["idle", "uniform:rate=100", "sequential:wss=1MiB,rate=max", "hotset:hot=0.2,hotprob=0.5",
     "zipf:s=1.3,wss=4096", " uniform: rate = 5 "],
)  # fmt: skip
def test_workload_specs_the_native_guest_accepts_parse(spec: str) -> None:
    mem = mig.GuestMemory(4 * MIB)
    with mig._mig.WorkloadGuest(mem, 1, spec.strip()):
        pass
    parse_workload(spec)


@pytest.mark.parametrize(
    "spec",
    ["bogus", "uniform:rate=0", "uniform:rate=-1", "idle:rate=5", "hotset:hot=1", "hotset:hot=0",
     "hotset:hotprob=1.5", "zipf:s=0", "uniform:wss=0", "uniform:wss=3XB", "uniform:rate",
     "uniform :rate=5"],
)  # fmt: skip
def test_workload_specs_the_native_guest_rejects_fail(spec: str) -> None:
    mem = mig.GuestMemory(4 * MIB)
    with pytest.raises(Exception):  # noqa: B017 - the native error type is MigError/ValueError
        mig._mig.WorkloadGuest(mem, 1, spec)
    with pytest.raises(ValueError):
        parse_workload(spec)


@pytest.mark.parametrize("policy", policy_names())
def test_every_policy_completes_and_verifies_with_devices(policy: str) -> None:
    q = simulate(small(policy=policy, devices=("nic:state=2MiB,rate=1MiB/s", "opaque:state=2MiB")))
    assert q["status"] == "completed", q.get("error-desc")
    assert q["sim"]["verified"] and q["verified"]
    assert q["policy"] == policy
    assert [d["type"] for d in q["devices"]] == ["nic", "opaque"]
    assert all(d["stop-copy-bytes"] > 0 for d in q["devices"])
    assert q["ram"]["transferred"] >= 64 * MIB


def test_simulated_time_follows_the_bandwidth_cap() -> None:
    q = simulate(small(workload="idle"))
    wire = q["ram"]["transferred"]
    # An idle guest: one pass of the whole memory at the cap, plus small fixed costs.
    assert wire == pytest.approx(64 * MIB * (4096 + 8) / 4096, rel=0.01)
    assert q["total-time"] / 1000 == pytest.approx(wire / (64 * MIB), rel=0.1)


def test_zero_pages_cost_only_their_offsets() -> None:
    full = simulate(small(workload="idle"))["ram"]["transferred"]
    empty = simulate(small(workload="idle", prefilled=False))["ram"]["transferred"]
    assert empty < full / 100


def test_a_zeroed_guest_sends_as_data_only_what_it_wrote() -> None:
    # 64 MiB, uniform:rate=4000 for a 1 s warm-up: about 3500 distinct pages
    # of 16384 written before the migration starts. A page written during the
    # migration is sent as data at most twice more (in the pass that finds it
    # written, and once more if a later pass sees it dirty).
    q = simulate(small(workload="uniform:rate=4000", prefilled=False, warmup=1.0))
    normal = q["ram"]["normal"]
    assert 3000 <= normal <= 3600 + 2 * q["sim"]["guest-writes"]
    assert q["ram"]["transferred"] < normal * 4096 * 1.2 + 16384 * 64
    # Guest writes (pages) count from the migration's start, as a real run's do.
    assert q["sim"]["guest-writes"] < 4000 * q["total-time"] / 1000 * 1.1
    cold = simulate(small(workload="uniform:rate=4000", prefilled=False, warmup=0.0))
    assert cold["ram"]["normal"] < normal - 2500


def test_redirtied_pages_are_sent_again() -> None:
    idle = simulate(small(workload="idle"))
    busy = simulate(small(workload="hotset:rate=20000,wss=16MiB"))
    assert busy["ram"]["transferred"] > idle["ram"]["transferred"] + 4 * MIB
    assert len(busy["passes"]) > len(idle["passes"])


def test_channels_rtt_and_bottleneck_limit_throughput() -> None:
    link = LinkModel(channel_bandwidth=100 * MIB, rtt=0.01, window=1 * MIB, bottleneck=0)
    assert link.throughput(4, 0) == pytest.approx(4 * MIB / 0.01)
    assert LinkModel(channel_bandwidth=10 * MIB).throughput(4, 0) == 40 * MIB
    assert LinkModel(channel_bandwidth=10 * MIB, bottleneck=25 * MIB).throughput(4, 0) == 25 * MIB
    assert LinkModel(channel_bandwidth=10 * MIB).throughput(4, 5 * MIB) == 5 * MIB
    with pytest.raises(ValueError, match="finite"):
        LinkModel(rtt=0).throughput(1, 0)


def test_a_dma_device_not_quiesced_is_caught() -> None:
    """The DMA device writes guest pages until quiesced; the real handler does that
    before the final sync, so the copy verifies. Skipping quiesce loses pages."""
    from mig.device_handler import DeviceHandler

    ok = simulate(small(devices=("dma:dma=8MiB/s",)))
    assert ok["status"] == "completed" and ok["sim"]["verified"]
    original = DeviceHandler.quiesce
    DeviceHandler.quiesce = lambda self: None  # the wrong order: DMA runs past the final sync
    params = {"max_bandwidth": 64 * MIB, "downtime_limit": 300, "timeout": 60.0}
    try:
        # exact-running switches over as soon as the state fits, so the
        # stop-copy lasts long enough for the DMA to write (adaptive sends on
        # until almost nothing is left).
        strict = {**params, "verify": "strict"}
        bad = simulate(small(devices=("dma:dma=8MiB/s",), params=strict, policy="exact-running"))
        # After-resume, the default.
        late = simulate(small(devices=("dma:dma=8MiB/s",), policy="exact-running"))
    finally:
        DeviceHandler.quiesce = original
    # Strict refuses to resume; after-resume resumes, then reports the mismatch.
    assert bad["status"] == "failed" and "digest" in bad["error-desc"]
    assert late["status"] == "completed" and not late["verified"]
    assert "mismatch" in late["verify-error"] and not late["sim"]["verified"]


def test_aggregated_model_tracks_coarse_units() -> None:
    page = simulate(small(memory=256 * MIB, workload="uniform:rate=20000"))
    agg = simulate(small(memory=256 * MIB, workload="uniform:rate=20000", granularity=16))
    assert agg["sim"]["model"] == "aggregated" and page["sim"]["model"] == "page"
    for key in ("total-time",):
        assert agg[key] == pytest.approx(page[key], rel=0.15)
    assert agg["ram"]["transferred"] == pytest.approx(page["ram"]["transferred"], rel=0.15)
    assert SimConfig(memory=1 << 40).resolved_granularity() == 64


def test_config_round_trips_through_a_dict() -> None:
    c = small(devices=("fixed",), link=LinkModel(rtt=0.001))
    assert SimConfig.from_dict(c.to_dict()) == c


def test_link_jitter_varies_per_window_and_repeats_per_seed() -> None:
    """A jittery link: the same seed gives the same run, another seed another
    one, and the average rate still follows the cap."""
    from dataclasses import replace

    from mig.sim import HostModel

    host = replace(HostModel(), link_jitter=0.2)
    cfg = small(host=host, seed=3)
    a, b = simulate(cfg), simulate(cfg)
    c = simulate(cfg.with_(seed=4))
    steady = simulate(small(seed=3))
    assert a["total-time"] == b["total-time"] and a["passes"] == b["passes"]
    assert a["total-time"] != c["total-time"]
    assert a["status"] == c["status"] == "completed"
    # The steady link measures exactly the cap.
    assert steady["passes"][0]["bandwidth"] == pytest.approx(64 * MIB, rel=0.02)
    wire = a["ram"]["transferred"]
    assert a["total-time"] / 1000 == pytest.approx(wire / (64 * MIB), rel=0.15)


def test_only_stop_copy_device_state_is_loaded_in_the_downtime() -> None:
    """Device precopy is loaded while the guest runs; the switchover's load
    charges only what was sent after ``switchover``. A gpu-like device whose
    precopy grows 16-fold keeps the same load time; a device whose state all
    arrives at stop-copy (no precopy) pays for every byte of it. (The
    validation's hash of the whole state is made negligible here:
    ``tests/test_sim_switchover_terms.py`` pins it.)"""
    from dataclasses import replace

    from mig.sim import HostModel

    # Slow decoding, to make the term visible.
    host = replace(HostModel(), device_load_rate=100e6, device_hash_rate=1e15)

    def run(device: str) -> dict:
        q = simulate(small(workload="uniform:rate=2000", devices=(device,), host=host))
        assert q["status"] == "completed" and q["sim"]["verified"], q.get("error-desc")
        return q

    def expected_load_ms(q: dict) -> float:
        stop_copy = sum(d["stop-copy-bytes"] for d in q["devices"])
        # The destination's digest is its own term (dest-digest), not load.
        return 1000 * (host.load_base + stop_copy / host.device_load_rate)

    small_gpu = run("gpu:state=2MiB,rate=64KiB/s,chunk=64KiB")
    big_gpu = run("gpu:state=32MiB,rate=64KiB/s,chunk=64KiB")
    assert big_gpu["devices"][0]["precopy-bytes"] > 30 * MIB
    assert big_gpu["devices"][0]["stop-copy-bytes"] < MIB
    for q in (small_gpu, big_gpu):
        assert q["downtime-breakdown"]["load"] == pytest.approx(expected_load_ms(q), abs=1e-3)
    # The 16-fold precopy would cost hundreds of ms more if it were charged;
    # the load grows only by what the big gpu dirtied in its longer settle
    # (the destination's loop loads its precopy records before it answers).
    extra_precopy = (
        big_gpu["devices"][0]["precopy-bytes"] - small_gpu["devices"][0]["precopy-bytes"]
    )
    grown = big_gpu["downtime-breakdown"]["load"] - small_gpu["downtime-breakdown"]["load"]
    assert grown < 0.05 * 1000 * extra_precopy / host.device_load_rate
    # No precopy: all 8 MiB arrive at stop-copy and are loaded in the downtime.
    stopped = run("gpu:state=8MiB,rate=64KiB/s,chunk=64KiB,precopy=off")
    assert stopped["devices"][0]["stop-copy-bytes"] >= 8 * MIB
    assert stopped["downtime-breakdown"]["load"] == pytest.approx(
        expected_load_ms(stopped), abs=1e-3
    )
    assert stopped["downtime-breakdown"]["load"] > small_gpu["downtime-breakdown"]["load"] + 80


def test_calibration_times_the_real_tracker_with_dirty_pages() -> None:
    """The calibrated sync cost predicts a real userfaultfd sync (scan plus
    harvest) at another share of dirty pages than the one it was measured at,
    within a factor 3 (a shared host's noise); the device rates are measured."""
    import time

    from mig._mig import DirtyTracker, GuestMemory, capabilities
    from mig.sim import HostModel

    uffd = capabilities()["uffd"]
    if not uffd["available"]:
        pytest.skip(f"needs userfaultfd write-protect with PAGEMAP_SCAN: {uffd['reason']}")
    h = HostModel.calibrate(size=64 * MIB)
    assert h.sync_per_page > 0 and h.sync_per_dirty_page > 0
    rates = (h.device_rate, h.device_load_rate, h.device_hash_rate)
    defaults = (HostModel.device_rate, HostModel.device_load_rate, HostModel.device_hash_rate)
    assert all(r != d for r, d in zip(rates, defaults, strict=True))
    assert all(0 < r < 1e12 for r in rates)
    mem = GuestMemory(32 * MIB)
    mem.array[:] = 1
    stride = mem.page_size * 8  # an eighth of the pages (calibration writes a quarter)
    dirty = -(-mem.num_pages // 8)
    best = float("inf")
    with DirtyTracker(mem, backend="uffd") as tracker:
        tracker.sync()
        for _ in range(5):
            mem.array[::stride] += 1
            t0 = time.perf_counter()
            assert tracker.sync().count() == dirty
            best = min(best, time.perf_counter() - t0)
    model = h.sync_base + h.sync_per_page * mem.num_pages + h.sync_per_dirty_page * dirty
    assert model / 3 <= best <= model * 3, (best, model, h)


def test_a_sync_costs_more_with_more_dirty_pages() -> None:
    from dataclasses import replace

    from mig.sim import HostModel

    host = replace(HostModel(), sync_per_dirty_page=1e-6)
    # exact-running switches over as soon as the state fits, leaving the busy
    # guest pages to harvest (adaptive would send on until almost none are left).
    idle = simulate(small(workload="idle", host=host, policy="exact-running"))
    busy = simulate(small(workload="uniform:rate=4000", host=host, policy="exact-running"))
    assert idle["status"] == busy["status"] == "completed"
    # 1 µs per harvested page: the idle guest's last sync before the pause
    # (its cost is what the plan's final-sync term carries) finds nothing.
    idle_sync = idle["switchover-costs"]["final-sync"]
    # The busy guest's harvests what it wrote since the sync before it.
    assert busy["switchover-costs"]["final-sync"] >= idle_sync + 0.001  # ms: a page or more
    # The final sync in the downtime only meets what the guest wrote after
    # that harvest: no more than the harvest itself.
    assert busy["downtime-breakdown"]["final-sync"] <= busy["switchover-costs"]["final-sync"]


def test_a_capped_link_sends_its_idle_time_s_tokens_at_once() -> None:
    # The sender's token bucket: after the link idled, up to BURST_SECONDS
    # seconds of the cap leave without waiting; a busy link pays every byte.
    import numpy as np

    from mig.clock import VirtualClock
    from mig.sim import HostModel, SimGuest, SimLink, SimMemory, SimTracker
    from mig.sim_bucket import BURST_SECONDS

    clock, host = VirtualClock(), HostModel()
    memory = SimMemory(64 * MIB, 1, clock, host)
    guest = SimGuest(memory, clock, host)
    link = SimLink(guest, SimTracker(memory, clock, host), clock, LinkModel(), host, 1, [])
    link.set_max_bandwidth(64 * MIB)
    pages = mig.DirtyBitmap.from_indices(np.arange(1024, dtype=np.uint64), memory.num_pages)

    def timed_send() -> tuple[float, int]:
        t0 = clock.now()
        wire = link.send_pages(pages, 0)
        return clock.now() - t0, wire

    busy, wire = timed_send()
    assert busy == pytest.approx(wire / (64 * MIB), rel=0.01)
    clock.advance(1.0)  # idle: the bucket fills, to its limit only
    after_idle, wire = timed_send()
    assert after_idle == pytest.approx(wire / (64 * MIB) - BURST_SECONDS, rel=0.01)
