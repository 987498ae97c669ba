"""Guest memory and the ``Guest`` protocol that embedders implement.

An embedder (a VMM prototype with its own vCPUs) hands mig an object with this
protocol; mig never touches vCPUs in any other way. ``WorkloadGuest`` from the
native module implements it, and so can any Python class.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from mig._mig import GuestMemory

__all__ = ["Guest", "GuestMemory"]


@runtime_checkable
class Guest(Protocol):
    """What the migration loop needs from a running guest.

    * ``memory``: the guest RAM the loop migrates (a ``GuestMemory``).
    * ``pause()``: park every vCPU; return the seconds it took (the loop
      counts that time as downtime or as guest-stopped time).
    * ``resume()``: let the vCPUs run again.
    * ``set_throttle(pct)``: fraction 0.0-0.99 of each vCPU's time to sleep
      (auto-converge).

    Optional, looked up with ``getattr``: ``set_dirty_limit(pages_per_s)``
    (per-vCPU cap on page writes, 0 = none) and ``stats() -> dict``.
    """

    memory: GuestMemory

    def pause(self) -> float: ...

    def resume(self) -> None: ...

    def set_throttle(self, pct: float) -> None: ...


def guest_stats(guest: Guest) -> dict[str, Any]:
    """The guest's own statistics, or ``{}`` when it offers none."""
    fn = getattr(guest, "stats", None)
    return dict(fn()) if callable(fn) else {}
