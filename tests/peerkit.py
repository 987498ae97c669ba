"""Real ``mig serve`` / ``mig send`` processes on loopback TCP, for tests that
freeze or kill one side, and guests whose memory a test compares byte for byte."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import mig

MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mig_process(*args: str) -> subprocess.Popen[str]:
    """``python -m mig.cli ARGS`` with its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "mig.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def serve(port: int, size: str, *extra: str) -> subprocess.Popen[str]:
    return mig_process(
        "serve", "--listen", f"tcp:127.0.0.1:{port}", "--json", "--devices", "none",
        "--size", size, *extra,
    )  # fmt: skip


def send(port: int, size: str, *extra: str) -> subprocess.Popen[str]:
    return mig_process(
        "send", "--connect", f"tcp:127.0.0.1:{port}", "--json", "--devices", "none",
        "--workload", "idle", "--size", size, *extra,
    )  # fmt: skip


def filled_guest(size: int, seed: int) -> tuple[mig.GuestMemory, Any, np.ndarray]:
    """An idle one-vCPU guest over random memory, and a copy of that memory."""
    memory = mig.GuestMemory(size)
    memory.array[:] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    return memory, mig.WorkloadGuest(memory, vcpus=1, workload="idle"), memory.array.copy()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def kill(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Kill ``proc`` (stopped or not); returns its (stdout, stderr)."""
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=30)


class Output:
    """Reads a process's stream on a thread: its lines, and the JSON objects in them."""

    def __init__(self, stream: Any) -> None:
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._lock:
                self.text += line

    def has(self, needle: str) -> bool:
        with self._lock:
            return needle in self.text

    def objects(self) -> list[dict[str, Any]]:
        """Every whole JSON object so far (``--json`` prints one per migration)."""
        with self._lock:
            text = self.text
        decoder, out, i = json.JSONDecoder(), [], 0
        while i < len(text):
            if text[i].isspace():
                i += 1
                continue
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                break  # the rest is still being written
            out.append(obj)
        return out


def fail_mid_precopy(
    source: Any, at_bytes: int, fault: Callable[[], None], timeout: float = 30.0
) -> tuple[dict[str, Any], float]:
    """Start ``source``, run ``fault()`` once ``at_bytes`` of RAM went out, wait
    for the end; returns ``query()`` and the seconds from the fault to the end."""
    source.start()
    wait_for(
        lambda: int(source.query().get("ram", {}).get("transferred", 0)) >= at_bytes,
        "the precopy under way",
    )
    fault()
    t0 = time.monotonic()
    q = source.wait(timeout)
    return q, time.monotonic() - t0
