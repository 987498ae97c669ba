"""The in-memory state of a sample device, in chunks, with what is left to send.

A saving session sends the state chunk by chunk: first every chunk of the
image it started from (the precopy initial data), then chunks dirtied after
they were sent. The sizes reported by ``precopy_info()`` and ``data_size()``
are the stream bytes of those chunks, so they match what a read returns.
"""

from __future__ import annotations

import numpy as np

from mig.sample_devices.cell_digest import CellDigest
from mig.sample_devices.stream import DATA_OVERHEAD

__all__ = ["StateStorage"]


class StateStorage:
    """State bytes up to ``capacity``, of which the first ``size`` are the state.

    Not thread-safe: the owning device holds its lock around every call.
    """

    def __init__(self, size: int, capacity: int, chunk: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.chunk = chunk
        self.rng = np.random.default_rng(seed)
        self._data = np.zeros(capacity, dtype=np.uint8)
        self._data[:size] = self.rng.integers(0, 256, size, dtype=np.uint8)
        self.size = size
        nchunks = -(-capacity // chunk)
        # Chunks still to send from the initial image / re-dirtied after being sent.
        self._initial = np.zeros(nchunks, dtype=bool)
        self._dirty = np.zeros(nchunks, dtype=bool)
        self._tracking = False
        self.cells = CellDigest(capacity)
        # The digest of an installed state, computed by its stream's validation;
        # dropped by any change, so it always names the bytes held now.
        self.loaded_digest: int | None = None
        self._staging: np.ndarray | None = None

    def reserve_load_staging(self) -> None:
        """Allocate the zeroed buffer the next load decodes into, its pages
        faulted in now. A fresh buffer's pages fault in at their first write,
        and on a host slow to serve faults the first load of a large state
        then paid them all while the source waited for its switchover-ack."""
        staging = np.zeros(self.capacity, dtype=np.uint8)
        staging.fill(0)  # the write that faults each page in
        self._staging = staging

    def load_staging(self) -> np.ndarray:
        """The zeroed buffer a load decodes into: the reserved one, once, else a new one."""
        staging, self._staging = self._staging, None
        return staging if staging is not None else np.zeros(self.capacity, dtype=np.uint8)

    @property
    def state(self) -> np.ndarray:
        """The state bytes (a view: valid until the next change)."""
        return self._data[: self.size]

    def digest(self) -> int:
        """The state's digest (`CellDigest.root`): the END record carries it."""
        return self.cells.root(self._data, self.size)

    @property
    def nchunks(self) -> int:
        return -(-self.size // self.chunk)

    # -- what a saving session still has to send ------------------------------
    def start_tracking(self) -> None:
        """A saving session opens: every chunk is initial data, none dirty."""
        self._initial[:] = False
        self._initial[: self.nchunks] = True
        self._dirty[:] = False
        self._tracking = True

    def stop_tracking(self) -> None:
        self._initial[:] = False
        self._dirty[:] = False
        self._tracking = False

    def pending_cost(self) -> tuple[int, int]:
        """Stream bytes of the initial and of the dirty chunks still to send."""
        return self._cost(self._initial), self._cost(self._dirty)

    def full_cost(self) -> int:
        """Stream bytes of the DATA records of the whole state."""
        return self._cost(np.ones(self.nchunks, dtype=bool))

    def _cost(self, mask: np.ndarray) -> int:
        n = self.nchunks
        count = int(np.count_nonzero(mask[:n]))
        if not count:
            return 0
        cost = count * (DATA_OVERHEAD + self.chunk)
        if mask[n - 1]:
            tail = self.size - (n - 1) * self.chunk
            cost -= self.chunk - tail
        return cost

    def take_next(self) -> tuple[int, bytes, bool] | None:
        """The next chunk to send, initial data first: ``(offset, bytes, initial)``."""
        n = self.nchunks
        for mask, initial in ((self._initial, True), (self._dirty, False)):
            idx = np.flatnonzero(mask[:n])
            if idx.size:
                c = int(idx[0])
                mask[c] = False
                off = c * self.chunk
                end = min(off + self.chunk, self.size)
                # Hashed as it is read, off the downtime for precopy reads:
                # the END record then rehashes only what changed since.
                self.cells.rehash(self._data, off, end - off, self.size)
                return off, self._data[off:end].tobytes(), initial
        return None

    # -- changes ----------------------------------------------------------------
    def mark_dirty(self, offset: int, length: int) -> None:
        """Record a change of ``[offset, offset + length)``."""
        self.loaded_digest = None
        self.cells.invalidate(offset, length)
        if not self._tracking or length <= 0:
            return
        first, last = offset // self.chunk, (offset + length - 1) // self.chunk
        sel = slice(first, last + 1)
        self._dirty[sel] |= ~self._initial[sel]

    def rewrite(self, offset: int, length: int) -> None:
        """Overwrite ``length`` bytes at ``offset`` with new random bytes."""
        self._data[offset : offset + length] = self.rng.integers(0, 256, length, dtype=np.uint8)
        self.mark_dirty(offset, length)

    def write(self, offset: int, payload: bytes) -> None:
        self._data[offset : offset + len(payload)] = np.frombuffer(payload, np.uint8)
        self.mark_dirty(offset, len(payload))

    def resize(self, new_size: int) -> None:
        """Change the state size (growing tables), within 1..capacity."""
        new_size = max(1, min(new_size, self.capacity))
        self.loaded_digest = None
        old = self.size
        if new_size == old:
            return
        # The old last cell's extent changes, and every cell past it.
        low = min(old, new_size) - 1
        self.cells.invalidate(low, max(old, new_size) - low)
        if new_size > old:
            self._data[old:new_size] = self.rng.integers(0, 256, new_size - old, dtype=np.uint8)
        self.size = new_size
        n = self.nchunks
        self._initial[n:] = False
        self._dirty[n:] = False
        if new_size > old:
            self.mark_dirty(old, new_size - old)
        elif self._tracking and n:
            # The last chunk shrank: send its new extent again.
            self.mark_dirty((n - 1) * self.chunk, 1)

    def install(self, staging: np.ndarray, size: int, cells: CellDigest, digest: int) -> None:
        """Take a loaded state (the decoder's staging buffer) as this state,
        with the cell hashes and ``digest`` its validation computed over it."""
        if staging.shape != self._data.shape:
            raise ValueError("a loaded state must have this storage's capacity")
        self._data = staging
        self.size = size
        self.cells = cells
        self.loaded_digest = digest
