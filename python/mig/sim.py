"""Virtual-time simulation of a migration on the real loop, policies and devices.

``simulate(SimConfig(...))`` builds a ``MigrationSource`` with a
``VirtualClock``, a simulated guest (``SimGuest``), a tracker over it
(``SimTracker``) and a simulated network (``SimLink``), and runs the loop on
the calling thread. The orchestrator loop, the policy objects and the device
handlers (``mig.device_handler.DeviceHandler`` over the sample devices of
``mig.devices``, driven by the clock instead of worker threads) and the
destination's protocol (``mig.destination_core``) are the ones real
migrations use; only the guest, the tracker, the network and the
destination's timing are models.

Models:

* Guest: the workload specs of ``WorkloadGuest`` (same grammar, same
  samplers: sequential sweep per vCPU, uniform, hot set, Zipf), writing pages
  as virtual time passes, at the spec rate times ``1 - throttle``, capped by
  the dirty limit. ``rate=max`` uses ``HostModel.max_rate_per_vcpu``. Pages
  written after their last send and before the final sync are re-sent;
  pages never written are zero pages (cheap on the wire, as the sender
  separates them). The copy verifies only if nothing wrote guest memory
  after the final sync (a device whose DMA was not quiesced, for one).
* Scale: page-level up to ``PAGE_LEVEL_LIMIT`` (64 GiB of 4 KiB pages).
  Beyond, the aggregated model tracks ``granularity`` pages as one unit and
  thins the writes by the same factor, which keeps the expected dirty bytes
  of uniform, hot-set and sequential writers exact (a unit is dirty with the
  probability of any of its pages); for Zipf writers it overstates the
  dirty bytes of hot units. ``benches/bench_sim.py`` measures the error
  against the page-level model.
* Network: ``channels`` parallel channels, each limited to
  ``channel_bandwidth`` and to ``window / rtt`` (a TCP window per round
  trip), sharing a ``bottleneck``; ``max_bandwidth`` caps the total through
  the sender's token bucket (``mig.sim_bucket``: a sender that went slower
  than the cap, idle or busy, piles up ``BURST_SECONDS`` of the cap in
  tokens, and the bytes they cover leave at the link's own pace). Wire
  bytes follow the stream format: a 48-byte header per packet of up to
  ``packet_pages`` pages, 8 bytes per page offset, page payload only for
  non-zero pages; a device chunk costs a record header plus its bytes.
  Control messages take half a round trip each way, plus the host's
  ``control_latency``; the switchover takes two (``complete``/``ready``,
  then ``go``/``resumed``).
* Host costs (``HostModel``): memory digest rate (with ``verify`` strict the
  switchover digests all of RAM on both sides, the source's digest
  overlapping its stop-copy sends as a real source digests on another
  thread; otherwise the source digests after the destination resumed, and
  the destination's root before ``ready``, and at ``settle``, costs
  nothing: its receive path hashes every page as it lands, ``mig.sim_receive``,
  so the root only sums chunk terms), the setup before the first pass
  (tracker registration per page, the destination's answer to hello:
  ``mig.sim_setup``), the sender's page-table reads over holes amid data
  (``mig.sim_holes``), the sender's time per zero page in the final pass
  (``mig.sim_final_pass``), tracker sync cost (a base, a scan per guest page, a
  harvest per dirty page), vCPU stop latency, the rates at which device
  state is produced, decoded and hashed (only the stop-copy bytes, sent
  after ``switchover``, are loaded inside the downtime:
  ``mig.sim_devices``) and what the engine's link adds to them on both
  sides (``mig.sim_device_link``), the destination's loop, which takes in
  and loads precopy device records between control messages and
  acknowledges the switchover only once the initial data is loaded
  (``mig.sim_dest_loop``), what a control
  round trip costs beyond the link's RTT (``mig.sim_handshake``) and the
  pace at which the destination takes in what the channels hold
  (``mig.sim_receive``: ``settle`` and the ``drain`` term wait for it).
  ``HostModel.calibrate()`` measures them on this host;
  ``save_host_model``/``load_host_model`` keep them for ``--simulate``.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mig._mig import DirtyBitmap
from mig.clock import VirtualClock
from mig.destination_core import (
    AnswerPass,
    DestinationCore,
    Effect,
    FinishStopCopy,
    Resume,
    Send,
    SettleChannels,
)
from mig.device_handler import FLAG_INIT_DONE, DeviceHandler
from mig.devices import MigCap, create_all
from mig.errors import MigrationEnded
from mig.policies import DEFAULT_POLICY
from mig.protocol import (
    Failed,
    Message,
    PassAck,
    Settled,
    Switchover,
    SwitchoverAbort,
)
from mig.reorder import DeviceRecord
from mig.sim_bookkeeping import sync_bookkeeping_seconds
from mig.sim_bucket import SimBucket
from mig.sim_contention import contended, load_contention
from mig.sim_dest_loop import DestinationLoop
from mig.sim_device_link import device_link_costs, receive_seconds, send_seconds
from mig.sim_device_tick import device_tick_seconds
from mig.sim_devices import (
    decode_seconds,
    device_costs,
    hash_seconds,
    production_seconds,
)
from mig.sim_final_pass import final_pass_seconds_per_page
from mig.sim_handshake import control_costs
from mig.sim_holes import asked_hole_packets, hole_query_seconds
from mig.sim_receive import ChannelBacklog, receive_rate, socket_buffer_bytes
from mig.sim_setup import mapped_pages, register_seconds_per_page, setup_seconds
from mig.sim_warmup import warmup_costs
from mig.stats import WINDOW
from mig.units import parse_rate, parse_size

__all__ = [
    "PAGE_LEVEL_LIMIT",
    "HostModel",
    "LinkModel",
    "SimConfig",
    "SimGuest",
    "SimLink",
    "SimMemory",
    "SimTracker",
    "WorkloadSpec",
    "host_model_path",
    "load_host_model",
    "save_host_model",
    "parse_workload",
    "simulate",
]

PAGE_SIZE = 4096
PAGE_LEVEL_LIMIT = 64 << 30
# Units the aggregated model tracks beyond PAGE_LEVEL_LIMIT (4 Mi: 512 KiB bitmaps).
AGGREGATED_UNITS = 1 << 22
RECORD_HEADER = 48  # wire.rs RECORD_HEADER_LEN
OFFSET_BYTES = 8
JITTER_WINDOW = WINDOW  # s: the bandwidth meter's window, one link state per window


# --------------------------------------------------------------- workloads
@dataclass(frozen=True)
class WorkloadSpec:
    """A parsed workload spec (``rust/src/workload.rs`` grammar)."""

    pattern: str
    wss: int | None = None  # bytes, None: all memory
    rate: float | None = None  # guest-wide page writes/s, None: max
    hot: float = 0.1
    hotprob: float = 0.9
    s: float = 1.1


_FIELDS = {
    "idle": (),
    "sequential": ("wss", "rate"),
    "uniform": ("wss", "rate"),
    "hotset": ("wss", "rate", "hot", "hotprob"),
    "zipf": ("wss", "rate", "s"),
}


def _wl_size(text: str) -> int:
    m = text.strip()
    digits = len(m) - len(m.lstrip("0123456789"))
    num, unit = m[:digits], m[digits:].strip().lower()
    if not num:
        raise ValueError(f"workload field wss: {text!r} is not a size (expected e.g. 256MiB)")
    mult = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
            "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
            "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}.get(unit)  # fmt: skip
    if mult is None:
        raise ValueError(f"workload field wss: {text!r} has an unknown unit {unit!r}")
    return int(num) * mult


def _fraction(key: str, v: str, open_low: bool) -> float:
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"workload field {key}={v}: not a number") from None
    ok = 0 < x < 1 if open_low else 0 <= x <= 1
    if not ok:
        raise ValueError(
            f"workload field {key}={v}: must lie in {'(0, 1)' if open_low else '[0, 1]'}"
        )
    return x


def parse_workload(text: str) -> WorkloadSpec:
    """Parse ``PATTERN[:key=value,...]`` exactly as the native ``WorkloadGuest`` does."""
    text = text.strip()
    name, _, rest = text.partition(":")
    if name not in _FIELDS:
        raise ValueError(
            f"unknown workload {name!r} (expected idle, sequential, uniform, hotset, zipf)"
        )
    allowed = _FIELDS[name]
    kw: dict[str, Any] = {}
    for item in (i.strip() for i in rest.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"workload field {item!r} is not key=value")
        k, v = (x.strip() for x in item.split("=", 1))
        if k not in allowed:
            raise ValueError(
                f"workload {name} has no field {k!r} (fields: {', '.join(allowed) or 'none'})"
            )
        if k == "wss":
            kw["wss"] = _wl_size(v)
            if kw["wss"] == 0:
                raise ValueError("workload field wss=0: must be positive")
        elif k == "rate":
            if v == "max":
                kw["rate"] = None
            else:
                try:
                    r = float(v)
                except ValueError:
                    raise ValueError(
                        f"workload field rate={v}: expected page writes/s or 'max'"
                    ) from None
                if not (math.isfinite(r) and r > 0):
                    raise ValueError(f"workload field rate={v}: must be positive or 'max'")
                kw["rate"] = r
        elif k in ("hot", "hotprob"):
            kw[k] = _fraction(k, v, k == "hot")
        else:
            try:
                s = float(v)
            except ValueError:
                s = -1.0
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"workload field s={v}: must be positive")
            kw["s"] = s
    return WorkloadSpec(name, **kw)


class _Sampler:
    """Pages one vCPU writes, in 4 KiB page numbers, ``stride`` writes per sample."""

    def __init__(self, spec: WorkloadSpec, wss: int, vcpu: int, vcpus: int, stride: int,
                 rng: np.random.Generator) -> None:  # fmt: skip
        self.spec, self.wss, self.stride, self.rng = spec, wss, stride, rng
        lo, hi = wss * vcpu // vcpus, wss * (vcpu + 1) // vcpus
        self.lo, self.len = (lo, hi - lo) if hi > lo else (0, wss)
        self.next = 0
        self.hot = min(max(round(wss * spec.hot), 1), wss)
        if spec.pattern == "zipf":
            self._zipf_setup(spec.s)

    _HEAD = 1 << 20

    def _zipf_setup(self, s: float) -> None:
        # Exact weights for the first ranks, the integral of x^-s for the tail.
        head = min(self.wss, self._HEAD)
        w = np.arange(1, head + 1, dtype=np.float64) ** -s
        self.cdf = np.cumsum(w)
        head_mass = float(self.cdf[-1])
        self.cdf /= head_mass
        a, b = head + 0.5, self.wss + 0.5
        tail = self._integral(a, b, s) if self.wss > head else 0.0
        self.p_head = head_mass / (head_mass + tail)
        self.a, self.b, self.s = a, b, s

    @staticmethod
    def _integral(a: float, b: float, s: float) -> float:
        if abs(s - 1) < 1e-12:
            return math.log(b / a)
        return (b ** (1 - s) - a ** (1 - s)) / (1 - s)

    def _tail(self, u: np.ndarray) -> np.ndarray:
        a, b, s = self.a, self.b, self.s
        if abs(s - 1) < 1e-12:
            x = a * (b / a) ** u
        else:
            x = (a ** (1 - s) + u * (b ** (1 - s) - a ** (1 - s))) ** (1 / (1 - s))
        return np.clip(np.floor(x + 0.5).astype(np.int64), 1, self.wss)

    def sample(self, n: int) -> np.ndarray:
        p, rng = self.spec.pattern, self.rng
        if p == "sequential":
            pos = (self.next + self.stride * np.arange(n, dtype=np.int64)) % self.len
            self.next = int((self.next + self.stride * n) % self.len)
            return self.lo + pos
        if p == "uniform":
            return rng.integers(0, self.wss, n)
        if p == "hotset":
            if self.hot == self.wss:
                return rng.integers(0, self.hot, n)
            k = int(rng.binomial(n, self.spec.hotprob))
            return np.concatenate(
                [rng.integers(0, self.hot, k), rng.integers(self.hot, self.wss, n - k)]
            )
        if p == "zipf":
            head = rng.random(n) < self.p_head
            out = np.empty(n, dtype=np.int64)
            nh = int(head.sum())
            out[head] = np.searchsorted(self.cdf, rng.random(nh), side="right") + 1
            if n - nh:
                out[~head] = self._tail(rng.random(n - nh))
            return np.minimum(out, self.wss) - 1
        return np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------ models
@dataclass(frozen=True)
class HostModel:
    """Costs of the host's own work, in seconds or bytes/s."""

    digest_rate: float = 8e9  # bytes/s of GuestMemory.digest
    sync_base: float = 30e-6  # s per tracker sync
    sync_per_page: float = 0.5e-9  # s per guest page scanned by a sync
    sync_per_dirty_page: float = 0.0  # s per dirty page harvested (and re-protected)
    pause_latency: float = 100e-6  # s until every vCPU is parked
    device_rate: float = 1e9  # bytes/s a device handler produces stop-copy state
    device_load_rate: float = 1e9  # bytes/s the destination decodes it
    load_base: float = 0.005  # s the destination needs to finish loading and resume
    drain_base: float = 0.001  # s it waits for the end records once "complete" is in
    max_rate_per_vcpu: float = 2e6  # page writes/s of a rate=max vCPU
    send_per_page: float = 0.0  # s of sender CPU per zero page (found and skipped)
    # The same in the final pass, sent in large chunks with no decision
    # between them (``mig.sim_final_pass``); 0: ``send_per_page``.
    final_per_page: float = 0.0
    # Relative standard deviation of the link's throughput from one 100 ms
    # window to the next. A real link varies (scheduling, TCP, the token
    # bucket); the loop plans with the estimate less two deviations, so a
    # link that never varies would switch over earlier than a real one.
    link_jitter: float = 0.0
    # Seconds between a sample device's writes (``mig.sim_device_tick``);
    # 0: the device's own tick.
    device_tick: float = 0.0
    # How long a zeroed guest's workload runs before its migration starts:
    # ``mig demo`` builds the guest while its destination process starts and
    # populates its memory, and the source starts only once that is ready.
    # The pages written meanwhile hold data; the rest still go out as zero
    # pages. A base plus a share per byte of guest memory (the preallocation).
    warmup_base: float = 0.75
    warmup_per_byte: float = 0.85e-9
    # ``mig demo`` without --max-bandwidth migrates over this host's
    # loopback as fast as the sender goes: the wire's rate (data pages
    # included), plus the sender's time per zero page (telling it from data)
    # that a capped link hides behind its pacing.
    loopback_bandwidth: float = 5.2e8
    loopback_per_page: float = 1e-6
    loopback_final_per_page: float = 0.0  # ``final_per_page`` on the loopback
    # Setup before the first pass (``mig.sim_setup``): the tracker's
    # registration per guest page, and the channels' connection with the
    # destination's answer to hello.
    register_per_page: float = 3e-8
    setup_base: float = 0.005
    # What the loopback's first pass costs besides its pages: the stream's
    # start (``LinkModel.stream_start`` of ``mig demo --simulate``).
    loopback_stream_start: float = 0.0
    # Sender's seconds per packet that reads the page tables over holes
    # (a zero page amid data, ``mig.sim_holes``).
    hole_query: float = 2e-4
    # Switchover terms (``mig.sim_devices``, ``mig.sim_handshake``): the xxh3
    # rate of a device's END record digest, its cells' hashes combined
    # (source, ``device-state``; its validation, destination, ``load``),
    # bytes/s; the seconds per record of its stream produced (on top of
    # ``device_rate``) and decoded (on top of ``device_load_rate``); and what
    # a control round trip costs
    # beyond the link's RTT (both ends' message handling, the destination's
    # wake-up), added to every control reply (``handshake``).
    device_hash_rate: float = 8e9
    # A record every channel writes, waited for (a pass's sync, the end
    # records): the hand-off to each channel's thread and back
    # (``mig.sim_handshake``).
    broadcast_seconds: float = 0.0
    device_record_seconds: float = 0.0
    device_load_record_seconds: float = 0.0
    # What the engine's link adds to a device's stop-copy state
    # (``mig.sim_device_link``): per device and switchover, and per byte,
    # at the source (``device-state``) and at the destination (``load``).
    device_stop_seconds: float = 0.0
    device_send_per_byte: float = 0.0
    device_load_seconds: float = 0.0
    device_receive_per_byte: float = 0.0
    control_latency: float = 0.0
    # The destination's receive side (``mig.sim_receive``), which the
    # ``drain`` term and ``settle``'s wait pay for: the bytes/s it takes in
    # (0: pages land as they are charged) and the bytes one channel's
    # sockets hold (0: no bound).
    receive_rate: float = 0.0
    channel_buffer: float = 0.0
    # How much slower the destination's loop takes in and loads precopy
    # device records while the source's precopy shares the host with it
    # (``mig.sim_contention``); 1: none measured.
    device_load_contention: float = 1.0
    # The source loop's work after each sync: the pass recorded and
    # announced, the monitor fed, the policy asked (``mig.sim_bookkeeping``).
    sync_bookkeeping: float = 0.0

    def warmup(self, memory: int) -> float:
        """Seconds a ``memory``-byte guest runs before its migration starts."""
        return self.warmup_base + self.warmup_per_byte * memory

    @classmethod
    def calibrate(
        cls, size: int = 64 << 20, switchover: tuple[int, float] | None = None
    ) -> HostModel:
        """Measure the costs on this host (a few seconds): the digest rate,
        the tracker migrations use on real dirty pages (``_tracker_costs``),
        a sample device's stop-copy production, decoding and hash rates
        (``mig.sim_devices.device_costs``), vCPU stop latency, the guest's
        maximum write rate.

        ``switchover=(memory, max_bandwidth)`` also measures ``load_base``
        and ``drain_base``: the destination's switchover time beyond its
        digest, from three real loopback migrations of an idle guest of that
        size at that cap (what the destination does after the source's last
        byte: wait for the end records, then validate and resume; it grows
        with the host's load), and from real migrations to ``mig demo``'s
        destination its guest's warm-up (``mig.sim_warmup``), the loopback
        (``_loopback_costs``), the sender's reads over holes
        (``hole_query_seconds``), ``control_latency``
        (``mig.sim_handshake``), the destination's receive rate
        (``mig.sim_receive.receive_rate``) and how much slower its loop
        loads precopy device records beside the source's precopy
        (``mig.sim_contention.load_contention``)."""
        from mig._mig import GuestMemory  # noqa: PLC0415

        mem = GuestMemory(size)
        mem.array[:] = 1
        t = _best(lambda: mem.digest(), 3)
        digest_rate = size / t
        sync_base, sync_per_page, sync_per_dirty_page = _tracker_costs(mem)
        devices = {**device_costs(), "device_tick": device_tick_seconds()}
        pause_latency, writes = _vcpu_costs(mem)
        load_base, drain_base, link_jitter = cls.load_base, cls.drain_base, cls.link_jitter
        warmup_base, warmup_per_byte = cls.warmup_base, cls.warmup_per_byte
        loopback_bandwidth, loopback_per_page = cls.loopback_bandwidth, cls.loopback_per_page
        stream_start, hole_query = cls.loopback_stream_start, cls.hole_query
        setup_base, control, receive = cls.setup_base, cls.control_latency, cls.receive_rate
        broadcast = cls.broadcast_seconds
        register_per_page = register_seconds_per_page()
        if switchover is not None:
            control, broadcast = control_costs(*switchover)
            load_base, drain_base, link_jitter, setup = _switchover_load(digest_rate, *switchover)
            setup_base = max(0.0, setup - register_per_page * switchover[0] / PAGE_SIZE)
            warmup_base, warmup_per_byte = warmup_costs()
            loopback_bandwidth, loopback_per_page, stream_start = _loopback_costs()
            hole_query = hole_query_seconds()
            receive = receive_rate(loopback_bandwidth, drain_base)
        model = cls(
            digest_rate=digest_rate,
            sync_base=sync_base,
            sync_per_page=sync_per_page,
            sync_per_dirty_page=sync_per_dirty_page,
            **devices,
            pause_latency=pause_latency,
            max_rate_per_vcpu=float(writes) or cls.max_rate_per_vcpu,
            load_base=load_base,
            drain_base=drain_base,
            link_jitter=link_jitter,
            warmup_base=warmup_base,
            warmup_per_byte=warmup_per_byte,
            loopback_bandwidth=loopback_bandwidth,
            loopback_per_page=loopback_per_page,
            register_per_page=register_per_page,
            setup_base=setup_base,
            loopback_stream_start=stream_start,
            hole_query=hole_query,
            control_latency=control,
            broadcast_seconds=broadcast,
            receive_rate=receive,
            channel_buffer=socket_buffer_bytes(),
        )
        if switchover is not None:
            final = final_pass_seconds_per_page()
            model = replace(model, **device_link_costs(model), loopback_final_per_page=final)
            model = replace(model, device_load_contention=load_contention(model))
            model = replace(model, sync_bookkeeping=sync_bookkeeping_seconds(model))
        return model


