"""`StoredDevice`: a migration device whose state is bytes in memory.

It walks the kernel's arcs (`mig.vfio.fsm`) one at a time, opens and closes
its data sessions as each arc says, and can be armed with faults. It has no
activity of its own: `mig.sample_devices.activity.SampleDevice` adds the
worker that changes the state while the device runs.
"""

from __future__ import annotations

import threading
from collections import deque

from mig._mig import UnsupportedError
from mig.sample_devices.faults import DeviceFaults
from mig.sample_devices.sessions import ResumeStream, SaveStream
from mig.sample_devices.storage import StateStorage
from mig.sample_devices.stream import END_BYTES, HEADER_BYTES, MAX_RECORD
from mig.vfio.device import MigrationDevice, PrecopyInfo
from mig.vfio.errors import DeviceError, DeviceStreamError, TransitionFailed
from mig.vfio.fsm import PRECOPY_STATES, ArcEffect, MigCap, MigState, arc_effect, path

__all__ = ["StoredDevice"]


class StoredDevice(MigrationDevice):
    """A VFIO migration uAPI v2 device with in-memory state.

    ``caps`` is a `MigCap`. Every method is thread-safe against a worker
    thread that holds ``lock`` while it changes the state.
    """

    model = "device"

    def __init__(
        self,
        name: str,
        caps: MigCap,
        *,
        size: int,
        capacity: int,
        chunk: int = 64 << 10,
        seed: int = 0,
    ) -> None:
        if not caps & MigCap.STOP_COPY:
            raise ValueError("VFIO_MIGRATION_STOP_COPY is mandatory")
        if not 0 < size <= capacity:
            raise ValueError(f"state size {size} must be in 1..{capacity}")
        if chunk <= 0 or chunk > MAX_RECORD:
            raise ValueError(f"chunk must be in 1..{MAX_RECORD}")
        self.name = name
        self.caps = MigCap(caps)
        self.chunk = chunk
        self.capacity = capacity
        self.lock = threading.RLock()
        self.storage = StateStorage(size, capacity, chunk, seed)
        self._state = MigState.RUNNING
        self._save: SaveStream | None = None
        self._resume: ResumeStream | None = None
        self._faults = DeviceFaults()
        self.arcs: deque[tuple[MigState, MigState]] = deque(maxlen=1024)
        self.active = True  # the guest driver has armed the device

    # -- introspection -----------------------------------------------------
    @property
    def state(self) -> MigState:
        return self._state

    @property
    def state_size(self) -> int:
        with self.lock:
            return self.storage.size

    def state_digest(self) -> int:
        """Digest of the device's functional state (its bytes, hence its size)."""
        with self.lock:
            return self.storage.digest()

    def loaded_digest(self) -> int | None:
        """`state_digest` of a state just loaded, as its stream's validation
        computed it over the same bytes (RESUMING -> STOP), without hashing the
        state again; None once the state changed or none was loaded."""
        with self.lock:
            return self.storage.loaded_digest

    def stop_copy_seconds(self) -> float | None:
        """The END record's combining of its cell hashes: the STOP_COPY work
        that does not depend on how many bytes are left (the cells it sends
        are hashed as read, like precopy's). As long as the last digest's
        took, one taken now (guest running) if there was none yet."""
        with self.lock:
            cells = self.storage.cells
            if cells.combine_seconds is None:
                self.storage.digest()
            return cells.combine_seconds

    def state_bytes(self) -> bytes:
        with self.lock:
            return self.storage.state.tobytes()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} {self._state.name} "
            f"size={self.storage.size} caps={self.caps!r}>"
        )

    # -- faults ------------------------------------------------------------
    def inject_fault(
        self,
        *,
        fail: MigState | str | None = None,
        into_error: bool = False,
        corrupt: bool = False,
        oversize: int = 0,
        once: bool = True,
    ) -> None:
        """Arm a fault; the fields are those of `DeviceFaults`."""
        faults = DeviceFaults(fail, into_error, corrupt, oversize, once)  # type: ignore[arg-type]
        with self.lock:
            self._faults = faults

    def clear_faults(self) -> None:
        with self.lock:
            self._faults = DeviceFaults()

    # -- the state machine -------------------------------------------------
    def set_state(self, target: MigState | int) -> SaveStream | ResumeStream | None:
        """``VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`` SET.

        Walks the kernel's path one arc at a time. Returns the data session
        opened by the final arc (the ``data_fd``), else None. On a failing arc
        raises `TransitionFailed` with the device left in the last state it
        reached (or ERROR); an arc the kernel refuses raises `InvalidTransition`
        before anything moves.
        """
        target = MigState(target)
        with self.lock:
            opened: SaveStream | ResumeStream | None = None
            for nxt in path(self._state, target, self.caps):
                opened = self._step(self._state, nxt)
            return opened

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: drop every data session and return to RUNNING.

        The model keeps the functional state bytes, so a source device that hit
        ERROR during a failed migration keeps serving the guest.
        """
        with self.lock:
            self._drop_sessions()
            self.arcs.append((self._state, MigState.RUNNING))
            self._state = MigState.RUNNING
            self._state_changed()

    def _drop_sessions(self) -> None:
        if self._save is not None:
            self._save.close()
            self._save = None
        self.storage.stop_tracking()
        if self._resume is not None:
            self._resume.close()
            self._resume = None

    def _step(self, cur: MigState, nxt: MigState) -> SaveStream | ResumeStream | None:
        faults = self._faults
        if faults.fail is nxt:
            self._faults = faults.after_failing()
            if faults.into_error:
                self._drop_sessions()
                self._state = MigState.ERROR
            raise TransitionFailed(
                f"{self.name}: injected failure on arc {cur.name} -> {nxt.name}", self._state
            )
        opened = self._apply(arc_effect(cur, nxt))
        self.arcs.append((cur, nxt))
        self._state = nxt
        self._state_changed()
        return opened

    def _apply(self, effect: ArcEffect) -> SaveStream | ResumeStream | None:
        """Open, turn or close the data session as the arc says."""
        if effect is ArcEffect.FINISH_RESUME:
            resume, self._resume = self._resume, None
            assert resume is not None
            try:
                resume.finish()
            except DeviceStreamError:
                self._state = MigState.ERROR
                raise
            self.active = True
        elif effect in (ArcEffect.OPEN_PRECOPY, ArcEffect.OPEN_STOP_COPY):
            self._save = SaveStream(self.storage, self.lock, self.name, self.model)
            if effect is ArcEffect.OPEN_STOP_COPY:
                self._enter_stop_copy(self._save)
            return self._save
        elif effect is ArcEffect.ENTER_STOP_COPY and self._save is not None:
            self._enter_stop_copy(self._save)
        elif effect is ArcEffect.CLOSE_SAVE:
            self._drop_sessions()
        elif effect is ArcEffect.OPEN_RESUME:
            self._resume = ResumeStream(self.storage, self.lock, self.name, self.model)
            return self._resume
        return None

    def _enter_stop_copy(self, save: SaveStream) -> None:
        save.enter_stop_copy(oversize=self._faults.oversize, corrupt=self._faults.corrupt)

    def _state_changed(self) -> None:
        """Hook for subclasses (wake the worker)."""

    # -- changes made by the device while it runs (lock held) ---------------
    def mark_dirty(self, offset: int, length: int) -> None:
        """Record a change of ``[offset, offset + length)``; call with the lock held."""
        self.storage.mark_dirty(offset, length)

    def resize(self, new_size: int) -> None:
        """Change the state size (growing tables); call with the lock held."""
        self.storage.resize(new_size)

    # -- sizes ---------------------------------------------------------------
    def precopy_info(self) -> PrecopyInfo:
        """``VFIO_MIG_GET_PRECOPY_INFO``: ``(initial_bytes, dirty_bytes)``.

        Valid only in PRE_COPY and PRE_COPY_P2P (``-EINVAL`` otherwise).
        """
        with self.lock:
            if self._state not in PRECOPY_STATES or self._save is None:
                raise DeviceError(
                    f"{self.name}: precopy_info() is valid only in PRE_COPY states, "
                    f"device is {self._state.name}"
                )
            return self._save.precopy_info()

    def data_size(self) -> int:
        """``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``: bytes STOP_COPY would still produce."""
        if not self.caps & MigCap.DATA_SIZE:
            raise UnsupportedError(
                f"{self.name}: device does not support VFIO_DEVICE_FEATURE_MIG_DATA_SIZE"
            )
        with self.lock:
            if self._save is not None:
                return self._save.remaining()
            if self._state is MigState.ERROR:
                raise DeviceError(f"{self.name}: device is in ERROR")
            return HEADER_BYTES + self.storage.full_cost() + END_BYTES
