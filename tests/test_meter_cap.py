"""The bandwidth meter under a ``max_bandwidth`` cap: a burst is not bandwidth.

A capped link first takes a burst without waiting (the sender's token bucket
holds up to 50 ms of tokens gathered while the link idled, and the socket
buffers take the first megabytes at once), then backpressures at the cap.
Read from one short slice, the burst looks like several times the cap; a
policy that believed it switched over with all of memory pending.
"""

from __future__ import annotations

from typing import Any

import pytest
from loopkit import SoftTracker, VirtualGuest, VirtualLink

import mig
from mig.clock import VirtualClock
from mig.policies import Decision, Policy, PolicyView
from mig.precopy import Precopy
from mig.source import MigrationSource
from mig.stats import BandwidthMeter

MIB = 1 << 20
CAP = 20_000_000  # bytes/s
BURST = 8 * MIB  # what the link takes before it backpressures
BURST_RATE = 10e9  # bytes/s while it does


class BurstLink(VirtualLink):
    """Takes the first ``BURST`` bytes at ``BURST_RATE``, then the cap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.burst_left = BURST

    def _charge(self, nbytes: int) -> None:
        fast = min(nbytes, self.burst_left)
        self.burst_left -= fast
        rest = nbytes - fast
        dt = fast / BURST_RATE + (rest / min(self.bandwidth, self.cap) if rest else 0.0)
        self._busy += dt
        self._bytes += nbytes
        self.clock.advance(dt)


class Recording(Policy):
    """The real policy, with every view it was shown kept for the test."""

    def __init__(self, base: Policy) -> None:
        self.base = base
        self.name = base.name
        self.views: list[PolicyView] = []

    def decide(self, view: PolicyView) -> Decision:
        self.views.append(view)
        return self.base.decide(view)


def test_the_meter_never_reads_above_the_cap() -> None:
    meter = BandwidthMeter()
    # 3.4 MB in 2.5 ms of send time (the burst), then the link at the cap.
    sent, busy = 3_400_000, 0.0025
    readings = [(sent, busy)]
    for _ in range(40):
        sent += CAP // 100
        busy += 0.01
        readings.append((sent, busy))
    for transferred, seconds in readings:
        meter.update(transferred, seconds, CAP)
        assert meter.estimate() <= CAP, (transferred, seconds, meter.estimate())
        assert meter.conservative() <= CAP
        assert meter.last_sample <= CAP
    assert meter.samples >= 3
    assert meter.estimate() == pytest.approx(CAP, rel=0.01)


def test_a_lowered_cap_bounds_the_estimate_at_once() -> None:
    meter = BandwidthMeter()
    meter.update(10_000_000, 0.1, 0)  # uncapped: 100 MB/s
    assert meter.estimate() == pytest.approx(100e6)
    meter.update(10_000_000, 0.1, CAP)
    assert meter.estimate() == CAP


def test_a_burst_does_not_switch_over_with_memory_pending() -> None:
    size = 64 * MIB
    clock = VirtualClock()
    src, dst = mig.GuestMemory(size), mig.GuestMemory(size)
    tracker = SoftTracker(src)
    guest = VirtualGuest(src, clock, tracker, rate=200.0)
    link = BurstLink(src, dst, clock, bandwidth=1e9)
    source = MigrationSource(
        guest,
        [],
        link=link,
        tracker=tracker,
        clock=clock,
        policy="assume-zero-device",
        max_bandwidth=CAP,
        timeout=120,
    )
    policy = Recording(source.policy)
    source.policy = policy
    q = source.run()
    assert q["status"] == "completed", q.get("error-desc")
    assert src.digest() == dst.digest()
    known = [v for v in policy.views if v.bandwidth > 0]
    assert known, "the policy never saw a bandwidth"
    assert max(v.bandwidth for v in known) <= CAP
    # The first pass ended (the policy's exact sync) only once what was left
    # fits the limit at the cap: not after the burst, with memory pending.
    limit = source.settings.downtime_limit / 1000
    first = q["passes"][0]
    assert first["estimate"] <= CAP * limit, first
    assert q["downtime"] / 1000 <= limit, q["downtime-breakdown"]


class _Sized:
    """A handler's sizes: ``estimate`` cheap, ``running`` its exact size."""

    def __init__(self, name: str, estimate: int, running: int) -> None:
        self.name, self.role, self.exact_needs_stop = name, "device", False
        self.estimate, self.running = estimate, running

    def pending_estimate(self) -> int:
        return self.estimate

    def pending_exact(self, guest_stopped: bool) -> int:
        return self.running


def test_a_catch_up_keeps_a_device_without_precopy_data_in_the_plan() -> None:
    # A device with no precopy data estimates 0 and still sends its whole
    # state in the stop-copy: the plan that restarts after a catch-up sync
    # counts that state, or predicted-downtime leaves its bytes out.
    ram = _Sized("ram", 4 * MIB, 4 * MIB)
    device = _Sized("fixed0", 0, 24 * MIB)
    precopy = Precopy.__new__(Precopy)
    precopy.ram, precopy.devices = ram, [device]  # type: ignore[assignment]
    precopy.reestimate()
    assert precopy.pending_estimate == 4 * MIB
    assert precopy.pending_exact == 28 * MIB
