"""``ControlSession``: the source's side of the control channel.

Sends the typed messages of ``mig.protocol`` and dispatches what the
destination says: ``switchover-ack`` (the source may complete),
``pass-ack`` (the destination's loop latency and digest timing, which feed
the switchover's fixed costs; its drain lag is not planned with, as
``settle`` empties the backlog it includes), ``progress`` (its heartbeat, into
``peer_progress`` for ``mig.stall_watch``), a late ``settled``,
``device-initial-done``, and its
``failed``/``cancel``, which end the migration with ``by_peer`` set: the
destination discarded everything and never resumed.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from mig import faults, protocol
from mig._mig import ProtocolError
from mig.clock import Clock
from mig.errors import MigrationEnded
from mig.link import Link
from mig.notifier import Notifier
from mig.protocol import (
    Cancel,
    DeviceInitialDone,
    Failed,
    Hello,
    HelloAck,
    Message,
    Pass,
    PassAck,
    Ping,
    Pong,
    Progress,
    Settled,
    SwitchoverAck,
)
from mig.stall_watch import PeerProgress
from mig.stats import SwitchoverCosts

__all__ = ["ControlSession", "PINGS"]

_M = TypeVar("_M", bound=Message)
_POLL = 0.05
# Destination loop latencies kept; the switchover plans for the median.
_BUSY_SAMPLES = 8
# Pings after hello-ack; the shortest round trip stands (one may meet the
# destination's loop starting its loads, or a descheduled peer).
PINGS = 3


class ControlSession:
    def __init__(self, link: Link, clock: Clock, costs: SwitchoverCosts, notify: Notifier) -> None:
        self.link = link
        self.clock = clock
        self.costs = costs
        self.notify = notify
        self.switchover_acked = False
        self.peer_progress = PeerProgress(clock)
        self.rtt = 0.0
        self._dest_busy: deque[float] = deque(maxlen=_BUSY_SAMPLES)
        self._pass_sent: dict[int, float] = {}  # pass number -> when its record went out

    def send(self, message: Message) -> None:
        self.link.send(message)
        if isinstance(message, Pass):
            self._pass_sent[message.number] = self.clock.now()

    def handshake(self, hello: Hello, timeout: float, check_cancel: Callable[[], None]) -> None:
        """``hello`` out, ``hello-ack`` back within ``timeout``, then
        ``PINGS`` pings: the shortest ping round trip is the control round
        trip the switchover plans with. ``hello``'s own is not one: the
        destination reads ``hello`` only once its memory is mapped and
        populated, which takes longer the larger the guest, and a plan that
        charged that twice would stop a pass early with megabytes pending."""
        deadline = self.clock.now() + timeout
        self.link.send(hello)
        self._reply(HelloAck, "answer hello", deadline, check_cancel)
        trips = []
        for value in range(1, PINGS + 1):
            t0 = self.clock.now()
            self.link.send(Ping(value))
            while self._reply(Pong, "answer ping", t0 + timeout, check_cancel).value != value:
                pass  # a stray pong (not this ping's) is skipped
            trips.append(self.clock.now() - t0)
        self._plan_round_trip(min(trips))

    def _reply(
        self, kind: type[_M], what: str, deadline: float, check_cancel: Callable[[], None]
    ) -> _M:
        """The destination's next ``kind`` before ``deadline``; any other
        message on the way is handled as ever (a ``switchover-ack``, a
        device's initial data loaded)."""
        while True:
            check_cancel()
            message = self.link.recv(_POLL)
            if isinstance(message, kind):
                return message
            if message is not None:
                self.dispatch(message)
            if self.clock.now() > deadline:
                raise MigrationEnded("failed", f"destination did not {what}")

    def settled(self, round_trip: float) -> None:
        """A ``settle`` answered: ``round_trip`` is its wait less the
        destination's reported work. On a loaded host any round trip may
        meet a descheduled peer: the handshake plans with the shortest seen. The
        destination's loop has landed everything sent so far, so ``complete``
        will find it idle: the handshake is the two round trips alone,
        its busy samples (loading the devices' initial state, hundreds of ms
        each on a loaded host) would count work already done. A later pass
        ack (the switchover abandoned) plans with them again."""
        self._plan_round_trip(min(self.rtt, round_trip))
        self.costs.dest_busy = 0.0

    def _pass_round_trip(self, number: int) -> None:
        """A pass record and its ack are a control round trip plus the pass's
        last data landing: never shorter than the round trip, and close to it
        for a small pass, but also the source's own wait before it next
        looks at the channel (it polls between slices): an upper bound that
        lowers the pings' figure only when the pings met a busy peer."""
        sent = self._pass_sent.pop(number, None)
        for older in [n for n in self._pass_sent if n < number]:
            del self._pass_sent[older]  # acks answer passes in order; none will come
        if sent is not None:
            self._plan_round_trip(min(self.rtt, self.clock.now() - sent))

    def _plan_round_trip(self, rtt: float) -> None:
        """The control round trip planned with; the switchover's handshake
        is two of them (``complete``/``ready``, ``go``/``resumed``)."""
        self.rtt = rtt
        self.costs.handshake = 2 * rtt

    def poll(self) -> None:
        """Handle every message already waiting."""
        while (message := self.link.recv(0)) is not None:
            self.dispatch(message)
        self.peer_progress.polled()

    def dispatch(self, message: Message) -> None:
        match message:
            case SwitchoverAck():
                self.switchover_acked = True
                self.notify.event("switchover-ack")
                faults.point("source.switchover-ack")
            case PassAck():
                self._on_pass_ack(message)
            case Progress(bytes=received):
                self.peer_progress.heard(received, self.link.transferred())
            case Settled():
                pass  # a late answer to a settle that timed out: nothing waits for it
            case DeviceInitialDone(device=device):
                self.notify.event("device-initial-done", device=device)
            case Failed(reason=reason) | Cancel(reason=reason):
                raise MigrationEnded("failed", f"destination: {reason}", by_peer=True)
            case _:
                raise ProtocolError(
                    f"unexpected control message {protocol.type_name(message)!r} on the source"
                )

    def wait_for(
        self, kind: type[_M], what: str, timeout: float, check_cancel: Callable[[], None]
    ) -> _M:
        """The destination's ``kind`` within ``timeout``; its ``failed`` means
        it discarded everything and never resumed. Other messages are stale."""
        deadline = self.clock.now() + timeout
        while self.clock.now() < deadline:
            check_cancel()
            message = self.link.recv(_POLL)
            if isinstance(message, kind):
                return message
            if isinstance(message, Failed | Cancel):
                reason = f"destination: {message.reason}"
                raise MigrationEnded("failed", reason, by_peer=True)
        raise MigrationEnded(
            "failed", f"destination did not {what} within {timeout} s (switchover_timeout)"
        )

    def peer_reason(self) -> str | None:
        """A broken stream is often the destination failing first: find why it said."""
        for _ in range(8):
            try:
                message = self.link.recv(_POLL)
            except Exception:
                return None
            if message is None:
                return None
            if isinstance(message, Failed | Cancel):
                return f"destination: {message.reason}"
        return None

    def _on_pass_ack(self, ack: PassAck) -> None:
        """The destination's loop latency and digest timing.

        ``handshake`` is the two control round trips of the switchover
        (``complete``/``ready``, ``go``/``resumed``); ``dest_busy`` the median
        recent time the destination's loop spent away from the control
        channel (loading device state), which a switchover without a
        ``settle`` before the pause pays on top (``SwitchoverCosts``):
        ``complete`` meets that loop wherever it is, and a single long load
        (the initial device state) must not stand for every later one.

        ``dest_digest`` keeps the fastest timing reported: the destination
        times its digest while pages arrive and the guest runs, which the
        switchover, with the guest stopped and the sends done, does not
        compete with (timed under that load the figure read twice the cost).
        """
        self._dest_busy.append(ack.busy)
        self._pass_round_trip(ack.number)
        self.costs.dest_busy = statistics.median(self._dest_busy)
        if ack.digest is not None:
            seen = self.costs.dest_digest
            self.costs.dest_digest = ack.digest if seen is None else min(seen, ack.digest)
