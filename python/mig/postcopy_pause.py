"""``RecoverGate``: where a paused post-copy phase waits, on either side.

A broken page channel pauses post-copy (``postcopy-paused``). The phase
then waits for one of two things: ``request()`` (the embedder's
``recover``), after which it reconnects, or a cancel, after which the
guest is lost. Both sides wait the same way; only what they do next differs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["RecoverGate"]

_POLL = 0.1


class RecoverGate:
    def __init__(self) -> None:
        self.paused_reason: str | None = None
        self.uri: str | None = None
        self._requested = threading.Event()

    def request(self, uri: str | None = None) -> None:
        """Ask the paused phase to reconnect (to ``uri``, where that applies)."""
        if self.paused_reason is None:
            raise RuntimeError("post-copy is not paused")
        self.uri = uri
        self._requested.set()

    def wait(
        self,
        reason: str | None,
        set_status: Callable[[str], None],
        check_cancel: Callable[[], str | None],
    ) -> str | None:
        """Paused for ``reason``: wait for ``request()`` (returns None) or a
        cancel (returns its reason)."""
        self.paused_reason = reason or "a post-copy channel broke"
        set_status("postcopy-paused")
        while not self._requested.wait(_POLL):
            cancelled = check_cancel()
            if cancelled is not None:
                return cancelled
        self._requested.clear()
        return None

    def resumed(self, set_status: Callable[[str], None]) -> None:
        self.paused_reason = None
        set_status("postcopy-active")
