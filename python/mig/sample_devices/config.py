"""`SampleConfig`: the typed, validated configuration of a sample device.

Each device model subclasses it with its own defaults (``NicConfig`` in
``nic.py``, ...); `mig.sample_devices.specs` builds one from a spec string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from mig.sample_devices.faults import DeviceFaults
from mig.sample_devices.stream import MAX_RECORD
from mig.vfio.fsm import MigCap

__all__ = ["ConfigError", "SampleConfig"]


class ConfigError(ValueError):
    """A configuration value is out of range; ``field`` names it."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"field {name!r}: {why}")
        self.field = name


@dataclass(frozen=True)
class SampleConfig:
    """Sizes in bytes, rates in bytes/s.

    ``state``: initial state size; ``max``: bound of the state (the destination
    refuses records past it); ``rate``: bytes rewritten per second; ``grow``:
    bytes added per second (negative shrinks) down to ``min_size``;
    ``chunk``: record size; ``faults``: armed on source devices only.
    """

    caps: MigCap = MigCap.STOP_COPY | MigCap.P2P | MigCap.DATA_SIZE
    state: int = 4 << 10
    max: int = 4 << 10
    rate: float = 16 << 10
    grow: float = 0.0
    min_size: int = 1
    chunk: int = 4 << 10
    seed: int = 0
    faults: DeviceFaults = field(default_factory=DeviceFaults)

    # A model whose state grows by default gets room to double when only
    # ``state`` is given.
    growable: ClassVar[bool] = False

    @classmethod
    def default_min_size(cls, state: int) -> int:
        return 1

    @classmethod
    def from_fields(cls, **given: Any) -> Self:
        """The model's defaults with ``given`` fields, the others derived from them.

        Without ``max``, the bound is ``state`` (twice it for a growable model)
        when ``state`` is given, else the model's default bound; ``chunk`` is
        at most ``state``; ``min_size`` is the model's default for ``state``.
        """
        base = cls()
        state = given.get("state", base.state)
        if "max" not in given:
            given["max"] = (
                (2 * state if cls.growable else state) if "state" in given else max(base.max, state)
            )
        given.setdefault("chunk", min(base.chunk, state))
        given.setdefault("min_size", cls.default_min_size(state))
        return cls(**given)

    def __post_init__(self) -> None:
        if not self.caps & MigCap.STOP_COPY:
            raise ConfigError("caps", "VFIO_MIGRATION_STOP_COPY is mandatory")
        if self.state <= 0:
            raise ConfigError("state", "must be > 0")
        if self.max < self.state:
            raise ConfigError("max", f"{self.max} is below state={self.state}")
        if not 0 < self.chunk <= MAX_RECORD:
            raise ConfigError("chunk", f"must be in 1..{MAX_RECORD}")
        if self.rate < 0:
            raise ConfigError("rate", "must be >= 0")
