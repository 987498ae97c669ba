"""``mig serve`` as a daemon: refused connections are logged, one line each,
naming the peer, and a failed or hostile session never poisons the next."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mig

MIB = 1 << 20
REFUSED = "refused a connection from"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _image(path: Path, size: int, seed: int) -> str:
    """A raw image of random bytes; returns the digest GuestMemory computes of it."""
    path.write_bytes(os.urandom(size) if seed < 0 else _seeded(size, seed))
    return format(mig.GuestMemory.from_image(str(path)).digest(), "032x")


def _seeded(size: int, seed: int) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _serve(port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mig.cli", "serve", "--listen", f"tcp:127.0.0.1:{port}"]
        + ["--json", "--devices", "none", *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _send(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mig.cli", "send", "--connect", f"tcp:127.0.0.1:{port}"]
        + ["--devices", "none", "--workload", "idle", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _connect(port: int) -> socket.socket:
    """A connection to the daemon, once it listens (a refused connect is no session)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _hostile(port: int, kind: str) -> str:
    """One hostile connection; returns its peer address as the daemon sees it."""
    s = _connect(port)
    peer = f"127.0.0.1:{s.getsockname()[1]}"
    try:
        if kind == "garbage":
            s.sendall(os.urandom(MIB))
        elif kind == "bad-header":  # the right magic, the rest wrong
            s.sendall(b"MIGS" + bytes(60))
        # "empty": connect and close at once
    except OSError:
        pass  # refused while we still wrote: that is the point
    finally:
        s.close()
    return peer


def _objects(text: str) -> list[dict[str, Any]]:
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
    return out


def test_garbage_then_a_real_send_gives_one_warning_and_a_verified_migration(
    tmp_path: Path,
) -> None:
    image = tmp_path / "guest.img"
    digest = _image(image, 64 * MIB, seed=11)
    port = _free_port()
    serve = _serve(port, "--once", "--size", "64MiB", "--timeout", "60s")
    try:
        peer = _hostile(port, "garbage")
        p = _send(port, "--image", str(image), "--size", "64MiB")
        out, err = serve.communicate(timeout=60)
    finally:
        serve.kill()
    assert p.returncode == 0, p.stderr
    assert serve.returncode == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "WARNING" in lines[0] and REFUSED in lines[0] and peer in lines[0], lines[0]
    dst = _objects(out)
    assert len(dst) == 1
    assert dst[0]["status"] == "completed" and dst[0]["verified"] is True
    assert dst[0]["memory-digest"] == digest


def test_ten_migrations_in_turn_with_hostile_connections_between(tmp_path: Path) -> None:
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    digests = [_image(images[0], 32 * MIB, seed=1), _image(images[1], 32 * MIB, seed=2)]
    port = _free_port()
    serve = _serve(port, "--size", "32MiB")
    hostile = ["garbage", "empty", "bad-header"]
    peers, expected, sends = [], [], []
    try:
        for i in range(10):
            peers.append(_hostile(port, hostile[i % 3]))
            if i % 4 == 1:
                # A session that fails (wrong size) before this one: no harm done.
                bad = _send(port, "--size", "16MiB")
                assert bad.returncode == 1, bad.stderr
                expected.append(None)
            p = _send(port, "--image", str(images[i % 2]))
            sends.append(p)
            expected.append(digests[i % 2])
            assert p.returncode == 0, p.stderr
        time.sleep(0.5)  # the last result printed
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=30)
    results = _objects(out)
    assert len(results) == len(expected)
    for got, want in zip(results, expected, strict=True):
        if want is None:
            assert got["status"] == "failed" and str(16 * MIB) in got["error-desc"], got
        else:
            assert got["status"] == "completed" and got["verified"] is True, got
            assert got["memory-digest"] == want  # fresh memory each time
    warnings = [line for line in err.splitlines() if REFUSED in line]
    assert len(warnings) == len(peers), err
    for line, peer in zip(warnings, peers, strict=True):
        assert "WARNING" in line and peer in line, line


def test_go_timeout_of_serve_discards_without_go(tmp_path: Path) -> None:
    from mig import faults
    from mig.source import MigrationSource

    port = _free_port()
    serve = _serve(port, "--once", "--size", "16MiB", "--go-timeout", "1s")
    memory = mig.GuestMemory(16 * MIB)
    try:
        with mig.WorkloadGuest(memory, vcpus=1, workload="idle") as guest:
            with faults.armed({"source.ready": lambda info: time.sleep(3)}):
                src = MigrationSource(guest, uri=f"tcp:127.0.0.1:{port}")
                q = src.run()
            assert guest.running  # rolled back: the destination never resumed
        out, err = serve.communicate(timeout=60)
    finally:
        serve.kill()
    assert q["status"] == "failed", q
    (dst,) = _objects(out)
    assert dst["status"] == "failed" and "no go from the source within 1.0 s" in dst["error-desc"]


def test_size_given_with_image_must_agree(tmp_path: Path) -> None:
    image = tmp_path / "guest.img"
    _image(image, 4 * MIB, seed=3)
    p = _send(_free_port(), "--image", str(image), "--size", "8MiB")
    assert p.returncode == 2
    assert "--size" in p.stderr and "disagrees with --image" in p.stderr, p.stderr
