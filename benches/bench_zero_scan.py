"""Zero-page scan and compaction vs memory read bandwidth, same run.

The sender's zero-page detection and compaction (word-wise zero test per
page, offsets partitioned into normal and zero pages, as QEMU's multifd
zero-page detection does) runs single-threaded over two 1 GiB images:
interleaved random and zero pages, and all zero pages (every byte must be
read: the worst case). The baseline reads the same memory once with a plain
word loop, alternating with the scan. Reports median bandwidths and ratios
(target: scan >= 0.8 x read). For information it also times scan + the copy
of normal pages into packet buffers (the send path's next step).

    python benches/bench_zero_scan.py [--size-mib 1024] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import mig
from mig import _mig


def half_random_half_zero(size: int, seed: int = 1) -> mig.GuestMemory:
    mem = mig.GuestMemory(size)
    # Populate every page: zero pages are real zero-filled pages that must
    # be read, not never-touched holes.
    mem.array[:] = 0
    pages = mem.array.reshape(mem.num_pages, mem.page_size)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(mem.num_pages)[: mem.num_pages // 2])
    step = 4096
    for i in range(0, len(chosen), step):
        idx = chosen[i : i + step]
        pages[idx] = np.frombuffer(rng.bytes(len(idx) * mem.page_size), np.uint8).reshape(
            len(idx), mem.page_size
        )
    return mem


def measure(mem: mig.GuestMemory, rounds: int, copy: bool) -> tuple[float, float, float]:
    full = mig.DirtyBitmap.full(mem.num_pages)
    _mig.read_memory(mem)  # fault everything in before timing
    read_bw, scan_bw, ratios = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _mig.read_memory(mem)
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = _mig.scan_pages(mem, full, copy=copy)
        t_scan = time.perf_counter() - t0
        assert res["normal"] + res["zero-pages"] == mem.num_pages
        read_bw.append(mem.size / t_read)
        scan_bw.append(mem.size / t_scan)
        ratios.append(t_read / t_scan)
    return statistics.median(read_bw), statistics.median(scan_bw), statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    size = args.size_mib << 20
    zero = mig.GuestMemory(size)
    zero.array[:] = 0
    images = {"half random/half zero": half_random_half_zero(size), "all zero": zero}
    print(f"{'image':24} {'step':18} {'read GB/s':>10} {'scan GB/s':>10} {'ratio':>6}")
    for name, mem in images.items():
        for copy in (False, True):
            read_bw, scan_bw, ratio = measure(mem, args.rounds, copy)
            step = "scan+copy (info)" if copy else "scan+compaction"
            print(f"{name:24} {step:18} {read_bw / 1e9:10.2f} {scan_bw / 1e9:10.2f} {ratio:6.2f}")
    print("target: scan+compaction ratio >= 0.80 (medians of per-round ratios)")


if __name__ == "__main__":
    main()
