"""Workload pacing: achieved page writes/s against the spec's rate, from 1 k to
1 M per second, one vCPU (target: within 5 % when a core is free)."""

from __future__ import annotations

import time

import pytest
from conftest import measure, ratio

import mig


@pytest.mark.parametrize("rate", [1_000, 10_000, 100_000, 1_000_000])
def test_rate_accuracy(benchmark, rate: int) -> None:
    mem = mig.GuestMemory(64 << 20)
    achieved: list[float] = []

    def run() -> None:
        with mig.WorkloadGuest(mem, vcpus=1, workload=f"uniform:rate={rate}") as g:
            time.sleep(0.1)
            a, t0 = g.stats()["writes"], time.monotonic()
            time.sleep(1.0)
            b, t1 = g.stats()["writes"], time.monotonic()
        achieved.append((b - a) / (t1 - t0))

    measure(benchmark, f"workload rate {rate}", "subject", run, rounds=3, iterations=1)
    achieved.sort()
    med = achieved[len(achieved) // 2]
    ratio(
        "workload",
        f"rate={rate}: deviation of achieved from target",
        abs(med / rate - 1),
        0.05,
        "<=",
        f"achieved {med:.0f}/s",
    )
