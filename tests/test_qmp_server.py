"""The QMP protocol itself and the parameter mapping, in process (no migration)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

import mig
from mig.qmp import MigrationSettings, QMPError, SourceMonitor
from mig.qmp.json_stream import InputTooLarge, JsonStream


@pytest.fixture
def monitor(tmp_path: Path):
    memory = mig.GuestMemory(8 << 20)
    with mig.WorkloadGuest(memory, vcpus=1, workload="idle") as guest:
        mon = SourceMonitor(f"unix:{tmp_path}/q.sock", guest)
        mon.start()
        yield mon
        mon.close()


class Raw:
    """A byte-level client, to send what no well-behaved client would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def execute(self, cmd: str, **arguments: Any) -> dict[str, Any]:
        self.send(json.dumps({"execute": cmd, "arguments": arguments}).encode())
        return self.read()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_greeting_negotiation_and_id_echo(monitor: SourceMonitor, tmp_path: Path) -> None:
    c = Raw(f"{tmp_path}/q.sock")
    qmp = c.greeting["QMP"]
    assert set(qmp["version"]["qemu"]) == {"major", "minor", "micro"}
    assert qmp["capabilities"] == []
    assert c.execute("query-status")["error"]["class"] == "CommandNotFound"
    # Two requests in one write, no newline, ids of any JSON type echoed.
    c.send(b'{"execute": "qmp_capabilities", "id": [1, "a"]}{"execute":"query-status","id":7}')
    assert c.read() == {"return": {}, "id": [1, "a"]}
    assert c.read() == {"return": {"status": "running", "running": True}, "id": 7}
    again = c.execute("qmp_capabilities")
    assert again["error"]["class"] == "CommandNotFound"
    c.close()


def test_bad_input_gets_errors_and_the_session_goes_on(
    monitor: SourceMonitor, tmp_path: Path
) -> None:
    c = Raw(f"{tmp_path}/q.sock")
    c.execute("qmp_capabilities")
    c.send(b"hello there\n")
    assert c.read()["error"]["class"] == "GenericError"
    c.send(b'{"execute": }\n')
    assert "JSON parse error" in c.read()["error"]["desc"]
    c.send(b"[1, 2]")
    assert c.read()["error"]["desc"] == "QMP input must be a JSON object"
    c.send(b'{"arguments": {}, "id": 3}')
    assert c.read() == {
        "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"},
        "id": 3,
    }
    c.send(b'{"execute": "stop", "colour": "red"}')
    assert c.read()["error"]["desc"] == "QMP input member 'colour' is unexpected"
    assert c.execute("migrate")["error"]["desc"] == "Parameter 'uri' is missing"
    assert c.execute("migrate", uri="unix:/x", bandwidth=3)["error"]["desc"] == (
        "Parameter 'bandwidth' is unexpected"
    )
    assert c.execute("query-status")["return"]["status"] == "running"
    c.close()


def test_oversized_input_closes_only_that_client(monitor: SourceMonitor, tmp_path: Path) -> None:
    other = Raw(f"{tmp_path}/q.sock")
    other.execute("qmp_capabilities")
    c = Raw(f"{tmp_path}/q.sock")
    c.execute("qmp_capabilities")
    with pytest.raises(OSError):
        for _ in range(64):
            c.send(b'{"execute": "' + b"x" * 65536)
    try:  # the server closed it, perhaps (a reset) before its error could be read
        rest = c.file.read()
    except ConnectionResetError:
        rest = b""
    assert rest == b"" or b"QMP input too large" in rest
    assert other.execute("query-status")["return"]["running"] is True
    other.close()


