"""`fixed`: small fixed register state, no precopy (like hisi_acc)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mig.sample_devices.activity import SampleDevice
from mig.sample_devices.config import SampleConfig
from mig.vfio.fsm import MigCap

__all__ = ["FixedConfig", "FixedDevice"]


@dataclass(frozen=True)
class FixedConfig(SampleConfig):
    caps: MigCap = MigCap.STOP_COPY | MigCap.P2P | MigCap.DATA_SIZE
    state: int = 4 << 10
    max: int = 4 << 10
    rate: float = 16 << 10
    chunk: int = 4 << 10


class FixedDevice(SampleDevice):
    """Small fixed register state, no precopy (like hisi_acc)."""

    model = "fixed"
    config_type: ClassVar[type[SampleConfig]] = FixedConfig
