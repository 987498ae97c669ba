"""Policy decisions on hand-made views (no loop, no guest)."""

from __future__ import annotations

import pytest

from mig.policies import DEFAULT_POLICY, Action, HandlerView, PolicyView, make_policy

GB = 10**9


def view(ram: int, overhead: float, limit: float = 0.3, bandwidth: float = GB) -> PolicyView:
    return PolicyView(
        now=10.0,
        phase="estimate",
        guest_stopped=False,
        handlers=(HandlerView("ram", "ram", False, ram),),
        bandwidth=bandwidth,
        threshold=int(bandwidth * limit),
        downtime_limit=limit,
        overhead=overhead,
        ram_total=4 * GB,
    )


def test_adaptive_counts_the_fixed_costs_of_both_sides() -> None:
    """300 ms limit, 100 ms of measured fixed costs: the destination's
    verification mirrors them, so 100 ms (100 MB at 1 GB/s) remain for state."""
    ad = make_policy("adaptive")
    assert ad.decide(view(60 * 10**6, 0.1)).action is Action.EXACT_RUNNING
    assert ad.decide(view(150 * 10**6, 0.1)).action is Action.CONTINUE
    once = make_policy("adaptive", fixed_cost_factor=1.0)
    assert once.decide(view(150 * 10**6, 0.1)).action is Action.EXACT_RUNNING


def test_adaptive_falls_back_to_the_plain_threshold_when_fixed_costs_exceed_the_limit() -> None:
    """200 ms of fixed costs counted twice exceed a 300 ms limit: waiting cannot
    help, so it sizes against bandwidth × limit as QEMU does instead of never
    switching over."""
    ad = make_policy("adaptive")
    assert ad.decide(view(150 * 10**6, 0.2)).action is Action.EXACT_RUNNING
    assert ad.decide(view(400 * 10**6, 0.2)).action is Action.CONTINUE


def test_adaptive_refuses_a_negative_fixed_cost_factor() -> None:
    with pytest.raises(ValueError, match="fixed_cost_factor"):
        make_policy("adaptive", fixed_cost_factor=-1)


def test_the_default_policy_is_adaptive() -> None:
    """Chosen from the policy lab (docs/lab.md); tests/test_lab.py pins why."""
    assert DEFAULT_POLICY == "adaptive"
    assert make_policy(DEFAULT_POLICY).name == DEFAULT_POLICY
