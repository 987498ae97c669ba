"""Every completion policy against the same hand-made views, no loop.

Each scenario is a moment of a migration that the RFC thread argued about;
the table pins what each policy decides there. Every policy's column differs
from every other's, so replacing any policy by another changes at least one
asserted decision.
"""

from __future__ import annotations

from itertools import combinations

import pytest

from mig.policies import POLICIES, Action, Decision, HandlerView, PolicyView, make_policy

MB = 10**6
BANDWIDTH = 1000 * MB  # bytes/s
LIMIT = 0.3  # s: 300 MB of state fit
THRESHOLD = int(BANDWIDTH * LIMIT)
# Unless a scenario says otherwise the guest dirties half the link's rate:
# another pass would not halve what is pending, so sending on gains nothing.
DIRTYING = 0.5 * BANDWIDTH


def _view(phase: str, *handlers: HandlerView, **kw: object) -> PolicyView:
    kw.setdefault("dirty_rate", DIRTYING)
    return PolicyView(
        now=10.0,
        phase=phase,
        guest_stopped=False,
        handlers=(*handlers,),
        bandwidth=BANDWIDTH,
        threshold=THRESHOLD,
        downtime_limit=LIMIT,
        ram_total=4000 * MB,
        **kw,  # type: ignore[arg-type]
    )


def _ram(estimate: int, exact: int | None = None) -> HandlerView:
    return HandlerView("ram", "ram", False, estimate, exact)


def _running_device(estimate: int, exact: int | None = None) -> HandlerView:
    """A device that reports its stop-copy size while running (PRE_COPY)."""
    return HandlerView("nic0", "device", False, estimate, exact)


def _stop_only_device(estimate: int) -> HandlerView:
    """A device whose size is known only once it is stopped, never sized yet."""
    return HandlerView("gpu0", "device", True, estimate)


SCENARIOS: dict[str, PolicyView] = {
    # Cheap estimates fit the limit: trust them, measure, or stop to measure?
    "estimate-fits": _view("estimate", _ram(100 * MB), _running_device(50 * MB)),
    # A running exact was taken and fits: complete, with or without a budget?
    "running-exact-fits": _view(
        "exact", _ram(100 * MB, 100 * MB), _running_device(50 * MB, 50 * MB)
    ),
    # The device's own state alone is over the limit: the v1 behaviour ignores it.
    "device-over-limit": _view("estimate", _ram(100 * MB), _running_device(400 * MB)),
    # RAM is exact; a stop-only device was never sized: stop the guest for it?
    "stop-only-device-unsized": _view(
        "exact", _ram(100 * MB, 100 * MB), _stop_only_device(10 * MB)
    ),
    # The same, after three guest stops already: the stop budget is spent.
    "stop-budget-spent": _view(
        "exact", _ram(100 * MB, 100 * MB), _stop_only_device(10 * MB), guest_stops=3
    ),
    # Known dirty pages fit, but the guest dirties 1 GB/s and the last sync
    # was 0.5 s ago: the exact size is likely far larger.
    "fast-dirtying": _view("estimate", _ram(200 * MB), dirty_rate=float(BANDWIDTH), since_sync=0.5),
    # An idle guest whose 100 MB fit: pay them in the downtime, or send them first?
    "idle-fits": _view("estimate", _ram(100 * MB), dirty_rate=0.0),
}

COMPLETE = Decision(Action.COMPLETE)
BUDGETED = Decision(Action.COMPLETE, budget=THRESHOLD)
CONTINUE = Decision(Action.CONTINUE)
EXACT_RUNNING = Decision(Action.EXACT_RUNNING)
STOP = Decision(Action.STOP_AND_EXACT)

# policy -> the decision in each scenario, in SCENARIOS order.
EXPECTED: dict[str, tuple[Decision, ...]] = {
    "estimate-only": (COMPLETE, COMPLETE, CONTINUE, COMPLETE, COMPLETE, COMPLETE, COMPLETE),
    "exact-running": (
        EXACT_RUNNING,
        COMPLETE,
        CONTINUE,
        COMPLETE,
        COMPLETE,
        EXACT_RUNNING,
        EXACT_RUNNING,
    ),  # fmt: skip
    "stop-exact-resume": (STOP, COMPLETE, CONTINUE, COMPLETE, COMPLETE, STOP, STOP),
    "device-checks-sla": (
        EXACT_RUNNING,
        BUDGETED,
        CONTINUE,
        BUDGETED,
        BUDGETED,
        EXACT_RUNNING,
        EXACT_RUNNING,
    ),  # fmt: skip
    "assume-zero-device": (
        EXACT_RUNNING,
        COMPLETE,
        EXACT_RUNNING,
        COMPLETE,
        COMPLETE,
        EXACT_RUNNING,
        EXACT_RUNNING,
    ),  # fmt: skip
    "cached-exact": (EXACT_RUNNING, COMPLETE, CONTINUE, STOP, STOP, EXACT_RUNNING, EXACT_RUNNING),
    "adaptive": (EXACT_RUNNING, BUDGETED, CONTINUE, STOP, BUDGETED, CONTINUE, CONTINUE),
}


def _decide(policy: str, scenario: PolicyView) -> Decision:
    # A fresh instance per scenario: adaptive learns from what it saw before.
    decision = make_policy(policy).decide(scenario)
    return Decision(decision.action, decision.budget)  # the reason is prose


def test_the_table_covers_every_policy() -> None:
    assert set(EXPECTED) == set(POLICIES)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_decisions(policy: str) -> None:
    got = tuple(_decide(policy, view) for view in SCENARIOS.values())
    want = EXPECTED[policy]
    wrong = {
        name: (g.action.value, g.budget, w.action.value, w.budget)
        for name, g, w in zip(SCENARIOS, got, want, strict=True)
        if g != w
    }
    assert not wrong, f"{policy}: (got action, budget, wanted action, budget) {wrong}"


@pytest.mark.parametrize("a, b", list(combinations(sorted(POLICIES), 2)))
def test_every_pair_of_policies_decides_differently_somewhere(a: str, b: str) -> None:
    differ = [name for name, view in SCENARIOS.items() if _decide(a, view) != _decide(b, view)]
    assert differ, f"{a} and {b} decide alike in every scenario"
