"""The destination's loop during a loopback precopy: what sharing the host costs it.

During precopy the destination's loop (``mig.sim_dest_loop``) takes in and
loads a precopy device's records while the source's precopy goes on: its
loop passing back to back while it waits for the ``switchover-ack``, its
sender and channel threads, the guest's vCPUs, and on this side the receive
threads. On a loopback migration all of them run on this host. On a host
with few cores the loop is descheduled for part of its work, and the work
itself runs slower beside the others (the caches and the memory bus are
shared): it loads a device's records more slowly than ``device_costs``
measures them on an otherwise idle host (``mig.sim_devices``).

``HostModel.device_load_contention`` keeps that as a factor on the loop's
precopy seconds (its takes and its loads). ``load_contention`` measures it
from real loopback migrations to ``mig demo``'s destination (its own
process, as the runs ``--simulate`` predicts) of a guest that writes
(``CALIBRATION_WORKLOAD``) with ``mig demo``'s default device: the source
sees its first ``pass`` go out, then the ``switchover-ack`` come back once
the destination loaded the device records that pass released (the initial
data); that wait, less a control round trip each way, over what the model
charges for loading those records alone (``decode_seconds``), is one
sample; the factor is the median sample, never below 1. The runs are
uncapped: a capped stream is charged the part of the factor its share of
the loopback's rate causes (``contended``).

The stop-copy's records load after the source stopped (``complete``): the
guest is paused and the source waits, so no factor applies there. A
destination on another host (``mig send``) shares no cores with the source:
``mig.predict`` drops the factor for it.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

__all__ = [
    "CALIBRATION_DEVICE",
    "CALIBRATION_MEMORY",
    "CALIBRATION_WORKLOAD",
    "contended",
    "fair_share_bound",
    "load_contention",
]

# The guest the factor is measured with: zeroed (its bulk pass outlasts the
# device's initial data) and writing, so the source's short passes carry
# pages while the destination loads.
CALIBRATION_MEMORY = 256 << 20
CALIBRATION_WORKLOAD = "uniform:rate=20000"
# ``mig demo``'s default device: a precopy device with initial data.
CALIBRATION_DEVICE = "nic"


def contended(host: Any, seconds: float, share: float = 1.0) -> float:
    """The loop's ``seconds`` of precopy work on a host its RAM stream shares.

    ``share`` is the stream's rate over the rate it was measured at (the
    uncapped loopback): the cores the stream takes, and so the slowdown it
    causes, grow with what it sends. A stream capped to a small part of the
    loopback's rate leaves the loop nearly an idle host's time; charging it
    the uncapped factor would delay its ``switchover-ack`` by a measurement
    noise that can be several times the load itself."""
    factor = max(1.0, getattr(host, "device_load_contention", 1.0))
    return seconds * (1.0 + (factor - 1.0) * min(1.0, max(0.0, share)))


def fair_share_bound(cores: int | None = None) -> float:
    """The most the calibration's sharing can slow the loop: its runnable
    threads (both ends' channel threads, the guest's vCPUs and both loops)
    over the cores. The scheduler gives each of them a fair share of the
    cores, so the loop runs at least that fraction of the time."""
    from mig.cli_options import DEFAULT_VCPUS  # noqa: PLC0415
    from mig.params import MigrationParams  # noqa: PLC0415

    threads = 2 * MigrationParams().multifd_channels + DEFAULT_VCPUS + 2
    return max(1.0, threads / max(1, cores or os.cpu_count() or 1))


def load_contention(host: Any, runs: int = 5) -> float:
    """``device_load_contention`` of this host, the median of ``runs``
    samples (``initial_load_wait`` over the modelled load), for a model
    ``host`` whose device rates and ``control_latency`` are measured; never
    above ``fair_share_bound``. A wait beyond that bound is not sharing: on
    a host whose hypervisor takes back free memory, some runs' loads stall
    on faults far longer than any sharing explains, and a median that three
    stalled runs set charged every simulated precopy device load with them."""
    from mig.devices import create  # noqa: PLC0415
    from mig.sim import LinkModel  # noqa: PLC0415 (it imports this module)
    from mig.sim_devices import decode_seconds  # noqa: PLC0415

    device = create(CALIBRATION_DEVICE)
    try:
        samples = []
        for _ in range(runs):
            wait, nbytes = initial_load_wait()
            modelled = decode_seconds(host, device, nbytes)
            round_trip = 2 * (LinkModel().rtt + host.control_latency)
            if modelled > 0:
                samples.append(max(0.0, wait - round_trip) / modelled)
    finally:
        device.close()
    factor = max(1.0, statistics.median(samples)) if samples else 1.0
    return min(factor, fair_share_bound())


def initial_load_wait() -> tuple[float, int]:
    """(seconds, bytes) of one real loopback migration: from its first
    ``pass`` sent to the ``switchover-ack`` received, and the device bytes
    sent before that pass (what it released for loading)."""
    from mig import faults  # noqa: PLC0415
    from mig.sim import _idle_loopback_migration  # noqa: PLC0415

    sources: list[Any] = []
    marks: dict[str, tuple[float, int]] = {}

    def first_pass(info: dict[str, Any]) -> None:
        if "pass" not in marks and sources:
            devices = sources[0].query().get("devices", [])
            sent = sum(int(d.get("precopy-bytes", 0)) for d in devices)
            marks["pass"] = (time.perf_counter(), sent)

    def acked(info: dict[str, Any]) -> None:
        marks.setdefault("ack", (time.perf_counter(), 0))

    with faults.armed({"source.pass": first_pass, "source.switchover-ack": acked}):
        _idle_loopback_migration(
            CALIBRATION_MEMORY,
            False,
            0,
            demo=True,
            devices=CALIBRATION_DEVICE,
            observe=sources.append,
            workload=CALIBRATION_WORKLOAD,
        )
    if "pass" not in marks or "ack" not in marks:
        raise RuntimeError("calibration: no pass or no switchover-ack seen")
    (sent_at, nbytes), (acked_at, _) = marks["pass"], marks["ack"]
    return max(0.0, acked_at - sent_at), nbytes
