"""Where ``mig demo --simulate`` departs from ``mig demo``: phase by phase.

For each configuration of ``simulate_vs_real`` (or those named with
``--only``), runs ``mig demo ... --json`` and its ``--simulate`` twin
``--runs`` times each and prints, side by side, what both report of the
phases the precopy loop goes through:

* ``setup-time`` (QEMU's: from the start until the first pass begins);
* each pass: its length (from the previous sync to its own), its bytes on
  the wire and the dirty pages its sync found;
* the switchover decision (the last pass's sync), ``total-time``,
  ``ram.transferred`` and the number of passes (``dirty-sync-count``).

It is a diagnostic, not a stored benchmark: its figures are this host's at
this moment (``--json PATH`` keeps them for a later comparison).

    python benches/sim_phases.py --only readme --runs 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from simulate_vs_real import CONFIGURATIONS, run_demo


def phases(q: dict[str, Any]) -> dict[str, Any]:
    """The per-phase figures of one ``query()`` (times in ms)."""
    passes = q.get("passes", [])
    rows, previous = [], float(q.get("setup-time", 0.0)) / 1000
    for p in passes:
        rows.append(
            {
                "ms": (p["time"] - previous) * 1000,
                "bytes": int(p.get("bytes", 0)),
                "dirty-pages": int(p.get("dirty-pages", 0)),
            }
        )
        previous = p["time"]
    ram = q.get("ram", {})
    return {
        "setup-time": float(q.get("setup-time", 0.0)),
        "passes": rows,
        "decision": passes[-1]["time"] * 1000 if passes else 0.0,
        "total-time": float(q["total-time"]),
        "downtime": float(q["downtime"]),
        "transferred": int(ram.get("transferred", 0)),
        "normal": int(ram.get("normal", 0)),
        "duplicate": int(ram.get("duplicate", 0)),
        "dirty-sync-count": int(ram.get("dirty-sync-count", len(passes))),
    }


def show(name: str, real: list[dict[str, Any]], sim: list[dict[str, Any]]) -> None:
    def med(side: list[dict[str, Any]], key: str) -> float:
        return statistics.median(float(r[key]) for r in side)

    print(f"== {name}")
    for key in ("setup-time", "decision", "total-time", "downtime", "transferred", "normal",
                "duplicate", "dirty-sync-count"):  # fmt: skip
        r, s = med(real, key), med(sim, key)
        err = abs(s - r) / r if r else float("inf")
        print(f"  {key:17s} real {r:14.1f}  sim {s:14.1f}  error {err:6.1%}")
    for label, side in (("real", real), ("sim", sim)):
        for run in side:
            cells = " | ".join(
                f"{p['ms']:7.1f} ms {p['bytes'] / 1e6:7.1f} MB {p['dirty-pages']:6d} dirty"
                for p in run["passes"][:6]
            )
            more = f" (+{len(run['passes']) - 6} passes)" if len(run["passes"]) > 6 else ""
            print(f"  {label:4s} {cells}{more}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sim_phases", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--only", action="append", choices=sorted(CONFIGURATIONS))
    ap.add_argument("--host-model", help="the model --simulate uses (default: mig's own)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--sim-only", action="store_true", help="skip the real runs")
    args = ap.parse_args(argv)
    exe = shutil.which("mig")
    mig = [exe] if exe else [sys.executable, "-m", "mig.cli"]
    extra = ["--host-model", args.host_model] if args.host_model else []
    out: dict[str, Any] = {}
    for name in args.only or list(CONFIGURATIONS):
        options = CONFIGURATIONS[name]
        real = [] if args.sim_only else [
            phases(run_demo(mig, options, False, [], 300.0)) for _ in range(args.runs)
        ]  # fmt: skip
        sim = [phases(run_demo(mig, options, True, extra, 300.0))]
        out[name] = {"real": real, "sim": sim}
        show(name, real or sim, sim)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
