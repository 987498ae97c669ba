"""A QMP server: QEMU's monitor protocol (docs/interop/qmp-spec.rst in QEMU).

It knows the protocol, not migration: a greeting, ``qmp_capabilities``
negotiation, commands dispatched to a table of ``Command``, replies that echo
``id``, errors with QEMU's classes, and events broadcast to every negotiated
client. Several clients may be connected at once; one that disconnects, sends
garbage or stops reading harms no other.

The protocol runs on an asyncio loop in its own thread. Commands run one at a
time on a worker thread (QEMU runs them under its big lock), so a command that
blocks (``stop`` waits for every vCPU) does not stall the other clients'
events. ``emit`` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mig.qmp.arguments import check_arguments
from mig.qmp.errors import QMPError
from mig.qmp.json_stream import InputTooLarge, JsonStream

__all__ = ["Command", "QMPServer", "parse_address"]

log = logging.getLogger("mig.qmp")

# One request larger than this without a complete JSON object is garbage:
# the connection is closed rather than buffering without bound.
MAX_REQUEST = 1 << 20
# A client that leaves this much of our output unread is dropped, so a stuck
# client cannot make the server hold its events without bound.
MAX_PENDING_OUTPUT = 4 << 20

_REQUEST_KEYS = frozenset({"execute", "arguments", "id"})


@dataclass(frozen=True)
class Command:
    """One QMP command: ``handler(arguments) -> return value`` and its arguments.

    ``required`` and ``optional`` map argument names to their JSON type
    (``str``, ``int``, ``float``, ``bool``, ``list``, ``dict``); ``None`` as
    ``optional`` accepts any arguments and leaves checking to the handler.
    ``then`` runs once the reply is on its way (``quit`` ends the process there).
    """

    handler: Callable[[dict[str, Any]], Any]
    required: Mapping[str, type] = field(default_factory=dict)
    optional: Mapping[str, type] | None = field(default_factory=dict)
    then: Callable[[], None] | None = None


def parse_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:PATH`` or ``tcp:HOST:PORT`` -> (family, path or (host, port))."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit() and int(port) < 65536:
            return "tcp", (host.strip("[]") or "127.0.0.1", int(port))
    raise ValueError(f"QMP address must be unix:PATH or tcp:HOST:PORT, not {address!r}")


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix socket"

    def send(self, msg: Mapping[str, Any]) -> None:
        if self.writer.is_closing():
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_PENDING_OUTPUT:
            log.warning("QMP client %s stopped reading: disconnected", self.peer)
            self.writer.close()
            return
        self.writer.write(_encode(msg))


class QMPServer:
    """Listens on ``address`` (``unix:PATH`` or ``tcp:HOST:PORT``) for QMP clients.

    ``commands`` maps command names to ``Command``; ``qmp_capabilities``,
    ``query-commands`` and ``query-version`` are the server's own. A handler
    raises ``QMPError`` for a QMP error; any other exception becomes a
    ``GenericError`` with its message.
    """

    def __init__(
        self,
        address: str,
        commands: Mapping[str, Command],
        *,
        version: tuple[int, int, int] = (0, 0, 0),
        package: str = "",
    ) -> None:
        self.family, self._where = parse_address(address)
        self.address = address
        self.commands = dict(commands)
        self.version = version
        self.package = package
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # One worker: commands run one at a time, in arrival order.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mig-qmp-command")

    # ---------------------------------------------------------------- API
    def start(self) -> str:
        """Bind and serve on a thread of its own; returns the bound address."""
        ready: threading.Event = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._bind())
            except BaseException as e:  # reported to start()'s caller
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name="mig-qmp", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        return self.address

    def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to every negotiated client (from any thread)."""
        now = time.time()
        msg: dict[str, Any] = {"event": event}
        if data is not None:
            msg["data"] = dict(data)
        msg["timestamp"] = {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)}
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._broadcast, msg)
        except RuntimeError:
            pass  # closing: nobody left to tell

    def close(self) -> None:
        """Disconnect every client and stop listening."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
        self._worker.shutdown(wait=False)
        if self.family == "unix":
            _unlink_socket(str(self._where))

    def __enter__(self) -> QMPServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ serving
    async def _bind(self) -> None:
        if self.family == "unix":
            path = str(self._where)
            _unlink_socket(path)  # as QEMU does: a stale socket file would refuse the bind
            self._server = await asyncio.start_unix_server(self._session, path)
        else:
            host, port = self._where  # type: ignore[misc]
            self._server = await asyncio.start_server(self._session, host, port)
            bound = self._server.sockets[0].getsockname()
            self.address = f"tcp:{host}:{bound[1]}"

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        client = _Client(writer)
        self._clients.add(client)
        log.info("QMP client %s connected", client.peer)
        try:
            client.send(self._greeting())
            await self._serve_client(client, reader)
        except ConnectionError as e:
            log.info("QMP client %s: %s", client.peer, e)
        except asyncio.CancelledError:
            pass  # the server is closing
        finally:
            self._clients.discard(client)
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()
            log.info("QMP client %s disconnected", client.peer)

    async def _serve_client(self, client: _Client, reader: asyncio.StreamReader) -> None:
        stream = JsonStream(MAX_REQUEST)
        while True:
            data = await reader.read(65536)
            if not data:
                return
            try:
                texts = stream.feed(data)
            except InputTooLarge as e:
                client.send(_error("GenericError", str(e)))
                return
            for text in texts:
                if isinstance(text, ValueError):
                    client.send(_error("GenericError", str(text)))
                    continue
                try:
                    request = json.loads(text)
                except ValueError as e:
                    client.send(_error("GenericError", f"JSON parse error, {e}"))
                    continue
                await self._request(client, request)

    async def _request(self, client: _Client, request: Any) -> None:
        if not isinstance(request, dict):
            client.send(_error("GenericError", "QMP input must be a JSON object"))
            return
        reply: dict[str, Any]
        then = None
        try:
            name, arguments = _parse_request(request)
            reply = {"return": await self._execute(client, name, arguments)}
            command = self.commands.get(name)
            then = command.then if command is not None else None
        except QMPError as e:
            reply = _error(e.error_class, e.desc)
        if "id" in request:
            reply["id"] = request["id"]
        client.send(reply)
        if then is not None:
            await client.writer.drain()
            then()

    async def _execute(self, client: _Client, name: str, arguments: dict[str, Any]) -> Any:
        if name == "qmp_capabilities":
            if client.negotiated:
                raise QMPError(
                    "Capabilities negotiation is already complete, command ignored",
                    "CommandNotFound",
                )
            check_arguments(arguments, {}, {"enable": list})
            for cap in arguments.get("enable", []):
                raise QMPError(f"Capability '{cap}' not available")
            client.negotiated = True
            return {}
        if not client.negotiated:
            raise QMPError(
                "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
            )
        if name == "query-commands":
            names = ["qmp_capabilities", "query-commands", "query-version", *self.commands]
            return [{"name": n} for n in names]
        if name == "query-version":
            major, minor, micro = self.version
            return {
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": self.package,
            }
        command = self.commands.get(name)
        if command is None:
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        if command.optional is not None:
            check_arguments(arguments, command.required, command.optional)
        assert self._loop is not None
        return await self._loop.run_in_executor(self._worker, _run, command, arguments)

    def _greeting(self) -> dict[str, Any]:
        major, minor, micro = self.version
        return {
            "QMP": {
                "version": {
                    "qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": self.package,
                },
                "capabilities": [],
            }
        }

    def _broadcast(self, msg: dict[str, Any]) -> None:
        for client in list(self._clients):
            if client.negotiated:
                client.send(msg)


def _run(command: Command, arguments: dict[str, Any]) -> Any:
    try:
        result = command.handler(arguments)
    except QMPError:
        raise
    except Exception as e:
        log.debug("QMP command failed", exc_info=True)
        raise QMPError(str(e) or type(e).__name__) from e
    return {} if result is None else result


def _parse_request(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The command name and arguments, with QEMU's errors for a malformed request."""
    if "exec-oob" in request:
        raise QMPError("QMP input member 'exec-oob' is unexpected (out-of-band is not enabled)")
    for key in request:
        if key not in _REQUEST_KEYS:
            raise QMPError(f"QMP input member '{key}' is unexpected")
    name = request.get("execute")
    if name is None:
        raise QMPError("QMP input lacks member 'execute'")
    if not isinstance(name, str):
        raise QMPError("QMP input member 'execute' must be a string")
    arguments = request.get("arguments", {})
    if not isinstance(arguments, dict):
        raise QMPError("QMP input member 'arguments' must be an object")
    return name, arguments


def _error(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


def _encode(msg: Mapping[str, Any]) -> bytes:
    return (json.dumps(msg, default=_json_default) + "\r\n").encode()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    return str(o)


def _unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
