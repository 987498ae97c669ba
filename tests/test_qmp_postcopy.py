"""QEMU's ``migrate-start-postcopy`` through the real ``qemu.qmp`` client against
``mig serve --qmp`` / ``mig send --qmp`` processes: refused without the
``postcopy-ram`` capability or a migration, then a pre-copy that would go on
for many passes switched to post-copy on request, ending byte-exact."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError
from qmpkit import answered_query, collect_until, kill_all, quit_all, send, serve, wait_event

import mig

POSTCOPY = mig.capabilities()["postcopy"]
pytestmark = pytest.mark.skipif(
    not POSTCOPY["available"],
    reason=f"host lacks userfaultfd MISSING mode: {POSTCOPY.get('reason')}",
)


@pytest.fixture(autouse=True)
def _no_process_left():
    yield
    kill_all()


def test_migrate_start_postcopy_switches_a_running_precopy_and_ends_byte_exact(
    tmp_path: Path,
) -> None:
    dst_proc, src_proc = serve(tmp_path), send(tmp_path)

    async def drive() -> None:
        dst, src = await dst_proc.client("dst"), await src_proc.client("src")
        with pytest.raises(ExecuteError, match="Enable postcopy with migrate_set_capability"):
            await src.execute("migrate-start-postcopy")
        caps = [
            {"capability": "events", "state": True},
            {"capability": "postcopy-ram", "state": True},
        ]
        await src.execute("migrate-set-capabilities", {"capabilities": caps})
        with pytest.raises(ExecuteError, match="after migration has been started"):
            await src.execute("migrate-start-postcopy")
        # A pre-copy that the policy alone would not leave for post-copy: a
        # slow link and a switch only after a million passes.
        await src.execute(
            "migrate-set-parameters",
            {"max-bandwidth": 8 << 20, "x-mig-postcopy-after-passes": 1_000_000},
        )
        uri = f"unix:{tmp_path}/mig.sock"
        await dst.execute("migrate-incoming", {"uri": uri})
        await dst.execute("migrate-set-capabilities", {"capabilities": caps[:1]})
        await src.execute("migrate", {"uri": uri})
        events = await collect_until(src, "active")
        await src.execute("migrate-start-postcopy")
        events += await collect_until(src, "completed")
        q = await answered_query(src)
        assert q["status"] == "completed" and q["verified"] is True, q
        statuses = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
        assert "postcopy-active" in statuses and statuses[-1] == "completed", statuses
        assert q["postcopy-requests"] >= 0 and "postcopy" in q, q

        await wait_event(dst, "MIGRATION", status="completed")
        ours = await src.execute("x-mig-query-digests")
        theirs = await dst.execute("query-migrate")
        assert theirs["status"] == "completed" and theirs["memory-digest"] == ours["memory"]
        await quit_all(src, dst)

    asyncio.run(drive())
    for proc in (src_proc, dst_proc):
        _, err = proc.finish()
        assert proc.proc.returncode == 0, err
