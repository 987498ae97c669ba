"""Sample devices: in-memory VFIO migration devices that change while they run.

One module per device model (`fixed`, `nic`, `opaque`, `gpu`, `dma`), each
with its typed config; `stored` holds the in-memory device the models share,
`activity` the worker that changes its state, `storage` and `sessions` its
state bytes and data sessions, `stream` their data format, `specs` the spec
strings and `factory` builds devices from them.
"""

from mig.sample_devices.activity import SampleDevice
from mig.sample_devices.config import ConfigError, SampleConfig
from mig.sample_devices.dma import DmaConfig, DmaDevice
from mig.sample_devices.factory import create, create_all
from mig.sample_devices.faults import DeviceFaults
from mig.sample_devices.fixed import FixedConfig, FixedDevice
from mig.sample_devices.gpu import GpuConfig, GpuDevice
from mig.sample_devices.nic import NicConfig, NicDevice
from mig.sample_devices.opaque import OpaqueConfig, OpaqueDevice
from mig.sample_devices.sessions import ResumeStream, SaveStream
from mig.sample_devices.specs import (
    DEVICE_MODELS,
    DeviceSpec,
    DeviceSpecError,
    config_from_spec,
    parse_specs,
)
from mig.sample_devices.stored import StoredDevice

__all__ = [
    "DEVICE_MODELS",
    "ConfigError",
    "DeviceFaults",
    "DeviceSpec",
    "DeviceSpecError",
    "DmaConfig",
    "DmaDevice",
    "FixedConfig",
    "FixedDevice",
    "GpuConfig",
    "GpuDevice",
    "NicConfig",
    "NicDevice",
    "OpaqueConfig",
    "OpaqueDevice",
    "ResumeStream",
    "SampleConfig",
    "SampleDevice",
    "SaveStream",
    "StoredDevice",
    "config_from_spec",
    "create",
    "create_all",
    "parse_specs",
]
