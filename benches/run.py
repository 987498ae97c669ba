"""Runs every benchmark with timing enabled and prints the ratio table.

    python benches/run.py [extra pytest args]

The ratios (medians, baseline measured in the same run) are also written to
``benches/results.json``; copy the table into ``benches/README.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "--benchmark-enable",
        "--benchmark-columns=median,iqr,rounds",
        *[str(p) for p in sorted(HERE.glob("bench_*.py"))],
        *sys.argv[1:],
    ]
    rc = subprocess.call(cmd, cwd=HERE)
    results = HERE / "results.json"
    if results.exists():
        rows = json.loads(results.read_text())["ratios"]
        print("\n| Area | Benchmark | Ratio | Target | Met |")
        print("|---|---|---|---|---|")
        for r in rows:
            met = "yes" if r["ok"] else "**no**"
            print(
                f"| {r['area']} | {r['name']} ({r['note']}) | {r['ratio']:.3f} "
                f"| {r['cmp']} {r['target']} | {met} |"
            )
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
