"""State handlers: one per state source (RAM, each device), split by role.

A ``SaveHandler`` produces state on the source; a ``LoadHandler`` consumes
it on the destination; a device handler that serves both sides is a
``StateHandler``. The loop treats every save handler alike. Each reports its
pending state, in bytes, two ways: ``pending_estimate()`` is cheap and never
touches the guest; ``pending_exact(guest_stopped)`` may be expensive (RAM: a
dirty-tracker sync, whose cost is measured). ``exact_needs_stop`` says the
exact size is only known with the guest (and the device) stopped. RAM has no
load handler: its pages land in memory through the receiver.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol, runtime_checkable

from mig._mig import DirtyBitmap, GuestMemory, RamStream
from mig.clock import Clock
from mig.errors import OverBudget
from mig.link import Link

# Syncs the final sync's estimate looks back on (``RamHandler.final_sync_estimate``).
RECENT_SYNCS = 3

__all__ = ["SaveHandler", "LoadHandler", "StateHandler", "OverBudget", "RamHandler"]


@runtime_checkable
class SaveHandler(Protocol):
    """Source side: ``role`` is ``"ram"`` or ``"device"``."""

    name: str
    role: str
    exact_needs_stop: bool

    def setup(self, link: Link) -> None: ...

    def pending_estimate(self) -> int: ...

    def pending_exact(self, guest_stopped: bool) -> int: ...

    def iterate(self, link: Link, budget: int) -> int: ...

    def quiesce(self) -> None: ...

    def complete(self, link: Link, budget: int | None = None) -> int: ...

    def resume_after_exact(self) -> None: ...

    def abort(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


@runtime_checkable
class LoadHandler(Protocol):
    """Destination side of one device: records arrive in sequence order."""

    name: str

    def load_setup(self) -> None: ...

    def load_state(self, seq: int, chunk: bytes, final: bool) -> None: ...

    def load_complete(self) -> None: ...

    def load_resume(self) -> None: ...

    def load_abort(self) -> None: ...

    def precopy_initial_loaded(self) -> bool: ...


@runtime_checkable
class StateHandler(SaveHandler, LoadHandler, Protocol):
    """A device handler that serves both sides (``DeviceHandler``)."""


class RamHandler:
    """Guest RAM through a dirty tracker: an adapter over the native ``RamStream``.

    The stream owns the known dirty set, the cursor, the generation and the
    send path; every call does its work in Rust with the GIL released, one
    chunk at a time. Estimate: the dirty pages already known (not yet sent)
    times the page size, with no sync. Exact: a tracker sync merged into the
    known set; each sync's cost is measured and reported here, on the loop's
    clock. Every sync after pages went out starts a new generation, preceded
    by a sync barrier, so a page re-sent in a later pass never loses against
    its older copy on another channel.

    A native ``Sender`` behind the link (``link.ram_target()``) is driven
    directly, and the link is told the bytes (``link.account_pages``); any
    other link (a simulator's) gets ``send_pages``/``sync`` calls.
    """

    name = "ram"
    role = "ram"
    exact_needs_stop = False

    def __init__(self, memory: GuestMemory, tracker: Any, clock: Clock) -> None:
        self.memory = memory
        self.tracker = tracker
        self.clock = clock
        self.page_size = memory.page_size
        self.num_pages = memory.num_pages
        self._stream = RamStream(self.num_pages, self.page_size, tracker)
        self._link: Link | None = None
        self._account: Any = None
        self._wire_seen = 0
        self.sync_seconds = 0.0
        self.last_sync_seconds = 0.0
        self._recent_syncs: deque[float] = deque(maxlen=RECENT_SYNCS)
        self.last_sync_time: float | None = None
        self.last_sync_new_pages = 0
        self.dirty_pages_rate = 0.0

    def _stat(self, key: str) -> int:
        return int(self._stream.stats()[key])

    @property
    def generation(self) -> int:
        return int(self._stream.generation)

    @property
    def sync_count(self) -> int:
        return self._stat("dirty-sync-count")

    @property
    def pages_sent(self) -> int:
        return self._stat("pages-sent")

    @property
    def bytes_sent(self) -> int:
        return self._stat("bytes-sent")

    @property
    def precopy_bytes(self) -> int:
        return self._stat("precopy-bytes")

    @property
    def downtime_bytes(self) -> int:
        return self._stat("downtime-bytes")

    @property
    def final_pages(self) -> int:
        return self._stat("final-pages")

    # --- source side ---
    def setup(self, link: Link) -> None:
        """Everything is dirty at the start; the tracker's first sync clears it."""
        self._link = link
        self.sync()
        target = getattr(link, "ram_target", None)
        native = target() if callable(target) else None
        self._account = getattr(link, "account_pages", None) if native is not None else None
        self._stream.start(native if native is not None else link)

    def _accounted(self, t0: float | None) -> None:
        """Tells a link whose native sender the stream drives what went out,
        and for how long it sent (None: a barrier, no send time, as a link's
        own ``sync`` counts it)."""
        if self._account is None:
            return
        wire = self._stat("wire-bytes")
        self._account(wire - self._wire_seen, 0.0 if t0 is None else self.clock.now() - t0)
        self._wire_seen = wire

    def pending_estimate(self) -> int:
        return int(self._stream.pending())

    def pending_exact(self, guest_stopped: bool) -> int:
        self.sync()
        return self.pending_estimate()

    def final_sync_estimate(self) -> float:
        """Seconds the final sync should take: the least of the recent syncs.

        The final sync walks the same page tables with the guest stopped,
        finds only what was written since the sync before it and protects
        nothing again. Of the recent syncs, the least is the one least
        inflated by written pages and by a wait for a core (both ends of a
        loopback migration share the host's cores); the last one may be
        either."""
        return min(self._recent_syncs, default=0.0)

    def _synced(self, new_pages: int, cost: float, t1: float) -> None:
        self.last_sync_seconds = float(cost)
        self._recent_syncs.append(self.last_sync_seconds)
        self.sync_seconds += self.last_sync_seconds
        self.last_sync_new_pages = new_pages
        if self.last_sync_time is not None and t1 > self.last_sync_time:
            self.dirty_pages_rate = new_pages / (t1 - self.last_sync_time)
        self.last_sync_time = t1

    def sync(self) -> DirtyBitmap:
        """Harvest the tracker into the known dirty set; returns the new pages."""
        new, count, cost = self._stream.sync()
        self._synced(count, cost, self.clock.now())
        self._accounted(None)
        return new

    def iterate(self, link: Link, budget: int) -> int:
        """Send about ``budget`` bytes of known dirty pages, walking round-robin."""
        t0 = self.clock.now()
        sent = int(self._stream.iterate(max(0, int(budget))))
        self._accounted(t0)
        return sent

    def quiesce(self) -> None:
        """RAM has no DMA of its own to stop."""

    def complete(self, link: Link, budget: int | None = None) -> int:
        """Guest stopped: final sync, then every remaining page.

        With a budget, the size is checked before anything is sent; on
        ``OverBudget`` nothing was lost: the known set still holds every page.
        """
        t0 = self.clock.now()
        sent, remaining, (count, cost) = self._stream.complete(budget)
        self._synced(count, cost, t0 + cost)
        self._accounted(t0)
        if sent is None:
            raise OverBudget(self.name, remaining, budget)
        return int(sent)

    def take_known(self) -> DirtyBitmap:
        """Post-copy's hand-over, guest stopped: a final harvest, then the
        known set taken out unsent (the pages the destination must fetch)."""
        t0 = self.clock.now()
        owed, count, cost = self._stream.take_known()
        self._synced(count, cost, t0 + cost)
        self._accounted(None)
        return owed

    def resume_after_exact(self) -> None:
        """Nothing to undo: the synced pages stay in the known set."""

    def abort(self) -> None:
        self._stream.close()

    def stats(self) -> dict[str, Any]:
        return {
            "dirty-sync-count": self.sync_count,
            "sync-seconds": self.sync_seconds,
            "last-sync-seconds": self.last_sync_seconds,
            "dirty-pages-rate": self.dirty_pages_rate,
            "pages-sent": self.pages_sent,
            "bytes-sent": self.bytes_sent,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "remaining": self.pending_estimate(),
            "generation": self.generation,
        }
