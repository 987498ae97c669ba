"""Downtime against guest size, through the path users run.

Each case is one ``mig demo --image IMG --workload W --devices none
--channels 2 --downtime-limit 300ms --json`` (a source and a destination
process over loopback TCP, the default policy and verification mode), on
raw images that are half random pages and half zero pages, with the
workloads ``idle`` and ``hotset:rate=20000``; and a sparse 8 GiB guest (no
image: memory never written is sent as zero pages without being read)
under ``hotset:rate=20000``. Three runs each by default.

Reported per case: downtime median and max, the median of every
``downtime-breakdown`` term, predicted (``predicted-downtime``) against
measured downtime run by run, total time, and whether every run ended
``verified``, with the plan (``switchover-costs``, the same terms) and the
time the source waited, guest running, for the destination to settle. The
share of runs predicted within the bound is printed and stored. The verdicts
of the switchover targets follow: every run
verified and within 300 ms; idle medians within 30 ms; the hotset median at
4 GiB within 1.5x the one at 1 GiB; predicted within 25 % or 20 ms of
measured in 90 % of runs.

Results go to ``benches/results/downtime_scale-<commit>[-quick|-partial].json``.

    python benches/downtime_scale.py               # 1, 2, 4 GiB and 8 GiB sparse, 3 runs
    python benches/downtime_scale.py --quick       # 1 and 2 GiB, 2 runs
    python benches/downtime_scale.py --sizes 1,4 --sparse 0 --workloads hotset --runs 2
                                                   # some cases only: a -partial result
    mig bench downtime-scale [--quick] [...]       # the same, from an installed mig

Both processes share the host's cores: on a 2-core machine the destination
loads and resumes while the source still runs, so downtime here includes
that contention. Absolute figures are this host's; compare runs of the same
sitting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this directory is on sys.path.
from transfer_user_path import GIB, commit, make_image

HERE = Path(__file__).resolve().parent
LIMIT_MS = 300.0
IDLE_TARGET_MS = 30.0
GROWTH_TARGET = 1.5
PREDICTION_BOUND = (0.25, 20.0)  # relative, or absolute ms
PREDICTION_SHARE = 0.9
WORKLOADS = ("idle", "hotset:rate=20000")


def run_demo(cmd: list[str], timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """One ``mig demo ... --json``: its output, and the figures every bench
    of it stores (``status`` is not ``completed`` for a failed run)."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    try:
        q = json.loads(out.stdout)
    except json.JSONDecodeError:
        q = {"status": "no-output", "error-desc": f"exit {out.returncode}: {out.stderr[-2000:]}"}
    if q.get("status") != "completed":
        # Recorded, not raised: a failed run is a result (it fails "every run
        # verified"), and the other runs still go.
        return q, {"status": q.get("status"), "error": q.get("error-desc"), "verified": False,
                   "wall": wall, "exit": out.returncode}  # fmt: skip
    return q, {
        "status": "completed",
        "downtime": float(q["downtime"]),
        "predicted": q.get("predicted-downtime"),
        "breakdown": q.get("downtime-breakdown", {}),
        "plan": q.get("switchover-costs", {}),
        "total": float(q["total-time"]),
        "wall": wall,
        "verified": bool(q.get("verified")),
        "end-to-end-check": q.get("end-to-end-check"),
        "exit": out.returncode,
    }


