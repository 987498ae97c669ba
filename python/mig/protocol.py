"""Control-channel messages between source and destination, typed.

Every message is one frozen dataclass; on the wire it is one JSON object with
a ``type`` field, sent as one control record (``docs/protocol.md`` has the
table of messages and fields). ``encode`` and ``decode`` are the only places
that see the JSON: ``decode`` checks every field's type and bounds and raises
``ProtocolError`` with the reason, so a peer's bad record never reaches the
loops as a half-valid dict.

Device ids are ints everywhere in these types (the position of the device in
the ``devices`` list, from 1; 0 is RAM). JSON object keys are text, so maps
keyed by device id carry the decimal id as the key on the wire.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mig._mig import ProtocolError

__all__ = [
    "VERSION",
    "MAX_MESSAGE",
    "MESSAGE_TYPES",
    "DeviceInfo",
    "SessionParams",
    "Hello",
    "HelloAck",
    "Pass",
    "PassAck",
    "DeviceInitialDone",
    "SwitchoverAck",
    "Switchover",
    "SwitchoverAbort",
    "Complete",
    "Ready",
    "Go",
    "Resumed",
    "VerifyDigest",
    "VerifyResult",
    "Settle",
    "Settled",
    "VERIFY_MODES",
    "Cancel",
    "Failed",
    "Progress",
    "Ping",
    "Pong",
    "PostcopyAdvise",
    "PostcopyRun",
    "Message",
    "encode",
    "decode",
]

# 2: settle/settled before the pause, progress heartbeats, post-copy's
# postcopy-advise/postcopy-run. 3: ping/pong after hello-ack. A peer of
# another version is refused at hello,
# before anything is sent, rather than failing mid-migration on a message it
# does not know.
VERSION = 3
# Bounded so a hostile peer cannot make us parse an unbounded document.
MAX_MESSAGE = 1 << 20
# Device ids travel as u32 in the device-record header.
MAX_DEVICE_ID = (1 << 32) - 1
# More devices than any VM has; bounds the lists a peer can make us build.
MAX_DEVICES = 4096
MAX_NAME = 256
# ``verify``: when the source's memory digest is compared with the
# destination's (``docs/protocol.md``): before resume, after it, or never.
VERIFY_MODES = ("after-resume", "strict", "off")


@dataclass(frozen=True)
class DeviceInfo:
    """One device as ``hello`` announces it."""

    id: int
    name: str
    kind: str


@dataclass(frozen=True)
class SessionParams:
    """The migration parameters ``hello`` tells the destination."""

    downtime_limit: float
    max_bandwidth: int
    multifd_channels: int
    compression: str
    verify: str = "after-resume"
    # Seconds without progress that end the precopy (``Progress``); 0: the
    # source watches for no stall and the destination neither.
    stall_timeout: float = 0.0


@dataclass(frozen=True)
class Hello:
    migration_id: int
    page_size: int
    ram_size: int
    devices: tuple[DeviceInfo, ...]
    params: SessionParams
    version: int = VERSION


@dataclass(frozen=True)
class HelloAck:
    version: int = VERSION


@dataclass(frozen=True)
class Pass:
    number: int
    generation: int
    device_seqs: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PassAck:
    number: int
    busy: float
    drain: float | None = None
    digest: float | None = None


@dataclass(frozen=True)
class DeviceInitialDone:
    device: str


@dataclass(frozen=True)
class SwitchoverAck:
    pass


@dataclass(frozen=True)
class Switchover:
    device_seqs: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SwitchoverAbort:
    aborted: Mapping[int, tuple[int, int]]
    device_seqs: Mapping[int, int]
    reason: str


@dataclass(frozen=True)
class Complete:
    """``digest``: the source's chunk root, sent only when ``verify`` is strict."""

    digest: str | None
    generation: int
    device_seqs: Mapping[int, int]
    forced: bool = False


@dataclass(frozen=True)
class Ready:
    """``digest``: seconds the destination spent taking its memory's root;
    ``drain``: seconds it waited for the data channels' end records."""

    load: float
    verified: bool
    digest: float | None = None
    drain: float | None = None


@dataclass(frozen=True)
class Go:
    pass


@dataclass(frozen=True)
class Resumed:
    load: float
    verified: bool


@dataclass(frozen=True)
class VerifyDigest:
    """After ``resumed`` (``verify`` after-resume): the frozen source memory's root."""

    digest: str


@dataclass(frozen=True)
class VerifyResult:
    """The destination's comparison of ``verify`` with its root before resume."""

    ok: bool
    reason: str


