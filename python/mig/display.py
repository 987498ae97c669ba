"""Terminal rendering of migration statistics for the ``mig`` command.

Everything here is a pure function of a ``query()`` dictionary (QMP
``query-migrate`` names plus mig's own keys), so the live view, the summary
and the JSON output always show the same numbers.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from mig.display_postcopy import progress_rows, summary_rows
from mig.units import format_size

__all__ = ["format_ms", "format_rate", "progress_view", "summary_table", "destination_table"]

_STATUS_STYLE = {
    "completed": "bold green",
    "failed": "bold red",
    "cancelled": "bold yellow",
    "device": "bold magenta",
    "active": "bold cyan",
}


def format_rate(bytes_per_s: float) -> str:
    """``12.3 MiB/s``."""
    return f"{format_size(bytes_per_s)}/s"


def format_ms(ms: float | None) -> str:
    """``312 ms`` or ``1.25 s``; ``-`` when unknown."""
    if ms is None:
        return "-"
    return f"{ms / 1000:.2f} s" if ms >= 10_000 else f"{ms:.0f} ms"


def _ram(q: dict[str, Any]) -> dict[str, Any]:
    return q.get("ram") or {}


def _bandwidth(q: dict[str, Any]) -> float:
    """Bytes/s from ``ram.mbps`` (megabits per second, as QEMU reports it)."""
    return float(_ram(q).get("mbps", 0.0)) * 1e6 / 8


def _dirty_rate(q: dict[str, Any]) -> float:
    ram = _ram(q)
    return float(ram.get("dirty-pages-rate", 0.0)) * int(ram.get("page-size", 4096))


def _status(q: dict[str, Any]) -> Text:
    status = str(q.get("status", "none"))
    return Text(status, style=_STATUS_STYLE.get(status, "bold"))


def progress_view(q: dict[str, Any], title: str = "mig") -> RenderableType:
    """The live view: pass, remaining, dirty rate, bandwidth, expected downtime, throttle."""
    ram = _ram(q)
    total = int(ram.get("total", 0)) or 1
    remaining = int(ram.get("remaining", total))
    grid = Table.grid(padding=(0, 2))
    for _ in range(4):
        grid.add_column()
    grid.add_row(
        "status",
        _status(q),
        "pass",
        str(ram.get("dirty-sync-count", 0)),
    )
    grid.add_row(
        "remaining",
        format_size(remaining),
        "transferred",
        format_size(int(ram.get("transferred", 0))),
    )
    grid.add_row(
        "dirty rate",
        format_rate(_dirty_rate(q)),
        "bandwidth",
        format_rate(_bandwidth(q)),
    )
    expected = q.get("downtime", q.get("expected-downtime"))
    grid.add_row(
        "expected downtime" if "downtime" not in q else "downtime",
        format_ms(expected),
        "throttle",
        f"{q.get('cpu-throttle-percentage', 0)} %",
    )
    grid.add_row(
        "policy",
        str(q.get("policy", "-")),
        "guest stops",
        str(q.get("guest-stops", 0)),
    )
    progress_rows(grid, q)
    bar = ProgressBar(total=total, completed=max(0, total - remaining), width=60)
    return Panel(Group(bar, grid), title=title, expand=False)


def summary_table(q: dict[str, Any], title: str = "migration summary") -> Table:
    """The end-of-run table of a source ``query()``."""
    ram = _ram(q)
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("field", style="dim")
    t.add_column("value")
    t.add_row("status", _status(q))
    if q.get("error-desc"):
        t.add_row("reason", Text(str(q["error-desc"]), style="red"))
    t.add_row("policy", str(q.get("policy", "-")))
    t.add_row("total time", format_ms(q.get("total-time")))
    t.add_row("setup time", format_ms(q.get("setup-time")))
    if "downtime" in q:
        t.add_row("downtime", format_ms(q["downtime"]))
        parts = q.get("downtime-breakdown") or {}
        if parts:
            t.add_row("  breakdown", ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))
        if q.get("predicted-downtime") is not None:
            t.add_row("  predicted", format_ms(q["predicted-downtime"]))
    else:
        t.add_row("expected downtime", format_ms(q.get("expected-downtime")))
    if ram:
        t.add_row("RAM", format_size(int(ram.get("total", 0))))
        t.add_row("transferred", format_size(int(ram.get("transferred", 0))))
        t.add_row("  precopy", format_size(int(ram.get("precopy-bytes", 0))))
        t.add_row("  in downtime", format_size(int(ram.get("downtime-bytes", 0))))
        t.add_row(
            "pages",
            f"{ram.get('normal', 0)} normal, {ram.get('duplicate', 0)} zero",
        )
        t.add_row("passes", str(ram.get("dirty-sync-count", 0)))
        t.add_row("bandwidth", f"{float(ram.get('mbps', 0.0)):.0f} Mbit/s")
    t.add_row("throttle", f"{q.get('cpu-throttle-percentage', 0)} %")
    t.add_row(
        "guest stops",
        f"{q.get('guest-stops', 0)} ({format_ms(q.get('guest-stopped-time', 0.0))} stopped)",
    )
    if q.get("non-convergence"):
        t.add_row("non-convergence", str(q["non-convergence"]))
    for dev in q.get("devices") or []:
        t.add_row(
            f"device {dev.get('name')}",
            f"{dev.get('type')}: {format_size(int(dev.get('precopy-bytes', 0)))} precopy, "
            f"{format_size(int(dev.get('stop-copy-bytes', 0)))} stop-copy",
        )
    summary_rows(t, q)
    _verified_rows(t, q)
    if q.get("destination-memory"):
        t.add_row("destination memory", _memory_backing(q["destination-memory"]))
    return t


def _memory_backing(q: dict[str, Any]) -> str:
    """``anon-thp, pages of 2.0 MiB, 64.0 MiB in huge pages``."""
    got = f"{q['memory-backing']}, pages of {format_size(int(q.get('memory-page-size', 0)))}"
    if "memory-huge-bytes" in q:
        got += f", {format_size(int(q['memory-huge-bytes']))} in huge pages"
    return got


def _verified_rows(t: Table, q: dict[str, Any]) -> None:
    """Whether the memory digests agreed, in which ``verify`` mode, and why not."""
    mode = q.get("verify")
    verdict = "yes" if q.get("verified") else "no"
    if mode:
        verdict += f" ({mode}" + (
            f", {format_ms(q['verify-time'])} after completion)" if "verify-time" in q else ")"
        )
    t.add_row("verified", verdict)
    if q.get("verify-error"):
        t.add_row("verify error", Text(str(q["verify-error"]), style="red"))


def destination_table(q: dict[str, Any], title: str = "incoming migration") -> Table:
    """The end-of-run table of a destination ``query()`` or a restore."""
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("field", style="dim")
    t.add_column("value")
    t.add_row("status", _status(q))
    if q.get("error-desc"):
        t.add_row("reason", Text(str(q["error-desc"]), style="red"))
    for key in ("file", "file-size", "passes", "load-time", "total-time", "downtime"):
        if key in q:
            v = q[key]
            text = format_size(v) if key == "file-size" else str(v)
            t.add_row(key.replace("-", " "), format_ms(v) if key.endswith("time") else text)
    ram = _ram(q)
    if ram:
        t.add_row("RAM", format_size(int(ram.get("total", 0))))
    if q.get("memory-digest"):
        t.add_row("memory digest", str(q["memory-digest"]))
    if q.get("memory-backing"):
        t.add_row("memory backing", _memory_backing(q))
    for dev in q.get("devices") or []:
        what = dev.get("status") or format_size(int(dev.get("bytes", 0)))
        t.add_row(f"device {dev.get('name')}", f"{dev.get('type')}: {what}")
    if "verified" in q:
        _verified_rows(t, q)
    return t
