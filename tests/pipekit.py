"""An in-process session with the native ``Sender``/``Receiver`` method names,
for running ``MigrationSource`` and ``MigrationDestination`` on two threads in
real time. Pages are copied straight into the destination memory; the end
record's digest is checked like the native receiver does."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np

from mig import DirtyBitmap, GuestMemory, ProtocolError


class Pipe:
    def __init__(self, src: GuestMemory, dst: GuestMemory) -> None:
        self.src, self.dst = src, dst
        self.to_dst: queue.Queue[bytes] = queue.Queue()
        self.to_src: queue.Queue[bytes] = queue.Queue()
        self.records: list[tuple[int, int, bytes, bool]] = []
        self.lock = threading.Lock()
        self.end = threading.Event()
        self.digest: int | None = None
        self.aborted = False
        self.sender = PipeSender(self)
        self.receiver = PipeReceiver(self)


def _get(q: queue.Queue[bytes], timeout: float, pipe: Pipe) -> bytes | None:
    if pipe.aborted:
        raise OSError("session aborted")
    try:
        return q.get(timeout=timeout) if timeout else q.get_nowait()
    except queue.Empty:
        return None


class PipeSender:
    def __init__(self, pipe: Pipe) -> None:
        self.p = pipe
        self.cap = 0
        self._src = pipe.src.array.reshape(pipe.src.num_pages, pipe.src.page_size)
        self._dst = pipe.dst.array.reshape(pipe.dst.num_pages, pipe.dst.page_size)

    def send_pages(self, bitmap: DirtyBitmap, generation: int) -> int:
        if self.p.aborted:
            raise OSError("session aborted")
        t0 = time.monotonic()
        idx = bitmap.indices().astype(np.int64)
        self._dst[idx] = self._src[idx]
        n = len(idx) * (self.p.src.page_size + 16)
        if self.cap:
            time.sleep(max(0.0, n / self.cap - (time.monotonic() - t0)))
        return n

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
        with self.p.lock:
            self.p.records.append((device_id, seq, bytes(data), final))

    def sync(self, generation: int) -> None:
        pass

    def finish(self, digest: int) -> None:
        self.p.digest = digest
        self.p.end.set()

    def control_send(self, data: bytes) -> None:
        self.p.to_dst.put(data)

    def control_recv(self, timeout: float) -> bytes | None:
        return _get(self.p.to_src, timeout, self.p)

    def set_max_bandwidth(self, bytes_per_s: int) -> None:
        self.cap = bytes_per_s

    def stats(self) -> dict[str, Any]:
        return {}

    def abort(self) -> None:
        self.p.aborted = True

    def close(self) -> None:
        pass


class PipeReceiver:
    def __init__(self, pipe: Pipe) -> None:
        self.p = pipe

    def control_send(self, data: bytes) -> None:
        self.p.to_src.put(data)

    def control_recv(self, timeout: float) -> bytes | None:
        return _get(self.p.to_dst, timeout, self.p)

    def device_records(self) -> list[tuple[int, int, bytes, bool]]:
        with self.p.lock:
            out, self.p.records = self.p.records, []
        return out

    def wait_end(self, timeout: float, verify: bool = True) -> dict[str, Any]:
        if not self.p.end.wait(timeout):
            raise TimeoutError("no end record")
        root = self.p.dst.digest()
        if verify and root != self.p.digest:
            raise ProtocolError("digest mismatch")
        return {"digest": root}

    def stats(self) -> dict[str, Any]:
        return {}

    def abort(self) -> None:
        self.p.aborted = True


class ThreadGuest:
    """One vCPU thread writing ``rate`` random pages/s into memory."""

    def __init__(self, memory: GuestMemory, tracker: Any, rate: float, seed: int = 3) -> None:
        self.memory = memory
        self.tracker = tracker
        self.rate = rate
        self.throttle = 0.0
        self.dirty_limit = 0.0
        self._run = threading.Event()
        self._parked = threading.Event()
        self._stop = False
        self._rng = np.random.default_rng(seed)
        self._pages = memory.array.reshape(memory.num_pages, memory.page_size)
        self._run.set()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        n = 0
        while not self._stop:
            if not self._run.is_set():
                self._parked.set()
                self._run.wait()
                continue
            self._parked.clear()
            rate = self.rate * (1 - self.throttle)
            if rate <= 0:
                time.sleep(0.01)
                continue
            pages = self._rng.integers(0, self.memory.num_pages, 16)
            n += 1
            self._pages[pages, 0] = n & 0xFF
            self.tracker.mark(pages)
            time.sleep(16 / rate)

    @property
    def running(self) -> bool:
        return self._run.is_set()

    def pause(self) -> float:
        t0 = time.monotonic()
        self._parked.clear()
        self._run.clear()
        self._parked.wait(1.0)
        return time.monotonic() - t0

    def resume(self) -> None:
        self._run.set()

    def set_throttle(self, pct: float) -> None:
        self.throttle = pct

    def set_dirty_limit(self, rate: float) -> None:
        self.dirty_limit = rate

    def close(self) -> None:
        self._stop = True
        self._run.set()
        self._t.join()
