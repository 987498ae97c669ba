"""Test helpers for fault injection: a TCP proxy that can reset or stall one
channel of a session, a guest wrapper and a destination process that record
when each side runs, and counters of threads and file descriptors.

Run as a script (``python faultkit.py dest ...``) it is a destination process
that prints its events with ``time.monotonic()`` stamps (one system-wide
clock, comparable with the parent's), so a test can kill it at any moment and
still know whether it ever ran the guest.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mig

KIND_CONTROL, KIND_DATA = 0, 1
KIND_POSTCOPY = 3  # the post-copy page channels' stream header kind
_HEADER = 64  # docs/wire-format.md: the stream header every channel opens with
_BUF = 256 << 10


# --------------------------------------------------------------- resources
def resources() -> tuple[int, int, int]:
    """(open file descriptors, Python threads, OS threads) of this process,
    after a collection: earlier tests' garbage closes its fds at any time."""
    gc.collect()
    return (
        len(os.listdir("/proc/self/fd")),
        threading.active_count(),
        len(os.listdir("/proc/self/task")),
    )


def settle(baseline: tuple[int, int, int], timeout: float = 5.0) -> tuple[int, int, int]:
    """Wait (threads end asynchronously) until no count is above the baseline;
    returns the last counts."""
    deadline = time.monotonic() + timeout
    now = resources()
    while grew(now, baseline) and time.monotonic() < deadline:
        time.sleep(0.02)
        now = resources()
    return now


def grew(now: tuple[int, int, int], baseline: tuple[int, int, int]) -> list[str]:
    """The counts above the baseline: a leak. A count below it is a thread or
    fd of an earlier test that ended meanwhile, not this test's doing."""
    names = ("fds", "python threads", "os threads")
    return [f"{n} {b} -> {a}" for n, a, b in zip(names, now, baseline, strict=True) if a > b]


# --------------------------------------------------------------- run record
class RunLog:
    """Timestamped run/pause transitions of both sides."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[float, str, str]] = []

    def add(self, side: str, what: str, t: float | None = None) -> None:
        with self._lock:
            self.events.append((time.monotonic() if t is None else t, side, what))

    def overlaps(self) -> list[str]:
        """Moments when both sides ran; the source runs from the start."""
        running = {"source": True, "dest": False}
        bad = []
        for t, side, what in sorted(self.events):
            running[side] = what == "run"
            if all(running.values()):
                bad.append(f"both run at {t:.6f} ({side} {what})")
        return bad

    def runs(self, side: str) -> int:
        return sum(1 for _, s, w in self.events if s == side and w == "run")


class RecordingGuest:
    """A ``mig.Guest`` that logs every pause and resume of the wrapped guest.

    A pause is logged after the vCPUs park, a resume before they restart,
    so the logged paused interval lies within the real one.
    """

    def __init__(self, guest: Any, log: RunLog) -> None:
        self.guest = guest
        self.memory = guest.memory
        self.log = log

    def pause(self) -> float:
        spent = self.guest.pause()
        self.log.add("source", "pause")
        return spent

    def resume(self) -> None:
        self.log.add("source", "run")
        self.guest.resume()

    def set_throttle(self, pct: float) -> None:
        self.guest.set_throttle(pct)

    def stats(self) -> dict[str, Any]:
        return self.guest.stats()

    @property
    def running(self) -> bool:
        return bool(self.guest.running)


# -------------------------------------------------------------------- proxy
class _Conn:
    def __init__(self, kind: int, index: int, client: socket.socket, up: socket.socket) -> None:
        self.kind, self.index = kind, index
        self.socks = (client, up)
        self.gates = {"up": threading.Event(), "down": threading.Event()}
        for g in self.gates.values():
            g.set()
        self.stop = threading.Event()
        self.rst = False
        self.threads: list[threading.Thread] = []
        self._left = 2
        self._lock = threading.Lock()

    def pump_done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            for s in self.socks:
                if self.rst:  # an abortive close sends RST
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()


class FaultProxy:
    """Forwards one migration session (TCP) and resets, holds or stalls channels.

    ``reset(kind, index)`` closes both sides of one channel with RST and drops
    what it held; ``hold(kind)`` stops forwarding source-to-destination bytes
    (they wait in the proxy); ``stall()`` stops reading in both directions,
    so the peers' socket buffers fill: a peer that stops reading.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("tcp:").rsplit(":", 1)
        self.upstream = (host, int(port))
        self._lsock = socket.socket()
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUF)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self._lsock.settimeout(0.05)
        self.uri = f"tcp:127.0.0.1:{self._lsock.getsockname()[1]}"
        self.conns: list[_Conn] = []
        self._closed = threading.Event()
        self._accepter = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._open(client)
            except OSError:
                client.close()

    def _open(self, client: socket.socket) -> None:
        client.settimeout(5.0)
        head = b""
        while len(head) < _HEADER:
            part = client.recv(_HEADER - len(head))
            if not part:
                raise OSError("closed before the stream header")
            head += part
        up = socket.socket()
        up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUF)
        up.settimeout(5.0)
        try:
            up.connect(self.upstream)
            up.sendall(head)
        except OSError:
            up.close()
            raise
        for s in (client, up):
            s.setblocking(False)
        kind, index = head[6], struct.unpack_from("<H", head, 24)[0]
        conn = _Conn(kind, index, client, up)
        for name, src, dst in (("up", client, up), ("down", up, client)):
            t = threading.Thread(
                target=self._pump, args=(conn, src, dst, conn.gates[name]), daemon=True
            )
            conn.threads.append(t)
        self.conns.append(conn)
        for t in conn.threads:
            t.start()

    @staticmethod
    def _pump(conn: _Conn, src: socket.socket, dst: socket.socket, gate: threading.Event) -> None:
        buf = memoryview(bytearray(_BUF))
        try:
            while not conn.stop.is_set():
                if not gate.wait(0.05):
                    continue
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                n = src.recv_into(buf)
                if n == 0:
                    dst.shutdown(socket.SHUT_WR)
                    return
                view = buf[:n]
                while view and not conn.stop.is_set():
                    if gate.wait(0.05) and select.select([], [dst], [], 0.05)[1]:
                        view = view[dst.send(view) :]
        except OSError:
            conn.rst = True  # pass a reset on to the other side
            conn.stop.set()
        finally:
            conn.pump_done()

    def _match(self, kind: int | None, index: int | None) -> list[_Conn]:
        return [
            c
            for c in self.conns
            if (kind is None or c.kind == kind) and (index is None or c.index == index)
        ]

    def reset(self, kind: int = KIND_DATA, index: int = 0) -> None:
        conns = self._match(kind, index)
        if not conns:
            raise RuntimeError(f"no channel of kind {kind} index {index} to reset")
        for c in conns:
            c.rst = True
            c.stop.set()
        for c in conns:
            for t in c.threads:
                t.join()

    def hold(self, kind: int | None = None, index: int | None = None) -> None:
        for c in self._match(kind, index):
            c.gates["up"].clear()

    def stall(self) -> None:
        for c in self.conns:
            for g in c.gates.values():
                g.clear()

    def close(self) -> None:
        self._closed.set()
        self._accepter.join()
        self._lsock.close()
        for c in self.conns:
            c.stop.set()
        for c in self.conns:
            for t in c.threads:
                t.join()


