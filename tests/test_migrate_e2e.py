"""End-to-end migrations over loopback: WorkloadGuest, kernel dirty tracking,
the streaming engine, MigrationSource and MigrationDestination."""

from __future__ import annotations

from typing import Any

import pytest
from migratekit import migrate_loopback

import mig
from mig.policies import policy_names
from mig.source import MigrationSource

MIB = 1 << 20
CAPS = mig.capabilities()
pytestmark = pytest.mark.skipif(
    not CAPS["uffd"]["available"],
    reason=f"host lacks the uffd capability: {CAPS['uffd']['reason']}",
)


def migrate(
    workload: str = "idle",
    size: int = 64 * MIB,
    on_status: Any = None,
    on_event: Any = None,
    before: Any = None,
    **params: Any,
) -> tuple[dict, dict, mig.GuestMemory, mig.GuestMemory, Any]:
    src, dst = mig.GuestMemory(size), mig.GuestMemory(size)
    src.array[:: src.page_size] = 7  # non-zero content in every page
    q, d, source = migrate_loopback(
        src, dst, workload, before, on_status=on_status, on_event=on_event, **params
    )
    return q, d, src, dst, source


@pytest.mark.parametrize("policy", policy_names())
def test_every_policy_over_loopback_is_byte_exact(policy: str) -> None:
    q, d, src, dst, _ = migrate(
        "uniform:wss=8MiB,rate=3000", policy=policy, max_bandwidth=200 * MIB
    )
    assert q["status"] == "completed", q.get("error-desc")
    assert d["status"] == "completed" and d["verified"] and q["verified"]
    assert src.digest() == dst.digest()  # the source stays paused after completion
    assert q["ram"]["transferred"] >= src.size and q["ram"]["dirty-sync-count"] >= 2


def test_sla_downtime_at_most_the_limit_when_the_engine_switches_over() -> None:
    # 100 MiB/s cap, 5000 page writes/s over a 4 MiB hot set: the final set fits.
    q, d, src, dst, _ = migrate(
        "uniform:wss=4MiB,rate=5000",
        policy="adaptive",
        max_bandwidth=100 * MIB,
        downtime_limit=300,
        verify="strict",  # the whole digest is in the downtime, and in the plan
    )
    assert q["status"] == "completed", q.get("error-desc")
    assert src.digest() == dst.digest()
    # The engine planned for the fixed costs it measured (and the bandwidth's
    # own variation), so what it predicted fits, and so does what it got.
    costs = q["switchover-costs"]
    assert costs["digest"] > 0 and costs["dest-digest"] > 0 and costs["handshake"] > 0
    assert q["predicted-downtime"] <= 300
    assert q["downtime"] <= 300, (q["downtime-breakdown"], costs)


def test_destination_reports_its_share_of_the_switchover() -> None:
    # Several passes at 12 MiB/s: the destination answers each with pass-ack.
    # exact-running: it keeps iterating past the pass whose ack carries the
    # destination's first digest timing (the default may finish sooner).
    # Strict: the destination times its whole digest (the plan's stand-in for
    # its root until a settle measured the per-chunk cost).
    q, d, src, dst, source = migrate(
        "uniform:rate=1000",
        size=32 * MIB,
        max_bandwidth=12 * MIB,
        policy="exact-running",
        verify="strict",
    )
    assert q["status"] == "completed", q.get("error-desc")
    assert src.digest() == dst.digest()
    costs = source.costs
    assert costs.dest_digest is not None and costs.dest_digest > 0
    plan = q["switchover-costs"]
    # The plan reported is the one the switchover was predicted with; strict's
    # O(memory) cost, the source's whole digest, is a term of its own in both.
    assert source.switchover is not None
    assert plan == pytest.approx({k: v * 1000 for k, v in source.switchover.plan.items()})
    assert q["predicted-downtime"] == pytest.approx(sum(plan.values()))
    assert plan["digest"] > 0 and q["downtime-breakdown"]["digest"] > 0
    # The breakdown names the same terms, each measured, summing to the downtime;
    # the destination's wait for the end records becomes the next plan's drain.
    breakdown = q["downtime-breakdown"]
    assert set(plan) == set(breakdown)
    assert sum(breakdown.values()) == pytest.approx(q["downtime"])
    assert costs.drain * 1000 == pytest.approx(breakdown["drain"])


PHASES = ["setup", "active", "stopped-for-exact", "device"]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("how", ["cancel", "failure"])
def test_cancel_and_failure_in_every_phase(phase: str, how: str) -> None:
    box: dict[str, Any] = {}

    def trigger() -> None:
        if how == "cancel":
            box["source"].cancel(f"cancel in {phase}")
        else:
            raise RuntimeError(f"injected failure in {phase}")

    def on_status(status: str) -> None:
        if status == phase:
            trigger()

    def on_event(name: str, info: dict) -> None:
        if phase == "stopped-for-exact" and name == "guest-stop":
            if box["source"].status == "active":
                trigger()

    def before(source: MigrationSource, guest: Any) -> None:
        box["source"] = source
        box["digest"] = guest.memory.digest()

    q, d, src, dst, _ = migrate(
        "idle",
        size=16 * MIB,
        policy="stop-exact-resume",
        on_status=on_status,
        on_event=on_event,
        before=before,
    )
    assert q["status"] == ("cancelled" if how == "cancel" else "failed"), q
    assert phase in q["error-desc"]
    assert d["status"] in ("cancelled", "failed") and not d["verified"]
    assert src.digest() == box["digest"], "source memory must be untouched"


def test_timeout_cancels_and_the_source_keeps_running() -> None:
    box: dict[str, Any] = {}

    def before(source: MigrationSource, guest: Any) -> None:
        box["guest"] = guest

    def on_status(status: str) -> None:
        if status == "cancelled":
            box["running"] = box["guest"].running

    q, d, src, dst, _ = migrate(
        "uniform:rate=20000",
        size=16 * MIB,
        downtime_limit=1,
        max_bandwidth=20 * MIB,
        timeout=3,
        before=before,
        on_status=on_status,
    )
    assert q["status"] == "cancelled" and "timeout" in q["error-desc"]
    assert d["status"] in ("cancelled", "failed")
    assert box["running"], "the source guest runs again after the rollback"


def test_auto_converge_makes_a_non_converging_workload_converge() -> None:
    # 40000 writes/s over 32 MiB against a 16 MiB/s cap cannot converge alone.
    # Each pass takes 2 s and finds all of memory dirty again, a dirty rate
    # equal to the cap: the first period need not strike (nothing to compare
    # its dirty set with), so three strikes take four passes.
    spec = "uniform:rate=40000"
    q0, *_ = migrate(spec, size=32 * MIB, max_bandwidth=16 * MIB, timeout=10)
    assert q0["status"] == "cancelled" and q0["non-convergence"]
    q, d, src, dst, _ = migrate(
        spec, size=32 * MIB, max_bandwidth=16 * MIB, timeout=40, auto_converge=True
    )
    assert q["status"] == "completed", q.get("error-desc")
    assert src.digest() == dst.digest()


def test_bandwidth_estimate_matches_a_max_bandwidth_cap() -> None:
    cap = 40 * MIB
    q, d, src, dst, source = migrate("idle", size=96 * MIB, max_bandwidth=cap)
    assert q["status"] == "completed"
    assert source.meter.samples >= 10
    assert abs(source.meter.smoothed - cap) / cap < 0.15, source.meter.smoothed
