"""The policy lab: ``mig bench policies``.

Runs a matrix of workloads × devices × policies × bandwidths × downtime
limits in virtual time (``mig.sim``), optionally for real over loopback, and
a validation set run both ways. Writes ``results.json`` (``runs``: one
``query()`` per run; ``validation``: one row per configuration with relative
errors in ``*-error`` keys), ``report.md`` and PNG plots.

The CLI calls ``main(argv)`` for ``mig bench ...``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mig.device_handler import DeviceHandler
from mig.policies import policy_names
from mig.sim import HostModel, LinkModel, SimConfig, simulate
from mig.units import parse_size

__all__ = [
    "DEVICE_SETS",
    "METRICS",
    "ValidationCase",
    "compare",
    "bound_failures",
    "choose_default",
    "error_summary",
    "live_cases",
    "main",
    "matrix",
    "run_real",
    "run_sweep",
    "earns_default",
    "summarise",
    "sweep_timeout",
    "validation_cases",
    "validation_table",
    "write_report",
]

MIB = 1 << 20
GIB = 1 << 30
# Device sets of the matrix: one of each sample type, sized so that the
# device state is a visible share of bandwidth × downtime limit, and sets
# whose stop-copy state is large in each way a policy can see it. A device
# with PRE_COPY (nic, gpu) sends its state during precopy and leaves little
# for the stop-copy phase, so policies that count or ignore device state
# decide alike there; the last three sets are what tells them apart.
DEVICE_SETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "fixed": ("fixed",),
    "nic": ("nic:state=16MiB,rate=8MiB/s,grow=512KiB/s",),
    "opaque": ("opaque:state=16MiB,rate=8MiB/s",),
    "gpu": ("gpu:state=64MiB,rate=16MiB/s,chunk=64KiB",),
    "dma": ("dma:dma=4MiB/s",),
    # 24 MiB left for stop-copy, its size known while running (DATA_SIZE,
    # no PRE_COPY): counting it or assuming 0 bytes gives different downtimes.
    "big-known": ("fixed:state=24MiB,rate=1MiB/s",),
    # The same size known only once stopped (no DATA_SIZE), next to a smaller
    # one known while running: the policies that stop the guest to size it,
    # cache its size or predict it part from those that take the estimate.
    "big-stopped": ("fixed:state=8MiB,rate=1MiB/s", "opaque:state=8MiB,rate=2MiB/s"),
    # Stop-copy state that grows during precopy (4 MiB/s from 4 MiB, known
    # while running): an exact size taken early is stale at switchover.
    "growing": ("fixed:state=4MiB,grow=4MiB/s,max=64MiB",),
}
METRICS = ("total-time", "downtime", "transferred", "passes")
VALIDATION_MEMORY = 128 * MIB
# A run that has not converged after this many full-memory passes at the
# configured bandwidth is cancelled (bounded by the clamp below): a
# configuration that cannot meet its limit (device state alone above
# bandwidth × limit) would otherwise spin until a fixed virtual timeout.
TIMEOUT_PASSES = 8.0
TIMEOUT_CLAMP = (5.0, 60.0)


def sweep_timeout(memory: int, devices: Sequence[str], bandwidth: float) -> float:
    """Virtual seconds a matrix run may take before it counts as not converged."""
    from mig.devices import parse_specs  # noqa: PLC0415

    state = 0
    for spec in parse_specs(list(devices)) if devices else []:
        state += int(parse_size(spec.options["state"])) if "state" in spec.options else 0
    lo, hi = TIMEOUT_CLAMP
    return min(hi, max(lo, TIMEOUT_PASSES * (memory + state) / bandwidth))


# ------------------------------------------------------------------ matrix
def matrix(quick: bool, device_sets: Iterable[str] | None = None) -> list[SimConfig]:
    """The simulated sweep: workloads × device types × policies × bandwidths × limits.

    ``quick`` keeps every device type and every policy, with fewer values on
    the other axes; ``device_sets`` keeps only those ``DEVICE_SETS``. The
    guest is small enough (256 MiB) that the fixed switchover costs (the
    whole-memory digest on both sides, about 70 ms with the default
    ``HostModel``) leave room under every limit.
    """
    if quick:
        memories = [256 * MIB]
        workloads = ["uniform:rate=20000", "hotset:rate=60000,wss=128MiB"]
        bandwidths = [2.5e9 / 8, 10e9 / 8]
        limits = [100, 300]
    else:
        memories = [256 * MIB]
        workloads = [
            "uniform:rate=20000",
            "uniform:rate=60000",
            "hotset:rate=60000,wss=128MiB",
            "zipf:rate=100000",
            "sequential:rate=50000,wss=64MiB",
        ]
        bandwidths = [2.5e9 / 8, 10e9 / 8, 25e9 / 8]
        limits = [100, 200, 300, 1000]
    out = []
    for mem in memories:
        for wl in workloads:
            for dev_name, devs in DEVICE_SETS.items():
                if device_sets is not None and dev_name not in device_sets:
                    continue
                for pol in policy_names():
                    for bw in bandwidths:
                        for lim in limits:
                            out.append(
                                SimConfig(
                                    memory=mem,
                                    workload=wl,
                                    vcpus=2,
                                    devices=devs,
                                    policy=pol,
                                    params={
                                        "max_bandwidth": int(bw),
                                        "downtime_limit": lim,
                                        "multifd_channels": 4,
                                        "timeout": sweep_timeout(mem, devs, bw),
                                    },
                                    link=LinkModel(rtt=100e-6),
                                    label=dev_name,
                                )
                            )
    return out


# -------------------------------------------------------------- validation
@dataclass(frozen=True)
class ValidationCase:
    name: str
    config: SimConfig


def validation_cases(host: HostModel | None = None) -> list[ValidationCase]:
    """Small configurations run both for real (loopback) and simulated."""
    host = host or HostModel()
    rows = [
        # (workload, rate pages/s, bandwidth cap, policy, devices)
        ("uniform", 4000, 64 * MIB, "estimate-only", ("fixed",)),
        ("uniform", 4000, 64 * MIB, "exact-running", ("nic:state=4MiB,rate=1MiB/s",)),
        ("uniform", 12000, 64 * MIB, "stop-exact-resume", ("opaque:state=4MiB,rate=1MiB/s",)),
        ("uniform", 12000, 128 * MIB, "adaptive", ("opaque:state=4MiB,rate=1MiB/s",)),
        ("hotset", 20000, 64 * MIB, "exact-running", ("fixed",)),
        ("hotset", 20000, 128 * MIB, "device-checks-sla", ("nic:state=4MiB,rate=1MiB/s",)),
        ("hotset", 40000, 128 * MIB, "cached-exact", ("opaque:state=4MiB,rate=1MiB/s",)),
        ("zipf", 20000, 64 * MIB, "assume-zero-device", ("opaque:state=4MiB,rate=1MiB/s",)),
        ("zipf", 40000, 128 * MIB, "adaptive", ("nic:state=4MiB,rate=1MiB/s",)),
        ("sequential", 4000, 64 * MIB, "stop-exact-resume", ("fixed",)),
        ("sequential", 8000, 128 * MIB, "estimate-only", ("dma:dma=1MiB/s",)),
        ("uniform", 8000, 96 * MIB, "cached-exact", ("dma:dma=1MiB/s",)),
    ]
    wss = {"hotset": ",wss=64MiB", "zipf": "", "sequential": ",wss=32MiB", "uniform": ""}
    out = []
    for i, (pattern, rate, bw, pol, devs) in enumerate(rows):
        cfg = SimConfig(
            memory=VALIDATION_MEMORY,
            workload=f"{pattern}:rate={rate}{wss[pattern]}",
            vcpus=1,
            devices=devs,
            policy=pol,
            params={
                "max_bandwidth": int(bw),
                "downtime_limit": 300,
                "multifd_channels": 2,
                "timeout": 60.0,
            },
            link=LinkModel(rtt=100e-6),
            host=host,
            seed=i + 1,
            label=f"v{i + 1:02d}",
        )
        out.append(ValidationCase(f"v{i + 1:02d}", cfg))
    return out


# The live sample CI runs (``tests/test_lab.py``): small guests at a capped
# bandwidth, so three configurations × three runs per side take well under a
# minute on two shared cores, with a device of each way of sizing state.
LIVE_MEMORY = 64 * MIB
# Runs per side and case: a real downtime varies widely from run to run on a
# loaded host (see SLACK), and a median of five is steadier than one of three.
LIVE_REPEATS = 5
LIVE_BANDWIDTH = 64 * MIB
LIVE_ROWS = (
    # (workload, policy, devices)
    ("uniform:rate=4000", "exact-running", ("nic:state=4MiB,rate=1MiB/s",)),
    ("hotset:rate=20000,wss=32MiB", "adaptive", ("opaque:state=4MiB,rate=1MiB/s",)),
    ("sequential:rate=4000,wss=16MiB", "stop-exact-resume", ("fixed",)),
)


def live_cases(host: HostModel | None = None) -> list[ValidationCase]:
    """The live validation sample: each case run for real and simulated."""
    out = []
    for i, (workload, pol, devs) in enumerate(LIVE_ROWS):
        cfg = SimConfig(
            memory=LIVE_MEMORY,
            workload=workload,
            vcpus=1,
            devices=devs,
            policy=pol,
            params={
                "max_bandwidth": LIVE_BANDWIDTH,
                "downtime_limit": 300,
                "multifd_channels": 2,
                "timeout": 60.0,
            },
            link=LinkModel(rtt=100e-6),
            host=host or HostModel(),
            seed=i + 1,
            label=f"live{i + 1}",
        )
        out.append(ValidationCase(f"live{i + 1}", cfg))
    return out


def run_real(cfg: SimConfig) -> dict[str, Any]:
    """Run ``cfg`` for real: a ``WorkloadGuest`` migrated over loopback TCP."""
    from mig._mig import GuestMemory, WorkloadGuest  # noqa: PLC0415
    from mig.destination import MigrationDestination  # noqa: PLC0415
    from mig.devices import create_all  # noqa: PLC0415
    from mig.source import MigrationSource  # noqa: PLC0415

    src, dst = GuestMemory(cfg.memory), GuestMemory(cfg.memory)
    if cfg.prefilled:
        src.array[:] = 0x5A  # every page non-zero, as the simulated guest assumes
    specs = list(cfg.devices)
    guest = WorkloadGuest(src, vcpus=cfg.vcpus, workload=cfg.workload)
    sdevs = create_all(specs, src) if specs else []
    ddevs = create_all(specs, dst, active=False) if specs else []
    try:
        loaders = [_DigestOnResume(d, device_id=i) for i, d in enumerate(ddevs, start=1)]
        dest = MigrationDestination("tcp:127.0.0.1:0", dst, loaders)
        source = MigrationSource(guest, sdevs, uri=dest.uri, policy=cfg.policy, **cfg.params)
        dest.start()
        source.start()
        q = source.wait(float(cfg.params.get("timeout", 60)) + 60)
        d = dest.wait(60)
        # The stopped source against what the destination loaded, before
        # anything ran there (a running device changes its state, a DMA
        # device the memory).
        memory_match = d.get("memory-digest") == format(src.digest(), "032x")
        devices_match = all(
            s.state_digest() == h.loaded_digest for s, h in zip(sdevs, loaders, strict=True)
        )
    finally:
        guest.close()
        for d in sdevs + ddevs:
            d.close()
    q["devices"] = [{**d, "type": dev.model} for d, dev in zip(q["devices"], sdevs, strict=True)]
    # Memory and every device's state equal on both sides, byte for byte.
    q["digest-match"] = q["status"] == "completed" and memory_match
    q["devices-match"] = q["status"] == "completed" and devices_match
    q["config"] = cfg.to_dict()
    q["workload"] = cfg.workload
    return q


class _DigestOnResume(DeviceHandler):
    """A destination device handler that digests the loaded state before it runs."""

    loaded_digest: int | None = None

    def load_resume(self) -> None:
        self.loaded_digest = self.device.state_digest()
        super().load_resume()


def _metric(q: dict[str, Any], key: str) -> float:
    if key == "transferred":
        return float(q.get("ram", {}).get("transferred", 0))
    if key == "passes":
        return float(len(q.get("passes", [])))
    return float(q.get(key) or 0.0)


def compare(
    name: str,
    real: dict[str, Any] | Sequence[dict[str, Any]],
    sim: dict[str, Any] | Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """One validation row: both values of every metric and the relative error.

    ``real`` may be several real runs of the same case: each metric's real
    value is then their median (a shared host makes single real runs noisy).
    ``sim`` likewise: simulated runs with different seeds of the link's
    jitter, whose median is compared with the real median.
    """
    reals = [real] if isinstance(real, dict) else list(real)
    sims = [sim] if isinstance(sim, dict) else list(sim)
    first = reals[0]
    row: dict[str, Any] = {
        "name": name,
        "workload": first.get("workload"),
        "policy": first.get("policy"),
        "devices": [d["type"] for d in first.get("devices", [])],
        "max-bandwidth": first["config"]["params"].get("max_bandwidth"),
        "real-runs": len(reals),
        "real-status": ",".join(sorted({q["status"] for q in reals})),
        "sim-status": ",".join(sorted({q["status"] for q in sims})),
    }
    for m in METRICS:
        values = [_metric(q, m) for q in reals]
        simulated = [_metric(q, m) for q in sims]
        r = statistics.median(values)
        s = statistics.median(simulated)
        row[f"real-{m}"] = r
        row[f"sim-{m}"] = s
        # A real value of 0 measured nothing: no error can be small against it.
        row[f"{m}-error"] = abs(s - r) / r if r > 0 else math.inf
        slack = max(SLACK.get(m, 0.0), _mad(values) + _mad(simulated))
        row[f"{m}-slack"] = slack
        row[f"{m}-excess"] = max(0.0, abs(s - r) - slack) / r if r > 0 else math.inf
    return row


def _mad(xs: Sequence[float]) -> float:
    """Median absolute deviation from the median: how far one median of a few
    runs may sit from the value more runs would give."""
    mid = statistics.median(xs)
    return statistics.median(abs(x - mid) for x in xs)


# What a validation row may miss by before its relative error counts
# (``*-excess``), in the metric's unit: the spread of the runs themselves
# (median absolute deviation of the real runs plus that of the simulated
# ones), and at least these floors. Downtime: a migration switches over once
# what is left fits the limit, and what is left at that moment lies anywhere
# below it, so one run's downtime varies widely from the next (on a loaded
# two-core host by more than 100 ms for a 300 ms limit); a median of three
# runs is only known to within that spread. Passes: a count; one pass more
# or less is the sync that lands either side of the threshold.
SLACK = {"downtime": 20.0, "passes": 1.0}
MEDIAN_BOUND, MAX_BOUND = 0.15, 0.30


def bound_failures(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every metric whose median ``*-excess`` over the rows is above
    ``MEDIAN_BOUND`` or whose largest is above ``MAX_BOUND``; empty if none."""
    out = []
    for m in METRICS:
        excess = [r[f"{m}-excess"] for r in rows]
        med, worst = statistics.median(excess), max(excess)
        if med > MEDIAN_BOUND or worst > MAX_BOUND:
            out.append(f"{m}: median excess {med:.1%}, max {worst:.1%}")
    return out


