"""How often a sample device's worker really writes, calibrated.

A sample device's worker thread (``mig.sample_devices.activity``) waits
``tick`` seconds, then writes what the elapsed time's rate asks for; each
write dirties whole chunks, so the chunks a working device dirties per
second follow the number of writes, not the rate. The thread's real interval
is its tick plus its wake-up, its lock and the interpreter's lock, all longer
on a busy host: a prediction that writes once per nominal tick re-sends more
of a ``nic``'s state than the real device does. ``device_tick`` is the
interval measured on this host; the simulated devices write once per it.
"""

from __future__ import annotations

import time

__all__ = ["TICK_DEVICE", "device_tick_seconds"]

# A working device whose every write is due at every tick: any rate of at
# least one byte per tick writes once per wake-up.
TICK_DEVICE = "nic:state=1MiB,rate=1MiB/s,grow=0"
TICK_SECONDS = 0.5


def device_tick_seconds(seconds: float = TICK_SECONDS) -> float:
    """Seconds between a running sample device's writes: ``seconds`` of its
    worker thread over the writes it made."""
    from mig.sample_devices.factory import create  # noqa: PLC0415

    device = create(TICK_DEVICE)
    try:
        first, t0 = device.writes, time.perf_counter()
        time.sleep(seconds)
        writes, elapsed = device.writes - first, time.perf_counter() - t0
    finally:
        device.close()
    return elapsed / writes if writes else 0.0
