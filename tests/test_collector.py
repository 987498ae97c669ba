"""Python's collector is held off while each side's part of the downtime runs
(``mig.collector``), and always runs again after: completed, rolled back or
failed."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

import mig
from mig import collector, faults
from mig.destination import MigrationDestination
from mig.source import MigrationSource

MIB = 1 << 20


@pytest.fixture(autouse=True)
def collector_enabled() -> Iterator[None]:
    assert collector.holds() == 0 and gc.isenabled()
    yield
    gc.enable()


def test_holds_nest_and_release_is_idempotent() -> None:
    a, b = collector.CollectorHold(), collector.CollectorHold()
    a.hold()
    a.hold()
    b.hold()
    assert not gc.isenabled() and collector.holds() == 2
    a.release()
    a.release()
    assert not gc.isenabled(), "b still holds it"
    b.release()
    assert gc.isenabled() and collector.holds() == 0


def test_a_collector_its_embedder_disabled_stays_disabled() -> None:
    gc.disable()
    hold = collector.CollectorHold()
    hold.hold()
    hold.release()
    assert not gc.isenabled()


def _migrate(actions: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], bool]:
    src, dst = mig.GuestMemory(16 * MIB), mig.GuestMemory(16 * MIB)
    src.array[::4096] = 7
    with mig.WorkloadGuest(src, vcpus=1, workload="uniform:rate=2000") as guest:
        dest = MigrationDestination("tcp:127.0.0.1:0", dst, [])
        source = MigrationSource(guest, [], uri=dest.uri)
        dest.start()
        with faults.armed(actions):
            q = source.run()
        d = dest.wait(30)
        running = guest.running
    return q, d, running


def test_the_collector_is_off_from_the_pause_to_resumed_and_on_after() -> None:
    seen: dict[str, tuple[bool, int]] = {}

    def mark(point: str) -> Any:
        return lambda info: seen.setdefault(point, (gc.isenabled(), collector.holds()))

    points = ("source.setup", "source.guest-stop", "dest.switchover-complete", "source.go")
    q, d, _ = _migrate({p: mark(p) for p in points})
    assert q["status"] == "completed" and d["status"] == "completed", q.get("error-desc")
    assert seen["source.setup"] == (True, 0)  # precopy collects as usual
    assert seen["source.guest-stop"] == (False, 1)  # the source's hold
    assert seen["dest.switchover-complete"] == (False, 2)  # and the destination's
    assert seen["source.go"][0] is False
    assert gc.isenabled() and collector.holds() == 0


def test_a_rolled_back_switchover_gives_the_collector_back() -> None:
    def refuse(info: dict[str, Any]) -> None:
        raise OSError("injected: the link broke after ready")

    q, d, running = _migrate({"source.ready": refuse})
    assert q["status"] == "failed" and running  # the source guest runs again
    assert d["status"] != "completed"
    assert gc.isenabled() and collector.holds() == 0
