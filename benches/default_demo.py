"""The README's plain ``mig demo --json``, run N times through the user's path.

Each run is exactly what a new user types (a source and a destination
process over loopback TCP, the default guest, workload, device, policy,
downtime limit and verification mode). Stored per run: downtime, predicted
downtime, the breakdown and the plan (``switchover-costs``, the same terms),
switchover aborts, verified. Summarised: median and max downtime, the median
of every term measured and planned, and the share of runs whose prediction
is within 25 % or 20 ms of the measured downtime (the bound of
``downtime_scale.py``). The targets: median downtime within 50 ms, and that
share at least 90 %.

Results go to ``benches/results/default_demo-<commit>[-partial].json`` (the
commit read when the runs end; ``-partial`` with fewer than the default runs).

    python benches/default_demo.py              # 10 runs
    python benches/default_demo.py --runs 3     # a -partial result
    mig bench default-demo [--runs N]           # the same, from an installed mig

The two processes share the host's cores with whatever else runs: record the
load (stored as ``load-average-at-end``) and compare runs of one sitting.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

# Run as a script, this directory is on sys.path.
from downtime_scale import (
    PREDICTION_BOUND,
    PREDICTION_SHARE,
    print_verdicts,
    result_path,
    run_demo,
    within_prediction,
)

HERE = Path(__file__).resolve().parent
RUNS = 10
DOWNTIME_TARGET_MS = 50.0


def run_plain(mig: list[str], timeout: float) -> dict[str, Any]:
    """One plain ``mig demo --json``; the figures this benchmark stores."""
    q, r = run_demo([*mig, "demo", "--json"], timeout)
    if r["status"] == "completed":
        r["switchover-aborts"] = q.get("switchover-aborts")
        r["guest-stops"] = q.get("guest-stops")
        r["devices"] = q.get("devices", [])
    return r


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = statistics.median
    done = [r for r in runs if r["status"] == "completed"]
    down = [r["downtime"] for r in done]
    terms = sorted({k for r in done for k in (*r["breakdown"], *r["plan"])})
    within = [within_prediction(r["predicted"], r["downtime"]) for r in done]
    return {
        "runs": len(runs),
        "failed": [f"{r['status']}: {r['error']}" for r in runs if r["status"] != "completed"],
        "downtime-median": med(down) if down else None,
        "downtime-max": max(down) if down else None,
        "predicted-median": med(r["predicted"] or 0.0 for r in done) if done else None,
        "breakdown-median": {k: med(r["breakdown"].get(k, 0.0) for r in done) for k in terms},
        "plan-median": {k: med(r["plan"].get(k, 0.0) for r in done) for k in terms},
        # Over all runs: a failed one is not within the bound.
        "prediction-within-bound": sum(within) / len(runs) if runs else 0.0,
        "all-verified": bool(runs) and all(r["verified"] for r in runs),
    }


def verdicts(summary: dict[str, Any]) -> dict[str, bool]:
    share, median = summary["prediction-within-bound"], summary["downtime-median"]
    rel, absolute = PREDICTION_BOUND
    return {
        "every run verified": summary["all-verified"],
        f"median downtime <= {DOWNTIME_TARGET_MS:g} ms (is {median})": (
            median is not None and median <= DOWNTIME_TARGET_MS
        ),
        f"predicted within {rel:.0%} or {absolute:g} ms in >= {PREDICTION_SHARE:.0%} of runs "
        f"(is {share:.0%})": share >= PREDICTION_SHARE,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="default_demo", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=RUNS, help=f"runs (default {RUNS})")
    ap.add_argument("--out", default=str(HERE / "results"), help="result directory")
    ap.add_argument("--timeout", type=float, default=300.0, help="per run, seconds")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    mig_exe = shutil.which("mig")
    mig = [mig_exe] if mig_exe else [sys.executable, "-m", "mig.cli"]
    runs = []
    for n in range(args.runs):
        r = run_plain(mig, args.timeout)
        runs.append(r)
        if r["status"] != "completed":
            print(f"run {n + 1}: {r['status']}: {r['error']}", flush=True)
            continue
        fits = within_prediction(r["predicted"], r["downtime"])
        terms = " ".join(f"{k} {v:.1f}" for k, v in r["breakdown"].items() if v >= 0.5)
        print(
            f"run {n + 1}: downtime {r['downtime']:.1f} ms, predicted {r['predicted'] or 0:.1f} "
            f"({'within' if fits else 'OUTSIDE'} the bound), verified {r['verified']}; {terms}",
            flush=True,
        )
    summary = summarise(runs)
    verdict = verdicts(summary)
    suffix = "" if args.runs >= RUNS else "-partial"
    path, stamp = result_path(Path(args.out), "default_demo", suffix)
    path.write_text(json.dumps({
        **stamp,
        "command": "mig demo --json",
        "summary": summary,
        "verdicts": verdict,
        "raw": runs,
    }, indent=2) + "\n")  # fmt: skip
    print(f"downtime median {summary['downtime-median']} ms, max {summary['downtime-max']} ms")
    for term, value in summary["breakdown-median"].items():
        print(f"  {term}: measured {value:.1f} planned {summary['plan-median'][term]:.1f}")
    print_verdicts(verdict, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
