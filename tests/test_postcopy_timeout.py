"""``timeout_action`` ``postcopy`` (virsh's --timeout-postcopy): at the
timeout, a migration with ``postcopy`` on switches to post-copy."""

from __future__ import annotations

from typing import Any

import pytest
from postcopykit import needs_postcopy, start_and_wait

import mig
from mig.destination import MigrationDestination
from mig.params import MigrationParams
from mig.source import MigrationSource

SIZE = 16 << 20
TIMEOUT = 0.5


def test_the_postcopy_action_needs_postcopy_on() -> None:
    with pytest.raises(ValueError, match="needs postcopy"):
        MigrationParams.from_dict({"timeout": 1.0, "timeout_action": "postcopy"})
    ok = MigrationParams.from_dict({"timeout_action": "postcopy", "postcopy": True})
    assert ok.timeout_action == "postcopy"


@needs_postcopy
def test_the_timeout_switches_to_postcopy_and_ends_byte_exact() -> None:
    # 16 MiB at 8 MiB/s: pre-copy's first pass outlasts the timeout, and no
    # pass count or early measurement switches before it.
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    guest = mig.WorkloadGuest(src, vcpus=1, workload="sequential:wss=8MiB,rate=200000")
    dest = MigrationDestination("tcp:127.0.0.1:0", dst, idle_timeout=20, accept_timeout=8, vcpus=1)
    events: list[tuple[str, dict[str, Any]]] = []
    source = MigrationSource(
        guest,
        uri=dest.uri,
        postcopy=True,
        postcopy_after_passes=1000,
        timeout=TIMEOUT,
        timeout_action="postcopy",
        max_bandwidth=8 << 20,
        on_event=lambda name, info: events.append((name, info)),
    )
    q, d = start_and_wait(source, dest, guest, {})
    assert q["status"] == "completed", q.get("error-desc")
    assert d["status"] == "completed", d.get("error-desc")
    assert q["verified"] and d["verified"]
    assert src.digest() == dst.digest()
    reasons = [info.get("reason", "") for name, info in events if name == "postcopy-start"]
    assert len(reasons) == 1 and "timeout" in reasons[0], events
    assert q["postcopy"]["owed-chunks"] > 0
    # The pause came at the timeout, not before (the stop-copy's pass record).
    assert q["passes"][-1]["time"] >= TIMEOUT
