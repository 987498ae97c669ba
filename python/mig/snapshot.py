"""Snapshots over the ``file:`` transport: save a stopped guest, load and verify it.

``save`` pauses the guest, moves every device to STOP_COPY (which also stops a
DMA-writing device), writes all of memory at fixed offsets plus the device
states and a description record, then runs guest and devices again. ``load``
reads the file into fresh memory and devices; the stream's end record carries
the memory digest, which the receiver checks, and the description carries
each device's state digest, which ``load`` checks after the device accepted
its stream.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import time
from collections.abc import Sequence
from typing import Any

from mig import _mig
from mig.devices import MigState, SampleDevice, create_all

__all__ = ["save", "load", "read_geometry"]

SNAPSHOT_TYPE = "mig-snapshot"
_CHUNK = 1 << 20
# The stream header (docs/wire-format.md): magic, version, kind, page size,
# packet pages, memory size. Only the geometry is read here; the receiver
# validates the whole header again, CRC included.
_HEADER = struct.Struct("<4sHBxIIQ")
_MAGIC = b"MIGS"
_POLL = 0.1


def _hex(n: int) -> str:
    return format(n, "032x")


def save(
    guest: Any,
    devices: Sequence[SampleDevice],
    devices_spec: str,
    path: str,
    channels: int = 2,
) -> dict[str, Any]:
    """Write a snapshot of ``guest`` and ``devices`` to ``path``; returns statistics."""
    memory = guest.memory
    t0 = time.monotonic()
    guest.pause()
    stopped = time.monotonic()
    states: list[tuple[SampleDevice, bytes]] = []
    try:
        for dev in devices:
            stream = dev.set_state(MigState.STOP_COPY)
            assert stream is not None
            parts = []
            while chunk := stream.read(_CHUNK):
                parts.append(chunk)
            states.append((dev, b"".join(parts)))
        digest = memory.digest()
        description = {
            "type": SNAPSHOT_TYPE,
            "version": 1,
            "ram-size": memory.size,
            "page-size": memory.page_size,
            "devices-spec": devices_spec,
            "memory-digest": _hex(digest),
            "devices": [
                {
                    "id": dev_id,
                    "name": d.name,
                    "type": d.model,
                    "bytes": len(s),
                    "state-digest": _hex(d.state_digest()),
                }
                for dev_id, (d, s) in enumerate(states, start=1)
            ],
        }
        sender = _mig.Sender(
            memory, f"file:{path}", migration_id=secrets.randbits(63), channels=channels
        )
        try:
            sender.control_send(json.dumps(description).encode())
            sender.send_pages(_mig.DirtyBitmap.full(memory.num_pages), 1)
            for dev_id, (_, state) in enumerate(states, start=1):
                chunks = [state[i : i + _CHUNK] for i in range(0, len(state), _CHUNK)] or [b""]
                for seq, chunk in enumerate(chunks):
                    sender.send_device_state(dev_id, seq, chunk, seq == len(chunks) - 1)
            sender.finish(digest)
            stats = dict(sender.stats())
        finally:
            sender.close()
    finally:
        for dev in devices:
            try:
                dev.set_state(MigState.RUNNING)
            except _mig.MigError:
                dev.reset()
        guest.resume()
    resumed = time.monotonic()
    return {
        "status": "completed",
        "file": os.path.abspath(path),
        "total-time": (resumed - t0) * 1000,
        "downtime": (resumed - stopped) * 1000,
        "memory-digest": description["memory-digest"],
        "ram": {
            "total": memory.size,
            "transferred": int(stats.get("transferred", 0)),
            "normal": int(stats.get("normal", 0)),
            "duplicate": int(stats.get("zero-pages", 0)),
        },
        "file-size": os.path.getsize(path),
        "devices": description["devices"],
    }


def read_geometry(path: str) -> tuple[int, int]:
    """(memory size, page size) from a snapshot's stream header.

    The size is bounded by the file's own length (every page has a fixed
    slot), so a corrupt header cannot make the restore allocate more.
    """
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
        length = os.fstat(f.fileno()).st_size
    if len(raw) < _HEADER.size:
        raise _mig.ProtocolError(f"snapshot {path}: truncated stream header")
    magic, _version, _kind, page_size, _packet, size = _HEADER.unpack(raw)
    if magic != _MAGIC:
        raise _mig.ProtocolError(f"snapshot {path}: not a mig snapshot (magic {magic!r})")
    if page_size != _mig.page_size:
        raise _mig.ProtocolError(
            f"snapshot {path}: page size {page_size} differs from this host's {_mig.page_size}"
        )
    if size == 0 or size % page_size or size > length:
        raise _mig.ProtocolError(
            f"snapshot {path}: memory size {size} does not fit the {length}-byte file"
        )
    return size, page_size


def load(path: str, timeout: float = 60.0) -> dict[str, Any]:
    """Load the snapshot at ``path`` into fresh memory and devices and verify it.

    Returns statistics with ``status`` ``completed`` (and ``verified``) or
    ``failed`` with ``error-desc``; the memory and devices are released.
    """
    t0 = time.monotonic()
    devices: list[SampleDevice] = []
    out: dict[str, Any] = {"status": "failed", "file": os.path.abspath(path), "verified": False}
    try:
        size, _ = read_geometry(path)
        memory = _mig.GuestMemory(size)
        receiver = _mig.Listener(f"file:{path}").accept(memory, timeout)
        raw = receiver.control_recv(timeout)
        description = json.loads(raw) if raw else {}
        if description.get("type") != SNAPSHOT_TYPE or description.get("version") != 1:
            raise _mig.ProtocolError(f"snapshot {path}: no snapshot description record")
        records: list[tuple[int, int, bytes, bool]] = []
        deadline = time.monotonic() + timeout
        while True:
            # Drain device records as they come: the receiver buffers a bounded amount.
            records += receiver.device_records()
            try:
                end = receiver.wait_end(_POLL)  # checks the stream's memory digest
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        records += receiver.device_records()
        digest = _hex(memory.digest())
        if digest != description["memory-digest"] or digest != _hex(int(end["digest"])):
            raise _mig.ProtocolError(
                f"memory digest {digest} != recorded {description['memory-digest']}"
            )
        spec = str(description.get("devices-spec", "none"))
        devices = [] if spec == "none" else create_all(spec, memory, active=False)
        out["devices"] = _load_devices(devices, records, description)
        out.update(
            status="completed",
            verified=True,
            **{
                "memory-digest": digest,
                "total-time": (time.monotonic() - t0) * 1000,
                "ram": {"total": size, "transferred": int(receiver.stats()["transferred"])},
            },
        )
    except (OSError, ValueError, KeyError, _mig.MigError) as e:
        out["error-desc"] = f"{type(e).__name__}: {e}"
    finally:
        for d in devices:
            d.close()
    return out


def _load_devices(
    devices: Sequence[SampleDevice],
    records: Sequence[tuple[int, int, bytes, bool]],
    description: dict[str, Any],
) -> list[dict[str, Any]]:
    by_id: dict[int, list[tuple[int, bytes, bool]]] = {}
    for dev_id, seq, data, final in records:
        by_id.setdefault(dev_id, []).append((seq, data, final))
    recorded = description.get("devices", [])
    if not isinstance(recorded, list) or not all(isinstance(d, dict) for d in recorded):
        raise _mig.ProtocolError("snapshot description: 'devices' is not a list of objects")
    names = [str(d.get("name")) for d in recorded]
    ids = [d.get("id") for d in recorded]
    # Devices are numbered 1..n in the order of the spec, on save and here.
    if (
        names != [d.name for d in devices]
        or ids != list(range(1, len(devices) + 1))
        or set(by_id) - set(ids)
    ):
        raise _mig.ProtocolError(
            f"snapshot devices {names} (ids {ids}) do not match its devices-spec "
            f"{[d.name for d in devices]} or its state records (ids {sorted(by_id)})"
        )
    report = []
    for dev_id, dev in enumerate(devices, start=1):
        chunks = sorted(by_id.get(dev_id, []))
        if not chunks or [s for s, _, _ in chunks] != list(range(len(chunks))) or not chunks[-1][2]:
            raise _mig.ProtocolError(f"device {dev.name}: state records missing or out of order")
        stream = dev.set_state(MigState.RESUMING)
        assert stream is not None
        for _, data, _ in chunks:
            stream.write(data)
        dev.set_state(MigState.STOP)  # the device validates its stream here
        got = _hex(dev.state_digest())
        want = recorded[dev_id - 1]["state-digest"]
        if got != want:
            raise _mig.ProtocolError(f"device {dev.name}: state digest {got} != recorded {want}")
        dev.set_state(MigState.RUNNING)
        report.append(
            {"name": dev.name, "type": dev.model, "status": "verified", "state-digest": got}
        )
    return report
