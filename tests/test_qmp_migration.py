"""Whole migrations driven through QMP by the real ``qemu.qmp`` client, as a
management script drives QEMU: ``mig serve --qmp`` and ``mig send --qmp`` processes."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError
from qmpkit import (
    DEVICES,
    GUEST,
    Process,
    answered_query,
    collect_until,
    kill_all,
    quit_all,
    send,
    serve,
    wait_event,
)
from tlskit import Authority

_ENDED = ("completed", "failed", "cancelled")


@pytest.fixture(autouse=True)
def _no_process_left():
    yield
    kill_all()


def _same_devices(ours: dict, theirs: dict) -> bool:
    mine = {d["name"]: d["state-digest"] for d in ours["devices"]}
    return bool(mine) and mine == {d["name"]: d["state-digest"] for d in theirs["devices"]}


def test_migration_driven_by_qmp_completes_verified_and_byte_exact(tmp_path: Path) -> None:
    dst_proc, src_proc = serve(tmp_path), send(tmp_path)

    async def drive() -> None:
        dst = await dst_proc.client("dst")
        src = await src_proc.client("src")
        assert await src.execute("query-status") == {"status": "running", "running": True}
        assert await dst.execute("query-status") == {"status": "inmigrate", "running": False}
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/mig.sock"})
        await src.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "events", "state": True},
                    {"capability": "multifd", "state": True},
                ]
            },
        )
        await src.execute(
            "migrate-set-parameters",
            {"downtime-limit": 500, "multifd-channels": 3, "x-mig-policy": "stop-exact-resume"},
        )
        params = await src.execute("query-migrate-parameters")
        assert (params["downtime-limit"], params["multifd-channels"]) == (500, 3)
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/mig.sock"})
        events = await collect_until(src, "completed")
        q = await answered_query(src)
        assert q["status"] == "completed" and q["verified"] is True, q
        assert q["policy"] == "stop-exact-resume"
        assert q["ram"]["total"] == 64 << 20

        statuses = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
        assert statuses == ["setup", "active", "device", "completed"], statuses
        passes = [e["data"]["pass"] for e in events if e["event"] == "MIGRATION_PASS"]
        # One per dirty sync, the setup's first one included, as in QEMU.
        assert passes == list(range(1, q["ram"]["dirty-sync-count"] + 1))
        assert passes[1:] == [p["number"] for p in q["passes"]]
        names = [e["event"] for e in events]
        assert names.count("STOP") == q["guest-stops"] + 1  # exact-size stops + the switchover
        assert names.count("RESUME") == q["guest-stops"]
        assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in events)

        # Byte for byte: the stopped source's digests equal what the destination loaded.
        assert await src.execute("query-status") == {"status": "postmigrate", "running": False}
        ours = await src.execute("x-mig-query-digests")
        theirs = await dst.execute("query-migrate")
        assert theirs["status"] == "completed" and theirs["verified"] is True
        assert theirs["memory-digest"] == ours["memory"]
        assert _same_devices(ours, theirs)  # the NIC's state too
        assert await dst.execute("query-status") == {"status": "running", "running": True}
        await quit_all(src, dst)

    asyncio.run(drive())
    for proc in (src_proc, dst_proc):
        out, err = proc.finish()
        assert proc.proc.returncode == 0, err


def test_migrate_cancel_ends_cancelled_with_the_guest_running_then_a_new_migration_completes(
    tmp_path: Path,
) -> None:
    dst_proc = serve(tmp_path)
    # 8 MiB/s for 64 MiB: the migration is still active when the cancel comes.
    src_proc = send(tmp_path, "--max-bandwidth", "8MiB/s")

    async def drive() -> None:
        dst = await dst_proc.client("dst")
        src = await src_proc.client("src")
        for c in (src, dst):
            await c.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "events", "state": True}]},
            )
        uri = f"unix:{tmp_path}/mig.sock"
        await dst.execute("migrate-incoming", {"uri": uri})
        await src.execute("migrate", {"uri": uri})
        await wait_event(src, "MIGRATION", status="active")
        await src.execute("migrate_cancel")
        await wait_event(src, "MIGRATION", status="cancelled")
        await wait_event(dst, "MIGRATION", status="cancelled")
        q = await src.execute("query-migrate")
        assert q["status"] == "cancelled" and "migrate_cancel" in q["error-desc"], q
        assert await src.execute("query-status") == {"status": "running", "running": True}
        assert (await dst.execute("query-migrate"))["status"] == "cancelled"

        # The same two processes migrate again, the destination into fresh memory.
        await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await dst.execute("migrate-incoming", {"uri": uri})
        await src.execute("migrate", {"uri": uri})
        await collect_until(src, "completed")
        await answered_query(src)
        ours = await src.execute("x-mig-query-digests")
        theirs = await dst.execute("query-migrate")
        assert theirs["verified"] is True and theirs["memory-digest"] == ours["memory"]
        assert _same_devices(ours, theirs)  # fresh devices loaded the whole state again
        await quit_all(src, dst)

    asyncio.run(drive())
    for proc in (src_proc, dst_proc):
        out, err = proc.finish()
        assert proc.proc.returncode == 0, err


def test_errors_carry_qemus_classes(tmp_path: Path) -> None:
    src_proc = send(tmp_path)

    async def drive() -> None:
        raw = await src_proc.client("raw", negotiate=False)
        with pytest.raises(ExecuteError) as e:
            await raw.execute("query-status")
        assert e.value.error_class == "CommandNotFound"
        assert "qmp_capabilities" in e.value.error.error.desc
        await raw.disconnect()

        src = await src_proc.client("src")
        with pytest.raises(ExecuteError) as e:
            await src.execute("migrate-postcopy-of-my-dreams")
        assert e.value.error_class == "CommandNotFound"
        with pytest.raises(ExecuteError) as e:
            await src.execute("migrate", {"uri": 4444})
        assert e.value.error_class == "GenericError"
        assert e.value.error.error.desc == "Invalid parameter type for 'uri', expected: string"
        with pytest.raises(ExecuteError) as e:
            await src.execute("migrate-set-parameters", {"downtime-limit": "fast"})
        assert e.value.error_class == "GenericError"
        with pytest.raises(ExecuteError) as e:
            await src.execute("migrate-set-parameters", {"warp-factor": 9})
        assert e.value.error.error.desc == "Parameter 'warp-factor' is unexpected"
        with pytest.raises(ExecuteError) as e:
            await src.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-colo", "state": True}]},
            )
        assert e.value.error_class == "GenericError"
        # Nothing changed, and a migrate to nowhere fails without harm.
        assert (await src.execute("query-migrate-parameters"))["downtime-limit"] == 300
        await src.execute("migrate-set-parameters", {"x-mig-connect-timeout": 1.0})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/nobody-listens"})
        async with asyncio.timeout(30):
            while (await src.execute("query-migrate"))["status"] != "failed":
                await asyncio.sleep(0.1)
        assert await src.execute("query-status") == {"status": "running", "running": True}
        await quit_all(src)

    asyncio.run(drive())
    out, err = src_proc.finish()
    assert src_proc.proc.returncode == 0, err


def test_two_clients_one_disconnecting_mid_migration(tmp_path: Path) -> None:
    dst_proc, src_proc = serve(tmp_path), send(tmp_path, "--max-bandwidth", "64MiB/s")

    async def drive() -> None:
        dst = await dst_proc.client("dst")
        a = await src_proc.client("a")
        b = await src_proc.client("b")
        await a.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )
        uri = f"unix:{tmp_path}/mig.sock"
        await dst.execute("migrate-incoming", {"uri": uri})
        await b.execute("migrate", {"uri": uri})
        await wait_event(b, "MIGRATION_PASS", **{"pass": 1})
        await b.disconnect()  # mid-migration: pass 1 is the setup's sync
        events = await collect_until(a, "completed")
        passes = [e["data"]["pass"] for e in events if e["event"] == "MIGRATION_PASS"]
        assert len(passes) >= 2 and passes == list(range(1, len(passes) + 1))
        c = await src_proc.client("c")
        q = await answered_query(c)
        assert q["status"] == "completed" and q["verified"] is True
        ours = await c.execute("x-mig-query-digests")
        theirs = await dst.execute("query-migrate")
        assert theirs["memory-digest"] == ours["memory"] and _same_devices(ours, theirs)
        await c.disconnect()
        await quit_all(a, dst)

    asyncio.run(drive())
    for proc in (src_proc, dst_proc):
        out, err = proc.finish()
        assert proc.proc.returncode == 0, err


def test_tls_creds_directories_and_a_refused_plaintext_peer(tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    for side, identity in (("client", ca.issue("src")), ("server", ca.issue("dest"))):
        d = tmp_path / side
        d.mkdir()
        shutil.copy(identity.ca, d / "ca-cert.pem")
        shutil.copy(identity.cert, d / f"{side}-cert.pem")
        shutil.copy(identity.key, d / f"{side}-key.pem")
    dst_proc, src_proc = serve(tmp_path), send(tmp_path)
    mig_sock = tmp_path / "mig.sock"

    async def drive() -> None:
        dst = await dst_proc.client("dst")
        src = await src_proc.client("src")
        await dst.execute("migrate-set-parameters", {"tls-creds": str(tmp_path / "server")})
        await src.execute("migrate-set-parameters", {"tls-creds": str(tmp_path / "client")})
        await dst.execute("migrate-incoming", {"uri": f"unix:{mig_sock}"})
        with socket.socket(socket.AF_UNIX) as plain:  # no TLS: refused, logged
            plain.connect(str(mig_sock))
            plain.sendall(b"MIGS" + bytes(60))
            plain.recv(1)
        await src.execute("migrate", {"uri": f"unix:{mig_sock}"})
        async with asyncio.timeout(60):
            while (q := await src.execute("query-migrate"))["status"] not in _ENDED:
                await asyncio.sleep(0.1)
        q = await answered_query(src)
        assert q["status"] == "completed" and q["verified"] is True, q
        ours = await src.execute("x-mig-query-digests")
        theirs = await dst.execute("query-migrate")
        assert theirs["memory-digest"] == ours["memory"] and _same_devices(ours, theirs)
        await quit_all(src, dst)

    asyncio.run(drive())
    out, err = dst_proc.finish()
    refused = [line for line in err.splitlines() if "refused a connection" in line]
    assert len(refused) == 1 and "TLS handshake" in refused[0], err
    assert str(mig_sock) in refused[0]  # names the peer as far as a unix socket can
    src_proc.finish()


def test_serve_with_listen_rearms_after_each_migration(tmp_path: Path) -> None:
    mig_sock = tmp_path / "mig.sock"
    dst_proc = Process(
        tmp_path / "dst.qmp",
        ["serve", "--listen", f"unix:{mig_sock}", "--size", "64MiB", *DEVICES, "--json"],
    )

    async def drive() -> None:
        dst = await dst_proc.client("dst")
        await dst.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
        )
        for _ in range(2):
            sender = subprocess.run(
                [sys.executable, "-m", "mig.cli", "send", "--connect", f"unix:{mig_sock}"]
                + [*GUEST, *DEVICES, "--json"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert sender.returncode == 0, sender.stderr
            assert json.loads(sender.stdout)["verified"] is True
            await wait_event(dst, "MIGRATION", status="completed")
        await quit_all(dst)

    asyncio.run(drive())
    out, err = dst_proc.finish()
    assert dst_proc.proc.returncode == 0, err
    decoder, results, i = json.JSONDecoder(), [], 0
    while out[i:].strip():
        obj, i = decoder.raw_decode(out, len(out) - len(out[i:].lstrip()))
        results.append(obj)
    assert [(r["status"], r["verified"]) for r in results] == [("completed", True)] * 2
    assert results[0]["memory-digest"] != results[1]["memory-digest"]  # two guests' memory
    assert err.count("mig: listening on") == 3  # re-armed on the same socket after each
