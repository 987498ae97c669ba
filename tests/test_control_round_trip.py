"""The control round trip the switchover's handshake is planned with."""

from __future__ import annotations

import pytest
from pytest import approx

from mig.clock import VirtualClock
from mig.control import PINGS, ControlSession
from mig.errors import MigrationEnded
from mig.notifier import Notifier
from mig.protocol import Hello, HelloAck, Message, Pass, PassAck, Ping, Pong, SessionParams
from mig.stats import SwitchoverCosts


class ScriptedLink:
    """Answers ``hello`` after ``hello_delay`` of virtual time and each ping
    after the next of ``ping_delays`` (the last repeats; None: never);
    keeps what is sent."""

    def __init__(
        self, clock: VirtualClock, hello_delay: float, ping_delays: tuple[float | None, ...]
    ) -> None:
        self.clock, self.hello_delay, self.ping_delays = clock, hello_delay, list(ping_delays)
        self.sent: list[Message] = []
        self.inbox: list[Message] = []

    def send(self, message: Message) -> None:
        self.sent.append(message)
        if isinstance(message, Hello):
            self.clock.advance(self.hello_delay)
            self.inbox.append(HelloAck())
        if isinstance(message, Ping):
            delay = self.ping_delays.pop(0) if len(self.ping_delays) > 1 else self.ping_delays[0]
            if delay is not None:
                self.clock.advance(delay)
                self.inbox.append(Pong(message.value))

    def recv(self, timeout: float) -> Message | None:
        if not self.inbox:
            self.clock.advance(timeout)
        return self.inbox.pop(0) if self.inbox else None


def session(
    hello_delay: float, ping_delays: tuple[float | None, ...] | None = None
) -> tuple[ControlSession, VirtualClock, SwitchoverCosts]:
    clock = VirtualClock()
    costs = SwitchoverCosts()
    link = ScriptedLink(clock, hello_delay, ping_delays or (hello_delay,))
    control = ControlSession(link, clock, costs, Notifier())  # type: ignore[arg-type]
    hello = Hello(7, 4096, 1 << 20, (), SessionParams(300, 0, 2, "none"))
    control.handshake(hello, timeout=5.0, check_cancel=lambda: None)
    return control, clock, costs


def test_hellos_wait_is_not_the_round_trip_the_pings_are() -> None:
    # The destination answered hello after 220 ms of its own start-up (its
    # memory mapped first); its pings came back in 2, 1 and 3 ms.
    control, _, costs = session(hello_delay=0.220, ping_delays=(0.002, 0.001, 0.003))
    sent = [m for m in control.link.sent if isinstance(m, Ping)]  # type: ignore[attr-defined]
    assert [p.value for p in sent] == list(range(1, PINGS + 1))
    assert control.rtt == approx(0.001)
    assert costs.handshake == approx(2 * 0.001)


def test_a_destination_that_never_answers_a_ping_fails_the_setup() -> None:
    with pytest.raises(MigrationEnded, match="did not answer ping"):
        session(hello_delay=0.001, ping_delays=(0.001, None))


def test_a_quick_pass_ack_lowers_a_round_trip_the_pings_met_busy() -> None:
    control, clock, costs = session(hello_delay=0.220, ping_delays=(0.030,))
    assert costs.handshake == approx(2 * 0.030)
    control.send(Pass(1, 1, {}))
    clock.advance(0.002)
    control.dispatch(PassAck(1, busy=0.0005))
    assert control.rtt == approx(0.002)
    # Two round trips; the destination's loop latency is paid on top by a
    # switchover that starts without a settle (a stopped guest).
    assert costs.handshake == approx(2 * 0.002)
    assert costs.dest_busy == approx(0.0005)
    assert costs.terms()["handshake"] == approx(2 * 0.002)
    costs.settle_first = False
    assert costs.terms()["handshake"] == approx(2 * 0.002 + 0.0005)


def test_a_slow_pass_ack_never_raises_the_round_trip() -> None:
    control, clock, costs = session(hello_delay=0.003)
    control.send(Pass(1, 1, {}))
    clock.advance(0.400)  # a long last landing
    control.dispatch(PassAck(1, busy=0.0))
    assert control.rtt == approx(0.003)
    # An ack for a pass whose record was never timed teaches nothing.
    control.dispatch(PassAck(7, busy=0.0))
    assert control.rtt == approx(0.003)


def test_acks_answer_passes_in_order_so_older_send_times_are_dropped() -> None:
    control, clock, _ = session(hello_delay=0.050)
    for n in (1, 2, 3):
        control.send(Pass(n, 1, {}))
    clock.advance(0.010)
    control.dispatch(PassAck(3, busy=0.0))
    assert control.rtt == approx(0.010)
    assert control._pass_sent == {}  # none kept for passes never answered