def run_case(mig: list[str], size: int, image: Path | None, workload: str,
             extra: list[str], timeout: float) -> dict[str, Any]:  # fmt: skip
    """One migration; returns the figures this benchmark reads."""
    source = ["--image", str(image)] if image is not None else ["--size", f"{size >> 20}MiB"]
    cmd = [
        *mig, "demo", *source, "--workload", workload, "--devices", "none",
        "--channels", "2", "--downtime-limit", f"{LIMIT_MS:g}ms", "--json",
        "--timeout", f"{timeout:g}s", "--timeout-action", "cancel", *extra,
    ]  # fmt: skip
    q, r = run_demo(cmd, timeout + 180)
    if r["status"] == "completed":
        r["settle-time"] = q.get("settle-time")
        r["verify"] = q.get("verify")
        r["verify-time"] = q.get("verify-time")
        r["passes"] = q.get("ram", {}).get("dirty-sync-count")
    return r


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the completed runs; failed runs listed, and they fail the case."""
    med = statistics.median
    done = [r for r in runs if r["status"] == "completed"]
    down = [r["downtime"] for r in done]
    terms = sorted({k for r in done for k in r["breakdown"]})
    return {
        "case": name,
        "runs": len(runs),
        "failed": [f"{r['status']}: {r['error']}" for r in runs if r["status"] != "completed"],
        "downtime-median": med(down) if down else None,
        "downtime-max": max(down) if down else None,
        "total-median": med(r["total"] for r in done) if done else None,
        "breakdown-median": {k: med(r["breakdown"].get(k, 0.0) for r in done) for k in terms},
        "predicted": [r["predicted"] for r in done],
        "measured": down,
        "all-verified": bool(runs) and all(r["verified"] for r in runs),
    }


def within_prediction(predicted: float | None, measured: float) -> bool:
    if predicted is None:
        return False
    rel, absolute = PREDICTION_BOUND
    return abs(predicted - measured) <= max(rel * measured, absolute)


def prediction_share(rows: list[dict[str, Any]]) -> float:
    """The fraction of all runs whose prediction is within the bound."""
    runs = [(p, m) for r in rows for p, m in zip(r["predicted"], r["measured"], strict=True)]
    return sum(within_prediction(p, m) for p, m in runs) / len(runs) if runs else 0.0


def verdicts(rows: list[dict[str, Any]]) -> dict[str, bool]:
    by_case = {r["case"]: r for r in rows}
    share = prediction_share(rows)
    out = {
        "every run verified": all(r["all-verified"] for r in rows),
        f"every downtime <= {LIMIT_MS:g} ms": all(
            not r["failed"] and r["downtime-max"] is not None and r["downtime-max"] <= LIMIT_MS
            for r in rows
        ),
        f"idle medians <= {IDLE_TARGET_MS:g} ms": all(
            r["downtime-median"] is not None and r["downtime-median"] <= IDLE_TARGET_MS
            for r in rows
            if r["case"].endswith(" idle")
        ),
        f"predicted within 25 % or 20 ms in >= {PREDICTION_SHARE:.0%} of runs "
        f"(is {share:.0%})": share >= PREDICTION_SHARE,
    }
    small, large = by_case.get("1 GiB hotset"), by_case.get("4 GiB hotset")
    if small and large and small["downtime-median"] and large["downtime-median"] is not None:
        growth = large["downtime-median"] / small["downtime-median"]
        out[f"hotset 4 GiB / 1 GiB median <= {GROWTH_TARGET} (is {growth:.2f})"] = (
            growth <= GROWTH_TARGET
        )
    return out


def result_path(out: Path, name: str, suffix: str) -> tuple[Path, dict[str, Any]]:
    """Where a result goes and its stamp, with the commit read now: at the
    end of the runs, the code every one of them ran."""
    sha = commit()
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}-{sha}{suffix}.json", {
        "benchmark": name,
        "commit": sha,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "load-average-at-end": os.getloadavg(),
    }


def print_verdicts(verdict: dict[str, bool], path: Path) -> None:
    for what, ok in verdict.items():
        print(f"{'met' if ok else 'NOT MET'}: {what}")
    print(f"wrote {path}")


def markdown(rows: list[dict[str, Any]]) -> str:
    terms = sorted({k for r in rows for k in r["breakdown-median"]})
    head = ["case", "downtime median", "max", "predicted / measured", "total", *terms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pairs = ", ".join(
            f"{p:.0f}/{m:.0f}" if p is not None else f"-/{m:.0f}"
            for p, m in zip(r["predicted"], r["measured"], strict=True)
        )
        if r["failed"]:
            pairs += f" ({len(r['failed'])} failed)"
        if r["downtime-median"] is None:
            lines.append(f"| {r['case']} | all {r['runs']} runs failed |" + " |" * (len(head) - 2))
            continue
        cells = [
            r["case"], f"{r['downtime-median']:.0f} ms", f"{r['downtime-max']:.0f} ms", pairs,
            f"{r['total-median'] / 1000:.1f} s",
            *(f"{r['breakdown-median'].get(k, 0.0):.1f}" for k in terms),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="downtime_scale", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 2 GiB, no sparse guest, 2 runs")
    ap.add_argument("--sizes", default="1,2,4", help="image sizes in GiB (default 1,2,4)")
    ap.add_argument("--sparse", default="8", help="sparse guest size in GiB, 0 for none")
    ap.add_argument(
        "--workloads",
        default="idle,hotset",
        help="workload names to run (default idle,hotset; the sparse guest is hotset)",
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--verify", default=None, help="pass --verify MODE to mig demo")
    ap.add_argument("--image-dir", default=tempfile.gettempdir(), help="where images are kept")
    ap.add_argument("--out", default=str(HERE / "results"), help="result directory")
    ap.add_argument("--timeout", type=float, default=180.0, help="per migration, seconds")
    args = ap.parse_args(argv)
    sizes = [1, 2] if args.quick else [int(s) for s in args.sizes.split(",")]
    names = {w.split(":")[0]: w for w in WORKLOADS}
    picked = [n.strip() for n in args.workloads.split(",") if n.strip()]
    if unknown := [n for n in picked if n not in names]:
        ap.error(f"unknown workload {unknown[0]!r} (expected {', '.join(names)})")
    workloads = [names[n] for n in picked]
    sparse = 0 if args.quick or WORKLOADS[1] not in workloads else int(args.sparse)
    runs = 2 if args.quick else args.runs
    mig_exe = shutil.which("mig")
    mig = [mig_exe] if mig_exe else [sys.executable, "-m", "mig.cli"]
    extra = ["--verify", args.verify] if args.verify else []
    cases: list[tuple[str, int, Path | None, str]] = []
    for gib in sizes:
        image = Path(args.image_dir) / f"mig-half-random-{gib << 10}MiB.raw"
        make_image(image, gib * GIB)
        for w in workloads:
            cases.append((f"{gib} GiB {w.split(':')[0]}", gib * GIB, image, w))
    if sparse:
        cases.append((f"{sparse} GiB sparse hotset", sparse * GIB, None, WORKLOADS[1]))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in cases}
    for rnd in range(runs):
        for name, size, image, workload in cases:  # interleaved: each case sees every load
            r = run_case(mig, size, image, workload, extra, args.timeout)
            results[name].append(r)
            if r["status"] != "completed":
                print(f"run {rnd + 1}: {name}: {r['status']}: {r['error']}", flush=True)
                continue
            predicted = r["predicted"] or 0
            fits = within_prediction(r["predicted"], r["downtime"])
            print(
                f"run {rnd + 1}: {name}: downtime {r['downtime']:.1f} ms, predicted "
                f"{predicted:.1f} ({'within' if fits else 'OUTSIDE'} the bound), "
                f"settle {r['settle-time'] or 0:.0f} ms, verified {r['verified']}",
                flush=True,
            )
    rows = [summarise(name, results[name]) for name, *_ in cases]
    verdict = verdicts(rows)
    # A run of some cases only never stands for (or replaces) the whole table.
    partial = (sizes, sparse, workloads) != ([1, 2, 4], 8, list(WORKLOADS))
    suffix = "-quick" if args.quick else "-partial" if partial else ""
    path, stamp = result_path(Path(args.out), "downtime_scale", suffix)
    path.write_text(json.dumps({
        **stamp,
        "command": "mig demo --image IMG --workload W --devices none --channels 2 "
                   "--downtime-limit 300ms --json" + (f" --verify {args.verify}" if extra else ""),
        "rows": rows,
        "prediction-within-bound": prediction_share(rows),
        "verdicts": verdict,
        "raw": results,
    }, indent=2) + "\n")  # fmt: skip
    print(markdown(rows))
    print_verdicts(verdict, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
