"""``ReorderBuffer``: device records held until they are next in sequence and
declared sent.

Records arrive on any data channel in any order. The destination hands a
device's records to its handler strictly in sequence order, and only up to
the last sequence number the source announced on the control channel
(``pass``, ``switchover-abort``, ``complete``), so a record never runs ahead
of the decision that covers it. This is the one place records are reordered.

What a device holds here is bounded in records and bytes: a peer that sends
records it never announces, or leaves a gap, gets an error naming the bound
instead of growing the destination's memory without end.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from mig._mig import ProtocolError

__all__ = [
    "DEFAULT_MAX_QUEUED_BYTES",
    "DRAIN_BYTES",
    "MAX_QUEUED_RECORDS",
    "DeviceRecord",
    "ReorderBuffer",
]

# Records one device may hold: a 64 MiB device state in 16 KiB chunks is
# 4096 records; the bound only stops a peer from growing the table.
MAX_QUEUED_RECORDS = 1 << 16
# Bytes one device may hold when its handler names no bound of its own.
DEFAULT_MAX_QUEUED_BYTES = 64 << 20
# What one drain of the receiver's device records can bring at once (its
# ``device_buffer`` default): a destination adds them all before it releases
# any, so a device's bound allows for them on top of a pass not yet announced.
DRAIN_BYTES = 32 << 20


@dataclass(frozen=True)
class DeviceRecord:
    device: int
    seq: int
    data: bytes
    final: bool


class ReorderBuffer:
    """Per device: records waiting, the last one released, the announced bound.

    ``devices`` lists the device ids, or maps each to the bytes it may hold
    waiting (`DEFAULT_MAX_QUEUED_BYTES` when it is only listed); each may
    also hold at most ``max_records`` records.
    """

    def __init__(
        self, devices: Iterable[int] | Mapping[int, int], *, max_records: int = MAX_QUEUED_RECORDS
    ) -> None:
        if isinstance(devices, Mapping):
            limits = {int(d): int(b) for d, b in devices.items()}
        else:
            limits = {int(d): DEFAULT_MAX_QUEUED_BYTES for d in devices}
        self.max_bytes = limits
        self.max_records = max_records
        self._waiting: dict[int, dict[int, DeviceRecord]] = {d: {} for d in limits}
        self._waiting_bytes: dict[int, int] = {d: 0 for d in limits}
        self._released: dict[int, int] = {d: -1 for d in limits}
        self._bound: dict[int, int] = {d: -1 for d in limits}

    def add(self, record: DeviceRecord) -> None:
        dev = record.device
        waiting = self._waiting.get(dev)
        if waiting is None:
            raise ProtocolError(f"device record for unknown device id {dev}")
        if record.seq <= self._released[dev] or record.seq in waiting:
            raise ProtocolError(f"device {dev}: duplicate record seq {record.seq}")
        held = self._waiting_bytes[dev] + len(record.data)
        if held > self.max_bytes[dev] or len(waiting) >= self.max_records:
            raise ProtocolError(
                f"device {dev}: record seq {record.seq} would leave {len(waiting) + 1} records "
                f"({held} bytes) queued out of order or unannounced, over the bound of "
                f"{self.max_records} records or {self.max_bytes[dev]} bytes per device "
                f"(next in sequence: {self._released[dev] + 1}, "
                f"announced up to {self._bound[dev]})"
            )
        waiting[record.seq] = record
        self._waiting_bytes[dev] = held

    def announce(self, seqs: Mapping[int, int]) -> None:
        """The source declared every record up to ``seqs[device]`` sent."""
        for dev, seq in seqs.items():
            if dev not in self._bound:
                raise ProtocolError(f"control message names unknown device id {dev}")
            self._bound[dev] = max(self._bound[dev], seq)

    def release(self) -> Iterator[DeviceRecord]:
        """Every record now next in sequence and within its bound, in order."""
        for dev, waiting in self._waiting.items():
            while (nxt := self._released[dev] + 1) <= self._bound[dev] and nxt in waiting:
                self._released[dev] = nxt
                record = waiting.pop(nxt)
                self._waiting_bytes[dev] -= len(record.data)
                yield record

    def missing(self) -> list[int]:
        """Devices whose announced records have not all been released."""
        return [d for d in self._waiting if self._released[d] < self._bound[d]]

    def clear(self) -> None:
        for waiting in self._waiting.values():
            waiting.clear()
        for dev in self._waiting_bytes:
            self._waiting_bytes[dev] = 0
