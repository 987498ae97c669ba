"""A device's stop-copy state in virtual time: what the switchover pays for it.

Where the engine pays, between the pause and the resume (``mig.switchover``,
``mig.destination``, the sample devices' sessions):

* Source, ``device-state``: producing the stop-copy stream
  (``production_seconds``: per byte and per record of the device's record
  size, each record's cells hashed as read) before each chunk's send and, as
  the stream's END record, the digest of its state (``hash_seconds``: the
  cells' hashes combined and the last cell rehashed,
  `mig.sample_devices.cell_digest`), not a hash of the whole state. Paid
  once per production: at a stopped exact measurement (the handler keeps
  the chunks and ``complete()`` only sends them) or in ``complete()``.
* Destination, ``load``: the stop-copy records wait in its reorder buffer
  until ``complete`` announces their bounds (a ``switchover-abort`` must be
  able to drop them), so every one is decoded (its cells hashed) after
  ``complete`` (``decode_seconds``), then RESUMING -> STOP validates the
  digest the same way. What arrived during precopy was loaded while the
  guest ran; the time it took is what ``pass-ack`` reports as the loop's
  ``busy``.

``device_costs`` measures the rates on this host through the engine's own
``DeviceHandler`` on both sides.
"""

from __future__ import annotations

import math
import time
from typing import Any

from mig.sample_devices.cell_digest import CELL

__all__ = [
    "CALIBRATION_DEVICE",
    "decode_seconds",
    "device_costs",
    "fit_line",
    "hash_seconds",
    "production_seconds",
    "state_size",
]

# The device the rates are timed on: no precopy, so all of its state goes
# through one stop-copy save, one load and one validation.
CALIBRATION_DEVICE = "opaque:state=16MiB,rate=1MiB/s"


def state_size(device: Any) -> int:
    """Bytes of a device's whole state (what its END record's digest covers);
    0 if it does not tell (a device other than the sample ones)."""
    return int(getattr(device, "state_size", 0) or 0)


def _records(device: Any, nbytes: float) -> float:
    """Records of the device's stream in ``nbytes`` (its record size, ``chunk``)."""
    chunk = getattr(getattr(device, "storage", None), "chunk", 0)
    return nbytes / chunk if chunk else 0.0


def production_seconds(host: Any, device: Any, nbytes: float) -> float:
    """Source: producing ``nbytes`` of a device's stream, per byte and per record."""
    return nbytes / host.device_rate + _records(device, nbytes) * host.device_record_seconds


def decode_seconds(host: Any, device: Any, nbytes: float) -> float:
    """Destination: decoding ``nbytes`` of a device's stream into its staging state."""
    records = _records(device, nbytes)
    return nbytes / host.device_load_rate + records * host.device_load_record_seconds


def hash_seconds(host: Any, device: Any) -> float:
    """A device's END record digest (and its validation): its cells' 16-byte
    hashes and size hashed together, and its last cell rehashed, at the
    host's xxh3 rate (`mig.sample_devices.cell_digest`)."""
    size = state_size(device)
    if not size:
        return 0.0
    cells = -(-size // CELL)
    return (16 * cells + 8 + min(CELL, size)) / host.device_hash_rate


def fit_line(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """(value at x = 0, slope) of the line through two measured points
    (x, seconds), neither below 0: a host's noise can tilt two points, never
    make a cost negative. Equal x: no slope to see."""
    (x1, t1), (x2, t2) = a, b
    slope = max(0.0, (t2 - t1) / (x2 - x1)) if x2 != x1 else 0.0
    return max(0.0, t1 - slope * x1), slope


# Record sizes the per-record costs are told from the per-byte ones with:
# the same state in many small records and in a few large ones.
CALIBRATION_CHUNKS = (4 << 10, 1 << 20)


def device_costs(runs: int = 3) -> dict[str, float]:
    """This host's device costs, as ``HostModel`` fields, best of ``runs`` each:
    ``device_rate``/``device_record_seconds`` (production per byte and per
    record), ``device_load_rate``/``device_load_record_seconds`` (decoding)
    and ``device_hash_rate``, solved from ``CALIBRATION_DEVICE`` streamed in
    each of ``CALIBRATION_CHUNKS``-byte records."""
    rows = [_timed_stream(f"{CALIBRATION_DEVICE},chunk={c}", runs) for c in CALIBRATION_CHUNKS]
    (_, r1, p1, d1, h1), (b2, r2, p2, d2, h2) = rows

    def split(t1: float, t2: float) -> tuple[float, float]:
        # The same bytes in r1 and in r2 records: the line's slope is the
        # cost per record, its value at no record the bytes' cost.
        bytes_part, per_record = fit_line((r2, t2), (r1, t1))
        return 1 / max(bytes_part / b2, 1e-12), per_record

    device_rate, device_record_seconds = split(p1, p2)
    device_load_rate, device_load_record_seconds = split(d1, d2)
    return {
        "device_rate": device_rate,
        "device_record_seconds": device_record_seconds,
        "device_load_rate": device_load_rate,
        "device_load_record_seconds": device_load_record_seconds,
        "device_hash_rate": max(h1, h2),
    }


def _timed_stream(spec: str, runs: int) -> tuple[int, float, float, float, float]:
    """(bytes, records, production s, decoding s, hash bytes/s) of one device's stop-copy
    stream through the engine's ``DeviceHandler`` on both sides: the source's
    ``complete()`` (its cells hashed as read; its END digest, a few cells'
    worth, is ``hash_seconds``), the destination's ``load_state`` per chunk,
    and xxh3 over the whole state for the hash rate."""
    from mig.device_handler import DeviceHandler  # noqa: PLC0415
    from mig.devices import MigState, create  # noqa: PLC0415
    from mig.sample_devices.stream import state_hash  # noqa: PLC0415

    class Capture:
        def __init__(self) -> None:
            self.chunks: list[tuple[int, bytes, bool]] = []

        def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
            self.chunks.append((seq, data, final))

    save = load = check = math.inf
    nbytes = size = chunk = 0
    for _ in range(runs):
        src, dst = create(spec), create(spec, active=False)
        try:
            sender, receiver, link = DeviceHandler(src), DeviceHandler(dst), Capture()
            sender.setup(link)
            sender.quiesce()
            t0 = time.perf_counter()
            sender.complete(link)
            save = min(save, time.perf_counter() - t0)
            size, chunk = state_size(src), src.storage.chunk
            t0 = time.perf_counter()
            state_hash(src.storage.state)
            check = min(check, time.perf_counter() - t0)
            receiver.load_setup()
            t0 = time.perf_counter()
            for seq, data, final in link.chunks:
                receiver.load_state(seq, data, final)
            load = min(load, time.perf_counter() - t0)
            receiver.load_complete()
            nbytes = sum(len(data) for _, data, _ in link.chunks)
            if src.state_digest() != dst.state_digest():
                raise RuntimeError("calibration: the loaded device state differs from the saved")
        finally:
            src.close()
            dst.close()
        if dst.state is not MigState.STOP:
            raise RuntimeError(f"calibration: the loaded device is {dst.state.name}, not STOP")
    return nbytes, size / chunk, save, load, size / check
