"""A device's stop-copy state on the engine's link, in virtual time.

``mig.sim_devices`` times a device stream through ``DeviceHandler`` alone:
the source's production, the destination's ``load_state`` and the
validation's hash. A real switchover moves the state further, and pays for
it on both sides:

* Source, ``device-state``: per device, ``complete()`` moves the device to
  STOP_COPY, reads its stream and, once sent, to STOP; each record goes to
  the sender (``Sender::send_device_state``: a copy of its bytes, a channel
  thread's socket write, the thread's reply).
* Destination, ``load``: each record lands in a receiver buffer of its own,
  is checked (its CRC), handed to Python as ``bytes`` (``device_records``),
  queued in the reorder buffer until ``complete`` announces it, then loaded;
  per device, RESUMING -> STOP and back to RUNNING at ``go``.

What each side pays beyond the ``DeviceHandler`` terms is a fixed part per
device and switchover plus a part per stop-copy byte (the copies and buffers
go with the bytes: a record is up to a megabyte). ``HostModel`` keeps them
as ``device_stop_seconds``/``device_send_per_byte`` (source) and
``device_load_seconds``/``device_receive_per_byte`` (destination).

``device_link_costs`` measures them on this host from real loopback
migrations to ``mig demo``'s destination (its own process, as the runs
``--simulate`` predicts) of an idle guest, each with a device known only
when stopped (no precopy: all of its state goes at stop-copy) of
``CALIBRATION_STATES`` bytes, and the same migration without a device (what
any switchover pays), each the best of three, under ``stop-exact-resume``: the state is produced at
the stopped exact, so the ``device-state`` term is its sends alone. The two
sizes give the fixed part and the per-byte part of each term's excess over
what the model already charges (the wire at the loopback's pace, decoding,
hash).
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["CALIBRATION_STATES", "device_link_costs", "receive_seconds", "send_seconds"]

# The calibration devices' state sizes: a register-sized and a large
# stop-copy state. The small one gives the fixed part nearly alone (its bytes
# cost microseconds), which every small device pays; two megabyte-sized
# states left it to the difference of two noisy lines' slopes, and a host's
# noise could tilt it to nothing.
CALIBRATION_STATES = (4 << 10, 8 << 20)
CALIBRATION_MEMORY = 16 << 20
CALIBRATION_POLICY = "stop-exact-resume"


def send_seconds(host: Any, nbytes: int, final: bool, stop_copy: bool) -> float:
    """Source: the link's cost of sending one record of ``nbytes``, with the
    device's fixed stop-copy cost on its last stop-copy record."""
    fixed = host.device_stop_seconds if final and stop_copy else 0.0
    return nbytes * host.device_send_per_byte + fixed


def receive_seconds(host: Any, nbytes: int) -> float:
    """Destination: taking in ``nbytes`` of device records before they load."""
    return nbytes * host.device_receive_per_byte


def _terms(q: dict[str, Any]) -> tuple[float, float, int]:
    """(device-state s, load s, stop-copy bytes) of one migration's ``query()``."""
    b = q["downtime-breakdown"]
    nbytes = sum(int(d.get("stop-copy-bytes", 0)) for d in q.get("devices", []))
    return b.get("device-state", 0.0) / 1000, b.get("load", 0.0) / 1000, nbytes


def _best_terms(devices: str, runs: int) -> tuple[float, float, int]:
    """Each term's best of ``runs`` migrations with ``devices``: a loaded
    host only adds time, and a difference of two noisy terms amplifies it."""
    from mig.sim import _idle_loopback_migration  # noqa: PLC0415 (it imports this module)

    rows = []
    for _ in range(runs):
        q, _ = _idle_loopback_migration(
            CALIBRATION_MEMORY, True, 0, demo=True, policy=CALIBRATION_POLICY, devices=devices
        )
        rows.append(_terms(q))
    state, load, nbytes = zip(*rows, strict=True)
    return min(state), min(load), int(statistics.median(nbytes))


def device_link_costs(host: Any, runs: int = 3) -> dict[str, float]:
    """``device_stop_seconds``, ``device_send_per_byte``,
    ``device_load_seconds`` and ``device_receive_per_byte`` of this host, as
    ``HostModel`` fields, beyond what ``host`` (its device rates and
    ``loopback_bandwidth`` already measured) charges."""
    from mig.devices import create  # noqa: PLC0415
    from mig.sim_devices import decode_seconds, fit_line, hash_seconds  # noqa: PLC0415

    base_state, base_load, _ = _best_terms("none", runs)
    excess = []
    for state in CALIBRATION_STATES:
        spec = f"opaque:state={state},rate=1MiB/s"
        dev_state, dev_load, nbytes = _best_terms(spec, runs)
        device = create(spec)
        try:
            modelled_load = decode_seconds(host, device, nbytes) + hash_seconds(host, device)
        finally:
            device.close()
        wire = nbytes / host.loopback_bandwidth
        excess.append((nbytes, dev_state - base_state - wire, dev_load - base_load - modelled_load))
    (b1, s1, l1), (b2, s2, l2) = excess

    # Each term's excess is a line over the stop-copy bytes: its value at
    # no byte the fixed part, its slope the part per byte.
    stop, send = fit_line((b1, s1), (b2, s2))
    load, receive = fit_line((b1, l1), (b2, l2))
    return {
        "device_stop_seconds": stop,
        "device_send_per_byte": send,
        "device_load_seconds": load,
        "device_receive_per_byte": receive,
    }
