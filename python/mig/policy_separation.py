"""Which completion policies the policy lab's runs cannot tell apart.

Two policies are told apart when, in at least one matrix row (the same
guest, workload, devices, bandwidth and limit), a figure of their runs
differs: status, downtime, total time, bytes sent, passes or guest stops. A
pair that no row separates means the matrix cannot answer which of the two
is better, whatever its tables say.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from itertools import combinations
from typing import Any

__all__ = ["FIGURES", "alike_pairs", "outcome", "row_key"]

# The figures compared; labels (policy name, reason strings) are not.
FIGURES = ("status", "downtime", "total-time", "transferred", "passes", "guest-stops")


def row_key(q: dict[str, Any]) -> tuple[Any, ...]:
    """A run's matrix row: everything in its config except the policy."""
    c = q["config"]
    params = c["params"]
    return (
        c["memory"],
        c["workload"],
        tuple(c["devices"]),
        params.get("max_bandwidth"),
        params.get("downtime_limit"),
        c.get("seed"),
    )


def outcome(q: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run that a policy can change."""
    return {
        "status": q["status"],
        # Sub-microsecond differences are float noise of the virtual clock.
        "downtime": round(float(q.get("downtime") or 0.0), 3),
        "total-time": round(float(q.get("total-time") or 0.0), 3),
        "transferred": int(q.get("ram", {}).get("transferred", 0)),
        "passes": len(q.get("passes", [])),
        "guest-stops": int(q.get("guest-stops", 0)),
    }


def alike_pairs(runs: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of policies whose runs have equal figures in every shared row."""
    rows: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
    for q in runs:
        rows[row_key(q)][q["policy"]] = outcome(q)
    policies = sorted({p for row in rows.values() for p in row})
    alike = []
    for a, b in combinations(policies, 2):
        shared = [row for row in rows.values() if a in row and b in row]
        if shared and all(row[a] == row[b] for row in shared):
            alike.append((a, b))
    return alike
