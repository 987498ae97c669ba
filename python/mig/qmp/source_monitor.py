"""``SourceMonitor``: a QMP monitor on a running guest and its outgoing migrations.

Commands: ``query-status``, ``stop``, ``cont``, ``migrate-set-capabilities``,
``query-migrate-capabilities``, ``migrate-set-parameters``,
``query-migrate-parameters``, ``migrate``, ``query-migrate``,
``migrate_cancel``, ``migrate-continue`` (ends the ``pre-switchover`` pause of
the ``pause-before-switchover`` capability), ``migrate-start-postcopy`` (with
the ``postcopy-ram`` capability), ``migrate`` with ``resume`` (a paused
post-copy reconnects its page channels to ``uri``), ``x-mig-query-digests`` and
``quit``. Events: ``MIGRATION``
on every status change and ``MIGRATION_PASS`` on every dirty sync (only with
the ``events`` capability, as in QEMU), ``STOP`` and ``RESUME`` on every pause
and resume of the guest: by ``stop``/``cont``, and by the migration itself
(the stops taken for an exact size, the switchover, and the resume of a
rollback).

Everything goes through ``MigrationSource``'s public API and its callbacks;
``make_source(uri, **kwargs)`` builds it (by default ``MigrationSource(guest,
devices, uri, **kwargs)``), so an embedder can add its own tracker or clock.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from mig.qmp.errors import QMPError
from mig.qmp.server import Command, QMPServer
from mig.qmp.settings import MigrationSettings, settings_commands
from mig.qmp.version import package_version
from mig.source import STATUSES, MigrationSource

__all__ = ["SourceMonitor"]

log = logging.getLogger("mig.qmp")

_ENDED = ("completed", "failed", "cancelled")


class SourceMonitor:
    """Serves QMP on ``address`` for ``guest`` (a running ``mig.Guest``).

    ``params`` are the starting migration parameters (mig's names, as for
    ``MigrationSource``); QMP clients change them with
    ``migrate-set-parameters`` / ``migrate-set-capabilities``.
    """

    def __init__(
        self,
        address: str,
        guest: Any,
        devices: Sequence[Any] = (),
        *,
        params: dict[str, Any] | None = None,
        make_source: Callable[..., MigrationSource] | None = None,
    ) -> None:
        self.guest = guest
        self.devices = list(devices)
        self.settings = MigrationSettings(params, guest.memory.page_size)
        self._make_source = make_source or functools.partial(MigrationSource, guest, self.devices)
        self.source: MigrationSource | None = None
        self._lock = threading.Lock()
        self._status = "none"
        self._user_stopped = False  # paused by `stop`
        self._migration_stopped = False  # paused by the migration
        self._postmigrate = False  # the guest is (or may be) the destination's now
        self._passes_announced = 0
        self.quit_requested = threading.Event()
        commands = {
            "query-status": Command(self._query_status),
            "stop": Command(self._stop),
            "cont": Command(self._cont),
            "migrate": Command(
                self._migrate, {"uri": str}, {"detach": bool, "resume": bool, "blk": bool}
            ),
            "query-migrate": Command(self._query_migrate),
            "migrate_cancel": Command(self._cancel),
            "migrate-continue": Command(self._continue, {"state": str}),
            "migrate-start-postcopy": Command(self._start_postcopy),
            "x-mig-query-digests": Command(self._digests),
            "quit": Command(lambda _: None, then=self.quit_requested.set),
            **settings_commands(self.settings, self._busy),
        }
        self.server = QMPServer(address, commands, **package_version())

    # ---------------------------------------------------------------- API
    def start(self) -> str:
        """Start serving; returns the bound address."""
        return self.server.start()

    def close(self) -> None:
        """Stop serving; a migration still running is cancelled and awaited."""
        source = self.source
        if source is not None and self._status not in _ENDED:
            source.cancel("the QMP monitor closed")
            source.wait()
        self.server.close()

    @property
    def address(self) -> str:
        return self.server.address

    # --------------------------------------------------------- run state
    def _busy(self) -> bool:
        return self.source is not None and self._status not in _ENDED

    def run_state(self) -> str:
        """QEMU's RunState of the guest."""
        with self._lock:
            if self._postmigrate:
                return "postmigrate"
            if self._migration_stopped:
                switchover = self._status in ("pre-switchover", "device")
                return "finish-migrate" if switchover else "paused"
            return "paused" if self._user_stopped else "running"

    def _query_status(self, _: dict[str, Any]) -> dict[str, Any]:
        state = self.run_state()
        return {"status": state, "running": state == "running"}

    def _stop(self, _: dict[str, Any]) -> None:
        if self._busy():
            raise QMPError("a migration is in progress: it pauses and resumes the guest itself")
        if self.run_state() != "running":
            return
        self.guest.pause()
        with self._lock:
            self._user_stopped = True
        self.server.emit("STOP")

    def _cont(self, _: dict[str, Any]) -> None:
        if self._busy():
            raise QMPError("a migration is in progress: it pauses and resumes the guest itself")
        state = self.run_state()
        if state == "postmigrate":
            source = self.source
            assert source is not None
            if source.query().get("status") == "completed":
                raise QMPError("the guest has migrated: it runs on the destination now")
            source.resume_source()  # the outcome was unknown; the caller knows better now
            with self._lock:
                self._postmigrate = False
                self._migration_stopped = False
        elif state == "paused":
            self.guest.resume()
            with self._lock:
                self._user_stopped = False
        else:
            return
        self.server.emit("RESUME")

    # --------------------------------------------------------- migration
    def _migrate(self, args: dict[str, Any]) -> None:
        if args.get("resume"):
            self._resume(args["uri"])
            return
        if self._busy():
            raise QMPError("There's a migration process in progress")
        state = self.run_state()
        if state == "postmigrate":
            raise QMPError("the guest has migrated (or may run on the destination): cont first")
        if state != "running":
            raise QMPError("the guest is stopped: mig migrates a running guest (cont first)")
        try:
            source = self._make_source(
                args["uri"],
                on_status=self._on_status,
                on_pass=self._on_pass,
                on_event=self._on_event,
                **self.settings.tls("client"),
                **self.settings.to_params(),
            )
        except ValueError as e:
            raise QMPError(str(e)) from None
        with self._lock:
            self.source = source
            self._status = "none"
            self._passes_announced = 0
        source.start()

    def _resume(self, uri: str) -> None:
        """QEMU's ``migrate`` with ``resume``: go on with a paused post-copy."""
        source = self.source
        if source is None or self._status != "postcopy-paused":
            raise QMPError("Cannot resume if there is no paused migration")
        try:
            source.recover(uri)
        except RuntimeError as e:
            raise QMPError(str(e)) from None

    def _query_migrate(self, _: dict[str, Any]) -> dict[str, Any]:
        source = self.source
        return {} if source is None else source.query()

    def _cancel(self, _: dict[str, Any]) -> None:
        source = self.source
        if source is not None and self._busy() and not source.cancel("cancelled by migrate_cancel"):
            raise QMPError("too late to cancel: the destination may already run the guest")

    def _continue(self, args: dict[str, Any]) -> None:
        """QEMU's ``migrate-continue``: ``state`` must be the status it continues from."""
        source, state = self.source, args["state"]
        if state not in STATUSES:
            raise QMPError(f"Parameter 'state' does not accept value '{state}'")
        if self._status != state:
            raise QMPError(f"Migration not in expected state: {self._status}")
        if state == "pre-switchover" and (source is None or not _released(source)):
            raise QMPError(f"Migration not in expected state: {self._status}")

    def _start_postcopy(self, _: dict[str, Any]) -> None:
        """QEMU's ``migrate-start-postcopy``: switch at the next decision."""
        if not self.settings.capabilities["postcopy-ram"]:
            raise QMPError(
                "Enable postcopy with migrate_set_capability before the start of migration"
            )
        source = self.source
        if source is None or not self._busy():
            raise QMPError("Postcopy must be started after migration has been started")
        try:
            source.start_postcopy()
        except RuntimeError as e:
            raise QMPError(str(e)) from None

    def _digests(self, _: dict[str, Any]) -> dict[str, Any]:
        """Digests of the guest's memory and device state, to compare with the destination's."""
        if self.run_state() == "running":
            raise QMPError("the guest is running: its memory changes (stop it, or migrate)")
        devices = [
            {"name": d.name, "state-digest": format(d.state_digest(), "032x")}
            for d in self.devices
            if callable(getattr(d, "state_digest", None))
        ]
        return {"memory": format(self.guest.memory.digest(), "032x"), "devices": devices}

    # ------------------------------------------------ migration callbacks
    # They run on the migration thread and must never raise: an exception
    # from a callback would fail the migration.
    def _on_status(self, status: str) -> None:
        try:
            self._status = status
            if self.settings.capabilities["events"]:
                self.server.emit("MIGRATION", {"status": status})
            if status == "active" and self.source is not None and self._passes_announced == 0:
                self._passes_to(int(self.source.query().get("ram", {}).get("dirty-sync-count", 0)))
            if status in ("failed", "cancelled"):
                self._after_rollback()
            elif status == "completed":
                with self._lock:
                    self._postmigrate = True
        except Exception:
            log.exception("QMP: MIGRATION event")

    def _after_rollback(self) -> None:
        """A rollback resumes the guest it paused, unless the outcome is unknown."""
        source = self.source
        left_paused = source is not None and bool(source.query().get("postmigrate"))
        with self._lock:
            resumed = self._migration_stopped and not left_paused
            self._postmigrate = left_paused
            if resumed:
                self._migration_stopped = False
        if resumed:
            self.server.emit("RESUME")

    def _on_pass(self, record: dict[str, Any]) -> None:
        try:
            self._passes_to(int(record["number"]))
        except Exception:
            log.exception("QMP: MIGRATION_PASS event")

    def _passes_to(self, number: int) -> None:
        """``MIGRATION_PASS`` for every dirty sync up to ``number``.

        The setup's first sync (QEMU's pass 1 too) ends no pass of its own:
        it is announced when the migration turns active.
        """
        while self._passes_announced < number:
            self._passes_announced += 1
            if self.settings.capabilities["events"]:
                self.server.emit("MIGRATION_PASS", {"pass": self._passes_announced})

    def _on_event(self, name: str, info: dict[str, Any]) -> None:
        try:
            if name == "guest-stop":
                with self._lock:
                    self._migration_stopped = True
                self.server.emit("STOP")
            elif name == "guest-resume":
                with self._lock:
                    self._migration_stopped = False
                self.server.emit("RESUME")
        except Exception:
            log.exception("QMP: %s event", name)


def _released(source: MigrationSource) -> bool:
    try:
        source.migrate_continue()
    except RuntimeError:
        return False
    return True
