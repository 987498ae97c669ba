"""The ``verify`` parameter over the real loopback stream, with a missed dirty page.

``MissingTracker`` wraps the real tracker and drops one page's dirtiness from
every sync after the first, while the guest (this test) writes that page at
each of those syncs: the tracker bug that end-to-end verification exists to
catch. Strict refuses to resume and the source guest runs on; after-resume
completes, then reports the mismatch loudly; off completes and the copy
silently differs (shown here, not caught).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import mig
from mig.destination import MigrationDestination
from mig.source import MigrationSource

CAPS = mig.capabilities()
pytestmark = pytest.mark.skipif(
    not CAPS["uffd"]["available"],
    reason=f"host lacks the uffd capability: {CAPS['uffd']['reason']}",
)

MIB = 1 << 20
SIZE = 8 * MIB
MISSED = 123  # the page whose dirtiness the tracker loses


class MissingTracker:
    """The real tracker, except that page ``page`` is written at every sync
    after the first and dropped from what that sync returns."""

    def __init__(self, memory: mig.GuestMemory, page: int) -> None:
        self._inner = mig.DirtyTracker(memory)
        self._memory = memory
        self._page = page
        self.syncs = 0
        self.written: bytes | None = None

    def sync(self) -> mig.DirtyBitmap:
        self.syncs += 1
        if self.syncs > 1:
            size = self._memory.page_size
            self.written = bytes([self.syncs % 251 + 1]) * size
            self._memory.write(self._page * size, self.written)
        dirty = self._inner.sync()
        if self.syncs > 1:
            keep = dirty.indices()
            dirty = mig.DirtyBitmap.from_indices(keep[keep != self._page], dirty.num_pages)
        return dirty

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def migrate(mode: str, missed: bool) -> dict[str, Any]:
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    src.array[:] = np.random.default_rng(5).integers(0, 256, SIZE, dtype=np.uint8)
    guest = mig.WorkloadGuest(src, vcpus=1, workload="idle")
    tracker = MissingTracker(src, MISSED) if missed else None
    events: list[tuple[str, dict[str, Any]]] = []
    dest = MigrationDestination("tcp:127.0.0.1:0", dst, idle_timeout=10, accept_timeout=8)
    source = MigrationSource(
        guest,
        uri=dest.uri,
        tracker=tracker,
        on_event=lambda name, info: events.append((name, info)),
        multifd_channels=2,
        verify=mode,
        timeout=20,
    )
    dest.start()
    source.start()
    try:
        q = source.wait(60)
        d = dest.wait(30)
        running = guest.running
    finally:
        guest.close()
    return {
        "q": q, "d": d, "src": src, "dst": dst, "events": events, "running": running,
        "tracker": tracker,
    }  # fmt: skip


def _page(memory: mig.GuestMemory, page: int) -> bytes:
    return memory.read(page * memory.page_size, memory.page_size)


def _differs_only_at_missed(r: dict[str, Any]) -> None:
    src, dst = r["src"], r["dst"]
    assert r["tracker"].written is not None and _page(src, MISSED) == r["tracker"].written
    assert _page(dst, MISSED) != _page(src, MISSED)
    size = src.page_size
    assert np.array_equal(src.array[: MISSED * size], dst.array[: MISSED * size])
    assert np.array_equal(src.array[(MISSED + 1) * size :], dst.array[(MISSED + 1) * size :])


def test_strict_refuses_to_resume_and_the_source_runs_on() -> None:
    r = migrate("strict", missed=True)
    q, d = r["q"], r["d"]
    assert q["status"] == "failed" and "digest" in q["error-desc"], q.get("error-desc")
    assert not q["verified"] and q["verify"] == "strict"
    assert d["status"] == "failed" and not d["verified"], d
    assert r["running"], "the source guest must run again after the rollback"
    # Its memory is what the guest (the test) wrote, untouched by the migration.
    assert _page(r["src"], MISSED) == r["tracker"].written


def test_after_resume_completes_then_reports_the_mismatch_loudly() -> None:
    r = migrate("after-resume", missed=True)
    q, d = r["q"], r["d"]
    assert q["status"] == "completed", q.get("error-desc")
    assert d["status"] == "completed"  # the guest already runs there: detected, not prevented
    assert not q["verified"] and not d["verified"]
    assert "mismatch" in q["verify-error"] and "mismatch" in d["verify-error"]
    assert q["verify-time"] >= 0 and d["verify-time"] >= 0
    failed = [info for name, info in r["events"] if name == "verify-failed"]
    assert failed and "mismatch" in failed[0]["reason"]
    assert "digest" not in q["downtime-breakdown"]  # the source's digest is after the downtime
    _differs_only_at_missed(r)


def test_off_completes_and_the_copy_silently_differs() -> None:
    r = migrate("off", missed=True)
    q, d = r["q"], r["d"]
    assert q["status"] == "completed" and d["status"] == "completed"
    assert q["verify"] == "off" and d["verify"] == "off"
    assert not q["verified"] and not d["verified"]
    assert "verify-error" not in q and "verify-error" not in d
    assert not [name for name, _ in r["events"] if name == "verify-failed"]
    _differs_only_at_missed(r)  # shown, not caught


@pytest.mark.parametrize("mode", ["strict", "after-resume", "off"])
def test_every_mode_without_a_missed_page_is_byte_exact(mode: str) -> None:
    r = migrate(mode, missed=False)
    q, d = r["q"], r["d"]
    assert q["status"] == "completed" and d["status"] == "completed", q.get("error-desc")
    assert np.array_equal(r["src"].array, r["dst"].array)
    assert q["verify"] == d["verify"] == mode
    assert q["verified"] == d["verified"] == (mode != "off")
    if mode != "off":
        assert q["verify-time"] >= 0 and d["verify-time"] >= 0
    breakdown, plan = q["downtime-breakdown"], q["switchover-costs"]
    assert ("digest" in breakdown) == ("digest" in plan) == (mode == "strict")
    assert "dest-digest" in breakdown and "dest-digest" in plan
