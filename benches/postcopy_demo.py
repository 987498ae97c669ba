"""Post-copy against auto-converge on a workload pre-copy cannot converge on.

Each case is one run of the command users run::

    mig demo --size 1GiB --workload sequential:wss=256MiB,rate=961000 --devices none \
        --max-bandwidth 100MiB/s --downtime-limit 300ms --json  (--postcopy | --auto-converge)

(a source and a destination process over loopback TCP; the destination
runs the same workload from its resume on; the demo's own timeout forces
the switchover of a run that does not converge). Runs alternate between the two
modes, ``--runs`` each (default 1).

Reported per mode, medians over the runs: total time, downtime, the page
writes the guest completed during the migration on each side and their
rate, and for post-copy the destination's ``postcopy-blocktime`` and fault
latency p50/p99 (with the background push running).

Fault latency with the push running against idle (``fault_latency``): a
guest of the case's working set migrated in post-copy from its start
(everything owed) through the Python API, the destination guest writing
random pages at a modest rate, the link capped at the case's
``--max-bandwidth``; the faults are measured over a window shorter than
the push: once with the push running at the link's cap, once with it held
at 1 byte/s (``max_postcopy_bandwidth``: every page comes on request). The
push's and the requests' rates observed during the window are reported
with the latencies.

The cap: ``--max-bandwidth`` is mig's model of the link's capacity and
holds through the switchover and the post-copy phase, requested pages and
push alike (QEMU lifts ``max-bandwidth`` there and applies
``max-postcopy-bandwidth``, 0 = unlimited; mig keeps that parameter as a
further limit of the push). So every byte the baseline counts, and every
byte post-copy sends, goes at the same cap.

Verdicts: post-copy byte-exact (verified), total time <= 1.3x the time to
send the guest's written memory (its working set; the rest of the demo
guest is zero pages) once at the cap, downtime <= 300 ms, the guest's page
writes per second of migration (both sides together) >= 2x auto-converge's,
fault latency p50 <= 1 ms and p99 <= 10 ms with the push running.

Results go to ``benches/results/postcopy_demo-<commit>.json``.

    python benches/postcopy_demo.py [--runs N] [--quick]
    python benches/postcopy_demo.py --frontier [--quick]

``--frontier``: post-copy switched at several points (the policy's, after a
time, after whole passes) and auto-converge, once each in the same run;
total time and guest writes of each point against the bounds
(``postcopy_frontier``).

Each run also reports its ``phases``: where its time went on the source's
clock (setup, pre-copy until the switch, settle, downtime, after resume
with the post-copy phase's own length) and the bytes sent beyond the
guest's written memory once.

``--quick`` uses a 256 MiB guest (wss 64 MiB, 25 MiB/s), same proportions.
Both processes share the host's cores; absolute figures are this host's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as a script, this directory is on sys.path.
from transfer_user_path import commit

HERE = Path(__file__).resolve().parent
LIMIT_MS = 300.0
MIB = 1 << 20
# The fault-latency cases: the destination guest's page writes per second
# (at most one 64 KiB chunk requested each: under a fifth of a 100 MiB/s
# link) and
# how long the faults are measured (the push of the case's working set at
# the cap lasts longer).
FAULT_RATE = 300
WINDOW_S = 1.5


def demo(
    size_mib: int, wss_mib: int, bw_mib: int, mode: str, timeout: float, extra: Sequence[str] = ()
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "mig.cli", "demo", "--size", f"{size_mib}MiB",
        "--workload", f"sequential:wss={wss_mib}MiB,rate=961000", "--devices", "none",
        "--max-bandwidth", f"{bw_mib}MiB/s", "--downtime-limit", f"{LIMIT_MS:g}ms",
        "--json", f"--{mode}", *extra,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120)
    try:
        q = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"mig demo failed ({out.returncode}): {out.stderr[-2000:]}") from None
    src, dst = q.get("guest") or {}, q.get("destination-guest") or {}
    pc = q.get("destination-postcopy") or {}
    return {
        "status": q.get("status"),
        "verified": bool(q.get("verified")),
        "error": q.get("error-desc"),
        "total-ms": float(q.get("total-time", 0.0)),
        "downtime-ms": q.get("downtime"),
        "source-writes": int(src.get("writes-during-migration", 0)),
        "source-writes-per-s": float(src.get("writes-per-second", 0.0)),
        "dest-writes": int(dst.get("writes-during-migration", 0)),
        "dest-writes-per-s": float(dst.get("writes-per-second", 0.0)),
        "postcopy-requests": q.get("postcopy-requests"),
        "postcopy-blocktime-ms": pc.get("postcopy-blocktime"),
        "fault-latency-p50-ms": pc.get("fault-latency-p50"),
        "fault-latency-p99-ms": pc.get("fault-latency-p99"),
        "throttle-pct": q.get("cpu-throttle-percentage"),
        "sent-bytes": int((q.get("ram") or {}).get("transferred", 0))
        + int((q.get("postcopy") or {}).get("postcopy-bytes", 0)),
        "phases": phases(q, wss_mib * MIB),
    }


def phases(q: dict[str, Any], written: int) -> dict[str, Any]:
    """Where the migration's time and bytes went, in order on the source's clock, ms.

    ``setup`` (connect, hello, the tracker's registration and first sync),
    ``precopy`` (pre-copy until the switch was decided: for post-copy the
    measuring windows), ``settle`` (the wait, guest running, for what was
    sent to land), ``downtime`` (pause to the destination running),
    ``after-resume`` (the rest until ``completed``: for post-copy its phase,
    of which ``postcopy-time`` is "go" to the last chunk placed), and the
    bytes sent beyond the guest's written memory once (``excess-bytes``)."""
    passes = q.get("passes") or []
    total, setup = float(q.get("total-time", 0.0)), float(q.get("setup-time", 0.0))
    settle, down = float(q.get("settle-time") or 0.0), float(q.get("downtime") or 0.0)
    parts = q.get("downtime-breakdown") or {}
    # The last pass record is the stop-copy's, taken once the pause, the
    # final sync and the final harvest were done.
    last = float(passes[-1]["time"]) * 1000 if passes else setup + settle
    paused_at = last - sum(float(parts.get(k, 0.0)) for k in ("pause", "final-sync", "final-ram"))
    pc = q.get("postcopy") or {}
    ram = q.get("ram") or {}
    sent = int(ram.get("transferred", 0)) + int(pc.get("postcopy-bytes", 0))
    return {
        "setup": setup,
        "precopy": max(0.0, paused_at - settle - setup),
        "settle": settle,
        "downtime": down,
        "after-resume": max(0.0, total - paused_at - down),
        "postcopy-time": pc.get("postcopy-time"),
        "precopy-bytes": int(ram.get("transferred", 0)),
        "postcopy-bytes": int(pc.get("postcopy-bytes", 0)),
        "excess-bytes": sent - written,
    }


def fault_latency(link_bps: int, size: int, push: bool) -> dict[str, Any]:
    """Fault latency over ``WINDOW_S`` of post-copy, the push running or idle.

    A guest of ``size`` bytes, all of it owed (post-copy from the start);
    the destination guest writes uniformly random pages at
    ``FAULT_RATE``/s, so that its requests take a small part of the link.
    Running: the push may use the rest of the link (``max_postcopy_bandwidth``
    0). Idle: the push is held at 1 byte/s (QEMU's parameter, set at the
    start), every page comes on request. At the end of the window both
    sides' figures are taken; then the idle case's push is released
    (``set_max_postcopy_bandwidth(0)``) and the phase ends byte-exact."""
    import threading

    import mig
    from mig.destination import MigrationDestination
    from mig.source import MigrationSource

    src, dst = mig.GuestMemory(size), mig.GuestMemory(size)
    src.array[:] = 0x5A
    guest = mig.WorkloadGuest(src, vcpus=1, workload="idle")
    dest = MigrationDestination("tcp:127.0.0.1:0", dst, idle_timeout=60, vcpus=1)
    resumed = threading.Event()
    there: dict[str, Any] = {}

    def on_resume() -> None:
        spec = f"uniform:wss={size >> 20}MiB,rate={FAULT_RATE}"
        there["g"] = mig.WorkloadGuest(dst, vcpus=1, workload=spec)
        resumed.set()

    dest.on_resume = on_resume
    source = MigrationSource(
        guest,
        uri=dest.uri,
        postcopy=True,
        max_bandwidth=link_bps,
        max_postcopy_bandwidth=0 if push else 1,
        timeout=120,
    )
    dest.start()
    source.start()
    source.start_postcopy()
    try:
        if not resumed.wait(60):
            raise RuntimeError(f"post-copy did not start: {source.query().get('error-desc')}")
        before = dict(source.query().get("postcopy") or {})
        t0 = time.perf_counter()
        time.sleep(WINDOW_S)
        at = dict(source.query().get("postcopy") or {})
        window = time.perf_counter() - t0
        seen = dict(dest.query().get("postcopy") or {})
        if not push:
            source.set_max_postcopy_bandwidth(0)
        q, d = source.wait(180), dest.wait(60)
    finally:
        guest.close()
        if "g" in there:
            there["g"].close()
    chunk = 16 * 4096
    pushed = int(at.get("pushed-chunks", 0)) - int(before.get("pushed-chunks", 0))
    requested = int(at.get("requested-chunks", 0)) - int(before.get("requested-chunks", 0))
    return {
        "push": "running" if push else "idle",
        "window-s": window,
        "status": q.get("status"),
        "verified": bool(q.get("verified")) and bool(d.get("verified")),
        "faults-in-window": seen.get("postcopy-faults"),
        "pushed-chunks-in-window": pushed,
        "requested-chunks-in-window": requested,
        "push-bytes-per-s": pushed * chunk / window,
        "request-bytes-per-s": requested * chunk / window,
        "fault-latency-p50-ms": seen.get("fault-latency-p50"),
        "fault-latency-p99-ms": seen.get("fault-latency-p99"),
    }


def med(rows: list[dict[str, Any]], key: str) -> float | None:
    xs = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument(
        "--frontier",
        action="store_true",
        help="post-copy at several switch points against auto-converge (postcopy_frontier)",
    )
    args = ap.parse_args()
    size, wss, bw = (256, 64, 25) if args.quick else (1024, 256, 100)
    timeout = 120.0
    if args.frontier:
        import postcopy_frontier

        return postcopy_frontier.run(demo, size, wss, bw, timeout, Path(args.out), commit)
    runs: dict[str, list[dict[str, Any]]] = {"postcopy": [], "auto-converge": []}
    for i in range(args.runs):
        for mode in runs:
            t0 = time.perf_counter()
            r = demo(size, wss, bw, mode, timeout)
            r["wall-s"] = time.perf_counter() - t0
            runs[mode].append(r)
            print(f"run {i + 1} {mode}: {json.dumps(r)}", file=sys.stderr)
    summary = {
        mode: {
            k: med(rows, k)
            for k in (
                "total-ms",
                "downtime-ms",
                "source-writes",
                "source-writes-per-s",
                "dest-writes",
                "dest-writes-per-s",
                "postcopy-blocktime-ms",
                "fault-latency-p50-ms",
                "fault-latency-p99-ms",
                "sent-bytes",
            )
        }  # fmt: skip
        for mode, rows in runs.items()
    }
    latency = {
        "running": fault_latency(bw * MIB, wss * MIB, push=True),
        "idle": fault_latency(bw * MIB, wss * MIB, push=False),
    }
    once_ms = wss / bw * 1000  # the guest's written memory (its wss) once at the cap
    pc, ac = summary["postcopy"], summary["auto-converge"]

    def writes(s: dict[str, Any]) -> float:
        """Page writes per second of migration, both sides together."""
        total = (s["source-writes"] or 0) + (s["dest-writes"] or 0)
        return total / max((s["total-ms"] or 0) / 1000, 1e-9)

    verdicts = {
        "postcopy byte-exact": all(r["verified"] for r in runs["postcopy"]),
        "total <= 1.3x one send at the cap": (pc["total-ms"] or 1e18) <= 1.3 * once_ms,
        "downtime <= 300 ms": (pc["downtime-ms"] or 1e18) <= LIMIT_MS,
        "guest writes/s >= 2x auto-converge": writes(pc) >= 2 * writes(ac),
        "fault p50 <= 1 ms (push running)": (latency["running"]["fault-latency-p50-ms"] or 1e9)
        <= 1.0,
        "push really running / idle during the faults": latency["running"]["push-bytes-per-s"]
        >= 0.5 * bw * MIB
        and latency["idle"]["pushed-chunks-in-window"] <= 1,
        "fault p99 <= 10 ms (push running)": (latency["running"]["fault-latency-p99-ms"] or 1e9)
        <= 10.0,
    }
    sha = commit()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"postcopy_demo-{sha}{'-quick' if args.quick else ''}.json"
    result = {
        "benchmark": "postcopy_demo",
        "commit": sha,
        "case": {"size-mib": size, "wss-mib": wss, "max-bandwidth-mib-s": bw},
        "one-send-at-cap-ms": once_ms,
        "runs": runs,
        "summary": summary,
        "writes-per-s-postcopy": writes(pc),
        "writes-per-s-auto-converge": writes(ac),
        "writes-per-s-ratio": writes(pc) / max(writes(ac), 1e-9),
        "fault-latency": latency,
        "verdicts": verdicts,
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    shown = {"summary": summary, "fault-latency": latency, "verdicts": verdicts}
    print(json.dumps(shown, indent=2))
    print(f"stored {path}", file=sys.stderr)
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
