"""Failure reasons an operator can read: what the peer did, who it is, and when.

A broken session surfaces as an ``OSError`` (or a ``ProtocolError``) whose
text is the socket's: "channel 0, packet 12: send packet: Connection reset by
peer (os error 104)". ``describe`` turns it into what happened, naming the
peer and the phase: "destination 127.0.0.1:4444 closed the connection during
pass 3 (connection reset on data channel 0)". An error that is not the
peer's doing (a device failing, a bad parameter) keeps its own text.

``source_phase`` and ``destination_phase`` name the phase each side was in.
"""

from __future__ import annotations

import errno
import re

from mig._mig import ProtocolError
from mig.destination_core import DestinationPhase
from mig.switchover import Phase

__all__ = ["describe", "peer_name", "source_phase", "destination_phase"]

# errno -> (what the peer did, the cause in plain words)
_BY_ERRNO: dict[int, tuple[str, str]] = {
    errno.ECONNRESET: ("closed the connection", "connection reset"),
    errno.EPIPE: ("closed the connection", "broken pipe"),
    errno.ECONNABORTED: ("closed the connection", "connection aborted"),
    errno.ECONNREFUSED: ("refused the connection", "nothing listens there"),
    errno.ETIMEDOUT: ("stopped answering", "no progress within io_timeout"),
    errno.EHOSTUNREACH: ("is unreachable", "no route to host"),
    errno.ENETUNREACH: ("is unreachable", "network unreachable"),
}
_CHANNEL = re.compile(r"\bchannel (\d+)\b")


def peer_name(uri: str | None) -> str:
    """``HOST:PORT`` (or the socket path) of a ``tcp:``/``unix:`` URI."""
    if not uri:
        return "(unknown)"
    for scheme in ("tcp:", "unix:"):
        if uri.startswith(scheme):
            return uri[len(scheme) :]
    return uri


def describe(error: BaseException, peer: str, during: str) -> str:
    """What ``peer`` (e.g. "destination 127.0.0.1:4444") did ``during`` a phase."""
    what = _what_happened(error)
    if what is None:
        return f"{type(error).__name__}: {error}"
    event, cause = what
    return f"{peer} {event} {during} ({cause})"


def _what_happened(error: BaseException) -> tuple[str, str] | None:
    text = str(error)
    if isinstance(error, ProtocolError):
        return "sent what the protocol forbids", text
    if not isinstance(error, OSError):
        return None
    text = error.strerror or text  # without the "[Errno N]" prefix
    if "TLS handshake" in text:  # the handshake's own words say who refused what
        return "failed the TLS handshake", text
    where = _channel(text)
    code = error.errno or 0
    if code == errno.EBADMSG and ("closed by peer" in text or "peer closed" in text):
        return "closed the connection", "control channel closed"
    if code == errno.EBADMSG:
        return "sent a corrupt control frame", text
    if "truncated stream" in text or "peer closed" in text:
        return "closed the connection", "stream cut short" + where
    if code not in _BY_ERRNO and ("timed out" in text or "I/O timeout" in text):
        code = errno.ETIMEDOUT
    if code not in _BY_ERRNO:
        return None
    event, cause = _BY_ERRNO[code]
    return event, cause + where


def _channel(text: str) -> str:
    if "control channel" in text:
        return " on the control channel"
    m = _CHANNEL.search(text)
    return f" on data channel {m.group(1)}" if m else ""


def source_phase(status: str, phase: Phase, pass_number: int) -> str:
    """Where an outgoing migration was: "during pass 3", "after 'go'", ..."""
    if status in ("none", "setup"):
        return "during setup"
    return {
        Phase.PRECOPY: f"during pass {pass_number}",
        Phase.PAUSED: "at the switchover",
        Phase.PRE_SWITCHOVER: "during the pre-switchover pause",
        Phase.STOP_COPY: "during stop-copy",
        Phase.AWAIT_READY: "while the source waited for 'ready'",
        Phase.COMMITTED: "at 'go'",
        Phase.AWAIT_RESUMED: "after 'go'",
        Phase.DONE: "after the switchover",
        Phase.POSTMIGRATE: "after 'go'",
    }[phase]


def destination_phase(phase: DestinationPhase, pass_number: int) -> str:
    """Where an incoming migration was: "before hello", "during pass 3", ..."""
    return {
        DestinationPhase.AWAIT_HELLO: "before hello",
        DestinationPhase.ACTIVE: f"during pass {pass_number}",
        DestinationPhase.SWITCHOVER: "during stop-copy",
        DestinationPhase.STOP_COPY: "during stop-copy",
        DestinationPhase.AWAIT_GO: "while the destination waited for 'go'",
        DestinationPhase.AWAIT_VERIFY: "during the after-resume verification",
        DestinationPhase.RESUMED: "after resume",
    }[phase]
