"""The VFIO migration uAPI v2: its state machine, errors and the device protocol."""

from mig.vfio.device import DataSession, MigrationDevice, PrecopyInfo, ResumeSession, SaveSession
from mig.vfio.errors import (
    DeviceError,
    DeviceStreamError,
    InvalidTransition,
    NoData,
    TransitionFailed,
)
from mig.vfio.fsm import (
    ACTIVE_STATES,
    PRECOPY_STATES,
    SAVING_STATES,
    ArcEffect,
    MigCap,
    MigState,
    arc_effect,
    next_state,
    path,
    state_by_name,
)

__all__ = [
    "ACTIVE_STATES",
    "PRECOPY_STATES",
    "SAVING_STATES",
    "ArcEffect",
    "DataSession",
    "DeviceError",
    "DeviceStreamError",
    "InvalidTransition",
    "MigCap",
    "MigState",
    "MigrationDevice",
    "NoData",
    "PrecopyInfo",
    "ResumeSession",
    "SaveSession",
    "TransitionFailed",
    "arc_effect",
    "next_state",
    "path",
    "state_by_name",
]
