"""A real migration over loopback TCP between two memories, for tests."""

from __future__ import annotations

from typing import Any

import mig
from mig.destination import MigrationDestination
from mig.source import MigrationSource


def migrate_loopback(
    src: mig.GuestMemory,
    dst: mig.GuestMemory,
    workload: str = "idle",
    before: Any = None,
    **params: Any,
) -> tuple[dict, dict, MigrationSource]:
    """Runs a one-vCPU ``workload`` on ``src`` and migrates it into ``dst``;
    returns both sides' ``query()`` and the source. ``before(source, guest)``
    runs once both exist, before anything starts."""
    guest = mig.WorkloadGuest(src, vcpus=1, workload=workload)
    dest = MigrationDestination("tcp:127.0.0.1:0", dst, idle_timeout=20, accept_timeout=8)
    params.setdefault("multifd_channels", 2)
    params.setdefault("timeout", 45)
    source = MigrationSource(guest, uri=dest.uri, **params)
    if before:
        before(source, guest)
    dest.start()
    source.start()
    try:
        q = source.wait(60)
        d = dest.wait(30)
    finally:
        guest.close()
    return q, d, source
