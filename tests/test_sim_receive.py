"""The destination's receive side in the simulator (``mig.sim_receive``):
the backlog its channels hold, what ``settle`` and the ``drain`` term wait
for, and its calibration."""

from __future__ import annotations

import pytest

from mig.sim import HostModel, LinkModel, SimConfig, simulate
from mig.sim_receive import ChannelBacklog, lag_per_byte, receive_rate, socket_buffer_bytes

MIB = 1 << 20
LINK = 1e9  # bytes/s the simulated sender puts on the wire


def test_the_backlog_is_what_was_sent_less_what_the_receiver_took_in() -> None:
    q = ChannelBacklog(rate=100.0, capacity=0.0, now=0.0)
    assert q.advance(1.0, wire=300.0) == 0.0  # 300 sent over 1 s, 100 taken in
    assert q.bytes == pytest.approx(200.0)
    assert q.seconds(1.5) == pytest.approx(1.5)  # 150 left at 100/s
    assert q.seconds(10.0) == 0.0  # taken in long ago
    # A sender slower than the receiver leaves nothing behind.
    q.advance(11.0, wire=50.0)
    assert q.bytes == 0.0


def test_full_sockets_hold_the_sender_back() -> None:
    q = ChannelBacklog(rate=100.0, capacity=50.0, now=0.0)
    # 300 bytes in 1 s: 200 would wait, the sockets hold 50; the sender
    # waits until the receiver took the other 150.
    assert q.advance(1.0, wire=300.0) == pytest.approx(1.5)
    assert q.bytes == pytest.approx(50.0)
    assert q.seconds(2.5) == pytest.approx(0.5)


def test_a_host_that_did_not_measure_the_rate_lands_pages_as_charged() -> None:
    q = ChannelBacklog(rate=0.0, capacity=0.0, now=0.0)
    assert q.advance(0.001, wire=1e12) == 0.0
    assert q.seconds(0.001) == 0.0


def _run(policy: str, receive: float, buffer: float = 0.0) -> dict:
    host = HostModel(receive_rate=receive, channel_buffer=buffer)
    config = SimConfig(memory=64 * MIB, host=host, link=LinkModel(bottleneck=LINK),
                       policy=policy, params={"multifd_channels": 2})  # fmt: skip
    return simulate(config)


def _drain(q: dict) -> float:
    return q["downtime-breakdown"]["drain"] / 1000


def test_a_switchover_without_a_settle_waits_for_the_channels_backlog() -> None:
    """stop-exact-resume completes from its stopped exact: no settle empties
    the channels first, and the destination's end records wait behind what
    the receiver has not taken in. The old model charged drain_base alone."""
    base = HostModel().drain_base
    fast, slow = _run("stop-exact-resume", 2 * LINK), _run("stop-exact-resume", LINK / 2)
    assert _drain(fast) == pytest.approx(base)  # the receiver keeps up: nothing waits
    wire = slow["ram"]["transferred"]
    # Half the sender's pace: half of what the sender put out in W / LINK
    # seconds is still queued, and takes W / LINK more to come in, less what
    # came in between the bulk pass's last send and the stop (its sync, the
    # stopped exact).
    assert 0.85 * wire / LINK <= _drain(slow) - base <= wire / LINK
    assert slow["downtime"] - fast["downtime"] == pytest.approx(_drain(slow) * 1000 - base * 1000)


def test_a_settle_takes_the_backlog_in_while_the_guest_still_runs() -> None:
    fast, slow = _run("adaptive", 2 * LINK), _run("adaptive", LINK / 2)
    # Only the end records' bytes wait inside the downtime.
    assert _drain(slow) == pytest.approx(_drain(fast), rel=1e-3)
    assert slow["downtime"] == pytest.approx(fast["downtime"], rel=1e-3)
    wire = slow["ram"]["transferred"]
    # The backlog of the bulk pass, less what came in before the settle asked.
    late = (slow["settle-time"] - fast["settle-time"]) / 1000
    assert 0.85 * wire / LINK <= late <= wire / LINK


def test_sockets_that_hold_little_make_the_sender_wait_and_the_drain_short() -> None:
    held = _run("stop-exact-resume", LINK / 2, buffer=2 * MIB)  # 4 MiB over two channels
    free = _run("stop-exact-resume", LINK / 2)
    assert _drain(held) - HostModel().drain_base == pytest.approx(4 * MIB / (LINK / 2), rel=1e-3)
    assert _drain(held) < _drain(free)
    # The pass went at the receiver's pace instead.
    assert held["downtime-breakdown"]["final-ram"] > free["downtime-breakdown"]["final-ram"] * 1.8


def test_the_receive_rate_adds_the_measured_lag_to_the_senders_pace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mig.sim as sim

    calls = []

    def migration(size: int, filled: bool, cap: int, demo: bool, policy: str) -> tuple[dict, None]:
        calls.append((filled, cap, demo, policy))
        # 200 MB sent after the pause; drains (ms) that differ run by run.
        drain = [5.0, 101.0, 40.0][len(calls) - 1]
        q = {"ram": {"transferred": 200e6, "downtime-bytes": 200e6},
             "downtime-breakdown": {"final-ram": 100.0, "drain": drain, "load": 10.0}}  # fmt: skip
        return q, None

    monkeypatch.setattr(sim, "_idle_loopback_migration", migration)
    # The median run lagged 40 ms (less the 1 ms base) behind a 2 GB/s sender.
    rate = receive_rate(2e9, drain_base=0.001)
    assert 1 / rate == pytest.approx(1 / 2e9 + 0.039 / 200e6)
    # Each a real loopback migration to mig demo's destination of a filled
    # guest, switched over without a settle.
    assert calls == [(True, 0, True, "stop-exact-resume")] * 3


def test_a_receiver_that_keeps_up_gets_the_senders_pace() -> None:
    q = {"ram": {"transferred": 1e6}, "downtime-breakdown": {"drain": 0.5}}
    assert lag_per_byte(q, drain_base=0.001) == 0.0


def test_the_calibrated_rate_gives_the_calibration_migrations_drain_back() -> None:
    """A twin of the calibration's migration, simulated with the measured
    rate, waits as long as the real one did."""
    from mig.sim_receive import CALIBRATION_MEMORY

    lag = 0.020 / CALIBRATION_MEMORY  # the real one drained 20 ms beyond the base
    host = HostModel(receive_rate=1 / (1 / LINK + lag))
    config = SimConfig(memory=CALIBRATION_MEMORY, host=host, link=LinkModel(bottleneck=LINK),
                       policy="stop-exact-resume", params={"multifd_channels": 2})  # fmt: skip
    q = simulate(config)
    assert _drain(q) - host.drain_base == pytest.approx(0.020, rel=0.02)


def test_the_socket_buffers_come_from_the_kernels_limits(tmp_path) -> None:
    ipv4 = tmp_path / "ipv4"
    ipv4.mkdir()
    (ipv4 / "tcp_wmem").write_text("4096\t16384\t4194304\n")
    (ipv4 / "tcp_rmem").write_text("4096\t131072\t33554432\n")
    assert socket_buffer_bytes(tmp_path) == 4194304 + 33554432
    assert socket_buffer_bytes(tmp_path / "missing") == 0.0
