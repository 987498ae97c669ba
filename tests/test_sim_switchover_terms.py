"""The switchover's device and handshake terms in virtual time: each charged
where and as the engine pays it (``mig.sim_devices``, ``mig.sim_handshake``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mig.predict import sim_config
from mig.sample_devices.cell_digest import CELL
from mig.sim import HostModel, LinkModel, SimConfig, save_host_model, simulate
from mig.sim_devices import device_costs

MIB = 1 << 20
# Slow device rates, so each device term is tens of milliseconds.
SLOW = replace(HostModel(), device_rate=200e6, device_load_rate=400e6, device_hash_rate=1e9)


def end_digest_seconds(state: int, host: HostModel) -> float:
    """A sample device's END digest: its cells' 16-byte hashes and its size
    hashed together, and its last cell rehashed."""
    return (16 * -(-state // CELL) + 8 + min(CELL, state)) / host.device_hash_rate


def run(device: str, policy: str, host: HostModel = SLOW, cap: int = 1 << 30) -> dict:
    q = simulate(
        SimConfig(
            memory=64 * MIB,
            workload="uniform:rate=2000",
            devices=(device,),
            policy=policy,
            params={"max_bandwidth": cap, "downtime_limit": 300, "timeout": 60.0},
            host=host,
        )
    )
    assert q["status"] == "completed" and q["sim"]["verified"], q.get("error-desc")
    return q


def test_a_device_known_only_when_stopped_charges_its_load_at_the_switchover() -> None:
    """An opaque device (its size known only once stopped) under
    ``stop-exact-resume``: its state is produced at the stopped exact, inside
    the downtime (``pause``), once; the destination decodes every stop-copy
    byte after ``complete`` (it holds the records until ``complete``
    announces them) and validates its END digest."""
    q = run("opaque:state=16MiB,rate=1MiB/s", "stop-exact-resume")
    stop_copy = q["devices"][0]["stop-copy-bytes"]
    assert q["devices"][0]["exact-stops"] == 1 and stop_copy > 15 * MIB
    b = q["downtime-breakdown"]
    produce_ms = 1000 * stop_copy / SLOW.device_rate
    hash_ms = 1000 * end_digest_seconds(16 * MIB, SLOW)
    expected_load = 1000 * SLOW.load_base + 1000 * stop_copy / SLOW.device_load_rate + hash_ms
    assert b["load"] == pytest.approx(expected_load, rel=1e-3)
    # Produced (and its END record digested) once, at the stopped exact.
    assert b["pause"] >= produce_ms + hash_ms
    assert b["device-state"] < produce_ms / 2


def test_the_end_digest_costs_the_cells_hashes_not_the_whole_state() -> None:
    """A gpu-like device with 32 MiB of state sent in precopy: stop-copy
    sends almost nothing, and the source's END record and the destination's
    validation each hash only the 512 cells' hashes and the last cell inside
    the downtime, not all 32 MiB (``mig.sample_devices.cell_digest``)."""
    # Idle (rate 0): a chunk it dirtied would go out at the stop, paced by
    # the cap's tokens, which accrue while the digest is hashed and hide it.
    device = "gpu:state=32MiB,rate=0,chunk=64KiB"
    hashed = run(device, "exact-running", cap=64 * MIB)
    free = run(device, "exact-running", host=replace(SLOW, device_hash_rate=1e18), cap=64 * MIB)
    assert hashed["devices"][0]["stop-copy-bytes"] < MIB
    hash_ms = 1000 * end_digest_seconds(32 * MIB, SLOW)
    assert hash_ms < 1000 * 32 * MIB / SLOW.device_hash_rate / 100
    for term in ("device-state", "load"):
        extra = hashed["downtime-breakdown"][term] - free["downtime-breakdown"][term]
        assert extra == pytest.approx(hash_ms, rel=0.05), term


def test_the_handshake_costs_the_hosts_control_latency() -> None:
    """Each of the switchover's two round trips costs the link's RTT plus the
    host's control latency, and the source plans with what it measured."""
    latency = 0.004
    q = run("nic:state=2MiB,rate=1MiB/s", "exact-running",
            host=replace(SLOW, control_latency=latency))  # fmt: skip
    expected = 1000 * 2 * (LinkModel().rtt + latency)
    assert q["downtime-breakdown"]["handshake"] == pytest.approx(expected, rel=1e-3)
    assert q["switchover-costs"]["handshake"] == pytest.approx(expected, rel=1e-3)