def error_summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median and maximum relative error per metric."""
    out = {}
    for m in METRICS:
        errs = [r[f"{m}-error"] for r in rows]
        excess = [r.get(f"{m}-excess", e) for r, e in zip(rows, errs, strict=True)]
        out[m] = (
            {
                "median": statistics.median(errs),
                "max": max(errs),
                "median-excess": statistics.median(excess),
                "max-excess": max(excess),
            }
            if errs
            else {}
        )
    return out


# ------------------------------------------------------------------ sweeps
def _sim_one(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return simulate(SimConfig.from_dict(cfg_dict))


def run_sweep(
    configs: Sequence[SimConfig],
    *,
    executor: Executor | None = None,
    dask_address: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Simulate every config in parallel (a process pool, or a Dask cluster)."""
    payload = [c.to_dict() for c in configs]
    results: list[dict[str, Any] | None] = [None] * len(payload)
    if dask_address:
        from dask.distributed import Client  # noqa: PLC0415
        from dask.distributed import as_completed as dask_completed

        with Client(dask_address) as client:
            futures = client.map(_sim_one, payload, pure=False)
            index = {f.key: i for i, f in enumerate(futures)}
            for fut in dask_completed(futures):
                results[index[fut.key]] = fut.result()
                if progress:
                    progress(1)
        return [r for r in results if r is not None]
    own = executor is None
    ex = executor or ProcessPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        futs = {ex.submit(_sim_one, p): i for i, p in enumerate(payload)}
        for fut in as_completed(futs):
            results[futs[fut]] = fut.result()
            if progress:
                progress(1)
    finally:
        if own:
            ex.shutdown()
    return [r for r in results if r is not None]


