"""Errors of the VFIO migration-device protocol.

Each maps to what the kernel's uAPI returns, so a caller handles a real
ioctl-backed device and an in-memory one the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mig._mig import MigError

if TYPE_CHECKING:
    from mig.vfio.fsm import MigState

__all__ = ["DeviceError", "DeviceStreamError", "InvalidTransition", "NoData", "TransitionFailed"]


class DeviceError(MigError):
    """A device operation failed."""


class InvalidTransition(DeviceError):
    """The requested state change is not allowed (the kernel's ``-EINVAL``)."""

    def __init__(self, cur: MigState, target: MigState, why: str) -> None:
        super().__init__(f"cannot move device from {cur.name} to {target.name}: {why}")
        self.cur, self.target = cur, target


class TransitionFailed(DeviceError):
    """The driver failed an arc; ``state`` is where the device was left."""

    def __init__(self, msg: str, state: MigState) -> None:
        super().__init__(msg)
        self.state = state


class DeviceStreamError(DeviceError):
    """A migration data stream is malformed, oversized or fails validation."""


class NoData(DeviceError):
    """No precopy data available right now (``read()`` failing with ENOMSG)."""
