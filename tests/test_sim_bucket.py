"""The simulated sender token bucket follows the engine's rule (rust/src/sender.rs ``Bucket``)."""

from __future__ import annotations

import numpy as np
import pytest

import mig
from mig.clock import VirtualClock
from mig.sim import HostModel, LinkModel, SimGuest, SimLink, SimMemory, SimTracker
from mig.sim_bucket import BURST_SECONDS, SimBucket

MIB = 1 << 20
RATE = 64 * MIB


def test_tokens_accrue_while_idle_up_to_the_burst() -> None:
    b = SimBucket(RATE, now=0.0)
    assert b.level(0.0) == 0.0  # a new bucket is empty
    assert b.level(0.01) == pytest.approx(0.01 * RATE)
    assert b.level(10.0) == pytest.approx(BURST_SECONDS * RATE)


def test_a_new_rate_starts_an_empty_bucket() -> None:
    b = SimBucket(RATE, now=0.0)
    assert b.level(1.0) > 0
    b.set_rate(2 * RATE, now=1.0)
    assert b.level(1.0) == 0.0
    assert b.level(1.01) == pytest.approx(0.01 * 2 * RATE)


def test_the_burst_is_never_below_one_packet() -> None:
    # A cap so low that 50 ms of it is less than a packet: the engine's
    # ``max(rate * 0.05, n)`` lets a whole packet's tokens pile up.
    packet = 128 * 4096
    b = SimBucket(1 * MIB, now=0.0, packet=packet)
    assert b.level(100.0) == pytest.approx(packet)


def test_a_full_bucket_lets_the_burst_leave_at_the_link_s_pace() -> None:
    b = SimBucket(RATE, now=0.0)
    n = 8 * MIB
    # Full after an idle second: only what exceeds the burst waits for tokens.
    dt = b.send(n, now=1.0, unpaced=0.001)
    assert dt == pytest.approx((n - BURST_SECONDS * RATE) / RATE)
    assert b.level(1.0 + dt) == pytest.approx(0.0, abs=1.0)
    # Right after, the bucket is empty: every byte pays.
    assert b.send(n, now=1.0 + dt, unpaced=0.001) == pytest.approx(n / RATE)


def test_a_send_slower_than_the_cap_fills_the_bucket() -> None:
    # The old model refilled only between sends: a send that takes longer
    # than its bytes' tokens (zero pages the sender scans, a slow link)
    # left the bucket empty. The engine's bucket accrues all the time.
    b = SimBucket(RATE, now=0.0)
    dt = b.send(1 * MIB, now=0.0, unpaced=0.2)  # 200 ms for 16 ms of tokens
    assert dt == pytest.approx(0.2)
    assert b.level(dt) == pytest.approx(BURST_SECONDS * RATE)
    # So the next send's first burst leaves at once.
    n = 4 * MIB
    assert b.send(n, now=dt, unpaced=0.0) == pytest.approx((n - BURST_SECONDS * RATE) / RATE)


def test_a_send_within_the_tokens_is_the_link_s_alone() -> None:
    b = SimBucket(RATE, now=0.0)
    b.level(1.0)
    assert b.send(1 * MIB, now=1.0, unpaced=0.003) == pytest.approx(0.003)
    # What is left: the burst, less what was taken, plus what accrued.
    assert b.level(1.003) == pytest.approx(BURST_SECONDS * RATE - MIB + 0.003 * RATE)


def test_no_rate_is_no_cap() -> None:
    b = SimBucket(0.0, now=0.0)
    assert b.send(100 * MIB, now=0.0, unpaced=0.01) == 0.01
    assert b.level(5.0) == 0.0


def _link() -> tuple[VirtualClock, SimLink, SimMemory]:
    clock, host = VirtualClock(), HostModel(send_per_page=10e-6, hole_query=0.0)
    memory = SimMemory(128 * MIB, 1, clock, host)
    guest = SimGuest(memory, clock, host, prefilled=False)  # never written: zero pages
    link = SimLink(guest, SimTracker(memory, clock, host), clock, LinkModel(), host, 1, [])
    link.set_max_bandwidth(RATE)
    return clock, link, memory


def test_a_link_that_scanned_zero_pages_sends_its_next_pages_from_a_full_bucket() -> None:
    # 16384 zero pages cost the sender 164 ms of scanning but few tokens:
    # the engine's bucket is full after them, so the next 1024 data pages
    # (4 MiB) leave BURST_SECONDS of the cap early. The old model, which
    # refilled only while no send was under way, charged them in full.
    clock, link, memory = _link()
    zero = mig.DirtyBitmap.from_indices(np.arange(16384, dtype=np.uint64), memory.num_pages)
    link.send_pages(zero, 0)
    link.guest.written(np.arange(16384, 17408, dtype=np.int64))
    data = mig.DirtyBitmap.from_indices(np.arange(16384, 17408, dtype=np.uint64), memory.num_pages)
    t0 = clock.now()
    wire = link.send_pages(data, 0)
    assert wire > 4 * MIB
    assert clock.now() - t0 == pytest.approx(wire / RATE - BURST_SECONDS, rel=0.01)
