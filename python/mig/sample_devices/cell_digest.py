"""`CellDigest`: a sample device state's digest, rehashed only where it changed.

The END record of a sample device's stream carries a digest of its whole
state, and the destination checks it at RESUMING -> STOP: both inside the
downtime. Hashing the whole state there would cost milliseconds per 64 MiB
however few bytes stop-copy sends. So the state is cut into ``CELL``-byte
cells, each with its own xxh3-128 kept current off the downtime (a source
hashes a cell when precopy reads it, a destination when a record fills it),
and the digest is the xxh3-128 of the cells' hashes and the state size: at
the stop only the cells written since their last hash are rehashed, then
the cells' hashes combined.

Any write marks its cells stale, whatever a migration's dirty tracking
records, so the digest always covers the bytes held, not what was sent.
"""

from __future__ import annotations

import time

import numpy as np

from mig._mig import digest_bytes

__all__ = ["CELL", "CellDigest"]

CELL = 64 << 10  # part of the stream format: both sides cut the state alike

_warm = False


def _warm_native_digest() -> None:
    """Hash a few bytes once per process. The extension's first call that
    takes a numpy array initialises numpy's C API for it, a one-time cost of
    milliseconds: a destination device with no precopy data made its first
    hash at RESUMING -> STOP, and paid it inside the downtime."""
    global _warm
    if not _warm:
        digest_bytes(np.zeros(CELL // 1024, dtype=np.uint8))
        _warm = True


class CellDigest:
    """Per-cell hashes of a buffer of up to ``capacity`` bytes; all stale at first."""

    def __init__(self, capacity: int) -> None:
        _warm_native_digest()  # now, while setting up, not at the first hash
        cells = -(-capacity // CELL)
        self._hashes = np.zeros((cells, 16), dtype=np.uint8)
        self._stale = np.ones(cells, dtype=bool)
        # Wall seconds the last `root` took to combine the cells' hashes: the
        # part of the END record's cost that no precopy read pays.
        self.combine_seconds: float | None = None
        self.hashed = 0  # cells hashed so far (what a digest cost, in cells)

    def invalidate(self, offset: int, length: int) -> None:
        """Bytes ``[offset, offset + length)`` changed."""
        if length > 0:
            self._stale[offset // CELL : (offset + length - 1) // CELL + 1] = True

    def rehash(self, data: np.ndarray, offset: int, length: int, size: int) -> None:
        """Hash now every cell ``[offset, offset + length)`` overlaps, as ``data``
        holds it up to ``size`` (the state's end)."""
        if length > 0:
            for cell in range(offset // CELL, (offset + length - 1) // CELL + 1):
                self._hash(data, cell, size)

    def rehash_whole(self, data: np.ndarray, offset: int, length: int) -> None:
        """Hash the cells ``[offset, offset + length)`` covers whole; mark the
        ones it only touches stale (a destination, whose state size is known
        only at the end, finishes them then)."""
        if length <= 0:
            return
        self.invalidate(offset, length)
        first, end = -(-offset // CELL), (offset + length) // CELL
        for cell in range(first, end):
            self._hash(data, cell, len(data))

    def _hash(self, data: np.ndarray, cell: int, size: int) -> None:
        start = cell * CELL
        end = min(start + CELL, size)
        self._hashes[cell] = np.frombuffer(
            digest_bytes(data[start:end]).to_bytes(16, "little"), dtype=np.uint8
        )
        self._stale[cell] = False
        self.hashed += 1

    def root(self, data: np.ndarray, size: int) -> int:
        """The digest of ``data[:size]``: its stale cells rehashed, and the
        last one always (its extent depends on ``size``)."""
        cells = -(-size // CELL)
        for cell in np.flatnonzero(self._stale[:cells]):
            self._hash(data, int(cell), size)
        self._hash(data, cells - 1, size)
        t0 = time.perf_counter()
        tail = np.frombuffer(size.to_bytes(8, "little"), dtype=np.uint8)
        value = digest_bytes(np.concatenate((self._hashes[:cells].reshape(-1), tail)))
        self.combine_seconds = time.perf_counter() - t0
        return value
