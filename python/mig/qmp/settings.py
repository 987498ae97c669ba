"""Migration capabilities and parameters under QEMU's QMP names, mapped onto mig's.

``migrate-set-capabilities`` / ``migrate-set-parameters`` change a
``MigrationSettings``; ``migrate`` turns it into ``MigrationSource`` keyword
arguments with ``to_params()``. QEMU's parameters keep their QEMU meaning:

* ``multifd-channels`` and ``multifd-compression`` apply only with the
  ``multifd`` capability (without it, one channel, no compression);
* ``auto-converge`` and ``dirty-limit`` are capabilities, tuned by the
  ``cpu-throttle-*`` parameters and ``vcpu-dirty-limit`` (MiB/s per vCPU);
* ``tls-creds`` names a directory laid out like QEMU's ``tls-creds-x509``
  ``dir`` (``ca-cert.pem``, ``client-cert.pem``/``client-key.pem`` for the
  source, ``server-cert.pem``/``server-key.pem`` for the destination); ``""``
  turns TLS off.

Every other mig parameter (``mig.source.PARAMETERS``) is ``x-mig-`` plus its
name with dashes, typed by its default: ``x-mig-policy``, ``x-mig-timeout``,
``x-mig-io-timeout`` and so on, plus ``x-mig-auto-converge-mode``
(``proportional`` or ``qemu``) for the ``auto-converge`` capability.

``pause-before-switchover`` is QEMU's: the switchover waits, guest paused,
in status ``pre-switchover`` for ``migrate-continue``. ``x-mig-stall-timeout``
(seconds) ends a precopy that makes no progress (``mig.stall_watch``).

``switchover-ack`` is always on in mig (the source waits for the
destination's ack) and ``zero-copy-send`` is not implemented: each reports its
real state, and asking for the other is an error.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mig.params import POSTCOPY_PUSH_ORDERS, TIMEOUT_ACTIONS, MigrationParams
from mig.policies import POLICIES
from mig.protocol import VERIFY_MODES
from mig.qmp.arguments import check_type
from mig.qmp.errors import QMPError
from mig.qmp.server import Command
from mig.source import PARAMETERS

__all__ = ["CAPABILITIES", "MigrationSettings", "settings_commands", "tls_files"]

_MIB = 1 << 20
_COMPRESSIONS = ("none", "zstd", "lz4")
_AUTO_CONVERGE_MODES = ("proportional", "qemu")

# Capability -> (default, fixed): a fixed capability cannot be changed.
CAPABILITIES: dict[str, tuple[bool, bool]] = {
    "multifd": (False, False),
    "auto-converge": (False, False),
    "dirty-limit": (False, False),
    "events": (False, False),
    "switchover-ack": (True, True),
    "zero-copy-send": (False, True),
    "pause-before-switchover": (False, False),
    "postcopy-ram": (False, False),
}
_FIXED_WHY = {
    "switchover-ack": "mig always waits for the destination's switchover-ack",
    "zero-copy-send": "mig does not implement zero-copy-send",
}


@dataclass(frozen=True)
class _Param:
    """A QEMU-named parameter: its JSON type and, for integers, its range."""

    key: str | None  # mig's PARAMETERS key, None when it maps differently
    kind: type
    lo: int | None = None
    hi: int | None = None
    choices: tuple[str, ...] = ()
    unit: str = ""


_QEMU_PARAMS: dict[str, _Param] = {
    "downtime-limit": _Param("downtime_limit", int, 1, 2_000_000, unit=" milliseconds"),
    "max-bandwidth": _Param("max_bandwidth", int, 0, 2**63 - 1),
    "avail-switchover-bandwidth": _Param("avail_switchover_bandwidth", int, 0, 2**63 - 1),
    "multifd-channels": _Param("multifd_channels", int, 1, 255),
    "multifd-compression": _Param("compression", str, choices=_COMPRESSIONS),
    "cpu-throttle-initial": _Param("cpu_throttle_initial", int, 1, 99),
    "cpu-throttle-increment": _Param("cpu_throttle_increment", int, 1, 99),
    "cpu-throttle-tailslow": _Param("cpu_throttle_tailslow", bool),
    "max-cpu-throttle": _Param("max_cpu_throttle", int, 1, 99),
    "vcpu-dirty-limit": _Param(None, int, 1, 2**31 - 1),
    "tls-creds": _Param(None, str),
    "x-mig-auto-converge-mode": _Param(None, str, choices=_AUTO_CONVERGE_MODES),
    "max-postcopy-bandwidth": _Param("max_postcopy_bandwidth", int, 0, 2**63 - 1),
}
# mig parameters that capabilities (not an x-mig- parameter) carry.
_BY_CAPABILITY = ("auto_converge", "dirty_limit", "pause_before_switchover", "postcopy")
# Choices of mig's own string parameters, checked when set.
_X_CHOICES: dict[str, tuple[str, ...]] = {
    "policy": tuple(POLICIES),
    "timeout_action": TIMEOUT_ACTIONS,
    "postcopy_push_order": POSTCOPY_PUSH_ORDERS,
    "non_convergence_action": ("report", "fail"),
    "verify": VERIFY_MODES,
}
# Seconds parameters whose default (None) means "follow another one": 0 here.
_OPTIONAL_SECONDS = frozenset({"verify_timeout"})


def _x_params() -> dict[str, _Param]:
    """``x-mig-NAME`` for every mig parameter QEMU has no name for."""
    mapped = {p.key for p in _QEMU_PARAMS.values()} | set(_BY_CAPABILITY)
    out = {}
    for key, default in PARAMETERS.items():
        if key in mapped:
            continue
        if key in _OPTIONAL_SECONDS:
            kind: type = float
        else:
            kind = dict if default is None else type(default)
        out["x-mig-" + key.replace("_", "-")] = _Param(key, kind, choices=_X_CHOICES.get(key, ()))
    return out


_PARAMS: dict[str, _Param] = {**_QEMU_PARAMS, **_x_params()}


def tls_files(creds: str, side: str) -> dict[str, str]:
    """``tls_cert``/``tls_key``/``tls_ca`` from a QEMU-style x509 directory.

    ``side`` is ``client`` (the source) or ``server`` (the destination).
    """
    if not creds:
        return {}
    files = {
        "tls_cert": os.path.join(creds, f"{side}-cert.pem"),
        "tls_key": os.path.join(creds, f"{side}-key.pem"),
        "tls_ca": os.path.join(creds, "ca-cert.pem"),
    }
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise QMPError(f"tls-creds '{creds}': missing {', '.join(missing)}")
    return files


class MigrationSettings:
    """The capabilities and parameters of the next migration, by QEMU's names."""

    def __init__(self, params: Mapping[str, Any] | None = None, page_size: int = 4096) -> None:
        """Start from mig parameters (``PARAMETERS`` plus ``params``), e.g. a CLI's."""
        p = {**PARAMETERS, **(params or {})}
        self.page_size = page_size
        self.capabilities = {name: default for name, (default, _) in CAPABILITIES.items()}
        self.values: dict[str, Any] = {}
        for name, spec in _PARAMS.items():
            if spec.key is not None:
                value = p[spec.key]
                if value is None:
                    value = {} if spec.kind is dict else 0.0
                self.values[name] = value
        channels = int(p["multifd_channels"])
        self.capabilities["multifd"] = channels > 1 or p["compression"] != "none"
        self.values["multifd-channels"] = channels
        mode = p["auto_converge"]
        self.capabilities["auto-converge"] = bool(mode)
        self.values["x-mig-auto-converge-mode"] = mode if isinstance(mode, str) else "proportional"
        self.capabilities["postcopy-ram"] = bool(p["postcopy"])
        limit = float(p["dirty_limit"])
        self.capabilities["dirty-limit"] = limit > 0
        self.values["vcpu-dirty-limit"] = max(1, round(limit * page_size / _MIB)) if limit else 1
        self.values["tls-creds"] = ""
        self.capabilities["pause-before-switchover"] = bool(p["pause_before_switchover"])

    # ------------------------------------------------------- capabilities
    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": c, "state": s} for c, s in self.capabilities.items()]

    def set_capabilities(self, entries: Any) -> None:
        """``migrate-set-capabilities``: all or nothing, with QEMU's errors."""
        if not isinstance(entries, list):
            raise QMPError("Invalid parameter type for 'capabilities', expected: array")
        new = dict(self.capabilities)
        for entry in entries:
            if not isinstance(entry, dict):
                raise QMPError("Invalid parameter type for 'capabilities', expected: object")
            extra = set(entry) - {"capability", "state"}
            if extra:
                raise QMPError(f"Parameter '{sorted(extra)[0]}' is unexpected")
            for key in ("capability", "state"):
                if key not in entry:
                    raise QMPError(f"Parameter '{key}' is missing")
            name, state = entry["capability"], entry["state"]
            check_type("capability", name, str)
            check_type("state", state, bool)
            if name not in CAPABILITIES:
                raise QMPError(f"Parameter 'capability' does not accept value '{name}'")
            default, fixed = CAPABILITIES[name]
            if fixed and state != default:
                raise QMPError(
                    f"Capability {name} cannot be {'on' if state else 'off'}: {_FIXED_WHY[name]}"
                )
            new[name] = state
        if new["auto-converge"] and new["dirty-limit"]:
            raise QMPError("dirty-limit conflicts with auto-converge: enable only one of them")
        self.capabilities = new

    # --------------------------------------------------------- parameters
    def query_parameters(self) -> dict[str, Any]:
        return copy.deepcopy(self.values)

    def set_parameters(self, arguments: Mapping[str, Any]) -> None:
        """``migrate-set-parameters``: check every value first, then apply them all."""
        for name, value in arguments.items():
            spec = _PARAMS.get(name)
            if spec is None:
                raise QMPError(f"Parameter '{name}' is unexpected")
            check_type(name, value, spec.kind)
            _check_value(name, spec, value)
        before = self.values
        self.values = {**before, **copy.deepcopy(dict(arguments))}
        try:
            MigrationParams.from_dict(self.to_params())  # the checks migrate would apply
        except ValueError as e:
            self.values = before
            raise QMPError(str(e)) from None

    @staticmethod
    def parameter_types() -> dict[str, type]:
        return {name: spec.kind for name, spec in _PARAMS.items()}

    # ------------------------------------------------------------- output
    def to_params(self) -> dict[str, Any]:
        """``MigrationSource`` keyword arguments (mig's parameter names)."""
        v, caps = self.values, self.capabilities
        out: dict[str, Any] = {}
        for name, spec in _PARAMS.items():
            if spec.key is not None:
                out[spec.key] = copy.deepcopy(v[name])
        if not caps["multifd"]:
            out["multifd_channels"] = 1
            out["compression"] = "none"
        out["auto_converge"] = v["x-mig-auto-converge-mode"] if caps["auto-converge"] else False
        out["postcopy"] = bool(caps["postcopy-ram"])
        out["dirty_limit"] = (
            v["vcpu-dirty-limit"] * _MIB / self.page_size if caps["dirty-limit"] else 0
        )
        out["pause_before_switchover"] = caps["pause-before-switchover"]
        if out.get("policy_options") == {}:
            out["policy_options"] = None
        for key in _OPTIONAL_SECONDS:
            if not out.get(key):
                out[key] = None
        return out

    def tls(self, side: str) -> dict[str, str]:
        """TLS files of ``tls-creds`` for ``side`` (``client`` or ``server``)."""
        return tls_files(self.values["tls-creds"], side)


