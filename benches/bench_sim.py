"""Simulator speed and the aggregated model's error against the page-level one.

Speed: a 1 TiB guest over 100 Gbit/s (8 channels, 200 µs RTT, a hot-set
writer) simulated on the real loop and policies; target < 10 s of CPU time
(reported as CPU seconds / 10 s, limit <= 1).

Aggregation error: the same 16 GiB migration simulated page-level and with
16 and 64 pages per unit; relative error of total time, downtime, bytes and
passes (limit <= 0.15 on bytes and total time).
"""

from __future__ import annotations

import pytest

from mig.sim import LinkModel, SimConfig, simulate

GIB = 1 << 30
TIB = 1 << 40


def big(memory: int, granularity: int = 0, workload: str = "hotset:rate=500000,wss=64GiB",
        policy: str = "exact-running") -> SimConfig:  # fmt: skip
    return SimConfig(
        memory=memory,
        workload=workload,
        vcpus=8,
        policy=policy,
        granularity=granularity,
        link=LinkModel(rtt=200e-6),
        params={
            "max_bandwidth": int(100e9 / 8),
            "multifd_channels": 8,
            "downtime_limit": 300,
            "switchover_timeout": 600.0,
        },
    )


def test_sim_1tib_100gbit(benchmark) -> None:
    out: list[dict] = []
    benchmark.pedantic(lambda: out.append(simulate(big(TIB))), rounds=1, iterations=1)
    q = out[-1]
    cpu = q["sim"]["cpu-seconds"]
    assert q["status"] == "completed" and q["sim"]["verified"], q.get("error-desc")
    benchmark.extra_info.update(
        area="sim",
        ratio=cpu / 10.0,
        target=1.0,
        cmp="<=",
        note=f"1 TiB / 100 Gbit/s: {cpu:.2f} s CPU for {q['total-time'] / 1000:.0f} s simulated",
    )


@pytest.mark.parametrize("workload", ["uniform:rate=400000", "hotset:rate=500000,wss=4GiB",
                                      "zipf:rate=500000"])  # fmt: skip
@pytest.mark.parametrize("granularity", [16, 64])
def test_aggregation_error(benchmark, workload: str, granularity: int) -> None:
    page = simulate(big(16 * GIB, 1, workload))
    out: list[dict] = []
    benchmark.pedantic(
        lambda: out.append(simulate(big(16 * GIB, granularity, workload))), rounds=1, iterations=1
    )
    agg = out[-1]
    errs = {}
    for key in ("total-time", "downtime"):
        errs[key] = abs(agg[key] - page[key]) / page[key]
    errs["bytes"] = (
        abs(agg["ram"]["transferred"] - page["ram"]["transferred"]) / page["ram"]["transferred"]
    )
    errs["passes"] = abs(len(agg["passes"]) - len(page["passes"])) / len(page["passes"])
    benchmark.extra_info.update(
        area="sim-aggregation",
        ratio=max(errs["bytes"], errs["total-time"]),
        target=0.15,
        cmp="<=",
        note=f"{workload} x{granularity}: " + ", ".join(f"{k} {v:.1%}" for k, v in errs.items()),
    )
