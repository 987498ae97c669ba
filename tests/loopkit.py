"""Virtual-time pieces for loop tests: a guest, a soft tracker, a link and a
blob device, all driven by ``VirtualClock`` so runs are fast and repeatable.

The guest writes real bytes into a real ``GuestMemory``; the link copies real
pages into a destination ``GuestMemory`` and charges time at its bandwidth;
its destination is the real ``DestinationCore``, configured as the source's
``hello`` describes it: it verifies the digest, reports "ready" and resumes
on "go".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mig import DirtyBitmap, GuestMemory, protocol
from mig.clock import VirtualClock
from mig.destination_core import (
    DestinationCore,
    Effect,
    FinishStopCopy,
    Resume,
    Send,
    SettleChannels,
)
from mig.errors import MigrationEnded, OverBudget
from mig.protocol import Failed, Hello, Message, Settled
from mig.reorder import DeviceRecord

PAGE_OVERHEAD = 16  # wire bytes per page header in this link


class SoftTracker:
    """Pages marked since the previous sync."""

    def __init__(self, memory: GuestMemory) -> None:
        self._bm = DirtyBitmap(memory.num_pages)
        self.last_sync_seconds = 0.0
        self.closed = False

    def mark(self, pages: np.ndarray) -> None:
        self._bm |= DirtyBitmap.from_indices(pages.astype(np.uint64), len(self._bm))

    def sync(self) -> DirtyBitmap:
        return self._bm.take()

    def close(self) -> None:
        self.closed = True


class VirtualGuest:
    """Writes ``rate`` random pages/s of ``working_set`` pages while running."""

    def __init__(
        self,
        memory: GuestMemory,
        clock: VirtualClock,
        tracker: SoftTracker,
        rate: float,
        working_set: int | None = None,
        vcpus: int = 1,
        seed: int = 1,
    ) -> None:
        self.memory = memory
        self.clock = clock
        self.tracker = tracker
        self.rate = rate
        self.vcpus = vcpus
        self.working_set = working_set or memory.num_pages
        self.running = True
        self.throttle = 0.0
        self.dirty_limit = 0.0
        self.pauses = 0
        self._carry = 0.0
        self._rng = np.random.default_rng(seed)
        self._pages = memory.array.reshape(memory.num_pages, memory.page_size)
        self._counter = 0
        clock.on_advance(self._tick)
        # Non-trivial initial content.
        self._pages[:, :8] = self._rng.integers(0, 255, (memory.num_pages, 8), dtype=np.uint8)

    def effective_rate(self) -> float:
        rate = self.rate * (1.0 - self.throttle)
        if self.dirty_limit:
            rate = min(rate, self.dirty_limit * self.vcpus)
        return rate

    def _tick(self, old: float, new: float) -> None:
        if not self.running:
            return
        self._carry += self.effective_rate() * (new - old)
        n = int(self._carry)
        if n <= 0:
            return
        self._carry -= n
        pages = self._rng.integers(0, self.working_set, n)
        self._counter += 1
        self._pages[pages, 8] = self._counter & 0xFF
        self._pages[pages, 9] = (self._counter >> 8) & 0xFF
        self.tracker.mark(pages)

    def pause(self) -> float:
        self.running = False
        self.pauses += 1
        self.clock.advance(0.0005)
        return 0.0005

    def resume(self) -> None:
        self.running = True

    def set_throttle(self, pct: float) -> None:
        self.throttle = float(pct)

    def set_dirty_limit(self, rate: float) -> None:
        self.dirty_limit = float(rate)

    def stats(self) -> dict[str, Any]:
        return {"rate": self.effective_rate(), "running": self.running}


class VirtualLink:
    """Copies pages into ``dst`` at ``bandwidth`` bytes/s of virtual time and
    plays the destination's side of the control protocol."""

    concurrent_digest = False  # digests are charged to the virtual clock

    def __init__(
        self,
        src: GuestMemory,
        dst: GuestMemory,
        clock: VirtualClock,
        bandwidth: float,
        load_time: float = 0.002,
    ) -> None:
        self.src = src
        self.dst = dst
        self.clock = clock
        self.bandwidth = bandwidth
        self.cap = 0
        self.load_time = load_time
        self._src_pages = src.array.reshape(src.num_pages, src.page_size)
        self._dst_pages = dst.array.reshape(dst.num_pages, dst.page_size)
        self._bytes = 0
        self._busy = 0.0
        self._inbox: list[Message] = []
        self.sent: list[Message] = []
        self.destination: DestinationCore | None = None
        self.device_records: dict[int, list[tuple[int, bytes, bool]]] = {}
        self.discarded = False
        self.resumed = False
        self.aborted = False
        self.fail_on: type | None = None  # the destination fails on this message type
        self.lose: type | None = None  # a reply of this type never arrives

    def _charge(self, nbytes: int) -> None:
        bw = min(self.bandwidth, self.cap) if self.cap else self.bandwidth
        dt = nbytes / bw
        self._busy += dt
        self._bytes += nbytes
        self.clock.advance(dt)

    def send_pages(self, bitmap: DirtyBitmap, generation: int) -> int:
        if self.aborted:
            raise OSError("link aborted")
        idx = bitmap.indices().astype(np.int64)
        self._dst_pages[idx] = self._src_pages[idx]
        n = len(idx) * (self.src.page_size + PAGE_OVERHEAD)
        self._charge(n)
        return n

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
        self.device_records.setdefault(device_id, []).append((seq, bytes(data), final))
        if self.destination is not None:
            self.destination.records_arrived([DeviceRecord(device_id, seq, bytes(data), final)])
        self._charge(len(data) + PAGE_OVERHEAD)

    def sync(self, generation: int) -> None:
        pass

    def finish(self, digest: int) -> None:
        self.finished_digest = digest

    @property
    def ready(self) -> bool:
        return self.destination is not None and self.destination.verified

    def send(self, message: Message) -> None:
        if self.aborted:
            raise OSError("link aborted")
        self.sent.append(message)
        if isinstance(message, self.fail_on or ()):
            self._inbox.append(Failed(f"injected at {protocol.type_name(message)}"))
            return
        if isinstance(message, Hello):
            # Every device here has its initial data at once (BlobDevice).
            self.destination = DestinationCore.matching(
                message, initially_loaded=[d.id for d in message.devices]
            )
        elif self.destination is None:  # no hello yet: a destination that expects one
            self.destination = DestinationCore(self.dst.page_size, self.dst.size, {})
        try:
            self._play(self.destination.on_message(message, self.clock.now()))
        except MigrationEnded as e:
            self.discarded = True
            if not e.by_peer:
                self._inbox.append(Failed(e.reason))

    def _play(self, effects: list[Effect]) -> None:
        assert self.destination is not None
        for effect in effects:
            match effect:
                case Send(message=reply):
                    self._inbox.append(reply)
                case FinishStopCopy():
                    t0 = self.clock.now()
                    self.clock.advance(self.load_time)
                    self.destination.loads()
                    self.destination.stop_copy_received()
                    digest = format(self.dst.digest(), "032x")
                    self._play(self.destination.verify(digest, t0 + self.load_time))
                case Resume():
                    self.resumed = True
                    self._play(self.destination.resumed(self.clock.now()))
                case SettleChannels(number=number):
                    self._inbox.append(Settled(number, 0.0, 0, 0.0))
        self.destination.loads()
        self._play_announcements()

    def _play_announcements(self) -> None:
        assert self.destination is not None
        for effect in self.destination.announcements():
            if isinstance(effect, Send):
                self._inbox.append(effect.message)

    def recv(self, timeout: float) -> Message | None:
        self._inbox = [m for m in self._inbox if not isinstance(m, self.lose or ())]
        if self._inbox:
            return self._inbox.pop(0)
        if timeout:
            self.clock.advance(timeout)
        return None

    def set_max_bandwidth(self, bytes_per_s: int) -> None:
        self.cap = bytes_per_s

    def transferred(self) -> int:
        return self._bytes

    def busy_time(self) -> float:
        return self._busy

    def stats(self) -> dict[str, Any]:
        return {"transferred": self._bytes}

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        pass


