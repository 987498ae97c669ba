"""A settle wait the destination draws out: what a working device dirtied
meanwhile goes in the catch-up, still running, not in the stop-copy."""

from __future__ import annotations

import time
from typing import Any

import mig
from mig import faults
from mig.destination import MigrationDestination
from mig.devices import create_all
from mig.source import MigrationSource

MIB = 1 << 20
# A nic that rewrites its tables all the time: each write dirties a whole
# 1 MiB chunk, so a 300 ms wait leaves tens of megabytes unsent.
NIC = "nic:state=16MiB,rate=20MiB/s,chunk=1MiB"
WAIT = 0.3


def test_a_long_settle_wait_sends_the_devices_dirty_state_before_the_pause() -> None:
    src, dst = mig.GuestMemory(32 * MIB), mig.GuestMemory(32 * MIB)
    src.array[::512] = 3
    src_devs, dst_devs = create_all(NIC, src), create_all(NIC, dst, active=False)
    waited: list[float] = []

    def slow_settle(info: dict[str, Any]) -> None:
        if not waited:  # the first settle only: the catch-up's is short
            waited.append(WAIT)
            time.sleep(WAIT)

    try:
        with mig.WorkloadGuest(src, vcpus=1, workload="uniform:rate=2000") as guest:
            dest = MigrationDestination("tcp:127.0.0.1:0", dst, dst_devs)
            source = MigrationSource(guest, src_devs, uri=dest.uri)
            dest.start()
            with faults.armed({"source.settle": slow_settle}):
                q = source.run()
            d = dest.wait(30)
    finally:
        for dev in src_devs + dst_devs:
            dev.close()
    assert waited, "the settle point was never reached"
    assert q["status"] == "completed" and d["status"] == "completed", q.get("error-desc")
    # Memory checked end to end; the nic's state against its END record's
    # digest when it loaded (RESUMING -> STOP), or the migration had failed.
    assert q["verified"] is True
    # The wait let the nic dirty many chunks; the catch-up sent them, so the
    # stop-copy carries what the short second settle let it dirty.
    (nic,) = q["devices"]
    assert nic["stop-copy-bytes"] < 8 * MIB, nic
