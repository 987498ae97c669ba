"""``CountingLink``: counts device bytes and sequence numbers on their way to the link.

The source announces the last sequence number sent per device (``pass``,
``switchover``, ``complete``) and reports each device's precopy and
stop-copy bytes; this wrapper is where both are counted.
"""

from __future__ import annotations

from typing import Any

from mig.link import Link

__all__ = ["CountingLink"]


class CountingLink:
    """A ``Link`` that forwards everything and counts device records."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.stop_copy = False
        self.last_seq: dict[int, int] = {}
        self.precopy_bytes: dict[int, int] = {}
        self.stop_copy_bytes: dict[int, int] = {}

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
        self.link.send_device_state(device_id, seq, data, final)
        self.last_seq[device_id] = seq
        bucket = self.stop_copy_bytes if self.stop_copy else self.precopy_bytes
        bucket[device_id] = bucket.get(device_id, 0) + len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.link, name)
