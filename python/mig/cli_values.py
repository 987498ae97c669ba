"""Option value types for the ``mig`` command line.

Each converter parses one option's text and checks its range, so a bad value
is reported by argparse as a one-line error naming the option (exit code 2)
before any guest is started.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mig.units import parse_rate

__all__ = ["typed", "int_range", "device_specs", "dirty_limit", "positive", "policy_names"]


MAX_VCPUS = 256  # --vcpus, on the source's guest and on serve's resumed workload


def typed(
    parse: Callable[[str], Any], check: Callable[[Any], str | None] | None = None
) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses with ``parse`` and rejects what ``check`` names."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        problem = check(value) if check else None
        if problem:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {problem}")
        return value

    # argparse names the type in its "invalid <name> value" message.
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def int_range(lo: int, hi: int) -> Callable[[str], Any]:
    """An integer in ``lo..hi`` inclusive."""

    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"invalid integer {text!r}") from None

    return typed(parse, lambda v: None if lo <= v <= hi else f"must be in {lo}..{hi}")


def positive(v: float) -> str | None:
    """The check for values that must be greater than 0."""
    return None if v > 0 else "must be greater than 0"


def device_specs(text: str) -> str:
    """A device spec list, checked now; ``none`` (or empty) for no devices."""
    if text.strip().lower() in ("", "none"):
        return "none"
    from mig.devices import parse_specs

    try:
        specs = parse_specs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return ";".join(str(s) for s in specs)


def dirty_limit(text: str) -> float:
    """Page writes/s per vCPU: a plain number, or a rate with units (``8MiB/s``)."""
    try:
        return float(text) if _is_number(text) else parse_rate(text) / page_size()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def page_size() -> int:
    """The host's base page size, as the native module reports it."""
    from mig import _mig

    return int(_mig.page_size)


def policy_names() -> list[str] | None:
    """The completion policies ``--policy`` accepts (None when they cannot load)."""
    try:
        from mig.policies import policy_names as names
    except ImportError:
        return None
    return list(names())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
