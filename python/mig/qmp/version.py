"""The version a QMP greeting and ``query-version`` report: mig's own."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["package_version"]


def package_version() -> dict[str, Any]:
    """``QMPServer`` keywords: mig's version as (major, minor, micro) and its package name.

    The numbers are mig's, not a QEMU release's: a client that checks for a
    QEMU version must not take mig for one.
    """
    try:
        text = version("mig")
    except PackageNotFoundError:
        text = "0.0.0"
    parts = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return {"version": (parts[0], parts[1], parts[2]), "package": f"mig {text}"}
