"""An in-process link for device-handler tests: records what handlers send."""

from __future__ import annotations

import random

from mig.device_handler import DeviceHandler
from mig.reorder import DeviceRecord, ReorderBuffer


class LoopbackLink:
    """Collects ``send_device_state`` records; delivers them to destination handlers.

    Delivery goes through a `ReorderBuffer`, as on a real destination: records
    reach a handler in sequence, each device's bounded by its handler's
    ``max_queued_bytes``, and every record delivered counts as announced.
    """

    def __init__(self) -> None:
        self.records: list[tuple[int, int, bytes, bool]] = []
        self._reorder: ReorderBuffer | None = None

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
        self.records.append((device_id, seq, bytes(data), final))

    def deliver(self, dest: dict[int, DeviceHandler], shuffle: int | None = None) -> int:
        """Feed every pending record to ``dest[device_id]``; ``shuffle`` seeds a reorder."""
        recs, self.records = self.records, []
        if shuffle is not None:
            random.Random(shuffle).shuffle(recs)
        if self._reorder is None:
            self._reorder = ReorderBuffer({d: h.max_queued_bytes for d, h in dest.items()})
        announced: dict[int, int] = {}
        for dev_id, seq, data, final in recs:
            self._reorder.add(DeviceRecord(dev_id, seq, data, final))
            announced[dev_id] = max(announced.get(dev_id, -1), seq)
        self._reorder.announce(announced)
        for r in self._reorder.release():
            dest[r.device].load_state(r.seq, r.data, r.final)
        return len(recs)
