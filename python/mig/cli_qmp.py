"""``mig serve --qmp`` and ``mig send --qmp``: the commands driven through QMP.

``mig send --qmp ADDRESS`` runs the built-in guest and waits for ``migrate``;
``mig serve --qmp ADDRESS`` receives migrations, listening on ``--listen`` at
once or, with ``--incoming defer``, on each ``migrate-incoming``'s URI. Both
run until ``quit`` (or SIGTERM, or Ctrl-C); ``serve --once`` ends after one
migration. The command-line migration options are the starting values of
``query-migrate-parameters``; the TLS options apply unless ``tls-creds`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from rich.console import Console

from mig import cli
from mig.qmp import DestinationMonitor, QMPError, SourceMonitor

__all__ = ["send_qmp", "serve_qmp"]

_POLL = 0.2


@contextlib.contextmanager
def _until_signal(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT and SIGTERM set ``stop``; yields the list of signals caught."""
    caught: list[int] = []

    def handle(signum: int, frame: Any) -> None:
        caught.append(signum)
        stop.set()

    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _exit_code(caught: list[int]) -> int:
    return cli.EXIT_INTERRUPTED if signal.SIGINT in caught else cli.EXIT_OK


# -------------------------------------------------------------------- send
def send_qmp(args: argparse.Namespace, console: Console) -> int:
    """Run the guest; migrations start on QMP ``migrate``."""
    from mig.source import MigrationSource

    g = cli._Guest(args)
    try:
        cli_tls = cli._tls(args)

        def make_source(uri: str, **kwargs: Any) -> MigrationSource:
            return MigrationSource(g.guest, g.devices, uri, **{**cli_tls, **kwargs})

        monitor = SourceMonitor(
            args.qmp, g.guest, g.devices, params=cli._params(args), make_source=make_source
        )
        bound = _start(monitor)
        print(f"mig: guest running; QMP on {bound}", file=sys.stderr)
        with _until_signal(monitor.quit_requested) as caught:
            monitor.quit_requested.wait()
        monitor.close()
        q = monitor.source.query() if monitor.source is not None else {}
        if args.json:
            cli._stdout_json(q)
        return _exit_code(caught)
    finally:
        g.close()


# ------------------------------------------------------------------- serve
class _Incoming:
    """One incoming migration into fresh memory and devices.

    ``query()`` adds the digests of each device's state taken as it resumed,
    as ``mig serve`` prints them, so a client can compare them with the source's.
    """

    def __init__(self, args: argparse.Namespace, uri: str, **kwargs: Any) -> None:
        import mig
        from mig.destination import MigrationDestination
        from mig.devices import create_all

        self.memory = mig.GuestMemory(args.size)
        self.devices = (
            [] if args.devices == "none" else create_all(args.devices, self.memory, active=False)
        )
        self.seen = cli._ResumeDigests()
        handlers = [self.seen.handler(d, i) for i, d in enumerate(self.devices, start=1)]
        try:
            self.dest = MigrationDestination(
                uri,
                self.memory,
                handlers,
                accept_timeout=args.timeout or 365 * 86400.0,
                go_timeout=args.go_timeout,
                prealloc=args.prealloc,
                **kwargs,
            )
        except (mig.MigError, OSError, ValueError) as e:
            self.close()
            raise QMPError(f"cannot listen on {uri}: {e}") from None
        self.uri = str(self.dest.uri)

    def start(self) -> None:
        self.dest.start()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        self.dest.wait(timeout)
        return self.query()

    def cancel(self, reason: str = "cancelled on the destination") -> None:
        self.dest.cancel(reason)

    def recover(self) -> None:
        self.dest.recover()

    def query(self) -> dict[str, Any]:
        return self.seen.result(self.dest.query())

    def close(self) -> None:
        for d in self.devices:
            d.close()


def serve_qmp(args: argparse.Namespace, console: Console) -> int:
    """Receive migrations that QMP ``migrate-incoming`` (or ``--listen``) starts."""
    from mig.display import destination_table

    made: list[_Incoming] = []
    cli_tls = cli._tls(args)

    def make_destination(uri: str, **kwargs: Any) -> _Incoming:
        for old in made:  # it has ended (the monitor waited): fresh memory and devices now
            old.close()
        made.clear()
        incoming = _Incoming(args, uri, **{**cli_tls, **kwargs})
        made.append(incoming)
        return incoming

    monitor = DestinationMonitor(args.qmp, make_destination)
    bound = _start(monitor)
    print(f"mig: QMP on {bound}", file=sys.stderr)
    ok = True
    try:
        if args.listen:
            _listen(monitor, args.listen)
        with _until_signal(monitor.quit_requested) as caught:
            while not monitor.quit_requested.is_set():
                try:
                    q = monitor.finished.get(timeout=_POLL)
                except queue.Empty:
                    continue
                ok = q.get("status") == "completed"
                if args.json:
                    cli._stdout_json(q)
                else:
                    Console().print(destination_table(q))
                if not ok:
                    status, reason = q.get("status"), q.get("error-desc")
                    print(f"mig: incoming migration {status}: {reason}", file=sys.stderr)
                if args.once:
                    break
                if args.listen:
                    _listen(monitor, made[0].uri)  # the same port, even one picked at random
        code = _exit_code(caught)
    finally:
        monitor.close()
        for old in made:
            old.close()
    if args.once and code == cli.EXIT_OK and not ok:
        return cli.EXIT_FAILED
    return code


def _listen(monitor: DestinationMonitor, uri: str) -> None:
    try:
        incoming = monitor.incoming(uri)
    except QMPError as e:
        raise cli.UsageError("--listen", e.desc) from None
    print(f"mig: listening on {incoming.uri}", file=sys.stderr)


def _start(monitor: SourceMonitor | DestinationMonitor) -> str:
    try:
        return monitor.start()
    except (OSError, ValueError) as e:
        raise cli.UsageError("--qmp", str(e)) from None