@dataclass(frozen=True)
class Settle:
    """Before the pause: tell the source once pass ``number`` (sync
    ``generation``) has landed on every channel and the root is current."""

    number: int
    generation: int


@dataclass(frozen=True)
class Settled:
    """The answer to ``settle``: ``landed`` seconds until the channels held the
    pass, then ``chunks`` stale chunks rehashed in ``seconds``."""

    number: int
    landed: float
    chunks: int
    seconds: float


@dataclass(frozen=True)
class Cancel:
    reason: str


@dataclass(frozen=True)
class Failed:
    reason: str


@dataclass(frozen=True)
class Progress:
    """The heartbeat of stall detection: data-channel bytes this side has sent
    (the source) or received (the destination) so far. Each side sends one
    every few tenths of ``stall_timeout`` while the precopy runs."""

    bytes: int


@dataclass(frozen=True)
class Ping:
    """Source, after ``hello-ack``: answer ``pong`` with ``value`` at once.

    ``hello``'s round trip holds whatever the destination did before it
    read ``hello`` (it maps and populates its memory first, which grows with
    the guest), and a pass ack's holds the source's own wait before it next
    looked at the channel. The pings, waited for, time the control channel
    alone: what ``complete``/``ready`` and ``go``/``resumed`` will cost."""

    value: int


@dataclass(frozen=True)
class Pong:
    value: int


@dataclass(frozen=True)
class PostcopyAdvise:
    """At setup, ``postcopy`` on: the destination checks it can register its
    memory for missing-page faults (QEMU's POSTCOPY_ADVISE), else fails."""


@dataclass(frozen=True)
class PostcopyRun:
    """Before ``complete``: this switchover is post-copy. The source owes the
    pages it names on the post-copy channels; the destination discards them
    and fetches them on demand after resuming (QEMU's POSTCOPY_RUN)."""


Message = (
    Hello
    | HelloAck
    | Pass
    | PassAck
    | DeviceInitialDone
    | SwitchoverAck
    | Switchover
    | SwitchoverAbort
    | Complete
    | Ready
    | Go
    | Resumed
    | VerifyDigest
    | VerifyResult
    | Settle
    | Settled
    | Cancel
    | Failed
    | Progress
    | Ping
    | Pong
    | PostcopyAdvise
    | PostcopyRun
)

_TYPE_NAMES: dict[type, str] = {
    Hello: "hello",
    HelloAck: "hello-ack",
    Pass: "pass",
    PassAck: "pass-ack",
    DeviceInitialDone: "device-initial-done",
    SwitchoverAck: "switchover-ack",
    Switchover: "switchover",
    SwitchoverAbort: "switchover-abort",
    Complete: "complete",
    Ready: "ready",
    Go: "go",
    Resumed: "resumed",
    VerifyDigest: "verify",
    VerifyResult: "verify-result",
    Settle: "settle",
    Settled: "settled",
    Cancel: "cancel",
    Failed: "failed",
    Progress: "progress",
    Ping: "ping",
    Pong: "pong",
    PostcopyAdvise: "postcopy-advise",
    PostcopyRun: "postcopy-run",
}
MESSAGE_TYPES = frozenset(_TYPE_NAMES.values())


def type_name(message: Message) -> str:
    """The wire ``type`` of ``message`` (``"pass-ack"`` for a ``PassAck``)."""
    return _TYPE_NAMES[type(message)]


# ------------------------------------------------------------------ encode
def _seqs(seqs: Mapping[int, int]) -> dict[str, int]:
    return {str(dev): seq for dev, seq in seqs.items()}


def _hello_fields(message: Hello) -> dict[str, Any]:
    p = message.params
    return {
        "version": message.version,
        "migration_id": message.migration_id,
        "page_size": message.page_size,
        "ram_size": message.ram_size,
        "devices": [{"id": d.id, "name": d.name, "kind": d.kind} for d in message.devices],
        "params": {
            "downtime_limit": p.downtime_limit,
            "max_bandwidth": p.max_bandwidth,
            "multifd_channels": p.multifd_channels,
            "compression": p.compression,
            "verify": p.verify,
            "stall_timeout": p.stall_timeout,
        },
    }