def test_the_end_records_cost_the_hosts_broadcast() -> None:
    """The end records go to every channel's thread and the source waits for
    each: the ``end-records`` term is the host's broadcast cost (and the
    few bytes), and every pass's sync pays it too. (A device without precopy:
    a precopy device's initial data, loaded by the destination after the
    first pass, would let the syncs meanwhile cost no total time.)"""
    cost = 0.003
    bare = run("fixed:state=2MiB,rate=1MiB/s", "exact-running")
    paid = run("fixed:state=2MiB,rate=1MiB/s", "exact-running",
               host=replace(SLOW, broadcast_seconds=cost))  # fmt: skip
    assert bare["downtime-breakdown"]["end-records"] < 0.01
    assert paid["downtime-breakdown"]["end-records"] == pytest.approx(1000 * cost, abs=0.01)
    # The end records and at least one pass's sync.
    assert paid["total-time"] > bare["total-time"] + 1000 * cost * 1.5


def test_a_capped_demo_bursts_at_the_loopback_pace(tmp_path: Path) -> None:
    """mig demo with a cap still runs on the loopback: the bytes the sender's
    token bucket lets out at once leave at its pace, so no bandwidth sample
    reads faster than the loopback."""
    path = tmp_path / "host-model.json"
    save_host_model(HostModel(loopback_bandwidth=300e6), path, {"date": "2026-01-01T00:00:00Z"})
    params = {"max_bandwidth": 128 * MIB, "downtime_limit": 300}
    config, _ = sim_config(params, size=64 * MIB, workload="uniform:rate=4000", vcpus=1,
                           devices="none", host_model=path)  # fmt: skip
    assert config.link.bottleneck == 300e6
    q = simulate(config)
    assert q["status"] == "completed"
    assert max(p["bandwidth"] for p in q["passes"]) <= 300e6 * 1.001


def test_device_costs_are_measured_through_the_handlers() -> None:
    """Production and decoding per byte and per record, and the xxh3 rate of
    the END digest: hashing outruns producing the records, and a record costs
    its handling on top of its bytes."""
    # Best of three, as calibration takes it: one run of each record size
    # can land the many small records' decoding under the few large ones'.
    costs = device_costs(runs=3)
    rates = ("device_rate", "device_load_rate", "device_hash_rate")
    assert all(0 < costs[r] < 1e12 for r in rates)
    assert costs["device_hash_rate"] > costs["device_rate"]
    assert costs["device_record_seconds"] > 0 and costs["device_load_record_seconds"] > 0


def test_control_latency_is_measured_against_the_demo_destination() -> None:
    """A real loopback migration to mig demo's destination process: its
    switchover's two round trips cost this host more than the simulated
    link's RTT alone, and far less than a second."""
    from mig.sim_handshake import control_latency

    latency = control_latency(16 * MIB, 64 * MIB, runs=1)
    assert 0 < latency < 0.5


def test_a_chunk_is_produced_while_the_capped_link_idles() -> None:
    """The handler produces a chunk, then sends it (the send waits for the
    wire): while it produces, a capped sender's token bucket fills, so
    production as slow as the cap costs about the production, not twice it."""
    cap = 64 * MIB
    host = replace(SLOW, device_rate=cap)
    q = run("fixed:state=16MiB,chunk=1MiB", "exact-running", host=host, cap=cap)
    produce_ms = 1000 * q["devices"][0]["stop-copy-bytes"] / cap
    assert produce_ms < q["downtime-breakdown"]["device-state"] < 1.2 * produce_ms