def _check_value(name: str, spec: _Param, value: Any) -> None:
    if spec.lo is not None and spec.hi is not None and not spec.lo <= value <= spec.hi:
        raise QMPError(
            f"Parameter '{name}' expects an integer in the range of {spec.lo} to {spec.hi}"
            f"{spec.unit}"
        )
    if spec.kind in (int, float) and spec.lo is None and value < 0:
        raise QMPError(f"Parameter '{name}' expects a value >= 0")
    if spec.choices and value not in spec.choices:
        raise QMPError(f"Parameter '{name}' does not accept value '{value}'")


def settings_commands(settings: MigrationSettings, busy: Callable[[], bool]) -> dict[str, Command]:
    """The four QMP commands on ``settings``; changes are refused while ``busy()``."""

    def refuse_if_busy() -> None:
        if busy():
            raise QMPError("There's a migration process in progress")

    def set_capabilities(args: dict[str, Any]) -> None:
        refuse_if_busy()
        settings.set_capabilities(args["capabilities"])

    def set_parameters(args: dict[str, Any]) -> None:
        refuse_if_busy()
        settings.set_parameters(args)

    return {
        "migrate-set-capabilities": Command(set_capabilities, {"capabilities": list}),
        "query-migrate-capabilities": Command(lambda _: settings.query_capabilities()),
        "migrate-set-parameters": Command(set_parameters, optional=None),
        "query-migrate-parameters": Command(lambda _: settings.query_parameters()),
    }
