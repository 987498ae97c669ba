"""``mig demo --simulate`` against ``mig demo``: does the prediction hold?

For the README's example (``mig demo`` with its defaults) and six more
configurations (workloads, devices, bandwidth caps and policies varied; each
migration well under a minute), runs ``mig demo ... --json`` and
``mig demo ... --simulate --json`` three times each (interleaved, so both
sides see the same load; simulated run k with ``--seed k``) and reports per
configuration, for total time and downtime:

* ``error``: |simulated median - real median| / real median, each median
  over the runs of its side (the issue's figure);
* ``max-single-error``: the largest |simulated median - real run| / real run
  over the real runs (how far one real migration lands from the prediction);
* ``bounds-hold``: ``error`` <= 15 % and ``max-single-error`` <= 30 %.

Over all configurations the bounds hold when the median of the ``error``
figures is <= 15 % and none is above 30 %, per metric. Every real run must
complete with its end-to-end digest check passed: a run that does not is
recorded with its reason (``failed``), counts as an infinite error, and the
other configurations still run.

Results go to ``benches/results/simulate_vs_real-<commit>.json``, stamped
with the commit and date, and with the host model the predictions used.

    python benches/simulate_vs_real.py                   # all 7 configurations, 3 runs per side
    python benches/simulate_vs_real.py --only readme     # one configuration
    python benches/simulate_vs_real.py --calibrate       # `mig bench calibrate` first, then use it
    mig bench simulate-vs-real [...]                     # the same, from an installed mig

Absolute times are this host's: run it on a quiet host, the real side of a
loaded one varies from run to run far more than the bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, this directory is on sys.path.
from transfer_user_path import commit

HERE = Path(__file__).resolve().parent
METRICS = ("total-time", "downtime")
# Reported per configuration beside METRICS (error of the medians), not bounded.
REPORTED = ("transferred", "passes")
MEDIAN_BOUND, MAX_BOUND = 0.15, 0.30

# name -> mig demo options. "readme" is the README's `mig demo` (its defaults:
# 1 GiB, hotset:rate=50000, one nic, the default policy, no cap).
CONFIGURATIONS: dict[str, list[str]] = {
    "readme": [],
    "uniform-nic-exact-running": [
        "--size", "256MiB", "--workload", "uniform:rate=4000", "--devices",
        "nic:state=4MiB,rate=1MiB/s", "--max-bandwidth", "64MiB/s", "--policy", "exact-running",
    ],
    "hotset-opaque-cached-exact": [
        "--size", "256MiB", "--workload", "hotset:rate=20000,wss=64MiB", "--devices",
        "opaque:state=4MiB,rate=1MiB/s", "--max-bandwidth", "128MiB/s", "--policy",
        "cached-exact",
    ],
    "sequential-fixed-stop-exact-resume": [
        "--size", "512MiB", "--workload", "sequential:rate=8000,wss=32MiB", "--devices",
        "fixed", "--policy", "stop-exact-resume",
    ],
    "zipf-big-known-assume-zero": [
        "--size", "256MiB", "--workload", "zipf:rate=20000", "--devices",
        "fixed:state=24MiB,rate=1MiB/s", "--max-bandwidth", "256MiB/s", "--policy",
        "assume-zero-device",
    ],
    # The state grows during precopy and stops at 8 MiB, well inside the
    # limit's bytes: a state that grows past them (4 MiB/s up to 64 MiB
    # against 200 ms) switches over on whichever sync catches the
    # threshold above it, or at the demo's 60 s timeout, run to run.
    "uniform-growing-device-checks-sla": [
        "--size", "256MiB", "--workload", "uniform:rate=8000", "--devices",
        "fixed:state=4MiB,grow=2MiB/s,max=8MiB", "--max-bandwidth", "128MiB/s", "--policy",
        "device-checks-sla", "--downtime-limit", "300ms",
    ],
    "hotset-dma-estimate-only": [
        "--size", "256MiB", "--vcpus", "1", "--workload", "hotset:rate=40000,wss=64MiB",
        "--devices", "dma:dma=1MiB/s", "--max-bandwidth", "96MiB/s", "--policy",
        "estimate-only",
    ],
}  # fmt: skip


def run_demo(mig: list[str], options: list[str], simulate: bool, extra: list[str],
             timeout: float) -> dict[str, Any]:  # fmt: skip
    """One ``mig demo --json`` (simulated or real); returns its ``query()`` object."""
    cmd = [*mig, "demo", *options, "--json", *extra]
    if simulate:
        cmd.append("--simulate")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    line = " ".join(cmd)
    try:
        q = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"{line} failed ({out.returncode}): {out.stderr[-2000:]}") from None
    if q.get("status") != "completed":
        raise RuntimeError(f"{line} ended {q.get('status')}: {q.get('error-desc')}")
    # Memory and devices equal on both sides, checked end to end by mig demo.
    if not simulate and q.get("end-to-end-check") != "passed":
        raise RuntimeError(f"{line}: end-to-end check {q.get('end-to-end-check')}")
    return q


def figures(q: dict[str, Any]) -> dict[str, Any]:
    """What this benchmark keeps of one run."""
    return {
        "total-time": float(q["total-time"]),
        "downtime": float(q["downtime"]),
        "transferred": int(q.get("ram", {}).get("transferred", 0)),
        "passes": len(q.get("passes", [])),
        "guest-stops": q.get("guest-stops"),
        "downtime-breakdown": q.get("downtime-breakdown", {}),
    }


def downtime_terms(real: list[dict[str, Any]], sim: list[dict[str, Any]]) -> dict[str, Any]:
    """Per term of ``downtime-breakdown``, ms: the real and the simulated
    median, to tell which term a downtime error comes from."""
    terms = dict.fromkeys(t for r in [*real, *sim] for t in r.get("downtime-breakdown", {}))
    return {
        t: {
            side: statistics.median(r.get("downtime-breakdown", {}).get(t, 0.0) for r in runs)
            for side, runs in (("real-median", real), ("sim-median", sim))
        }
        for t in terms
    }


def compare(real: list[dict[str, Any]], sim: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: both medians, the error of the medians, the largest single error.
    A failed run on either side fails the configuration."""
    row: dict[str, Any] = {}
    failed = [r["failed"] for r in [*real, *sim] if "failed" in r]
    if failed:
        inf = float("inf")
        for m in METRICS:
            row[m] = {"error": inf, "max-single-error": inf, "bounds-hold": False}
        row["failed"] = failed
        return row
    for m in (m for m in REPORTED if all(m in r for r in [*real, *sim])):
        r_med = statistics.median(r[m] for r in real)
        s_med = statistics.median(s[m] for s in sim)
        row[m] = {"real-median": r_med, "sim-median": s_med,
                  "error": abs(s_med - r_med) / r_med if r_med else float("inf")}  # fmt: skip
    for m in METRICS:
        reals, sims = [r[m] for r in real], [s[m] for s in sim]
        r_med, s_med = statistics.median(reals), statistics.median(sims)
        # A real value of 0 measured nothing: no prediction is close to it.
        error = abs(s_med - r_med) / r_med if r_med > 0 else float("inf")
        single = max(abs(s_med - r) / r if r > 0 else float("inf") for r in reals)
        row[m] = {
            "real-median": r_med,
            "sim-median": s_med,
            "error": error,
            "max-single-error": single,
            "bounds-hold": error <= MEDIAN_BOUND and single <= MAX_BOUND,
        }
    return row


