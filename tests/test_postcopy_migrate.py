"""Post-copy migrations over loopback TCP: the switchover, demand paging, the
digest of placed pages, statistics and a host without MISSING mode."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from faultkit import KIND_POSTCOPY, DestProcess, FaultProxy, RunLog, recover_both
from postcopykit import PLACEMENTS, needs_postcopy, start_and_wait

import mig
from mig.destination import MigrationDestination
from mig.source import MigrationSource

SIZE = 32 << 20


def migrate(
    dest_workload: str | None,
    start_postcopy: bool = False,
    placement: str = "auto",
    **params: Any,
) -> tuple[dict, dict, mig.GuestMemory, mig.GuestMemory, dict]:
    """Migrates a guest dirtying 8 MiB in post-copy; with ``dest_workload`` the
    destination runs that workload from its resume on; ``placement``: the
    destination's ``postcopy_placement``. Returns both queries, both
    memories and the destination guest's stats."""
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    guest = mig.WorkloadGuest(src, vcpus=1, workload="sequential:wss=8MiB,rate=200000")
    dest = MigrationDestination(
        "tcp:127.0.0.1:0",
        dst,
        idle_timeout=20,
        accept_timeout=8,
        vcpus=1,
        postcopy_placement=placement,
    )
    there: dict[str, Any] = {}
    if dest_workload:
        dest.on_resume = lambda: there.setdefault(
            "guest", mig.WorkloadGuest(dst, vcpus=1, workload=dest_workload)
        )
    params.setdefault("max_bandwidth", 32 << 20)
    source = MigrationSource(guest, uri=dest.uri, postcopy=True, timeout=60, **params)
    q, d = start_and_wait(source, dest, guest, there, start_postcopy=start_postcopy)
    return q, d, src, dst, there.get("stats", {})


@needs_postcopy
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_postcopy_completes_byte_exact_with_the_destination_idle(placement: str) -> None:
    # 8 MiB written per downtime limit fit it at 32 MiB/s: the policy alone
    # would complete in pre-copy.
    q, d, src, dst, _ = migrate(None, start_postcopy=True, placement=placement)
    assert q["status"] == "completed", q.get("error-desc")
    assert d["status"] == "completed", d.get("error-desc")
    assert q["verified"] and d["verified"]
    pc = q["postcopy"]
    assert pc["owed-chunks"] > 0, "nothing was left for post-copy"
    assert pc["remaining-chunks"] == 0
    assert pc["requested-chunks"] + pc["pushed-chunks"] == pc["owed-chunks"]
    assert d["postcopy"]["placed-chunks"] == pc["owed-chunks"]
    assert d["postcopy"]["postcopy-placement"] == placement
    assert src.digest() == dst.digest()
    assert q["downtime"] > 0


@needs_postcopy
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_the_destination_guest_faults_pages_in_and_the_digest_matches(placement: str) -> None:
    q, d, _, _, there = migrate(
        "uniform:wss=32MiB,rate=300000", start_postcopy=True, placement=placement
    )
    assert q["status"] == "completed", q.get("error-desc")
    assert d["status"] == "completed", d.get("error-desc")
    # The destination's root of held and placed pages equals the source's
    # digest of its frozen memory: byte-exact as resumed.
    assert q["verified"] and d["verified"], (q.get("verify-error"), d.get("verify-error"))
    pc = d["postcopy"]
    assert pc["postcopy-requests"] > 0 and q["postcopy-requests"] > 0
    assert pc["fault-latency-p50"] is not None and pc["fault-latency-p99"] is not None
    assert pc["postcopy-blocktime"] is not None
    assert pc["postcopy-placement"] == placement
    assert there["writes"] > 0, "the destination guest did not run"


def test_postcopy_needs_it_enabled_and_cannot_verify_strictly() -> None:
    src = mig.GuestMemory(1 << 20)
    guest = mig.WorkloadGuest(src, vcpus=1, workload="idle")
    try:
        source = MigrationSource(guest, uri="tcp:127.0.0.1:1")
        with pytest.raises(RuntimeError, match="postcopy=True"):
            source.start_postcopy()
        with pytest.raises(ValueError, match="strict"):
            MigrationSource(guest, uri="tcp:127.0.0.1:1", postcopy=True, verify="strict")
    finally:
        guest.close()


