"""Every completion policy, simulated end to end, changes what a migration does.

``test_policy_table.py`` pins each policy's decision on hand-made views; here
whole migrations run in virtual time (the real loop, policies and device
handlers) on the lab's device sets, and the asserted outcomes are the
figures an operator sees: downtime against the limit, passes, guest stops.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest

from mig import lab
from mig.policies import POLICIES, policy_names
from mig.policy_separation import alike_pairs, outcome
from mig.sim import LinkModel, SimConfig, simulate

MIB = 1 << 20
LIMIT_MS = 300
TIGHT_LIMIT_MS = 100
BANDWIDTH = int(2.5e9 / 8)  # 100 ms of it is 31 MB: a large device state is a visible share


def _config(device_set: str, policy: str, limit: int = LIMIT_MS) -> SimConfig:
    devices = lab.DEVICE_SETS[device_set]
    return SimConfig(
        memory=256 * MIB,
        workload="uniform:rate=20000",
        vcpus=2,
        devices=devices,
        policy=policy,
        params={
            "max_bandwidth": BANDWIDTH,
            "downtime_limit": limit,
            "multifd_channels": 4,
            "timeout": lab.sweep_timeout(256 * MIB, devices, BANDWIDTH),
        },
        link=LinkModel(rtt=100e-6),
        label=device_set,
    )


# The scenarios (device set, downtime limit in ms): the three device sets
# whose stop-copy state is large (known while running; known only once
# stopped; growing), and the matrix's opaque one, at the 300 ms limit; and
# the opaque one at 100 ms, where its state no longer fits beside the RAM
# that fits the limit (what a stop-copy byte budget catches).
SCENARIOS = (
    ("big-known", LIMIT_MS),
    ("big-stopped", LIMIT_MS),
    ("growing", LIMIT_MS),
    ("opaque", LIMIT_MS),
    ("opaque", TIGHT_LIMIT_MS),
)


@cache
def _run(device_set: str, policy: str, limit: int = LIMIT_MS) -> dict[str, Any]:
    q = simulate(_config(device_set, policy, limit))
    # Every scenario converges, and the simulated destination verified what it got.
    assert q["status"] == "completed", (device_set, policy, limit, q.get("error-desc"))
    assert q["sim"]["verified"], (device_set, policy, limit)
    return q


def _figures(device_set: str, policy: str, limit: int = LIMIT_MS) -> dict[str, Any]:
    return outcome(_run(device_set, policy, limit))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_replacing_the_policy_changes_an_outcome(policy: str) -> None:
    """For every other policy, some scenario's downtime, passes, guest stops
    or bytes change when it replaces this one."""
    same = [
        other
        for other in policy_names()
        if other != policy
        and all(_figures(s, policy, lim) == _figures(s, other, lim) for s, lim in SCENARIOS)
    ]
    assert not same, f"{policy} gives the same figures as {same} in {SCENARIOS}"


def test_counting_device_state_known_while_running_keeps_the_limit() -> None:
    """24 MiB of stop-copy state known while running: ``exact-running`` counts
    it and switches over with bytes that fit the limit; ``assume-zero-device``
    counts 0 bytes and switches over too early, with more than fit.

    The bytes, as the loop planned them at the switchover (``final-ram``:
    RAM and device bytes over the bandwidth): the terms a first switchover
    has not measured yet (the destination's root over the final pass's
    chunks, the device's production and load) come on top for both."""
    counted = _figures("big-known", "exact-running")
    ignored = _figures("big-known", "assume-zero-device")
    planned = {
        name: _run("big-known", name)["switchover-costs"]["final-ram"]
        for name in ("exact-running", "assume-zero-device")
    }
    assert planned["exact-running"] <= LIMIT_MS < planned["assume-zero-device"], planned
    assert counted["downtime"] < ignored["downtime"], (counted, ignored)
    assert counted["passes"] > ignored["passes"]


def test_estimate_only_switches_over_on_the_first_fitting_estimate() -> None:
    """Without an exact size, ``estimate-only`` completes sooner, in fewer passes,
    than every policy that takes one, and misses the limit."""
    est = _figures("big-known", "estimate-only")
    assert est["downtime"] > LIMIT_MS, est
    for other in policy_names():
        if other != "estimate-only":
            assert _figures("big-known", other)["passes"] > est["passes"], other


def test_only_stop_exact_resume_stops_for_a_device_sized_while_running() -> None:
    """All state is sized while running: stopping the guest for it is the
    RFC's policy alone; every other keeps the guest running."""
    stops = {p: _figures("big-known", p)["guest-stops"] for p in policy_names()}
    assert stops.pop("stop-exact-resume") >= 1
    assert set(stops.values()) == {0}, stops


def test_a_byte_budget_abandons_a_switchover_a_stop_only_device_overflows() -> None:
    """16 MiB of state known only once stopped, a 100 ms limit: what fits
    beside the RAM is less than the device's state. ``exact-running`` counts
    the device at its estimate (nothing, before a stop), switches over and
    misses the limit; ``device-checks-sla`` takes the same decision, but its
    budget stops the save past the bytes that fit: it abandons that
    switchover, resumes the guest, and completes within the limit once the
    stop has sized the device."""
    counted = _run("opaque", "exact-running", TIGHT_LIMIT_MS)
    budgeted = _run("opaque", "device-checks-sla", TIGHT_LIMIT_MS)
    assert counted["switchover-aborts"] == 0
    assert counted["downtime"] > TIGHT_LIMIT_MS, counted["downtime-breakdown"]
    assert budgeted["switchover-aborts"] >= 1
    assert budgeted["downtime"] <= TIGHT_LIMIT_MS, budgeted["downtime-breakdown"]


def test_a_stop_only_device_is_sized_by_the_policies_that_stop_or_predict() -> None:
    """A device sized only when stopped: ``exact-running`` and
    ``assume-zero-device`` never size it and miss the limit; the policies that
    stop for it, carry a budget, cache it or predict it meet the limit."""
    for p in ("exact-running", "assume-zero-device", "estimate-only"):
        assert _figures("opaque", p)["downtime"] > LIMIT_MS, p
    for p in ("stop-exact-resume", "device-checks-sla", "cached-exact", "adaptive"):
        assert _figures("opaque", p)["downtime"] <= LIMIT_MS, p
    # Of those, cached-exact stops once for the cached size, the RFC's policy
    # at every fitting estimate; adaptive predicts the size and never stops.
    assert _figures("opaque", "stop-exact-resume")["guest-stops"] > 1
    assert _figures("opaque", "cached-exact")["guest-stops"] == 1
    assert _figures("opaque", "adaptive")["guest-stops"] == 0


def test_every_pair_of_policies_differs_in_a_matrix_row() -> None:
    """The quick matrix restricted to the device sets that separate the
    policies and to one workload (the CI budget): no two policies give the
    same figures in every row, so the lab's tables compare real differences."""
    sets = ("big-known", "big-stopped", "growing")
    configs = [c for c in lab.matrix(True, sets) if c.workload.startswith("uniform")]
    assert {c.policy for c in configs} == set(POLICIES)
    runs = lab.run_sweep(configs)
    assert len(runs) == len(configs)
    assert alike_pairs(runs) == []


def test_alike_pairs_finds_policies_no_row_separates() -> None:
    def run(policy: str, limit: int, downtime: float) -> dict[str, Any]:
        config = _config("fixed", policy).with_(params={"downtime_limit": limit}).to_dict()
        return {"config": config, "policy": policy, "status": "completed",
                "downtime": downtime, "passes": [{}, {}], "guest-stops": 0}  # fmt: skip

    runs = [run("a", 100, 50.0), run("b", 100, 50.0), run("c", 100, 50.0)]
    runs += [run("a", 300, 80.0), run("b", 300, 80.0), run("c", 300, 90.0)]
    assert alike_pairs(runs) == [("a", "b")]
    # Float noise below the rounding does not separate; a millisecond does.
    assert alike_pairs([*runs[:4], run("b", 300, 80.0001), runs[5]]) == [("a", "b")]
    assert alike_pairs([*runs[:4], run("b", 300, 81.0), runs[5]]) == []
