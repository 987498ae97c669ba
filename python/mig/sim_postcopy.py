"""Post-copy in virtual time: the simulator's twin of ``PostcopyOutgoing``.

A simulated migration with ``postcopy`` on runs the real loop and the real
switch decision (``PostcopySwitch``, ``start_postcopy``); at the hand-over
the source asks its link for the post-copy phase (``SimLink.postcopy_outgoing``)
and gets a ``SimPostcopy`` instead of the native one. It plays both ends of
the phase as ``rust/src/postcopy/outgoing.rs`` and the destination's fault
thread do, in virtual time:

* Hand-over (inside the downtime): the stopped guest's final harvest is
  taken out unsent (``RamHandler.take_known``), the page channels are
  opened (one round trip), the destination discards the owed pages and
  registers its memory (``PostcopyCosts``).
* Unit: the destination digest's chunk (``CHUNK_PAGES`` pages of 4 KiB).
* Demand faults: the destination runs the same workload spec from its
  resume on. A vCPU writing to a page not yet placed blocks; the fault
  thread asks for each missing page once (half a round trip), even one
  whose chunk is already on its way. The source's request thread reads
  the requests one after the other and answers each on the link's next
  turn (``max_bandwidth``: every byte on either channel is charged to one
  pacer, a late turn keeping up to ``SLACK`` of the link time it missed),
  the push standing back meanwhile. The answer crosses the wire at the
  link's own rate (``physical``) after whatever is on it already, then
  half a round trip and the fault thread's service time (``fault_service``)
  until it is placed.
* Push order (``postcopy_push_order``). ``faults``: a request's chunk goes
  whole (unless already sent), then up to ``READ_AHEAD`` following owed
  chunks while both pacers have room, and the push cursor moves past them.
  ``stream``: as ``faults`` while the request is near the cursor or the
  push follows no live stream; otherwise the requested page goes alone
  (``PAGE``), the cursor stays, and its chunk stays owed, sent whole later
  (a chunk of zeros goes whole at once). Which stream the push follows is
  ``sim_fault_streams.FaultStreams``, the engine's rule.
* Background push: walks the owed chunks from the cursor, one at a time,
  paced by the link's pacer and by ``max_postcopy_bandwidth`` (0: none);
  chunks of zeros (never written) go as one ``ZERO`` run, a header's bytes.
* Figures: the destination's ``postcopy-blocktime`` (all vCPUs blocked at
  once) and ``postcopy-vcpu-blocktime`` per vCPU, fault latency p50/p99,
  requests against pushed chunks, and each side's page writes completed
  during the migration, under QEMU's names as the real ends report them
  (less what describes the host rather than the migration: ``kernel-faults``,
  ``thread-ids``, ``hole-pages``).

The vCPUs and the push are events on one time-ordered queue; a vCPU runs
until its next fault or the next event, so it sees every chunk the push
placed before its write.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mig.cli_postcopy import guest_writes
from mig.errors import MigrationEnded
from mig.sim_fault_streams import READ_AHEAD, Answer, FaultStreams

if TYPE_CHECKING:
    from mig.sim import SimLink

__all__ = ["CHUNK_PAGES", "READ_AHEAD", "PostcopyCosts", "SimPostcopy", "all_blocked"]

PAGE_SIZE = 4096
CHUNK_PAGES = 16  # chunk_digest::CHUNK_BYTES / 4 KiB
CHUNK_BYTES = CHUNK_PAGES * PAGE_SIZE
SLACK = 5e-3  # outgoing.rs: the link time a late turn may still use
PUSH, REQUEST = -1, -2  # queue events that are not a vCPU's
FRAME_HEADER = 24  # frames.rs HEADER_LEN: tag, argument, length, CRC
ZERO_RUN = 1024  # outgoing.rs MAX_ZERO_RUN
# A vCPU runs in slices that end at the next push event (it must see every
# chunk placed before its write); a slice without a fault doubles the next
# one, from MIN_SLICE up to MAX_SLICE (bounds one numpy batch).
MIN_SLICE = 1e-3
MAX_SLICE = 0.25
# A phase longer than this (a push held back, a guest that never touches
# what is owed) ends the simulated migration as failed instead of running on.
PHASE_LIMIT = 3600.0
DESTINATION_SEED = 2
SEARCH_WINDOW = 1024  # chunks: the push's first look for the next owed one


@dataclass(frozen=True)
class PostcopyCosts:
    """The host's own post-copy costs, in seconds (model estimates; the
    loopback validation in ``tests/test_sim_postcopy.py`` checks the whole)."""

    # The fault thread reads the fault, the source thread wakes, the
    # destination places the chunk (UFFDIO_COPY) and hashes it.
    fault_service: float = 50e-6
    # Discarding one owed page at the hand-over (MADV_DONTNEED / hole punch).
    discard_per_page: float = 0.1e-6
    # Opening userfaultfd, registering memory, starting the fault threads.
    register_base: float = 1e-3


class _Pacer:
    """``outgoing.rs`` ``Pacer``: bytes charged so far have their time at ``next``."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = float(rate)
        self.next = now

    def charge(self, now: float, nbytes: int) -> None:
        # A turn taken after an idle link keeps up to SLACK of the time it missed.
        if self.rate:
            self.next = max(self.next, now - SLACK) + nbytes / self.rate

    def turn(self, now: float) -> float:
        """When this pacer lets the next chunk go, ``now`` at the earliest."""
        return now if not self.rate else max(now, self.next)


