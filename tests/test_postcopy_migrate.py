"""Post-copy migrations over loopback TCP: the switchover, demand paging, the
digest of placed pages, statistics and a host without MISSING mode."""

from __future__ import annotations

from typing import Any

import pytest

import mig
from mig.destination import MigrationDestination
from mig.source import MigrationSource

POSTCOPY = mig.capabilities()["postcopy"]
needs_postcopy = pytest.mark.skipif(
    not POSTCOPY["available"],
    reason=f"host lacks userfaultfd MISSING mode: {POSTCOPY.get('reason')}",
)

SIZE = 32 << 20


def migrate(
    dest_workload: str | None, start_postcopy: bool = False, **params: Any
) -> tuple[dict, dict, mig.GuestMemory, mig.GuestMemory, dict]:
    """Migrates a guest dirtying 8 MiB in post-copy; with ``dest_workload`` the
    destination runs that workload from its resume on. Returns both queries,
    both memories and the destination guest's stats."""
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    guest = mig.WorkloadGuest(src, vcpus=1, workload="sequential:wss=8MiB,rate=200000")
    dest = MigrationDestination("tcp:127.0.0.1:0", dst, idle_timeout=20, accept_timeout=8, vcpus=1)
    there: dict[str, Any] = {}
    if dest_workload:
        dest.on_resume = lambda: there.setdefault(
            "guest", mig.WorkloadGuest(dst, vcpus=1, workload=dest_workload)
        )
    params.setdefault("max_bandwidth", 32 << 20)
    source = MigrationSource(guest, uri=dest.uri, postcopy=True, timeout=60, **params)
    dest.start()
    source.start()
    if start_postcopy:
        source.start_postcopy()
    try:
        q, d = source.wait(90), dest.wait(30)
    finally:
        guest.close()
        if "guest" in there:
            stats = there["guest"].stats()
            there["guest"].close()
            there["stats"] = stats
    return q, d, src, dst, there.get("stats", {})


@needs_postcopy
def test_postcopy_completes_byte_exact_with_the_destination_idle() -> None:
    q, d, src, dst, _ = migrate(None)
    assert q["status"] == "completed", q.get("error-desc")
    assert d["status"] == "completed", d.get("error-desc")
    assert q["verified"] and d["verified"]
    pc = q["postcopy"]
    assert pc["owed-chunks"] > 0, "nothing was left for post-copy"
    assert pc["remaining-chunks"] == 0
    assert pc["requested-chunks"] + pc["pushed-chunks"] == pc["owed-chunks"]
    assert d["postcopy"]["placed-chunks"] == pc["owed-chunks"]
    assert src.digest() == dst.digest()
    assert q["downtime"] > 0


@needs_postcopy
def test_the_destination_guest_faults_pages_in_and_the_digest_matches() -> None:
    q, d, _, _, there = migrate("uniform:wss=32MiB,rate=300000", start_postcopy=True)
    assert q["status"] == "completed", q.get("error-desc")
    assert d["status"] == "completed", d.get("error-desc")
    # The destination's root of held and placed pages equals the source's
    # digest of its frozen memory: byte-exact as resumed.
    assert q["verified"] and d["verified"], (q.get("verify-error"), d.get("verify-error"))
    pc = d["postcopy"]
    assert pc["postcopy-requests"] > 0 and q["postcopy-requests"] > 0
    assert pc["fault-latency-p50"] is not None and pc["fault-latency-p99"] is not None
    assert pc["postcopy-blocktime"] is not None
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
