"""Build sample devices from specs."""

from __future__ import annotations

from typing import Any

from mig._mig import GuestMemory
from mig.sample_devices.activity import SampleDevice
from mig.sample_devices.dma import DmaConfig, DmaDevice
from mig.sample_devices.specs import (
    DEVICE_MODELS,
    DeviceSpec,
    DeviceSpecError,
    config_from_spec,
    parse_specs,
)

__all__ = ["create", "create_all"]


def create(
    spec: str | DeviceSpec,
    memory: GuestMemory | None = None,
    name: str | None = None,
    *,
    active: bool = True,
    clock: Any = None,
) -> SampleDevice:
    """Build one sample device from a spec such as ``"nic:state=64MiB,rate=20MiB/s"``.

    ``memory`` is the guest RAM a `dma` device writes. ``active=False`` builds
    a device whose guest driver has not armed it yet (a destination device:
    it starts working once a migrated state is loaded). Fault fields of the
    spec arm the source device only; a destination twin built from the same
    spec gets faults through `StoredDevice.inject_fault`. ``clock``: a clock
    with ``on_advance`` (``mig.clock.VirtualClock``) drives the device's
    activity in virtual time instead of a worker thread.
    """
    if isinstance(spec, str):
        specs = parse_specs(spec)
        if len(specs) != 1:
            raise DeviceSpecError(f"expected one device in {spec!r}, got {len(specs)}")
        spec = specs[0]
    config = config_from_spec(spec)
    dev_name = name or spec.options.get("name") or spec.model
    cls = DEVICE_MODELS[spec.model]
    if cls is DmaDevice:
        if memory is None:
            raise DeviceSpecError("dma: a dma device needs the guest memory it writes (memory=)")
        assert isinstance(config, DmaConfig)
        return DmaDevice(dev_name, config, memory=memory, active=active, clock=clock)
    return cls(dev_name, config, active=active, clock=clock)


def create_all(
    specs: str | list[str] | list[DeviceSpec],
    memory: GuestMemory | None = None,
    *,
    active: bool = True,
    clock: Any = None,
) -> list[SampleDevice]:
    """Build every device of a spec list, named ``<model><n>`` unless named in the spec."""
    parsed: list[DeviceSpec] = []
    for s in [specs] if isinstance(specs, str) else specs:
        parsed += [s] if isinstance(s, DeviceSpec) else parse_specs(s)
    counts: dict[str, int] = {}
    out: list[SampleDevice] = []
    try:
        for s in parsed:
            n = counts.get(s.model, 0)
            counts[s.model] = n + 1
            name = s.options.get("name") or f"{s.model}{n}"
            out.append(create(s, memory, name, active=active, clock=clock))
    except BaseException:
        for d in out:
            d.close()
        raise
    return out