class _PagesAlone:
    """Pages sent alone (``PAGE``) ahead of their chunk, and when each is
    placed: sorted, so a batch of writes is looked up at once."""

    def __init__(self) -> None:
        self.pages = np.zeros(0, dtype=np.int64)
        self.placed = np.zeros(0)

    def add(self, page: int, placed: float) -> None:
        i = int(np.searchsorted(self.pages, page))
        self.pages = np.insert(self.pages, i, page)
        self.placed = np.insert(self.placed, i, placed)

    def arrival(self, pages: np.ndarray) -> np.ndarray:
        """When each of ``pages`` is placed alone (inf: it is not)."""
        i = np.minimum(np.searchsorted(self.pages, pages), len(self.pages) - 1)
        return np.where(self.pages[i] == pages, self.placed[i], math.inf)

    def get(self, page: int) -> float:
        if not self.pages.size:
            return math.inf
        return float(self.arrival(np.array([page]))[0])


class _Vcpu:
    """One destination vCPU: its sampler, its time, its writes and blocks."""

    def __init__(self, sampler: Any, rate: float, at: float) -> None:
        self.sampler = sampler
        self.rate = rate
        self.at = at
        self.carry = 0.0
        self.slice = MIN_SLICE
        self.writes = 0
        self.blocked: list[tuple[float, float]] = []


