"""An in-process link for device-handler tests: records what handlers send."""

from __future__ import annotations

import random

from mig.device_handler import DeviceHandler


class LoopbackLink:
    """Collects ``send_device_state`` records; delivers them to destination handlers."""

    def __init__(self) -> None:
        self.records: list[tuple[int, int, bytes, bool]] = []

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
        self.records.append((device_id, seq, bytes(data), final))

    def deliver(self, dest: dict[int, DeviceHandler], shuffle: int | None = None) -> int:
        """Feed every pending record to ``dest[device_id]``; ``shuffle`` seeds a reorder."""
        recs, self.records = self.records, []
        if shuffle is not None:
            random.Random(shuffle).shuffle(recs)
        for dev_id, seq, data, final in recs:
            dest[dev_id].load_state(seq, data, final)
        return len(recs)
