"""`dma`: a passed-through VF that DMA-writes guest RAM while it runs."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mig._mig import DirtyBitmap, GuestMemory
from mig.sample_devices.activity import SampleDevice
from mig.sample_devices.config import ConfigError, SampleConfig
from mig.vfio.fsm import MigCap

__all__ = ["DmaConfig", "DmaDevice"]


@dataclass(frozen=True)
class DmaConfig(SampleConfig):
    """``dma_rate``: bytes/s of guest RAM the device writes."""

    caps: MigCap = MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY | MigCap.DATA_SIZE
    state: int = 64 << 10
    max: int = 64 << 10
    rate: float = 64 << 10
    chunk: int = 4 << 10
    dma_rate: float = 4 << 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.state < 8:
            # The first 8 bytes hold the DMA sequence number.
            raise ConfigError("state", "a dma device needs at least 8 bytes")


class DmaDevice(SampleDevice):
    """A passed-through VF that DMA-writes guest RAM while RUNNING or PRE_COPY.

    Stopping vCPUs does not stop it: only moving it to a P2P or stopped state
    does. Each write stamps a page with the device's sequence number, which
    lives in the device state, so the destination continues the sequence.
    ``dma_log`` is the device's own dirty log of guest pages (DMA logging).
    """

    model = "dma"
    config_type: ClassVar[type[SampleConfig]] = DmaConfig

    def __init__(self, name: str, config: DmaConfig, *, memory: GuestMemory, **kw: Any) -> None:
        self.memory = memory
        self.dma_rate = config.dma_rate
        self.dma_log = DirtyBitmap(memory.num_pages)
        self.dma_pages_written = 0
        self._dma_carry = 0.0
        self._mem = memory.array
        super().__init__(name, config, **kw)

    def _setup_worker(self) -> None:
        self.dma_progress = threading.Condition(self.lock)

    def wait_dma(self, pages_written: int, timeout: float = 10.0) -> bool:
        """Wait until the device has DMA-written more than ``pages_written`` pages."""
        with self.lock:
            return self.dma_progress.wait_for(
                lambda: self.dma_pages_written > pages_written, timeout
            )

    def _advance(self, dt: float) -> None:
        super()._advance(dt)
        self._dma_carry += self.dma_rate * dt / self.memory.page_size
        pages = int(self._dma_carry)
        self._dma_carry -= pages
        ps, num = self.memory.page_size, self.memory.num_pages
        for _ in range(pages):
            seq = int.from_bytes(self.storage.state[:8].tobytes(), "little") + 1
            self.storage.write(0, seq.to_bytes(8, "little"))
            page = (seq * 2654435761) % num
            stamp = np.frombuffer(seq.to_bytes(8, "little") * (ps // 8), np.uint8)
            self._mem[page * ps : (page + 1) * ps] = stamp
            self.dma_log.set(page)
            self.dma_pages_written += 1
        if pages:
            self.dma_progress.notify_all()
