"""``DigestTiming``: what one whole-memory digest costs at the switchover.

The switchover digests all of RAM, so its cost is a fixed switchover cost.
A sample of a few pages misleads (holes digest far faster than data): only
the whole memory gives its real cost, and it changes as the guest populates
memory, so it is timed at setup and again, in the background, once a
switchover is near.

Over a link that charges virtual time (``link.concurrent_digest`` false) the
digest is charged to the clock and never runs on a second thread, which
must not advance that clock.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from mig._mig import GuestMemory
from mig.clock import Clock
from mig.stats import SwitchoverCosts, digest_cost

__all__ = ["DigestTiming"]

# Seconds between background timings.
_REFRESH_EVERY = 1.0


class DigestTiming:
    def __init__(
        self, memory: GuestMemory, clock: Clock, costs: SwitchoverCosts, concurrent: bool
    ) -> None:
        self.memory = memory
        self.clock = clock
        self.costs = costs
        self.concurrent = concurrent
        self._job: threading.Thread | None = None
        self._measured_at = clock.now()

    def measure(self) -> None:
        """Time one whole digest now (at setup)."""
        if self.concurrent:
            self.costs.digest = digest_cost(self.memory)
            return
        t0 = self.clock.now()  # a simulator charges the digest to its clock
        self.memory.digest()
        self.costs.digest = self.clock.now() - t0

    def refresh(self) -> None:
        """Time it again in the background, at most once a second; only over a
        real stream (a simulator's digest cost is a constant of its host model)."""
        if not self.concurrent or self._job is not None:
            return
        if self.clock.now() - self._measured_at < _REFRESH_EVERY:
            return

        def measure() -> None:
            self.costs.digest = digest_cost(self.memory)
            self._measured_at = self.clock.now()
            self._job = None

        self._job = threading.Thread(target=measure, name="mig-digest-cost", daemon=True)
        self._job.start()

    def settle(self) -> None:
        """The switchover starts: not two digests at once in the downtime."""
        job = self._job
        if job is not None:
            job.join()

    def digest_in_background(self) -> Future[int] | None:
        """Digest RAM while the stop-copy state goes out (memory is frozen now)."""
        if not self.concurrent:
            return None
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mig-digest")
        job = pool.submit(self.memory.digest)
        pool.shutdown(wait=False)
        return job
