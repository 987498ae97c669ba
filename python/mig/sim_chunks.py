"""The destination's chunk root in virtual time: what ``settle`` and ``ready`` rehash.

A real destination keeps a root over chunks of ``CHUNK_BYTES``
(``rust/src/chunk_digest.rs``): a page that lands makes its whole chunk
stale, and the root rehashes every stale chunk in full. So a scattered final
pass of ``n`` pages costs up to ``n`` chunks (16 times its bytes), and the
source plans that term (``SwitchoverCosts.dest_digest_cost``) from the
per-chunk time each ``settled`` reports. The simulator keeps the same
bookkeeping: the chunks the pages sent since a point touched, each costing
``HostModel.chunk_rehash`` seconds, measured on this host with a real
``ChunkDigest`` (``chunk_rehash_seconds``).

Which chunks are stale when: the destination's background rehasher hashes
a chunk once no write touched it for ``SETTLING_PERIOD`` (its ``Throttle``),
so at ``settle`` and at ``ready`` the chunks touched within the last one to
two periods wait for the root (``RecentChunks``), and a ``settle`` leaves
none.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np

from mig._mig import DirtyBitmap

__all__ = ["CHUNK_BYTES", "SETTLING_PERIOD", "RecentChunks", "StaleChunks", "chunk_rehash_seconds"]

CHUNK_BYTES = 64 << 10  # chunk_digest.rs CHUNK_BYTES
SETTLING_PERIOD = 0.020  # chunk_digest.rs Throttle::default().period, s


class StaleChunks:
    """The chunks left stale by the pages sent since the last ``clear``.

    As the receiver marks them: a data page makes its chunk stale, a zero
    page only where the destination's page may hold data (it was written
    before). (The receiver also hashes at once a chunk one record holds
    whole; a record holds at most a few chunks, and the model, which sends
    a pass in slices of many records, leaves that out.)"""

    def __init__(self, memory_size: int, unit_bytes: int) -> None:
        self._unit = unit_bytes
        self._chunks = DirtyBitmap(max(1, -(-memory_size // CHUNK_BYTES)))
        # A unit (an aggregated model's page group) larger than a chunk
        # covers this many whole chunks.
        self._per_unit = max(1, unit_bytes // CHUNK_BYTES)

    def sent(self, units: DirtyBitmap, data: DirtyBitmap | None = None) -> None:
        """The model pages of ``units`` were sent, those of ``data`` (all of
        them when None) as data."""
        idx = (units if data is None else data).indices()
        if not len(idx):
            return
        first = idx.astype(np.uint64) * np.uint64(self._unit) // np.uint64(CHUNK_BYTES)
        if self._per_unit > 1:
            span = np.arange(self._per_unit, dtype=np.uint64)
            first = (first[:, None] + span[None, :]).ravel()
        self._chunks |= DirtyBitmap.from_indices(first, len(self._chunks))

    def count(self) -> int:
        return self._chunks.count()

    def count_with(self, other: StaleChunks) -> int:
        """Chunks stale here or in ``other``."""
        return (self._chunks | other._chunks).count()

    def union(self, other: StaleChunks) -> StaleChunks:
        """A new set: the chunks stale here or in ``other``."""
        out = copy.copy(self)
        out._chunks = self._chunks | other._chunks
        return out

    def clear(self) -> None:
        self._chunks.clear()


class RecentChunks:
    """The chunks touched within the last one to two ``SETTLING_PERIOD``:
    those the background rehasher has not taken yet."""

    def __init__(self, memory_size: int, unit_bytes: int) -> None:
        self._current = StaleChunks(memory_size, unit_bytes)
        self._previous = StaleChunks(memory_size, unit_bytes)
        self._bucket = 0

    def _rotate(self, now: float) -> None:
        bucket = int(now / SETTLING_PERIOD)
        if bucket == self._bucket:
            return
        self._current, self._previous = self._previous, self._current
        self._current.clear()
        if bucket > self._bucket + 1:
            self._previous.clear()
        self._bucket = bucket

    def sent(self, units: DirtyBitmap, data: DirtyBitmap | None, now: float) -> None:
        self._rotate(now)
        self._current.sent(units, data)

    def count(self, now: float) -> int:
        self._rotate(now)
        return self._current.count_with(self._previous)

    def pending(self, now: float) -> StaleChunks:
        """The chunks the rehasher has not taken yet, as a set of their own:
        at a pause, all that the destination's root can still owe of what
        precopy sent (the rehasher hashed every chunk that settled before)."""
        self._rotate(now)
        return self._current.union(self._previous)

    def clear(self) -> None:
        self._current.clear()
        self._previous.clear()


# Timed rehash: a 64 MiB memory with one page written in every fourth chunk.
CALIBRATION_MEMORY = 64 << 20
CALIBRATION_STRIDE = 4


def chunk_rehash_seconds(runs: int = 5) -> float:
    """Seconds one stale chunk costs the root (``ChunkDigest.root_timed``),
    best of ``runs``, with scattered chunks as a final pass leaves them."""
    from mig._mig import ChunkDigest, GuestMemory  # noqa: PLC0415

    mem = GuestMemory(CALIBRATION_MEMORY)
    mem.array[:] = 0x5A
    digest: Any = ChunkDigest(mem)
    digest.root()
    pages_per_chunk = max(1, digest.chunk_bytes // mem.page_size)
    best = float("inf")
    for _ in range(runs):
        for chunk in range(0, digest.chunks, CALIBRATION_STRIDE):
            digest.mark_written(chunk * pages_per_chunk)
        t0 = time.perf_counter()
        timed = digest.root_timed()
        elapsed = time.perf_counter() - t0
        chunks = int(timed["rehashed-chunks"]) or 1
        best = min(best, elapsed / chunks)
    return best
