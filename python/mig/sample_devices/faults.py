"""Faults a sample device can be armed with, to test every failure path."""

from __future__ import annotations

from dataclasses import dataclass

from mig.vfio.fsm import MigState, state_by_name

__all__ = ["DeviceFaults"]


@dataclass(frozen=True)
class DeviceFaults:
    """``fail``: the arc entering this state fails (the device stays in the
    state before that arc, or goes to ERROR with ``into_error``).
    ``corrupt``: the STOP_COPY stream carries flipped payload bytes.
    ``oversize``: STOP_COPY emits this many bytes of records beyond the
    device's state bound (and ``data_size()`` does not count them).
    ``once``: a failing arc fails only the first time.
    """

    fail: MigState | None = None
    into_error: bool = False
    corrupt: bool = False
    oversize: int = 0
    once: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.fail, str):
            object.__setattr__(self, "fail", state_by_name(self.fail))
        if self.oversize < 0:
            raise ValueError("oversize must be >= 0")

    def after_failing(self) -> DeviceFaults:
        """What stays armed once the failing arc has failed."""
        if not self.once:
            return self
        return DeviceFaults(corrupt=self.corrupt, oversize=self.oversize)
