"""The lab's post-copy comparison: ``mig bench postcopy-lab``.

On workloads pre-copy cannot converge on (the guest dirties memory faster
than the link carries it), five strategies in virtual time (``mig.sim``, the
real loop and policies, post-copy modelled by ``mig.sim_postcopy``):

* ``auto-converge``: pre-copy, the guest throttled until it converges;
* ``dirty-limit``: pre-copy, each vCPU's page writes capped at
  ``DIRTY_LIMIT_SHARE`` of the link's page rate (split among the vCPUs);
* ``postcopy``: post-copy when the policy sees the guest outrun the link
  (``postcopy_after_passes`` 0: the dirty rate measured over the first
  syncs, as ``mig demo --postcopy`` does);
* ``postcopy-at-once``: ``start_postcopy`` before the first pass; every
  page crosses once, on demand or pushed;
* ``hybrid-N``: ``N`` whole pre-copy passes, then post-copy.

Every post-copy runs in the engine's default push order
(``postcopy_push_order``; no strategy names one), as the simulator models it.

Compared on total time, downtime, guest progress (page writes completed
during the migration on both sides, and per second of migration) and
blocktime (all vCPUs blocked at once, and the most any one vCPU was).
``benches/postcopy_lab.py`` runs it, stores the result stamped with its
commit and writes the section of ``docs/lab.md`` from it (``render_section``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mig.lab import run_sweep
from mig.sim import HostModel, LinkModel, SimConfig

__all__ = [
    "DOCS_BEGIN",
    "DOCS_END",
    "STRATEGIES",
    "WORKLOADS",
    "configs",
    "render_section",
    "row",
    "run",
    "table",
]

MIB = 1 << 20
PAGE = 4096
LINK = 100 * MIB  # bytes/s: the 100 MiB/s
RTT = 200e-6  # s: a LAN round trip
DOWNTIME_LIMIT = 300  # ms
VCPUS = 2  # mig demo's default
TIMEOUT = 120.0  # s of virtual time, then forced over (as mig demo does)
DIRTY_LIMIT_SHARE = 0.25
HYBRID_PASSES = (1, 3)

# name -> (guest memory, workload): each dirties more than the link carries.
WORKLOADS: dict[str, tuple[int, str]] = {
    "sequential-256MiB": (1024 * MIB, "sequential:wss=256MiB,rate=961000"),
    "hotset-512MiB": (1024 * MIB, "hotset:wss=512MiB,rate=200000"),
    "uniform-512MiB": (1024 * MIB, "uniform:wss=512MiB,rate=100000"),
}


AT_ONCE = "start_postcopy"  # a strategy key that is SimConfig's, not a parameter


def _strategies() -> dict[str, dict[str, Any]]:
    limit = DIRTY_LIMIT_SHARE * LINK / PAGE / VCPUS
    out: dict[str, dict[str, Any]] = {
        "auto-converge": {"auto_converge": True},
        "dirty-limit": {"dirty_limit": limit},
        "postcopy": {"postcopy": True, "postcopy_after_passes": 0},
        "postcopy-at-once": {"postcopy": True, AT_ONCE: True},
    }
    for n in HYBRID_PASSES:
        out[f"hybrid-{n}"] = {"postcopy": True, "postcopy_after_passes": n}
    return out


STRATEGIES = _strategies()


def configs(
    host: HostModel | None = None, workloads: Sequence[str] | None = None
) -> list[SimConfig]:
    """Every workload under every strategy, on a ``LINK`` bytes/s link."""
    out = []
    for name in workloads or WORKLOADS:
        memory, workload = WORKLOADS[name]
        for strategy, options in STRATEGIES.items():
            params = {k: v for k, v in options.items() if k != AT_ONCE}
            out.append(
                SimConfig(
                    memory=memory,
                    workload=workload,
                    vcpus=VCPUS,
                    params={
                        "downtime_limit": DOWNTIME_LIMIT,
                        "timeout": TIMEOUT,
                        "timeout_action": "force",
                        **params,
                    },
                    link=LinkModel(bottleneck=LINK, rtt=RTT),
                    host=host or HostModel(),
                    label=f"{name}/{strategy}",
                    start_postcopy=bool(options.get(AT_ONCE)),
                )
            )
    return out


def row(q: dict[str, Any]) -> dict[str, Any]:
    """One run's figures: times, progress, blocktime."""
    workload, strategy = q["config"]["label"].split("/")
    there = q.get("destination-postcopy") or {}
    dest = (q.get("destination-guest") or {}).get("writes-during-migration", 0)
    source = q["sim"]["guest-writes"]
    seconds = q["total-time"] / 1000
    per_vcpu = (there.get("postcopy-vcpu-blocktime") or {}).values()
    return {
        "workload": workload,
        "strategy": strategy,
        "status": q["status"],
        "verified": bool(q.get("verified")),
        "total-time-s": seconds,
        "downtime-ms": q.get("downtime"),
        "source-writes": source,
        "destination-writes": dest,
        "writes-per-second": (source + dest) / seconds if seconds > 0 else 0.0,
        "throttle-pct": q.get("cpu-throttle-percentage", 0),
        "postcopy-blocktime-ms": there.get("postcopy-blocktime"),
        "max-vcpu-blocktime-ms": max(per_vcpu, default=None),
        "fault-latency-p50-ms": there.get("fault-latency-p50"),
        "fault-latency-p99-ms": there.get("fault-latency-p99"),
        "postcopy-requests": q.get("postcopy-requests"),
        "transferred-bytes": q["ram"]["transferred"]
        + (q.get("postcopy") or {}).get("postcopy-bytes", 0),
    }


def run(host: HostModel | None = None, workloads: Sequence[str] | None = None) -> list[dict]:
    """Simulate the comparison (the lab's process pool); one ``row`` per run."""
    return [row(q) for q in run_sweep(configs(host, workloads))]


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A Markdown table, one line per workload and strategy."""
    lines = [
        "| workload | strategy | status | total (s) | downtime (ms) | guest writes "
        "(source + destination) | writes/s | blocktime all / max vCPU (ms) "
        "| fault p50 / p99 (ms) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        block = (
            "-"
            if r["postcopy-blocktime-ms"] is None
            else f"{r['postcopy-blocktime-ms']:.0f} / {r['max-vcpu-blocktime-ms']:.0f}"
        )
        fault = (
            "-"
            if r["fault-latency-p50-ms"] is None
            else f"{r['fault-latency-p50-ms']:.2f} / {r['fault-latency-p99-ms']:.2f}"
        )
        lines.append(
            f"| {r['workload']} | {r['strategy']} | {r['status']} | {r['total-time-s']:.2f} "
            f"| {_num(r['downtime-ms'], '.0f')} "
            f"| {r['source-writes']} + {r['destination-writes']} "
            f"| {r['writes-per-second']:.0f} | {block} | {fault} |"
        )
    return lines


DOCS_BEGIN = "<!-- postcopy-lab:begin -->"
DOCS_END = "<!-- postcopy-lab:end -->"


def render_section(result: dict[str, Any], source: str) -> str:
    """The generated part of ``docs/lab.md``'s post-copy section, from a stored result."""
    head = (
        f"From `{source}` (commit `{result['commit']}`, {result['date']}, "
        f"host model: {result['host-model-source']}); generated by "
        "`python benches/postcopy_lab.py --docs`, not typed:"
    )
    return "\n".join([DOCS_BEGIN, head, "", *table(result["rows"]), DOCS_END])
