"""The control round trip the switchover's handshake is planned with."""

from __future__ import annotations

from pytest import approx

from mig.clock import VirtualClock
from mig.control import ControlSession
from mig.notifier import Notifier
from mig.protocol import Hello, HelloAck, Message, Pass, PassAck, SessionParams
from mig.stats import SwitchoverCosts


class ScriptedLink:
    """Answers ``hello`` after ``hello_delay`` of virtual time; keeps what is sent."""

    def __init__(self, clock: VirtualClock, hello_delay: float) -> None:
        self.clock, self.hello_delay = clock, hello_delay
        self.sent: list[Message] = []
        self.inbox: list[Message] = []

    def send(self, message: Message) -> None:
        self.sent.append(message)
        if isinstance(message, Hello):
            self.clock.advance(self.hello_delay)
            self.inbox.append(HelloAck())

    def recv(self, timeout: float) -> Message | None:
        return self.inbox.pop(0) if self.inbox else None


def session(hello_delay: float) -> tuple[ControlSession, VirtualClock, SwitchoverCosts]:
    clock = VirtualClock()
    costs = SwitchoverCosts()
    control = ControlSession(ScriptedLink(clock, hello_delay), clock, costs, Notifier())  # type: ignore[arg-type]
    hello = Hello(7, 4096, 1 << 20, (), SessionParams(300, 0, 2, "none"))
    control.handshake(hello, timeout=5.0, check_cancel=lambda: None)
    return control, clock, costs


def test_a_slow_hello_stops_counting_once_a_pass_is_acknowledged_quickly() -> None:
    # The destination answered hello after 220 ms of its own start-up.
    control, clock, costs = session(hello_delay=0.220)
    assert costs.handshake == approx(2 * 0.220)
    control.send(Pass(1, 1, {}))
    clock.advance(0.002)
    control.dispatch(PassAck(1, busy=0.0005))
    assert control.rtt == approx(0.002)
    # Two round trips, not hello's wait; the destination's loop latency is
    # paid on top by a switchover that starts without a settle (a stopped guest).
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
    assert control.rtt == 0.003
    # An ack for a pass whose record was never timed teaches nothing.
    control.dispatch(PassAck(7, busy=0.0))
    assert control.rtt == 0.003


def test_acks_answer_passes_in_order_so_older_send_times_are_dropped() -> None:
    control, clock, _ = session(hello_delay=0.050)
    for n in (1, 2, 3):
        control.send(Pass(n, 1, {}))
    clock.advance(0.010)
    control.dispatch(PassAck(3, busy=0.0))
    assert control.rtt == approx(0.010)
    assert control._pass_sent == {}  # none kept for passes never answered
