"""The source's setup in virtual time (``mig.sim_setup``): paid before
``hello``, as the engine pays it, and so outside the round trip the source
plans the switchover's handshake with."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mig.sim import HostModel, LinkModel, SimConfig, simulate

MIB = 1 << 20


def _migrate(policy: str, setup: float) -> dict:
    """An idle 128 MiB guest over a 128 MiB/s link (uncapped: no token
    bucket, so the bandwidth meter reads the link), ``setup`` seconds of
    setup before ``hello``."""
    q = simulate(
        SimConfig(
            memory=128 * MIB,
            workload="idle",
            policy=policy,
            link=LinkModel(bottleneck=128 * MIB),
            params={"timeout": 60.0},
            host=replace(HostModel(), setup_base=setup, register_per_page=0.0),
        )
    )
    assert q["status"] == "completed" and q["sim"]["verified"], q.get("error-desc")
    return q


@pytest.mark.parametrize("policy", ["estimate-only", "exact-running"])
def test_a_slow_setup_delays_the_migration_but_does_not_change_its_plan(policy: str) -> None:
    """Until a pass is acknowledged the planned handshake is twice hello's
    round trip. Both migrations switch over in the bulk pass, once what is
    left fits the 300 ms limit. Were the 200 ms setup inside hello's round
    trip, the planned handshake (over 400 ms) would exceed the limit and the
    slow one would send all of memory before it could switch over."""
    quick, slow = _migrate(policy, 0.0), _migrate(policy, 0.2)
    assert slow["setup-time"] - quick["setup-time"] == pytest.approx(200, abs=1)
    assert quick["ram"]["downtime-bytes"] > 8 * MIB  # the switchover came in the bulk pass
    assert slow["ram"]["downtime-bytes"] == quick["ram"]["downtime-bytes"]
    assert [p["bytes"] for p in slow["passes"]] == [p["bytes"] for p in quick["passes"]]
    assert slow["switchover-costs"]["handshake"] == quick["switchover-costs"]["handshake"]
    assert slow["downtime"] == pytest.approx(quick["downtime"], abs=0.5)
    assert slow["downtime"] <= 300
