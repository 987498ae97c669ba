"""A vCPU's first touch of owed pages, timed: the fault-latency loop the
post-copy benches share.

A thread plays the destination's answer: it places each page a fault asks
for (``PostcopyRegion.next_requests`` / ``place``). The caller's thread is
the vCPU: it reads the first bytes of each page in ``order`` once, timing
each read (a fault, a request, a placement and the wake-up), and checks it
read the placed bytes.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Iterable
from typing import Any

PAGE = 4096


def time_first_touches(
    region: Any, base: int, data: list[bytes], order: Iterable[int]
) -> tuple[list[float], dict[str, Any]]:
    """(microseconds per first read, the region's stats); closes ``region``."""
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            for p in region.next_requests(0.05):
                region.place(p, data[p])

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    buf = ctypes.create_string_buffer(8)
    times: list[float] = []
    try:
        for p in order:
            t0 = time.perf_counter_ns()
            ctypes.memmove(buf, base + int(p) * PAGE, 8)
            times.append((time.perf_counter_ns() - t0) / 1e3)
            assert buf.raw == data[p][:8], f"page {p} differs"
    finally:
        stop.set()
        server.join()
    stats = dict(region.stats())
    region.close()
    return times, stats
