"""Post-copy's figures and the guest's progress in the terminal views.

``progress_rows`` adds to the live view (requests, chunks owed and still
to send); ``summary_rows`` to the summary: requests, requested against
pushed chunks, blocktime, fault latency and the guest's page writes during
the migration on each side (the destination's, in the demo, come from its
own ``query()``).
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

__all__ = ["progress_rows", "summary_rows"]


def progress_rows(grid: Table, q: dict[str, Any]) -> None:
    pc = q.get("postcopy")
    if not pc:
        return
    grid.add_row(
        "postcopy requests",
        str(pc.get("postcopy-requests", 0)),
        "chunks left",
        f"{pc.get('remaining-chunks', 0)} of {pc.get('owed-chunks', 0)}",
    )


def format_ms(ms: float | None) -> str:
    """Sub-millisecond figures (fault latency) keep their precision."""
    return "-" if ms is None else f"{ms:.3f} ms" if ms < 10 else f"{ms:.0f} ms"


def _writes(g: dict[str, Any]) -> str:
    return (
        f"{int(g.get('writes-during-migration', 0))} page writes "
        f"({float(g.get('writes-per-second', 0.0)):.0f}/s)"
    )


def summary_rows(t: Table, q: dict[str, Any]) -> None:
    pc = q.get("postcopy")
    if pc:
        t.add_row(
            "postcopy",
            f"{pc.get('postcopy-requests', 0)} requests; chunks: "
            f"{pc.get('requested-chunks', 0)} requested, {pc.get('pushed-chunks', 0)} pushed"
            f" of {pc.get('owed-chunks', 0)} owed",
        )
    there = q.get("destination-postcopy") or {}
    if there:
        vcpu = there.get("postcopy-vcpu-blocktime") or {}
        per = ", ".join(format_ms(v) for v in vcpu.values()) or "-"
        t.add_row(
            "  blocktime",
            f"{format_ms(there.get('postcopy-blocktime'))} all vCPUs, per vCPU {per}",
        )
        t.add_row(
            "  fault latency",
            f"p50 {format_ms(there.get('fault-latency-p50'))}, "
            f"p99 {format_ms(there.get('fault-latency-p99'))}",
        )
    if q.get("guest"):
        t.add_row("source guest", _writes(q["guest"]))
    if q.get("destination-guest"):
        t.add_row("destination guest", _writes(q["destination-guest"]))
