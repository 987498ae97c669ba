"""Auto-converge: ``qemu`` mode vs ``proportional`` mode, convergence time.

    python benches/autoconverge.py [rounds]

Both modes migrate the same non-converging guest (WorkloadGuest writing
``SPEC`` into ``SIZE`` of RAM) over loopback with a ``max_bandwidth`` cap, with
the real dirty tracker and streaming engine. Each round runs both modes back
to back (alternating which goes first); the figure is the ratio of median
``total-time`` (proportional / qemu; target <= 0.5). Every run is checked
byte-exact.
"""

from __future__ import annotations

import statistics
import sys

import mig
from mig.destination import MigrationDestination
from mig.source import MigrationSource

MIB = 1 << 20
SIZE = 32 * MIB
SPEC = "uniform:rate=40000"
CAP = 16 * MIB


def converge_seconds(mode: str) -> float:
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    src.array[:: src.page_size] = 7  # no zero pages: every page costs its full size
    guest = mig.WorkloadGuest(src, vcpus=1, workload=SPEC)
    try:
        dest = MigrationDestination("tcp:127.0.0.1:0", dst)
        dest.start()
        source = MigrationSource(
            guest,
            uri=dest.uri,
            auto_converge=mode,
            max_bandwidth=CAP,
            multifd_channels=2,
            timeout=120,
        )
        source.start()
        q = source.wait(180)
        dest.wait(30)
    finally:
        guest.close()
    if q["status"] != "completed" or src.digest() != dst.digest():
        raise SystemExit(f"{mode}: {q['status']} {q.get('error-desc', '')}")
    return q["total-time"] / 1000


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    times: dict[str, list[float]] = {"qemu": [], "proportional": []}
    for i in range(rounds):
        order = ("qemu", "proportional") if i % 2 == 0 else ("proportional", "qemu")
        for mode in order:
            times[mode].append(converge_seconds(mode))
            print(f"round {i + 1} {mode:>12}: {times[mode][-1]:6.2f} s", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    ratio = med["proportional"] / med["qemu"]
    print(f"\nmedian qemu {med['qemu']:.2f} s, proportional {med['proportional']:.2f} s")
    print(
        f"proportional / qemu = {ratio:.3f} (target <= 0.5): {'met' if ratio <= 0.5 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
