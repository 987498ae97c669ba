"""How a migration that did not complete leaves the source.

``roll_back``: the source guest runs again, throttles and dirty limits are
removed, every handler aborts and the destination is told (``cancel`` or
``failed``): safe whenever the destination cannot have resumed (before
``go``, or after its own ``failed``). ``leave_paused``: the outcome is
unknown after ``go`` (QEMU's ``postmigrate``): the guest stays paused, the
tracker and the session close, and nobody is told, since the destination
may run the guest. Both never raise: what fails is added to the reason.
"""

from __future__ import annotations

from collections.abc import Sequence

from mig.convergence_monitor import ConvergenceMonitor
from mig.guest_stops import GuestStops
from mig.handlers import RamHandler, SaveHandler
from mig.link import Link
from mig.protocol import Cancel, Failed

__all__ = ["roll_back", "leave_paused"]


def roll_back(
    status: str,
    reason: str,
    *,
    stops: GuestStops,
    monitor: ConvergenceMonitor,
    handlers: Sequence[SaveHandler],
    link: Link | None,
) -> str:
    """Undo everything; returns the error description."""
    errors = []
    if stops.paused:
        try:
            stops.run_again()
        except Exception as e:
            errors.append(f"resume: {e}")
        stops.paused = False
    try:
        monitor.remove_aids()
    except Exception as e:
        errors.append(f"throttle: {e}")
    for h in handlers:
        try:
            h.abort()
        except Exception as e:
            errors.append(f"{h.name}: {e}")
    if link is not None:
        try:
            link.send(Cancel(reason) if status == "cancelled" else Failed(reason))
        except Exception:
            pass  # the link may be what failed
        try:
            link.abort()
        except Exception as e:
            errors.append(f"link: {e}")
    return reason + (f" (rollback: {'; '.join(errors)})" if errors else "")


def leave_paused(reason: str, *, ram: RamHandler, link: Link) -> str:
    """Close the tracker and the session, tell nobody; returns the error description."""
    errors = []
    try:
        ram.abort()  # no more dirty syncs: free the tracker
    except Exception as e:
        errors.append(f"ram: {e}")
    try:
        link.abort()  # no "failed": the destination may run the guest
    except Exception as e:
        errors.append(f"link: {e}")
    return (
        f"outcome unknown after 'go': {reason}; the destination may run the guest, "
        "so the source guest is left paused (postmigrate): call resume_source() "
        "only once the destination is known not to run it"
        + (f" ({'; '.join(errors)})" if errors else "")
    )
