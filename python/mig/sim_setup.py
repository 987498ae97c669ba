"""The source's setup in virtual time: what it pays before its first pass.

A real source, before it sends a page, registers its dirty tracker over all
of guest memory (userfaultfd: register the range and write-protect every
present page, ``O(memory)``), connects its channels and waits for the
destination's answer to ``hello``. The simulator charges the registration at
``HostModel.register_per_page`` per guest page whose page table exists
(``mapped_pages``: a range no page of which was ever written has none, and
the write-protect passes over it; ``register_seconds_per_page`` measures it
on a populated memory), and the
rest, the connection and the destination's answer, at ``HostModel.setup_base``:
the median setup of the switchover calibration's loopback migrations, less
their registration. Both are charged where the source would build its
native sender (``SimLink.connect_channels``, which ``MigrationSource`` calls
on a given link in its place), so before ``hello`` and not in its round
trip: the source plans the switchover's handshake from that round trip,
which is the control round trip alone. (On a loaded host the destination's
first answer varies tenfold, from a few to hundreds of milliseconds:
calibrate on a quiet one.)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mig.sim import HostModel

__all__ = ["mapped_pages", "register_seconds_per_page", "setup_seconds"]

# Memory the registration is timed on: large enough that the per-page work
# dominates the ioctls' fixed cost.
CALIBRATION_MEMORY = 256 << 20
# Pages one page table maps (2 MiB of 4 KiB pages): the write-protect walks
# a table whole once any of its pages is present.
TABLE_PAGES = 512


def mapped_pages(pristine: Any, granularity: int, pages: int) -> int:
    """Of ``pages`` guest pages, those in a page table that exists: every
    table holding a page written at least once (``pristine``: the
    never-written units of ``granularity`` pages each)."""
    units = len(pristine)
    per_table = max(1, TABLE_PAGES // max(1, granularity))
    written = np.ones(units, dtype=bool)
    written[pristine.indices().astype(np.int64)] = False
    tables = -(-units // per_table)
    padded = np.zeros(tables * per_table, dtype=bool)
    padded[:units] = written
    used = int(padded.reshape(tables, per_table).any(axis=1).sum())
    return min(pages, used * per_table * granularity)


def setup_seconds(host: HostModel, pages: int) -> float:
    """The source's setup before ``hello``: the tracker's registration over
    ``pages`` pages of guest memory (those its page tables map,
    ``mapped_pages``), then the connection."""
    return host.register_per_page * pages + host.setup_base


def register_seconds_per_page(runs: int = 3) -> float:
    """Seconds per page of creating the tracker migrations use (the uffd
    backend when this host has it, else the soft one) over populated memory,
    best of ``runs``, less a tiny memory's creation (the fixed cost)."""
    from mig._mig import DirtyTracker, GuestMemory, capabilities  # noqa: PLC0415

    backend = "uffd" if capabilities()["uffd"]["available"] else "soft"

    def timed(size: int) -> tuple[float, int]:
        mem = GuestMemory(size)
        mem.array[:] = 1  # present pages: the write-protect walks them
        best = float("inf")
        for _ in range(runs):
            t0 = time.perf_counter()
            tracker = DirtyTracker(mem, backend=backend)
            best = min(best, time.perf_counter() - t0)
            tracker.close()
        return best, mem.num_pages

    small, small_pages = timed(16 * 4096)
    large, pages = timed(CALIBRATION_MEMORY)
    return max(0.0, large - small) / max(1, pages - small_pages)
