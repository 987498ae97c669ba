"""Control-channel messages between source and destination.

Every message is one JSON object with a ``type`` field, sent as one control
record (see ``docs/protocol.md`` for the table of messages and fields).
"""

from __future__ import annotations

import json
from typing import Any

from mig._mig import ProtocolError

__all__ = ["VERSION", "MESSAGE_TYPES", "MAX_MESSAGE", "encode", "decode"]

VERSION = 1
# Bounded so a hostile peer cannot make us parse an unbounded document.
MAX_MESSAGE = 1 << 20

MESSAGE_TYPES = frozenset(
    {
        "hello",
        "hello-ack",
        "pass",
        "pass-ack",
        "device-initial-done",
        "switchover-ack",
        "switchover",
        "switchover-abort",
        "complete",
        "ready",
        "go",
        "resumed",
        "cancel",
        "failed",
    }
)


def encode(msg: dict[str, Any]) -> bytes:
    kind = msg.get("type")
    if kind not in MESSAGE_TYPES:
        raise ValueError(f"unknown control message type {kind!r}")
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"control message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"control message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"control message is not JSON: {e}") from None
    if not isinstance(msg, dict) or msg.get("type") not in MESSAGE_TYPES:
        raise ProtocolError(f"control message has no known type: {str(msg)[:80]!r}")
    return msg