def test_each_record_of_a_device_stream_costs_its_handling() -> None:
    """The same state in 4 KiB records costs its production and its decoding
    per record on top of the bytes: 4096 records more than in 1 MiB ones."""
    per_record, per_load = 5e-6, 2e-6
    host = replace(SLOW, device_record_seconds=per_record, device_load_record_seconds=per_load)
    # Known only when stopped: produced at the stopped exact (pause);
    # decoded after "complete" (load). Idle (rate 0): a working opaque
    # device's size walks by up to a chunk per write, 1 MiB for the large one.
    small, large = (run(f"opaque:state=16MiB,chunk={c},rate=0", "stop-exact-resume", host=host)
                    for c in ("4KiB", "1MiB"))  # fmt: skip
    records = 16 * MIB // (4 << 10) - 16
    for term, cost in (("pause", per_record), ("load", per_load)):
        extra = small["downtime-breakdown"][term] - large["downtime-breakdown"][term]
        assert extra == pytest.approx(1000 * records * cost, rel=0.05), term


def test_the_handshake_is_planned_with_the_destinations_device_loads() -> None:
    """pass-ack reports the seconds the destination's loop spent loading
    precopy device records since the last one; without a ``settle`` before
    the pause (``stop-exact-resume``) the source plans the switchover's
    handshake as two round trips plus their median. After a ``settle`` the
    destination has landed everything sent, ``complete`` finds its loop idle,
    and the plan is the two round trips the handshake then pays."""
    device = "gpu:state=32MiB,rate=4MiB/s,chunk=64KiB"
    idle_host = replace(SLOW, device_load_rate=1e15)
    # The loop loads what a pass released after answering it, so only a
    # later pass-ack reports that loading: at this cap the migration makes
    # one (at 64 MiB/s it switches over first).
    busy = run(device, "stop-exact-resume", cap=32 * MIB)
    idle = run(device, "stop-exact-resume", host=idle_host, cap=32 * MIB)
    assert busy["switchover-costs"]["handshake"] > idle["switchover-costs"]["handshake"] + 0.5
    round_trips = 1000 * 2 * LinkModel().rtt
    for host in (SLOW, idle_host):
        settled = run(device, "exact-running", host=host, cap=64 * MIB)
        assert settled["switchover-costs"]["handshake"] == pytest.approx(round_trips, rel=1e-3)
        assert settled["downtime-breakdown"]["handshake"] == pytest.approx(round_trips, rel=1e-3)


def test_the_root_before_ready_costs_nothing_the_receive_path_hashed() -> None:
    """The destination hashes every page as it lands (``rehash_covered`` on
    the receive path): the root before "ready" only sums chunk terms, so a
    scattered final pass costs no ``dest-digest``, with a settle before the
    pause (``exact-running``) or without one (``stop-exact-resume``), and
    whatever the final pass holds. Strict still digests all of memory."""

    def dest_digest(policy: str, workload: str, verify: str = "after-resume") -> float:
        q = simulate(
            SimConfig(
                memory=64 * MIB,
                workload=workload,
                devices=("fixed",),
                policy=policy,
                params={
                    "max_bandwidth": 64 * MIB,
                    "downtime_limit": 300,
                    "timeout": 60.0,
                    "verify": verify,
                },  # fmt: skip
                link=LinkModel(bottleneck=64 * MIB),
            )
        )
        assert q["status"] == "completed" and q["sim"]["verified"], q.get("error-desc")
        assert q["ram"]["downtime-bytes"] > 0  # a final pass the root could owe
        return q["downtime-breakdown"]["dest-digest"]

    for policy in ("stop-exact-resume", "exact-running"):
        for workload in ("hotset:rate=4000,wss=8MiB", "uniform:rate=4000"):
            assert dest_digest(policy, workload) == 0.0
    whole_memory_ms = 1000 * 64 * MIB / HostModel().digest_rate
    strict = dest_digest("exact-running", "uniform:rate=4000", verify="strict")
    assert strict == pytest.approx(whole_memory_ms, rel=1e-6)
