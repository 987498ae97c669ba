"""Policy decisions on hand-made views (no loop, no guest)."""

from __future__ import annotations

import pytest

from mig.policies import DEFAULT_POLICY, Action, HandlerView, PolicyView, make_policy

GB = 10**9


def view(
    ram: int,
    overhead: float,
    limit: float = 0.3,
    bandwidth: float = GB,
    dirty_rate: float = 0.6 * GB,
) -> PolicyView:
    """A guest dirtying ``dirty_rate`` bytes/s: by default fast enough that
    another pass would not halve what is pending, so only the threshold decides."""
    return PolicyView(
        now=10.0,
        phase="estimate",
        guest_stopped=False,
        handlers=(HandlerView("ram", "ram", False, ram),),
        bandwidth=bandwidth,
        threshold=int(bandwidth * limit),
        downtime_limit=limit,
        overhead=overhead,
        dirty_rate=dirty_rate,
        ram_total=4 * GB,
    )


def test_adaptive_keeps_sending_while_another_pass_halves_what_is_pending() -> None:
    """150 MB fit the 300 ms limit, but a guest dirtying 100 MB/s leaves only
    15 MB after sending them (150 ms; the 100 ms of fixed costs come after
    the pause): send them with the guest running. Dirtying 600 MB/s, another
    pass would leave 90 MB, more than half: switch over. A pass's sync and
    settle count too: with 550 ms of them at 100 MB/s it leaves 70 MB, with
    650 ms 80 MB, more than half. Under ``floor`` (1 ms of sending), switch
    over."""
    ad = make_policy("adaptive")
    assert ad.decide(view(150 * 10**6, 0.1, dirty_rate=100e6)).action is Action.CONTINUE
    assert ad.decide(view(150 * 10**6, 0.1, dirty_rate=600e6)).action is Action.EXACT_RUNNING

    def with_pass_overhead(seconds: float) -> PolicyView:
        base = view(150 * 10**6, 0.1, dirty_rate=100e6)
        return PolicyView(**{**base.__dict__, "pass_overhead": seconds})

    assert make_policy("adaptive").decide(with_pass_overhead(0.55)).action is Action.CONTINUE
    fresh = make_policy("adaptive")
    assert fresh.decide(with_pass_overhead(0.65)).action is Action.EXACT_RUNNING
    assert ad.decide(view(4 * 10**6, 0.0, dirty_rate=0.0)).action is Action.CONTINUE
    assert ad.decide(view(5 * 10**5, 0.0, dirty_rate=0.0)).action is Action.EXACT_RUNNING
    never = make_policy("adaptive", shrink=0.0)
    assert never.decide(view(150 * 10**6, 0.1, dirty_rate=0.0)).action is Action.EXACT_RUNNING


def test_adaptive_asks_for_another_pass_only_while_passes_shrink_what_is_pending() -> None:
    """40 MB pending, a guest dirtying 20 MB/s: another pass should leave
    under half, so it keeps sending. After that pass 45 MB are pending, not
    less: the prediction failed, and it does not ask again at once. A pass
    that did shrink what is pending lets it ask again."""
    ad = make_policy("adaptive")
    assert ad.decide(view(40 * 10**6, 0.01, dirty_rate=20e6)).action is Action.CONTINUE
    assert ad.decide(view(45 * 10**6, 0.01, dirty_rate=20e6)).action is Action.EXACT_RUNNING
    assert ad.decide(view(30 * 10**6, 0.01, dirty_rate=20e6)).action is Action.CONTINUE
    assert ad.decide(view(20 * 10**6, 0.01, dirty_rate=20e6)).action is Action.CONTINUE


def test_adaptive_subtracts_the_fixed_costs() -> None:
    """300 ms limit, 100 ms of measured fixed costs (both sides' digests are
    in them): 200 ms (200 MB at 1 GB/s) remain for state."""
    ad = make_policy("adaptive")
    assert ad.decide(view(150 * 10**6, 0.1)).action is Action.EXACT_RUNNING
    assert ad.decide(view(260 * 10**6, 0.1)).action is Action.CONTINUE
    twice = make_policy("adaptive", fixed_cost_factor=2.0)
    assert twice.decide(view(60 * 10**6, 0.1)).action is Action.EXACT_RUNNING
    assert twice.decide(view(150 * 10**6, 0.1)).action is Action.CONTINUE