class BlobDevice:
    """A device handler with precopy state that the guest dirties while running
    and a stop-copy tail of ``stop_size`` bytes. With ``exact_needs_stop`` its
    running estimate omits the tail (the thread's VFIO case)."""

    role = "device"

    def __init__(
        self,
        name: str,
        device_id: int,
        clock: VirtualClock,
        stop_size: int,
        dirty_rate: float = 0.0,
        exact_needs_stop: bool = True,
        chunk: int = 64 << 10,
    ) -> None:
        self.name = name
        self.device_id = device_id
        self.clock = clock
        self.stop_size = stop_size
        self.dirty_rate = dirty_rate
        self.exact_needs_stop = exact_needs_stop
        self.chunk = chunk
        self.pending = 256 << 10
        self.seq = 0
        self.running = True
        self.stopped_sizings = 0
        self.aborted = False
        self.loaded: list[tuple[int, bytes, bool]] = []
        clock.on_advance(self._tick)

    def _tick(self, old: float, new: float) -> None:
        if self.running:
            self.pending += int(self.dirty_rate * (new - old))

    def setup(self, link: Any) -> None:
        pass

    def pending_estimate(self) -> int:
        tail = 0 if self.exact_needs_stop else self.stop_size
        return self.pending + tail

    def pending_exact(self, guest_stopped: bool) -> int:
        if guest_stopped:
            self.running = False
            self.stopped_sizings += 1
        return self.pending + (self.stop_size if guest_stopped or not self.exact_needs_stop else 0)

    def _emit(self, link: Any, n: int, final: bool) -> None:
        link.send_device_state(self.device_id, self.seq, bytes([self.seq & 0xFF]) * n, final)
        self.seq += 1

    def iterate(self, link: Any, budget: int) -> int:
        n = min(self.pending, budget, self.chunk)
        if n <= 0:
            return 0
        self._emit(link, n, False)
        self.pending -= n
        return n

    def quiesce(self) -> None:
        self.running = False

    def complete(self, link: Any, budget: int | None = None) -> int:
        total = self.pending + self.stop_size
        sent = 0
        while sent < total:
            n = min(self.chunk, total - sent)
            if budget is not None and sent + n > budget:
                raise OverBudget(self.name, sent + n, budget)
            self._emit(link, n, sent + n >= total)
            sent += n
        self.pending = 0
        return sent

    def resume_after_exact(self) -> None:
        self.running = True

    def abort(self) -> None:
        self.aborted = True
        self.running = True

    def stats(self) -> dict[str, Any]:
        return {"seq": self.seq}

    def load_setup(self) -> None:
        self.loaded = []

    def load_state(self, seq: int, chunk: bytes, final: bool) -> None:
        self.loaded.append((seq, chunk, final))

    def load_complete(self) -> None:
        pass

    def load_resume(self) -> None:
        pass

    def load_abort(self) -> None:
        self.aborted = True

    def precopy_initial_loaded(self) -> bool:
        return True
