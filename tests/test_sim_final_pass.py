"""The final pass's zero pages (``mig.sim_final_pass``): charged at their own
cost, calibrated on a real final pass of that shape."""

from __future__ import annotations

import pytest

from mig.sim import HostModel, LinkModel, SimConfig, simulate

MIB = 1 << 20


def _switch_over_at_once(host: HostModel) -> dict:
    # An idle zeroed 128 MiB guest: a 60 s limit at the bandwidth given for
    # the switchover takes the whole guest at the first decision, so the
    # final pass carries every page, all zero pages.
    config = SimConfig(
        memory=128 * MIB,
        prefilled=False,
        warmup=0.0,
        policy="estimate-only",
        link=LinkModel(bottleneck=1e9),
        host=host,
        params={"downtime_limit": 60_000, "avail_switchover_bandwidth": 1 << 40},
    )
    return simulate(config)


def test_the_final_pass_charges_its_zero_pages_at_the_final_pass_cost() -> None:
    base = HostModel(send_per_page=1e-6, hole_query=0.0)
    old = _switch_over_at_once(base)
    new = _switch_over_at_once(HostModel(send_per_page=1e-6, final_per_page=1e-7,
                                                       hole_query=0.0))  # fmt: skip
    pages = new["passes"][-2]["remaining"]
    assert pages == 128 * MIB // 4096  # every page
    # Without a final-pass cost, the precopy one (which holds the slices'
    # own costs) applies: ten times the time here.
    assert old["downtime-breakdown"]["final-ram"] == pytest.approx(pages * 1e-6 * 1e3, rel=0.05)
    assert new["downtime-breakdown"]["final-ram"] == pytest.approx(pages * 1e-7 * 1e3, rel=0.1)
    # Precopy's zero pages keep their own cost: the stop comes as early.
    assert new["passes"][0]["time"] == pytest.approx(old["passes"][0]["time"])


def test_the_calibration_times_a_final_pass_of_zero_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mig.sim as sim
    from mig.sim_final_pass import FINAL_PASS_GUEST, final_pass_seconds_per_page

    calls: list[tuple] = []
    pages = FINAL_PASS_GUEST // 4096
    # A host whose final pass costs 0.2 to 0.4 us per zero page from run to
    # run; the fourth run made no final pass and counts for nothing.
    per_run = [0.3e-6, 0.25e-6, 0.2e-6, None, 0.4e-6]

    def migration(size: int, filled: bool, cap: int, demo: bool, policy: str,
                  params: dict) -> tuple[dict, None]:  # fmt: skip
        calls.append((size, filled, cap, demo, policy, params))
        cost = per_run[len(calls) - 1]
        if cost is None:
            return {"passes": [{"remaining": 0}], "downtime-breakdown": {"final-ram": 0.0}}, None
        q = {
            "passes": [{"remaining": pages}, {"remaining": 0}],
            "downtime-breakdown": {"final-ram": pages * cost * 1e3},
        }
        return q, None

    monkeypatch.setattr(sim, "_idle_loopback_migration", migration)
    # The median of the runs that made a final pass, not the best of them:
    # the prediction is of the median real migration.
    assert final_pass_seconds_per_page() == pytest.approx(0.275e-6)
    # An idle zeroed guest, uncapped, to mig demo's destination, by a policy
    # a limit and a switchover bandwidth that switch over at the first decision.
    assert {c[:5] for c in calls} == {(FINAL_PASS_GUEST, False, 0, True, "estimate-only")}
    assert all(c[5]["downtime_limit"] >= 10_000 for c in calls)
    assert all(c[5]["avail_switchover_bandwidth"] >= 1 << 40 for c in calls)


def test_a_demo_prediction_uses_the_loopback_s_final_pass_cost(tmp_path) -> None:
    from mig.predict import sim_config
    from mig.sim import save_host_model

    path = tmp_path / "host-model.json"
    host = HostModel(loopback_per_page=4e-7, loopback_final_per_page=1.5e-7)
    save_host_model(host, path, {"commit": "x", "date": "2026-01-01T00:00:00Z"})
    config, _ = sim_config({}, size=64 * MIB, workload="idle", vcpus=1, devices="none",
                           host_model=path, demo=True)  # fmt: skip
    assert config.host.send_per_page == 4e-7
    assert config.host.final_per_page == 1.5e-7
