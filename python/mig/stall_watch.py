"""``StallWatch``: a precopy that makes no progress for ``stall_timeout`` fails, saying why.

A destination that stops reading is otherwise found only when the socket
buffers are full and a write outlasts ``io_timeout`` (a minute by default),
and a slow link fills its buffers slowly. Both sides send a ``progress``
heartbeat (``mig.protocol.Progress``) every ``heartbeat(stall_timeout)``
seconds while the precopy runs; the destination's carries the bytes its
data channels received. On the source this watch then ends the precopy when

* the data channels' writes are blocked: a send has been under way for
  ``stall_timeout`` and not one packet went out ("the destination stopped
  reading"); the main thread is stuck in that send, so the watch aborts the
  link to free it;
* no bytes are acknowledged: for ``stall_timeout`` the destination's
  heartbeats stopped, or its received count stood still while this side sent
  more ("no bytes acknowledged by the destination"). Only time the main
  thread spent reading the control channel counts, so heartbeats that wait
  unread behind a long send are never taken for silence.

The destination side is ``DestinationCore.tick``: a source that sends
nothing (no heartbeat, no data) for ``stall_timeout`` ends the incoming
migration. Only precopy is watched (statuses ``active`` and
``pre-switchover``): the switchover has its own ``switchover_timeout``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mig.clock import Clock
from mig.protocol import Failed, Progress

__all__ = ["PeerProgress", "StallWatch", "heartbeat"]

_WATCHED = ("active", "pre-switchover")  # precopy, and the operator's pause in it


def heartbeat(stall_timeout: float) -> float:
    """Seconds between heartbeats: several per ``stall_timeout``, at most one a second."""
    return min(1.0, max(0.05, stall_timeout / 5))


class PeerProgress:
    """What the destination's heartbeats said, and when the source last looked.

    The main thread writes it (``heard`` from the control session's
    dispatch, ``polled`` each time it reads the control channel); the watch
    thread reads it. One lock keeps each update whole.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.restart()

    def restart(self) -> None:
        """Watching (again) from now: nothing before counts as silence."""
        now = self.clock.now()
        with self._lock:
            self.heard_at = self.acked_at = self.polled_at = now
            self.acked = -1
            self.sent_at_ack = -1

    def heard(self, received: int, sent: int) -> None:
        """A heartbeat: the destination received ``received`` bytes; ``sent`` is ours now."""
        now = self.clock.now()
        with self._lock:
            self.heard_at = self.polled_at = now
            if received != self.acked:
                self.acked, self.acked_at, self.sent_at_ack = received, now, sent

    def polled(self) -> None:
        with self._lock:
            self.polled_at = self.clock.now()

    def unacknowledged_for(self, sent: int) -> float:
        """Seconds of control-channel reading with no heartbeat, or with
        ``sent`` grown past what the last change of the received count covered."""
        with self._lock:
            silent = self.polled_at - self.heard_at
            standing = self.polled_at - self.acked_at if sent > self.sent_at_ack else 0.0
        return max(silent, standing)


class StallWatch:
    """The watch thread of one outgoing migration over a real stream.

    ``link``: the migration's link (heartbeats go out on it; its native
    ``stats()["transferred"]`` counts packets as they leave). ``peer``:
    e.g. "destination 127.0.0.1:4444". ``status()``: the migration's status;
    ``active`` and ``pre-switchover`` are watched, the latter for heartbeats
    only (it sends nothing). ``where()``: the phase for the reason
    ("during pass 3").
    """

    def __init__(
        self,
        link: Any,
        clock: Clock,
        stall_timeout: float,
        peer: str,
        progress: PeerProgress,
        status: Callable[[], str],
        where: Callable[[], str],
    ) -> None:
        self.link = link
        self.clock = clock
        self.timeout = stall_timeout
        self.peer = peer
        self.progress = progress
        self.status = status
        self.where = where
        self.reason: str | None = None
        self._sending_since: float | None = None
        self._wire = -1
        self._wire_at = 0.0
        self._beat_at = -float("inf")
        self._was_watching = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mig-stall-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    @contextmanager
    def sending(self) -> Iterator[None]:
        """The main thread may write inside this block: blocked writes are watched.

        One block is one loop iteration (about a send slice): a block that
        lasts ``stall_timeout`` without a packet going out is a stall."""
        self._sending_since = self.clock.now()
        try:
            yield
        finally:
            self._sending_since = None

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        tick = min(0.25, heartbeat(self.timeout))
        while not self._stop.wait(tick):
            if self.reason is not None:
                return
            if self.status() not in _WATCHED:
                self._was_watching = False
                continue
            now = self.clock.now()
            if not self._was_watching:  # (again) in precopy: old silence does not count
                self._was_watching = True
                self.progress.restart()
                self._wire, self._wire_at = -1, now
            self._beat(now)
            reason = self._stalled(now)
            if reason is not None:
                self._end(reason)
                return

    def _beat(self, now: float) -> None:
        if now - self._beat_at < heartbeat(self.timeout):
            return
        self._beat_at = now
        try:
            self.link.send(Progress(int(self.link.transferred())))
        except Exception:
            pass  # a broken link fails the main thread with its own reason

    def _stalled(self, now: float) -> str | None:
        wire = self._wire_bytes()
        if wire != self._wire:
            self._wire, self._wire_at = wire, now
        since = self._sending_since
        if since is None or self.status() != "active":
            blocked = 0.0  # nothing is being sent
        else:
            blocked = now - max(since, self._wire_at)
        unacked = self.progress.unacknowledged_for(int(self.link.transferred()))
        # Unacknowledged bytes behind writes that block too: the peer stopped reading.
        if blocked >= self.timeout or (unacked >= self.timeout and blocked >= 0.5):
            return (
                f"precopy stalled {self.where()}: the {self.peer} stopped reading "
                f"(data-channel writes blocked for {blocked:.1f} s; stall-timeout "
                f"{_secs(self.timeout)})"
            )
        if unacked >= self.timeout:
            return (
                f"precopy stalled {self.where()}: no bytes acknowledged by the {self.peer} "
                f"for {_secs(self.timeout)} (stall-timeout)"
            )
        return None

    def _wire_bytes(self) -> int:
        """Bytes out of the data channels so far, counted per packet as it leaves."""
        try:
            return int(self.link.stats().get("transferred", self.link.transferred()))
        except Exception:
            return int(self.link.transferred())

    def _end(self, reason: str) -> None:
        """Say why on the control channel, then abort the link: the main
        thread may be stuck in a write that only an abort frees."""
        self.reason = reason
        try:
            self.link.send(Failed(reason))
        except Exception:
            pass
        try:
            self.link.abort()
        except Exception:
            pass


def _secs(seconds: float) -> str:
    return f"{seconds:g} s"
