"""`opaque`: no data_size(); the size is known only once STOP_COPY produced it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mig.sample_devices.activity import SampleDevice
from mig.sample_devices.config import SampleConfig
from mig.vfio.fsm import MigCap

__all__ = ["OpaqueConfig", "OpaqueDevice"]


@dataclass(frozen=True)
class OpaqueConfig(SampleConfig):
    caps: MigCap = MigCap.STOP_COPY | MigCap.P2P
    state: int = 16 << 20
    max: int = 32 << 20
    rate: float = 8 << 20
    min_size: int = 8 << 20
    chunk: int = 64 << 10

    growable: ClassVar[bool] = True

    @classmethod
    def default_min_size(cls, state: int) -> int:
        return state // 2


class OpaqueDevice(SampleDevice):
    """No data_size(): the size is known only once STOP_COPY has produced it.

    Its state (a context table) grows and shrinks with the workload, so no
    earlier figure predicts it.
    """

    model = "opaque"
    config_type: ClassVar[type[SampleConfig]] = OpaqueConfig

    def _work(self, nbytes: int) -> None:
        super()._work(nbytes)
        step = int(self.storage.rng.integers(-self.chunk, self.chunk + 1))
        self.resize(max(self.min_size, self.storage.size + step))
