"""Post-copy placement on shmem: ``continue`` (MINOR mode, UFFDIO_CONTINUE)
against ``copy`` (UFFDIO_COPY), in the same run.

    python benches/postcopy_placement.py [--rounds N] [--mib M] [--faults F] [--no-demo]

Three parts, each alternating the two placements round by round:

* placement throughput: a memfd guest memory of ``--mib`` MiB, every page
  written (held from pre-copy), registered with every page owed (the
  post-copy discard: a hole punched for ``copy``, the guest mapping's entries
  dropped for ``continue``), then placed chunk by chunk (64 KiB, the
  post-copy chunk) with ``PostcopyRegion.place_run``, the call the
  destination's page channels make: in Rust, the GIL released. Pages/s over
  the wall time and over the process's CPU time (both threads of the region
  included), median of the rounds per placement, and the ratio of medians
  (continue / copy). The same for zero chunks (``place_zero_range``, as a
  ``ZERO`` frame's run is placed) over a memfd that never held them (holes,
  the common case of a guest's untouched memory).
* fault latency for 4 KiB pages: a reader thread touches owed pages in a
  random order; a serving thread takes each request (``next_requests``) and
  places the page alone (``place``), as a requested page is. Timed from the
  reader: access start to access end; p50/p99 over every fault of every
  round, ratio of medians (continue / copy).
* the post-copy demo once per placement (skipped with ``--no-demo``)::

      mig demo --size 1GiB --workload sequential:wss=256MiB,rate=961000 \\
          --devices none --max-bandwidth 100MiB/s --downtime-limit 300ms \\
          --postcopy --json --dest-backing memfd --postcopy-placement P

  (the demo's destination otherwise picks the fastest backing to fill,
  often anonymous memory, where only ``copy`` places): total time,
  downtime, the post-copy phase's length (its total time also depends on
  when the policy switched), the destination's fault latency p50/p99 and
  blocktime.

Every placed page is checked byte for byte against what was placed, and
every demo must complete verified. The result goes to
``benches/results/postcopy_placement-<commit>.json``, the commit read at
the end of the run. On a loaded host the figures are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script, this directory is on sys.path.
from first_touch import time_first_touches
from transfer_user_path import commit

import mig

HERE = Path(__file__).resolve().parent
PAGE = 4096
CHUNK = 64 << 10
PLACEMENTS = ("copy", "continue")


def owed_memory(pages: int, seed: int) -> tuple[mig.GuestMemory, np.ndarray]:
    """A memfd memory whose every page holds stale bytes, and the fresh ones."""
    mem = mig.GuestMemory(pages * PAGE, "memfd")
    rng = np.random.default_rng(seed)
    mem.array[:] = rng.integers(1, 256, pages * PAGE, dtype=np.uint8)  # stale
    fresh = rng.integers(1, 256, pages * PAGE, dtype=np.uint8)
    return mem, fresh


def throughput_round(placement: str, pages: int, seed: int) -> dict[str, float]:
    mem, fresh = owed_memory(pages, seed)
    chunks = [fresh[o : o + CHUNK].tobytes() for o in range(0, pages * PAGE, CHUNK)]
    region = mig.PostcopyRegion(vcpus=1, placement=placement)
    region.register(mem, [(0, pages)])
    per = CHUNK // PAGE
    w0, c0 = time.perf_counter(), time.process_time()
    placed = sum(region.place_run(i * per, c) for i, c in enumerate(chunks))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    region.close()
    assert placed == pages, (placed, pages)
    assert np.array_equal(mem.array, fresh), f"{placement}: placed bytes differ"
    return {"pages-per-s": pages / wall, "pages-per-cpu-s": pages / cpu}


def zero_round(placement: str, pages: int) -> dict[str, float]:
    mem = mig.GuestMemory(pages * PAGE, "memfd")
    region = mig.PostcopyRegion(vcpus=1, placement=placement)
    region.register(mem, [(0, pages)])
    per = CHUNK // PAGE
    w0, c0 = time.perf_counter(), time.process_time()
    placed = sum(region.place_zero_range(p, per) for p in range(0, pages, per))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    region.close()
    assert placed == pages, (placed, pages)
    assert not mem.array.any(), f"{placement}: zero pages are not zero"
    return {"pages-per-s": pages / wall, "pages-per-cpu-s": pages / cpu}


def latency_round(placement: str, pages: int, seed: int) -> tuple[list[float], dict[str, Any]]:
    mem, fresh = owed_memory(pages, seed)
    data = [fresh[p * PAGE : (p + 1) * PAGE].tobytes() for p in range(pages)]
    region = mig.PostcopyRegion(vcpus=1, placement=placement)
    region.register(mem, [(0, pages)])
    order = np.random.default_rng(seed + 1).permutation(pages)
    times, stats = time_first_touches(region, mem.array.ctypes.data, data, order)
    assert stats["faults-resolved"] == pages, stats
    assert np.array_equal(mem.array, fresh), f"{placement}: placed bytes differ"
    return times, stats


def demo(placement: str) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "mig.cli", "demo", "--size", "1GiB",
        "--workload", "sequential:wss=256MiB,rate=961000", "--devices", "none",
        "--max-bandwidth", "100MiB/s", "--downtime-limit", "300ms", "--postcopy", "--json",
        "--dest-backing", "memfd", "--postcopy-placement", placement,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    try:
        q = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"mig demo failed ({out.returncode}): {out.stderr[-2000:]}") from None
    pc = q.get("destination-postcopy") or {}
    run = {
        "status": q.get("status"),
        "verified": bool(q.get("verified")),
        "error": q.get("error-desc"),
        "placement": pc.get("postcopy-placement"),
        "total-ms": q.get("total-time"),
        "postcopy-ms": (q.get("postcopy") or {}).get("postcopy-time"),
        "downtime-ms": q.get("downtime"),
        "postcopy-requests": q.get("postcopy-requests"),
        "postcopy-blocktime-ms": pc.get("postcopy-blocktime"),
        "fault-latency-p50-ms": pc.get("fault-latency-p50"),
        "fault-latency-p99-ms": pc.get("fault-latency-p99"),
    }
    assert run["status"] == "completed" and run["verified"], run
    assert run["placement"] == placement, run
    return run


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64, help="memory placed per throughput round")
    ap.add_argument("--faults", type=int, default=1000, help="faults per latency round")
    ap.add_argument("--no-demo", action="store_true")
    args = ap.parse_args()
    cap = mig.capabilities()["postcopy"]
    if not cap["available"] or not cap["placement_continue"]["available"]:
        print(f"host lacks userfaultfd MISSING/MINOR mode on shmem: {cap}")
        return 1
    pages = (args.mib << 20) // PAGE
    thr: dict[str, list[dict[str, float]]] = {p: [] for p in PLACEMENTS}
    zero: dict[str, list[dict[str, float]]] = {p: [] for p in PLACEMENTS}
    lat: dict[str, list[float]] = {p: [] for p in PLACEMENTS}
    region_lat: dict[str, list[dict[str, Any]]] = {p: [] for p in PLACEMENTS}
    for r in range(args.rounds):
        order = PLACEMENTS if r % 2 == 0 else PLACEMENTS[::-1]
        for p in order:
            thr[p].append(throughput_round(p, pages, r))
            zero[p].append(zero_round(p, pages))
            t, s = latency_round(p, args.faults, r)
            lat[p] += t
            region_lat[p].append(
                {k: s[k] for k in ("fault-latency-p50", "fault-latency-p99", "postcopy-faults")}
            )
        print(
            f"round {r + 1}: "
            + ", ".join(
                f"{p} {thr[p][-1]['pages-per-s']:.0f} pages/s, fault p50 {pct(lat[p], 50):.1f} us"
                for p in PLACEMENTS
            ),
            flush=True,
        )

    def med(p: str, key: str, runs: dict[str, list[dict[str, float]]] = thr) -> float:
        return statistics.median(x[key] for x in runs[p])

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "load-average": os.getloadavg(),
        "rounds": args.rounds,
        "mib-per-round": args.mib,
        "chunk-bytes": CHUNK,
        "faults-per-round": args.faults,
        "throughput": {
            p: {
                "pages-per-s-median": med(p, "pages-per-s"),
                "pages-per-cpu-s-median": med(p, "pages-per-cpu-s"),
                "rounds": thr[p],
            }
            for p in PLACEMENTS
        },
        "throughput-ratio-of-medians": med("continue", "pages-per-s") / med("copy", "pages-per-s"),
        "cpu-throughput-ratio-of-medians": med("continue", "pages-per-cpu-s")
        / med("copy", "pages-per-cpu-s"),
        "zero-throughput": {
            p: {
                "pages-per-s-median": med(p, "pages-per-s", zero),
                "pages-per-cpu-s-median": med(p, "pages-per-cpu-s", zero),
                "rounds": zero[p],
            }
            for p in PLACEMENTS
        },
        "zero-throughput-ratio-of-medians": med("continue", "pages-per-s", zero)
        / med("copy", "pages-per-s", zero),
        "zero-cpu-throughput-ratio-of-medians": med("continue", "pages-per-cpu-s", zero)
        / med("copy", "pages-per-cpu-s", zero),
        "fault-latency-us": {
            p: {"p50": pct(lat[p], 50), "p99": pct(lat[p], 99), "region": region_lat[p]}
            for p in PLACEMENTS
        },
        "fault-latency-ratio-of-medians": statistics.median(lat["continue"])
        / statistics.median(lat["copy"]),
    }
    if not args.no_demo:
        result["demo"] = {p: demo(p) for p in PLACEMENTS}
    result["commit"] = commit()  # stamped at the end: what was measured
    out = HERE / "results" / f"postcopy_placement-{result['commit']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    skip = ("throughput", "zero-throughput", "fault-latency-us")
    print(json.dumps({k: v for k, v in result.items() if k not in skip}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
