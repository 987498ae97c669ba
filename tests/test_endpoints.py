"""Source and destination on two threads, in real time, over an in-process session."""

from __future__ import annotations

import pytest
from loopkit import BlobDevice, SoftTracker
from pipekit import Pipe, ThreadGuest

import mig
from mig.clock import MonotonicClock, VirtualClock
from mig.destination import MigrationDestination
from mig.link import ReceiverEndpoint, SenderLink
from mig.source import MigrationSource

MIB = 1 << 20


def pair(devices: int = 1, rate: float = 2000, **params):
    src, dst = mig.GuestMemory(8 * MIB), mig.GuestMemory(8 * MIB)
    tracker = SoftTracker(src)
    guest = ThreadGuest(src, tracker, rate)
    pipe = Pipe(src, dst)
    still = VirtualClock()  # device state does not grow by itself here
    sdevs = [
        BlobDevice(f"d{i}", i, still, 128 << 10, exact_needs_stop=False)
        for i in range(1, devices + 1)
    ]
    ddevs = [BlobDevice(f"d{i}", i, still, 0) for i in range(1, devices + 1)]
    clock = MonotonicClock()
    dest = MigrationDestination(
        None, dst, ddevs, endpoint=ReceiverEndpoint(pipe.receiver), idle_timeout=10
    )
    source = MigrationSource(
        guest, sdevs, link=SenderLink(pipe.sender, clock), tracker=tracker, clock=clock, **params
    )
    return source, dest, guest, src, dst, sdevs, ddevs


def test_two_threads_migrate_byte_exact_with_device_records_in_order() -> None:
    source, dest, guest, src, dst, sdevs, ddevs = pair(max_bandwidth=200 * MIB, timeout=30)
    resumed = []
    dest.on_resume = lambda: resumed.append(True)
    dest.start()
    source.start()
    q = source.wait(60)
    d = dest.wait(10)
    guest.close()
    assert q["status"] == "completed", q.get("error-desc")
    assert d["status"] == "completed" and d["verified"] and resumed
    assert src.digest() == dst.digest()
    loaded = ddevs[0].loaded
    assert [s for s, _, _ in loaded] == list(range(sdevs[0].seq))
    assert loaded[-1][2] and sum(len(c) for _, c, _ in loaded) == sum(
        q["devices"][0][k] for k in ("precopy-bytes", "stop-copy-bytes")
    )
    assert q["downtime"] >= q["downtime-breakdown"]["load"] > 0


@pytest.mark.parametrize("side", ["source", "destination"])
def test_cancel_from_either_side_rolls_back(side: str) -> None:
    source, dest, guest, src, dst, *_ = pair(max_bandwidth=8 * MIB, rate=0)
    before = src.digest()

    def on_status(status: str) -> None:
        if status == "active":
            (source if side == "source" else dest).cancel(f"{side} cancel")

    (source if side == "source" else dest).on_status = on_status
    dest.start()
    source.start()
    q = source.wait(30)
    d = dest.wait(30)
    guest.close()
    assert q["status"] == ("cancelled" if side == "source" else "failed")
    assert d["status"] in ("cancelled", "failed") and not d["verified"]
    # The destination tells the source, then drops the session: either may land first.
    assert f"{side} cancel" in q["error-desc"] or "aborted" in q["error-desc"]
    assert guest.running and src.digest() == before
