"""A device's stop-copy cost is in the plan before the first switchover pays it.

``mig.device_stop_costs``: until a device is stopped, its ``device-state``
term (and ``load``, which counts it again for the destination) is its
precopy production per byte times its pending bytes plus the fixed stop work
the device measured itself. Checked in virtual time, where both sides are
exact, and on a real loopback migration, where the plan must land near what
the switchover paid.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

import mig
from mig.destination import MigrationDestination
from mig.device_handler import DeviceHandler
from mig.device_stop_costs import DeviceStopCosts
from mig.sample_devices.nic import NicConfig, NicDevice
from mig.sim import HostModel, SimConfig, simulate
from mig.source import MigrationSource

MIB = 1 << 20
CAPS = mig.capabilities()
# Slow device rates: each device term is tens of milliseconds of virtual time.
SLOW = replace(HostModel(), device_rate=200e6, device_load_rate=400e6, device_hash_rate=1e9)


def test_expected_stop_cost_is_the_devices_figure_plus_its_production_per_byte() -> None:
    costs = DeviceStopCosts()
    assert costs.expected("nic0", 1 << 20, None) == 0.0  # nothing measured yet
    costs.iterated("nic0", 0.002, 1_000_000)
    costs.iterated("nic0", 0.001, 0)  # a read that produced nothing teaches nothing
    costs.iterated("nic0", 0.002, 1_000_000)
    assert costs.seconds_per_byte("nic0") == pytest.approx(2e-9)
    assert costs.expected("nic0", 500_000, 0.004) == pytest.approx(0.004 + 0.001)
    assert costs.expected("other", 500_000, 0.004) == pytest.approx(0.004)


@pytest.mark.parametrize(
    "device", ["gpu:state=32MiB,rate=16MiB/s,chunk=64KiB", "nic:state=16MiB,rate=32MiB/s"]
)
def test_the_first_plan_counts_the_device_stop_cost_it_then_pays(device: str) -> None:
    q = simulate(
        SimConfig(
            memory=64 * MIB,
            # A guest busy enough that the switchover falls a while after
            # the device's last precopy read (the meter reads no more than
            # the cap, so the passes are paced by it).
            workload="uniform:rate=20000",
            devices=(device,),
            policy="exact-running",
            params={"max_bandwidth": 1 << 30, "downtime_limit": 300, "timeout": 60.0},
            # Devices that write every 2 ms: at 1 GiB/s the switchover, from
            # the last precopy read to the stop, is shorter than the default
            # 5 ms tick, which a write then often misses.
            host=replace(SLOW, device_tick=0.002),
        )
    )
    assert q["status"] == "completed" and q["sim"]["verified"], q.get("error-desc")
    assert q["switchover-aborts"] == 0  # the plan is the first switchover's
    plan, paid = q["switchover-costs"], q["downtime-breakdown"]
    # Hundreds of KiB dirtied since precopy read them, at a slow 200 MB/s.
    assert paid["device-state"] > 1
    assert plan["device-state"] == pytest.approx(paid["device-state"], rel=0.05)
    assert plan["load"] >= plan["device-state"]


class DigestBeforeResume(DeviceHandler):
    """The loaded state's digest, taken before the device runs again."""

    loaded: int | None = None

    def load_resume(self) -> None:
        self.loaded = self.device.state_digest()
        super().load_resume()


class SlowReadNic(NicDevice):
    """A nic whose state takes ``READ_DELAY`` per chunk to read out, as a
    device whose driver copies its state slowly: precopy and stop-copy pay it
    alike, per byte."""

    READ_DELAY = 0.0005

    def _setup_worker(self) -> None:
        storage, take_next = self.storage, self.storage.take_next

        def slow_take_next() -> tuple[int, bytes, bool] | None:
            chunk = take_next()
            if chunk is not None:
                time.sleep(self.READ_DELAY)
            return chunk

        storage.take_next = slow_take_next  # type: ignore[method-assign]


@pytest.mark.skipif(
    not CAPS["uffd"]["available"],
    reason=f"host lacks the uffd capability: {CAPS['uffd']['reason']}",
)
def test_a_real_first_switchover_is_planned_with_the_devices_stop_cost() -> None:
    """A nic that reads its state out slowly, and rewrites it while it runs:
    its stop-copy pays milliseconds for the chunks dirtied since precopy
    read them. The plan the first switchover was decided with already holds
    that cost, measured from the device's precopy reads."""
    config = NicConfig(state=8 * MIB, max=16 * MIB, rate=32 * MIB, grow=0)
    src, dst = mig.GuestMemory(32 * MIB), mig.GuestMemory(32 * MIB)
    src.array[:: src.page_size] = 3
    guest = mig.WorkloadGuest(src, vcpus=1, workload="uniform:rate=2000")
    src_devs = [SlowReadNic("nic0", config)]
    dst_devs = [NicDevice("nic0", config, active=False)]
    loaders = [DigestBeforeResume(t, i) for i, t in enumerate(dst_devs, start=1)]
    try:
        dest = MigrationDestination("tcp:127.0.0.1:0", dst, loaders, idle_timeout=20)
        source = MigrationSource(guest, src_devs, uri=dest.uri, policy="exact-running", timeout=30)
        dest.start()
        source.start()
        q, d = source.wait(60), dest.wait(30)
        assert q["status"] == "completed" and d["verified"] and q["verified"], q.get("error-desc")
        assert d["memory-digest"] == format(src.digest(), "032x")
        for s, h in zip(src_devs, loaders, strict=True):
            assert h.loaded == s.state_digest(), s.name
    finally:
        guest.close()
        for dev in src_devs + dst_devs:
            dev.close()
    assert q["switchover-aborts"] == 0 and q["guest-stops"] == 0
    assert q["devices"][0]["stop-copy-bytes"] > 64 << 10  # chunks read again at the stop
    planned, paid = q["switchover-costs"]["device-state"], q["downtime-breakdown"]["device-state"]
    # Wall time on a shared host: the same work measured twice, with the
    # guest running and with it stopped, may differ by a loaded scheduler.
    assert planned > 0
    assert 0.4 * paid <= planned <= 2.5 * paid + 2.0, (planned, paid)
