"""The destination's loop in virtual time (``mig.sim_dest_loop``): its work
as the engine does it, one piece at a time."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mig.sim import HostModel, SimConfig, simulate
from mig.sim_dest_loop import POLL, DestinationLoop

MIB = 1 << 20


def test_records_arriving_while_the_loop_waits_are_taken_in_when_it_wakes() -> None:
    loop = DestinationLoop(drain_bytes=32 * MIB)
    # Three records in 3 ms; the loop wakes a poll after the first.
    for i in range(3):
        loop.received(i * 0.001, 1, i, MIB, take=0.002, load=0.001)
    # A message at 0.5 poll: nothing taken in yet, handled at once.
    assert loop.handled_at(POLL / 2) == POLL / 2
    # The take right after that message lasts 6 ms: a message meanwhile waits for it.
    assert loop.handled_at(POLL / 2 + 0.001) == pytest.approx(POLL / 2 + 0.006)


def test_a_pass_ack_reports_the_longest_take_not_their_sum() -> None:
    loop = DestinationLoop(drain_bytes=2 * MIB)
    # Four records at once: two takes of 2 MiB (the drain), 4 ms each.
    for i in range(4):
        loop.received(0.0, 1, i, MIB, take=0.002, load=0.0)
    assert loop.answer(1.0) == pytest.approx(0.004)
    assert loop.answer(2.0) == 0.0


def test_released_records_load_after_the_message_that_released_them() -> None:
    loop = DestinationLoop()
    for i in range(4):
        loop.received(0.0, 7, i, MIB, take=0.0, load=0.010)
    assert loop.release(1.0, [(7, 0), (7, 1), (7, 2), (7, 3)]) == pytest.approx(1.040)
    # Records already loaded cost nothing again.
    assert loop.release(2.0, [(7, 0)]) == 2.0


def test_messages_queued_behind_a_load_are_handled_in_turn() -> None:
    """A ``pass`` released 40 ms of loads; three messages that arrive during
    them are handled one after another once the loads end, each turn of the
    loop taking ``handling``, even after a ``pass-ack`` reported the loads.
    Without the handling, all three would be handled at the loads' end."""
    loop = DestinationLoop(handling=0.001)
    for i in range(4):
        loop.received(0.0, 7, i, MIB, take=0.0, load=0.010)
    first = loop.handled_at(1.0)
    assert loop.release(first, [(7, i) for i in range(4)]) == pytest.approx(1.041)
    assert loop.handled_at(1.010) == pytest.approx(1.041)
    loop.answer(1.041)  # the loads reported: the queue still holds
    assert loop.handled_at(1.020) == pytest.approx(1.042)
    assert loop.handled_at(1.030) == pytest.approx(1.043)
    # A message after the queue emptied is handled at once.
    assert loop.handled_at(2.0) == 2.0


# A slow destination decode: a precopy device's 64 MiB take a second to load.
SLOW_LOAD = replace(HostModel(), device_load_rate=64e6, device_load_record_seconds=0.0)


def _nic_migration(host: HostModel) -> dict:
    q = simulate(
        SimConfig(
            memory=64 * MIB,
            workload="uniform:rate=1000",
            devices=("nic:state=64MiB,rate=1MiB/s",),
            policy="exact-running",
            params={"max_bandwidth": 1 << 30, "timeout": 60.0},
            host=host,
        )
    )
    assert q["status"] == "completed" and q["sim"]["verified"], q.get("error-desc")
    return q


def test_the_switchover_waits_for_the_destination_to_load_the_initial_data() -> None:
    """The destination loads a precopy device's records only once a ``pass``
    announced them, then acknowledges the switchover: the source completes no
    earlier than the first pass plus the load of the initial data (about one
    second here), however early the sends ended."""
    q = _nic_migration(SLOW_LOAD)
    first_pass = q["passes"][0]["time"]
    decided = next(p["time"] for p in q["passes"] if p["exact"] is not None)
    initial = 64 * MIB / SLOW_LOAD.device_load_rate
    assert decided - first_pass >= initial
    fast = _nic_migration(replace(SLOW_LOAD, device_load_rate=64e9))
    assert q["total-time"] - fast["total-time"] >= 0.9 * 1000 * initial


def test_a_contended_destination_acknowledges_the_switchover_later() -> None:
    """With the loop twice as slow beside the source's precopy
    (``mig.sim_contention``), the initial data's load after the first pass
    takes twice as long, and the switchover waits for it: the model before
    charged the idle host's load."""
    initial = 64 * MIB / SLOW_LOAD.device_load_rate
    alone = _nic_migration(SLOW_LOAD)
    shared = _nic_migration(replace(SLOW_LOAD, device_load_contention=2.0))
    decided = next(p["time"] for p in shared["passes"] if p["exact"] is not None)
    assert decided - shared["passes"][0]["time"] >= 2 * initial
    assert shared["total-time"] - alone["total-time"] >= 0.9 * 1000 * initial


def test_a_settle_waits_for_the_passes_queued_during_the_initial_load() -> None:
    """The source passes on while the destination loads the initial data;
    its ``pass`` messages queue, and the ``settle`` sent after
    ``switchover-ack`` waits until the loop handled every one: with a turn
    of 1 ms per message it waits about 1 ms longer per queued pass."""
    initial = 64 * MIB / SLOW_LOAD.device_load_rate
    free = _nic_migration(SLOW_LOAD)
    costly = _nic_migration(replace(SLOW_LOAD, control_latency=1e-3))
    first = costly["passes"][0]["time"]
    queued = sum(1 for p in costly["passes"][1:] if p["time"] < first + initial)
    assert queued > 10
    assert costly["settle-time"] - free["settle-time"] >= 0.9 * queued * 1e-3 * 1000
