"""Embed mig in a VMM prototype: your own guest, migrated live with the library.

The guest below stands in for a VMM's vCPUs: a thread that keeps writing
guest RAM. mig needs only the ``mig.Guest`` protocol from it: ``memory``,
``pause()``, ``resume()`` and ``set_throttle()``. Dirty pages are found by the
kernel (userfaultfd write-protect), so the guest's writes need no hooks.

Run: ``python examples/embed_guest.py``. It migrates the guest to a
destination in the same process over loopback TCP and checks that the
destination's memory equals the source's, byte for byte.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

import mig


class MyGuest:
    """A toy VMM guest: one vCPU thread that rewrites a working set of pages."""

    def __init__(self, size: int, working_set: int) -> None:
        self.memory = mig.GuestMemory(size)
        self._ram = self.memory.array  # a numpy view of guest RAM
        self._pages = working_set // self.memory.page_size
        self._run = threading.Event()  # set while the guest may run
        self._batch = threading.Lock()  # held by the vCPU while it writes
        self._throttle = 0.0
        self._stop = False
        self._run.set()
        self._vcpu = threading.Thread(target=self._vcpu_loop, daemon=True)
        self._vcpu.start()

    def _vcpu_loop(self) -> None:
        rng = np.random.default_rng(1)
        ps = self.memory.page_size
        while not self._stop:
            self._run.wait()
            with self._batch:
                if not self._run.is_set():
                    continue  # paused while waiting for the lock
                for page in rng.integers(0, self._pages, 64):
                    self._ram[page * ps : page * ps + 8] += 1  # a guest store
            time.sleep(0.001 * (1 + 10 * self._throttle))

    # --- the mig.Guest protocol ---
    def pause(self) -> float:
        """Stop the vCPU; return how long that took, in seconds."""
        t0 = time.monotonic()
        self._run.clear()
        with self._batch:  # waits out a batch in progress
            pass
        return time.monotonic() - t0

    def resume(self) -> None:
        self._run.set()

    def set_throttle(self, pct: float) -> None:
        self._throttle = pct

    def close(self) -> None:
        self._stop = True
        self._run.set()
        self._vcpu.join()


def main() -> int:
    if not mig.capabilities()["uffd"]["available"]:
        print("this example needs the uffd dirty-tracking backend (see `mig info`)")
        return 1
    guest = MyGuest(size=64 << 20, working_set=16 << 20)
    target = mig.GuestMemory(guest.memory.size)  # the destination VMM's RAM
    dest = mig.MigrationDestination("tcp:127.0.0.1:0", target)
    dest.start()
    source = mig.MigrationSource(guest, uri=dest.uri, downtime_limit=300, multifd_channels=2)
    source.start()
    result = source.wait(timeout=60)
    dest.wait(timeout=30)
    try:
        print(f"status: {result['status']}")
        if result["status"] != "completed":
            print(f"reason: {result.get('error-desc')}")
            return 1
        print(
            f"downtime: {result['downtime']:.1f} ms over {result['ram']['dirty-sync-count']} passes"
        )
        # The source stays paused after a completed migration: both sides must match.
        same = target.digest() == guest.memory.digest()
        print(f"destination verified: {result['verified']}, memory identical: {same}")
        return 0 if same and result["verified"] else 1
    finally:
        guest.close()


if __name__ == "__main__":
    sys.exit(main())