def verdict(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Over the configurations, per metric: median and largest error, and the bounds."""
    out: dict[str, Any] = {}
    for m in METRICS:
        errors = [row[m]["error"] for row in rows.values()]
        med, worst = statistics.median(errors), max(errors)
        out[m] = {
            "median-error": med,
            "max-error": worst,
            "bounds-hold": med <= MEDIAN_BOUND and worst <= MAX_BOUND,
        }
    return out


def attempt(mig: list[str], options: list[str], simulate: bool, extra: list[str],
            timeout: float) -> dict[str, Any]:  # fmt: skip
    """``figures`` of one run (with the simulation's ``host-model``), or
    ``{"failed": reason}``: a failed migration is a result, not a crash."""
    try:
        q = run_demo(mig, options, simulate, extra, timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return {"failed": str(e)[-2000:]}
    return {**figures(q), "host-model": q.get("host-model", {})} if simulate else figures(q)


def calibrate(mig: list[str], path: Path) -> None:
    subprocess.run([*mig, "bench", "calibrate", "--out", str(path)], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="simulate_vs_real", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per side and configuration")
    ap.add_argument("--only", action="append", choices=sorted(CONFIGURATIONS),
                    help="run only this configuration (repeatable)")  # fmt: skip
    ap.add_argument("--host-model", help="the model --simulate uses (default: mig's own choice)")
    ap.add_argument("--calibrate", action="store_true",
                    help="run `mig bench calibrate` first and predict with its model")  # fmt: skip
    ap.add_argument("--out", default=str(HERE / "results"), help="result directory")
    ap.add_argument("--timeout", type=float, default=300.0, help="per migration, seconds")
    args = ap.parse_args(argv)
    mig_exe = shutil.which("mig")
    mig = [mig_exe] if mig_exe else [sys.executable, "-m", "mig.cli"]
    sha = commit()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.host_model
    if args.calibrate:
        model = str(out / f"host-model-{sha}.json")
        calibrate(mig, Path(model))
    extra = ["--host-model", model] if model else []
    names = args.only or list(CONFIGURATIONS)
    real: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    sim: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    host_model: dict[str, Any] = {}
    t0 = time.monotonic()
    for rnd in range(args.runs):
        for name in names:  # interleaved: every configuration sees every load
            options = CONFIGURATIONS[name]
            real[name].append(attempt(mig, options, False, [], args.timeout))
            # Each simulated run its own seed (the guest's writes, the link's
            # jitter), as each real run meets its own: a median of one run
            # copied three times would not be one of three runs.
            q = attempt(mig, options, True, [*extra, "--seed", str(rnd + 1)], args.timeout)
            host_model = q.pop("host-model", None) or host_model
            sim[name].append(q)
            r, s = real[name][-1], sim[name][-1]
            if "failed" in r or "failed" in s:
                print(f"run {rnd + 1}: {name}: {r.get('failed') or s.get('failed')}", flush=True)
                continue
            print(
                f"run {rnd + 1}: {name}: total {r['total-time']:.0f} / {s['total-time']:.0f} ms, "
                f"downtime {r['downtime']:.0f} / {s['downtime']:.0f} ms (real / simulated)",
                flush=True,
            )
    rows = {n: compare(real[n], sim[n]) for n in names}
    for n, row in rows.items():
        if "failed" not in row:
            row["downtime-terms"] = downtime_terms(real[n], sim[n])
    overall = verdict(rows)
    path = out / f"simulate_vs_real-{sha}.json"
    stored = {
        "benchmark": "simulate_vs_real",
        "commit": sha,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "load-average": os.getloadavg(),
        "seconds": time.monotonic() - t0,
        "runs-per-side": args.runs,
        "bounds": {"median-error": MEDIAN_BOUND, "max-error": MAX_BOUND},
        "host-model": host_model,
        "configurations": {n: CONFIGURATIONS[n] for n in names},
        "rows": rows,
        "verdict": overall,
        "real": real,
        "simulated": sim,
    }
    path.write_text(json.dumps(stored, indent=1) + "\n")
    for n, row in rows.items():
        cells = ", ".join(
            f"{m} error {row[m]['error']:.1%} (max single {row[m]['max-single-error']:.1%}"
            f"{', ok' if row[m]['bounds-hold'] else ', OUT OF BOUNDS'})"
            for m in METRICS
        ) + "".join(f", {m} error {row[m]['error']:.1%}" for m in REPORTED if m in row)
        print(f"{n}: {cells}")
    for m, v in overall.items():
        print(
            f"{m}: median error {v['median-error']:.1%}, max {v['max-error']:.1%} "
            f"({'within' if v['bounds-hold'] else 'OUT OF'} {MEDIAN_BOUND:.0%} / {MAX_BOUND:.0%})"
        )
    print(f"wrote {path}")
    return 0 if all(v["bounds-hold"] for v in overall.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
