"""The exceptions that steer a migration, shared by both sides and the handlers.

``OverBudget`` abandons one switchover (the migration goes on);
``MigrationEnded`` ends the whole migration with a status and a reason. Both
carry typed fields, so no caller decides anything from the text of a reason.
"""

from __future__ import annotations

from mig._mig import MigError

__all__ = ["OverBudget", "MigrationEnded"]


class OverBudget(MigError):
    """``complete(link, budget)`` went over its byte budget: abandon switchover.

    Raised as ``OverBudget(message)`` or ``OverBudget(handler, sent, budget)``.
    """

    def __init__(self, what: str, sent: int | None = None, budget: int | None = None) -> None:
        if sent is None or budget is None:
            super().__init__(what)
        else:
            super().__init__(f"{what}: {sent} bytes of stop-copy state exceed the budget {budget}")
        self.sent = sent
        self.budget = budget


class MigrationEnded(Exception):
    """Ends the migration on this side with ``status`` (``failed`` or ``cancelled``).

    ``by_peer``: the other side ended it (its ``cancel`` or ``failed``), so
    there is nobody to tell. On the source it also means the destination
    discarded everything and never resumed, so rolling back is safe even
    after ``go``.
    """

    def __init__(self, status: str, reason: str, *, by_peer: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.by_peer = by_peer
