"""Run every micro-benchmark in ``benches/`` and summarise ratios to their limits.

Generic over what the benchmark files report: the ratio table that
``benches/conftest.py`` writes to ``benches/results.json`` (``ratios``: area,
name, ratio, target, cmp), and any pytest-benchmark entry whose
``extra_info`` carries ``ratio`` and ``target`` (with ``cmp``, default
``<=``). Writes ``summary.json`` and ``summary.md`` under the output directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["collect_ratios", "run_benches", "summary_markdown"]


def find_benches(start: Path | None = None) -> Path:
    """The ``benches/`` directory of the source tree (cwd or an ancestor)."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "benches").is_dir():
            return d / "benches"
    raise FileNotFoundError("no benches/ directory here or above; run from the source tree")


def collect_ratios(bench_json: dict[str, Any] | None, conftest_json: dict[str, Any] | None
                   ) -> list[dict[str, Any]]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    for r in (conftest_json or {}).get("ratios", []):
        rows.append({k: r.get(k) for k in ("area", "name", "ratio", "target", "cmp", "note")})
    for b in (bench_json or {}).get("benchmarks", []):
        info = b.get("extra_info") or {}
        if "ratio" in info and "target" in info:
            rows.append(
                {
                    "area": info.get("area", Path(b.get("fullname", "")).stem.split("::")[0]),
                    "name": b.get("name"),
                    "ratio": float(info["ratio"]),
                    "target": float(info["target"]),
                    "cmp": info.get("cmp", "<="),
                    "note": info.get("note", ""),
                }
            )
    for r in rows:
        cmp, v, t = r["cmp"], float(r["ratio"]), float(r["target"])
        r["ok"] = v >= t if cmp == ">=" else v <= t
        # How far from the limit: < 1 means inside it, whatever the direction.
        r["to-limit"] = (t / v if v else float("inf")) if cmp == ">=" else v / t
    return rows


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Area | Benchmark | Ratio | Limit | ratio/limit | Met |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(
            f"| {r['area']} | {r['name']}{note} | {r['ratio']:.3f} | {r['cmp']} {r['target']} | "
            f"{r['to-limit']:.2f} | {'yes' if r['ok'] else '**no**'} |"
        )
    met = sum(r["ok"] for r in rows)
    lines.append(f"\n{met} of {len(rows)} targets met.")
    return "\n".join(lines) + "\n"


def run_benches(out: Path, extra: list[str] | None = None, benches: Path | None = None) -> int:
    """Run pytest-benchmark over every ``bench_*.py``; returns pytest's status."""
    benches = benches or find_benches()
    out.mkdir(parents=True, exist_ok=True)
    bench_json = out / "benchmarks.json"
    conftest_json = benches / "results.json"
    if conftest_json.exists():
        conftest_json.unlink()
    cmd = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
        "--benchmark-enable", f"--benchmark-json={bench_json}",
        "--benchmark-columns=median,iqr,rounds",
        *[str(p) for p in sorted(benches.glob("bench_*.py"))],
        *(extra or []),
    ]  # fmt: skip
    rc = subprocess.call(cmd, cwd=benches)
    load = lambda p: json.loads(p.read_text()) if p.exists() else None  # noqa: E731
    rows = collect_ratios(load(bench_json), load(conftest_json))
    (out / "summary.json").write_text(json.dumps({"ratios": rows}, indent=2) + "\n")
    md = summary_markdown(rows)
    (out / "summary.md").write_text(md)
    print(md)
    return rc
