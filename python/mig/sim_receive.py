"""The destination's receive side in virtual time: the backlog its channels hold.

The source's sends return once their bytes are in the sockets, not once the
destination has them: when its receive threads fall behind (a loaded host
deschedules them), the channels hold a backlog that the destination still
has to take in. A ``settle`` before the pause waits for it with the guest
running; a switchover without one (a stopped exact that completes at once,
``stop-exact-resume``) pays it in the downtime: the destination waits for
the end records behind it (the ``drain`` term).

``ChannelBacklog`` keeps that backlog as a fluid queue: the bytes the
simulated sender puts on the wire join it, the destination takes them out
at ``HostModel.receive_rate`` bytes/s, and a full queue
(``HostModel.channel_buffer`` per channel, what the sockets can hold) holds
the sender back until the receiver makes room. A rate of 0 (a host model
that has not measured it) keeps the old assumption: pages land as they are
charged.

``receive_rate`` measures the rate on this host from real loopback
migrations to ``mig demo``'s destination that switch over without a
settle, sending the whole guest after the pause: how much longer than the
sender the destination took for those bytes (their ``drain`` less the
fixed part, ``HostModel.drain_base``) per byte, on top of the sender's
time per byte the model charges (``loopback_bandwidth``). The simulated
twin of such a migration then waits for the same drain; a receiver that
keeps up (no drain) gets the sender's pace, and its queue stays empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "CALIBRATION_MEMORY",
    "ChannelBacklog",
    "lag_per_byte",
    "receive_rate",
    "socket_buffer_bytes",
]

# A filled idle guest this large: its one pass carries far more than the
# sockets hold, so a receiver behind the sender is seen as such.
CALIBRATION_MEMORY = 256 << 20
# The calibration's switchover: stopped at once, completed without a settle.
CALIBRATION_POLICY = "stop-exact-resume"


class ChannelBacklog:
    """Bytes sent and not yet taken in by the destination, ``rate`` bytes/s
    (0: none ever wait), at most ``capacity`` bytes."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = max(0.0, rate)
        self.capacity = max(0.0, capacity)
        self.bytes = 0.0
        self._at = now

    def advance(self, now: float, wire: float = 0.0) -> float:
        """``wire`` bytes were sent since the last call, evenly up to ``now``;
        returns the seconds the sender must wait for room (0 if it fits)."""
        if not self.rate:
            self._at = now
            return 0.0
        # Constant inflow over the interval: the queue ends where the
        # difference of the two puts it (it cannot empty midway and refill).
        self.bytes = max(0.0, self.bytes + wire - self.rate * (now - self._at))
        self._at = now
        if self.capacity and self.bytes > self.capacity:
            wait = (self.bytes - self.capacity) / self.rate
            self.bytes = self.capacity
            self._at = now + wait
            return wait
        return 0.0

    def seconds(self, now: float) -> float:
        """How long the destination still needs to take in what was sent by ``now``."""
        self.advance(now)
        return self.bytes / self.rate if self.rate else 0.0


def socket_buffer_bytes(proc: Path = Path("/proc/sys/net")) -> float:
    """Bytes one TCP channel can hold in its sockets on this host: the
    largest send buffer plus the largest receive buffer the kernel grows
    them to (``tcp_wmem``, ``tcp_rmem``); 0 where they cannot be read."""
    try:
        wmem = int((proc / "ipv4" / "tcp_wmem").read_text().split()[2])
        rmem = int((proc / "ipv4" / "tcp_rmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 0.0
    return float(wmem + rmem)


def lag_per_byte(q: dict[str, Any], drain_base: float) -> float:
    """Seconds per byte sent after the pause that a migration's destination
    took in after its sender was done: its ``drain`` beyond ``drain_base``."""
    drain = float(q["downtime-breakdown"].get("drain", 0.0)) / 1000
    ram = q["ram"]
    sent = float(ram.get("downtime-bytes") or ram["transferred"])
    return max(0.0, drain - drain_base) / max(sent, 1.0)


def receive_rate(bandwidth: float, drain_base: float, runs: int = 3) -> float:
    """Bytes/s the destination takes in, for a sender the model gives
    ``bandwidth`` bytes/s: the median lag per byte (``lag_per_byte``) of
    ``runs`` real loopback migrations of a filled idle ``CALIBRATION_MEMORY``
    guest to ``mig demo``'s destination, each switched over without a
    settle, added to the sender's time per byte."""
    from mig.sim import _idle_loopback_migration  # noqa: PLC0415 (it imports this module)

    lags = []
    for _ in range(runs):
        q, _ = _idle_loopback_migration(
            CALIBRATION_MEMORY, True, 0, demo=True, policy=CALIBRATION_POLICY
        )
        lags.append(lag_per_byte(q, drain_base))
    return 1.0 / (1.0 / bandwidth + sorted(lags)[len(lags) // 2])
