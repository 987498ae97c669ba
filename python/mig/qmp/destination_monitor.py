"""``DestinationMonitor``: a QMP monitor on incoming migrations.

Commands: ``migrate-incoming``, ``query-migrate``, ``migrate_cancel``,
``migrate-recover`` (a paused post-copy accepts the source's new page
channels: mig keeps the ``migrate-incoming`` listener, so ``uri`` must name
it, where QEMU listens anew), ``query-status``, the capability and
parameter commands (``tls-creds`` picks the server side's certificates; the
rest are kept so that a management tool may set both sides alike, as QEMU
wants) and ``quit``. Events: ``MIGRATION``
on every status change (with the ``events`` capability) and ``RESUME`` when
the migrated guest starts here.

Each ``migrate-incoming`` gets a new destination from
``make_destination(uri, **kwargs)`` (kwargs: ``on_status`` and the TLS files),
so each migration loads into fresh memory and devices; the factory owns them.
A finished migration stays visible to ``query-migrate`` until the next
``migrate-incoming``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from mig.qmp.errors import QMPError
from mig.qmp.server import Command, QMPServer
from mig.qmp.settings import MigrationSettings, settings_commands
from mig.qmp.version import package_version

__all__ = ["DestinationMonitor"]

log = logging.getLogger("mig.qmp")

_ENDED = ("completed", "failed", "cancelled")
_RUNS_HERE = ("completed", "postcopy-active", "postcopy-paused")


class DestinationMonitor:
    """Serves QMP on ``address`` for the incoming migrations ``make_destination`` builds.

    ``make_destination(uri, on_status=..., tls_cert=..., ...)`` returns an
    object with ``MigrationDestination``'s ``start``, ``wait``, ``cancel``
    and ``query`` (a ``MigrationDestination``, or a wrapper around one that
    adds to its ``query()``). ``finished`` receives each migration's final
    ``query()``.
    """

    def __init__(self, address: str, make_destination: Callable[..., Any]) -> None:
        self._make_destination = make_destination
        self.settings = MigrationSettings()
        self.destination: Any = None
        self._incoming_uri: str | None = None
        self._status = "none"
        self.finished: queue.Queue[dict[str, Any]] = queue.Queue()
        self.quit_requested = threading.Event()
        commands = {
            "migrate-incoming": Command(self._incoming, {"uri": str}, {"exit-on-error": bool}),
            "query-migrate": Command(self._query_migrate),
            "migrate_cancel": Command(self._cancel),
            "migrate-recover": Command(self._recover, {"uri": str}),
            "query-status": Command(self._query_status),
            "quit": Command(lambda _: None, then=self.quit_requested.set),
            **settings_commands(self.settings, self._loading),
        }
        self.server = QMPServer(address, commands, **package_version())

    # ---------------------------------------------------------------- API
    def start(self) -> str:
        """Start serving; returns the bound address."""
        return self.server.start()

    def incoming(self, uri: str) -> Any:
        """What ``migrate-incoming`` does: listen on ``uri`` for one migration."""
        if self._busy():
            raise QMPError("The incoming migration has already been started")
        previous = self.destination
        if previous is not None:
            previous.wait()  # its listener is closed once it has ended
        try:
            dest = self._make_destination(
                uri, on_status=self._on_status, **self.settings.tls("server")
            )
        except (OSError, ValueError) as e:
            raise QMPError(str(e)) from None
        self.destination = dest
        self._incoming_uri = uri
        self._status = "none"
        dest.start()
        return dest

    def close(self) -> None:
        """Stop serving; an incoming migration still running is cancelled and awaited.

        One still waiting for its source's connection cannot be woken (the
        accept runs in the native listener): it is left to end with the process.
        """
        dest = self.destination
        if dest is not None and self._busy():
            dest.cancel("the QMP monitor closed")
            if self._status != "setup":
                dest.wait()
        self.server.close()

    @property
    def address(self) -> str:
        return self.server.address

    # ----------------------------------------------------------- commands
    def _busy(self) -> bool:
        return self.destination is not None and self._status not in _ENDED

    def _loading(self) -> bool:
        """A source is connected: settings wait (while waiting for one they may change,
        as a management tool sets both sides after starting the destination)."""
        return self._status in ("active", "device")

    def _incoming(self, args: dict[str, Any]) -> None:
        self.incoming(args["uri"])

    def _query_migrate(self, _: dict[str, Any]) -> dict[str, Any]:
        dest = self.destination
        return {} if dest is None else dest.query()

    def _cancel(self, _: dict[str, Any]) -> None:
        dest = self.destination
        if dest is not None and self._busy():
            dest.cancel("cancelled by migrate_cancel on the destination")

    def _recover(self, args: dict[str, Any]) -> None:
        """QEMU's ``migrate-recover``: go on with a paused post-copy."""
        dest = self.destination
        if dest is None or self._status != "postcopy-paused":
            raise QMPError("Migrate recover can only be run when postcopy is paused.")
        if args["uri"] not in (str(dest.uri), self._incoming_uri):
            raise QMPError(
                f"mig recovers on the listener of migrate-incoming ({dest.uri}), "
                f"not on {args['uri']}"
            )
        try:
            dest.recover()
        except RuntimeError as e:
            raise QMPError(str(e)) from None

    def _query_status(self, _: dict[str, Any]) -> dict[str, Any]:
        # In post-copy the guest runs here already (blocked only on missing pages).
        running = self._status in _RUNS_HERE
        return {"status": "running" if running else "inmigrate", "running": running}

    # ------------------------------------------------------------ callback
    def _on_status(self, status: str) -> None:
        """Runs on the destination's thread; must never raise."""
        try:
            self._status = status
            if self.settings.capabilities["events"]:
                self.server.emit("MIGRATION", {"status": status})
            if status == "completed":
                self.server.emit("RESUME")
            if status in _ENDED and self.destination is not None:
                # The final figures come when the destination's run ends: with
                # verify after-resume that is after "completed", once the
                # source's digest is checked. This callback runs on that very
                # thread, so another one waits for it.
                incoming = self.destination
                threading.Thread(
                    target=lambda: self.finished.put(incoming.wait()),
                    name="mig-qmp-final",
                    daemon=True,
                ).start()
        except Exception:
            log.exception("QMP: MIGRATION event")
