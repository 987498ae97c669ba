"""``PostcopySwitch``: when a migration with ``postcopy`` on switches to post-copy.

It wraps the migration's policy and leaves every decision of it standing
but one: where the policy would go on copying (``CONTINUE``), it returns
``POSTCOPY`` once ``after_passes`` whole passes over memory are done, or
as soon as the convergence monitor reports that pre-copy does not converge
(``view.extra["non-converging"]``). A policy that converges still completes
in pre-copy, within its downtime limit. With ``postcopy`` off the policy is
used as it is, unwrapped.
"""

from __future__ import annotations

from typing import Any

from mig.policies import Action, Decision, Policy, PolicyView

__all__ = ["PostcopySwitch"]


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
        if view.passes >= self.after_passes:
            return Decision(Action.POSTCOPY, reason=f"{view.passes} passes done")
        reason = view.extra.get("non-converging")
        if reason:
            return Decision(Action.POSTCOPY, reason=f"not converging: {reason}")
        return decision

    def options(self) -> dict[str, Any]:
        return {**self.base.options(), "postcopy_after_passes": self.after_passes}
