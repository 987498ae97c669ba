"""`SampleDevice`: a stored device whose state changes while it runs.

A worker thread (or a virtual clock) rewrites ``rate`` bytes/s of state and
grows it by ``grow`` bytes/s, only while the device is armed and in a state
in which a device works (RUNNING, PRE_COPY).
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

from mig.sample_devices.config import SampleConfig
from mig.sample_devices.stored import StoredDevice
from mig.vfio.fsm import ACTIVE_STATES

__all__ = ["SampleDevice"]


class SampleDevice(StoredDevice):
    """A device with a worker thread that changes its state while active.

    ``config`` is the model's typed configuration. ``active=False`` builds a
    device whose guest driver has not armed it yet (a destination device).
    ``clock``: a clock with ``on_advance`` (``mig.clock.VirtualClock``)
    drives the device in virtual time instead of a worker thread.
    """

    tick = 0.005
    config_type: ClassVar[type[SampleConfig]] = SampleConfig

    def __init__(
        self, name: str, config: SampleConfig, *, active: bool = True, clock: Any = None
    ) -> None:
        super().__init__(
            name,
            config.caps,
            size=config.state,
            capacity=config.max,
            chunk=config.chunk,
            seed=config.seed,
        )
        self.config = config
        self.rate = config.rate
        self.grow = config.grow
        self.min_size = max(1, config.min_size)
        self._carry = self._gcarry = 0.0
        self.active = active
        if active:
            # A spec's faults arm the source device; a destination twin built
            # from the same spec gets faults through inject_fault().
            self._faults = config.faults
        self.writes = 0
        if not active and clock is None:
            # A destination twin: the first load's buffer is ready before
            # any source connects (in virtual time there is nothing to fault).
            self.storage.reserve_load_staging()
        self._wake = threading.Condition(self.lock)
        self._stop = False
        self._setup_worker()
        self._thread: threading.Thread | None = None
        self._vt_due = 0.0
        if clock is not None and callable(getattr(clock, "on_advance", None)):
            # Virtual time: the clock drives the device, no worker thread.
            clock.on_advance(self._on_clock)
        else:
            self._thread = threading.Thread(target=self._run, name=f"dev-{name}", daemon=True)
            self._thread.start()

    def _on_clock(self, old: float, new: float) -> None:
        # Work in steps of ``tick``, as the worker thread does, one write per
        # tick however far the clock jumps: a write marks whole chunks dirty,
        # so one write for a long jump (a send charged at once) would dirty
        # a fraction of what the thread dirties over the same time.
        with self.lock:
            if self._stop or not self._running():
                self._vt_due = 0.0
                return
            self._vt_due += new - old
            steps = int(self._vt_due / self.tick)
            for _ in range(steps):
                self._advance(self.tick)
            self._vt_due -= steps * self.tick

    def _setup_worker(self) -> None:
        """Hook: finish subclass state before the worker thread starts."""

    def _state_changed(self) -> None:
        self._wake.notify_all()

    def _running(self) -> bool:
        return self.active and self._state in ACTIVE_STATES

    def _run(self) -> None:
        last = time.monotonic()
        with self.lock:
            while not self._stop:
                if not self._running():
                    self._wake.wait()
                    last = time.monotonic()
                    continue
                self._wake.wait(self.tick)
                if self._stop or not self._running():
                    continue
                now = time.monotonic()
                self._advance(now - last)
                last = now

    def _advance(self, dt: float) -> None:
        """Run the device for ``dt`` seconds of work (lock held)."""
        self._carry += self.rate * dt
        self._gcarry += self.grow * dt
        # Whole chunks, so a partial chunk still pending as initial data never grows.
        step = int(self._gcarry / self.chunk) * self.chunk
        if step:
            self.resize(max(self.min_size, self.storage.size + step))
            self._gcarry -= step
        if self._carry >= 1:
            self._work(int(self._carry))
            self._carry -= int(self._carry)
            self.writes += 1

    def _work(self, nbytes: int) -> None:
        """Rewrite ``nbytes`` of state in chunk-sized pieces (lock held)."""
        storage = self.storage
        while nbytes > 0:
            n = min(nbytes, self.chunk, storage.size)
            off = int(storage.rng.integers(0, storage.size - n + 1))
            storage.rewrite(off, n)
            nbytes -= n

    def close(self) -> None:
        with self.lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> SampleDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
