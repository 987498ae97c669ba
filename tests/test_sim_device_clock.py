"""A sample device in virtual time works as its worker thread does."""

from __future__ import annotations

from mig.clock import VirtualClock
from mig.sample_devices.factory import create
from mig.sim import SimConfig, simulate

TICK = 0.005


def test_a_long_clock_jump_writes_once_per_tick() -> None:
    # The thread wakes every tick and writes; a send charged at once must not
    # fold twenty ticks into one write (which dirties a twentieth of the chunks).
    jumped, stepped = VirtualClock(), VirtualClock()
    one = create("nic:state=4MiB,rate=1MiB/s", clock=jumped)
    many = create("nic:state=4MiB,rate=1MiB/s", clock=stepped)
    try:
        assert one.tick == many.tick == TICK
        jumped.advance(20 * TICK)
        for _ in range(20):
            stepped.advance(TICK)
        assert one.writes == many.writes == 20
    finally:
        one.close()
        many.close()


def test_a_partial_tick_carries_over() -> None:
    clock = VirtualClock()
    dev = create("nic:state=4MiB,rate=1MiB/s", clock=clock)
    try:
        clock.advance(2.5 * TICK)
        assert dev.writes == 2
        clock.advance(0.5 * TICK)
        assert dev.writes == 3
    finally:
        dev.close()


def test_the_simulated_devices_write_as_often_as_this_host_s_workers() -> None:
    # A host whose device workers wake every 10 ms (a busy host) dirties
    # fewer of a nic's chunks than one at the nominal 5 ms tick.
    from dataclasses import replace

    from mig.sim import HostModel

    def precopy_bytes(tick: float) -> int:
        config = SimConfig(
            memory=64 << 20,
            workload="uniform:rate=1000",
            devices=("nic:state=4MiB,rate=1MiB/s",),
            params={"max_bandwidth": 64 << 20},
            host=replace(HostModel(), device_tick=tick),
        )
        q = simulate(config)
        assert q["status"] == "completed" and q["verified"]
        return q["devices"][0]["precopy-bytes"]

    nominal, slow = precopy_bytes(0.0), precopy_bytes(2 * TICK)
    assert slow < nominal


def test_the_device_tick_is_the_measured_interval_between_writes() -> None:
    from mig.sim_device_tick import device_tick_seconds

    tick = device_tick_seconds(0.2)
    # Never faster than the worker's own tick; a loaded host only adds.
    assert TICK <= tick < 0.2