# -------------------------------------------------------- destination process
def recover_both(source: Any, dest: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both sides in ``postcopy-paused``: the destination accepts again, the
    source reconnects (QEMU's order: migrate-recover, then migrate with
    resume); returns both final queries."""
    dest.recover()
    source.recover()
    return source.wait(90), dest.wait(30)


class DestProcess:
    """A destination in its own process (``python faultkit.py dest``)."""

    def __init__(self, size: int, devices: str, log: RunLog, **timeouts: float) -> None:
        args = [sys.executable, str(Path(__file__).resolve()), "dest"]
        args += ["--size", str(size), "--devices", devices]
        for key, value in timeouts.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self.log = log
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        line = self.proc.stdout.readline().decode()  # type: ignore[union-attr]
        if not line.startswith("uri "):
            self.proc.kill()
            _, err = self.proc.communicate()
            raise RuntimeError(f"destination process did not start: {line!r} {err.decode()}")
        self.uri = line.split()[1]
        self.result: dict[str, Any] = {}
        self.killed = False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.killed = True

    def stop(self) -> None:
        os.kill(self.proc.pid, 19)  # SIGSTOP: frozen, nothing read or run

    def wait(self, timeout: float = 30.0) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        for line in out.decode().splitlines():
            word, _, rest = line.partition(" ")
            if word == "run":
                self.log.add("dest", "run", float(rest))
            elif word == "result":
                self.result = json.loads(rest)
        self.result.setdefault("stderr", err.decode())
        return self.result


def _dest_main(argv: list[str]) -> int:
    from mig.destination import MigrationDestination
    from mig.devices import create_all

    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--devices", default="none")
    p.add_argument("--io-timeout", type=float, default=60.0)
    p.add_argument("--idle-timeout", type=float, default=30.0)
    p.add_argument("--accept-timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    memory = mig.GuestMemory(a.size)
    devices = [] if a.devices == "none" else create_all(a.devices, memory, active=False)
    seen: dict[str, Any] = {}

    def on_resume() -> None:
        seen["memory-digest"] = format(memory.digest(), "032x")
        seen["device-digests"] = [format(d.state_digest(), "032x") for d in devices]
        print(f"run {time.monotonic():.9f}", flush=True)

    dest = MigrationDestination(
        "tcp:127.0.0.1:0",
        memory,
        devices,
        accept_timeout=a.accept_timeout,
        idle_timeout=a.idle_timeout,
        io_timeout=a.io_timeout,
        on_resume=on_resume,
    )
    print(f"uri {dest.uri}", flush=True)
    q = dest.run()
    print("result " + json.dumps({**q, **seen}), flush=True)
    for d in devices:
        d.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["dest"]:
        sys.exit("usage: faultkit.py dest --size N [--devices SPEC] [--*-timeout S]")
    sys.exit(_dest_main(sys.argv[2:]))
