"""The source loop's own work after each sync, in virtual time.

After every RAM sync the engine's loop records the pass (``Precopy.after_sync``:
the pass record, its announcement to the destination, the event to the
listeners, the convergence monitor's figures) and asks the policy again.
That is interpreter time, a fraction of a millisecond per sync on a small
host. While the guest runs it only lengthens a pass; after a stop for an
exact size it is downtime: ``stop-exact-resume``'s switchover pays it
between the pause and the stop-copy, in the ``pause`` term.

``HostModel.sync_bookkeeping`` charges it after every simulated sync.
``sync_bookkeeping_seconds`` measures it on this host from real loopback
migrations to ``mig demo``'s destination (its own process, as the runs
``--simulate`` predicts) under ``stop-exact-resume``: the ``pause`` term,
less what the model charges for the rest of it (the vCPUs' stop,
``pause_latency``, and the exact sync of that guest's memory), median of
the runs.
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["CALIBRATION_MEMORY", "sync_bookkeeping_seconds"]

CALIBRATION_MEMORY = 16 << 20
CALIBRATION_POLICY = "stop-exact-resume"
# A guest that writes, so each sync harvests pages and each pass carries them.
CALIBRATION_WORKLOAD = "uniform:rate=2000"
PAGE_SIZE = 4096


def sync_bookkeeping_seconds(host: Any, runs: int = 5) -> float:
    """Seconds of the loop's work per sync beyond the sync itself, for a
    model ``host`` whose ``pause_latency`` and tracker terms are measured."""
    from mig.sim import _idle_loopback_migration  # noqa: PLC0415 (it imports this module)

    def pause_term() -> float:
        options = {"policy": CALIBRATION_POLICY, "workload": CALIBRATION_WORKLOAD}
        q, _ = _idle_loopback_migration(CALIBRATION_MEMORY, True, 0, demo=True, **options)
        return float(q["downtime-breakdown"]["pause"]) / 1000

    modelled = (
        host.pause_latency + host.sync_base + host.sync_per_page * (CALIBRATION_MEMORY // PAGE_SIZE)
    )
    return max(0.0, statistics.median(pause_term() - modelled for _ in range(runs)))
