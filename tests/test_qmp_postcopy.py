"""QEMU's post-copy commands through the real ``qemu.qmp`` client against
``mig serve --qmp`` / ``mig send --qmp`` processes: ``migrate-start-postcopy``
(refused without the ``postcopy-ram`` capability or a migration, then a
pre-copy that would go on for many passes switched to post-copy on request)
and the recovery of a post-copy whose page channels reset
(``migrate-recover``, ``migrate`` with ``resume``), each ending byte-exact."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from faultkit import KIND_POSTCOPY, FaultProxy
from postcopykit import needs_postcopy
from qemu.qmp import ExecuteError
from qmpkit import (
    Process,
    answered_query,
    collect_until,
    kill_all,
    quit_all,
    send,
    serve,
    wait_event,
)

pytestmark = needs_postcopy


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_migrate_recover_and_migrate_resume_after_a_reset_mid_postcopy(tmp_path: Path) -> None:
    """QEMU's recovery through QMP: the page channels reset through the fault
    proxy, both sides report ``postcopy-paused``, the destination's
    ``migrate-recover`` and the source's ``migrate`` with ``resume`` go on,
    and the migration ends byte-exact."""
    small = ["--size", "32MiB", "--devices", "none"]
    dst_proc = Process(tmp_path / "dst.qmp", ["serve", "--incoming", "defer", *small])
    src_proc = Process(
        tmp_path / "src.qmp",
        ["send", *small, "--workload", "sequential:wss=8MiB,rate=200000"],
    )
    listen = f"tcp:127.0.0.1:{_free_port()}"
    proxy: FaultProxy | None = None

    async def drive() -> None:
        nonlocal proxy
        dst, src = await dst_proc.client("dst"), await src_proc.client("src")
        caps = [
            {"capability": "events", "state": True},
            {"capability": "postcopy-ram", "state": True},
        ]
        await src.execute("migrate-set-capabilities", {"capabilities": caps})
        await dst.execute("migrate-set-capabilities", {"capabilities": caps[:1]})
        # 8 MiB owed at 2 MiB/s: post-copy lasts long enough to be cut.
        await src.execute("migrate-set-parameters", {"max-bandwidth": 2 << 20})
        await dst.execute("migrate-incoming", {"uri": listen})
        proxy = FaultProxy(listen)
        with pytest.raises(ExecuteError, match="no paused migration"):
            await src.execute("migrate", {"uri": proxy.uri, "resume": True})
        await src.execute("migrate", {"uri": proxy.uri})
        await collect_until(src, "postcopy-active")
        with pytest.raises(ExecuteError, match="only be run when postcopy is paused"):
            await dst.execute("migrate-recover", {"uri": listen})
        await asyncio.sleep(0.3)
        proxy.reset(KIND_POSTCOPY, 0)
        proxy.reset(KIND_POSTCOPY, 1)
        await wait_event(src, "MIGRATION", status="postcopy-paused")
        await wait_event(dst, "MIGRATION", status="postcopy-paused")
        paused = await dst.execute("query-migrate")
        assert paused["status"] == "postcopy-paused", paused
        assert paused["postcopy"]["missing-pages"], "nothing was left to fetch"
        assert (await dst.execute("query-status"))["running"] is True  # the guest runs there
        with pytest.raises(ExecuteError, match="listener of migrate-incoming"):
            await dst.execute("migrate-recover", {"uri": "tcp:127.0.0.1:1"})
        await dst.execute("migrate-recover", {"uri": listen})
        await src.execute("migrate", {"uri": proxy.uri, "resume": True})
        await collect_until(src, "completed")
        q = await answered_query(src)
        assert q["status"] == "completed" and q["verified"] is True, q
        assert q["postcopy"]["recoveries"] == 1, q["postcopy"]
        await wait_event(dst, "MIGRATION", status="completed")
        ours = await src.execute("x-mig-query-digests")
        theirs = await dst.execute("query-migrate")
        assert theirs["status"] == "completed" and theirs["postcopy"]["recoveries"] == 1
        assert theirs["memory-digest"] == ours["memory"]
        await quit_all(src, dst)

    try:
        asyncio.run(drive())
    finally:
        if proxy is not None:
            proxy.close()
    for proc in (src_proc, dst_proc):
        _, err = proc.finish()
        assert proc.proc.returncode == 0, err
