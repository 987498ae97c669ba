"""``ReorderBuffer``: device records held until they are next in sequence and
declared sent.

Records arrive on any data channel in any order. The destination hands a
device's records to its handler strictly in sequence order, and only up to
the last sequence number the source announced on the control channel
(``pass``, ``switchover-abort``, ``complete``), so a record never runs ahead
of the decision that covers it. This is the one place records are reordered.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from mig._mig import ProtocolError

__all__ = ["DeviceRecord", "ReorderBuffer"]


@dataclass(frozen=True)
class DeviceRecord:
    device: int
    seq: int
    data: bytes
    final: bool


class ReorderBuffer:
    """Per device: records waiting, the last one released, the announced bound."""

    def __init__(self, devices: Iterable[int]) -> None:
        self._waiting: dict[int, dict[int, DeviceRecord]] = {d: {} for d in devices}
        self._released: dict[int, int] = {d: -1 for d in self._waiting}
        self._bound: dict[int, int] = {d: -1 for d in self._waiting}

    def add(self, record: DeviceRecord) -> None:
        waiting = self._waiting.get(record.device)
        if waiting is None:
            raise ProtocolError(f"device record for unknown device id {record.device}")
        if record.seq <= self._released[record.device] or record.seq in waiting:
            raise ProtocolError(f"device {record.device}: duplicate record seq {record.seq}")
        waiting[record.seq] = record

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
                yield waiting.pop(nxt)

    def missing(self) -> list[int]:
        """Devices whose announced records have not all been released."""
        return [d for d in self._waiting if self._released[d] < self._bound[d]]

    def clear(self) -> None:
        for waiting in self._waiting.values():
            waiting.clear()