def test_adaptive_falls_back_to_the_plain_threshold_when_fixed_costs_exceed_the_limit() -> None:
    """400 ms of fixed costs exceed a 300 ms limit: waiting cannot help, so it
    sizes against bandwidth × limit as QEMU does instead of never switching
    over."""
    ad = make_policy("adaptive")
    assert ad.decide(view(150 * 10**6, 0.4)).action is Action.EXACT_RUNNING
    assert ad.decide(view(400 * 10**6, 0.4)).action is Action.CONTINUE


def test_adaptive_falls_back_when_the_device_state_leaves_no_time_for_ram() -> None:
    """100 ms of fixed costs and 250 MB of device state (250 ms at 1 GB/s,
    which sending RAM does not shrink) exceed a 300 ms limit: it sizes
    against bandwidth × limit (300 MB), so 40 MB of RAM with the device
    state fits. With 170 MB of device state, 200 ms remain after the fixed
    costs for 210 MB: it does not fit, and it keeps sending."""
    ad = make_policy("adaptive")

    def with_device(device: int) -> PolicyView:
        base = view(40 * 10**6, 0.1)
        dev = HandlerView("fixed0", "device", False, device)
        return PolicyView(**{**base.__dict__, "handlers": (*base.handlers, dev)})

    assert ad.decide(with_device(250 * 10**6)).action is Action.EXACT_RUNNING
    assert ad.decide(with_device(170 * 10**6)).action is Action.CONTINUE


def test_adaptive_stops_to_measure_once_waiting_cannot_raise_the_chance() -> None:
    """A stop-only device predicted at 180 MB against 200 MB left after the
    fixed costs: the chance of fitting is above even but under ``p_stop``.
    With 15 MB of RAM pending it keeps sending; with RAM down to ``floor``
    (1 ms) of sending another pass changes nothing, so it stops to measure."""
    ad = make_policy("adaptive")

    def exact_view(ram: int) -> PolicyView:
        base = view(ram, 0.1, dirty_rate=0.0)
        handlers = (
            HandlerView("ram", "ram", False, ram, ram),
            HandlerView("gpu0", "device", True, 180 * 10**6),
        )
        return PolicyView(**{**base.__dict__, "phase": "exact", "handlers": handlers})

    assert ad.decide(exact_view(15 * 10**6)).action is Action.CONTINUE
    assert ad.decide(exact_view(5 * 10**5)).action is Action.STOP_AND_EXACT


def test_adaptive_resumes_from_a_stop_that_fits_only_the_fallback_while_stops_remain() -> None:
    """Stopped for an exact size: 100 ms of fixed costs and 210 MB measured
    (RAM and an opaque device) need 310 ms at 1 GB/s, over the 300 ms limit,
    yet under the fallback's bandwidth × limit. With stops left it resumes (a
    state that moves with the workload may be smaller at the next stop); at
    the last stop ``max_stops`` allows it switches over as QEMU would. A
    measurement that fits the plan switches over at once."""
    ad = make_policy("adaptive", max_stops=3)

    def stopped(device: int, stops: int) -> PolicyView:
        base = view(10 * 10**6, 0.1)
        handlers = (
            HandlerView("ram", "ram", False, 10 * 10**6, 10 * 10**6),
            HandlerView("opaque0", "device", True, 0, device),
        )
        fields = {"phase": "exact", "guest_stopped": True, "handlers": handlers}
        return PolicyView(**{**base.__dict__, **fields, "guest_stops": stops})

    assert ad.decide(stopped(200 * 10**6, 0)).action is Action.CONTINUE
    assert ad.decide(stopped(200 * 10**6, 1)).action is Action.CONTINUE
    assert ad.decide(stopped(200 * 10**6, 2)).action is Action.COMPLETE
    assert ad.decide(stopped(150 * 10**6, 0)).action is Action.COMPLETE


def test_adaptive_refuses_a_negative_fixed_cost_factor() -> None:
    with pytest.raises(ValueError, match="fixed_cost_factor"):
        make_policy("adaptive", fixed_cost_factor=-1)


def test_the_default_policy_is_adaptive() -> None:
    """Chosen from the policy lab (docs/lab.md); tests/test_lab.py pins why."""
    assert DEFAULT_POLICY == "adaptive"
    assert make_policy(DEFAULT_POLICY).name == DEFAULT_POLICY
