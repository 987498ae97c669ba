"""``PostcopySwitch`` on hand-made views: when post-copy starts."""

from __future__ import annotations

import dataclasses

from mig.policies import Action, HandlerView, PolicyView, make_policy
from mig.postcopy_policy import FIRST_WINDOW, MEASURE_SYNCS, PostcopySwitch

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


def switch(after: int = 0, cap: float = 0.0) -> PostcopySwitch:
    return PostcopySwitch(make_policy("adaptive"), after, link_cap=lambda: cap)


def synced(s: PostcopySwitch, window: float, dirty_rate: float, count: int = 2) -> Action:
    """The decision right after sync ``count``, ``window`` s after the one before."""
    s.decide(view(now=1.0, since_sync=0.0, sync_count=count - 1))
    after = view(now=1.0 + window, since_sync=0.0, sync_count=count, phase="exact",
                 dirty_rate=dirty_rate)  # fmt: skip
    return s.decide(after).action


def test_the_first_windows_double_from_an_eighth_of_the_limit() -> None:
    s = switch()
    first = LIMIT * FIRST_WINDOW
    assert s.decide(view(since_sync=first * 0.9)).action is Action.CONTINUE
    measure = s.decide(view(since_sync=first))
    assert measure.action is Action.EXACT_RUNNING, measure
    assert s.decide(view(since_sync=first, sync_count=2)).action is Action.CONTINUE
    assert s.decide(view(since_sync=2 * first, sync_count=2)).action is Action.EXACT_RUNNING
    assert s.decide(view(since_sync=LIMIT * 0.9, sync_count=4)).action is Action.CONTINUE
    assert s.decide(view(since_sync=LIMIT, sync_count=4)).action is Action.EXACT_RUNNING
    # Not without a rate to compare with, nor once the early syncs are over.
    assert s.decide(view(since_sync=LIMIT, bandwidth=0.0)).action is Action.CONTINUE
    late = view(since_sync=LIMIT, sync_count=MEASURE_SYNCS)
    assert s.decide(late).action is Action.CONTINUE


def test_the_cap_bounds_the_link_before_it_is_measured() -> None:
    s = switch(cap=100 * MIB)
    first = view(since_sync=LIMIT * FIRST_WINDOW, bandwidth=0.0)
    assert s.decide(first).action is Action.EXACT_RUNNING


def test_a_short_window_proves_it_only_when_its_pages_overrun_the_limit() -> None:
    first = LIMIT * FIRST_WINDOW
    # 40 MiB written in 37.5 ms: more than the 30 MiB the link sends in 300 ms.
    fast = synced(switch(cap=100 * MIB), first, 40 * MIB / first)
    assert fast is Action.POSTCOPY
    # 20 MiB in 37.5 ms is a rate far above the link's, but a longer window
    # may hold no more pages (a small hot set): not proven.
    assert synced(switch(cap=100 * MIB), first, 20 * MIB / first) is Action.CONTINUE
    # The measured bandwidth, not the cap, when it is higher.
    assert synced(switch(cap=10 * MIB), first, 40 * MIB / first) is Action.POSTCOPY


def test_a_guest_dirtying_at_least_the_link_switches_after_one_window() -> None:
    s = switch()
    assert synced(s, LIMIT, 400 * MIB) is Action.POSTCOPY
    reason = s.decide(view(now=1.0 + LIMIT, sync_count=2, dirty_rate=400 * MIB)).reason
    assert "120 MiB in 300 ms" in (reason or ""), reason
    assert synced(switch(), LIMIT, 40 * MIB) is Action.CONTINUE
    # A window whose start was not seen proves nothing.
    unseen = view(phase="exact", sync_count=2, dirty_rate=400 * MIB)
    assert switch().decide(unseen).action is Action.CONTINUE


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
    s.decide(view(now=1.0 - LIMIT, since_sync=0.0, sync_count=1))
    fast = view(phase="exact", sync_count=2, dirty_rate=400 * MIB)
    assert s.decide(dataclasses.replace(fast, can_switchover=False)).action is Action.CONTINUE
    # A pending size that fits: the wrapped policy completes in pre-copy.
    fits = dataclasses.replace(
        fast, handlers=(HandlerView("ram", "ram", False, 1 * MIB, exact=1 * MIB),)
    )
    assert s.decide(fits).action is Action.COMPLETE
