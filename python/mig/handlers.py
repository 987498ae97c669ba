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

from typing import Any, Protocol, runtime_checkable

from mig._mig import DirtyBitmap, GuestMemory
from mig.clock import Clock
from mig.errors import OverBudget
from mig.link import Link

__all__ = ["SaveHandler", "LoadHandler", "StateHandler", "OverBudget", "RamHandler"]

# Page budget granted to one ``iterate`` call when the loop passes no budget.
_MIN_ITERATE_PAGES = 64


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
    """Guest RAM through a dirty tracker.

    Estimate: the dirty pages already known (not yet sent) times the page size,
    with no sync. Exact: a tracker sync merged into the known set; each sync's
    cost is measured and reported. Every sync after pages went out starts a
    new generation, preceded by a ``link.sync`` barrier, so a page re-sent in
    a later pass never loses against its older copy on another channel.
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
        self._link: Link | None = None
        self._dirty = DirtyBitmap(self.num_pages)
        self._cursor = 0
        self.generation = 0
        self._sent_in_generation = 0
        self.sync_count = 0
        self.sync_seconds = 0.0
        self.last_sync_seconds = 0.0
        self.last_sync_time: float | None = None
        self.last_sync_new_pages = 0
        self.dirty_pages_rate = 0.0
        self.pages_sent = 0
        self.bytes_sent = 0
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        self.final_pages = 0

    # --- source side ---
    def setup(self, link: Link) -> None:
        """Everything is dirty at the start; the tracker's first sync clears it."""
        self._link = link
        self.sync()
        self._dirty = DirtyBitmap.full(self.num_pages)

    def pending_estimate(self) -> int:
        return self._dirty.count() * self.page_size

    def pending_exact(self, guest_stopped: bool) -> int:
        self.sync()
        return self.pending_estimate()

    def sync(self) -> DirtyBitmap:
        """Harvest the tracker into the known dirty set; returns the new pages."""
        if self._link is not None and self._sent_in_generation:
            self._link.sync(self.generation)
            self.generation += 1
            self._sent_in_generation = 0
        t0 = self.clock.now()
        new = self.tracker.sync()
        t1 = self.clock.now()
        cost = getattr(self.tracker, "last_sync_seconds", None)
        self.last_sync_seconds = float(cost) if cost is not None else t1 - t0
        self.sync_seconds += self.last_sync_seconds
        self.last_sync_new_pages = new.count()
        if self.last_sync_time is not None and t1 > self.last_sync_time:
            self.dirty_pages_rate = self.last_sync_new_pages / (t1 - self.last_sync_time)
        self.last_sync_time = t1
        self.sync_count += 1
        self._dirty |= new
        return new

    def iterate(self, link: Link, budget: int) -> int:
        """Send about ``budget`` bytes of known dirty pages, walking round-robin."""
        dirty = self._dirty.count()
        if dirty == 0:
            return 0
        want = max(_MIN_ITERATE_PAGES, budget // self.page_size)
        # Scan a range whose expected dirty count is ``want``.
        span = min(self.num_pages, max(want, want * self.num_pages // dirty))
        sent = 0
        pages = 0
        while pages < want and self._dirty.count():
            start = self._cursor
            length = min(span, self.num_pages - start)
            chunk = self._dirty.test_and_clear(start, length)
            self._cursor = (start + length) % self.num_pages
            n = chunk.count()
            if n:
                sent += self._send(link, chunk)
                pages += n
        self.precopy_bytes += sent
        return sent

    def _send(self, link: Link, chunk: DirtyBitmap) -> int:
        n = link.send_pages(chunk, self.generation)
        count = chunk.count()
        self._sent_in_generation += count
        self.pages_sent += count
        self.bytes_sent += n
        return n

    def quiesce(self) -> None:
        """RAM has no DMA of its own to stop."""

    def complete(self, link: Link, budget: int | None = None) -> int:
        """Guest stopped: final sync, then every remaining page.

        With a budget, the size is checked before anything is sent; on
        ``OverBudget`` nothing was lost: the known set still holds every page.
        """
        self.sync()
        remaining = self._dirty.count() * self.page_size
        if budget is not None and remaining > budget:
            raise OverBudget(self.name, remaining, budget)
        self.final_pages = self._dirty.count()
        chunk = self._dirty.take()
        sent = self._send(link, chunk) if chunk.count() else 0
        link.sync(self.generation)
        self.downtime_bytes += sent
        return sent

    def resume_after_exact(self) -> None:
        """Nothing to undo: the synced pages stay in the known set."""

    def abort(self) -> None:
        close = getattr(self.tracker, "close", None)
        if callable(close):
            close()

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
