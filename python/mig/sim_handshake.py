"""The switchover's handshake in virtual time: what a control round trip costs.

The source's ``handshake`` term is its two control round trips,
``complete``/``ready`` and ``go``/``resumed``, less the destination's reported
work (``SwitchoverRun._destination_terms``). Between two processes that is
more than the network's RTT: each message is encoded, written, woken up for,
read and decoded on both ends. The simulator charges every control reply the
link's RTT plus ``HostModel.control_latency``, so the switchover's handshake,
and the round trips the source plans it from (``pass``/``pass-ack``, ``settle``),
cost what they cost on this host. ``control_latency`` measures it with
``mig demo``'s destination (its own process, as the runs ``--simulate``
predicts): half the median handshake of loopback migrations of a writing
guest with a device, less the simulated link's RTT.

The source's ``end-records`` term, and each pass's sync, hand a record to
every channel's thread and wait for all of them: the simulator charges each
``HostModel.broadcast_seconds``, the median ``end-records`` of the same
migrations.
"""

from __future__ import annotations

import statistics

__all__ = ["control_costs", "control_latency"]


# What the calibration migrations run: a writing guest and a device, as
# ``mig demo`` does. Both sides then have threads beside the control path (a
# device's worker, the vCPUs the destination starts at ``go``), and an idle
# guest without a device measured round trips faster than a demo pays. The
# guest writes slowly enough to converge at the slowest calibration cap.
CALIBRATION_WORKLOAD = "uniform:rate=2000"
CALIBRATION_DEVICES = "fixed"


def control_costs(size: int, cap: float, runs: int = 3) -> tuple[float, float]:
    """(``control_latency``, ``broadcast_seconds``) from ``runs`` real
    loopback migrations of a ``size``-byte guest at ``cap`` to ``mig
    demo``'s destination process: what a control round trip costs beyond the
    simulated link's RTT, and the median ``end-records`` term, what a record
    every channel writes costs the source (``Sender::finish``, as
    ``Sender::sync``: it hands the record to each channel's thread and waits
    for every thread's reply; its bytes are negligible)."""
    from mig.sim import LinkModel, _idle_loopback_migration  # noqa: PLC0415

    handshakes, ends = [], []
    for _ in range(runs):
        q, _ = _idle_loopback_migration(
            size,
            True,
            int(cap),
            demo=True,
            devices=CALIBRATION_DEVICES,
            workload=CALIBRATION_WORKLOAD,
        )
        handshakes.append(q["downtime-breakdown"]["handshake"] / 1000)
        ends.append(q["downtime-breakdown"].get("end-records", 0.0) / 1000)
    latency = max(0.0, statistics.median(handshakes) / 2 - LinkModel().rtt)
    return latency, statistics.median(ends)


def control_latency(size: int, cap: float, runs: int = 3) -> float:
    """Seconds a control round trip costs beyond the simulated link's RTT
    (``control_costs``)."""
    return control_costs(size, cap, runs)[0]
