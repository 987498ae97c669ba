"""Failure reasons an operator can read: what the peer did, its address, the
phase, and the plain cause, instead of the socket's own error text."""

from __future__ import annotations

import errno
import os
import re
import signal
import time

import numpy as np
import pytest
from peerkit import MIB, fail_mid_precopy, filled_guest, free_port, kill, send, serve, wait_for

import mig
from mig import ProtocolError
from mig.destination import MigrationDestination
from mig.failure_reason import describe, peer_name
from mig.source import MigrationSource

SIZE = 32 * MIB
PEER = "destination 127.0.0.1:4444"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            OSError(errno.ECONNRESET, "channel 1, packet 7: send packet: Connection reset by peer"),
            f"{PEER} closed the connection during pass 3 (connection reset on data channel 1)",
        ),
        (
            OSError(errno.EPIPE, "channel 0, packet 2: send packet: Broken pipe (os error 32)"),
            f"{PEER} closed the connection during pass 3 (broken pipe on data channel 0)",
        ),
        (
            OSError(errno.EBADMSG, "control channel, frame 9: closed by peer: Bad message"),
            f"{PEER} closed the connection during pass 3 (control channel closed)",
        ),
        (
            # A reset while a control frame is read is the peer closing, not
            # a corrupt frame.
            OSError(
                errno.ECONNRESET,
                "control channel, frame 9: Connection reset by peer (os error 104)",
            ),
            f"{PEER} closed the connection during pass 3 (connection reset on the control channel)",
        ),
        (
            OSError(
                errno.EBADMSG,
                "control channel, frame 9: truncated stream: peer closed after 3 of 8 bytes",
            ),
            f"{PEER} closed the connection during pass 3 (control channel closed)",
        ),
        (
            OSError(errno.EBADMSG, "control channel, frame 9: CRC mismatch"),
            f"{PEER} sent a corrupt control frame during pass 3 "
            "(control channel, frame 9: CRC mismatch)",
        ),
        (
            OSError(
                errno.ETIMEDOUT, "channel 0, packet 4: send packet: stalled peer (I/O timeout)"
            ),
            f"{PEER} stopped answering during pass 3 (no progress within io_timeout on data "
            "channel 0)",
        ),
        (
            OSError(errno.ECONNREFUSED, "connect 127.0.0.1:4444: Connection refused"),
            f"{PEER} refused the connection during pass 3 (nothing listens there)",
        ),
        (
            OSError(errno.ECONNRESET, "connect channel Control 0: TLS handshake with x (hint)"),
            f"{PEER} failed the TLS handshake during pass 3 "
            "(connect channel Control 0: TLS handshake with x (hint))",
        ),
        (
            ProtocolError("control message 'pass': field 'pass' is missing"),
            f"{PEER} sent what the protocol forbids during pass 3 "
            "(control message 'pass': field 'pass' is missing)",
        ),
    ],
)
def test_os_errors_become_what_the_peer_did(error: BaseException, expected: str) -> None:
    assert describe(error, PEER, "during pass 3") == expected


def test_errors_that_are_not_the_peers_keep_their_own_text() -> None:
    assert describe(RuntimeError("nic0: injected failure"), PEER, "during setup") == (
        "RuntimeError: nic0: injected failure"
    )
    assert describe(OSError(errno.ENOMEM, "out of memory"), PEER, "during setup") == (
        "OSError: [Errno 12] out of memory"
    )


def test_peer_names_drop_the_scheme() -> None:
    assert peer_name("tcp:10.0.0.2:4444") == "10.0.0.2:4444"
    assert peer_name("unix:/run/mig.sock") == "/run/mig.sock"


@pytest.mark.skipif(
    not mig.capabilities()["uffd"]["available"],
    reason=f"host lacks the uffd capability: {mig.capabilities()['uffd']['reason']}",
)
def test_killing_the_destination_mid_precopy_names_it_and_the_pass() -> None:
    port = free_port()
    dest = serve(port, "32MiB", "--once")
    memory, guest, expected = filled_guest(SIZE, seed=5)
    source = MigrationSource(
        guest, uri=f"tcp:127.0.0.1:{port}", max_bandwidth=4 * MIB, multifd_channels=2
    )
    try:
        q, _ = fail_mid_precopy(source, 4 * MIB, dest.kill)
        running = guest.running
    finally:
        kill(dest)
        guest.close()
    assert q["status"] == "failed", q
    reason = q["error-desc"]
    assert re.fullmatch(
        rf"destination 127\.0\.0\.1:{port} closed the connection during pass \d+ "
        r"\((connection reset|broken pipe) on data channel \d\)|"
        rf"destination 127\.0\.0\.1:{port} closed the connection during pass \d+ "
        r"\((control channel closed|connection reset on the control channel)\)",
        reason,
    ), reason
    assert "os error" not in reason and "Errno" not in reason
    assert running and np.array_equal(memory.array, expected)


def test_killing_the_source_mid_precopy_names_it_on_the_destination(tmp_path) -> None:
    image = tmp_path / "guest.img"  # random pages: a first pass of seconds at 4 MiB/s
    image.write_bytes(os.urandom(SIZE))
    memory = mig.GuestMemory(SIZE)
    dest = MigrationDestination("tcp:127.0.0.1:0", memory, idle_timeout=30)
    port = str(dest.uri).rsplit(":", 1)[1]
    dest.start()
    source = send(int(port), "32MiB", "--image", str(image), "--max-bandwidth", "4MiB/s")
    try:
        wait_for(lambda: dest.status == "active", "the precopy", 60)
        time.sleep(1.0)  # a part of the first pass on the wire
        os.kill(source.pid, signal.SIGKILL)
        d = dest.wait(30)
    finally:
        kill(source)
    assert d["status"] == "failed", d
    reason = d["error-desc"]
    assert re.match(r"source 127\.0\.0\.1:\d+ closed the connection during pass \d+ \(", reason), (
        reason
    )
    assert "os error" not in reason and "Errno" not in reason
