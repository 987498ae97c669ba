"""``benches/simulate_vs_real.py``: its configurations, error arithmetic and bounds."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "benches"))  # it imports its sibling's commit()
    spec = importlib.util.spec_from_file_location(
        "simulate_vs_real", ROOT / "benches/simulate_vs_real.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs(total: list[float], downtime: list[float]) -> list[dict[str, float]]:
    return [{"total-time": t, "downtime": d} for t, d in zip(total, downtime, strict=True)]


def test_errors_compare_medians_and_each_real_run_with_the_prediction(bench: ModuleType) -> None:
    real = _runs([1000, 1100, 900], [100, 300, 200])
    sim = _runs([1100, 1100, 1100], [210, 210, 210])
    row = bench.compare(real, sim)
    assert row["total-time"]["error"] == pytest.approx(0.10)
    # The 900 ms run is 22 % below the prediction: within 30 %.
    assert row["total-time"]["max-single-error"] == pytest.approx(200 / 900)
    assert row["total-time"]["bounds-hold"]
    # Medians 5 % apart, but the 100 ms run is 110 % off the prediction.
    assert row["downtime"]["error"] == pytest.approx(0.05)
    assert row["downtime"]["max-single-error"] == pytest.approx(1.10)
    assert not row["downtime"]["bounds-hold"]
    # A real figure of 0 measured nothing: never within the bounds.
    zero = bench.compare(_runs([1000] * 3, [0.0] * 3), sim)
    assert not zero["downtime"]["bounds-hold"]


def test_a_failed_run_fails_its_configuration_and_the_verdict(bench: ModuleType) -> None:
    sim = _runs([1100] * 3, [210] * 3)
    real = [*_runs([1100, 1100], [210, 210]), {"failed": "ended failed: broken pipe"}]
    row = bench.compare(real, sim)
    assert row["failed"] == ["ended failed: broken pipe"]
    assert not any(row[m]["bounds-hold"] for m in bench.METRICS)
    good = bench.compare(_runs([1100] * 3, [210] * 3), sim)
    verdict = bench.verdict({"a": good, "b": good, "c": row})
    assert not any(v["bounds-hold"] for v in verdict.values())


def test_the_verdict_takes_the_median_and_the_worst_configuration(bench: ModuleType) -> None:
    def row(err: float) -> dict[str, dict[str, float]]:
        return {m: {"error": err} for m in bench.METRICS}

    assert all(
        v["bounds-hold"]
        for v in bench.verdict({"a": row(0.1), "b": row(0.1), "c": row(0.25)}).values()
    )
    # Median 15 % is within; one configuration above 30 % is not.
    over = bench.verdict({"a": row(0.1), "b": row(0.15), "c": row(0.31)})
    assert not over["downtime"]["bounds-hold"] and over["downtime"]["median-error"] == 0.15
    high = bench.verdict({"a": row(0.2), "b": row(0.2), "c": row(0.0)})
    assert not high["total-time"]["bounds-hold"]


def test_every_configuration_is_a_valid_demo_command_line(bench: ModuleType) -> None:
    from mig.cli import build_parser

    assert len(bench.CONFIGURATIONS) >= 7 and bench.CONFIGURATIONS["readme"] == []
    for options in bench.CONFIGURATIONS.values():
        args = build_parser().parse_args(["demo", *options, "--json", "--simulate"])
        assert args.simulate


def test_bytes_and_passes_are_reported_beside_the_bounded_metrics(bench: ModuleType) -> None:
    real = [{**r, "transferred": b, "passes": n}
            for r, b, n in zip(_runs([1000] * 3, [100] * 3), [100, 300, 200], [3, 4, 5],
                               strict=True)]  # fmt: skip
    sim = [{**r, "transferred": 150, "passes": 2} for r in _runs([1000] * 3, [100] * 3)]
    row = bench.compare(real, sim)
    assert row["transferred"]["error"] == pytest.approx(0.25)
    assert row["passes"]["error"] == pytest.approx(0.5)
    # Reported, not bounded: the verdict still reads only the bounded metrics.
    assert "bounds-hold" not in row["passes"] and row["total-time"]["bounds-hold"]


def test_each_downtime_term_is_compared_by_its_medians(bench: ModuleType) -> None:
    """A term only one side pays still shows, at 0 on the other."""
    real = [{"downtime-breakdown": {"load": v, "handshake": 1.0}} for v in (2.0, 9.0, 4.0)]
    sim = [{"downtime-breakdown": {"load": 3.0, "device-state": 5.0}}] * 3
    terms = bench.downtime_terms(real, sim)
    assert terms["load"] == {"real-median": 4.0, "sim-median": 3.0}
    assert terms["handshake"] == {"real-median": 1.0, "sim-median": 0.0}
    assert terms["device-state"] == {"real-median": 0.0, "sim-median": 5.0}
