"""The source loop's work after each sync in virtual time (``mig.sim_bookkeeping``):
charged after every simulated sync, downtime after a stop for an exact size,
and measured from real migrations."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mig import sim_bookkeeping
from mig.sim import HostModel, SimConfig, simulate

MIB = 1 << 20


def run(host: HostModel) -> dict:
    q = simulate(
        SimConfig(
            memory=64 * MIB,
            workload="uniform:rate=2000",
            devices=(),
            policy="stop-exact-resume",
            params={"max_bandwidth": 1 << 30, "downtime_limit": 300, "timeout": 60.0},
            host=host,
        )
    )
    assert q["status"] == "completed" and q["sim"]["verified"], q.get("error-desc")
    return q


def test_the_work_after_the_stopped_exact_sync_is_downtime_not_the_syncs() -> None:
    """stop-exact-resume pauses, syncs for the exact size, records that pass
    and decides: the pause term holds one sync's bookkeeping; the final-sync
    term is the sync alone."""
    host = HostModel()
    plain, booked = run(host), run(replace(host, sync_bookkeeping=0.004))
    assert plain["guest-stops"] == booked["guest-stops"] == 0  # stopped once, switched over
    gained = booked["downtime-breakdown"]["pause"] - plain["downtime-breakdown"]["pause"]
    assert gained == pytest.approx(4.0, rel=0.05)
    assert booked["downtime-breakdown"]["final-sync"] == pytest.approx(
        plain["downtime-breakdown"]["final-sync"], rel=1e-6
    )
    # Every pass pays it while the guest runs: the precopy takes longer.
    assert booked["total-time"] > plain["total-time"] + 4.0 * (len(plain["passes"]) - 1)


def test_the_calibration_takes_the_pause_term_less_the_stop_and_the_sync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mig.sim as sim

    host = replace(HostModel(), pause_latency=0.0002, sync_base=0.0001, sync_per_page=1e-8)
    pauses = iter([1.5, 0.9, 1.1, 2.0, 0.4])  # ms; the median is 1.1
    calls = []

    def migration(size: int, filled: bool, cap: int, demo: bool, policy: str,
                  workload: str) -> tuple[dict, None]:  # fmt: skip
        calls.append((size, demo, policy))
        return {"downtime-breakdown": {"pause": next(pauses)}}, None

    monkeypatch.setattr(sim, "_idle_loopback_migration", migration)
    got = sim_bookkeeping.sync_bookkeeping_seconds(host)
    sync = 0.0001 + 1e-8 * sim_bookkeeping.CALIBRATION_MEMORY / 4096
    assert got == pytest.approx(0.0011 - 0.0002 - sync)
    assert calls == [(sim_bookkeeping.CALIBRATION_MEMORY, True, "stop-exact-resume")] * 5
