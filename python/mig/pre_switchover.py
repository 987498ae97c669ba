"""``PreSwitchover``: QEMU's ``pause-before-switchover``, the operator's last word.

With the capability on, the switchover pauses the guest and then waits, in
status ``pre-switchover``, for ``migrate-continue`` (``release``) before any
device state goes out: a management layer can do what must happen while
neither side runs the guest (e.g. hand over storage). ``migrate_cancel``
during the wait rolls back as at any point before ``go``: the source guest
runs again. The wait counts as downtime, as in QEMU (the guest is paused).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from mig.clock import Clock

__all__ = ["PreSwitchover"]

_POLL = 0.05


class PreSwitchover:
    """The wait at the switchover; ``enabled`` is the capability."""

    def __init__(self, enabled: bool, clock: Clock, set_status: Callable[[str], None]) -> None:
        self.enabled = enabled
        self.clock = clock
        self.set_status = set_status
        self._continue = threading.Event()
        self._waiting = threading.Event()

    @property
    def waiting(self) -> bool:
        return self._waiting.is_set()

    def hold(self, check_cancel: Callable[[], None], poll: Callable[[], None]) -> float:
        """Status ``pre-switchover`` until ``release``; returns the seconds waited.

        ``check_cancel`` raises to end the wait (a cancel, a stall); ``poll``
        keeps handling the destination's messages meanwhile.
        """
        t0 = self.clock.now()
        self._continue.clear()
        self.set_status("pre-switchover")
        self._waiting.set()
        try:
            while not self._continue.wait(_POLL):
                check_cancel()
                poll()
        finally:
            self._waiting.clear()
        self.set_status("device")
        return self.clock.now() - t0

    def release(self) -> bool:
        """``migrate-continue``: False unless a switchover waits in ``pre-switchover``."""
        if not self._waiting.is_set():
            return False
        self._continue.set()
        return True
