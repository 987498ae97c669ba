"""Real ``mig serve --qmp`` / ``mig send --qmp`` processes and ``qemu.qmp`` clients on them."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

# A 64 MiB guest whose hot set a loopback link outruns, with a small NIC.
GUEST = ["--size", "64MiB", "--workload", "hotset:rate=20000"]
DEVICES = ["--devices", "nic:state=4MiB,rate=2MiB/s"]


class Process:
    """A ``mig`` subprocess serving QMP on a unix socket."""

    # Every process started, so a failed test leaves none behind (``kill_all``).
    started: list[Process] = []

    def __init__(self, qmp: Path, args: Sequence[str]) -> None:
        Process.started.append(self)
        self.qmp = qmp
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mig.cli", *args, "--qmp", f"unix:{qmp}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    async def client(self, name: str = "test", negotiate: bool = True) -> QMPClient:
        """A connected client; waits for the process to start serving."""
        deadline = time.monotonic() + 30
        while not self.qmp.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no QMP server: {self.finish(5)[1]}")
            await asyncio.sleep(0.05)
        while True:
            c = QMPClient(name)
            c.negotiate = negotiate
            try:
                await c.connect(str(self.qmp))
                return c
            except ConnectError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no QMP server: {self.finish(5)[1]}") from None
                await asyncio.sleep(0.1)

    def finish(self, timeout: float = 30) -> tuple[str, str]:
        """Wait for the exit (killing it after ``timeout``); returns (stdout, stderr)."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return out, err


def kill_all() -> None:
    """Kill what a test left running."""
    while Process.started:
        p = Process.started.pop()
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.communicate()


def serve(tmp: Path, *extra: str) -> Process:
    return Process(
        tmp / "dst.qmp", ["serve", "--incoming", "defer", "--size", "64MiB", *DEVICES, *extra]
    )


def send(tmp: Path, *extra: str) -> Process:
    return Process(tmp / "src.qmp", ["send", *GUEST, *DEVICES, *extra])


async def wait_event(client: QMPClient, name: str, timeout: float = 60, **data: Any) -> Any:
    """The next event ``name`` whose data has ``data``'s items."""
    async with asyncio.timeout(timeout):
        async for ev in client.events:
            if ev["event"] == name and all(ev.get("data", {}).get(k) == v for k, v in data.items()):
                return ev
    raise AssertionError("unreachable")


async def collect_until(client: QMPClient, status: str, timeout: float = 60) -> list[Any]:
    """Every event up to and including ``MIGRATION {status}``."""
    seen: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            async for ev in client.events:
                seen.append(ev)
                if ev["event"] == "MIGRATION" and ev["data"]["status"] == status:
                    return seen
                if ev["event"] == "MIGRATION" and ev["data"]["status"] in ("failed", "cancelled"):
                    raise AssertionError(f"migration ended {ev['data']['status']}: {seen}")
    except TimeoutError:
        names = [(e["event"], e.get("data")) for e in seen]
        raise AssertionError(f"no MIGRATION {status} within {timeout} s; events: {names}") from None
    raise AssertionError("unreachable")


async def answered_query(client: QMPClient, timeout: float = 30) -> Any:
    """``query-migrate`` once verification has its answer.

    With ``verify`` ``after-resume`` (the default) ``completed`` comes when
    the destination runs the guest; the source digests its frozen memory
    after that, and ``verified`` turns true only when the destination's
    answer arrives (``verify-time`` is then present).
    """
    async with asyncio.timeout(timeout):
        while True:
            q = await client.execute("query-migrate")
            if q.get("verify") != "after-resume" or "verify-time" in q or "verify-error" in q:
                return q
            await asyncio.sleep(0.05)


async def quit_all(*clients: QMPClient) -> None:
    """``quit`` each process; it closes the connection, as QEMU does."""
    for c in clients:
        await c.execute("quit")
        with contextlib.suppress(EOFError, ConnectionError):
            await c.disconnect()
