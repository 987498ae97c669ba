"""Mutual TLS on every channel: a session over TLS is byte-exact, and a peer
without a valid certificate is refused before any memory is written."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from tlskit import Authority, Identity, self_signed

import mig

SIZE = 4 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pki")
    ca = Authority(root)
    other = Authority(root, "other-ca")
    stranger = other.issue("stranger")
    return {
        "root": root,
        "dest": ca.issue("dest"),
        "src": ca.issue("src"),
        "misnamed": ca.issue("misnamed", names=("other.example",)),
        "self": self_signed(root, "self", ca.ca),
        "other": Identity(stranger.cert, stranger.key, ca.ca),
        "expired": ca.issue("expired", expired=True),
    }


def source_memory() -> mig.GuestMemory:
    mem = mig.GuestMemory(SIZE)
    mem.array[::5] = 0x3C
    return mem


def accept_async(listener: mig.Listener, dst: mig.GuestMemory, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["receiver"] = listener.accept(dst, timeout, io_timeout=2.0)
        except Exception as e:
            out["error"] = e

    out["thread"] = threading.Thread(target=run)
    out["thread"].start()
    return out


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_session_over_tls_is_byte_exact(pki: dict[str, Any], scheme: str, tmp_path: Path) -> None:
    uri = "tcp:127.0.0.1:0" if scheme == "tcp" else f"unix:{tmp_path}/mig.sock"
    listener = mig.Listener(uri, **pki["dest"].kwargs())
    assert listener.tls
    src, dst = source_memory(), mig.GuestMemory(SIZE)
    acc = accept_async(listener, dst, 10.0)
    sender = mig.Sender(src, listener.uri, migration_id=9, channels=3, **pki["src"].kwargs())
    acc["thread"].join()
    r = acc["receiver"]
    sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
    sender.sync(0)
    src.write(4096 * 7, b"\x99" * 4096)
    sender.send_pages(mig.DirtyBitmap.from_indices([7], src.num_pages), 1)
    sender.send_device_state(1, 0, b"state" * 1000, True)
    sender.control_send(b'{"type": "ping"}')
    assert r.control_recv(5.0) == b'{"type": "ping"}'
    r.control_send(b'{"type": "pong"}')
    assert sender.control_recv(5.0) == b'{"type": "pong"}'
    sender.finish(src.digest())
    # Closed before the destination has read everything: nothing unread on
    # the source's side, so the close is a clean FIN and no byte is lost.
    sender.close()
    assert r.wait_end(10.0)["digest"] == src.digest() == dst.digest()
    assert r.device_records() == [(1, 0, b"state" * 1000, True)]


def refused(listen: dict[str, str], connect: dict[str, str]) -> tuple[str, str, bool]:
    """A source with `connect` options meets a listener with `listen`
    options; returns (source error, destination error, memory unchanged)."""
    listener = mig.Listener("tcp:127.0.0.1:0", **listen)
    src, dst = source_memory(), mig.GuestMemory(SIZE)
    dst.array[::4096] = 0x5A
    before = dst.digest()
    acc = accept_async(listener, dst, 1.5)
    source_error = ""
    try:
        sender = mig.Sender(
            src, listener.uri, migration_id=3, channels=1, io_timeout=2.0, **connect
        )
        # A source without TLS cannot tell: its writes fail once refused.
        sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
        sender.finish(src.digest())
        sender.close()
    except (mig.MigError, OSError) as e:
        source_error = str(e)
    acc["thread"].join()
    assert "receiver" not in acc, "a session was accepted"
    assert isinstance(acc["error"], TimeoutError)
    return source_error, str(acc["error"]), dst.digest() == before


@pytest.mark.parametrize(
    ("peer", "source_says", "destination_says"),
    [
        ("self", "refused this side's certificate", "invalid peer certificate: UnknownIssuer"),
        ("other", "refused this side's certificate", "invalid peer certificate: UnknownIssuer"),
        ("expired", "refused this side's certificate", "certificate expired"),
    ],
)
def test_source_without_a_certificate_from_the_ca_is_refused(
    pki: dict[str, Any], peer: str, source_says: str, destination_says: str
) -> None:
    src_err, dst_err, unchanged = refused(pki["dest"].kwargs(), pki[peer].kwargs())
    assert source_says in src_err and "TLS handshake" in src_err
    assert "refused: a new channel: TLS handshake" in dst_err and destination_says in dst_err
    assert unchanged


def test_source_without_tls_is_refused(pki: dict[str, Any]) -> None:
    src_err, dst_err, unchanged = refused(pki["dest"].kwargs(), {})
    assert "not TLS: a source without TLS options?" in dst_err
    assert src_err  # its writes hit a closed channel
    assert unchanged


def test_destination_with_another_name_is_refused(pki: dict[str, Any]) -> None:
    src_err, dst_err, unchanged = refused(pki["misnamed"].kwargs(), pki["src"].kwargs())
    assert 'certificate not valid for name "127.0.0.1"' in src_err
    assert "TLS handshake" in dst_err
    assert unchanged


def test_tls_source_and_plain_destination(pki: dict[str, Any]) -> None:
    src_err, dst_err, unchanged = refused({}, pki["src"].kwargs())
    assert "TLS handshake" in src_err and "listening without TLS" in src_err
    assert "bad magic" in dst_err
    assert unchanged


def test_options_must_come_together(pki: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="all of tls_cert, tls_key and tls_ca"):
        mig.Listener("tcp:127.0.0.1:0", tls_cert=str(pki["dest"].cert))
    with pytest.raises(ValueError, match="file: snapshot has no peer"):
        mig.Sender(source_memory(), f"file:{tmp_path}/s", migration_id=1, **pki["src"].kwargs())
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    kw = pki["src"].kwargs() | {"tls_ca": str(empty)}
    with pytest.raises(ValueError, match="TLS CA file .*empty.pem: no CERTIFICATE block"):
        mig.Listener("tcp:127.0.0.1:0", **kw)


class RecordingProxy:
    """Forwards every connection to `target` and records what the source
    sent on each: the bytes a wire tap would capture."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp:").rsplit(":", 1)
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.server.getsockname()[1]}"
        self.sent: list[bytearray] = []
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self.accept, daemon=True)
        self.accepting.start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            tape = bytearray()
            self.sent.append(tape)
            for a, b, rec in ((client, upstream, tape), (upstream, client, None)):
                t = threading.Thread(target=self.pump, args=(a, b, rec), daemon=True)
                t.start()
                self.threads.append(t)

    @staticmethod
    def pump(a: socket.socket, b: socket.socket, tape: bytearray | None) -> None:
        while data := a.recv(1 << 16):
            if tape is not None:
                tape += data
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


