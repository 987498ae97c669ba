"""`nic`: PRE_COPY with data_size() while running; state grows with traffic (like mlx5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mig.sample_devices.activity import SampleDevice
from mig.sample_devices.config import SampleConfig
from mig.vfio.fsm import MigCap

__all__ = ["NicConfig", "NicDevice"]


@dataclass(frozen=True)
class NicConfig(SampleConfig):
    caps: MigCap = MigCap.STOP_COPY | MigCap.P2P | MigCap.PRE_COPY | MigCap.DATA_SIZE
    state: int = 64 << 20
    max: int = 128 << 20
    rate: float = 20 << 20
    grow: float = 1 << 20
    chunk: int = 64 << 10

    growable: ClassVar[bool] = True


class NicDevice(SampleDevice):
    """PRE_COPY with data_size() while running; state grows with traffic (like mlx5)."""

    model = "nic"
    config_type: ClassVar[type[SampleConfig]] = NicConfig