def _fields(message: Message) -> dict[str, Any]:
    match message:
        case Hello():
            return _hello_fields(message)
        case HelloAck():
            return {"version": message.version}
        case Pass():
            return {
                "pass": message.number,
                "generation": message.generation,
                "device_seqs": _seqs(message.device_seqs),
            }
        case PassAck():
            out: dict[str, Any] = {"pass": message.number, "busy": message.busy}
            if message.drain is not None:
                out["drain"] = message.drain
            if message.digest is not None:
                out["digest"] = message.digest
            return out
        case DeviceInitialDone():
            return {"device": message.device}
        case SwitchoverAck() | Go() | PostcopyAdvise() | PostcopyRun():
            return {}
        case Switchover():
            return {"device_seqs": _seqs(message.device_seqs)}
        case SwitchoverAbort():
            return {
                "aborted": {str(d): list(span) for d, span in message.aborted.items()},
                "device_seqs": _seqs(message.device_seqs),
                "reason": message.reason,
            }
        case Complete():
            out = {
                "generation": message.generation,
                "device_seqs": _seqs(message.device_seqs),
                "forced": message.forced,
            }
            if message.digest is not None:
                out["digest"] = message.digest
            return out
        case Ready():
            out = {"load": message.load, "verified": message.verified}
            if message.digest is not None:
                out["digest"] = message.digest
            if message.drain is not None:
                out["drain"] = message.drain
            return out
        case Resumed():
            return {"load": message.load, "verified": message.verified}
        case VerifyDigest():
            return {"digest": message.digest}
        case VerifyResult():
            return {"ok": message.ok, "reason": message.reason}
        case Settle():
            return {"pass": message.number, "generation": message.generation}
        case Settled():
            return {
                "pass": message.number,
                "landed": message.landed,
                "chunks": message.chunks,
                "seconds": message.seconds,
            }
        case Cancel() | Failed():
            return {"reason": message.reason}
        case Progress():
            return {"bytes": message.bytes}
        case Ping() | Pong():
            return {"value": message.value}
    raise TypeError(f"not a control message: {message!r}")


def encode(message: Message) -> bytes:
    """The control record of ``message``; ``ValueError`` if over ``MAX_MESSAGE``."""
    body = {"type": type_name(message), **_fields(message)}
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"control message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


# ------------------------------------------------------------------ decode
class _Fields:
    """Typed, bounded reads of one decoded JSON object; errors name the field."""

    def __init__(self, kind: str, obj: dict[str, Any]) -> None:
        self.kind = kind
        self.obj = obj

    def _bad(self, key: str, why: str) -> ProtocolError:
        return ProtocolError(f"control message {self.kind!r}: field {key!r} {why}")

    def _get(self, key: str) -> Any:
        if key not in self.obj:
            raise self._bad(key, "is missing")
        return self.obj[key]

    def integer(self, key: str, low: int = 0, high: int = (1 << 64) - 1) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, f"is not an integer: {str(value)[:40]!r}")
        if not low <= value <= high:
            raise self._bad(key, f"{value} is outside [{low}, {high}]")
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, f"is not a number: {str(value)[:40]!r}")
        if not math.isfinite(value) or value < 0:
            raise self._bad(key, f"{value} is not a finite number >= 0")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        return None if self.obj.get(key) is None else self.number(key)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._bad(key, f"is not a boolean: {str(value)[:40]!r}")
        return value

    def text(self, key: str, limit: int = MAX_MESSAGE) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, f"is not a string: {str(value)[:40]!r}")
        if len(value) > limit:
            raise self._bad(key, f"is longer than {limit} characters")
        return value

    def object(self, key: str) -> dict[str, Any]:
        value = self._get(key)
        if not isinstance(value, dict):
            raise self._bad(key, "is not an object")
        if len(value) > MAX_DEVICES:
            raise self._bad(key, f"has more than {MAX_DEVICES} entries")
        return value

    def device_seqs(self, key: str) -> dict[int, int]:
        out = {}
        for dev, seq in self.object(key).items():
            if isinstance(seq, bool) or not isinstance(seq, int) or not -1 <= seq < 1 << 64:
                raise self._bad(key, f"holds a seq that is not an integer >= -1: {str(seq)[:40]!r}")
            out[_device_id(self, key, dev)] = seq
        return out


