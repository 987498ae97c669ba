"""The fault matrix's post-copy phase: faults while the destination runs the
guest and pages are still owed (``source.postcopy`` / ``dest.postcopy``).

During post-copy the guest's state is split between both hosts, so no
fault rolls back: each ends in its own documented state.

============== ======================= ==========================================
fault          armed at                end state
============== ======================= ==========================================
link-reset     ``source.postcopy``     both ``postcopy-paused``, the destination
                                       lists the missing pages; after
                                       ``recover()`` on both sides ``completed``,
                                       verified, memories equal
dest-killed    ``source.postcopy``     source ``postcopy-paused``; cancelled:
                                       ``failed``, "the guest is lost",
                                       ``postmigrate``, its memory as sent
source-killed  ``dest.postcopy``       destination ``postcopy-paused``;
                                       cancelled: ``failed``, "never arrived",
                                       ``missing-pages`` non-empty and within
                                       the owed pages
============== ======================= ==========================================

Every case leaves this process with as many threads and file descriptors
as before (its guest memories aside).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from faultkit import (
    KIND_POSTCOPY,
    DestProcess,
    FaultProxy,
    RunLog,
    grew,
    recover_both,
    resources,
    settle,
)
from peerkit import free_port, mig_process
from postcopykit import PLACEMENTS, needs_postcopy

import mig
from mig import faults
from mig.destination import MigrationDestination
from mig.source import MigrationSource

pytestmark = needs_postcopy

MIB = 1 << 20
SIZE = 32 * MIB
WORKLOAD = "sequential:wss=8MiB,rate=200000"
CHUNK_PAGES = 16  # post-copy's unit: the destination digest's 64 KiB chunk
# 8 MiB owed at 2 MiB/s: the post-copy phase lasts seconds, long enough to cut.
PARAMS: dict[str, Any] = {"postcopy": True, "timeout": 60, "max_bandwidth": 2 * MIB}


class Statuses:
    """An ``on_status`` that records each status as an event to wait for."""

    def __init__(self) -> None:
        self._seen: dict[str, threading.Event] = {}

    def __call__(self, status: str) -> None:
        self.event(status).set()

    def event(self, status: str) -> threading.Event:
        return self._seen.setdefault(status, threading.Event())

    def reached(self, status: str, timeout: float = 30.0) -> bool:
        return self.event(status).wait(timeout)


def _once(point: str, action: Any) -> list[str]:
    """Arm ``action`` at the first time ``point`` is reached; returns the
    list the point's name is appended to when it fired."""
    fired: list[str] = []

    def run(_: dict[str, Any]) -> None:
        if not fired:
            fired.append(point)
            action()

    faults.arm(point, run)
    return fired


@pytest.fixture(autouse=True)
def _disarm():
    yield
    faults.disarm_all()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_link_reset_pauses_both_sides_and_recover_ends_byte_exact(placement: str) -> None:
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    before = resources()  # the memories (memfds) stay until the end
    guest = mig.WorkloadGuest(src, vcpus=1, workload=WORKLOAD)
    dest_seen, source_seen = Statuses(), Statuses()
    dest = MigrationDestination(
        "tcp:127.0.0.1:0",
        dst,
        idle_timeout=20,
        accept_timeout=8,
        on_status=dest_seen,
        postcopy_placement=placement,
    )
    proxy = FaultProxy(str(dest.uri))

    def reset() -> None:
        time.sleep(0.2)  # some pages placed, most still owed
        proxy.reset(KIND_POSTCOPY, 0)
        proxy.reset(KIND_POSTCOPY, 1)

    fired = _once("source.postcopy", reset)
    source = MigrationSource(guest, uri=proxy.uri, on_status=source_seen, **PARAMS)
    dest.start()
    source.start()
    try:
        assert source_seen.reached("postcopy-paused"), source.query().get("error-desc")
        assert dest_seen.reached("postcopy-paused"), dest.query().get("error-desc")
        paused = dest.query()
        assert paused["status"] == "postcopy-paused" and paused["postcopy"]["missing-pages"]
        q, d = recover_both(source, dest)
    finally:
        guest.close()
        proxy.close()
    assert fired == ["source.postcopy"]
    assert q["status"] == "completed" and d["status"] == "completed", (q.get("error-desc"), d)
    assert q["verified"] and d["verified"]
    assert q["postcopy"]["recoveries"] == 1 and d["postcopy"]["recoveries"] == 1
    assert src.digest() == dst.digest()
    del source, dest
    assert not (leak := grew(settle(before), before)), f"leaked: {leak}"


def test_destination_killed_loses_the_guest_and_the_source_says_so() -> None:
    src = mig.GuestMemory(SIZE)
    before = resources()
    guest = mig.WorkloadGuest(src, vcpus=1, workload=WORKLOAD)
    proc = DestProcess(SIZE, "none", RunLog())
    frozen: dict[str, int] = {}

    def kill() -> None:
        frozen["digest"] = src.digest()  # the guest is stopped: what was handed over
        proc.kill()

    fired = _once("source.postcopy", kill)
    seen = Statuses()
    source = MigrationSource(guest, uri=proc.uri, on_status=seen, **PARAMS)
    source.start()
    try:
        assert seen.reached("postcopy-paused"), source.query().get("error-desc")
        assert source.query()["status"] == "postcopy-paused"
        assert source.cancel("the destination is gone")
        q = source.wait(30)
    finally:
        guest.close()
        proc.wait()  # its pipes close with it
    assert fired == ["source.postcopy"] and proc.killed
    assert q["status"] == "failed" and "the guest is lost" in q["error-desc"], q.get("error-desc")
    assert q["postmigrate"] and not q["verified"]
    assert src.digest() == frozen["digest"], "the source guest ran again"
    del source
    assert not (leak := grew(settle(before), before)), f"leaked: {leak}"


def test_source_killed_leaves_the_destination_naming_the_pages_that_never_arrived() -> None:
    dst = mig.GuestMemory(SIZE)
    before = resources()
    seen = Statuses()
    port = free_port()
    dest = MigrationDestination(
        f"tcp:127.0.0.1:{port}", dst, idle_timeout=20, accept_timeout=30, on_status=seen
    )
    dest.start()
    src_proc = mig_process(
        "send", "--connect", f"tcp:127.0.0.1:{port}", "--json", "--devices", "none",
        "--size", f"{SIZE // MIB}MiB", "--workload", WORKLOAD,
        "--postcopy", "--max-bandwidth", f"{PARAMS['max_bandwidth'] // MIB}MiB/s",
    )  # fmt: skip

    def kill() -> None:
        src_proc.kill()
        src_proc.communicate()

    fired = _once("dest.postcopy", kill)
    try:
        assert seen.reached("postcopy-paused", 60), dest.query().get("error-desc")
        dest.cancel("the source is gone")
        d = dest.wait(30)
    finally:
        if src_proc.poll() is None:
            src_proc.kill()
            src_proc.communicate()
    assert fired == ["dest.postcopy"] and src_proc.returncode not in (None, 0)
    assert d["status"] == "failed" and "never arrived" in d["error-desc"], d.get("error-desc")
    missing = d["postcopy"]["missing-pages"]
    owed = d["postcopy"]["owed-chunks"] * CHUNK_PAGES
    assert missing and all(n > 0 for _, n in missing), missing
    assert 0 < sum(n for _, n in missing) <= owed, (missing, owed)
    assert all(0 <= first and first + n <= SIZE // 4096 for first, n in missing), missing
    del dest
    assert not (leak := grew(settle(before), before)), f"leaked: {leak}"
