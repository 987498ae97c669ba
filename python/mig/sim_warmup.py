"""The demo guest's run before its migration starts (the warm-up), calibrated.

``mig demo`` starts its destination process first; meanwhile it builds its
own guest (memory, then devices), starts the guest's workload, and migrates
once the destination is ready to receive (``cmd_demo``). So the workload
writes for the destination's start-up less the source's own build, which
overlaps it: the warm-up runs from the workload's start to the destination's
ready line, and that is what this times, in the demo's order.

Timing the destination's start alone, with the demo's default device (a
64 MiB ``nic``), counted the destination's build of that device as warm-up,
though the source builds the same device before its workload starts, and a
configuration of small devices builds none on either side.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mig.cli_options import DEFAULT_VCPUS, DEFAULT_WORKLOAD

__all__ = ["WARMUP_DEVICES", "WARMUP_SIZES", "warmup_costs"]

# Guest sizes the warm-up is timed at: the base from the small one, the
# share per byte from the difference.
WARMUP_SIZES = (16 << 20, 1 << 30)
# No devices: each side builds the same devices while the other starts, so
# a device's build is in neither the destination's start nor the warm-up.
WARMUP_DEVICES = "none"


def warmup_costs(runs: int = 3) -> tuple[float, float]:
    """(warmup_base, warmup_per_byte): seconds from the demo guest's
    workload start until its destination is ready to receive, median of
    ``runs`` at each of ``WARMUP_SIZES``."""
    medians = [
        float(np.median([_warmup_seconds(size) for _ in range(runs)])) for size in WARMUP_SIZES
    ]
    small, large = WARMUP_SIZES
    per_byte = max(0.0, (medians[1] - medians[0]) / (large - small))
    return max(0.0, medians[0] - per_byte * small), per_byte


def _warmup_seconds(size: int, devices_spec: str = WARMUP_DEVICES) -> float:
    """One demo start-up, in ``cmd_demo``'s order: the destination first,
    then the source's guest; the seconds its workload ran until the
    destination was ready (0.0 if the build outlasted the start-up)."""
    from mig._mig import GuestMemory, WorkloadGuest  # noqa: PLC0415
    from mig.demo_destination import DemoDestination  # noqa: PLC0415
    from mig.devices import create_all  # noqa: PLC0415

    dest = DemoDestination(size, devices_spec, "warning", {})
    devices: list[Any] = []
    guest = None
    try:
        memory = GuestMemory(size)
        if devices_spec != "none":
            devices = create_all(devices_spec, memory)
        started = time.perf_counter()
        guest = WorkloadGuest(memory, vcpus=DEFAULT_VCPUS, workload=DEFAULT_WORKLOAD)
        uri = dest.uri()
        ran = time.perf_counter() - started
    finally:
        dest.kill()
        if guest is not None:
            guest.close()
        for device in devices:
            device.close()
    if uri is None:
        raise RuntimeError("calibration: the demo destination did not start")
    return ran