def _device_id(fields: _Fields, key: str, text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        raise fields._bad(key, f"has a key that is not a device id: {text[:40]!r}")
    dev = int(text)
    if dev > MAX_DEVICE_ID:
        raise fields._bad(key, f"has a device id over {MAX_DEVICE_ID}: {dev}")
    return dev


def _decode_hello(f: _Fields) -> Hello:
    raw_devices = f._get("devices")
    if not isinstance(raw_devices, list) or len(raw_devices) > MAX_DEVICES:
        raise f._bad("devices", f"is not a list of at most {MAX_DEVICES} devices")
    devices = []
    for raw in raw_devices:
        if not isinstance(raw, dict):
            raise f._bad("devices", "holds an entry that is not an object")
        d = _Fields(f.kind, raw)
        name, kind = d.text("name", MAX_NAME), d.text("kind", MAX_NAME)
        devices.append(DeviceInfo(d.integer("id", high=MAX_DEVICE_ID), name, kind))
    p = _Fields(f.kind, f.object("params"))
    params = SessionParams(
        downtime_limit=p.number("downtime_limit"),
        max_bandwidth=p.integer("max_bandwidth"),
        multifd_channels=p.integer("multifd_channels", low=1, high=1 << 16),
        compression=p.text("compression", MAX_NAME),
        verify=_verify_mode(p),
        stall_timeout=p.optional_number("stall_timeout") or 0.0,
    )
    return Hello(
        version=f.integer("version"),
        migration_id=f.integer("migration_id"),
        page_size=f.integer("page_size"),
        ram_size=f.integer("ram_size"),
        devices=tuple(devices),
        params=params,
    )


def _decode_abort(f: _Fields) -> SwitchoverAbort:
    aborted = {}
    for dev, span in f.object("aborted").items():
        if not isinstance(span, list) or len(span) != 2:
            raise f._bad("aborted", f"holds a span that is not [first, last]: {str(span)[:40]!r}")
        ends = _Fields(f.kind, {"first": span[0], "last": span[1]})
        aborted[_device_id(f, "aborted", dev)] = (ends.integer("first"), ends.integer("last"))
    return SwitchoverAbort(aborted, f.device_seqs("device_seqs"), f.text("reason"))


def _verify_mode(f: _Fields) -> str:
    mode = f.text("verify", MAX_NAME)
    if mode not in VERIFY_MODES:
        raise f._bad("verify", f"is not one of {', '.join(VERIFY_MODES)}: {mode[:40]!r}")
    return mode


def _digest(f: _Fields) -> str:
    digest = f.text("digest", 32)
    if len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
        raise f._bad("digest", f"is not 32 lowercase hex digits: {digest!r}")
    return digest


def _decode_complete(f: _Fields) -> Complete:
    digest = None if f.obj.get("digest") is None else _digest(f)
    return Complete(
        digest, f.integer("generation"), f.device_seqs("device_seqs"), forced=f.flag("forced")
    )


def _decode_fields(kind: str, f: _Fields) -> Message:
    match kind:
        case "hello":
            return _decode_hello(f)
        case "hello-ack":
            return HelloAck(f.integer("version"))
        case "pass":
            return Pass(f.integer("pass"), f.integer("generation"), f.device_seqs("device_seqs"))
        case "pass-ack":
            drain, digest = f.optional_number("drain"), f.optional_number("digest")
            return PassAck(f.integer("pass"), f.number("busy"), drain, digest)
        case "device-initial-done":
            return DeviceInitialDone(f.text("device", MAX_NAME))
        case "switchover-ack":
            return SwitchoverAck()
        case "switchover":
            return Switchover(f.device_seqs("device_seqs"))
        case "switchover-abort":
            return _decode_abort(f)
        case "complete":
            return _decode_complete(f)
        case "ready":
            digest, drain = f.optional_number("digest"), f.optional_number("drain")
            return Ready(f.number("load"), f.flag("verified"), digest, drain)
        case "go":
            return Go()
        case "resumed":
            return Resumed(f.number("load"), f.flag("verified"))
        case "verify":
            return VerifyDigest(_digest(f))
        case "verify-result":
            return VerifyResult(f.flag("ok"), f.text("reason", MAX_NAME * 16))
        case "settle":
            return Settle(f.integer("pass"), f.integer("generation"))
        case "settled":
            landed, seconds = f.number("landed"), f.number("seconds")
            return Settled(f.integer("pass"), landed, f.integer("chunks"), seconds)
        case "cancel":
            return Cancel(f.text("reason"))
        case "failed":
            return Failed(f.text("reason"))
        case "progress":
            return Progress(f.integer("bytes"))
        case "ping":
            return Ping(f.integer("value"))
        case "pong":
            return Pong(f.integer("value"))
        case "postcopy-advise":
            return PostcopyAdvise()
        case "postcopy-run":
            return PostcopyRun()
    raise ProtocolError(f"control message has no known type: {kind[:40]!r}")


def decode(data: bytes) -> Message:
    """The message in one control record; ``ProtocolError`` on anything else."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"control message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError(f"control message is not JSON: {e}") from None
    kind = obj.get("type") if isinstance(obj, dict) else None
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise ProtocolError(f"control message has no known type: {str(obj)[:80]!r}")
    return _decode_fields(kind, _Fields(kind, obj))
