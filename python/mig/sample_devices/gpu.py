"""`gpu`: large state (256 MiB by default) dirtied by its worker, with PRE_COPY."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mig.sample_devices.activity import SampleDevice
from mig.sample_devices.config import SampleConfig
from mig.vfio.fsm import MigCap

__all__ = ["GpuConfig", "GpuDevice"]


@dataclass(frozen=True)
class GpuConfig(SampleConfig):
    caps: MigCap = MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY | MigCap.DATA_SIZE
    state: int = 256 << 20
    max: int = 256 << 20
    rate: float = 64 << 20
    chunk: int = 1 << 20


class GpuDevice(SampleDevice):
    """Large state (256 MiB and up by default) dirtied by its worker, with PRE_COPY."""

    model = "gpu"
    config_type: ClassVar[type[SampleConfig]] = GpuConfig