def _vcpu_costs(mem: Any, tries: int = 3) -> tuple[float, float]:
    """(pause_latency, writes per second of one vCPU): the median of three
    pauses of a guest writing as fast as it can, and that rate.

    A guest that made no writes was not running while it was measured (its
    vCPU thread held off the cores, or stalled in a fault the host was slow
    to serve): its pauses timed that stall, and a model built on them
    charged every simulated stop for it. Such a sample is taken again, up to
    ``tries`` times, and never kept."""
    from mig._mig import WorkloadGuest  # noqa: PLC0415

    for _ in range(tries):
        with WorkloadGuest(mem, vcpus=1, workload="uniform:rate=max") as g:
            time.sleep(0.2)
            lat = []
            for _ in range(3):
                lat.append(g.pause())
                g.resume()
                time.sleep(0.02)
            writes = g.stats()["rate"]
        if writes > 0:
            return float(np.median(lat)), float(writes)
    raise RuntimeError(f"calibration: the vCPU guest made no writes in {tries} tries")


# (size, stride) of the uncapped loopback migrations: every stride-th page
# holds data, none with 0. A never-written page costs the sender its time
# per zero page, a data page mostly the wire's. Two zeroed sizes separate the
# per-page cost from a pass's fixed cost; they are far apart because that
# cost is a fraction of a microsecond and a loaded host adds tens of
# milliseconds to a pass. (Scattered data pages cost a real pass far more
# than their bytes, and not in proportion to their number or their chunks; a
# linear model cannot hold both, so the data guest is whole.)
LOOPBACK_GUESTS = ((128 << 20, 0), (1 << 30, 0), (64 << 20, 1))
# What those guests (and the hole queries' in ``mig.sim_holes``) run: a
# vCPU writing a few pages over and over. Every migration the simulator
# predicts has a guest running through its bulk pass, and on this host a
# bulk pass whose guest sleeps cost more per zero page than one whose guest
# writes: with nothing else runnable the cores idle between the sender's and
# the receiver's hand-offs, and each wakes from idle for the next packet.
LOOPBACK_WORKLOAD = "uniform:rate=8000,wss=1MiB"


