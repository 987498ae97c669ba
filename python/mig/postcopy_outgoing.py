"""``PostcopyOutgoing``: the source's post-copy, from the hand-over to the last page.

At a post-copy switchover (``SwitchoverRun`` with ``postcopy`` set) the
guest is stopped, the RAM stream's final harvest is taken out unsent
(``hand_over``): those are the pages the destination does not hold current.
The page channels are opened then, inside the downtime, so a destination
that cannot be reached still rolls back. After ``go`` the native
``PostcopyOutgoing`` names the owed chunks, serves the destination's
requests first and pushes the rest (``start``); ``run`` waits for the
destination to report every chunk placed.

A broken page channel pauses the phase (``postcopy-paused``); the source
guest stays stopped (its memory is the only copy of the pages still owed)
until ``recover(uri)`` reconnects. A cancel while paused ends the
migration ``failed``: the guest's state is split between the hosts and the
destination's part is lost with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mig import _mig
from mig.errors import MigrationEnded
from mig.postcopy_pause import RecoverGate

__all__ = ["PostcopyOutgoing"]

_POLL = 0.1


class PostcopyOutgoing:
    """The source's post-copy phase around a native ``PostcopyOutgoing``."""

    def __init__(
        self, uri: str | None, max_bandwidth: int, max_push_bandwidth: int, recover_timeout: float
    ) -> None:
        self.uri = uri
        self.max_bandwidth = int(max_bandwidth)
        self.max_push_bandwidth = int(max_push_bandwidth)
        self.recover_timeout = recover_timeout
        self.native: Any = None
        self.owed_pages = 0
        self.recover_error: str | None = None
        self.gate = RecoverGate()
        # postcopy_push_order "stream": one locality at a time (outgoing.rs).
        self.one_stream = False
        # Monotonic seconds at "go" and at the last chunk placed: the phase's length.
        self.started_at: float | None = None
        self.placed_at: float | None = None

    def hand_over(self, ram: Any, link: Any) -> None:
        """Guest stopped: take the pages still owed, open the page channels."""
        target = getattr(link, "ram_target", None)
        sender = target() if callable(target) else None
        if sender is None or self.uri is None:
            raise _mig.UnsupportedError("post-copy needs a native stream (tcp: or unix:)")
        owed = ram.take_known()
        self.owed_pages = int(owed.count())
        self.native = _mig.PostcopyOutgoing(
            sender,
            ram.memory,
            owed,
            max_bandwidth=self.max_bandwidth,
            max_push_bandwidth=self.max_push_bandwidth,
            one_stream=self.one_stream,
        )
        self.native.connect(self.uri)

    def start(self) -> None:
        """After ``go``: name the owed chunks, serve requests, push the rest."""
        self.started_at = time.monotonic()
        self.native.start()

    def run(
        self,
        set_status: Callable[[str], None],
        check_cancel: Callable[[], str | None],
    ) -> None:
        """Wait until the destination placed every owed chunk; a broken
        channel waits for ``recover``; a cancel then loses the guest."""
        while True:
            state, reason = self.native.wait(_POLL)
            if state == "placed":
                self.placed_at = time.monotonic()
                self.native.close()
                return
            if state == "active":
                continue
            cancelled = self.gate.wait(reason, set_status, check_cancel)
            if cancelled is not None:
                self.native.close()
                raise MigrationEnded(
                    "failed",
                    f"post-copy paused ({reason}), then {cancelled}: the guest's "
                    "state is split between both hosts, the guest is lost",
                )
            try:
                self.native.reconnect(self.gate.uri or self.uri, self.recover_timeout)
            except Exception as e:
                self.recover_error = str(e)
                continue
            self.gate.resumed(set_status)

    def recover(self, uri: str | None = None) -> None:
        """Reconnect the page channels (QEMU's migrate with resume=true)."""
        self.gate.request(uri)

    def set_max_bandwidth(self, bytes_per_s: int) -> None:
        if self.native is not None:
            self.native.set_max_bandwidth(int(bytes_per_s))

    def set_max_push_bandwidth(self, bytes_per_s: int) -> None:
        """``max_postcopy_bandwidth`` from now on (0 = only the link's cap)."""
        self.max_push_bandwidth = int(bytes_per_s)
        if self.native is not None:
            self.native.set_max_push_bandwidth(self.max_push_bandwidth)

    def abort(self) -> None:
        if self.native is not None:
            self.native.close()

    def stats(self) -> dict[str, Any]:
        if self.native is None:
            return {}
        out = dict(self.native.stats())
        out["owed-pages"] = self.owed_pages
        if self.started_at is not None:
            end = self.placed_at if self.placed_at is not None else time.monotonic()
            out["postcopy-time"] = (end - self.started_at) * 1000
        if self.gate.paused_reason is not None:
            out["paused-reason"] = self.gate.paused_reason
        if self.recover_error is not None:
            out["recover-error"] = self.recover_error
        return out
