"""``PostcopySwitch``: when a migration with ``postcopy`` on switches to post-copy.

It wraps the migration's policy and leaves every decision of it standing
but one: where the policy would go on copying (``CONTINUE``), it returns
``POSTCOPY`` when pre-copy is seen not to converge, or once
``after_passes`` whole passes over memory are done (when it is not 0). A
policy that converges still completes in pre-copy, within its downtime
limit. With ``postcopy`` off the policy is used as it is, unwrapped.

Non-convergence is seen two ways:

- early, with ``after_passes`` 0: for the first ``MEASURE_SYNCS`` syncs,
  once per downtime limit of pre-copy, it asks for a sync with the guest
  running (``EXACT_RUNNING``), which measures the guest's dirty rate: the
  distinct pages written since the last sync, per second. When the pages
  the guest writes in one downtime limit take longer than that limit to
  send (the dirty rate is at least the link's bandwidth), no stop fits
  the limit however long pre-copy goes on: it switches then, after one
  window, instead of after a whole pass whose pages the guest dirties
  again and post-copy would send a second time. A guest below it is left
  to the policy, which completes in pre-copy when it converges;
- by the convergence monitor (``view.extra["non-converging"]``), over its
  longer periods, whatever ``after_passes``.
"""

from __future__ import annotations

from typing import Any

from mig.policies import Action, Decision, Policy, PolicyView

__all__ = ["MEASURE_SYNCS", "PostcopySwitch"]

# The early measurement stops after this many syncs: a guest it did not see
# outrun the link is left to the policy and the convergence monitor.
MEASURE_SYNCS = 4


class PostcopySwitch(Policy):
    def __init__(self, base: Policy, after_passes: int) -> None:
        self.base = base
        self.after_passes = int(after_passes)
        self.name = base.name
        self.fail_on_over_budget = base.fail_on_over_budget

    def decide(self, view: PolicyView) -> Decision:
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

    def _early(self, view: PolicyView) -> bool:
        return self.after_passes == 0 and view.sync_count <= MEASURE_SYNCS

    def _outrun(self, view: PolicyView) -> str | None:
        """A reason when the measured dirty rate reaches the link's bandwidth."""
        if not self._early(view) or view.sync_count < 2 or not view.bandwidth_known:
            return None
        if view.dirty_rate < view.bandwidth:
            return None
        mib = 1 << 20
        return (
            f"the guest dirties {view.dirty_rate / mib:.0f} MiB/s, the link sends "
            f"{view.bandwidth / mib:.0f} MiB/s"
        )

    def _measure_due(self, view: PolicyView) -> bool:
        return (
            self._early(view)
            and view.phase == "estimate"
            and not view.guest_stopped
            and view.bandwidth_known
            and view.since_sync >= view.downtime_limit
        )

    def options(self) -> dict[str, Any]:
        return {**self.base.options(), "postcopy_after_passes": self.after_passes}
