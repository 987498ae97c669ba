"""Soak: ping-pong migrations A -> B -> A ... of a running guest with a nic.

    python benches/soak_pingpong.py [--rounds 50] [--size 256MiB] [--downtime-limit 300]

Each round migrates the running guest (a ``WorkloadGuest`` and a ``nic``
sample device whose state changes while it runs) over loopback TCP to the
other side through the embedding API (``MigrationSource`` to a
``MigrationDestination``, the default policy and verification), checks it
byte-exact, and starts it there: the destination's device digest, taken as
the device resumes, and its memory digest, taken after the migration and
before its guest starts (nothing writes that memory in between; taking it
at resume would add a whole-memory read to the downtime), must equal the
stopped source's, and the source must have ``verified`` the destination's
root. The device object that was the source becomes the next round's
destination (STOP -> RESUMING), and the workload restarts on the side that
received it. Prints one line per round and a summary: corrupted rounds,
downtime median (against the downtime limit) and maximum, total-time median
and maximum, and this process's threads and file descriptors before and
after. Results go to ``benches/results/soak_pingpong-<commit>.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script, this directory is on sys.path.
from transfer_user_path import commit

import mig
from mig.destination import MigrationDestination
from mig.device_handler import DeviceHandler
from mig.devices import create
from mig.source import MigrationSource
from mig.units import parse_size

HERE = Path(__file__).resolve().parent

DEVICE = "nic:state=16MiB,rate=8MiB/s,grow=0"
WORKLOAD = "uniform:wss=64MiB,rate=20000"


def resources() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


class Host:
    """One side: guest memory, its nic, and the guest when it runs here."""

    def __init__(self, name: str, size: int, active: bool) -> None:
        self.name = name
        self.memory = mig.GuestMemory(size)
        self.device = create(DEVICE, name="nic0", active=active)
        self.guest: Any = None

    def start_guest(self, vcpus: int) -> None:
        self.guest = mig.WorkloadGuest(self.memory, vcpus=vcpus, workload=WORKLOAD)

    def stop_guest(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None

    def close(self) -> None:
        self.stop_guest()
        self.device.close()


class Recording(DeviceHandler):
    """The destination's nic handler: digests the device state as the
    device resumes, before it runs on the destination."""

    def __init__(self, device: Any) -> None:
        super().__init__(device, device_id=1)
        self.seen: dict[str, int] = {}

    def load_resume(self) -> None:
        self.seen = {"device": self.device.state_digest()}
        super().load_resume()


def migrate(src: Host, dst: Host, params: dict[str, Any]) -> dict[str, Any]:
    handler = Recording(dst.device)
    dest = MigrationDestination("tcp:127.0.0.1:0", dst.memory, [handler])
    dest.start()
    source = MigrationSource(src.guest, [src.device], uri=dest.uri, **params)
    q = source.run()
    d = dest.wait(60)
    ok = (
        q["status"] == "completed"
        and d["status"] == "completed"
        and q["verified"]
        # The source stays stopped; the destination's guest has not started.
        and dst.memory.digest() == src.memory.digest()
        and handler.seen.get("device") == src.device.state_digest()
    )
    return {"q": q, "d": d, "exact": ok}


def ping_pong(
    hosts: list[Host], rounds: int, vcpus: int, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Migrate back and forth; stops at the first failed round."""
    rows = []
    for i in range(rounds):
        src, dst = hosts[i % 2], hosts[(i + 1) % 2]
        time.sleep(0.2)  # the guest runs a while on this side
        r = migrate(src, dst, params)
        q, ram = r["q"], r["q"].get("ram", {})
        rows.append(r)
        print(
            f"round {i + 1:3d} {src.name}->{dst.name} {q['status']:9s} "
            f"exact={r['exact']!s:5s} total={q['total-time']:7.0f} ms "
            f"downtime={q.get('downtime', float('nan')):6.1f} ms "
            f"passes={ram.get('dirty-sync-count')} "
            f"writes={src.guest.stats()['writes']}",
            flush=True,
        )
        if q["status"] != "completed":
            print(f"  failed: {q.get('error-desc')} / {r['d'].get('error-desc')}")
            break
        src.stop_guest()
        dst.start_guest(vcpus)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--size", type=parse_size, default=256 << 20)
    p.add_argument("--vcpus", type=int, default=2)
    p.add_argument("--downtime-limit", type=int, default=300, help="ms (default 300)")
    p.add_argument("--out", default=str(HERE / "results"), help="result directory")
    a = p.parse_args()
    limit = a.downtime_limit
    params = {"multifd_channels": 2, "downtime_limit": limit, "timeout": 120}
    before = resources()
    hosts = [Host("A", a.size, active=True), Host("B", a.size, active=False)]
    hosts[0].memory.array[:] = np.random.default_rng(3).integers(0, 256, a.size, dtype=np.uint8)
    hosts[0].start_guest(a.vcpus)
    t0 = time.monotonic()
    try:
        rows = ping_pong(hosts, a.rounds, a.vcpus, params)
    finally:
        while hosts:  # no name left holding a host's memory
            hosts.pop().close()
    elapsed = time.monotonic() - t0
    done = [r for r in rows if r["q"]["status"] == "completed"]
    corrupt = sum(1 for r in rows if not r["exact"])
    downtime = [r["q"]["downtime"] for r in done]
    total = [r["q"]["total-time"] for r in done]
    gc.collect()  # handlers and guests form cycles that hold memfds
    threading.Event().wait(0.5)  # let channel threads finish exiting
    after = resources()
    print(f"\n{len(rows)} rounds in {elapsed:.0f} s: {len(done)} completed, {corrupt} not exact")
    median = statistics.median(downtime) if done else None
    if median is not None:
        verdict = "met" if median <= limit else "NOT MET"
        worst = max(downtime)
        print(f"downtime ms: median {median:.1f} (limit {limit}: {verdict}) max {worst:.1f}")
        print(f"total-time ms: median {statistics.median(total):.0f} max {max(total):.0f}")
    print(f"fds/threads before {before} after {after}")
    ok = bool(rows) and corrupt == 0 and len(done) == a.rounds
    store(a, limit, rows, median, before, after, elapsed)
    return 0 if ok and median is not None and median <= limit else 1


def store(a: argparse.Namespace, limit: int, rows: list[dict[str, Any]], median: float | None,
          before: tuple[int, int], after: tuple[int, int], elapsed: float) -> None:  # fmt: skip
    """The run's figures, stamped with the commit."""
    sha = commit()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak_pingpong-{sha}.json"
    per_round = [
        {"status": r["q"]["status"], "exact": r["exact"], "downtime": r["q"].get("downtime"),
         "total-time": r["q"].get("total-time"), "verified": r["q"].get("verified"),
         "downtime-breakdown": r["q"].get("downtime-breakdown"),
         "predicted-downtime": r["q"].get("predicted-downtime")}
        for r in rows
    ]  # fmt: skip
    path.write_text(json.dumps({
        "benchmark": "soak_pingpong", "commit": sha,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(), "load-average-at-end": os.getloadavg(),
        "rounds": a.rounds, "size": a.size, "vcpus": a.vcpus, "device": DEVICE,
        "workload": WORKLOAD, "downtime-limit": limit, "elapsed": elapsed,
        "downtime-median": median, "median-within-limit": median is not None and median <= limit,
        "not-exact": sum(1 for r in rows if not r["exact"]),
        "fds-threads-before": before, "fds-threads-after": after, "per-round": per_round,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
