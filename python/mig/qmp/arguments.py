"""Argument checks with QEMU's error texts (its QAPI input visitor's wording)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mig.qmp.errors import QMPError

__all__ = ["check_arguments", "check_type", "JSON_TYPE_NAMES"]

# QAPI's names for the JSON types, as its errors print them.
JSON_TYPE_NAMES: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    dict: "object",
}


def check_type(name: str, value: Any, expected: type) -> None:
    """``GenericError`` unless ``value`` is of JSON type ``expected``.

    A bool is not an integer here (it is in Python), and an integer is a
    valid number, as in JSON.
    """
    if expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise QMPError(
            f"Invalid parameter type for '{name}', expected: {JSON_TYPE_NAMES[expected]}"
        )


def check_arguments(
    arguments: Mapping[str, Any],
    required: Mapping[str, type],
    optional: Mapping[str, type],
) -> None:
    """Every required argument present, none unknown, each of its type."""
    for name in required:
        if name not in arguments:
            raise QMPError(f"Parameter '{name}' is missing")
    for name, value in arguments.items():
        expected = required.get(name, optional.get(name))
        if expected is None:
            raise QMPError(f"Parameter '{name}' is unexpected")
        check_type(name, value, expected)