def test_recorded_tls_session_replayed_is_refused(pki: dict[str, Any]) -> None:
    listener = mig.Listener("tcp:127.0.0.1:0", **pki["dest"].kwargs())
    proxy = RecordingProxy(listener.uri)
    src, dst = source_memory(), mig.GuestMemory(SIZE)
    acc = accept_async(listener, dst, 10.0)
    sender = mig.Sender(src, proxy.uri, migration_id=4, channels=2, **pki["src"].kwargs())
    acc["thread"].join()
    sender.send_pages(mig.DirtyBitmap.full(src.num_pages), 0)
    sender.finish(src.digest())
    assert acc["receiver"].wait_end(10.0)["digest"] == src.digest()
    sender.close()
    proxy.close()
    assert len(proxy.sent) == 3 and all(
        len(t) > SIZE // 8 or i == 0 for i, t in enumerate(proxy.sent)
    )

    # The tap's bytes, replayed channel by channel to a fresh destination.
    again = mig.Listener("tcp:127.0.0.1:0", **pki["dest"].kwargs())
    fresh = mig.GuestMemory(SIZE)
    before = fresh.digest()
    acc = accept_async(again, fresh, 2.0)
    host, port = again.uri.removeprefix("tcp:").rsplit(":", 1)
    for tape in proxy.sent:
        with socket.create_connection((host, int(port))) as s:
            try:
                s.sendall(bytes(tape))
            except OSError:
                pass  # refused mid-way: the destination closed the channel
    acc["thread"].join()
    assert "receiver" not in acc
    msg = str(acc["error"])
    assert msg.count("TLS handshake") == 3, msg
    assert fresh.digest() == before


def mig_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mig.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def tls_flags(ident: Identity) -> list[str]:
    return ["--tls-cert", str(ident.cert), "--tls-key", str(ident.key), "--tls-ca", str(ident.ca)]


def test_cli_demo_over_tls(pki: dict[str, Any]) -> None:
    """`mig demo` passes the TLS options to its `mig serve` child and to
    the source (MigrationDestination / MigrationSource)."""
    p = mig_cli(
        "demo", "--size", "32MiB", "--workload", "hotset:rate=20000",
        "--devices", "nic:state=2MiB,rate=1MiB/s", "--json", *tls_flags(pki["dest"]),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    q = json.loads(p.stdout)
    assert q["status"] == "completed" and q["verified"] is True


def test_cli_tls_options_come_together(pki: dict[str, Any]) -> None:
    p = mig_cli("send", "--connect", "tcp:127.0.0.1:1", "--tls-cert", str(pki["src"].cert))
    assert p.returncode == 2
    assert "--tls-cert, --tls-key and --tls-ca together" in p.stderr
