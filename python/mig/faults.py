"""Named fault-injection points in the migration loops.

``MigrationSource`` and ``MigrationDestination`` call ``point(name, **info)``
at fixed places of a migration (``POINTS``). Nothing is armed by default, and
then a call returns after one dictionary truth test. A test arms a point with
``arm(name, action)``: the action runs with the point's ``info`` on the thread
that reached it, and whatever it raises fails the migration there, like a
real error at that place would. Actions also reset sockets, kill processes or
arm device faults to reproduce the failures the recovery paths must survive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["POINTS", "InjectedFault", "arm", "armed", "disarm_all", "point"]

Action = Callable[[dict[str, Any]], None]

POINTS: dict[str, str] = {
    "source.setup": "hello-ack received, before the handlers' setup()",
    "source.switchover-ack": "the destination's switchover-ack handled",
    "source.pass": "a pass announced to the destination (info: number, the dirty-sync-count)",
    "source.settle": "'settle' sent before the pause, the guest still running",
    "source.guest-stop": "the guest paused (for an exact size or the switchover)",
    "source.stop-copy": "RAM stop-copy sent, before a device's complete() (info: device)",
    "source.switchover": "all state sent and digested, before the end records and 'complete'",
    "source.committed": "'complete' sent, before the destination's 'ready'",
    "source.ready": "the destination's 'ready' received, before 'go' is sent",
    "source.go": "'go' sent (the commit point), before the destination's 'resumed'",
    "source.verify": "'resumed' received (after-resume), before the source's digest is sent",
    "source.postcopy": "post-copy active: the destination runs the guest, pages still owed",
    "dest.setup": "hello checked and every load_setup() done, before hello-ack",
    "dest.switchover-ack": "switchover-ack sent",
    "dest.pass": "a 'pass' received (info: number, counted on the destination)",
    "dest.settled": "the channels hold the pass and the root is current, 'settled' sent",
    "dest.switchover": "'switchover' received: the source guest is stopped",
    "dest.stop-copy": "'complete' received and every end record in, before the last loads",
    "dest.switchover-complete": "every handler's load_complete() done, before the digest check",
    "dest.ready": "digest verified and 'ready' sent, before waiting for 'go'",
    "dest.resume": "'go' received, before the handlers resume and on_resume",
    "dest.verified": "after-resume verification answered (or abandoned)",
    "dest.postcopy": "post-copy active: the guest resumed here, pages still missing",
}


class InjectedFault(Exception):
    """Raised by an armed action to fail a migration at a point."""


_lock = threading.Lock()
_armed: dict[str, list[Action]] = {}


def point(name: str, **info: Any) -> None:
    """Run the actions armed at ``name`` (none by default)."""
    if not _armed:
        return
    with _lock:
        actions = tuple(_armed.get(name, ()))
    for action in actions:
        action(info)


def arm(name: str, action: Action) -> None:
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
    with _lock:
        _armed.setdefault(name, []).append(action)


def disarm_all() -> None:
    with _lock:
        _armed.clear()


@contextmanager
def armed(actions: dict[str, Action]) -> Iterator[None]:
    """Arm ``{point: action}`` for the duration of a ``with`` block."""
    try:
        for name, action in actions.items():
            arm(name, action)
        yield
    finally:
        disarm_all()
