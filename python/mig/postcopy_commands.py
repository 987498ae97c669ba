"""``PostcopyCommands``: the post-copy commands of a ``MigrationSource``.

QEMU's ``migrate-start-postcopy``, ``migrate`` with ``resume`` (here
``recover``) and a ``max-postcopy-bandwidth`` changed while the migration
runs. Each only asks: the migration's own thread acts at its next step.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING

from mig.params import MigrationParams
from mig.switchover import Phase

if TYPE_CHECKING:
    from mig.switchover import SwitchoverRun

__all__ = ["PostcopyCommands"]


class PostcopyCommands:
    settings: MigrationParams
    switchover: SwitchoverRun | None
    _done: threading.Event
    _postcopy_requested: bool

    if TYPE_CHECKING:  # MigrationSource's own

        @property
        def phase(self) -> Phase: ...

    def start_postcopy(self) -> None:
        """Switch to post-copy at the next decision (QEMU's migrate-start-postcopy)."""
        if not self.settings.postcopy:
            raise RuntimeError("post-copy is not enabled for this migration (postcopy=True)")
        if self.phase is not Phase.PRECOPY or self._done.is_set():
            raise RuntimeError(f"no pre-copy to switch from (phase {self.phase.value})")
        self._postcopy_requested = True

    def recover(self, uri: str | None = None) -> None:
        """``postcopy-paused``: reconnect the page channels, to ``uri`` or the
        session's (QEMU's migrate resume=true); the destination calls
        ``recover`` too."""
        if self.switchover is None or self.switchover.postcopy is None:
            raise RuntimeError("no post-copy to recover")
        self.switchover.postcopy.recover(uri)

    def set_max_postcopy_bandwidth(self, bytes_per_s: int) -> None:
        """``max_postcopy_bandwidth`` from now on, for a post-copy phase
        running or to come (QEMU's migrate-set-parameters applies it at once)."""
        if int(bytes_per_s) < 0:
            raise ValueError("max_postcopy_bandwidth must be >= 0")
        # A switch still to come reads it from here.
        self.settings = dataclasses.replace(self.settings, max_postcopy_bandwidth=int(bytes_per_s))
        postcopy = self.switchover.postcopy if self.switchover else None
        if postcopy is not None:
            postcopy.set_max_push_bandwidth(int(bytes_per_s))