class SimPostcopy:
    """The post-copy phase of a simulated migration (``PostcopyOutgoing``'s seams)."""

    def __init__(self, link: SimLink, max_bandwidth: int, max_push_bandwidth: int,
                 costs: PostcopyCosts | None = None) -> None:  # fmt: skip
        self.link = link
        self.clock = link.clock
        self.costs = costs or PostcopyCosts()
        self.rtt = link.model.rtt
        # The wire's own rate: requests are not paced. A host sends no
        # faster than its sender does on loopback.
        wire = link.model.throughput(link.channels, 0)
        self.physical = min(wire, link.host.loopback_bandwidth)
        self.link_pacer = _Pacer(max_bandwidth, self.clock.now())
        self.push_pacer = _Pacer(max_push_bandwidth, self.clock.now())
        self.owed_pages = 0
        self.go_at: float | None = None
        # postcopy_push_order "stream": one fault locality at a time.
        self.one_stream = False
        self.stats_: dict[str, int] = dict.fromkeys(
            ("postcopy-requests", "requested-chunks", "requested-pages", "pushed-chunks",
             "zero-chunks",
             "owed-chunks", "remaining-chunks", "postcopy-bytes"), 0,
        )  # fmt: skip
        self.destination: dict[str, Any] = {}
        self.destination_guest: dict[str, Any] = {}

    # --- PostcopyOutgoing's seams, called by the source's switchover ---
    def hand_over(self, ram: Any, link: Any) -> None:
        """Guest stopped: take the pages still owed, open the page channels;
        the destination discards them and registers its memory."""
        owed = ram.take_known()
        g = self.link.guest.memory.granularity
        units = np.asarray(owed.indices(), dtype=np.int64)
        self.owed_pages = int(len(units)) * g
        self.chunks = _owed_chunks(units, g, self.link.guest.memory.size)
        self.zero = self._zero_chunks(units, g)
        self.stats_["owed-chunks"] = self.stats_["remaining-chunks"] = int(len(self.chunks))
        c = self.costs
        self.clock.advance(self.rtt + c.register_base + c.discard_per_page * self.owed_pages)

    def _zero_chunks(self, units: np.ndarray, g: int) -> set[int]:
        """Owed chunks whose pages were never written: sent as a ``ZERO`` run."""
        pristine = self.link.guest.pristine
        if pristine is None or not len(units):
            return set()
        never = np.zeros(pristine.num_pages, dtype=bool)
        never[np.asarray(pristine.indices(), dtype=np.int64)] = True
        written = _owed_chunks(units[~never[units]], g, self.link.guest.memory.size)
        return set(np.setdiff1d(self.chunks, written).tolist())

    def start(self) -> None:
        """After ``go``: the push starts, requests are answered."""
        self.go_at = self.clock.now()

    def run(
        self, set_status: Callable[[str], None], check_cancel: Callable[[], str | None]
    ) -> None:
        """The destination runs: play the phase until the last chunk is placed."""
        now = self.clock.now()
        go = self.go_at if self.go_at is not None else now
        # "resumed" took half a round trip to come back.
        resumed = max(go, now - self.rtt / 2)
        placed = _Phase(self, go, resumed).play()
        # "placed" takes half a round trip to the source.
        self.clock.advance(max(0.0, placed + self.rtt / 2 - now))

    def recover(self, uri: str | None = None) -> None:
        raise RuntimeError("the simulator models no broken page channel: nothing to recover")

    def set_max_bandwidth(self, bytes_per_s: int) -> None:
        # A new rate applies from now: time owed at the old one is forgiven.
        self.link_pacer.rate = float(bytes_per_s)
        self.link_pacer.next = min(self.link_pacer.next, self.clock.now())

    def abort(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {**self.stats_, "chunk-pages": CHUNK_PAGES, "recoveries": 0,
                "owed-pages": self.owed_pages}  # fmt: skip

    def report(self, q: dict[str, Any]) -> dict[str, Any]:
        """What ``mig demo`` adds to the source's ``query()``: each side's guest
        writes, the destination's post-copy figures."""
        return {
            "guest": guest_writes(self.link.guest.writes, q),
            "destination-postcopy": self.destination,
            "destination-guest": self.destination_guest,
        }


def _owed_chunks(units: np.ndarray, g: int, size: int) -> np.ndarray:
    """Sorted chunk numbers covering the owed units of ``g`` pages each."""
    total = -(-size // CHUNK_BYTES)
    if g <= CHUNK_PAGES:
        chunks = units * g // CHUNK_PAGES
    else:
        per = g // CHUNK_PAGES
        chunks = (units[:, None] * per + np.arange(per)[None, :]).ravel()
    return np.unique(chunks[chunks < total])


class _Phase:
    """One post-copy phase as a queue of events: the push, each vCPU and
    each request as the source's request thread reads it."""

    def __init__(self, pc: SimPostcopy, go: float, resumed: float) -> None:
        from mig.sim import _Sampler  # noqa: PLC0415 - the guest's own samplers

        self.pc = pc
        guest = pc.link.guest
        total = -(-guest.memory.size // CHUNK_BYTES)
        # When each chunk is placed: 0 held, inf owed and not yet sent.
        self.arrive = np.zeros(total)
        self.arrive[pc.chunks] = math.inf
        self.owed = np.zeros(total, dtype=bool)
        self.owed[pc.chunks] = True
        self.alone = _PagesAlone()
        self.left = len(pc.chunks)
        self.cursor = 0
        self.wire_free = go  # both channels share the wire
        self.last_placed = go
        self.latencies: list[float] = []
        self.faults = 0
        self.resumed = resumed
        # The destination's fault thread asks for each page once; vCPUs
        # blocked on a page whose answer is not sent yet, by page.
        self.requested: set[int] = set()
        self.waiting: dict[int, list[int]] = {}
        # The source's request thread: busy until, and the stream the push
        # follows (outgoing.rs ``FaultStreams``).
        self.requests_free = go
        self.streams = FaultStreams()
        self.request_times: list[float] = []  # pending request events
        spec = guest.spec
        wss = (spec.wss or guest.memory.size) // PAGE_SIZE
        # The destination's own stream of random pages, the same every run.
        rng = np.random.default_rng(DESTINATION_SEED)
        rate = guest.base_rate() / guest.vcpus
        self.vcpus = [
            _Vcpu(_Sampler(spec, wss, v, guest.vcpus, 1, rng), rate, resumed)
            for v in range(guest.vcpus)
        ]
        # (time, seq, who, page): who a vCPU, PUSH or REQUEST (for page).
        self.queue: list[tuple[float, int, int, int]] = [(go, 0, PUSH, -1)]
        self.push_at = go  # the next push event, inf once the push is done
        self.seq = 1
        self.go = go
        if rate > 0:
            for v in range(len(self.vcpus)):
                self._at(resumed, v)

    def _at(self, t: float, who: int, page: int = -1) -> None:
        if who == PUSH:
            self.push_at = t
        elif who == REQUEST:
            heapq.heappush(self.request_times, t)
        heapq.heappush(self.queue, (t, self.seq, who, page))
        self.seq += 1

    # --- the wire ---
    def _write(self, t: float, nbytes: int) -> float:
        """A frame written at ``t`` (after what is on the wire), charged to the
        link's pacer as it is written; returns when it has left."""
        start = max(t, self.wire_free)
        self.wire_free = start + nbytes / self.pc.physical
        self.pc.stats_["postcopy-bytes"] += nbytes
        self.pc.link_pacer.charge(self.wire_free, nbytes)
        return self.wire_free

    def _send(self, t: float, chunks: list[int], nbytes: int, service: float = 0.0) -> float:
        """``chunks`` leave at ``t``; returns when they are placed (half a
        round trip and ``service`` later)."""
        placed = self._write(t, nbytes) + self.pc.rtt / 2 + service
        for c in chunks:
            self.arrive[c] = placed
            self.owed[c] = False
        self.left -= len(chunks)
        self.pc.stats_["remaining-chunks"] = self.left
        self.last_placed = max(self.last_placed, placed)
        self._wake(lambda p: chunks[0] <= p // CHUNK_PAGES <= chunks[-1], placed)
        return placed

    def _send_page(self, t: float, page: int) -> None:
        """Requested ``page`` alone (``PAGE``): its chunk stays owed."""
        placed = self._write(t, PAGE_SIZE + FRAME_HEADER) + self.pc.rtt / 2
        placed += self.pc.costs.fault_service
        self.alone.add(page, placed)
        self.pc.stats_["requested-pages"] += 1
        self._wake(lambda p: p == page, placed)

    def _wake(self, covers: Callable[[int], bool], placed: float) -> None:
        """The vCPUs blocked on a page now on its way run again once it is placed."""
        for page in [p for p in self.waiting if covers(p)]:
            for v in self.waiting.pop(page):
                self._resume(v, placed)

    def _wire_bytes(self, c: int) -> int:
        return FRAME_HEADER + (8 if c in self.pc.zero else CHUNK_BYTES)

    def _next_owed(self) -> int | None:
        """The first owed chunk from the cursor on, wrapping around; looked
        for in growing windows (the next one is usually close by)."""
        if not self.left:
            return None
        n = len(self.owed)
        for lo, hi in ((self.cursor, n), (0, self.cursor)):
            width = SEARCH_WINDOW
            while lo < hi:
                window = self.owed[lo : min(hi, lo + width)]
                if window.any():
                    return lo + int(np.argmax(window))
                lo += width
                width *= 2
        return None

    # --- the push ---
    def _push(self, t: float) -> None:
        pc = self.pc
        ready = pc.push_pacer.turn(pc.link_pacer.turn(t))
        if ready > t:
            self._at(ready, PUSH)
            return
        self.push_at = math.inf
        c = self._next_owed()
        if c is None:
            return
        run = [c]
        if c in pc.zero:
            while (
                len(run) < ZERO_RUN
                and c + len(run) < len(self.owed)
                and (self.owed[c + len(run)] and c + len(run) in pc.zero)
            ):
                run.append(c + len(run))
        nbytes = FRAME_HEADER + (8 if c in pc.zero else CHUNK_BYTES)
        self._send(t, run, nbytes)
        pc.push_pacer.charge(self.wire_free, nbytes)
        pc.stats_["pushed-chunks"] += len(run)
        if c in pc.zero:
            pc.stats_["zero-chunks"] += len(run)
        self.cursor = c + len(run)
        if self.left:
            self._at(max(t, self.wire_free), PUSH)

    # --- a request, as outgoing.rs ``serve_requests`` reads it ---
    def _request(self, t: float, page: int) -> None:
        """The request for ``page`` reaches the source's request thread at ``t``."""
        heapq.heappop(self.request_times)
        if t < self.requests_free:  # the thread still serves the one before
            self._at(self.requests_free, REQUEST, page)
            return
        pc = self.pc
        pc.stats_["postcopy-requests"] += 1
        c = page // CHUNK_PAGES
        if pc.one_stream and self.streams.answer(c, self.cursor, t) is Answer.PAGE_ALONE:
            # Its page alone on the link's next turn; the cursor stays.
            turn = pc.link_pacer.turn(t)
            sent = bool(self.owed[c])
            if self.owed[c] and c in pc.zero:  # a chunk of zeros goes whole
                self._send(turn, [c], self._wire_bytes(c), pc.costs.fault_service)
                pc.stats_["requested-chunks"] += 1
            elif self.owed[c]:
                self._send_page(turn, page)
            self.requests_free = max(turn, self.wire_free) if sent else turn
            return
        now = t
        if self.owed[c]:  # on the link's next turn, the push standing back
            self._send(pc.link_pacer.turn(t), [c], self._wire_bytes(c), pc.costs.fault_service)
            pc.stats_["requested-chunks"] += 1
            now = self.wire_free
        self.cursor = self._read_ahead(now, c)
        if pc.one_stream:
            self.streams.took_cursor(c, self.cursor, t)
        self.requests_free = now

    def _read_ahead(self, t: float, c: int) -> int:
        """Owed chunks after ``c`` while both pacers have room; the first not sent."""
        pc, nxt = self.pc, c + 1
        while nxt < len(self.owed) and nxt <= c + READ_AHEAD:
            room = pc.link_pacer.turn(t) <= t and pc.push_pacer.turn(t) <= t
            if not room or not self.owed[nxt]:
                break
            nbytes = self._wire_bytes(nxt)
            self._send(t, [nxt], nbytes)
            t = self.wire_free
            pc.push_pacer.charge(t, nbytes)
            pc.stats_["pushed-chunks"] += 1
            nxt += 1
        return nxt

    # --- a vCPU ---
    def _resume(self, v: int, placed: float) -> None:
        """vCPU ``v``, blocked since its fault, runs again at ``placed``."""
        cpu = self.vcpus[v]
        self.latencies.append(placed - cpu.at)
        cpu.blocked.append((cpu.at, placed))
        cpu.at = placed
        self._at(placed, v)

    def _run_vcpu(self, v: int, until: float) -> None:
        cpu = self.vcpus[v]
        n = int((until - cpu.at) * cpu.rate + cpu.carry)
        if n <= 0:
            cpu.carry += (until - cpu.at) * cpu.rate
            cpu.at = until
            self._at(until, v)
            return
        sampler = cpu.sampler
        start = sampler.next
        pages = sampler.sample(n)
        times = cpu.at + (np.arange(n) + 1 - cpu.carry) / cpu.rate
        waits = self.arrive[pages // CHUNK_PAGES] > times
        if waits.any() and self.alone.pages.size:
            at = np.flatnonzero(waits)
            waits[at] = self.alone.arrival(pages[at]) > times[at]
        if not waits.any():
            cpu.slice = min(MAX_SLICE, cpu.slice * 2)
            cpu.writes += n
            cpu.carry = (until - cpu.at) * cpu.rate + cpu.carry - n
            cpu.at = until
            self._at(until, v)
            return
        k = int(np.argmax(waits))
        cpu.writes += k
        if sampler.spec.pattern == "sequential":
            sampler.next = (start + k) % sampler.len  # the faulting write is retried
        self._fault(v, float(times[k]), int(pages[k]))

    def _fault(self, v: int, fault: float, page: int) -> None:
        """vCPU ``v`` blocks on missing ``page``; the fault thread asks for it
        once (half a round trip to the source)."""
        cpu = self.vcpus[v]
        self.faults += 1
        cpu.carry = 0.0
        cpu.slice = MIN_SLICE
        cpu.at = fault
        if page not in self.requested:
            self.requested.add(page)
            self._at(fault + self.pc.rtt / 2, REQUEST, page)
        placed = min(float(self.arrive[page // CHUNK_PAGES]), self.alone.get(page))
        if math.isinf(placed):
            self.waiting.setdefault(page, []).append(v)
        else:
            self._resume(v, placed)

    def play(self) -> float:
        """Run the phase; returns when the destination placed the last chunk."""
        while self.queue:
            t, _, who, page = heapq.heappop(self.queue)
            done = self.left == 0
            if done and t >= self.last_placed:
                break
            if t - self.go > PHASE_LIMIT:
                raise MigrationEnded(
                    "failed", f"simulated post-copy phase longer than {PHASE_LIMIT:.0f} s"
                )
            if who == PUSH:
                self._push(t)
                continue
            if who == REQUEST:
                self._request(t, page)
                continue
            # A vCPU runs until the next event that can place a chunk.
            sends = min(self.push_at, self.request_times[0] if self.request_times else math.inf)
            horizon = min(t + self.vcpus[who].slice, max(sends, t + 1e-9))
            if done:
                horizon = min(horizon, self.last_placed)
            self._run_vcpu(who, max(horizon, t))
        end = self.last_placed
        self._figures(end)
        return end

    def _figures(self, end: float) -> None:
        pc = self.pc
        blocked = [[(a, min(b, end)) for a, b in cpu.blocked if a < end] for cpu in self.vcpus]
        lat = np.array(self.latencies) * 1e3
        pages = int(pc.owed_pages)
        zero_pages = min(pages, len(pc.zero) * CHUNK_PAGES)
        pc.destination = {
            "postcopy-requests": pc.stats_["postcopy-requests"],
            "postcopy-faults": self.faults,
            "pages-placed": pages - zero_pages,
            "zero-pages-placed": zero_pages,
            "already-present": 0,
            "pages-discarded": pages,
            "faults-resolved": self.faults,
            "fault-latency-p50": float(np.percentile(lat, 50)) if len(lat) else None,
            "fault-latency-p99": float(np.percentile(lat, 99)) if len(lat) else None,
            "postcopy-blocktime": all_blocked(blocked) * 1e3 if self.faults else None,
            "postcopy-vcpu-blocktime": {
                v: sum(b - a for a, b in iv) * 1e3 for v, iv in enumerate(blocked)
            },
            "owed-chunks": pc.stats_["owed-chunks"],
            "placed-chunks": pc.stats_["owed-chunks"] - self.left,
            "duplicate-chunks": 0,  # each chunk leaves the owed set once
            "postcopy-bytes": pc.stats_["postcopy-bytes"],
            "recoveries": 0,
        }
        guest = pc.link.guest
        seconds = max(0.0, end - self.resumed)
        writes = sum(cpu.writes for cpu in self.vcpus)
        pc.destination_guest = {
            "workload": guest.workload,
            "vcpus": guest.vcpus,
            "writes-during-migration": writes,
            "seconds-during-migration": seconds,
            "writes-per-second": writes / seconds if seconds > 0 else 0.0,
        }


def all_blocked(per_vcpu: list[list[tuple[float, float]]]) -> float:
    """Seconds during which every vCPU was blocked at once (QEMU's
    ``postcopy-blocktime``): a sweep over the intervals' ends."""
    if not per_vcpu or any(not iv for iv in per_vcpu):
        return 0.0
    events = sorted(
        [(a, 1) for iv in per_vcpu for a, _ in iv] + [(b, -1) for iv in per_vcpu for _, b in iv]
    )
    n, depth, since, total = len(per_vcpu), 0, 0.0, 0.0
    for t, step in events:
        if depth == n:
            total += t - since
        depth += step
        since = t
    return total
