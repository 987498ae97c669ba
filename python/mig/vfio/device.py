"""The migration-device protocol: what a migration needs from a VFIO device.

`MigrationDevice` is the seam between the migration (``DeviceHandler``) and a
device. Its methods are the kernel's migration uAPI v2 calls, one each:

- ``VFIO_DEVICE_FEATURE_MIGRATION`` GET: `caps`;
- ``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`` GET and SET: `state`, `set_state`,
  which returns the data session (the ``data_fd``) the final arc opened;
- ``VFIO_MIG_GET_PRECOPY_INFO``: `precopy_info`;
- ``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``: `data_size`;
- ``VFIO_DEVICE_RESET``: `reset`.

It holds no state storage: a device backed by real ioctls implements these
methods and nothing else. ``mig.sample_devices`` holds in-memory devices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple, Protocol

from mig.vfio.fsm import MigCap, MigState

__all__ = ["DataSession", "MigrationDevice", "PrecopyInfo", "ResumeSession", "SaveSession"]


class SaveSession(Protocol):
    """A saving ``data_fd`` (PRE_COPY and STOP_COPY states)."""

    def read(self, size: int = ...) -> bytes:
        """Up to ``size`` bytes. In PRE_COPY states raises `NoData` (ENOMSG) when
        nothing is pending; in STOP_COPY ``b""`` is the end of the state."""
        ...


class ResumeSession(Protocol):
    """A resuming ``data_fd`` (RESUMING): the saved stream is written in order."""

    def write(self, data: bytes | bytearray | memoryview) -> int: ...


DataSession = SaveSession | ResumeSession


class PrecopyInfo(NamedTuple):
    """``struct vfio_precopy_info``."""

    initial_bytes: int
    dirty_bytes: int


class MigrationDevice(ABC):
    """A VFIO device as migration sees it.

    ``name`` names this instance; ``model`` names the device model (``"nic"``);
    ``capacity`` bounds the state size in bytes, so a destination bounds what
    it buffers for the device; ``active`` is False while the guest driver has
    not armed the device (a destination device stays idle until a migrated
    state is loaded into it).
    """

    model = "device"
    name: str
    caps: MigCap
    capacity: int
    active: bool = True

    @property
    @abstractmethod
    def state(self) -> MigState: ...

    @abstractmethod
    def set_state(self, target: MigState | int) -> SaveSession | ResumeSession | None:
        """Move to ``target`` along the kernel's arcs; the session the final arc opened.

        Raises `InvalidTransition` before anything moves when the kernel would
        refuse, `TransitionFailed` (with the state the device was left in)
        when an arc fails.
        """

    @abstractmethod
    def precopy_info(self) -> PrecopyInfo:
        """Initial and dirty bytes pending; PRE_COPY states only (``-EINVAL`` otherwise)."""

    @abstractmethod
    def data_size(self) -> int:
        """Bytes STOP_COPY would still produce; only with `MigCap.DATA_SIZE`."""

    @abstractmethod
    def reset(self) -> None:
        """Drop every data session and return to RUNNING."""

    @abstractmethod
    def state_digest(self) -> int:
        """A digest of the device's functional state, to compare both sides byte-exact."""

    def stop_copy_seconds(self) -> float | None:
        """Seconds STOP_COPY takes besides producing its bytes, as this device
        measured it (a driver's fixed stop work), or None: it reports none.

        The kernel uAPI has no such figure; a device that can time its own
        stop work lets a migration plan it before the first switchover pays it.
        Called with the guest running, never inside the downtime.
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional: most devices hold nothing to release
        """Release the device."""
