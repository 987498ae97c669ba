"""``CountingLink``: counts device bytes and sequence numbers on their way to the link.

The source announces the last sequence number sent per device (``pass``,
``switchover``, ``complete``) and reports each device's precopy and
stop-copy bytes; this wrapper is where both are counted. It also counts the
precopy bytes sent since the last announcement: the destination holds a
device's records until they are announced, within a bound, so a device
handler sends no more than that bound between two announcements.
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
        self._unannounced: dict[int, int] = {}

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
        self.link.send_device_state(device_id, seq, data, final)
        self.last_seq[device_id] = seq
        bucket = self.stop_copy_bytes if self.stop_copy else self.precopy_bytes
        bucket[device_id] = bucket.get(device_id, 0) + len(data)
        self._unannounced[device_id] = self._unannounced.get(device_id, 0) + len(data)

    def unannounced_bytes(self, device_id: int) -> int:
        """Bytes of this device's records sent since the last `announce`."""
        return self._unannounced.get(device_id, 0)

    def announce(self) -> dict[int, int]:
        """The last sequence number sent per device, for a control message that
        declares them sent; the destination may release them from then on."""
        self._unannounced.clear()
        return dict(self.last_seq)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.link, name)
