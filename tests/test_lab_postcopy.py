"""``mig bench postcopy-lab``: its strategies, and docs/lab.md's table comes
from the stored result, not from a hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mig import lab_postcopy
from mig.params import MigrationParams
from mig.sim import simulate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "results"


def newest() -> Path:
    found = sorted(RESULTS.glob("postcopy_lab-*.json"))
    assert found, "no stored postcopy_lab result: run benches/postcopy_lab.py"
    return max(found, key=lambda p: json.loads(p.read_text())["date"])


def test_docs_lab_table_is_the_stored_result() -> None:
    path = newest()
    result = json.loads(path.read_text())
    assert result["commit"] and not result["commit"].endswith("-dirty")
    section = lab_postcopy.render_section(result, path.relative_to(ROOT).as_posix())
    assert section in (ROOT / "docs" / "lab.md").read_text()


def test_the_stored_result_covers_every_workload_and_strategy() -> None:
    rows = json.loads(newest().read_text())["rows"]
    got = {(r["workload"], r["strategy"]) for r in rows}
    assert got == {(w, s) for w in lab_postcopy.WORKLOADS for s in lab_postcopy.STRATEGIES}


def test_the_strategies_are_what_they_say() -> None:
    s = lab_postcopy.STRATEGIES
    assert s["auto-converge"] == {"auto_converge": True}
    assert s["dirty-limit"]["dirty_limit"] > 0
    assert s["postcopy"] == {"postcopy": True, "postcopy_after_passes": 0}
    assert s["hybrid-3"] == {"postcopy": True, "postcopy_after_passes": 3}


@pytest.mark.parametrize("workload", sorted(lab_postcopy.WORKLOADS))
def test_the_workloads_do_not_converge_in_plain_precopy(workload: str) -> None:
    # Without an aid, pre-copy reaches the timeout and is forced over.
    (cfg,) = [
        c.with_(params={**c.params, "timeout": 20.0})
        for c in lab_postcopy.configs(workloads=[workload])
        if c.label.endswith("/dirty-limit")
    ]
    plain = {k: v for k, v in cfg.params.items() if k != "dirty_limit"}
    q = simulate(cfg.with_(params=plain))
    assert q["total-time"] >= 20_000, q["total-time"]


def test_postcopy_runs_in_the_engine_s_default_push_order() -> None:
    # No strategy names a push order: the lab compares post-copy as the
    # engine runs it by default, and the simulator plays that order ("stream":
    # two vCPUs walking their halves, one followed by the push, the other's
    # requests answered a page alone).
    cfgs = lab_postcopy.configs(workloads=["sequential-256MiB"])
    assert not any("postcopy_push_order" in c.params for c in cfgs)
    (cfg,) = [c for c in cfgs if c.label.endswith("/postcopy")]
    q = simulate(cfg)
    assert q["status"] == "completed", q.get("error-desc")
    stream = MigrationParams().postcopy_push_order == "stream"
    assert (q["postcopy"]["requested-pages"] > 0) == stream, q["postcopy"]
