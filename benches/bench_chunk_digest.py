"""The chunk digest: its full read against memory read bandwidth, the
switchover's rehash after a final pass against a full digest, the receive
path's marking cost against copying the same pages, and what the background
rehasher takes from busy threads. Every figure is a median of per-round
ratios, subject and baseline alternating in one process.

* frozen: ``digest_frozen`` with 1 and 2 threads vs ``read_memory`` (one
  thread reading every byte) over populated memory, half random pages and
  half zero pages, interleaved.
* root: ``ChunkDigest.root()`` after ``--stale`` scattered pages were marked
  (a final pass), per chunk size, vs ``digest_frozen`` of all memory, and
  the memory it read per marked page (its stale blocks only).
* mark: marking every page in runs of ``--run`` pages (the receive path
  marks each run it stores) vs copying the same bytes into guest memory.
* steal: two threads copying into guest memory, with the rehasher busy on
  all of memory vs idle (1.0 = it takes nothing from them).

    python benches/bench_chunk_digest.py [--size-mib 512] [--rounds 5]

Writes the medians with the commit they measured to
``benches/chunk_digest_results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import mig
from mig import _mig

CHUNK_SIZES = [64 << 10, 256 << 10, 1 << 20, 2 << 20]
RESULTS = Path(__file__).with_name("chunk_digest_results.json")


def half_random_half_zero(size: int, seed: int = 1) -> mig.GuestMemory:
    mem = mig.GuestMemory(size)
    mem.array[:] = 0  # every page populated: zero pages are read, not holes
    pages = mem.array.reshape(mem.num_pages, mem.page_size)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(mem.num_pages)[: mem.num_pages // 2])
    for i in range(0, len(chosen), 4096):
        idx = chosen[i : i + 4096]
        pages[idx] = rng.integers(0, 256, size=(len(idx), mem.page_size), dtype=np.uint8)
    return mem


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def frozen(mem: mig.GuestMemory, rounds: int) -> dict[str, float]:
    """GB/s of the full read and of digest_frozen, and their ratios."""
    rows: dict[str, list[float]] = {"read": [], "frozen-1": [], "frozen-2": []}
    ratios: dict[str, list[float]] = {"frozen-1": [], "frozen-2": []}
    for _ in range(rounds):
        t_read = timed(lambda: _mig.read_memory(mem))
        rows["read"].append(mem.size / t_read / 1e9)
        for t in (1, 2):
            s = timed(lambda t=t: mig.digest_frozen(mem, threads=t))
            rows[f"frozen-{t}"].append(mem.size / s / 1e9)
            ratios[f"frozen-{t}"].append(t_read / s)
    out = {f"{k} GB/s": statistics.median(v) for k, v in rows.items()}
    out.update({f"{k} / read": statistics.median(v) for k, v in ratios.items()})
    return out


def root_after_final_pass(mem: mig.GuestMemory, stale: int, rounds: int) -> dict[str, float]:
    """root() with `stale` scattered pages marked, per chunk size, vs a full digest."""
    rng = np.random.default_rng(2)
    out: dict[str, float] = {}
    for chunk in CHUNK_SIZES:
        d = mig.ChunkDigest(mem, chunk_bytes=chunk)
        d.root()
        per_chunk = chunk // mem.page_size
        chunks = rng.choice(mem.num_pages // per_chunk, size=min(stale, d.chunks), replace=False)
        times, ratios, counts, read = [], [], [], []
        for _ in range(rounds):
            t_full = timed(lambda c=chunk: mig.digest_frozen(mem, chunk_bytes=c))
            for c in chunks:
                d.mark_written(int(c) * per_chunk + int(rng.integers(per_chunk)))
            r = d.root_timed()
            counts.append(r["rehashed-chunks"])
            read.append(r["rehashed-bytes"] / len(chunks))
            times.append(float(r["seconds"]))
            ratios.append(float(r["seconds"]) / t_full)
            assert r["root"] == mig.digest_frozen(mem, chunk_bytes=chunk)
        kib = chunk >> 10
        out[f"root ms, {kib} KiB chunks"] = statistics.median(times) * 1000
        out[f"root / full digest, {kib} KiB chunks"] = statistics.median(ratios)
        out[f"rehashed chunks, {kib} KiB chunks"] = statistics.median(counts)
        out[f"bytes read per stale page, {kib} KiB chunks"] = statistics.median(read)
    return out


def mark_cost(mem: mig.GuestMemory, run: int, rounds: int) -> dict[str, float]:
    """Marking every page in runs vs copying the same bytes in."""
    d = mig.ChunkDigest(mem)
    block = bytes(64 << 20)
    ratios, per_page = [], []
    for _ in range(rounds):
        t_copy = timed(lambda: [mem.write(off, block) for off in range(0, mem.size, len(block))])
        t_mark = timed(lambda: _mig.mark_pages(d, mem.num_pages, run))
        ratios.append(t_mark / t_copy)
        per_page.append(t_mark / mem.num_pages * 1e9)
    return {
        f"mark ns/page, runs of {run}": statistics.median(per_page),
        "mark / copy": statistics.median(ratios),
    }


def steal(mem: mig.GuestMemory, rounds: int) -> dict[str, float]:
    """Two copying threads with the rehasher busy vs idle."""
    block = bytes(32 << 20)
    half = mem.size // 2

    def work() -> None:
        def copy(base: int) -> None:
            for _ in range(4):
                for off in range(base, base + half, len(block)):
                    mem.write(off, block)

        ts = [threading.Thread(target=copy, args=(b,)) for b in (0, half)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    ratios, left = [], []
    for _ in range(rounds):
        quiet = timed(work)
        d = mig.ChunkDigest(mem)
        d.mark_written(0, mem.num_pages)
        d.rehash_settled(1)  # all were just marked: this opens the next window
        d.start_rehasher()
        busy = timed(work)
        left.append(d.stale_chunks / d.chunks)
        d.stop_rehasher()
        ratios.append(busy / quiet)
    return {
        "copy time, rehasher busy / idle": statistics.median(ratios),
        "share of chunks still stale after the busy copy": statistics.median(left),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stale", type=int, default=1000, help="pages written by the final pass")
    ap.add_argument("--run", type=int, default=32, help="pages per mark_written call")
    args = ap.parse_args()
    mem = half_random_half_zero(args.size_mib << 20)
    results: dict[str, float] = {}
    results.update(frozen(mem, args.rounds))
    results.update(root_after_final_pass(mem, args.stale, args.rounds))
    results.update(mark_cost(mem, args.run, args.rounds))
    results.update(steal(mem, args.rounds))
    for k, v in results.items():
        print(f"{k:56} {v:12.4g}")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    RESULTS.write_text(
        json.dumps(
            {
                "commit": commit,
                "size-mib": args.size_mib,
                "rounds": args.rounds,
                "stale-pages": args.stale,
                "load-average": float(load),
                "medians": results,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
