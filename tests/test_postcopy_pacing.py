"""Post-copy within the link's cap: requested pages obey ``max_bandwidth`` as
the push does, and ``max_postcopy_bandwidth`` holds the push back, changed
while post-copy runs. Each migration ends byte-exact."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from postcopykit import needs_postcopy

import mig
from mig.destination import MigrationDestination
from mig.source import MigrationSource

pytestmark = needs_postcopy

MIB = 1 << 20
SIZE = 16 * MIB
CAP = 8 * MIB


def _postcopy(dest_workload: str, **params: Any) -> dict[str, Any]:
    """Migrates a guest of random data in post-copy from the start (all of it
    owed); the destination runs ``dest_workload`` from its resume on. Returns
    the running migration's parts and a status log with times."""
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    src.array[:] = np.random.default_rng(7).integers(1, 256, SIZE, dtype=np.uint8)
    guest = mig.WorkloadGuest(src, vcpus=1, workload="idle")
    dest = MigrationDestination("tcp:127.0.0.1:0", dst, idle_timeout=30, vcpus=1)
    parts: dict[str, Any] = {"src": src, "dst": dst, "guest": guest, "dest": dest}
    statuses: dict[str, float] = {}
    active = threading.Event()

    def on_status(status: str) -> None:
        statuses.setdefault(status, time.monotonic())
        if status == "postcopy-active":
            active.set()

    def on_resume() -> None:
        parts["there"] = mig.WorkloadGuest(dst, vcpus=1, workload=dest_workload)

    dest.on_resume = on_resume
    source = MigrationSource(
        guest, uri=dest.uri, postcopy=True, max_bandwidth=CAP, timeout=60, **params
    )
    source.on_status = on_status
    parts.update(source=source, statuses=statuses, active=active)
    dest.start()
    source.start()
    source.start_postcopy()
    return parts


def _finish(parts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        q, d = parts["source"].wait(90), parts["dest"].wait(30)
    finally:
        parts["guest"].close()
        if "there" in parts:
            parts["there"].close()
    assert q["status"] == "completed" and d["status"] == "completed", (q.get("error-desc"), d)
    assert q["verified"] and d["verified"], (q.get("verify-error"), d.get("verify-error"))
    return q, d


def test_requested_pages_stay_within_the_link_cap() -> None:
    # A destination guest touching random pages as fast as it can: its
    # requests alone would outrun a loopback link many times over.
    parts = _postcopy("uniform:wss=16MiB,rate=max")
    q, d = _finish(parts)
    pc = q["postcopy"]
    assert pc["requested-chunks"] > 0, pc
    seconds = parts["statuses"]["completed"] - parts["statuses"]["postcopy-active"]
    sent = pc["postcopy-bytes"]
    assert sent >= SIZE
    # The pacer lets a late turn keep 5 ms of the link's time: a margin, not a rate.
    assert seconds >= sent / CAP - 0.05, (seconds, sent, pc)


def test_max_postcopy_bandwidth_holds_the_push_and_changes_while_it_runs() -> None:
    parts = _postcopy("idle", max_postcopy_bandwidth=1)
    source: MigrationSource = parts["source"]
    assert parts["active"].wait(60), source.query().get("error-desc")
    time.sleep(0.5)
    held = source.query()["postcopy"]
    # The push sends one chunk before its pacer holds it; nothing requests.
    assert held["pushed-chunks"] <= 1 and held["remaining-chunks"] > 0, held
    with pytest.raises(ValueError, match=">= 0"):
        source.set_max_postcopy_bandwidth(-1)
    source.set_max_postcopy_bandwidth(0)
    q, _ = _finish(parts)
    assert q["postcopy"]["pushed-chunks"] == q["postcopy"]["owed-chunks"], q["postcopy"]
    assert parts["src"].digest() == parts["dst"].digest()
