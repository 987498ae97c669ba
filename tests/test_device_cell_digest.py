"""A sample device's state digest (``CellDigest``): rehashed only where the state
changed, yet always the digest of the bytes held, and the same on both sides."""

from __future__ import annotations

import numpy as np
import pytest
from devicekit import migrate_device

from mig._mig import digest_bytes
from mig.devices import create
from mig.sample_devices.cell_digest import CELL, CellDigest
from mig.sample_devices.storage import StateStorage
from mig.sample_devices.stream import (
    MAGIC_V1,
    MODEL_IDS,
    StreamDecoder,
    data_record,
    end_record,
    state_hash,
)
from mig.vfio.errors import DeviceStreamError


def fresh_root(data: np.ndarray, size: int) -> int:
    """The root computed from nothing: every cell of ``data[:size]`` hashed now."""
    return CellDigest(len(data)).root(data, size)


def test_the_root_is_the_hash_of_every_cells_hash_and_the_size() -> None:
    data = np.random.default_rng(1).integers(0, 256, 3 * CELL + 100, dtype=np.uint8)
    size = 2 * CELL + 7
    cells = [data[0:CELL], data[CELL : 2 * CELL], data[2 * CELL : size]]
    hashes = b"".join(digest_bytes(c).to_bytes(16, "little") for c in cells)
    expected = digest_bytes(np.frombuffer(hashes + size.to_bytes(8, "little"), np.uint8))
    assert fresh_root(data, size) == expected
    assert fresh_root(data, size) != fresh_root(data, size + 1)


def test_every_change_reaches_the_root_whatever_was_tracked() -> None:
    """Writes, rewrites and resizes with no saving session open (no dirty
    tracking): the cached root still follows the bytes."""
    storage = StateStorage(5 * CELL + 10, 8 * CELL, CELL, seed=3)
    storage.digest()  # every cell hashed and cached
    storage.rewrite(CELL + 5, 10)
    assert storage.digest() == fresh_root(storage.state, storage.size)
    storage.write(4 * CELL - 3, b"\x01\x02\x03\x04\x05\x06")  # across two cells
    assert storage.digest() == fresh_root(storage.state, storage.size)
    for size in (7 * CELL + 1, 2 * CELL, 2 * CELL + 1):
        storage.resize(size)
        assert storage.digest() == fresh_root(storage.state, storage.size), size


@pytest.mark.parametrize("chunk", [4 << 10, CELL, 3 * CELL + 512])
def test_a_stream_loads_to_the_same_root_records_of_any_size(chunk: int) -> None:
    """Records smaller than a cell, equal, or larger and misaligned: the
    destination's root (checked against the END record) is the source's."""
    spec = f"nic:state={7 * CELL + 123},rate=1MiB/s,chunk={chunk}"
    src, dst = create(spec), create(spec, active=False)
    try:

        def dirty_after_read() -> None:
            with src.lock:
                src.storage.rewrite(2 * CELL + 9, 100)  # dirtied after precopy read it

        migrate_device(src, dst, after_precopy=dirty_after_read)
        assert dst.loaded_digest() == src.state_digest() == dst.state_digest()
        assert src.state_digest() == fresh_root(src.storage.state, src.storage.size)
    finally:
        src.close()
        dst.close()


def test_a_stopped_devices_digest_rehashes_only_what_changed() -> None:
    """After a save read every chunk, the END record's digest rehashes only
    the cell written since and the last one."""
    storage = StateStorage(16 * CELL, 16 * CELL, CELL, seed=5)
    storage.start_tracking()
    while storage.take_next() is not None:
        pass
    storage.rewrite(3 * CELL, 1)
    before = storage.cells.hashed
    storage.digest()
    assert storage.cells.hashed - before == 2  # cell 3 and the last one


def _v1_stream(state: np.ndarray, digest: bytes) -> bytes:
    """A version 1 stream (whole-state END digest), as snapshot files before
    the cell root were written."""
    hdr = MAGIC_V1 + bytes([MODEL_IDS["nic"]]) + bytes(7)
    return hdr + data_record(0, state.tobytes()) + end_record(len(state), digest)


def test_a_version_1_stream_still_loads_and_its_whole_state_digest_is_checked() -> None:
    state = np.random.default_rng(7).integers(0, 256, 3 * CELL + 9, dtype=np.uint8)
    good = StreamDecoder("nic0", "nic", 4 * CELL)
    good.feed(_v1_stream(state, state_hash(state)))
    size, root = good.finish()
    assert size == len(state) and root == fresh_root(state, len(state))
    assert np.array_equal(good.staging[:size], state)

    bad = StreamDecoder("nic0", "nic", 4 * CELL)
    bad.feed(_v1_stream(state, bytes(16)))
    with pytest.raises(DeviceStreamError, match="state digest mismatch"):
        bad.finish()


def test_the_native_digest_is_warmed_when_a_digest_is_built_not_at_its_first_hash() -> None:
    # In a fresh process (the warm-up is once per process): building a
    # CellDigest, as a device or a destination's decoder does while setting
    # up, makes the extension's first numpy call; hashing later makes none
    # before its own.
    import subprocess
    import sys

    script = """
import mig.sample_devices.cell_digest as cd
calls = []
real = cd.digest_bytes
cd.digest_bytes = lambda data: calls.append(len(data)) or real(data)
cells = cd.CellDigest(3 * cd.CELL)
cd.CellDigest(cd.CELL)
print(len(calls))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1"]
