"""The path users run, against iperf3 carrying the same payload in the same run.

Each round runs ``mig demo --image IMG --workload idle --devices none
--channels N --json`` (a source and a destination process over loopback TCP,
the migration loop, policies, tracker, streams and the end-to-end digest
check) on raw images that are half random pages and half zero pages, and
``iperf3`` carrying the payload (half the image) over loopback. Rounds
interleave iperf3 and mig, so both see the same machine load.

Reported per image size and channel count, as medians of the same run:
- mig's ``total-time`` (setup to completion, as the migration reports it)
  and the wall time of the whole ``mig demo`` process;
- the CPU seconds (user + system) of both mig processes, which load from
  other processes on a shared host does not inflate as it does the times;
- the ratio of medians mig ``total-time`` / iperf3 seconds;
- seconds per GiB of image, and per-GiB time at the largest size over the
  smallest (linearity: 1.0 means the cost per GiB does not grow).

Results go to ``benches/results/transfer_user_path-<commit>.json`` (the
commit the installed package was built from is not checked: run it after
``pip install .`` of the tree you measure).

    python benches/transfer_user_path.py --quick       # 1, 2 GiB x 1, 2 channels, 3 rounds
    python benches/transfer_user_path.py               # 1, 2, 4 GiB, 3 rounds
    mig bench user-path [--quick] [...]                # the same, from an installed mig

Both ends and iperf3 share the host's cores: on a 2-core machine the two
processes compete with each other (and with anything else running).
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

import numpy as np

# Run as a script, this directory is on sys.path.
from bench_transfer import iperf3_seconds

HERE = Path(__file__).resolve().parent
GIB = 1 << 30
PAGE = 4096
IPERF3_MISSING = (
    "iperf3 is not installed: it is the baseline of this benchmark. "
    "Install it with `apt-get install iperf3` (Debian package iperf3)."
)


def commit() -> str:
    """The checked-out commit, with ``-dirty`` when the tree has changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=HERE, capture_output=True, text=True,
            check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def make_image(path: Path, size: int, seed: int = 1) -> None:
    """Half the pages random, half zero, chosen at random; written in chunks."""
    if path.exists() and path.stat().st_size == size:
        return
    rng = np.random.default_rng(seed)
    chunk_pages = 1 << 15  # 128 MiB
    tmp = path.with_suffix(".part")
    with tmp.open("wb") as f:
        for start in range(0, size // PAGE, chunk_pages):
            n = min(chunk_pages, size // PAGE - start)
            block = np.zeros((n, PAGE), np.uint8)
            chosen = rng.permutation(n)[: n // 2]
            block[chosen] = np.frombuffer(rng.bytes(len(chosen) * PAGE), np.uint8).reshape(
                len(chosen), PAGE
            )
            f.write(block.tobytes())
    tmp.rename(path)


def mig_demo(mig: list[str], image: Path, channels: int, timeout: float) -> dict[str, Any]:
    """One ``mig demo`` run; returns its total-time and wall time in seconds."""
    cmd = [
        *mig, "demo", "--image", str(image), "--workload", "idle", "--devices", "none",
        "--channels", str(channels), "--json", "--timeout", f"{timeout:g}s",
        "--timeout-action", "cancel",
    ]  # fmt: skip
    t0, cpu0 = time.perf_counter(), _children_cpu()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120)
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    try:
        stats = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"mig demo failed ({out.returncode}): {out.stderr[-2000:]}") from None
    ok = stats.get("status") == "completed" and stats.get("end-to-end-check") == "passed"
    if not ok:
        raise RuntimeError(
            f"mig demo did not complete byte-exact: status {stats.get('status')}, "
            f"check {stats.get('end-to-end-check')}: {out.stderr[-2000:]}"
        )
    return {
        "total": float(stats["total-time"]) / 1000.0,
        "wall": wall,
        "downtime": float(stats["downtime"]) / 1000.0,
        "mbps": float(stats["ram"]["mbps"]),
        # Both processes' user + system CPU seconds: on a shared host the
        # work done, which other load does not inflate as it does the times.
        "cpu": cpu,
        "first-pass": float(stats["passes"][0]["time"]) if stats.get("passes") else None,
    }


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def free_page_reporting() -> bool:
    """Whether the hypervisor takes back free memory (virtio-balloon free page
    reporting): fresh memory then costs a host fault per page, and runs vary
    with what the previous run freed (docs/memory.md)."""
    return any(
        f.read_text()[5:6] == "1"
        for f in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*/features")
    )


def summarise(sizes: list[int], channels: list[int], runs: dict[str, list[dict[str, Any]]],
              base: dict[int, list[float]]) -> list[dict[str, Any]]:  # fmt: skip
    med = statistics.median
    rows = []
    for ch in channels:
        for size in sizes:
            rs = runs[f"{size}:{ch}"]
            total = med(r["total"] for r in rs)
            iperf = med(base[size])
            rows.append(
                {
                    "size-gib": size / GIB,
                    "channels": ch,
                    "rounds": len(rs),
                    "mig-total-median-s": total,
                    "mig-wall-median-s": med(r["wall"] for r in rs),
                    "mig-cpu-median-s": med(r["cpu"] for r in rs),
                    "iperf3-median-s": iperf,
                    "ratio-of-medians": total / iperf,
                    "seconds-per-gib": total / (size / GIB),
                    "iperf3-seconds-per-gib": iperf / (size / GIB),
                }
            )
        # Linearity: per-GiB time at each size over the smallest size's.
        first = next(r for r in rows if r["channels"] == ch and r["size-gib"] == sizes[0] / GIB)
        for r in rows:
            if r["channels"] == ch:
                r["per-gib-vs-smallest"] = r["seconds-per-gib"] / first["seconds-per-gib"]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| image | channels | mig total (median) | mig wall | mig CPU | iperf3 (median) | "
        "mig / iperf3 | s per GiB | per GiB vs smallest |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size-gib']:g} GiB | {r['channels']} | {r['mig-total-median-s']:.3f} s | "
            f"{r['mig-wall-median-s']:.3f} s | {r['mig-cpu-median-s']:.2f} s | "
            f"{r['iperf3-median-s']:.3f} s | "
            f"{r['ratio-of-medians']:.2f} | {r['seconds-per-gib']:.3f} | "
            f"{r['per-gib-vs-smallest']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="transfer_user_path", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 2 GiB, 3 rounds")
    ap.add_argument("--sizes", default="1,2,4", help="image sizes in GiB (default 1,2,4)")
    ap.add_argument("--channels", default="1,2", help="channel counts (default 1,2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-dir", default=tempfile.gettempdir(), help="where images are kept")
    ap.add_argument("--out", default=str(HERE / "results"), help="result directory")
    ap.add_argument("--timeout", type=float, default=120.0, help="per migration, seconds")
    ap.add_argument(
        "--mig",
        action="append",
        metavar="LABEL=COMMAND",
        help="compare builds in the same run: a label and a mig command line (repeatable; "
        "default: the mig on PATH, labelled by the checked-out commit)",
    )
    args = ap.parse_args(argv)
    iperf3 = shutil.which("iperf3")
    if iperf3 is None:
        print(IPERF3_MISSING, file=sys.stderr)
        return 2
    sizes = [int(float(s) * GIB) for s in ("1,2" if args.quick else args.sizes).split(",")]
    channels = [int(c) for c in args.channels.split(",")]
    sha = commit()
    load_at_start = os.getloadavg()
    if args.mig:
        builds = {k: v.split() for k, v in (m.split("=", 1) for m in args.mig)}
    else:
        mig_exe = shutil.which("mig")
        builds = {sha: [mig_exe] if mig_exe else [sys.executable, "-m", "mig.cli"]}
    images = {}
    for size in sizes:
        images[size] = Path(args.image_dir) / f"mig-half-random-{size >> 20}MiB.raw"
        make_image(images[size], size)
    runs = {b: {f"{s}:{c}": [] for s in sizes for c in channels} for b in builds}
    base: dict[int, list[float]] = {s: [] for s in sizes}
    for rnd in range(args.rounds):
        for size in sizes:
            base[size].append(iperf3_seconds(iperf3, size // 2))
            for ch in channels:
                for label, mig in builds.items():
                    r = mig_demo(mig, images[size], ch, args.timeout)
                    runs[label][f"{size}:{ch}"].append(r)
                    print(
                        f"round {rnd + 1}: {label}: {size / GIB:g} GiB, {ch} channel(s): "
                        f"mig {r['total']:.3f} s (wall {r['wall']:.3f} s), "
                        f"iperf3 {base[size][-1]:.3f} s",
                        flush=True,
                    )
    rows = {b: summarise(sizes, channels, runs[b], base) for b in builds}
    result = {
        "benchmark": "transfer_user_path",
        "commit": sha,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "load-average-at-start": load_at_start,
        "free-page-reporting": free_page_reporting(),
        "load-average-at-end": os.getloadavg(),
        "image": "half random pages, half zero pages (chosen at random per 128 MiB)",
        "command": "mig demo --image IMG --workload idle --devices none --channels N --json",
        "baseline": "iperf3 -n <half the image> over loopback, receiver seconds",
        "builds": {b: " ".join(m) for b, m in builds.items()},
        "rows": rows,
        "raw": {"mig": runs, "iperf3": {str(k): v for k, v in base.items()}},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"transfer_user_path-{sha}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for b, r in rows.items():
        print(f"\n{b}:\n{markdown(r)}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
