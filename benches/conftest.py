"""Shared helpers for the benchmarks: every target is a ratio of medians
measured in the same run; the ratios are printed at the end and written to
``benches/results.json`` (``benches/run.py`` turns them into the README table).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# group -> {"subject": median s, "baseline": median s, ...}
MEDIANS: dict[str, dict[str, float]] = {}
# (area, name, value, target, comparison ">=" or "<=", note)
RATIOS: list[tuple[str, str, float, float, str, str]] = []
RESULTS = Path(__file__).with_name("results.json")


def measure(benchmark: Any, group: str, role: str, fn: Callable[[], Any], **kw: Any) -> float:
    """Runs `fn` under pytest-benchmark and records its median for `group`."""
    benchmark.group = group
    benchmark.pedantic(fn, **kw)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: a smoke run, nothing to record
        return float("nan")
    median = float(stats.stats.median)
    MEDIANS.setdefault(group, {})[role] = median
    return median


def ratio(area: str, name: str, value: float, target: float, cmp: str, note: str = "") -> None:
    RATIOS.append((area, name, value, target, cmp, note))


def pair(
    area: str, group: str, num: str, den: str, target: float, cmp: str, note: str = ""
) -> None:
    """Records MEDIANS[group][num] / MEDIANS[group][den] once both exist."""
    m = MEDIANS.get(group, {})
    if num in m and den in m:
        ratio(area, group, m[num] / m[den], target, cmp, note)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RATIOS:
        return
    tr = terminalreporter
    tr.section("mig ratios (medians, same run)")
    rows = []
    for area, name, value, target, cmp, note in RATIOS:
        ok = value >= target if cmp == ">=" else value <= target
        tr.write_line(
            f"{area:10} {name:44} {value:8.3f}  target {cmp} {target:<5} "
            f"{'ok' if ok else 'MISSED'}  {note}"
        )
        rows.append(
            {
                "area": area,
                "name": name,
                "ratio": value,
                "target": target,
                "cmp": cmp,
                "ok": ok,
                "note": note,
            }
        )
    RESULTS.write_text(json.dumps({"ratios": rows, "medians": MEDIANS}, indent=2) + "\n")