def _loopback_costs(runs: int = 5) -> tuple[float, float, float]:
    """(loopback_bandwidth, loopback_per_page, loopback_stream_start) from
    uncapped loopback migrations of a guest (``LOOPBACK_WORKLOAD``) to ``mig demo``'s
    destination, best bulk pass of ``runs`` each (a loaded host only adds
    time, and an exact solve amplifies what it adds), solved for
    time = fixed + zero pages * per_page + wire / bandwidth
    (the fixed part is the stream's start: the pass's closing sync, which
    the tracker's terms charge, takes microseconds). Each starts at its
    destination's ready line, once that destination populated its memory."""
    best = [math.inf] * len(LOOPBACK_GUESTS)
    wires = [0] * len(LOOPBACK_GUESTS)
    # Round by round, every guest once per round: a slow spell of the host
    # then costs each guest a run, not one guest all of its runs (which
    # would tilt the solve).
    for _ in range(runs):
        for i, (size, stride) in enumerate(LOOPBACK_GUESTS):
            q, _ = _idle_loopback_migration(
                size,
                bool(stride),
                0,
                demo=True,
                pages=slice(None, None, stride or 1),
                workload=LOOPBACK_WORKLOAD,
            )
            # The bulk pass alone: its first sync, less the setup before it
            # (setup, settle and switchover are terms of their own).
            best[i] = min(best[i], q["passes"][0]["time"] - q["setup-time"] / 1000)
            wires[i] = int(q["passes"][0]["bytes"])
    rows = []
    for (size, stride), wire, t in zip(LOOPBACK_GUESTS, wires, best, strict=True):
        pages = size // PAGE_SIZE
        zero = pages - (-(-pages // stride) if stride else 0)
        rows.append((zero, wire, t))
    a = np.array([[1.0, zero, wire] for zero, wire, _ in rows])
    b = np.array([t for _, _, t in rows])
    fixed, per_page, inverse = np.linalg.solve(a, b)
    if fixed < 0:  # no start cost to see: the per-page terms alone, least squares
        fixed = 0.0
        (per_page, inverse), *_ = np.linalg.lstsq(a[:, 1:], b, rcond=None)
    _, wire, t = rows[-1]
    bandwidth = 1 / inverse if inverse > 0 else wire / t
    return float(bandwidth), max(0.0, float(per_page)), max(0.0, float(fixed))


# Share of pages written before each timed sync: a scattered quarter of
# memory, so the harvest walks many short runs as a busy guest's does.
SYNC_DIRTY_STRIDE = 4


def _tracker_costs(mem: Any) -> tuple[float, float, float]:
    """(sync_base, sync_per_page, sync_per_dirty_page) of the tracker
    migrations use on this host.

    The userfaultfd backend (write-protect + ``PAGEMAP_SCAN``) with real
    dirty pages: a clean sync of a tiny memory is the base, a clean sync of
    ``mem`` the scan per page, and a sync after every
    ``SYNC_DIRTY_STRIDE``-th page was written the harvest and re-protection
    per dirty page. Without userfaultfd write-protect (``capabilities()
    ["uffd"]`` names what is missing) migrations use the soft tracker, so
    that is what is timed.
    """
    from mig._mig import DirtyTracker, GuestMemory, capabilities  # noqa: PLC0415

    backend = "uffd" if capabilities()["uffd"]["available"] else "soft"
    tiny = GuestMemory(16 * mem.page_size)
    tiny.array[:] = 1
    with DirtyTracker(tiny, backend=backend) as t:
        t.sync()
        base = _best(t.sync, 5)
    tracker = DirtyTracker(mem, backend=backend)
    pages = mem.num_pages
    stride = mem.page_size // mem.array.itemsize * SYNC_DIRTY_STRIDE
    try:
        tracker.sync()
        clean = _best(tracker.sync, 5)
        busy = math.inf
        for _ in range(5):
            # The writes (and their write-protect faults) are the guest's
            # cost: only the sync that harvests them is timed.
            mem.array[::stride] += 1
            t0 = time.perf_counter()
            tracker.sync()
            busy = min(busy, time.perf_counter() - t0)
    finally:
        tracker.close()
    per_page = max(clean - base, 0.0) / pages
    per_dirty = max(busy - clean, 0.0) / -(-pages // SYNC_DIRTY_STRIDE)
    return base, per_page, per_dirty


def _idle_loopback_migration(
    size: int,
    filled: bool,
    cap: int,
    demo: bool = False,
    pages: slice = slice(None),
    policy: str = DEFAULT_POLICY,
    devices: str = "none",
    params: dict[str, Any] | None = None,
    observe: Callable[[Any], None] | None = None,
    workload: str = "idle",
) -> tuple[dict[str, Any], Any]:
    """One real loopback migration of a guest, idle unless ``workload``
    (memory filled, the ``pages`` of it, or zeroed, ``cap`` bytes/s or 0 for none, by
    ``policy``, with ``devices`` on both sides with ``demo``, and further
    migration ``params``): its ``query()`` and its source (handed to
    ``observe`` before it starts, for a caller that watches it run).

    The destination is in this process, as the lab's real runs have it, or
    with ``demo`` ``mig demo``'s own (a ``mig serve --once --prealloc``
    child: its own process, ready once its memory is faulted in, as the
    runs ``mig demo --simulate`` predicts)."""
    from mig._mig import GuestMemory, WorkloadGuest  # noqa: PLC0415
    from mig.demo_destination import DemoDestination  # noqa: PLC0415
    from mig.destination import MigrationDestination  # noqa: PLC0415
    from mig.source import MigrationSource  # noqa: PLC0415

    src = GuestMemory(size)
    if filled:
        src.array.reshape(-1, src.page_size // src.array.itemsize)[pages] = 0x5A
    if not demo:
        dst = GuestMemory(size)
        with WorkloadGuest(src, vcpus=1, workload=workload) as guest:
            local = MigrationDestination("tcp:127.0.0.1:0", dst, [])
            source = MigrationSource(guest, [], uri=local.uri, max_bandwidth=cap, policy=policy,
                                     **(params or {}))  # fmt: skip
            local.start()
            source.start()
            q = source.wait(120)
            local.wait(60)
    else:
        child = DemoDestination(size, devices, "warning", {})
        sources = [] if devices == "none" else create_all(devices, src)
        try:
            uri = child.uri()
            if uri is None:
                raise RuntimeError("calibration: the demo destination did not start")
            with WorkloadGuest(src, vcpus=1, workload=workload) as guest:
                source = MigrationSource(guest, sources, uri=uri, max_bandwidth=cap,
                                         policy=policy, **(params or {}))  # fmt: skip
                if observe is not None:
                    observe(source)
                source.start()
                q = source.wait(120)
            child.reap(60.0)
        except BaseException:
            child.kill()
            raise
        finally:
            for d in sources:
                d.close()
    if q["status"] != "completed":
        raise RuntimeError(f"calibration migration {q['status']}: {q.get('error-desc')}")
    return q, source


def _switchover_load(
    digest_rate: float, size: int, cap: float, runs: int = 3
) -> tuple[float, float, float, float]:
    """(load_base, drain_base, link_jitter, setup) from real loopback
    migrations of an idle guest (``setup``: the median ``setup-time``).

    The jitter comes from the source's bandwidth meter: its smoothed mean
    absolute deviation over the estimate, scaled to a standard deviation
    (E|X| = σ·√(2/π) for normal noise)."""
    loads, drains, jitters, setups = [], [], [], []
    for _ in range(runs):
        q, source = _idle_loopback_migration(size, True, int(cap))
        setups.append(q["setup-time"] / 1000)
        # "load" is the destination's work besides its wait for the end
        # records ("drain") and its digest ("dest-digest").
        loads.append(q["downtime-breakdown"]["load"] / 1000)
        drains.append(q["downtime-breakdown"].get("drain", 0.0) / 1000)
        if source.meter.smoothed > 0:
            jitters.append(source.meter.deviation / source.meter.smoothed * math.sqrt(math.pi / 2))
    jitter = float(np.median(jitters)) if jitters else 0.0
    load, drain = max(0.0, float(np.median(loads))), max(0.0, float(np.median(drains)))
    return load, drain, jitter, float(np.median(setups))


HOST_MODEL_ENV = "MIG_HOST_MODEL"


def host_model_path() -> Path:
    """Where ``mig bench calibrate`` saves this host's model: ``$MIG_HOST_MODEL``,
    else ``$XDG_CONFIG_HOME/mig/host-model.json`` (``~/.config`` by default)."""
    env = os.environ.get(HOST_MODEL_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mig" / "host-model.json"


def save_host_model(model: HostModel, path: Path, stamp: dict[str, str]) -> None:
    """Write ``model`` as JSON (with when and where it was measured)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"host-model": asdict(model), **stamp}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def load_host_model(path: Path | None = None) -> tuple[HostModel, str]:
    """This host's saved model and where it came from; the shipped default
    (``HostModel()``) when none was saved. A file that exists but is not a
    model raises ``ValueError`` naming the file and the problem."""
    path = path or host_model_path()
    if not path.exists():
        return HostModel(), f"default (no calibration at {path}; run `mig bench calibrate`)"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"host model {path}: not readable JSON ({e})") from None
    fields = doc.get("host-model") if isinstance(doc, dict) else None
    if not isinstance(fields, dict):
        raise ValueError(f"host model {path}: no 'host-model' object")
    known = {f.name for f in dataclasses.fields(HostModel)}
    fields = host_model_fields(fields)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"host model {path}: unknown fields {', '.join(unknown)}")
    for key, value in fields.items():
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < 0:
            raise ValueError(f"host model {path}: field {key}={value!r} is not a number >= 0")
        if value == 0 and key in _RATES:
            raise ValueError(f"host model {path}: field {key} must be positive")
    when = doc.get("date", "an unknown date")
    return HostModel(**fields), f"{path} (calibrated {when})"


# Fields of models saved before the destination populated ahead of accepting,
# and before its receive path hashed every page as it landed (the root's
# per-chunk rehash, ``chunk_rehash``): no term uses them since, and a model
# that has them still loads.
_RETIRED = ("prefault_per_byte", "prefault_share", "prefault_hello_wait", "chunk_rehash")


def host_model_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A saved model's fields less the retired ones."""
    return {k: v for k, v in fields.items() if k not in _RETIRED}


# Fields the model divides by: zero is never a measurement.
_RATES = (
    "digest_rate",
    "device_rate",
    "device_load_rate",
    "device_hash_rate",
    "max_rate_per_vcpu",
    "loopback_bandwidth",
)


def _best(fn: Any, n: int) -> float:
    best = math.inf
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass(frozen=True)
class LinkModel:
    """Per-channel bandwidth and RTT, a shared bottleneck, a TCP window."""

    channel_bandwidth: float = 0.0  # bytes/s per channel, 0: unlimited
    rtt: float = 100e-6  # s
    bottleneck: float = 0.0  # bytes/s shared by all channels, 0: none
    window: int = 4 << 20  # bytes in flight per channel
    packet_pages: int = 128
    # Seconds the first pass takes beyond its pages, paid after its first
    # send, outside the sends' own time
    # (``HostModel.loopback_stream_start`` for ``mig demo``'s loopback).
    stream_start: float = 0.0

    def throughput(self, channels: int, cap: float) -> float:
        per = self.window / self.rtt if self.rtt > 0 else math.inf
        if self.channel_bandwidth:
            per = min(per, self.channel_bandwidth)
        total = per * max(1, channels)
        for limit in (self.bottleneck, cap):
            if limit:
                total = min(total, limit)
        if not math.isfinite(total):
            raise ValueError("the link has no finite bandwidth: set a bandwidth, cap or RTT")
        return total


# ------------------------------------------------------------------ memory
class SimMemory:
    """What the loop reads of guest memory: sizes, and a digest that costs time."""

    def __init__(self, size: int, granularity: int, clock: VirtualClock, host: HostModel) -> None:
        self.size = size
        self.granularity = granularity
        self.page_size = PAGE_SIZE * granularity
        self.num_pages = size // self.page_size
        self._clock = clock
        self._host = host
        self.digests = 0
        # Virtual time the switchover's digest started: a real source digests
        # on another thread while the stop-copy state goes out, so only what
        # is left of it when the last byte is sent lengthens the downtime.
        self.digest_started: float | None = None

    ROOT = 0x5EED  # the model's memory holds no bytes: every exact copy has this root

    def digest(
        self, first: int | None = None, count: int | None = None, threads: int | None = None
    ) -> int:
        pages = self.num_pages if count is None else count
        cost = pages * self.page_size / self._host.digest_rate
        if self.digest_started is not None:
            cost = max(0.0, cost - (self._clock.now() - self.digest_started))
            self.digest_started = None
        self._clock.advance(cost)
        self.digests += 1
        return self.ROOT

    def __len__(self) -> int:
        return self.size


class _DmaSink:
    """Stands in for ``memory.array`` of a DMA device: writes mark pages dirty."""

    def __init__(self, guest: SimGuest) -> None:
        self._g = guest

    def __setitem__(self, key: slice, value: Any) -> None:
        page = key.start // PAGE_SIZE // self._g.memory.granularity
        self._g.written(np.array([page], dtype=np.int64))


class _DmaMemory:
    """The 4 KiB-page view a DMA device writes through."""

    page_size = PAGE_SIZE

    def __init__(self, guest: SimGuest) -> None:
        self.num_pages = guest.memory.size // PAGE_SIZE
        self.size = guest.memory.size
        self.array = _DmaSink(guest)


class SimTracker:
    """Dirty tracking over the simulated guest; a sync costs modelled time."""

    def __init__(self, memory: SimMemory, clock: VirtualClock, host: HostModel) -> None:
        self._bm = DirtyBitmap(memory.num_pages)
        self._clock = clock
        self._cost = host.sync_base + host.sync_per_page * memory.size / PAGE_SIZE
        self._per_dirty = host.sync_per_dirty_page * memory.granularity
        self._bookkeeping = host.sync_bookkeeping
        self.last_sync_seconds = 0.0
        self.syncs = 0
        self.guest: SimGuest | None = None

    def mark(self, bm: DirtyBitmap) -> None:
        self._bm |= bm

    def pending(self) -> int:
        """Pages written and not yet harvested by a sync."""
        if self.guest is not None:
            self.guest.flush()
        return self._bm.count()

    def sync(self) -> DirtyBitmap:
        if self.guest is not None:
            self.guest.flush()
        dirty = self._bm.take()
        cost = self._cost + self._per_dirty * dirty.count()
        # The loop's own work after the sync (mig.sim_bookkeeping) takes
        # time, but is not the sync's: the final-sync term leaves it out.
        self._clock.advance(cost + self._bookkeeping)
        self.last_sync_seconds = cost
        self.syncs += 1
        return dirty

    def close(self) -> None:
        pass


class SimGuest:
    """A guest whose vCPUs write pages by a workload spec as virtual time passes."""

    def __init__(self, memory: SimMemory, clock: VirtualClock, host: HostModel,
                 workload: str = "idle", vcpus: int = 1, seed: int = 1,
                 prefilled: bool = True) -> None:  # fmt: skip
        if vcpus < 1:
            raise ValueError("vcpus must be >= 1")
        self.memory = memory
        self.spec = parse_workload(workload)
        self.workload = workload
        self.vcpus = vcpus
        self._clock = clock
        self._host = host
        g = memory.granularity
        wss_bytes = self.spec.wss if self.spec.wss is not None else memory.size
        if wss_bytes > memory.size:
            raise ValueError(
                f"workload field wss={wss_bytes} bytes exceeds guest memory of {memory.size} bytes"
            )
        if wss_bytes % PAGE_SIZE:
            raise ValueError(f"workload field wss={wss_bytes} is not a multiple of {PAGE_SIZE}")
        rng = np.random.default_rng(seed)
        wss = wss_bytes // PAGE_SIZE
        self._samplers = [_Sampler(self.spec, wss, v, vcpus, g, rng) for v in range(vcpus)]
        self.tracker: SimTracker | None = None
        n = memory.num_pages
        # Never-written pages (zero on the wire); None when memory starts filled.
        self.pristine = None if prefilled else DirtyBitmap.full(n)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.running = True
        self.throttle = 0.0
        self.dirty_limit = 0.0
        self.writes = 0
        self.paused_time = 0.0
        self._carry = 0.0
        self._vcpu = 0
        clock.on_advance(self._tick)

    def base_rate(self) -> float:
        if self.spec.pattern == "idle":
            return 0.0
        if self.spec.rate is None:
            return self._host.max_rate_per_vcpu * self.vcpus
        return self.spec.rate

    def effective_rate(self) -> float:
        per_vcpu = self.base_rate() / self.vcpus
        if self.dirty_limit:
            per_vcpu = min(per_vcpu, self.dirty_limit)
        return per_vcpu * self.vcpus * (1.0 - self.throttle)

    def _tick(self, old: float, new: float) -> None:
        if not self.running:
            self.paused_time += new - old
            return
        rate = self.effective_rate()
        if rate <= 0:
            return
        self._carry += rate * (new - old) / self.memory.granularity
        n = int(self._carry)
        if n <= 0:
            return
        self._carry -= n
        self.writes += n * self.memory.granularity
        # vCPUs share the writes evenly; spread whole samples round-robin.
        per, extra = divmod(n, self.vcpus)
        parts = []
        for i in range(self.vcpus):
            k = per + (1 if (i - self._vcpu) % self.vcpus < extra else 0)
            if k:
                parts.append(self._samplers[i].sample(k))
        self._vcpu = (self._vcpu + extra) % self.vcpus
        pages = np.concatenate(parts) // self.memory.granularity
        self.written(pages)

    def warm_up(self, seconds: float) -> None:
        """Run the workload for ``seconds`` before any tracker watches: what
        it writes holds data (no longer a zero page) and is sent by the first
        pass like every other page."""
        if self.tracker is not None:
            raise RuntimeError("warm_up runs before the tracker is attached")
        self._clock.advance(seconds)
        self.flush()
        self.writes = 0

    def written(self, pages: np.ndarray) -> None:
        # Buffered until the tracker harvests: one bitmap build per sync.
        self._buffer.append(pages)
        self._buffered += len(pages)
        if self._buffered > 1 << 22:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        pages = np.concatenate(self._buffer).astype(np.uint64)
        self._buffer, self._buffered = [], 0
        bm = DirtyBitmap.from_indices(pages, self.memory.num_pages)
        if self.tracker is not None:
            self.tracker.mark(bm)
        if self.pristine is not None:
            self.pristine.and_not(bm)

    # --- the Guest protocol ---
    def pause(self) -> float:
        self.running = False
        self._clock.advance(self._host.pause_latency)
        return self._host.pause_latency

    def resume(self) -> None:
        self.running = True

    def set_throttle(self, pct: float) -> None:
        self.throttle = min(max(float(pct), 0.0), 0.99)

    def set_dirty_limit(self, rate: float) -> None:
        self.dirty_limit = float(rate)

    def stats(self) -> dict[str, Any]:
        return {
            "writes": self.writes,
            "paused-time": self.paused_time,
            "rate": self.effective_rate(),
            "running": self.running,
        }


# -------------------------------------------------------------------- link
class SimLink:
    """A ``Link`` that charges virtual time and plays the destination.

    The destination's protocol is ``DestinationCore``'s; this class adds only
    the timing (round trips, load and digest rates) and the model's verdict
    on memory (exact unless a page was written after the final sync).
    """

    concurrent_digest = False  # the digest is charged to the virtual clock

    def __init__(self, guest: SimGuest, tracker: SimTracker, clock: VirtualClock,
                 model: LinkModel, host: HostModel, channels: int,
                 handlers: list[DeviceHandler], seed: int = 0) -> None:  # fmt: skip
        self.guest = guest
        self.tracker = tracker
        self.clock = clock
        self.model = model
        self.host = host
        self.channels = max(1, int(channels))
        self.cap = 0.0
        self._bw = self._raw = model.throughput(self.channels, 0)
        self._bytes = 0
        self._busy = 0.0
        self._normal = 0
        self._zero = 0
        self._events: list[tuple[float, int, Message]] = []
        self._n = 0
        self._g = guest.memory.granularity
        # The destination's protocol is the real one; this class only times it.
        # Devices without precopy have no initial data to wait for.
        self.destination = DestinationCore(
            guest.memory.page_size,
            guest.memory.size,
            {h.device_id: h.name for h in handlers},
            initially_loaded=[h.device_id for h in handlers if not h.device.caps & MigCap.PRE_COPY],
        )
        # Device bytes sent since the current switchover began: the only
        # device state the destination loads inside the downtime. What a
        # device sent during precopy was loaded while the guest still ran.
        self._stop_copy_bytes: dict[int, int] = {}
        self._in_stop_copy = False
        # The devices (their END records' digests, ``hash_seconds``), and the
        # seconds the destination will take to decode the stop-copy records,
        # all after "complete" (``mig.sim_devices``).
        self._devices = {h.device_id: h.device for h in handlers}
        self._stop_copy_decode = 0.0
        # The destination's loop: it takes in and loads precopy device
        # records, and answers control messages in between (``mig.sim_dest_loop``).
        self._loop = DestinationLoop(handling=host.control_latency)
        self._credit: dict[int, int] = {}
        self.aborted = False
        self.discarded = False
        self._jitter_rng = np.random.default_rng(seed)
        self._jitter_window = -1
        self._jitter_factor = 1.0
        # The capped sender's tokens; the engine's burst is never below a packet.
        packet = RECORD_HEADER + model.packet_pages * (OFFSET_BYTES + PAGE_SIZE)
        self._bucket = SimBucket(0.0, clock.now(), packet)
        self._after_zero = False  # the sender's last packet was all zero pages
        # What the channels hold that the destination has not taken in yet.
        self._backlog = ChannelBacklog(
            host.receive_rate, host.channel_buffer * self.channels, clock.now()
        )

    # --- time ---
    def _rate(self) -> float:
        """The link's bandwidth in the current 100 ms window of virtual time."""
        if not self.host.link_jitter:
            return self._bw
        window = int(self.clock.now() / JITTER_WINDOW)
        if window != self._jitter_window:
            self._jitter_window = window
            noise = self.host.link_jitter * float(self._jitter_rng.standard_normal())
            self._jitter_factor = min(1.5, max(0.5, 1.0 + noise))
        return self._bw * self._jitter_factor

    def _charge(self, wire: int, cpu: float = 0.0, scan: float = 0.0) -> None:
        """Advance by sending ``wire`` bytes after ``cpu`` seconds of work,
        and ``scan`` seconds of the RAM stream's classifying its pages (zero
        or data), which on a capped link overlaps the channels' wait for
        tokens: the stream's thread scans the next packets meanwhile."""
        if self.cap:
            # The sender's token bucket (``mig.sim_bucket``): the link's own
            # pace and the scan (done while the channels wait for tokens),
            # or the tokens, whichever is slower; tokens accrue meanwhile.
            # The link's variation stretches both.
            slowdown = self._bw / self._rate()
            unpaced = wire / self._raw * slowdown + scan
            send = self._bucket.send(wire, self.clock.now() + cpu, unpaced, slowdown)
            dt = cpu + send
        else:
            dt = wire / self._rate() + cpu + scan
        self._backlog.advance(self.clock.now())  # the destination took in meanwhile
        self.clock.advance(dt)
        # Sockets full: the sender waits until the receiver made room.
        room = self._backlog.advance(self.clock.now(), wire)
        self.clock.advance(room)
        dt += room
        self._busy += dt

    def _reply(self, delay: float, message: Message) -> None:
        # Every control round trip costs this host's message handling too
        # (``mig.sim_handshake``).
        at = self.clock.now() + delay + self.host.control_latency
        self._n += 1
        heapq.heappush(self._events, (at, self._n, message))

    def produced(self, device_id: int, nbytes: int) -> None:
        """A device produced ``nbytes`` of state ahead of sending it (stopped
        exact), its END record's digest included."""
        device = self._devices.get(device_id)
        self.clock.advance(
            production_seconds(self.host, device, nbytes) + hash_seconds(self.host, device)
        )
        self._credit[device_id] = self._credit.get(device_id, 0) + nbytes

    # --- the Link protocol ---
    def connect_channels(self) -> None:
        """The source's setup before ``hello`` (``mig.sim_setup``), charged
        where the native sender connects: outside hello's round trip."""
        memory = self.guest.memory
        pages = memory.size // PAGE_SIZE
        if self.guest.pristine is not None:
            self.guest.flush()
            pages = mapped_pages(self.guest.pristine, memory.granularity, pages)
        self.clock.advance(setup_seconds(self.host, pages))

    def send_pages(self, bitmap: DirtyBitmap, generation: int) -> int:
        if self.aborted:
            raise OSError("link aborted")
        count = bitmap.count()
        if not count:
            return 0
        g = self._g
        zero_units = 0
        data = None  # the units sent as data: all but never-written ones
        zero = self.guest.pristine
        if zero is not None:
            # A page goes out as it is when sent: one the guest wrote since
            # the last sync holds data already, though no sync has seen it.
            self.guest.flush()
        asked = 0
        if zero is not None and zero.count():
            data = bitmap.copy()
            data.and_not(zero)
            zero_units = count - data.count()
        if self.host.hole_query:
            holes = DirtyBitmap(len(bitmap))
            if zero_units:
                holes = bitmap.copy()
                holes.and_not(data)  # type: ignore[arg-type]
            asked, self._after_zero = asked_hole_packets(
                bitmap, holes, self.model.packet_pages // g, self._after_zero
            )
        pages = count * g
        normal = (count - zero_units) * g
        packets = -(-pages // self.model.packet_pages)
        wire = packets * RECORD_HEADER + pages * OFFSET_BYTES + normal * PAGE_SIZE
        # The stream starts with the first pages it carries.
        start = 0.0 if self._normal or self._zero else self.model.stream_start
        self._normal += normal
        self._zero += pages - normal
        self._bytes += wire
        # A data page's cost is in the link's pace; a zero page the sender
        # tells apart without sending costs it send_per_page (final_per_page
        # in the final pass), and a packet
        # that reads the page tables over holes hole_query.
        per_page = self.host.send_per_page
        if self._in_stop_copy and self.host.final_per_page:
            per_page = self.host.final_per_page  # the final pass (mig.sim_final_pass)
        scan = (pages - normal) * per_page + asked * self.host.hole_query
        self._charge(wire, 0.0, scan)
        # The calibrated start is the first pass's time, not its first
        # send's: the engine's first send starts right after the first
        # decision and takes its bytes' time only. Charged after that send,
        # outside it, the bandwidth meter's first sample (bytes over send
        # time) and the tokens that send finds are the engine's.
        self.clock.advance(start)
        return wire

    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> None:
        if self.aborted:
            raise OSError("link aborted")
        n = len(data)
        # The model loads nothing: the flag byte is all its destination reads.
        self.destination.records_arrived([DeviceRecord(device_id, seq, data[:1], final)])
        credit = self._credit.get(device_id, 0)
        produce = max(0, n - credit)
        self._credit[device_id] = max(0, credit - n)
        self._bytes += n
        if self._in_stop_copy:
            self._stop_copy_bytes[device_id] = self._stop_copy_bytes.get(device_id, 0) + n
        device = self._devices.get(device_id)
        cpu = production_seconds(self.host, device, produce)
        cpu += send_seconds(self.host, n, final, self._in_stop_copy)
        if final and produce:
            # The END record's digest; a stopped exact that
            # produced this chunk paid it then (``produced``).
            cpu += hash_seconds(self.host, device)
        # The handler produces a chunk before it sends it: the link idles
        # meanwhile (a capped sender's bucket fills), and the send's own
        # time, the bandwidth meter's, is the wire's alone.
        self.clock.advance(cpu)
        self._charge(RECORD_HEADER + n)
        take, decode = receive_seconds(self.host, n), decode_seconds(self.host, device, n)
        if self._in_stop_copy:
            self._stop_copy_decode += decode + take
        else:
            # The source's precopy shares the host with the loop meanwhile,
            # taking cores in proportion to its rate.
            full = self.host.loopback_bandwidth
            share = self.cap / full if self.cap and full > 0 else 1.0
            take, decode = contended(self.host, take, share), contended(self.host, decode, share)
            self._loop.received(self.clock.now(), device_id, seq, n, take, decode)

    def sync(self, generation: int) -> None:
        self._charge(RECORD_HEADER * self.channels, self.host.broadcast_seconds)

    def finish(self, digest: int) -> None:
        self._charge(RECORD_HEADER * self.channels, self.host.broadcast_seconds)

    @property
    def verified(self) -> bool:
        return self.destination.verified

    def send(self, message: Message) -> None:
        if self.aborted:
            raise OSError("link aborted")
        if isinstance(message, Switchover):
            self._in_stop_copy, self._stop_copy_bytes = True, {}
            self._stop_copy_decode = 0.0
            if self.destination.verify_mode == "strict":
                self.guest.memory.digest_started = self.clock.now()
        elif isinstance(message, SwitchoverAbort):
            # The destination drops the aborted records; precopy resumes.
            self._in_stop_copy, self._stop_copy_bytes = False, {}
            self._stop_copy_decode = 0.0
            self.guest.memory.digest_started = None
        # The destination's loop handles it once the work in hand is done.
        at = self._loop.handled_at(self.clock.now())
        try:
            self._play(self.destination.on_message(message, self.clock.now()), at=at)
        except MigrationEnded as e:
            self.discarded = True
            if not e.by_peer:
                self._reply(self.model.rtt, Failed(e.reason))

    def _play(self, effects: list[Effect], delay: float = 0.0, at: float | None = None) -> None:
        """Carry out the destination's effects; replies arrive a round trip
        (plus ``delay`` of the destination's own work) after the request,
        handled by the destination's loop ``at`` (now by default)."""
        at = self.clock.now() if at is None else at
        for effect in effects:
            match effect:
                case Send(message=reply):
                    self._reply(self.model.rtt + delay, reply)
                case FinishStopCopy():
                    self._finish_stop_copy()
                case Resume():
                    self._play(self.destination.resumed(self.clock.now()))
                case AnswerPass(number=number):
                    # Answered before the records it released are loaded.
                    wait = at - self.clock.now()
                    self._reply(self.model.rtt + wait, PassAck(number, self._loop.answer(at)))
                case SettleChannels(number=number):
                    # The channels' backlog lands (``mig.sim_receive``); the
                    # receive path hashed each page as it landed, so the
                    # root has no stale chunk left to rehash. The loop starts
                    # waiting once the work in hand is done.
                    landed = self._backlog.seconds(self.clock.now())
                    wait = at - self.clock.now()
                    self._reply(self.model.rtt + wait + landed, Settled(number, landed, 0, 0.0))
        self._load_released(at)

    def _load_released(self, at: float | None = None) -> float:
        """Load the records within the announced bounds; a chunk with
        ``INIT_DONE`` completes its device's initial data. During precopy the
        destination's loop loads them after the message that released them
        (handled ``at``), and only then announces what became loaded
        (``mig.sim_dest_loop``); returns the load seconds of precopy records
        released by ``complete``, which its stop-copy pays."""
        now = self.clock.now()
        released = self.destination.loads()
        keys = [(load.record.device, load.record.seq) for load in released]
        if self._in_stop_copy:
            done, left = now, self._loop.pending_load(keys)
        else:
            done, left = self._loop.release(now if at is None else at, keys), 0.0
        for load in released:
            if load.record.data and load.record.data[0] & FLAG_INIT_DONE:
                self.destination.initial_loaded(load.record.device)
        for effect in self.destination.announcements():
            if isinstance(effect, Send):
                self._reply(self.model.rtt + max(0.0, done - now), effect.message)
        return left

    def _finish_stop_copy(self) -> None:
        mem = self.guest.memory
        # Strict checks a whole digest. Otherwise the root is the sum of
        # chunk terms the receive path kept current, hashing every page as
        # it landed (``ChunkDigest::rehash_covered``): its cost is in the
        # receive rate (``mig.sim_receive``), none is left for "ready".
        if self.destination.verify_mode == "strict":
            digest_seconds = mem.size / self.host.digest_rate
        else:
            digest_seconds = 0.0
        # The end records wait behind what the channels still hold: all of
        # stop-copy's bytes and, without a settle before the pause, the tail
        # of the last pass (``mig.sim_receive``).
        drain = self.host.drain_base + self._backlog.seconds(self.clock.now())
        load = drain + self.host.load_base + digest_seconds
        load += self._device_load()
        load += self._load_released()
        self.destination.stop_copy_received()
        # The source synced after the pause and sent everything it knew: the
        # copy is exact unless something wrote memory after that final sync
        # (a device still doing DMA, a guest still running).
        exact = self.tracker.pending() == 0 and not self.guest.running
        digest = format(SimMemory.ROOT, "032x") if exact else "(pages missed)"
        try:
            effects = self.destination.verify(
                digest, self.clock.now() + load, digest_seconds, drain
            )
        except MigrationEnded as e:
            self.discarded = True
            self._reply(self.model.rtt + load, Failed(e.reason))
            return
        self._play(effects, delay=load)

    def _device_load(self) -> float:
        """The destination's device work once ``complete`` is in
        (``mig.sim_devices``): decoding every stop-copy record, then each
        device's validation (its END digest, ``hash_seconds``)."""
        checks = sum(
            hash_seconds(self.host, self._devices.get(d)) + self.host.device_load_seconds
            for d in self._stop_copy_bytes
        )
        return self._stop_copy_decode + checks

    def recv(self, timeout: float) -> Message | None:
        now = self.clock.now()
        if self._events and self._events[0][0] <= now + timeout:
            at, _, msg = heapq.heappop(self._events)
            if at > now:
                self.clock.advance(at - now)
            return msg
        if timeout > 0:
            self.clock.advance(timeout)
        return None

    def set_max_bandwidth(self, bytes_per_s: int) -> None:
        self.cap = float(bytes_per_s)
        self._bucket.set_rate(self.cap, self.clock.now())
        self._bw = self.model.throughput(self.channels, self.cap)

    def transferred(self) -> int:
        return self._bytes

    def busy_time(self) -> float:
        return self._busy

    def stats(self) -> dict[str, Any]:
        page_units = PAGE_SIZE * self._g
        return {
            "transferred": self._bytes,
            "normal": self._normal // self._g,
            "duplicate": self._zero // self._g,
            "bandwidth": self._bw,
            "page-size": page_units,
        }

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        pass

    # --- post-copy: the phase is modelled in mig.sim_postcopy ---
    postcopy: Any = None

    def postcopy_outgoing(self, uri: str | None, max_bandwidth: int, max_push_bandwidth: int,
                          recover_timeout: float) -> Any:  # fmt: skip
        """The source's post-copy phase on this link: ``SimPostcopy``."""
        from mig.sim_postcopy import SimPostcopy  # noqa: PLC0415

        self.postcopy = SimPostcopy(self, max_bandwidth, max_push_bandwidth)
        return self.postcopy


class _SimDeviceHandler(DeviceHandler):
    """The real device handler; a stopped exact size costs its production time."""

    sim_link: SimLink | None = None

    def pending_exact(self, guest_stopped: bool) -> int:
        fresh = self.exact_needs_stop and guest_stopped and self._produced is None
        size = super().pending_exact(guest_stopped)
        if fresh and self.sim_link is not None and self._produced is not None:
            self.sim_link.produced(self.device_id, size)
        return size

    def stop_copy_seconds(self) -> float | None:
        # The device's own figure is wall time on this host; in virtual time
        # its fixed stop work is the host model's END digest.
        if self.sim_link is None:
            return None
        return hash_seconds(self.sim_link.host, self.device)


# ---------------------------------------------------------------- simulate
@dataclass(frozen=True)
class SimConfig:
    """One simulated migration. Sizes in bytes, rates in bytes/s, times in s."""

    memory: int = 1 << 30
    workload: str = "idle"
    vcpus: int = 1
    devices: tuple[str, ...] = ()
    policy: str = DEFAULT_POLICY
    params: dict[str, Any] = field(default_factory=dict)
    link: LinkModel = field(default_factory=LinkModel)
    host: HostModel = field(default_factory=HostModel)
    prefilled: bool = True
    # Seconds a zeroed guest runs before its migration starts; None: the
    # host model's (``mig demo``'s destination start-up).
    warmup: float | None = None
    seed: int = 1
    granularity: int = 0  # 0: page-level up to PAGE_LEVEL_LIMIT, coarser beyond
    label: str = ""
    # ``start_postcopy()`` before the first pass (needs ``postcopy`` in the
    # parameters): post-copy at once, whatever the policy would decide.
    start_postcopy: bool = False

    def resolved_granularity(self) -> int:
        if self.granularity:
            return self.granularity
        if self.memory <= PAGE_LEVEL_LIMIT:
            return 1
        g = 1
        while self.memory // (PAGE_SIZE * g) > AGGREGATED_UNITS:
            g *= 2
        return g

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = list(self.devices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimConfig:
        d = dict(d)
        d["link"] = LinkModel(**d.get("link", {}))
        d["host"] = HostModel(**host_model_fields(d.get("host", {})))
        d["devices"] = tuple(d.get("devices", ()))
        return cls(**d)

    def with_(self, **kw: Any) -> SimConfig:
        return replace(self, **kw)


def simulate(config: SimConfig) -> dict[str, Any]:
    """Run one migration in virtual time; returns ``query()`` plus ``sim`` details."""
    from mig.source import MigrationSource  # noqa: PLC0415

    cpu0 = time.process_time()
    g = config.resolved_granularity()
    if config.memory % (PAGE_SIZE * g):
        raise ValueError(f"memory size {config.memory} is not a multiple of {PAGE_SIZE * g}")
    clock = VirtualClock()
    host = config.host
    memory = SimMemory(config.memory, g, clock, host)
    guest = SimGuest(memory, clock, host, config.workload, config.vcpus, config.seed,
                     config.prefilled)  # fmt: skip
    # The devices run from their creation, before the guest's workload, as
    # the demo's do: through the warm-up a growing device grows.
    specs = list(config.devices)
    devices = create_all(specs, _DmaMemory(guest), clock=clock) if specs else []
    for device in devices if host.device_tick else []:
        device.tick = host.device_tick  # as often as this host's workers write
    if not config.prefilled:
        # A zeroed guest runs its workload while the destination starts;
        # a prefilled one has no zero page left for that to change.
        warmup = host.warmup(config.memory) if config.warmup is None else config.warmup
        guest.warm_up(warmup)
    tracker = SimTracker(memory, clock, host)
    guest.tracker = tracker
    tracker.guest = guest
    handlers = [_SimDeviceHandler(d, device_id=i) for i, d in enumerate(devices, start=1)]
    params = dict(config.params)
    params.setdefault("timeout", 600.0)
    link = SimLink(
        guest,
        tracker,
        clock,
        config.link,
        host,
        params.get("multifd_channels", 2),
        handlers,
        seed=config.seed,
    )
    for h in handlers:
        h.sim_link = link
    params.setdefault("max_bandwidth", 0)
    params["policy"] = config.policy
    source = MigrationSource(guest, handlers, link=link, tracker=tracker, clock=clock, **params)
    if config.start_postcopy:
        source.start_postcopy()
    try:
        q = source.run()
    finally:
        for d in devices:
            d.close()
    q["devices"] = [
        {**d, "type": h.device.model, "exact-stops": h.stats()["exact-stops"]}
        for d, h in zip(q["devices"], handlers, strict=True)
    ]
    q["sim"] = {
        "granularity": g,
        "model": "page" if g == 1 else "aggregated",
        "cpu-seconds": time.process_time() - cpu0,
        "virtual-seconds": clock.now(),
        "link-bandwidth": link.stats()["bandwidth"],
        "verified": link.verified,
        "guest-writes": guest.writes,
    }
    q["config"] = config.to_dict()
    q["workload"] = config.workload
    if link.postcopy is not None:  # post-copy (mig.sim_postcopy): both sides' figures
        q.update(link.postcopy.report(q))
    return q


def parse_bandwidth(text: str | float) -> float:
    """A bandwidth given as a number (bytes/s) or with units (``10Gbit/s``)."""
    return float(text) if isinstance(text, int | float) else float(parse_rate(text))


def parse_memory(text: str | int) -> int:
    return int(text) if isinstance(text, int) else int(parse_size(text))
