"""QEMU's ``pause-before-switchover``: the switchover waits, guest paused, in
status ``pre-switchover`` for ``migrate-continue``; a cancel there resumes the
source guest with its memory intact. Driven by the real ``qemu.qmp`` client
against ``mig serve --qmp`` / ``mig send --qmp`` processes, and through the API."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from migratekit import migrate_loopback
from qemu.qmp import ExecuteError, QMPClient
from qmpkit import answered_query, collect_until, kill_all, quit_all, send, serve, wait_event

import mig

WAIT = 0.3  # s the operator waits at pre-switchover before migrate-continue


@pytest.fixture(autouse=True)
def _no_process_left():
    yield
    kill_all()


async def _to_pre_switchover(src: QMPClient, dst: QMPClient, uri: str) -> list:
    """migrate-incoming, the two capabilities, migrate; the events up to pre-switchover."""
    await dst.execute("migrate-incoming", {"uri": uri})
    caps = [
        {"capability": "events", "state": True},
        {"capability": "pause-before-switchover", "state": True},
    ]
    await src.execute("migrate-set-capabilities", {"capabilities": caps})
    await dst.execute("migrate-set-capabilities", {"capabilities": caps[:1]})
    states = {c["capability"]: c["state"] for c in await src.execute("query-migrate-capabilities")}
    assert states["pause-before-switchover"] is True
    await src.execute("migrate", {"uri": uri})
    return await collect_until(src, "pre-switchover")


def test_migrate_continue_at_pre_switchover_completes_byte_exact(tmp_path: Path) -> None:
    dst_proc, src_proc = serve(tmp_path), send(tmp_path)

    async def drive() -> None:
        dst, src = await dst_proc.client("dst"), await src_proc.client("src")
        events = await _to_pre_switchover(src, dst, f"unix:{tmp_path}/mig.sock")
        assert (await src.execute("query-migrate"))["status"] == "pre-switchover"
        assert await src.execute("query-status") == {"status": "finish-migrate", "running": False}
        with pytest.raises(ExecuteError, match="Migration not in expected state: pre-switchover"):
            await src.execute("migrate-continue", {"state": "active"})
        with pytest.raises(ExecuteError, match="does not accept value 'sideways'"):
            await src.execute("migrate-continue", {"state": "sideways"})
        await asyncio.sleep(WAIT)  # nothing moves until the operator says so
        assert (await src.execute("query-migrate"))["status"] == "pre-switchover"
        assert (await dst.execute("query-migrate"))["status"] == "active"
        await src.execute("migrate-continue", {"state": "pre-switchover"})
        events += await collect_until(src, "completed")
        q = await answered_query(src)
        assert q["status"] == "completed" and q["verified"] is True, q

        statuses = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
        assert statuses == ["setup", "active", "pre-switchover", "device", "completed"]
        # The wait is downtime, as in QEMU, and has its own term.
        term = q["downtime-breakdown"]["pre-switchover"]
        assert term >= WAIT * 1000 and q["downtime"] >= term, q["downtime-breakdown"]
        with pytest.raises(ExecuteError, match="Migration not in expected state: completed"):
            await src.execute("migrate-continue", {"state": "pre-switchover"})

        ours = await src.execute("x-mig-query-digests")
        theirs = await dst.execute("query-migrate")
        assert theirs["status"] == "completed" and theirs["memory-digest"] == ours["memory"]
        mine = {d["name"]: d["state-digest"] for d in ours["devices"]}
        assert mine and mine == {d["name"]: d["state-digest"] for d in theirs["devices"]}
        await quit_all(src, dst)

    asyncio.run(drive())
    for proc in (src_proc, dst_proc):
        _, err = proc.finish()
        assert proc.proc.returncode == 0, err


def test_cancel_at_pre_switchover_resumes_the_source_guest_with_memory_intact(
    tmp_path: Path,
) -> None:
    # An idle guest: its memory changes only if the migration touched it.
    dst_proc, src_proc = serve(tmp_path), send(tmp_path, "--workload", "idle")

    async def drive() -> None:
        dst, src = await dst_proc.client("dst"), await src_proc.client("src")
        await _to_pre_switchover(src, dst, f"unix:{tmp_path}/mig.sock")
        before = await src.execute("x-mig-query-digests")  # the guest is paused here
        await src.execute("migrate_cancel")
        await wait_event(src, "MIGRATION", status="cancelled")
        await wait_event(src, "RESUME")  # the rollback runs the guest it paused
        q = await src.execute("query-migrate")
        assert q["status"] == "cancelled" and "migrate_cancel" in q["error-desc"], q
        assert await src.execute("query-status") == {"status": "running", "running": True}
        # The destination hears of the cancel over the control channel, on its
        # own time: its event, then its state.
        await wait_event(dst, "MIGRATION", status="cancelled")
        assert (await dst.execute("query-migrate"))["status"] == "cancelled"
        await src.execute("stop")
        after = await src.execute("x-mig-query-digests")
        assert after["memory"] == before["memory"]
        await quit_all(src, dst)

    asyncio.run(drive())
    for proc in (src_proc, dst_proc):
        _, err = proc.finish()
        assert proc.proc.returncode == 0, err


@pytest.mark.skipif(
    not mig.capabilities()["uffd"]["available"],
    reason=f"host lacks the uffd capability: {mig.capabilities()['uffd']['reason']}",
)
def test_the_api_waits_at_pre_switchover_for_migrate_continue() -> None:
    src, dst = mig.GuestMemory(8 << 20), mig.GuestMemory(8 << 20)
    src.array[:: src.page_size] = 9
    statuses: list[str] = []

    def before(source, _guest) -> None:
        with pytest.raises(RuntimeError, match="not in pre-switchover"):
            source.migrate_continue()

        def on_status(status: str) -> None:
            statuses.append(status)
            if status == "pre-switchover":  # continue from another thread, as an operator
                threading.Timer(WAIT, source.migrate_continue).start()

        source.on_status = on_status

    q, d, _ = migrate_loopback(src, dst, before=before, pause_before_switchover=True)
    assert q["status"] == "completed" and d["status"] == "completed", q.get("error-desc")
    assert statuses == ["setup", "active", "pre-switchover", "device", "completed"]
    assert q["downtime-breakdown"]["pre-switchover"] >= WAIT * 1000
    assert src.digest() == dst.digest()
