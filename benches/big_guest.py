"""An 8 GiB guest migrated over loopback, with the peak memory of both sides.

    python benches/big_guest.py [--size 8GiB] [--fill FRACTION] [--workload SPEC]

The source runs here (a ``WorkloadGuest`` with a ``nic`` device); the
destination is a ``mig serve --once`` process. ``--fill`` is the fraction of
each 64 MiB holding data (the rest never written, as the unused RAM of a
guest: sent as zero pages, never allocated on either side); by
default it is as large as 60 % of ``MemAvailable`` allows for both copies,
capped at 1. A sampler reads both processes' ``/proc/<pid>/status`` (VmHWM,
RssAnon, RssShmem) and the allocated size of every memfd they hold while the
migration runs. The run is checked byte-exact: the destination's memory and
device digests, taken before it resumes, equal the paused source's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

import mig
from mig.devices import create_all
from mig.source import MigrationSource
from mig.units import format_size, parse_size

GIB = 1 << 30
DEVICES = "nic:state=64MiB,rate=20MiB/s"


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def status(pid: int | str) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def memfd_bytes(pid: int | str) -> int:
    """Allocated bytes of every memfd the process holds open."""
    total = 0
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(f"{fd_dir}/{fd}").startswith("/memfd:"):
                total += os.stat(f"{fd_dir}/{fd}").st_blocks * 512
        except OSError:
            continue
    return total


class Sampler(threading.Thread):
    """Keeps the peak of each figure for each process until stopped."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak: dict[str, dict[str, int]] = {name: {} for name in pids}
        self.done = threading.Event()

    def sample(self) -> None:
        for name, pid in self.pids.items():
            try:
                figures = {**status(pid), "memfd": memfd_bytes(pid)}
            except OSError:
                continue  # the destination exited
            peak = self.peak[name]
            for k, v in figures.items():
                peak[k] = max(peak.get(k, 0), v)

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.sample()


def fill(memory: mig.GuestMemory, fraction: float) -> None:
    """Random data in the first ``fraction`` of every 64 MiB; the rest of each
    block is never touched (a hole of the memfd, like a guest's unused RAM)."""
    block = 64 << 20
    data = round(block * fraction) // memory.page_size * memory.page_size
    words = memory.array.view(np.uint64)
    pattern = np.random.default_rng(8).integers(1, 1 << 63, data // 8, dtype=np.uint64)
    for start in range(0, memory.size, block):
        part = words[start // 8 : (start + data) // 8]
        np.bitwise_xor(pattern[: len(part)], np.uint64(start), out=part)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=parse_size, default=8 * GIB)
    p.add_argument("--fill", type=float, default=None, help="fraction of pages with data")
    p.add_argument("--workload", default="uniform:wss=256MiB,rate=20000")
    p.add_argument("--channels", type=int, default=2)
    a = p.parse_args()
    avail = meminfo("MemAvailable")
    frac = a.fill if a.fill is not None else min(1.0, 0.6 * avail / (2 * a.size))
    if 2 * a.size * frac > 0.9 * avail:
        print(f"not enough memory: {format_size(avail)} available", file=sys.stderr)
        return 1
    print(f"guest {format_size(a.size)}, {frac:.0%} of pages with data, "
          f"MemAvailable {format_size(avail)}")  # fmt: skip

    t0 = time.monotonic()
    memory = mig.GuestMemory(a.size)
    fill(memory, frac)
    print(f"filled in {time.monotonic() - t0:.1f} s")
    devices = create_all(DEVICES, memory)
    guest = mig.WorkloadGuest(memory, vcpus=2, workload=a.workload)
    r, w = os.pipe()
    dest = subprocess.Popen(
        [sys.executable, "-m", "mig.cli", "serve", "--listen", "tcp:127.0.0.1:0", "--once",
         "--json", "--size", str(a.size), "--devices", DEVICES, "--timeout", "120s",
         "--ready-fd", str(w)],
        stdout=subprocess.PIPE, pass_fds=(w,),
    )  # fmt: skip
    os.close(w)
    uri = os.read(r, 4096).decode().strip()
    os.close(r)
    sampler = Sampler({"source": os.getpid(), "destination": dest.pid})
    sampler.start()
    try:
        src = MigrationSource(guest, devices, uri=uri, multifd_channels=a.channels)
        q = src.run()
        out, _ = dest.communicate(timeout=300)
    finally:
        sampler.done.set()
        sampler.join()
        guest.close()
    d: dict[str, Any] = json.loads(out)
    exact = (
        q["status"] == "completed"
        and d.get("memory-digest") == format(memory.digest(), "032x")
        and [x["state-digest"] for x in d.get("devices", [])]
        == [format(dev.state_digest(), "032x") for dev in devices]
    )
    for dev in devices:
        dev.close()
    ram = q.get("ram", {})
    print(f"status {q['status']} byte-exact {exact}  total {q['total-time'] / 1000:.1f} s  "
          f"downtime {q.get('downtime', 0):.0f} ms  passes {ram.get('dirty-sync-count')}  "
          f"transferred {format_size(ram.get('transferred', 0))}  "
          f"{ram.get('mbps', 0):.0f} Mbit/s")  # fmt: skip
    parts = ", ".join(f"{k} {v:.0f}" for k, v in q.get("downtime-breakdown", {}).items())
    print(f"downtime breakdown (ms): {parts}")
    print("| process | VmHWM (peak RSS) | RssAnon | RssShmem | memfd allocated |")
    print("|---|---|---|---|---|")
    for name, peak in sampler.peak.items():
        print(f"| {name} | " + " | ".join(
            format_size(peak.get(k, 0)) for k in ("VmHWM", "RssAnon", "RssShmem", "memfd")
        ) + " |")  # fmt: skip
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
