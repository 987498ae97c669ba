"""The control-message codec: every message round-trips, bad records get a clear error."""

from __future__ import annotations

import json

import pytest

from mig import ProtocolError, protocol
from mig.protocol import (
    VERSION,
    Cancel,
    Complete,
    DeviceInfo,
    DeviceInitialDone,
    Failed,
    Go,
    Hello,
    HelloAck,
    Pass,
    PassAck,
    Ping,
    Pong,
    PostcopyAdvise,
    PostcopyRun,
    Progress,
    Ready,
    Resumed,
    SessionParams,
    Settle,
    Settled,
    Switchover,
    SwitchoverAbort,
    SwitchoverAck,
    VerifyDigest,
    VerifyResult,
)

DIGEST = "0123456789abcdef0123456789abcdef"
HELLO = Hello(
    migration_id=7,
    page_size=4096,
    ram_size=1 << 20,
    devices=(DeviceInfo(1, "nic0", "device"), DeviceInfo(2, "gpu0", "device")),
    params=SessionParams(300, 0, 2, "none"),
)
EVERY_MESSAGE = [
    HELLO,
    HelloAck(),
    Pass(3, 2, {1: 4, 2: -1}),
    PassAck(3, 0.01),
    PassAck(3, 0.01, drain=0.002, digest=0.03),
    DeviceInitialDone("nic0"),
    SwitchoverAck(),
    Switchover({1: 4}),
    SwitchoverAbort({1: (5, 9)}, {1: 9}, "nic0: over budget"),
    Complete(DIGEST, 4, {1: 12}, forced=True),
    Complete(None, 4, {1: 12}),
    Ready(0.02, True),
    Ready(0.02, False, digest=0.004),
    Ready(0.02, False, digest=0.004, drain=0.001),
    Go(),
    Resumed(0.03, True),
    VerifyDigest(DIGEST),
    VerifyResult(True, ""),
    VerifyResult(False, "memory digest mismatch"),
    Settle(5, 4),
    Settled(5, 0.08, 1200, 0.03),
    Cancel("by request"),
    Failed("digest mismatch"),
    Progress(123 << 20),
    Ping(2),
    Pong(2),
    Hello(7, 4096, 1 << 20, (), SessionParams(300, 0, 2, "none", stall_timeout=2.5)),
    PostcopyAdvise(),
    PostcopyRun(),
]


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: protocol.Message) -> None:
    assert protocol.decode(protocol.encode(message)) == message


def test_every_message_type_is_covered() -> None:
    assert {protocol.type_name(m) for m in EVERY_MESSAGE} == protocol.MESSAGE_TYPES


def test_the_wire_form_keeps_its_documented_fields() -> None:
    wire = json.loads(protocol.encode(Pass(3, 2, {1: 4})))
    assert wire == {"type": "pass", "pass": 3, "generation": 2, "device_seqs": {"1": 4}}
    hello = json.loads(protocol.encode(HELLO))
    assert hello["devices"][0] == {"id": 1, "name": "nic0", "kind": "device"}
    assert hello["version"] == VERSION and hello["params"]["multifd_channels"] == 2
    assert json.loads(protocol.encode(SwitchoverAbort({1: (5, 9)}, {}, "x")))["aborted"] == {
        "1": [5, 9]
    }
    assert hello["params"]["verify"] == "after-resume"


def test_optional_digests_are_omitted_on_the_wire() -> None:
    assert "digest" not in json.loads(protocol.encode(Complete(None, 1, {})))
    assert "digest" not in json.loads(protocol.encode(Ready(0.1, False)))
    assert json.loads(protocol.encode(Ready(0.1, False, 0.002)))["digest"] == 0.002


@pytest.mark.parametrize("mode", protocol.VERIFY_MODES)
def test_hello_carries_every_verify_mode(mode: str) -> None:
    hello = Hello(7, 4096, 1 << 20, (), SessionParams(300, 0, 2, "none", mode))
    assert protocol.decode(protocol.encode(hello)).params.verify == mode


def _params(**over: object) -> dict[str, object]:
    p: dict[str, object] = {
        "downtime_limit": 300, "max_bandwidth": 0, "multifd_channels": 2, "compression": "none",
        "verify": "strict",
    }  # fmt: skip
    p.update(over)
    return p


