"""The demo destination's prefault in virtual time: the CPU it takes from the migration.

``mig demo``'s destination (``mig serve --once --prealloc``) reports ready
as soon as it listens and populates its memory in a background thread
(``mig.prealloc``) while the source's setup and first pass run. On a host
with few cores that populate competes with the source, the receiver and the
guest: the migration keeps only a share of its pace until the populate is
done. The simulator models it as a job of ``HostModel.prefault_per_byte``
seconds per byte of guest memory, starting with the migration:

* while it runs, each second of the source's own work (its setup, its
  tracker syncs, its sends) takes ``1 / HostModel.prefault_share`` seconds,
  and the populate advances by the same second of work (both progress at
  the share, as two jobs on a shared core do);
* while the source waits (a round trip, the token bucket's pacing), the
  populate advances alone at its full pace;
* the destination's answer to ``hello`` comes ``HostModel.prefault_hello_wait``
  late (at most until the populate ends): accepting the source's channels
  starts the receive threads, and creating a thread maps its stack, which
  waits for the populate to let go of the memory map, time after time.

All three are measured by ``mig bench calibrate``:
``prefault_seconds_per_byte`` times the populate alone; ``prefault_share``
runs the same real loopback migration started at the destination's ready
line (populate running) and started once the populate is done
(``PrefaultPair``): the share is the ratio of their first passes, the
hello wait the difference of their setups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mig.clock import VirtualClock

__all__ = [
    "Phases",
    "PrefaultContention",
    "PrefaultPair",
    "prefault_seconds_per_byte",
    "prefault_share",
]

# Memory the populate is timed on: large enough that the per-page work
# dominates the madvise call's fixed cost.
CALIBRATION_MEMORY = 256 << 20
# The share is measured on migrations of a zeroed idle guest this large:
# its populate outlasts the destination's late answer to hello and the
# first pass that follows, so the whole pass runs beside it. That pass is
# the sender's own work (telling zero pages from data), the kind of work
# the model stretches.
SHARE_MEMORY = 1 << 30
# The share lies in (0, 1]; a measurement below this floor is noise.
MIN_SHARE = 0.05


class PrefaultContention:
    """The populate still running on the destination, and what it costs the source."""

    def __init__(self, clock: VirtualClock, work: float, share: float) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"prefault share {share} is not in (0, 1]")
        self.clock = clock
        self.remaining = max(0.0, work)  # seconds of populate left
        self.share = share
        self.stretched = 0.0  # seconds the source lost to it
        self.hello_waited = 0.0  # seconds the answer to hello came late
        self._working = False
        clock.on_advance(self._waited)

    def _waited(self, old: float, new: float) -> None:
        # Time the source spent waiting: the populate had the core alone.
        if not self._working:
            self.remaining = max(0.0, self.remaining - (new - old))

    def cost(self, work: float) -> float:
        """Seconds ``work`` seconds of the source's own work take from now
        (the populate advances by the work it overlapped)."""
        if work <= 0 or self.remaining <= 0:
            return max(0.0, work)
        overlapped = min(work, self.remaining)
        self.remaining -= overlapped
        wall = overlapped / self.share + (work - overlapped)
        self.stretched += wall - work
        return wall

    def answer_hello(self, wait: float) -> None:
        """The destination answers hello ``wait`` seconds late while it
        populates (the source waits: the populate runs at its full pace)."""
        late = min(wait, self.remaining)
        self.hello_waited = late
        self.clock.advance(late)

    def advance(self, work: float) -> float:
        """Advance the clock by ``work`` seconds of the source's work, as
        stretched; returns the seconds that took."""
        wall = self.cost(work)
        self._working = True
        try:
            self.clock.advance(wall)
        finally:
            self._working = False
        return wall


def prefault_seconds_per_byte(runs: int = 3) -> float:
    """Seconds per byte of populating fresh guest memory (``MADV_POPULATE_WRITE``,
    as ``--prealloc`` does), best of ``runs``; 0 where the kernel lacks it."""
    from mig._mig import GuestMemory, MigError  # noqa: PLC0415

    best = float("inf")
    for _ in range(runs):
        mem = GuestMemory(CALIBRATION_MEMORY)
        t0 = time.perf_counter()
        try:
            mem.populate()
        except (OSError, MigError):
            return 0.0
        best = min(best, time.perf_counter() - t0)
        del mem
    return best / CALIBRATION_MEMORY


@dataclass(frozen=True)
class Phases:
    """A real migration's setup and first pass, seconds."""

    setup: float
    first_pass: float


@dataclass(frozen=True)
class PrefaultPair:
    """One migration with the populate running (``contended``) and one
    started after it (``alone``)."""

    contended: Phases
    alone: Phases


def _first_phases(size: int, wait: float) -> Phases:
    """The setup and first pass of a real loopback migration of a zeroed
    idle guest to ``mig demo``'s destination, started ``wait`` seconds after
    its ready line."""
    from mig.sim import _idle_loopback_migration  # noqa: PLC0415 (it imports this module)

    q, _ = _idle_loopback_migration(size, False, 0, demo=True, settle=wait)
    setup = float(q["setup-time"]) / 1000
    return Phases(setup, float(q["passes"][0]["time"]) - setup)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def prefault_share(per_byte: float, runs: int = 3) -> tuple[float, float, list[PrefaultPair]]:
    """(share, hello wait, pairs) of a migration whose destination
    populates: over pairs run back to back (so both halves see the same
    load), the median ratio of the first pass started after the populate to
    the same started at once, and the median difference of their setups.
    ``per_byte`` (``prefault_seconds_per_byte``) says how long the populate
    lasts."""
    if per_byte <= 0:
        return 1.0, 0.0, []
    settle = 2 * per_byte * SHARE_MEMORY + 0.1
    pairs = [
        PrefaultPair(_first_phases(SHARE_MEMORY, 0.0), _first_phases(SHARE_MEMORY, settle))
        for _ in range(runs)
    ]
    share = _median([p.alone.first_pass / max(p.contended.first_pass, 1e-9) for p in pairs])
    wait = _median([p.contended.setup - p.alone.setup for p in pairs])
    return min(1.0, max(MIN_SHARE, share)), max(0.0, wait), pairs
