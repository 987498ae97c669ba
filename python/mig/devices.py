"""The device names in one place: `mig.vfio` and `mig.sample_devices`.

``mig.vfio`` is the VFIO migration uAPI v2: the state machine
(`mig.vfio.fsm`), its errors and the migration-device protocol
(`mig.vfio.device.MigrationDevice`). ``mig.sample_devices`` holds in-memory
devices that implement it. ``VfioDevice`` is the in-memory device
(`mig.sample_devices.stored.StoredDevice`).
"""

from mig.sample_devices import (
    DEVICE_MODELS,
    DeviceSpec,
    DeviceSpecError,
    DmaDevice,
    FixedDevice,
    GpuDevice,
    NicDevice,
    OpaqueDevice,
    ResumeStream,
    SampleDevice,
    SaveStream,
    StoredDevice,
    config_from_spec,
    create,
    create_all,
    parse_specs,
)
from mig.vfio import (
    ACTIVE_STATES,
    PRECOPY_STATES,
    SAVING_STATES,
    DeviceError,
    DeviceStreamError,
    InvalidTransition,
    MigCap,
    MigrationDevice,
    MigState,
    NoData,
    TransitionFailed,
    next_state,
)

VfioDevice = StoredDevice

__all__ = [
    "ACTIVE_STATES",
    "DEVICE_MODELS",
    "PRECOPY_STATES",
    "SAVING_STATES",
    "DeviceError",
    "DeviceSpec",
    "DeviceSpecError",
    "DeviceStreamError",
    "DmaDevice",
    "FixedDevice",
    "GpuDevice",
    "InvalidTransition",
    "MigCap",
    "MigState",
    "MigrationDevice",
    "NicDevice",
    "NoData",
    "OpaqueDevice",
    "ResumeStream",
    "SampleDevice",
    "SaveStream",
    "StoredDevice",
    "TransitionFailed",
    "VfioDevice",
    "config_from_spec",
    "create",
    "create_all",
    "next_state",
    "parse_specs",
]
