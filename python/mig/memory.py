"""Guest memory and the ``Guest`` protocol that embedders implement.

A migration source drives a *guest*: something that owns a :class:`GuestMemory`
and can be stopped and restarted. :class:`mig.WorkloadGuest` (native vCPU threads
writing by a workload spec) is the bundled implementation; a VMM prototype
implements the same few methods around its own vCPUs.

Dirty tracking is separate from the guest: ``DirtyTracker(guest.memory)`` sees
every write made through the memory's mapping, by any thread (see
``docs/tracking.md``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from mig._mig import DirtyBitmap, DirtyTracker, GuestMemory, WorkloadGuest, capabilities

__all__ = [
    "DirtyBitmap",
    "DirtyTracker",
    "Guest",
    "GuestMemory",
    "WorkloadGuest",
    "capabilities",
]


@runtime_checkable
class Guest(Protocol):
    """What the migration source needs from a running guest.

    Required:

    * ``memory``: the guest's :class:`GuestMemory`.
    * ``pause() -> float``: stop every vCPU and return only once all are
      stopped; the return value is the measured stop latency in seconds.
    * ``resume()``: let the vCPUs run again.
    * ``set_throttle(pct)``: slow the vCPUs down; ``pct`` in [0.0, 0.99] is the
      fraction of time they sleep (QEMU's auto-converge).

    Optional (the source checks with ``hasattr`` and does without):

    * ``set_dirty_limit(rate)``: cap each vCPU at ``rate`` page writes/s, 0 for
      no cap (QEMU's dirty-limit).
    * ``stats() -> dict``: at least ``writes`` and ``paused-time``.

    ``isinstance(obj, mig.Guest)`` checks the required members only.

    On the destination side there is no ``Guest`` object: the embedder
    gives ``MigrationDestination`` the :class:`GuestMemory` its vCPUs will
    use, and starts those vCPUs in ``on_resume`` (called once the source's
    ``go`` arrived, before ``resumed`` is reported); ``vcpus`` tells it how
    many threads run the guest there, for ``postcopy-vcpu-blocktime``.
    With post-copy, ``on_resume`` runs while pages are still missing: a
    vCPU touching one blocks in the kernel until it arrives, so the memory
    must be accessed through its mapping only (the one ``GuestMemory``
    gives), never with ``pread``/``pwrite`` on its file, which would read a
    missing page as zeros. ``mig serve --workload`` (``ResumedWorkload``)
    is the bundled example.
    """

    @property
    def memory(self) -> GuestMemory: ...

    def pause(self) -> float: ...

    def resume(self) -> None: ...

    def set_throttle(self, pct: float) -> None: ...


def guest_stats(guest: Guest) -> dict[str, Any]:
    """The guest's ``stats()`` if it offers them, else an empty dict."""
    stats = getattr(guest, "stats", None)
    return dict(stats()) if callable(stats) else {}
