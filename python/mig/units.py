"""Parsing of sizes, rates and durations written with units.

Sizes take binary (KiB, MiB, GiB, TiB) or decimal (KB, MB, GB, TB) suffixes
and plain bytes; rates are sizes per second (``100MiB/s``) or bits per second
(``1Gbit/s``, ``10Gbps``); durations take ``us``, ``ms``, ``s``, ``min``.
Every parser raises ``ValueError`` with a message that quotes the input.
"""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_BIT_UNITS = {
    "bit": 1,
    "kbit": 1000,
    "mbit": 1000**2,
    "gbit": 1000**3,
    "tbit": 1000**4,
    "bps": 1,
    "kbps": 1000,
    "mbps": 1000**2,
    "gbps": 1000**3,
    "tbps": 1000**4,
}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z/]*)\s*$")


def _split(text: str, what: str) -> tuple[float, str]:
    match = _NUMBER.match(str(text))
    if not match:
        raise ValueError(f"invalid {what} {text!r}: expected a number with an optional unit")
    return float(match.group(1)), match.group(2)


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: ``4096``, ``64KiB``, ``1GiB``, ``1.5GB``."""
    if isinstance(text, int):
        return _non_negative(text, text, "size")
    value, unit = _split(text, "size")
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"invalid size {text!r}: unknown unit {unit!r} (use B, KiB, MiB, GiB, TiB)"
        )
    return _non_negative(int(value * factor), text, "size")


def parse_rate(text: str | int) -> int:
    """Bytes per second in ``text``: ``100MiB/s``, ``1Gbit/s``, ``10Gbps``, ``0``."""
    if isinstance(text, int):
        return _non_negative(text, text, "rate")
    value, unit = _split(text, "rate")
    low = unit.lower()
    if low.endswith("/s"):
        low = low[:-2]
        bits = _BIT_UNITS.get(low)
        if bits is not None and low.endswith("bit"):
            return _non_negative(int(value * bits / 8), text, "rate")
    elif low in _BIT_UNITS:
        return _non_negative(int(value * _BIT_UNITS[low] / 8), text, "rate")
    factor = _SIZE_UNITS.get(low)
    if factor is None:
        raise ValueError(
            f"invalid rate {text!r}: unknown unit {unit!r} (use e.g. 100MiB/s, 1Gbit/s, 10Gbps)"
        )
    return _non_negative(int(value * factor), text, "rate")


def parse_duration(text: str | float, default_unit: str = "s") -> float:
    """Seconds in ``text``: ``300ms``, ``2s``, ``1.5min``; bare numbers use ``default_unit``."""
    if isinstance(text, int | float):
        return _non_negative(float(text) * _TIME_UNITS[default_unit], text, "duration")
    value, unit = _split(text, "duration")
    factor = _TIME_UNITS.get(unit.lower() or default_unit)
    if factor is None:
        raise ValueError(f"invalid duration {text!r}: unknown unit {unit!r} (use ms, s, min)")
    return _non_negative(value * factor, text, "duration")


def _non_negative(value, text, what):
    if value < 0:
        raise ValueError(f"invalid {what} {text!r}: must not be negative")
    return value


def format_size(n: float) -> str:
    """A short human size: ``1.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
