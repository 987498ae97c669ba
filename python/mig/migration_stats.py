"""``MigrationStats``: the source's figures as ``query-migrate`` reports them.

QEMU's field names, plus mig's own keys (``passes``, ``devices``,
``switchover-costs``, ``downtime-breakdown``, ...). It reads the live
pieces of one migration and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mig._mig import GuestMemory
from mig.convergence_monitor import ConvergenceMonitor
from mig.counting_link import CountingLink
from mig.guest_stops import GuestStops
from mig.handlers import SaveHandler
from mig.precopy import Precopy
from mig.stats import BandwidthMeter, SwitchoverCosts
from mig.switchover import SwitchoverRun

__all__ = ["MigrationStats"]


@dataclass
class MigrationStats:
    """What ``query()`` reads; the running parts are None until setup built them."""

    memory: GuestMemory
    policy_name: str
    devices: list[SaveHandler]
    costs: SwitchoverCosts
    meter: BandwidthMeter
    monitor: ConvergenceMonitor
    stops: GuestStops
    verify_mode: str = "after-resume"
    status: str = "none"
    error: str | None = None
    postmigrate: bool = False
    started_at: float | None = None
    ended_at: float | None = None
    setup_time: float = 0.0
    link: CountingLink | None = None
    precopy: Precopy | None = None
    switchover: SwitchoverRun | None = None

    def to_qmp(self, now: float) -> dict[str, Any]:
        now = now if self.ended_at is None else self.ended_at
        start = self.started_at if self.started_at is not None else now
        precopy, switchover = self.precopy, self.switchover
        out: dict[str, Any] = {
            "status": self.status,
            "total-time": (now - start) * 1000,
            "setup-time": self.setup_time * 1000,
            "cpu-throttle-percentage": int(round(self.monitor.throttle * 100)),
            "policy": self.policy_name,
            "guest-stops": self.stops.count,
            "guest-stopped-time": self.stops.stopped_time * 1000,
            "downtime-breakdown": {
                k: v * 1000 for k, v in (switchover.breakdown if switchover else {}).items()
            },
            "verify": self.verify_mode,
            "verified": switchover.verified if switchover else False,
            "non-convergence": self.monitor.reason,
            "switchover-aborts": precopy.switchover_aborts if precopy else 0,
            "passes": [p.to_dict() for p in precopy.passes] if precopy else [],
            "devices": self._device_stats(),
        }
        downtime = switchover.downtime if switchover else None
        postcopy = switchover.postcopy.stats() if switchover and switchover.postcopy else {}
        if postcopy:
            out["postcopy-requests"] = postcopy["postcopy-requests"]
            out["postcopy"] = postcopy
        if self.status in ("completed", "postcopy-active", "postcopy-paused") and downtime:
            out["downtime"] = downtime * 1000
        else:
            out["expected-downtime"] = precopy.expected_downtime() * 1000 if precopy else 0
        if switchover is not None and switchover.predicted_downtime is not None:
            out["predicted-downtime"] = switchover.predicted_downtime * 1000
        # The plan the switchover was predicted with, once there was one.
        plan = switchover.plan if switchover is not None and switchover.plan else None
        out["switchover-costs"] = {k: v * 1000 for k, v in (plan or self.costs.terms()).items()}
        if switchover is not None and switchover.settle_time is not None:
            out["settle-time"] = switchover.settle_time * 1000
        if switchover is not None and switchover.verify_time is not None:
            out["verify-time"] = switchover.verify_time * 1000
        if switchover is not None and switchover.verify_error is not None:
            out["verify-error"] = switchover.verify_error
        if self.error:
            out["error-desc"] = self.error
        if self.postmigrate:
            out["postmigrate"] = True
        if precopy is not None:
            out["ram"] = self._ram_stats(precopy, now - start)
        return out

    def _ram_stats(self, precopy: Precopy, total: float) -> dict[str, Any]:
        ram, link = precopy.ram, precopy.link
        page = self.memory.page_size
        transferred = link.transferred()
        link_stats = _safe_stats(link)
        normal = int(link_stats.get("normal", ram.pages_sent))
        active_time = link.busy_time() or 0.0
        return {
            "transferred": transferred,
            "remaining": ram.pending_estimate() if self.status != "completed" else 0,
            "total": self.memory.size,
            "duplicate": int(link_stats.get("duplicate", link_stats.get("zero-pages", 0))),
            "normal": normal,
            "normal-bytes": normal * page,
            "dirty-sync-count": ram.sync_count,
            "mbps": self._mbps(transferred, total),
            "dirty-pages-rate": ram.dirty_pages_rate,
            "pages-per-second": ram.pages_sent / active_time if active_time else 0.0,
            "precopy-bytes": ram.precopy_bytes,
            "downtime-bytes": ram.downtime_bytes,
            "sync-time": ram.sync_seconds * 1000,
            "page-size": page,
        }

    def _mbps(self, transferred: int, total: float) -> float:
        if self.status == "completed":
            span = total - self.setup_time
            return transferred * 8 / span / 1e6 if span > 0 else 0.0
        return self.meter.last_sample * 8 / 1e6

    def _device_stats(self) -> list[dict[str, Any]]:
        link = self.link
        out = []
        for h in self.devices:
            dev = getattr(h, "device_id", None)
            out.append(
                {
                    "name": h.name,
                    "type": _device_type(h),
                    "precopy-bytes": link.precopy_bytes.get(dev, 0) if link else 0,
                    "stop-copy-bytes": link.stop_copy_bytes.get(dev, 0) if link else 0,
                }
            )
        return out


def _device_type(h: SaveHandler) -> str:
    """The device's own type (nic, gpu, ...), else the handler's role."""
    device = getattr(h, "device", None)
    return str(getattr(device, "model", None) or h.role)


def _safe_stats(link: Any) -> dict[str, Any]:
    try:
        return dict(link.stats())
    except Exception:
        return {}
