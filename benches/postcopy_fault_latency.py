"""Post-copy fault latency for 4 KiB pages served from a local thread.

    python benches/postcopy_fault_latency.py [rounds] [faults-per-round]

Subject: a vCPU-like thread reads one word of a missing page of a
``PostcopyRegion``; the fault thread hands the request on, a serving thread
takes it with ``next_requests()`` and places the page with ``place()``
(UFFDIO_COPY); the vCPU thread resumes. Timed from the vCPU thread: access
start to access end.

Baseline, measured in the same run with the same two Python threads: the
requesting thread writes the page number into a pipe, the serving thread
reads it, copies the page with a plain memcpy and answers through a second
pipe; timed from request to answer. So the ratio is the cost of the fault
path (kernel fault, fault thread, UFFDIO_COPY) over the cheapest way two
threads can ask for and copy a page.

Rounds alternate subject and baseline. The figure is the ratio of medians
(subject / baseline) over all samples; p50/p99 of both, and the region's
own fault-latency p50/p99 (fault read -> page placed), are stored with the
commit in ``benches/results/postcopy_fault_latency.json``.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from first_touch import time_first_touches

import mig

HERE = Path(__file__).parent
RESULT = HERE / "results" / "postcopy_fault_latency.json"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def subject_round(n: int, seed: int) -> tuple[list[float], dict[str, Any]]:
    src = mig.GuestMemory(n * 4096)
    src.array[:] = np.random.default_rng(seed).integers(1, 256, n * 4096, dtype=np.uint8)
    pages = [src.array[p * 4096 : (p + 1) * 4096].tobytes() for p in range(n)]
    dst = mig.GuestMemory(n * 4096)
    region = mig.PostcopyRegion(vcpus=1)
    region.register(dst)
    order = np.random.default_rng(seed + 1).permutation(n)
    times, stats = time_first_touches(region, dst.array.ctypes.data, pages, order)
    assert stats["faults-resolved"] == n
    return times, stats


def baseline_round(n: int, seed: int) -> list[float]:
    src = mig.GuestMemory(n * 4096)
    src.array[:] = np.random.default_rng(seed).integers(1, 256, n * 4096, dtype=np.uint8)
    dst = mig.GuestMemory(n * 4096)
    sb, db = src.array.ctypes.data, dst.array.ctypes.data
    req_r, req_w = os.pipe()
    ans_r, ans_w = os.pipe()

    def serve() -> None:
        while True:
            raw = os.read(req_r, 8)
            p = int.from_bytes(raw, "little")
            if p == n:
                return
            ctypes.memmove(db + p * 4096, sb + p * 4096, 4096)
            os.write(ans_w, b"k")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    order = np.random.default_rng(seed + 1).permutation(n)
    times: list[float] = []
    for p in order:
        t0 = time.perf_counter_ns()
        os.write(req_w, int(p).to_bytes(8, "little"))
        os.read(ans_r, 1)
        times.append((time.perf_counter_ns() - t0) / 1e3)
    os.write(req_w, n.to_bytes(8, "little"))
    server.join()
    for fd in (req_r, req_w, ans_r, ans_w):
        os.close(fd)
    assert np.array_equal(src.array, dst.array)
    return times


def commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=HERE,
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main() -> int:
    caps = mig.capabilities()["postcopy"]
    if not caps["available"]:
        print(f"host lacks userfaultfd MISSING mode: {caps['reason']}")
        return 1
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    subj: list[float] = []
    base: list[float] = []
    region_p50: list[float] = []
    region_p99: list[float] = []
    for r in range(rounds):
        kinds = ("subject", "baseline") if r % 2 == 0 else ("baseline", "subject")
        for kind in kinds:
            if kind == "subject":
                t, s = subject_round(n, r)
                subj += t
                region_p50.append(s["fault-latency-p50"])
                region_p99.append(s["fault-latency-p99"])
            else:
                base += baseline_round(n, r)
        print(
            f"round {r + 1}: subject p50 {pct(subj, 50):.1f} us, baseline p50 "
            f"{pct(base, 50):.1f} us",
            flush=True,
        )
    result = {
        "commit": commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "faults-per-round": n,
        "page-size": 4096,
        "kernel-faults": caps["kernel_faults"],
        "subject-us": {"p50": pct(subj, 50), "p99": pct(subj, 99)},
        "baseline-us": {"p50": pct(base, 50), "p99": pct(base, 99)},
        "ratio-of-medians": statistics.median(subj) / statistics.median(base),
        "region-fault-latency-ms": {
            "p50-median-of-rounds": statistics.median(region_p50),
            "p99-median-of-rounds": statistics.median(region_p99),
        },
    }
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
