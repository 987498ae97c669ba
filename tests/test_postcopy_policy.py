"""``PostcopySwitch`` on hand-made views: when post-copy starts."""

from __future__ import annotations

import dataclasses

from mig.policies import Action, HandlerView, PolicyView, make_policy
from mig.postcopy_policy import MEASURE_SYNCS, PostcopySwitch

MIB = 1 << 20
LIMIT = 0.3


def view(**kw: object) -> PolicyView:
    """1 GiB pending on a 100 MiB/s link: far from fitting the limit, so
    the wrapped policy itself says CONTINUE."""
    base = PolicyView(
        now=1.0,
        phase="estimate",
        guest_stopped=False,
        handlers=(HandlerView("ram", "ram", False, 1 << 30),),
        bandwidth=100 * MIB,
        threshold=int(100 * MIB * LIMIT),
        downtime_limit=LIMIT,
        sync_count=1,
        ram_total=1 << 30,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def switch(after: int = 0) -> PostcopySwitch:
    return PostcopySwitch(make_policy("adaptive"), after)


def test_the_dirty_rate_is_measured_once_per_downtime_limit_of_precopy() -> None:
    s = switch()
    assert s.decide(view(since_sync=0.1)).action is Action.CONTINUE
    measure = s.decide(view(since_sync=LIMIT))
    assert measure.action is Action.EXACT_RUNNING, measure
    # Not without a bandwidth to compare with, nor once the early syncs are over.
    assert s.decide(view(since_sync=LIMIT, bandwidth=0.0)).action is Action.CONTINUE
    late = view(since_sync=LIMIT, sync_count=MEASURE_SYNCS + 1)
    assert s.decide(late).action is Action.CONTINUE


def test_a_guest_dirtying_at_least_the_link_switches_after_one_window() -> None:
    s = switch()
    fast = s.decide(view(phase="exact", sync_count=2, dirty_rate=400 * MIB))
    assert fast.action is Action.POSTCOPY and "400 MiB/s" in (fast.reason or ""), fast
    slow = s.decide(view(phase="exact", sync_count=2, dirty_rate=40 * MIB))
    assert slow.action is Action.CONTINUE, slow


def test_after_passes_and_the_monitor_still_decide() -> None:
    s = switch(after=3)
    # With a pass count the early measurement is off.
    assert s.decide(view(sync_count=2, dirty_rate=400 * MIB)).action is Action.CONTINUE
    assert s.decide(view(since_sync=LIMIT)).action is Action.CONTINUE
    assert s.decide(view(passes=3)).action is Action.POSTCOPY
    told = s.decide(view(extra={"non-converging": "dirty rate too high"}))
    assert told.action is Action.POSTCOPY and "dirty rate too high" in (told.reason or "")


def test_no_switch_before_the_destination_acks_nor_against_a_completion() -> None:
    s = switch()
    fast = view(phase="exact", sync_count=2, dirty_rate=400 * MIB)
    assert s.decide(dataclasses.replace(fast, can_switchover=False)).action is Action.CONTINUE
    # A pending size that fits: the wrapped policy completes in pre-copy.
    fits = dataclasses.replace(
        fast, handlers=(HandlerView("ram", "ram", False, 1 * MIB, exact=1 * MIB),)
    )
    assert s.decide(fits).action is Action.COMPLETE
