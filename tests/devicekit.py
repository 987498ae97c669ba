"""Test helpers for devices: a link that captures a device's records, and one
device's state moved through the engine's handlers on both sides."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mig.device_handler import DeviceHandler


class CaptureLink:
    """A device link that keeps every record the source handler sends."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, bytes, bool]] = []

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
        self.chunks.append((seq, data, final))


def migrate_device(src: Any, dst: Any, after_precopy: Callable[[], None] | None = None) -> None:
    """``src``'s state into ``dst`` through a ``DeviceHandler`` each: its
    precopy (then ``after_precopy``), its stop-copy, every record loaded, and
    RESUMING -> STOP."""
    link = CaptureLink()
    sender, receiver = DeviceHandler(src), DeviceHandler(dst)
    sender.setup(link)
    sender.iterate(link)
    if after_precopy is not None:
        after_precopy()
    sender.quiesce()
    sender.complete(link)
    receiver.load_setup()
    for seq, data, final in link.chunks:
        receiver.load_state(seq, data, final)
    receiver.load_complete()
