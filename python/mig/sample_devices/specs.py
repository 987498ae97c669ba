"""Device spec strings: ``nic:state=64MiB,rate=20MiB/s`` to a typed config.

A spec is ``model[:field=value,...]``. In a list, an item naming a model
starts the next device (``"nic:state=64MiB,rate=20MiB/s,fixed"`` is two
devices); ``;`` and whitespace also separate devices. Sizes and rates use
`mig.units`. Every error names the model and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mig.sample_devices.activity import SampleDevice
from mig.sample_devices.config import ConfigError, SampleConfig
from mig.sample_devices.dma import DmaDevice
from mig.sample_devices.faults import DeviceFaults
from mig.sample_devices.fixed import FixedDevice
from mig.sample_devices.gpu import GpuDevice
from mig.sample_devices.nic import NicDevice
from mig.sample_devices.opaque import OpaqueDevice
from mig.units import parse_rate, parse_size
from mig.vfio.fsm import MigCap, state_by_name

__all__ = ["DEVICE_MODELS", "DeviceSpec", "DeviceSpecError", "config_from_spec", "parse_specs"]

DEVICE_MODELS: dict[str, type[SampleDevice]] = {
    c.model: c for c in (FixedDevice, NicDevice, OpaqueDevice, GpuDevice, DmaDevice)
}


class DeviceSpecError(ValueError):
    """A device spec string is invalid."""


_CAP_OPTS = {"p2p": MigCap.P2P, "precopy": MigCap.PRE_COPY, "data_size": MigCap.DATA_SIZE}
_SIZE_OPTS = ("state", "max", "chunk", "oversize")
_RATE_OPTS = ("rate", "grow", "dma")
_OTHER_OPTS = ("name", "seed", "fail", "fail_into", "corrupt", "min")
# Spec field -> config field, where the names differ.
_CONFIG_FIELD = {"min": "min_size", "dma": "dma_rate"}


@dataclass
class DeviceSpec:
    """A parsed device spec: the device model plus options (strings as written)."""

    model: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ",".join(k if v == "" else f"{k}={v}" for k, v in self.options.items())
        return f"{self.model}:{opts}" if opts else self.model


def _models() -> str:
    return ", ".join(DEVICE_MODELS)


def _parse_one(model: str, opts: list[str], whole: str) -> DeviceSpec:
    if model not in DEVICE_MODELS:
        raise DeviceSpecError(
            f"unknown device type {model!r} in {whole!r}; expected one of {_models()}"
        )
    spec = DeviceSpec(model)
    for opt in opts:
        key, _, val = opt.partition("=")
        key = key.strip().replace("-", "_")
        if key not in _CAP_OPTS and key not in _SIZE_OPTS + _RATE_OPTS + _OTHER_OPTS:
            raise DeviceSpecError(f"{model}: unknown field {key!r} in {whole!r}")
        spec.options[key] = val.strip()
    config_from_spec(spec)  # validate every field now
    return spec


def parse_specs(text: str | list[str] | tuple[str, ...]) -> list[DeviceSpec]:
    """Parse one or more device specs (see the module docstring)."""
    if isinstance(text, list | tuple):
        return [s for t in text for s in parse_specs(t)]
    specs: list[DeviceSpec] = []
    cur: tuple[str, list[str]] | None = None
    for item in (i for part in re.split(r"[;\s]+", text) for i in part.split(",")):
        item = item.strip()
        if not item:
            continue
        head, colon, rest = item.partition(":")
        if head in DEVICE_MODELS and (colon or "=" not in item):
            if cur:
                specs.append(_parse_one(cur[0], cur[1], text))
            cur = (head, [rest] if rest else [])
        elif colon and "=" not in head:
            raise DeviceSpecError(
                f"unknown device type {head!r} in {text!r}; expected one of {_models()}"
            )
        elif cur is None:
            raise DeviceSpecError(
                f"device spec {text!r} must start with a device type ({_models()}), got {item!r}"
            )
        else:
            cur[1].append(item)
    if cur:
        specs.append(_parse_one(cur[0], cur[1], text))
    return specs


def _flag(model: str, key: str, val: str) -> bool:
    v = val.lower()
    if v in ("", "1", "on", "yes", "true"):
        return True
    if v in ("0", "off", "no", "false"):
        return False
    raise DeviceSpecError(f"{model}: field {key!r}: expected on/off, got {val!r}")


def _quantities(spec: DeviceSpec) -> dict[str, int]:
    """Size and rate fields in bytes (bytes/s); ``grow`` may be negative."""
    vals: dict[str, int] = {}
    for key in _SIZE_OPTS + _RATE_OPTS:
        if key not in spec.options:
            continue
        text = spec.options[key].strip()
        neg = key == "grow" and text.startswith("-")
        parse = parse_rate if key in _RATE_OPTS else parse_size
        try:
            vals[key] = parse(text.lstrip("-") if neg else text)
        except ValueError as e:
            raise DeviceSpecError(f"{spec.model}: field {key!r}: {e}") from None
        if neg:
            vals[key] = -vals[key]
    return vals


def _faults(spec: DeviceSpec, vals: dict[str, int]) -> DeviceFaults:
    o = spec.options
    fault: dict[str, Any] = {}
    if "fail" in o:
        try:
            fault["fail"] = state_by_name(o["fail"])
        except ValueError as e:
            raise DeviceSpecError(f"{spec.model}: field 'fail': {e}") from None
    if "fail_into" in o:
        if o["fail_into"].lower() != "error":
            raise DeviceSpecError(f"{spec.model}: field 'fail_into': only 'error' is allowed")
        fault["into_error"] = True
    if "corrupt" in o:
        fault["corrupt"] = _flag(spec.model, "corrupt", o["corrupt"])
    if "oversize" in o:
        fault["oversize"] = vals["oversize"]
    return DeviceFaults(**fault)


def config_from_spec(spec: DeviceSpec) -> SampleConfig:
    """The typed config of a spec: the model's defaults with the spec's fields."""
    config_type = DEVICE_MODELS[spec.model].config_type
    o = spec.options
    vals = _quantities(spec)
    given: dict[str, Any] = {_CONFIG_FIELD.get(k, k): v for k, v in vals.items() if k != "oversize"}
    caps = config_type().caps
    for key, bit in _CAP_OPTS.items():
        if key in o:
            caps = caps | bit if _flag(spec.model, key, o[key]) else caps & ~bit
    given["caps"] = caps
    for key in ("seed", "min"):
        if key in o:
            try:
                given[_CONFIG_FIELD.get(key, key)] = (
                    int(parse_size(o[key])) if key == "min" else int(o[key])
                )
            except ValueError:
                raise DeviceSpecError(
                    f"{spec.model}: field {key!r}: bad value {o[key]!r}"
                ) from None
    given["faults"] = _faults(spec, vals)
    try:
        return config_type.from_fields(**given)
    except ConfigError as e:
        raise DeviceSpecError(f"{spec.model}: {e}") from None
