"""``PostcopySwitch``: when a migration with ``postcopy`` on switches to post-copy.

It wraps the migration's policy and leaves every decision of it standing
but one: where the policy would go on copying (``CONTINUE``), it returns
``POSTCOPY`` when pre-copy is seen not to converge, or once
``after_passes`` whole passes over memory are done (when it is not 0). A
policy that converges still completes in pre-copy, within its downtime
limit. With ``postcopy`` off the policy is used as it is, unwrapped.

Non-convergence is seen two ways:

- early, with ``after_passes`` 0: for its first syncs it asks for syncs
  with the guest running (``EXACT_RUNNING``), the first after an eighth of
  the downtime limit, each window twice the last up to the limit. A sync
  gives the distinct pages the guest wrote in its window. Pre-copy cannot
  converge when what the guest writes in one downtime limit takes longer
  than the limit to send: then no stop fits the limit however long
  pre-copy goes on, and every page sent is dirtied again and owed once
  more. A window shorter than the limit proves it as soon as the pages
  written in it alone take longer than the limit to send at the link's
  highest possible rate (``max_bandwidth``, or the measured rate when
  uncapped): a longer window holds at least those pages. A window of the
  limit or longer proves it when the guest's dirty rate reaches that rate.
  A guest writing fast switches after a few tens of milliseconds instead
  of after a whole limit of pre-copy whose pages post-copy sends again;
  a guest below it is left to the policy, which completes in pre-copy
  when it converges;
- by the convergence monitor (``view.extra["non-converging"]``), over its
  longer periods, whatever ``after_passes``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mig.policies import Action, Decision, Policy, PolicyView

__all__ = ["FIRST_WINDOW", "MEASURE_SYNCS", "PostcopySwitch"]

# The early measurement's windows end by this sync: a guest it did not see
# outrun the link is left to the policy and the convergence monitor.
MEASURE_SYNCS = 6
# The first window, as a fraction of the downtime limit; each next one
# doubles, up to the limit (1/8, 1/4, 1/2, 1, 1).
FIRST_WINDOW = 1 / 8


class PostcopySwitch(Policy):
    def __init__(
        self, base: Policy, after_passes: int, link_cap: Callable[[], float] = lambda: 0.0
    ) -> None:
        """``link_cap``: the link's highest rate, bytes/s (``max_bandwidth``;
        0 when uncapped: the measured bandwidth stands in for it)."""
        self.base = base
        self.after_passes = int(after_passes)
        self.link_cap = link_cap
        self.name = base.name
        self.fail_on_over_budget = base.fail_on_over_budget
        self._sync: tuple[int, float] | None = None  # (sync count, time) last seen
        self._window: float | None = None  # seconds between the last two syncs

    def decide(self, view: PolicyView) -> Decision:
        self._observe(view)
        decision = self.base.decide(view)
        if decision.action is not Action.CONTINUE or not view.can_switchover:
            return decision
        if self.after_passes and view.passes >= self.after_passes:
            return Decision(Action.POSTCOPY, reason=f"{view.passes} passes done")
        reason = view.extra.get("non-converging") or self._outrun(view)
        if reason:
            return Decision(Action.POSTCOPY, reason=f"not converging: {reason}")
        if self._measure_due(view):
            return Decision(Action.EXACT_RUNNING, reason="measure the dirty rate")
        return decision

    def _observe(self, view: PolicyView) -> None:
        """The window of the latest sync: known when the sync before it was seen."""
        at = view.now - view.since_sync
        if self._sync is not None and view.sync_count != self._sync[0]:
            count, before = self._sync
            self._window = at - before if view.sync_count == count + 1 else None
        self._sync = (view.sync_count, at)

    def _early(self, view: PolicyView) -> bool:
        return self.after_passes == 0 and view.sync_count <= MEASURE_SYNCS

    def _top_rate(self, view: PolicyView) -> float:
        """The most the link can send, bytes/s; 0 when nothing bounds it yet."""
        cap = float(self.link_cap() or 0.0)
        return max(cap, view.bandwidth) if cap else view.bandwidth

    def _outrun(self, view: PolicyView) -> str | None:
        """A reason when the last window proves the guest outruns the link."""
        window, rate = self._window, self._top_rate(view)
        if not self._early(view) or window is None or window <= 0 or rate <= 0:
            return None
        written, span = view.dirty_rate * window, max(window, view.downtime_limit)
        if written < rate * span:
            return None
        mib = 1 << 20
        return (
            f"the guest wrote {written / mib:.0f} MiB in {window * 1000:.0f} ms, the link "
            f"sends at most {rate * span / mib:.0f} MiB in {span * 1000:.0f} ms"
        )

    def _measure_due(self, view: PolicyView) -> bool:
        window = view.downtime_limit * min(1.0, FIRST_WINDOW * 2 ** (view.sync_count - 1))
        return (
            self._early(view)
            and view.sync_count < MEASURE_SYNCS
            and view.phase == "estimate"
            and not view.guest_stopped
            and self._top_rate(view) > 0
            and view.since_sync >= window
        )

    def options(self) -> dict[str, Any]:
        return {**self.base.options(), "postcopy_after_passes": self.after_passes}
