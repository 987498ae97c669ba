"""How fast the destination fills its memory, per backing, same run.

For each backing the host offers (memfd, anon, anon-thp; memfd-thp and
hugetlb where available), rounds alternate:

* baseline: numpy writes the whole size into memory that is already
  populated (memory write bandwidth, no page faults);
* fill: numpy writes the whole size into a fresh memory of the backing
  (first-touch faults, kernel zeroing, the write);
* receive: a Sender streams every page (all normal pages) over loopback tcp
  with 2 channels into a fresh memory of the backing; timed from opening the
  Sender to the end of `wait_end` (which includes the destination digest);
* receive+populate: the same with `populate()` (MADV_POPULATE_WRITE) of the
  destination running in a background thread from the start.

Reports medians and ratios of medians (fill / baseline, receive / baseline,
each backing's receive against memfd's) and stores them with the commit in
``benches/results/receive-<commit>.json``. Both ends run on this host's
cores (2 here), so sender and receiver share them.

    python benches/bench_receive.py [--size-mib 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

import mig

RESULTS = Path(__file__).with_name("results")


def commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def source(size: int) -> mig.GuestMemory:
    """Every page normal (non-zero), so every destination page is filled."""
    src = mig.GuestMemory(size)
    pages = src.array.reshape(src.num_pages, src.page_size)
    pages[:] = (np.arange(src.page_size, dtype=np.uint32) % 251 + 1).astype(np.uint8)
    pages[:, 0] = np.arange(src.num_pages, dtype=np.uint64).astype(np.uint8)
    return src


def baseline_seconds(buf: np.ndarray, value: int) -> float:
    t0 = time.perf_counter()
    buf.fill(value)
    return time.perf_counter() - t0


def fill_seconds(size: int, backing: str) -> tuple[float, int]:
    mem = mig.GuestMemory(size, backing)
    t0 = time.perf_counter()
    mem.array.fill(1)
    elapsed = time.perf_counter() - t0
    return elapsed, mem.huge_bytes()


def receive_seconds(
    src: mig.GuestMemory, digest: int, backing: str, populate: bool
) -> tuple[float, int]:
    dst = mig.GuestMemory(src.size, backing)
    listener = mig.Listener("tcp:127.0.0.1:0")
    got: dict[str, mig.Receiver] = {}
    accept = threading.Thread(target=lambda: got.update(r=listener.accept(dst, 30.0)))
    t0 = time.perf_counter()
    accept.start()
    filler = threading.Thread(target=dst.populate) if populate else None
    if filler:
        filler.start()
    with mig.Sender(src, listener.uri, migration_id=time.time_ns(), channels=2) as sender:
        sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 1)
        sender.sync(1)
        sender.finish(digest)
        accept.join()
        end = got["r"].wait_end(120.0)
    elapsed = time.perf_counter() - t0
    if filler:
        filler.join()
    assert end["digest"] == digest
    return elapsed, dst.huge_bytes()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mib << 20
    offers = [o for o in mig.memory_backings() if o["available"]]
    backings = [o["backing"] for o in reversed(offers)]  # memfd first
    src = source(size)
    digest = src.digest()
    warm = np.ones(size, dtype=np.uint8)  # populated: the baseline's target
    base: list[float] = []
    fill: dict[str, list[float]] = {b: [] for b in backings}
    recv: dict[str, list[float]] = {b: [] for b in backings}
    recv_pop: dict[str, list[float]] = {b: [] for b in backings}
    huge: dict[str, int] = {}
    for r in range(args.rounds):
        base.append(baseline_seconds(warm, r + 2))
        for b in backings:
            t, _ = fill_seconds(size, b)
            fill[b].append(t)
            t, huge[b] = receive_seconds(src, digest, b, populate=False)
            recv[b].append(t)
            t, _ = receive_seconds(src, digest, b, populate=True)
            recv_pop[b].append(t)
    med = statistics.median
    b0 = med(base)
    rows = []
    print(f"{args.size_mib} MiB, {args.rounds} rounds; commit {commit()}")
    print(f"baseline: numpy write into populated memory, median {b0:.3f} s")
    print(
        f"{'backing':10} {'fill s':>7} {'fill/base':>9} {'recv s':>7} {'recv/base':>9} "
        f"{'recv/memfd':>10} {'recv+pop s':>10} {'pop/recv':>8} {'huge MiB':>8}"
    )
    for b in backings:
        row = {
            "backing": b,
            "fill_s": med(fill[b]),
            "fill_over_baseline": med(fill[b]) / b0,
            "receive_s": med(recv[b]),
            "receive_over_baseline": med(recv[b]) / b0,
            "receive_over_memfd": med(recv[b]) / med(recv["memfd"]),
            "receive_populate_s": med(recv_pop[b]),
            "populate_over_receive": med(recv_pop[b]) / med(recv[b]),
            "huge_bytes_after_receive": huge[b],
        }
        rows.append(row)
        print(
            f"{b:10} {row['fill_s']:7.3f} {row['fill_over_baseline']:9.2f} "
            f"{row['receive_s']:7.3f} {row['receive_over_baseline']:9.2f} "
            f"{row['receive_over_memfd']:10.2f} {row['receive_populate_s']:10.3f} "
            f"{row['populate_over_receive']:8.2f} {huge[b] >> 20:8d}"
        )
    load = os.getloadavg()
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in load)}")
    RESULTS.mkdir(exist_ok=True)
    rev = commit()
    out = RESULTS / f"receive-{rev[:12]}.json"
    record = {
        "commit": rev,
        "size_mib": args.size_mib,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "load_average": load,
        "baseline_s": b0,
        "samples": {"baseline": base, "fill": fill, "receive": recv, "receive_populate": recv_pop},
        "backings": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"stored in {out}")


if __name__ == "__main__":
    main()
