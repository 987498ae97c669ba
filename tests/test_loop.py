"""The source loop in virtual time: every policy, SLA, aids, rollback."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from loopkit import BlobDevice, SoftTracker, VirtualGuest, VirtualLink

import mig
from mig.clock import VirtualClock
from mig.handlers import RamHandler
from mig.policies import policy_names
from mig.protocol import Complete, Go, Ready, Resumed, SwitchoverAbort
from mig.source import MigrationSource

MIB = 1 << 20


def setup_vm(
    size: int = 16 * MIB,
    rate: float = 2000.0,
    bandwidth: float = 100e6,
    working_set: int | None = None,
    devices: int = 0,
    dev_stop: int = 1 * MIB,
    dev_needs_stop: bool = True,
    **params: Any,
):
    clock = VirtualClock()
    src = mig.GuestMemory(size)
    dst = mig.GuestMemory(size)
    tracker = SoftTracker(src)
    guest = VirtualGuest(src, clock, tracker, rate=rate, working_set=working_set)
    link = VirtualLink(src, dst, clock, bandwidth)
    devs = [
        BlobDevice(
            f"blob{i}", i, clock, dev_stop, dirty_rate=200e3, exact_needs_stop=dev_needs_stop
        )
        for i in range(1, devices + 1)
    ]
    params.setdefault("timeout", 60)  # virtual seconds: a stuck loop fails, never hangs
    source = MigrationSource(guest, devs, link=link, tracker=tracker, clock=clock, **params)
    return source, guest, link, src, dst, devs


def digest_before(src: mig.GuestMemory) -> int:
    return src.digest()


@pytest.mark.parametrize("policy", policy_names())
def test_every_policy_migrates_byte_exact(policy: str) -> None:
    source, guest, link, src, dst, devs = setup_vm(policy=policy, devices=1)
    q = source.run()
    assert q["status"] == "completed", q.get("error-desc")
    assert q["verified"] and link.resumed
    assert src.digest() == dst.digest()
    assert not guest.running  # the source stays paused after completion
    assert q["downtime"] > 0 and set(q["downtime-breakdown"]) >= {
        "final-sync",
        "final-ram",
        "device-state",
        "load",
        "handshake",
    }
    seqs = [r[0] for r in link.device_records[1]]
    assert seqs == list(range(len(seqs))) and link.device_records[1][-1][2]
    assert q["devices"][0]["stop-copy-bytes"] >= 1 * MIB
    assert q["ram"]["dirty-sync-count"] >= 2 and q["passes"]


@pytest.mark.parametrize("policy", ["exact-running", "stop-exact-resume", "adaptive"])
def test_sla_downtime_within_limit(policy: str) -> None:
    # 50 MB/s, 4000 pages/s (16 MB/s) dirtied over a 4 MiB hot set: converges.
    source, *_ = setup_vm(size=32 * MIB, rate=4000, bandwidth=50e6, working_set=1024, policy=policy)
    q = source.run()
    assert q["status"] == "completed"
    assert q["downtime"] <= 300, q["downtime-breakdown"]


class SlowSyncTracker(SoftTracker):
    """A tracker whose every sync costs ``cost`` seconds of virtual time."""

    def __init__(self, memory: mig.GuestMemory, clock: VirtualClock, cost: float) -> None:
        super().__init__(memory)
        self.clock = clock
        self.cost = cost

    def sync(self) -> mig.DirtyBitmap:
        self.clock.advance(self.cost)
        self.last_sync_seconds = self.cost
        return super().sync()


class ListedSyncTracker(SoftTracker):
    """A tracker whose syncs report the listed durations, in turn."""

    def __init__(self, memory: mig.GuestMemory, costs: list[float]) -> None:
        super().__init__(memory)
        self.costs = list(costs)

    def sync(self) -> mig.DirtyBitmap:
        self.last_sync_seconds = self.costs.pop(0)
        return super().sync()


def test_the_final_sync_is_planned_from_the_least_of_the_recent_syncs() -> None:
    """A sync that waited 40 ms for a core is not what the final sync costs:
    the plan takes the least of the last three syncs, and a spike leaves the
    estimate only once three slow syncs in a row say the walk got slower."""
    memory = mig.GuestMemory(MIB)
    tracker = ListedSyncTracker(memory, [0.005, 0.001, 0.009, 0.040, 0.050, 0.060])
    ram = RamHandler(memory, tracker, VirtualClock())
    for _ in range(4):
        ram.sync()
    assert ram.last_sync_seconds == pytest.approx(0.040)
    assert ram.final_sync_estimate() == pytest.approx(0.001)
    ram.sync()
    ram.sync()
    assert ram.final_sync_estimate() == pytest.approx(0.040)


@pytest.mark.parametrize("policy", ["exact-running", "adaptive"])
def test_fixed_switchover_costs_leave_room_in_the_limit(policy: str) -> None:
    # 3000 pages/s over 32 MiB against 50 MB/s: the final set lands near the
    # byte threshold. The final sync costs 80 ms on top: planned for, the
    # downtime still fits (not planned for, it is ~80 ms over).
    clock = VirtualClock()
    src, dst = mig.GuestMemory(32 * MIB), mig.GuestMemory(32 * MIB)
    tracker = SlowSyncTracker(src, clock, 0.080)
    guest = VirtualGuest(src, clock, tracker, rate=3000)
    link = VirtualLink(src, dst, clock, 50e6)
    source = MigrationSource(
        guest, link=link, tracker=tracker, clock=clock, policy=policy, timeout=30
    )
    q = source.run()
    assert q["status"] == "completed", q.get("error-desc")
    assert src.digest() == dst.digest()
    assert q["switchover-costs"]["final-sync"] == pytest.approx(80)
    assert q["downtime-breakdown"]["final-sync"] == pytest.approx(80)
    assert q["downtime"] <= 300, q["downtime-breakdown"]
    assert q["predicted-downtime"] <= 300


def _slow_sync_source(policy: str) -> MigrationSource:
    clock = VirtualClock()
    src, dst = mig.GuestMemory(16 * MIB), mig.GuestMemory(16 * MIB)
    tracker = SlowSyncTracker(src, clock, 0.400)  # a sync alone outlasts 300 ms
    guest = VirtualGuest(src, clock, tracker, rate=100)
    link = VirtualLink(src, dst, clock, 100e6)
    return MigrationSource(
        guest, link=link, tracker=tracker, clock=clock, timeout=20, policy=policy
    )


def test_fixed_costs_over_the_limit_are_the_reported_reason() -> None:
    q = _slow_sync_source("exact-running").run()
    assert q["status"] == "cancelled" and "timeout" in q["error-desc"]
    assert q["non-convergence"].startswith("fixed switchover costs of 4")
    assert q["switchover-costs"]["final-sync"] == pytest.approx(400)


def test_adaptive_switches_over_when_no_wait_can_fit_and_predicts_it() -> None:
    """Fixed costs alone over the limit: adaptive switches over as QEMU would,
    and its predicted downtime says so before the guest stops."""
    q = _slow_sync_source("adaptive").run()
    assert q["status"] == "completed"
    assert q["downtime"] > 400
    assert q["predicted-downtime"] == pytest.approx(q["downtime"], rel=0.1)


def test_estimate_only_misses_what_exact_sees() -> None:
    """Without a sync the estimate ignores pages dirtied during the pass.

    The policy must decide mid-pass: the pass's last slice (spans of 640
    pages at this bandwidth) leaves 128 pages, under the threshold, while
    the working set is dirty again."""
    kw = dict(size=28 * MIB, rate=20000, bandwidth=50e6, working_set=512, downtime_limit=50)
    est = setup_vm(policy="estimate-only", **kw)[0].run()
    exact = setup_vm(policy="exact-running", **kw)[0].run()
    assert est["status"] == exact["status"] == "completed"
    assert est["downtime"] > 50 >= exact["downtime"]


def test_stop_policies_count_guest_stops() -> None:
    kw = dict(devices=1, dev_stop=512 << 10, rate=3000, working_set=512)
    q_ser = setup_vm(policy="stop-exact-resume", **kw)[0].run()
    q_ad = setup_vm(policy="adaptive", **kw)[0].run()
    q_run = setup_vm(policy="exact-running", **kw)[0].run()
    assert q_run["guest-stops"] == 0
    assert q_ser["status"] == q_ad["status"] == "completed"
    assert q_ad["guest-stops"] <= q_ser["guest-stops"]


def test_assume_zero_device_underestimates_downtime() -> None:
    kw = dict(devices=1, dev_stop=8 * MIB, rate=500, working_set=256, downtime_limit=100)
    zero = setup_vm(policy="assume-zero-device", **kw)[0].run()
    assert zero["status"] == "completed"
    # 8 MiB of hidden device state at 100 MB/s is ~84 ms on top of RAM.
    assert zero["downtime-breakdown"]["device-state"] > 80


def test_device_checks_sla_abandons_switchover_then_continues() -> None:
    source, guest, link, src, dst, devs = setup_vm(
        policy="device-checks-sla",
        devices=1,
        dev_stop=16 * MIB,
        downtime_limit=100,
        timeout=20,
        timeout_action="force",
    )
    q = source.run()
    assert q["switchover-aborts"] >= 1
    aborts = [m for m in link.sent if isinstance(m, SwitchoverAbort)]
    assert aborts and aborts[0].aborted
    assert q["guest-stops"] >= 1  # each abandoned switchover resumed the guest
    assert q["status"] == "completed" and src.digest() == dst.digest()


def test_device_checks_sla_can_fail_instead() -> None:
    source, guest, link, src, *_ = setup_vm(
        policy="device-checks-sla",
        policy_options={"fail_on_over_budget": True},
        devices=1,
        dev_stop=16 * MIB,
        downtime_limit=100,
    )
    before = src.digest()
    guest.rate = 0  # nothing writes: the source digest must stay as it was
    q = source.run()
    assert q["status"] == "failed" and "over budget" in q["error-desc"]
    assert guest.running and link.discarded and src.digest() == before


def test_cached_exact_stops_only_when_stale() -> None:
    kw = dict(devices=1, dev_stop=256 << 10, rate=3000, working_set=512)
    q_cached = setup_vm(policy="cached-exact", **kw)[0].run()
    assert q_cached["status"] == "completed"
    assert q_cached["guest-stops"] <= 2


def _non_converging(**params: Any):
    # 30 MB/s dirtied over all of RAM, 20 MB/s link: never converges alone.
    return setup_vm(size=64 * MIB, rate=7500, bandwidth=20e6, **params)


def test_non_convergence_detected_with_reason() -> None:
    source, guest, *_ = _non_converging(timeout=15)
    events: list[tuple[str, dict]] = []
    source.on_event = lambda name, info: events.append((name, info))
    q = source.run()
    assert q["status"] == "cancelled" and "timeout" in q["error-desc"]
    assert q["non-convergence"] and "exceeds what the bandwidth" in q["non-convergence"]
    assert any(name == "non-convergence" for name, _ in events)
    assert guest.running


@pytest.mark.parametrize("mode", ["qemu", "proportional"])
def test_auto_converge_makes_it_converge(mode: str) -> None:
    source, guest, link, src, dst, _ = _non_converging(auto_converge=mode, timeout=120)
    q = source.run()
    assert q["status"] == "completed", q.get("error-desc")
    assert guest.throttle == 0.0 and q["cpu-throttle-percentage"] == 0
    assert src.digest() == dst.digest()


def test_proportional_converges_at_least_twice_as_fast_as_qemu() -> None:
    times = {}
    for mode in ("qemu", "proportional"):
        q = _non_converging(auto_converge=mode, timeout=300)[0].run()
        assert q["status"] == "completed"
        times[mode] = q["total-time"]
    assert times["proportional"] * 2 <= times["qemu"], times


def test_dirty_limit_converges() -> None:
    source, guest, link, src, dst, _ = _non_converging(dirty_limit=1000, timeout=60)
    q = source.run()
    assert q["status"] == "completed" and guest.dirty_limit == 0
    assert src.digest() == dst.digest()


def test_timeout_force_completes_anyway() -> None:
    source, guest, link, src, dst, _ = _non_converging(timeout=5, timeout_action="force")
    q = source.run()
    assert q["status"] == "completed" and src.digest() == dst.digest()
    assert q["total-time"] >= 5000


def test_bandwidth_estimate_follows_max_bandwidth_cap() -> None:
    cap = 20_000_000
    source, *_ = setup_vm(size=64 * MIB, rate=0, bandwidth=1e9, max_bandwidth=cap)
    samples: list[float] = []
    source.on_pass = lambda rec: samples.append(rec["bandwidth"])
    q = source.run()
    assert q["status"] == "completed"
    assert source.meter.samples >= 20
    assert abs(source.meter.smoothed - cap) / cap < 0.05


def test_no_decision_plans_with_one_slices_rate() -> None:
    """Until the meter closes its first window (or the bulk pass ends) the
    policies see no bandwidth: nothing fits, so no stop rests on one slice's
    rate. A whole 256 MiB guest at 2 GB/s would fit a 300 ms limit."""
    source, *_ = setup_vm(size=256 * MIB, rate=0, bandwidth=2e9, policy="stop-exact-resume")
    seen: list[tuple[float, int, int]] = []
    decide = source.policy.decide

    def spy(view: Any) -> Any:
        seen.append((view.bandwidth, source.meter.samples, view.sync_count))
        return decide(view)

    source.policy.decide = spy  # type: ignore[method-assign]
    q = source.run()
    assert q["status"] == "completed", q.get("error-desc")
    early = [bw for bw, samples, syncs in seen if not samples and syncs < 2]
    assert len(early) >= 2 and not any(early), seen[:5]
    assert any(bw > 0 for bw, _, _ in seen)


PHASES = ["setup", "active", "stopped-for-exact", "device"]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("how", ["cancel", "failure"])
def test_rollback_in_every_phase(phase: str, how: str) -> None:
    source, guest, link, src, dst, devs = setup_vm(
        policy="stop-exact-resume", devices=1, dev_stop=64 << 10
    )
    guest.rate = 0  # a still guest: the source digest must not change at all
    before = src.digest()

    def trigger() -> None:
        if how == "cancel":
            source.cancel(f"cancel in {phase}")
        else:
            raise RuntimeError(f"injected failure in {phase}")

    def on_status(status: str) -> None:
        if status == phase:
            trigger()

    def on_event(name: str, info: dict) -> None:
        if phase == "stopped-for-exact" and name == "guest-stop" and source.status == "active":
            trigger()

    source.on_status = on_status
    source.on_event = on_event
    q = source.run()
    want = "cancelled" if how == "cancel" else "failed"
    assert q["status"] == want, q
    assert phase in q["error-desc"]
    assert guest.running, "source guest must run again"
    assert devs[0].aborted and not link.resumed
    assert link.discarded or not link.sent  # told, or never reached
    assert src.digest() == before


def test_destination_failure_at_complete_rolls_back() -> None:
    source, guest, link, src, *_ = setup_vm()
    link.fail_on = Complete
    q = source.run()
    assert q["status"] == "failed" and "injected at complete" in q["error-desc"]
    assert guest.running


def test_destination_failure_after_go_rolls_back() -> None:
    """Its "failed" says it discarded everything: the source may run again."""
    source, guest, link, src, *_ = setup_vm(devices=1)
    link.fail_on = Go
    q = source.run()
    assert q["status"] == "failed" and "injected at go" in q["error-desc"], q
    assert guest.running and not q.get("postmigrate") and not link.resumed


def test_a_lost_resumed_leaves_the_source_paused() -> None:
    """After "go" the destination may run: the source never resumes on its own."""
    source, guest, link, src, _, devs = setup_vm(devices=1, switchover_timeout=2.0)
    link.lose = Resumed
    q = source.run()
    assert q["status"] == "failed" and q["postmigrate"], q
    assert "outcome unknown after 'go'" in q["error-desc"], q
    assert "did not report its guest resumed" in q["error-desc"], q
    assert link.resumed and not guest.running and not devs[0].aborted
    assert not link.discarded  # no "failed" told to a destination that runs
    assert not source.cancel()
    source.resume_source()  # the embedder's call: here, to check what it restores
    assert guest.running and devs[0].aborted and not q.get("downtime")


def test_a_lost_ready_rolls_back() -> None:
    source, guest, link, src, *_ = setup_vm(switchover_timeout=2.0)
    link.lose = Ready
    q = source.run()
    assert q["status"] == "failed" and not q.get("postmigrate"), q
    assert "did not report its state loaded and verified ('ready')" in q["error-desc"]
    assert guest.running and link.discarded
    assert not any(isinstance(m, Go) for m in link.sent)


def test_bad_parameters_are_refused() -> None:
    clock = VirtualClock()
    mem = mig.GuestMemory(1 * MIB)
    guest = VirtualGuest(mem, clock, SoftTracker(mem), rate=0)
    with pytest.raises(ValueError, match="unknown migration parameters: bogus"):
        MigrationSource(guest, uri="tcp:x:1", bogus=1)
    with pytest.raises(ValueError, match="unknown policy"):
        MigrationSource(guest, uri="tcp:x:1", policy="nope")
    with pytest.raises(ValueError, match="timeout_action"):
        MigrationSource(guest, uri="tcp:x:1", timeout_action="explode")
    with pytest.raises(ValueError, match="auto_converge"):
        MigrationSource(guest, uri="tcp:x:1", auto_converge="fast")
    with pytest.raises(ValueError, match="zero_copy_send must be a bool"):
        MigrationSource(guest, uri="tcp:x:1", zero_copy_send="yes")
    with pytest.raises(ValueError, match="zero_copy_send needs compression 'none'"):
        MigrationSource(guest, uri="tcp:x:1", zero_copy_send=True, compression="lz4")


def test_query_uses_query_migrate_names() -> None:
    source, *_ = setup_vm()
    q = source.run()
    for key in ("status", "total-time", "downtime", "setup-time", "cpu-throttle-percentage"):
        assert key in q
    for key in (
        "transferred",
        "remaining",
        "total",
        "duplicate",
        "normal",
        "normal-bytes",
        "dirty-sync-count",
        "mbps",
        "dirty-pages-rate",
        "pages-per-second",
        "precopy-bytes",
        "downtime-bytes",
    ):
        assert key in q["ram"], key
    for key in (
        "policy",
        "guest-stops",
        "guest-stopped-time",
        "downtime-breakdown",
        "verified",
        "devices",
        "passes",
    ):
        assert key in q
    assert q["ram"]["transferred"] >= q["ram"]["total"]
    assert np.isclose(sum(q["downtime-breakdown"].values()), q["downtime"])