def test_events_reach_negotiated_clients_only(monitor: SourceMonitor, tmp_path: Path) -> None:
    waiting = Raw(f"{tmp_path}/q.sock")
    c = Raw(f"{tmp_path}/q.sock")
    c.execute("qmp_capabilities")
    reply, event = _reply_and_event(c, "stop")
    assert reply == {"return": {}}
    assert event["event"] == "STOP"
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    assert c.execute("query-status")["return"] == {"status": "paused", "running": False}
    reply, event = _reply_and_event(c, "cont")
    assert reply == {"return": {}} and event["event"] == "RESUME"
    # The client still negotiating got no event: its next line is its reply.
    assert waiting.execute("query-status")["error"]["class"] == "CommandNotFound"
    waiting.close()
    c.close()


def _reply_and_event(c: Raw, cmd: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The reply and the event a command causes, in either order (QEMU sends the event first)."""
    first = c.execute(cmd)
    second = c.read()
    return (second, first) if "event" in first else (first, second)


def test_json_stream_splits_by_depth_outside_strings() -> None:
    s = JsonStream(100)
    assert s.feed(b'{"a": "}{\\"", "b": [1, {"c": 2}]}  {"d"') == [
        '{"a": "}{\\"", "b": [1, {"c": 2}]}'
    ]
    assert s.feed(b": 1}") == ['{"d": 1}']
    with pytest.raises(InputTooLarge):
        s.feed(b"{" + b" " * 200)


def test_settings_map_qemu_names_onto_mig_parameters() -> None:
    s = MigrationSettings(page_size=4096)
    s.set_capabilities(
        [{"capability": "multifd", "state": False}, {"capability": "dirty-limit", "state": True}]
    )
    s.set_parameters({"downtime-limit": 120, "vcpu-dirty-limit": 8, "x-mig-timeout": 5})
    p = s.to_params()
    assert p["downtime_limit"] == 120
    assert p["multifd_channels"] == 1  # no multifd: one channel, as in QEMU
    assert p["dirty_limit"] == 8 * (1 << 20) / 4096  # MiB/s per vCPU -> page writes/s
    assert p["timeout"] == 5
    with pytest.raises(QMPError, match="conflicts"):
        s.set_capabilities([{"capability": "auto-converge", "state": True}])
    with pytest.raises(QMPError, match="range of 1 to 99"):
        s.set_parameters({"max-cpu-throttle": 100})
    with pytest.raises(QMPError, match="expected: boolean"):
        s.set_parameters({"cpu-throttle-tailslow": 1})
    with pytest.raises(QMPError, match="zero-copy-send"):
        s.set_capabilities([{"capability": "zero-copy-send", "state": True}])
    with pytest.raises(QMPError, match="does not accept value 'gzip'"):
        s.set_parameters({"downtime-limit": 200, "multifd-compression": "gzip"})
    assert s.query_parameters()["downtime-limit"] == 120  # all or nothing


def test_stall_timeout_and_pause_before_switchover_under_qemu_names() -> None:
    s = MigrationSettings(page_size=4096)
    assert s.query_parameters()["x-mig-stall-timeout"] == 10.0
    caps = {c["capability"]: c["state"] for c in s.query_capabilities()}
    assert caps["pause-before-switchover"] is False
    s.set_capabilities([{"capability": "pause-before-switchover", "state": True}])
    s.set_parameters({"x-mig-stall-timeout": 2.5})
    p = s.to_params()
    assert p["pause_before_switchover"] is True and p["stall_timeout"] == 2.5
    assert "x-mig-pause-before-switchover" not in s.query_parameters()  # a capability
    with pytest.raises(QMPError, match="stall_timeout must be in"):
        s.set_parameters({"x-mig-stall-timeout": 0})
    assert s.query_parameters()["x-mig-stall-timeout"] == 2.5  # all or nothing


def test_tls_creds_names_a_qemu_style_x509_directory(tmp_path: Path) -> None:
    s = MigrationSettings()
    s.set_parameters({"tls-creds": str(tmp_path)})
    with pytest.raises(QMPError, match="client-cert.pem"):
        s.tls("client")
    for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        (tmp_path / name).write_text("")
    assert s.tls("client")["tls_key"] == str(tmp_path / "client-key.pem")