def test_a_destination_without_missing_mode_fails_naming_the_feature(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fake is read by every probe in this process: both sides see it,
    # and only the destination needs the feature.
    monkeypatch.setenv("MIG_FAKE_PROBE", "missing_shmem=EINVAL")
    q, d, _, _, _ = migrate(None)
    assert q["status"] == "failed" and d["status"] == "failed"
    assert "UFFDIO_REGISTER_MODE_MISSING" in d["error-desc"]
    assert "UFFDIO_REGISTER_MODE_MISSING" in q["error-desc"]


@needs_postcopy
def test_a_destination_without_minor_mode_fails_naming_the_feature(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # UFFDIO_API without UFFD_FEATURE_MINOR_SHMEM (1 << 10) for post-copy:
    # the MISSING mode of `copy` is there, the MINOR mode of `continue` not.
    monkeypatch.setenv("MIG_FAKE_PROBE", "features_off=0x400")
    cap = mig.capabilities()["postcopy"]
    assert cap["available"] and not cap["placement_continue"]["available"]
    assert cap["placement_continue"]["missing"] == ["UFFD_FEATURE_MINOR_SHMEM"]
    # auto places with copy there; continue asked for fails naming the feature.
    assert mig._mig.PostcopyIncoming(mig.GuestMemory(1 << 20), placement="auto").placement == "copy"
    q, d, _, _, _ = migrate(None, placement="continue")
    assert q["status"] == "failed" and d["status"] == "failed"
    assert "UFFD_FEATURE_MINOR_SHMEM" in d["error-desc"], d["error-desc"]
    assert "UFFD_FEATURE_MINOR_SHMEM" in q["error-desc"], q["error-desc"]


def test_continue_needs_shmem_memory() -> None:
    anon = mig.GuestMemory(1 << 20, "anon")
    with pytest.raises(ValueError, match="memfd/shmem"):
        MigrationDestination("tcp:127.0.0.1:0", anon, postcopy_placement="continue")
    with pytest.raises(ValueError, match="postcopy_placement"):
        MigrationDestination("tcp:127.0.0.1:0", anon, postcopy_placement="minor")


@needs_postcopy
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_recovery_after_the_page_channels_reset_mid_postcopy(placement: str) -> None:
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    guest = mig.WorkloadGuest(src, vcpus=1, workload="sequential:wss=8MiB,rate=200000")
    dest = MigrationDestination(
        "tcp:127.0.0.1:0", dst, idle_timeout=20, accept_timeout=8, postcopy_placement=placement
    )
    proxy = FaultProxy(dest.uri)
    seen: dict[str, threading.Event] = {}

    def on_status(side: str) -> Any:
        return lambda s: seen.setdefault(f"{side} {s}", threading.Event()).set()

    def event(name: str) -> threading.Event:
        return seen.setdefault(name, threading.Event())

    dest.on_status = on_status("dest")
    # 8 MiB owed at 2 MiB/s: the push lasts long enough to be cut.
    source = MigrationSource(guest, uri=proxy.uri, postcopy=True, timeout=60, max_bandwidth=2 << 20)
    source.on_status = on_status("source")
    dest.start()
    source.start()
    try:
        assert event("source postcopy-active").wait(60), source.query().get("error-desc")
        time.sleep(0.3)
        proxy.reset(KIND_POSTCOPY, 0)
        proxy.reset(KIND_POSTCOPY, 1)
        assert event("source postcopy-paused").wait(10)
        assert event("dest postcopy-paused").wait(10)
        assert source.query()["status"] == "postcopy-paused"
        assert dest.query()["status"] == "postcopy-paused"
        assert dest.query()["postcopy"]["missing-pages"], "nothing was left to fetch"
        q, d = recover_both(source, dest)
    finally:
        guest.close()
        proxy.close()
    assert q["status"] == "completed", q.get("error-desc")
    assert d["status"] == "completed", d.get("error-desc")
    assert q["verified"] and d["verified"]
    assert q["postcopy"]["recoveries"] == 1 and d["postcopy"]["recoveries"] == 1
    assert src.digest() == dst.digest()


def _slow_postcopy_source(guest: Any, uri: str) -> tuple[MigrationSource, dict]:
    """A post-copy source whose push lasts seconds (8 MiB owed at 2 MiB/s),
    with an event per status it reaches."""
    seen: dict[str, threading.Event] = {}
    source = MigrationSource(guest, uri=uri, postcopy=True, timeout=60, max_bandwidth=2 << 20)
    source.on_status = lambda s: seen.setdefault(s, threading.Event()).set()
    return source, seen


def _reached(seen: dict[str, threading.Event], status: str, timeout: float) -> bool:
    return seen.setdefault(status, threading.Event()).wait(timeout)


@needs_postcopy
def test_a_destination_killed_during_postcopy_loses_the_guest() -> None:
    src = mig.GuestMemory(SIZE)
    guest = mig.WorkloadGuest(src, vcpus=1, workload="sequential:wss=8MiB,rate=200000")
    dest = DestProcess(SIZE, "none", RunLog())
    source, seen = _slow_postcopy_source(guest, dest.uri)
    source.start()
    try:
        assert _reached(seen, "postcopy-active", 60), source.query().get("error-desc")
        sent = src.digest()  # the guest is paused: the memory the destination took
        dest.kill()
        assert _reached(seen, "postcopy-paused", 10)
        assert source.cancel("the destination is gone")
        q = source.wait(30)
    finally:
        guest.close()
    assert q["status"] == "failed"
    assert "the guest is lost" in q["error-desc"]
    # The source never ran the guest again: its memory is as it was sent.
    assert q["postmigrate"] and src.digest() == sent


@needs_postcopy
def test_a_source_lost_during_postcopy_leaves_the_missing_pages_named() -> None:
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    guest = mig.WorkloadGuest(src, vcpus=1, workload="sequential:wss=8MiB,rate=200000")
    dest = MigrationDestination("tcp:127.0.0.1:0", dst, idle_timeout=20, accept_timeout=8)
    dest_seen: dict[str, threading.Event] = {}
    dest.on_status = lambda s: dest_seen.setdefault(s, threading.Event()).set()
    proxy = FaultProxy(dest.uri)
    source, seen = _slow_postcopy_source(guest, proxy.uri)
    dest.start()
    source.start()
    try:
        assert _reached(seen, "postcopy-active", 60), source.query().get("error-desc")
        # Cut the page channels and never recover: to the destination the
        # source is gone.
        proxy.reset(KIND_POSTCOPY, 0)
        proxy.reset(KIND_POSTCOPY, 1)
        assert _reached(dest_seen, "postcopy-paused", 10)
        dest.cancel("the source is gone")
        d = dest.wait(30)
        source.cancel("the destination gave up")
        q = source.wait(30)
    finally:
        guest.close()
        proxy.close()
    assert d["status"] == "failed" and "never arrived" in d["error-desc"]
    missing = d["postcopy"]["missing-pages"]
    assert missing and all(n > 0 for _, n in missing)
    assert q["status"] == "failed" and "the guest is lost" in q["error-desc"]
