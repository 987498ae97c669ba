"""A device's stop-copy state on the engine's link (``mig.sim_device_link``):
charged where the engine pays it, and told apart by its calibration."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mig import sim_device_link
from mig.devices import create
from mig.sim import HostModel, SimConfig, simulate
from mig.sim_devices import decode_seconds, hash_seconds

MIB = 1 << 20
SLOW = replace(HostModel(), device_rate=200e6, device_load_rate=400e6, device_hash_rate=1e9)
LINK = {
    "device_stop_seconds": 0.002,
    "device_send_per_byte": 1e-9,
    "device_load_seconds": 0.003,
    "device_receive_per_byte": 2e-9,
}


def run(host: HostModel) -> dict:
    q = simulate(
        SimConfig(
            memory=64 * MIB,
            workload="uniform:rate=2000",
            devices=("opaque:state=8MiB,rate=1MiB/s",),
            policy="stop-exact-resume",
            # Uncapped: a capped sender's bucket fills while it copies a
            # record, and the copy then hides part of the wire's time.
            params={"max_bandwidth": 0, "downtime_limit": 300, "timeout": 60.0},
            host=host,
        )
    )
    assert q["status"] == "completed" and q["sim"]["verified"], q.get("error-desc")
    return q


def test_the_link_adds_a_fixed_and_a_per_byte_cost_on_each_side() -> None:
    """A device known only when stopped sends all its state at stop-copy:
    the source's ``device-state`` grows by its fixed cost and its bytes'
    send cost, the destination's ``load`` by its fixed cost and its bytes'
    receive cost; nothing else of the downtime moves."""
    bare, linked = run(SLOW), run(replace(SLOW, **LINK))
    stop_copy = linked["devices"][0]["stop-copy-bytes"]
    assert stop_copy == bare["devices"][0]["stop-copy-bytes"] > 7 * MIB
    b0, b1 = bare["downtime-breakdown"], linked["downtime-breakdown"]
    send_ms = 1000 * (LINK["device_stop_seconds"] + stop_copy * LINK["device_send_per_byte"])
    load_ms = 1000 * (LINK["device_load_seconds"] + stop_copy * LINK["device_receive_per_byte"])
    assert b1["device-state"] - b0["device-state"] == pytest.approx(send_ms, rel=0.02)
    assert b1["load"] - b0["load"] == pytest.approx(load_ms, rel=0.02)
    assert b1["final-ram"] == pytest.approx(b0["final-ram"], rel=1e-6)


def test_the_calibration_splits_fixed_from_per_byte_costs(monkeypatch) -> None:
    """Given migrations whose terms exceed the model by known costs, the
    calibration finds those costs: each size's excess over the device-less
    twin and over what the model already charges, solved for both parts."""
    host = replace(SLOW, loopback_bandwidth=2e9)
    base_state, base_load = 0.0004, 0.0002

    def fake(devices: str, runs: int) -> tuple[float, float, int]:
        if devices == "none":
            return base_state, base_load, 0
        state = int(devices.split("state=")[1].split(",")[0])
        nbytes = state + state // 64  # a stream's bytes: the state and its framing
        device = create(devices)
        try:
            modelled = decode_seconds(host, device, nbytes) + hash_seconds(host, device)
        finally:
            device.close()
        send = LINK["device_stop_seconds"] + nbytes * LINK["device_send_per_byte"]
        receive = LINK["device_load_seconds"] + nbytes * LINK["device_receive_per_byte"]
        wire = nbytes / host.loopback_bandwidth
        return base_state + wire + send, base_load + modelled + receive, nbytes

    monkeypatch.setattr(sim_device_link, "_best_terms", fake)
    costs = sim_device_link.device_link_costs(host)
    assert costs == pytest.approx(LINK, rel=1e-6)
