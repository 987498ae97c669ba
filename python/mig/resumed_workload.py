"""``ResumedWorkload``: the guest's vCPUs on the destination, once it resumes.

``mig serve`` (and the demo's destination) runs the same workload spec as
the source on the memory it received, from the moment the migration
resumes the guest there, for pre-copy as well as post-copy: the guest
visibly moved. During post-copy its vCPUs block on every page still
missing, which is what ``postcopy-blocktime`` measures. It counts the
page writes completed between the resume and the end of the migration
(for post-copy: the last page placed), the destination's share of the
guest's progress during the migration.
"""

from __future__ import annotations

import time
from typing import Any

import mig

__all__ = ["ResumedWorkload"]


class ResumedWorkload:
    def __init__(self, memory: Any, workload: str, vcpus: int) -> None:
        self.memory = memory
        self.workload = workload
        self.vcpus = int(vcpus)
        self.guest: Any = None
        self._resumed_at: float | None = None
        self._ended: tuple[float, int] | None = None

    def resume(self) -> None:
        """``on_resume``: start the vCPUs (their first touches fault pages in)."""
        self._resumed_at = time.monotonic()
        self.guest = mig.WorkloadGuest(self.memory, vcpus=self.vcpus, workload=self.workload)

    def status(self, status: str) -> None:
        """``on_status``: the migration's end closes the counting window."""
        if status == "completed" and self.guest is not None and self._ended is None:
            self._ended = (time.monotonic(), int(self.guest.stats()["writes"]))

    def stats(self) -> dict[str, Any]:
        if self.guest is None or self._resumed_at is None:
            return {}
        end, writes = self._ended or (time.monotonic(), int(self.guest.stats()["writes"]))
        seconds = max(end - self._resumed_at, 1e-9)
        return {
            "workload": self.workload,
            "vcpus": self.vcpus,
            "writes-during-migration": writes,
            "seconds-during-migration": seconds,
            "writes-per-second": writes / seconds,
        }

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