def run_validation(
    cases: Sequence[ValidationCase],
    progress: Callable[[int], None] | None = None,
    repeats: int = 3,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Each case ``repeats`` times for real (one at a time) and as many times
    simulated, with one seed of the link's jitter each (the simulation is
    otherwise deterministic); returns (real runs, sims, rows)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    reals, sims, rows = [], [], []
    for case in cases:
        these = []
        for _ in range(repeats):
            these.append(run_real(case.config))
            if progress:
                progress(1)
        simulated = [simulate(case.config.with_(seed=case.config.seed + k)) for k in range(repeats)]
        reals += these
        sims += simulated
        rows.append(compare(case.name, these, simulated))
    return reals, sims, rows


# ------------------------------------------------------------------ report
def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarise(qs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """SLA hit rate, downtime percentiles, stops, times, bytes and convergence of runs."""
    done = [q for q in qs if q["status"] == "completed"]
    limit = {id(q): q["config"]["params"]["downtime_limit"] for q in qs}
    hits = [q for q in done if q["downtime"] <= limit[id(q)]]
    ratio = [q["downtime"] / limit[id(q)] for q in done]
    return {
        "runs": len(qs),
        "sla-hit-rate": len(hits) / len(qs),
        "convergence-rate": len(done) / len(qs),
        "downtime-p50": _pct([q["downtime"] for q in done], 0.5),
        "downtime-p95": _pct([q["downtime"] for q in done], 0.95),
        "downtime-max": max((q["downtime"] for q in done), default=math.nan),
        "downtime/limit-p50": _pct(ratio, 0.5),
        "downtime/limit-p95": _pct(ratio, 0.95),
        "downtime/limit-max": max(ratio, default=math.nan),
        "guest-stops-mean": statistics.fmean(q["guest-stops"] for q in qs),
        "guest-stopped-time-mean": statistics.fmean(q["guest-stopped-time"] for q in qs),
        "total-time-p50": _pct([q["total-time"] for q in done], 0.5),
        "transferred-p50": _pct([q["ram"]["transferred"] for q in done], 0.5),
        "switchover-aborts-mean": statistics.fmean(q["switchover-aborts"] for q in qs),
    }


def device_kind(q: dict[str, Any]) -> str:
    return "+".join(d["type"] for d in q["devices"]) or "none"


def policy_table(runs: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``summarise`` per policy."""
    by: dict[str, list[dict[str, Any]]] = {}
    for q in runs:
        by.setdefault(q["policy"], []).append(q)
    return {pol: summarise(qs) for pol, qs in by.items()}


def device_table(runs: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """``summarise`` per (device type, policy)."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for q in runs:
        by.setdefault((device_kind(q), q["policy"]), []).append(q)
    return {key: summarise(qs) for key, qs in by.items()}


# The bar for ``adaptive``: at least the SLA hit rate of stopping for
# every exact size, with at most this share of its guest stops.
STOP_SHARE = 1 / 3


def earns_default(table: dict[str, dict[str, float]], policy: str) -> tuple[bool, str]:
    """The issue's bar: at least the SLA hit rate of ``stop-exact-resume`` with
    at most ``STOP_SHARE`` of its guest stops; and, since a default must not
    leave migrations running forever, the best convergence rate (ties allowed)."""
    me = table[policy]
    ser = table.get("stop-exact-resume")
    # Runs that never hit the SLA, or in which stopping for the exact size
    # never stopped the guest, compare nothing: 0 against 0 is not a pass.
    hit_ok = me["sla-hit-rate"] > 0 and (ser is None or me["sla-hit-rate"] >= ser["sla-hit-rate"])
    stops_ok = ser is None or (
        ser["guest-stops-mean"] > 0
        and me["guest-stops-mean"] <= STOP_SHARE * ser["guest-stops-mean"]
    )
    best_conv = max(t.get("convergence-rate", 1.0) for t in table.values())
    conv_ok = me.get("convergence-rate", 1.0) >= best_conv
    best_hit = max(t["sla-hit-rate"] for t in table.values())
    why = (
        f"`{policy}`: SLA hit rate {me['sla-hit-rate']:.1%}"
        + (f" (`stop-exact-resume` {ser['sla-hit-rate']:.1%}" if ser else " (")
        + f", best of all policies {best_hit:.1%}), "
        f"{me['guest-stops-mean']:.2f} guest stops per migration"
        + (f" against {ser['guest-stops-mean']:.2f} for `stop-exact-resume`" if ser else "")
        + f", converged in {me.get('convergence-rate', 1.0):.0%} of runs"
        f" (best {best_conv:.0%})"
    )
    return hit_ok and stops_ok and conv_ok, why


def choose_default(table: dict[str, dict[str, float]]) -> str | None:
    """The default policy by the rule docs/lab.md writes down: of the policies
    that ``earns_default``, the highest SLA hit rate, then the fewest guest
    stops, then the name; None if none qualifies."""
    ok = [p for p in table if earns_default(table, p)[0]]
    if not ok:
        return None
    return min(ok, key=lambda p: (-table[p]["sla-hit-rate"], table[p]["guest-stops-mean"], p))


def _fmt(x: float, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _kind_sentence(kind: str, dev: dict[tuple[str, str], dict[str, float]]) -> str | None:
    """What stopping for the exact size costs and buys for one device type."""
    ser, exr = dev.get((kind, "stop-exact-resume")), dev.get((kind, "exact-running"))
    if not (ser and exr):
        return None
    gain = ser["sla-hit-rate"] - exr["sla-hit-rate"]
    verdict = "buys" if gain > 0.005 else ("loses" if gain < -0.005 else "buys nothing:")
    text = (
        f"- `{kind}`: stopping the guest for every exact size (`stop-exact-resume`) costs "
        f"{ser['guest-stops-mean']:.2f} guest stops and "
        f"{ser['guest-stopped-time-mean']:.1f} ms stopped outside the downtime per migration, "
        f"and {verdict} {abs(gain):.0%} of SLA hit rate against sizing with the guest running "
        f"(`exact-running`: {exr['sla-hit-rate']:.0%} → {ser['sla-hit-rate']:.0%}; downtime "
        f"p95 {_fmt(exr['downtime/limit-p95'], 2)}× → {_fmt(ser['downtime/limit-p95'], 2)}× "
        f"the limit)."
    )
    ad = dev.get((kind, "adaptive"))
    if ad:
        text += (
            f" `adaptive`: {ad['sla-hit-rate']:.0%} with {ad['guest-stops-mean']:.2f} stops "
            f"({ad['guest-stopped-time-mean']:.1f} ms), converged {ad['convergence-rate']:.0%}."
        )
    return text


def conclusion(
    table: dict[str, dict[str, float]], dev: dict[tuple[str, str], dict[str, float]]
) -> str:
    """The answer to the thread's question, from the data."""
    lines = []
    ser, exr = table.get("stop-exact-resume"), table.get("exact-running")
    est = table.get("estimate-only")
    if ser and exr:
        lines.append(
            f"- Over the whole matrix, stopping the guest to learn the exact size "
            f"(`stop-exact-resume`) hits the SLA in {ser['sla-hit-rate']:.0%} of runs against "
            f"{exr['sla-hit-rate']:.0%} for sizing while running (`exact-running`), at a cost "
            f"of {ser['guest-stops-mean']:.2f} guest stops and "
            f"{ser['guest-stopped-time-mean']:.1f} ms stopped outside the downtime per "
            f"migration (vs {exr['guest-stops-mean']:.2f} and "
            f"{exr['guest-stopped-time-mean']:.1f} ms)."
        )
    if est:
        lines.append(
            f"- Trusting the estimate alone (`estimate-only`) hits the SLA in "
            f"{est['sla-hit-rate']:.0%} of runs; its downtime p95 is "
            f"{_fmt(est['downtime/limit-p95'], 2)}× the limit."
        )
    for kind in sorted({k for k, _ in dev}):
        sentence = _kind_sentence(kind, dev)
        if sentence:
            lines.append(sentence)
    if "adaptive" in table:
        ok, why = earns_default(table, "adaptive")
        lines.append(
            f"- {why}: it {'earns' if ok else 'does not earn'} the default (at least the SLA "
            f"hit rate of `stop-exact-resume` with at most a third of its stops, and the best "
            f"convergence rate)."
        )
    return "\n".join(lines)


def _policy_rows(table: dict[str, dict[str, float]], first: str = "policy") -> list[str]:
    hdr = (f"{first} | runs | SLA hit | converged | downtime p50 / p95 / max | ×limit p50 / p95 /"
           " max | stops | stopped | total time p50 | bytes p50 (MiB) | aborts")  # fmt: skip
    lines = [hdr, "|".join(["---"] * 11)]
    for pol, t in table.items():
        lines.append(
            f"`{pol}` | {t['runs']} | {t['sla-hit-rate']:.0%} | {t['convergence-rate']:.0%} | "
            f"{_fmt(t['downtime-p50'])} / {_fmt(t['downtime-p95'])} / {_fmt(t['downtime-max'])} | "
            f"{_fmt(t['downtime/limit-p50'], 2)} / {_fmt(t['downtime/limit-p95'], 2)} / "
            f"{_fmt(t['downtime/limit-max'], 2)} | {t['guest-stops-mean']:.2f} | "
            f"{t['guest-stopped-time-mean']:.1f} | {_fmt(t['total-time-p50'], 0)} | "
            f"{_fmt(t['transferred-p50'] / MIB, 0)} | {t['switchover-aborts-mean']:.2f}"
        )
    return lines


def validation_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per validation case, then the error summary."""
    lines = [
        "case | workload | policy | devices | cap MiB/s | total ms real/sim | downtime ms "
        "real/sim | MiB real/sim | passes real/sim",
        "|".join(["---"] * 9),
    ]
    for r in rows:
        lines.append(
            f"{r['name']} | `{r['workload']}` | `{r['policy']}` | {','.join(r['devices'])} | "
            f"{r['max-bandwidth'] / MIB:.0f} | {r['real-total-time']:.0f} / "
            f"{r['sim-total-time']:.0f} | {r['real-downtime']:.0f} / {r['sim-downtime']:.0f} | "
            f"{r['real-transferred'] / MIB:.0f} / {r['sim-transferred'] / MIB:.0f} | "
            f"{r['real-passes']:.0f} / {r['sim-passes']:.0f}"
        )
    lines += [
        "",
        "metric | median error | max error | median beyond slack | max beyond slack",
        "---|---|---|---|---",
    ]
    for m, s in error_summary(rows).items():
        lines.append(
            f"{m} | {s['median']:.1%} | {s['max']:.1%} | {s['median-excess']:.1%} | "
            f"{s['max-excess']:.1%}"
        )
    return lines


def write_report(
    out: Path,
    runs: list[dict[str, Any]],
    validation: list[dict[str, Any]],
    meta: dict[str, Any],
) -> Path:
    table = policy_table(runs) if runs else {}
    dev = device_table(runs) if runs else {}
    lines = ["# Policy lab report", ""]
    lines.append(
        f"{len(runs)} runs ({meta.get('mode')}), {meta.get('seconds', 0):.0f} s wall, load "
        f"average {_fmt((meta.get('load-average') or [math.nan])[0], 2)} at the end. Downtimes "
        'in ms; "stopped" is guest time paused outside the downtime (ms per migration).'
    )
    lines += ["", "## Policies", ""]
    lines += _policy_rows(table)
    for kind in sorted({k for k, _ in dev}):
        rows = {p: dev[(kind, p)] for p in table if (kind, p) in dev}
        lines += ["", f"### Device type `{kind}`", ""]
        lines += _policy_rows(rows)
    if validation:
        lines += ["", "## Validation: simulated against real loopback runs", ""]
        lines += validation_table(validation)
    if table:
        lines += [
            "",
            "## Answer: what does stopping the guest for the exact size cost and buy?",
            "",
        ]
        lines.append(conclusion(table, dev))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plots(out: Path, runs: list[dict[str, Any]]) -> list[Path]:
    """PNG plots: downtime vs limit, total time vs dirty rate, stops per policy, per device."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    paths = []
    done = [q for q in runs if q["status"] == "completed"]
    pols = sorted({q["policy"] for q in runs})

    fig, ax = plt.subplots(figsize=(7, 5))
    for p in pols:
        qs = [q for q in done if q["policy"] == p]
        ax.scatter([q["config"]["params"]["downtime_limit"] for q in qs],
                   [q["downtime"] for q in qs], label=p, s=10, alpha=0.6)  # fmt: skip
    lims = sorted({q["config"]["params"]["downtime_limit"] for q in runs})
    ax.plot(lims, lims, "k--", lw=1, label="limit")
    ax.set(xlabel="downtime limit (ms)", ylabel="downtime (ms)", xscale="log", yscale="log")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "downtime-vs-limit.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
    for p in pols:
        qs = [q for q in done if q["policy"] == p]
        ax.scatter([q["ram"]["dirty-pages-rate"] for q in qs],
                   [q["total-time"] / 1000 for q in qs], label=p, s=10, alpha=0.6)  # fmt: skip
    ax.set(xlabel="measured dirty rate (pages/s)", ylabel="total time (s)")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "total-time-vs-dirty-rate.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    stops = [statistics.fmean(q["guest-stops"] for q in runs if q["policy"] == p) for p in pols]
    ax.bar(pols, stops)
    ax.set(ylabel="guest stops per migration")
    ax.tick_params(axis="x", rotation=30)
    paths.append(_save(fig, out / "guest-stops-per-policy.png"))

    dev = device_table(runs)
    kinds = sorted({k for k, _ in dev})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(pols))
    for i, p in enumerate(pols):
        xs = [j + i * width for j in range(len(kinds))]
        ax.bar(xs, [dev.get((k, p), {}).get("sla-hit-rate", 0) for k in kinds], width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kinds))], kinds)
    ax.set(ylabel="SLA hit rate", title="per device type")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    paths.append(_save(fig, out / "sla-per-device-type.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.close(fig)
    return path


# --------------------------------------------------------------------- CLI
def _strip(q: dict[str, Any]) -> dict[str, Any]:
    return q


def stamp() -> dict[str, str]:
    """The commit the results describe (``-dirty`` if the tree had changes) and the date."""
    import datetime  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    if commit != "unknown" and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"commit": commit, "date": now}


def bench_policies(args: argparse.Namespace) -> dict[str, Any]:
    from rich.progress import Progress  # noqa: PLC0415

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    host = HostModel()
    if args.calibrate:
        # The switchover latency measured at the validation's size and a typical cap.
        size, cap = (LIVE_MEMORY, LIVE_BANDWIDTH) if args.live else (VALIDATION_MEMORY, 96 * MIB)
        host = HostModel.calibrate(switchover=(size, cap))
    runs: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    cases = live_cases(host) if args.live else validation_cases(host)
    if args.quick and not args.live:
        cases = cases[: args.validation or 4]
    elif args.validation and not args.live:
        cases = cases[: args.validation]
    configs = [c.with_(host=host) for c in matrix(args.quick)] if not args.real else []
    with Progress() as bar:
        if configs:
            task = bar.add_task("simulate", total=len(configs))
            runs += run_sweep(
                configs,
                dask_address=args.dask,
                progress=lambda n: bar.advance(task, n),
            )
        if not args.sim:
            vtask = bar.add_task("real + simulated validation", total=len(cases) * args.repeats)
            reals, _, validation = run_validation(
                cases, lambda n: bar.advance(vtask, n), args.repeats
            )
            if args.real:
                runs += reals
        wtask = bar.add_task("results, report and plots", total=3)
        meta = {
            "mode": "real" if args.real else ("sim" if args.sim else "sim + validation"),
            "quick": args.quick,
            "seconds": time.monotonic() - t0,
            "load-average": os.getloadavg(),
            "host": host.__dict__ if hasattr(host, "__dict__") else {},
            **stamp(),
        }
        results = {"meta": meta, "runs": runs, "validation": validation}
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        if args.save_validation and validation:
            stored = {"meta": meta, "validation": validation}
            Path(args.save_validation).write_text(json.dumps(stored, indent=1, default=str) + "\n")
        bar.advance(wtask)
        write_report(out, runs, validation, meta)
        bar.advance(wtask)
        if runs:
            write_plots(out, runs)
        bar.advance(wtask)
    return results


def calibrate_command(out: Path | None) -> int:
    """``mig bench calibrate``: measure this host's model and save it for ``--simulate``."""
    from mig.sim import host_model_path, save_host_model  # noqa: PLC0415

    path = out or host_model_path()
    print("measuring this host (digest, tracker, vCPU stops, devices, loopback migrations)")
    model = HostModel.calibrate(switchover=(LIVE_MEMORY, LIVE_BANDWIDTH))
    save_host_model(model, path, stamp())
    for key, value in model.__dict__.items():
        print(f"  {key} = {value:.4g}")
    print(f"saved {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mig bench", description="policy lab and micro-benchmarks")
    sub = p.add_subparsers(dest="what", required=True)
    pol = sub.add_parser("policies", help="sweep the completion policies")
    mode = pol.add_mutually_exclusive_group()
    mode.add_argument("--sim", action="store_true", help="simulated runs only")
    mode.add_argument("--real", action="store_true", help="real loopback runs only")
    pol.add_argument("--quick", action="store_true", help="a small matrix (≤ 5 min on 2 cores)")
    pol.add_argument("--out", default="bench-out", help="output directory")
    pol.add_argument("--dask", metavar="ADDRESS", help="send simulated runs to this Dask scheduler")
    pol.add_argument("--validation", type=int, default=0, help="number of validation cases")
    pol.add_argument(
        "--repeats", type=int, default=5, help="real runs per validation case (median taken)"
    )
    pol.add_argument("--calibrate", action="store_true", help="measure host costs first")
    pol.add_argument(
        "--live",
        action="store_true",
        help="validate on the live sample CI runs (3 small configurations) instead",
    )
    pol.add_argument(
        "--save-validation",
        metavar="PATH",
        help="also write the validation rows, stamped with the commit and date, to PATH "
        "(tests/data/lab_validation.json)",
    )
    cal = sub.add_parser("calibrate", help="measure this host's costs for --simulate and save them")
    cal.add_argument(
        "--out",
        default=None,
        help="where to save the model (default: $MIG_HOST_MODEL or ~/.config/mig/host-model.json)",
    )
    kern = sub.add_parser("kernels", help="run benches/ and summarise ratios to their limits")
    kern.add_argument("--out", default="bench-out", help="output directory")
    kern.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    for name, (script, what) in USER_PATH_BENCHES.items():
        user = sub.add_parser(name, help=f"{what} (benches/{script})")
        user.add_argument("bench_args", nargs=argparse.REMAINDER, help="--quick, --sizes, ...")
    return p


# `mig bench NAME`: benchmarks of the path users run, as scripts in benches/.
USER_PATH_BENCHES = {
    "user-path": ("transfer_user_path.py", "mig demo on 1-4 GiB images against iperf3"),
    "downtime-scale": ("downtime_scale.py", "downtime against guest size through mig demo"),
    "default-demo": ("default_demo.py", "the plain mig demo N times: downtime and its prediction"),
    "simulate-vs-real": (
        "simulate_vs_real.py",
        "mig demo --simulate against mig demo on 7 configurations",
    ),
    "postcopy-lab": (
        "postcopy_lab.py",
        "post-copy, hybrid, auto-converge and dirty-limit on non-converging workloads (sim)",
    ),
}


def missing_lab_dependencies(args: argparse.Namespace) -> list[str]:
    """Modules ``mig bench policies`` will import and this environment lacks.

    Checked before any work: a sweep that dies on its last step (the plots)
    would throw away minutes of runs.
    """
    needed = ["matplotlib"] + (["dask.distributed"] if args.dask else [])
    missing = []
    for name in needed:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package itself is absent
            found = False
        if not found:
            missing.append(name.partition(".")[0])
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """``mig bench ...``: returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in USER_PATH_BENCHES:
        # The script's own options (``--help`` too), in order: argparse would
        # take a leading ``--quick`` for an option of ``mig bench`` and refuse it.
        from mig.benchrun import find_benches  # noqa: PLC0415

        script = find_benches() / USER_PATH_BENCHES[argv[0]][0]
        return subprocess.call([sys.executable, str(script), *argv[1:]])
    args = parser().parse_args(argv)
    if args.what == "policies":
        missing = missing_lab_dependencies(args)
        if missing:
            print(
                f"mig bench policies needs {' and '.join(missing)}: pip install '.[lab]'",
                file=sys.stderr,
            )
            return 2
        results = bench_policies(args)
        rows = results["validation"]
        print(f"wrote {args.out}/results.json, report.md ({len(results['runs'])} runs)")
        if rows:
            for m, s in error_summary(rows).items():
                print(
                    f"  {m}: median error {s['median']:.1%}, max {s['max']:.1%}; beyond the "
                    f"slack {s['median-excess']:.1%}, max {s['max-excess']:.1%}"
                )
            failures = bound_failures(rows)
            for f in failures:
                print(f"  out of bounds ({MEDIAN_BOUND:.0%} median, {MAX_BOUND:.0%} max): {f}")
            return 1 if failures else 0
        return 0
    if args.what == "calibrate":
        return calibrate_command(Path(args.out) if args.out else None)
    from mig.benchrun import run_benches  # noqa: PLC0415

    return run_benches(Path(args.out), args.pytest_args)
