"""Stall detection (``stall_timeout``): a precopy that makes no progress fails
within about ``stall_timeout``, naming what stalled, long before ``io_timeout``;
the source guest runs on with its memory intact, and a destination daemon
whose source froze ends that migration and serves the next."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from faultkit import KIND_DATA, FaultProxy
from peerkit import (
    MIB,
    Output,
    fail_mid_precopy,
    filled_guest,
    free_port,
    kill,
    send,
    serve,
    wait_for,
)

import mig
from mig.destination import MigrationDestination
from mig.source import MigrationSource

pytestmark = pytest.mark.skipif(
    not mig.capabilities()["uffd"]["available"],
    reason=f"host lacks the uffd capability: {mig.capabilities()['uffd']['reason']}",
)

SIZE = 32 * MIB
STALL = 2.0
# Far above STALL: a stall found only by a write timing out would fail the bounds.
IO_TIMEOUT = 60.0


def _source(guest: object, uri: str, **params: object) -> MigrationSource:
    return MigrationSource(
        guest, uri=uri, stall_timeout=STALL, io_timeout=IO_TIMEOUT, multifd_channels=2, **params
    )


def _failed_with(q: dict, what: str) -> None:
    """Failed, the reason naming the pass and what stalled (``what``, a regex)."""
    assert q["status"] == "failed", q
    assert re.search(rf"precopy stalled during pass \d+: {what}", q["error-desc"]), q["error-desc"]


def test_a_frozen_destination_fails_the_precopy_within_the_stall_timeout() -> None:
    """A SIGSTOPped ``mig serve``: its heartbeats stop, at 4 MiB/s the socket
    buffers take seconds to fill, and the precopy fails after STALL anyway."""
    port = free_port()
    dest = serve(port, "32MiB", "--once")
    memory, guest, expected = filled_guest(SIZE, seed=3)
    source = _source(guest, f"tcp:127.0.0.1:{port}", max_bandwidth=4 * MIB)
    try:
        q, elapsed = fail_mid_precopy(source, 4 * MIB, lambda: os.kill(dest.pid, signal.SIGSTOP))
        peer = re.escape(f"destination 127.0.0.1:{port}")
        _failed_with(
            q, rf"(no bytes acknowledged by the {peer} for 2 s|the {peer} stopped reading)"
        )
        # The last heartbeat came at most one interval before the stop.
        assert STALL - 1.0 <= elapsed <= STALL + 3.0, (elapsed, q["error-desc"])
        assert guest.running
        assert np.array_equal(memory.array, expected), "source memory changed"
    finally:
        if dest.poll() is None:
            os.kill(dest.pid, signal.SIGCONT)
        kill(dest)
        guest.close()


def test_a_destination_that_stops_reading_is_named_and_the_guest_runs_on() -> None:
    """The data channels stop being read (a proxy holds them) while the
    control channel still carries the destination's heartbeats."""
    memory, guest, expected = filled_guest(SIZE, seed=4)
    dst = mig.GuestMemory(SIZE)
    dest = MigrationDestination("tcp:127.0.0.1:0", dst, idle_timeout=30, io_timeout=IO_TIMEOUT)
    proxy = FaultProxy(str(dest.uri))
    source = _source(guest, proxy.uri, max_bandwidth=6 * MIB)  # a first pass of ~5 s
    try:
        dest.start()
        q, elapsed = fail_mid_precopy(source, 4 * MIB, lambda: proxy.hold(KIND_DATA))
        d = dest.wait(30)
        running = guest.running
    finally:
        proxy.close()
        guest.close()
    peer = re.escape(f"destination 127.0.0.1:{proxy.uri.rsplit(':', 1)[1]}")
    _failed_with(q, rf"the {peer} stopped reading \(data-channel writes blocked for [0-9.]+ s")
    assert elapsed <= STALL + 3.0, (elapsed, q["error-desc"])
    assert d["status"] == "failed" and "stalled" in d["error-desc"], d
    assert running, "the source guest does not run"
    assert np.array_equal(memory.array, expected), "source memory changed"


def _slow_send(tmp_path: Path, port: int) -> tuple[subprocess.Popen[str], Output]:
    """``mig send`` of random pages at 4 MiB/s (a first pass of 8 s) with
    stall-timeout 2 s, once a second of it is on the wire; and its stderr."""
    image = tmp_path / "guest.img"  # random pages: none goes out as a cheap zero page
    image.write_bytes(os.urandom(SIZE))
    proc = send(
        port, "32MiB", "--image", str(image), "--max-bandwidth", "4MiB/s",
        "--stall-timeout", "2s", "--log-level", "info",
    )  # fmt: skip
    progress = Output(proc.stderr)
    wait_for(lambda: progress.has(": active"), "the source's precopy", timeout=60)
    time.sleep(1.0)
    return proc, progress


def test_a_frozen_source_ends_the_incoming_migration_and_the_daemon_serves_the_next(
    tmp_path: Path,
) -> None:
    port = free_port()
    daemon = serve(port, "32MiB")
    results = Output(daemon.stdout)
    first, _ = _slow_send(tmp_path, port)
    try:
        os.kill(first.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: len(results.objects()) >= 1, "the daemon's first result", timeout=30)
        elapsed = time.monotonic() - stopped
        failed = results.objects()[0]
        _failed_with(failed, r"the source 127\.0\.0\.1:\d+ sent nothing for 2 s \(stall-timeout\)")
        assert elapsed <= STALL + 3.0, (elapsed, failed["error-desc"])
        kill(first)

        # The daemon serves the next migration, into fresh memory.
        second = send(port, "32MiB")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        wait_for(lambda: len(results.objects()) >= 2, "the daemon's second result", timeout=30)
        done = results.objects()[1]
        assert done["status"] == "completed" and done["verified"] is True, done
        assert daemon.poll() is None, "the daemon exited"
    finally:
        if first.poll() is None:
            kill(first)
        kill(daemon)


def test_mig_send_to_a_frozen_destination_fails_within_the_stall_timeout(tmp_path: Path) -> None:
    port = free_port()
    dest = serve(port, "32MiB", "--once")
    source, progress = _slow_send(tmp_path, port)
    try:
        os.kill(dest.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        source.wait(timeout=IO_TIMEOUT / 2)
        elapsed = time.monotonic() - stopped
        out = source.stdout.read()  # type: ignore[union-attr]
    finally:
        if source.poll() is None:
            kill(source)
        os.kill(dest.pid, signal.SIGCONT)
        kill(dest)
    assert source.returncode == 1, progress.text
    q = json.loads(out)
    peer = re.escape(f"destination 127.0.0.1:{port}")
    _failed_with(q, rf"(no bytes acknowledged by the {peer} for 2 s|the {peer} stopped reading)")
    assert elapsed <= STALL + 4.0, (elapsed, q["error-desc"])
    wait_for(lambda: "source guest resumed: running" in progress.text, "the rollback report", 10)