def _raw(kind: str, **fields: object) -> bytes:
    return json.dumps({"type": kind, **fields}).encode()


def _hello(devices: object, params: object = None) -> bytes:
    return _raw(
        "hello",
        version=VERSION,
        migration_id=1,
        page_size=4096,
        ram_size=1,
        devices=devices,
        params=params or {},
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "no known type"),
        (_raw("echo"), "no known type"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (_raw("pass", generation=1, device_seqs={}), "'pass' is missing"),
        (_raw("pass", **{"pass": "3"}, generation=1, device_seqs={}), "not an integer"),
        (_raw("pass", **{"pass": True}, generation=1, device_seqs={}), "not an integer"),
        (_raw("pass", **{"pass": -1}, generation=1, device_seqs={}), "outside"),
        (_raw("pass", **{"pass": 1}, generation=1, device_seqs={"nic": 1}), "not a device id"),
        (_raw("pass", **{"pass": 1}, generation=1, device_seqs={"1": -2}), "seq"),
        (_raw("pass", **{"pass": 1}, generation=1, device_seqs={"99999999999": 1}), "device id"),
        (_raw("pass", **{"pass": 1}, generation=1, device_seqs=[1]), "not an object"),
        (_raw("pass-ack", **{"pass": 1}, busy=float("nan")), "finite"),
        (_raw("complete", digest="xyz", generation=1, device_seqs={}, forced=False), "hex"),
        (_raw("complete", digest=DIGEST, generation=1, device_seqs={}, forced=1), "boolean"),
        (_raw("ready", load=-1.0, verified=True), "finite number >= 0"),
        (_raw("switchover-abort", aborted={"1": [1]}, device_seqs={}, reason="r"), "span"),
        (_hello(devices={}), "devices"),
        (_hello(devices=[{"id": 1, "name": "x" * 1000, "kind": "d"}]), "longer than"),
        (_raw("cancel", reason=None), "not a string"),
        (_raw("complete", digest="ABC", generation=1, device_seqs={}, forced=False), "hex"),
        (_raw("complete", digest=7, generation=1, device_seqs={}, forced=False), "not a string"),
        (_raw("ready", load=0.1, verified=False, digest=-0.5), "finite number >= 0"),
        (_raw("ready", load=0.1, verified=False, digest="fast"), "not a number"),
        (_raw("verify"), "'digest' is missing"),
        (_raw("verify", digest=DIGEST.upper()), "hex"),
        (_raw("verify", digest=DIGEST + "00"), "longer than"),
        (_raw("verify-result", ok="yes", reason=""), "boolean"),
        (_raw("verify-result", ok=False), "'reason' is missing"),
        (_raw("verify-result", ok=False, reason="x" * 5000), "longer than"),
        (_hello([], _params(verify="sometimes")), "not one of after-resume, strict, off"),
        (_hello([], _params(verify=1)), "not a string"),
        (_hello([], _params(verify="x" * 1000)), "longer than"),
        (_hello([], _params(verify="off", stall_timeout=-1)), "finite number >= 0"),
        (_raw("progress"), "'bytes' is missing"),
        (_raw("progress", bytes=-5), "outside"),
        (_raw("progress", bytes=1.5), "not an integer"),
    ],
)
def test_bad_records_raise_a_protocol_error_naming_the_problem(data: bytes, expected: str) -> None:
    with pytest.raises(ProtocolError, match=expected):
        protocol.decode(data)


def test_oversized_records_are_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode(b" " * (protocol.MAX_MESSAGE + 1))
    with pytest.raises(ValueError, match="exceeds"):
        protocol.encode(Failed("x" * protocol.MAX_MESSAGE))


def test_too_many_devices_are_refused() -> None:
    seqs = {str(i): 0 for i in range(protocol.MAX_DEVICES + 1)}
    with pytest.raises(ProtocolError, match="more than"):
        protocol.decode(_raw("switchover", device_seqs=seqs))


def test_a_hello_without_stall_timeout_means_none() -> None:
    """An older source's hello carries no stall_timeout: the destination watches nothing."""
    hello = protocol.decode(_hello([], _params(verify="off")))
    assert isinstance(hello, Hello) and hello.params.stall_timeout == 0.0
