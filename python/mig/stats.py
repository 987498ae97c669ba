"""Statistics: bandwidth windows, pass records, ``query-migrate`` fields.

Bandwidth choice: the loop samples ``bytes sent / seconds spent inside send
calls`` over windows of at least ``WINDOW`` (100 ms, QEMU's ``BUFFER_DELAY``)
of send time, then smooths the samples with an exponentially weighted moving
average (``ALPHA`` = 0.3: a new sample moves the estimate by 30 %, so one
outlier window cannot halve or double the threshold, while a real change is
followed within ~5 windows). The denominator is send time, not wall time:
the loop's own work (dirty syncs, policy decisions, guest stops for an exact
size) would otherwise read as a slower link, which is the underestimate the
QEMU thread complains about. A link capped by ``max_bandwidth`` spends the
cap's waits inside the send calls, so the estimate converges to the cap; it
never reads above it (``update``'s ``cap``): the sender's token bucket lets
up to 50 ms of tokens gathered while the link idled (setup, syncs, decisions)
leave at once, and the socket buffers take a first burst without waiting, so
a short window can read several times the cap, which no stop-copy gets.
Decisions use ``conservative()``: the smoothed value less two smoothed mean
absolute deviations of the samples, so a link that varies gets a threshold
with a margin in proportion to how much it varies (never below half the
estimate: one wild first window must not stall a migration), a steady one none.

Downtime is not only bytes over bandwidth. ``SwitchoverCosts`` holds the
fixed costs of a switchover, each measured by the source as it happens: the
guest pause, the final tracker sync, the whole-memory digest (the source's,
and the destination's over the same bytes), each device's stop-copy
production (its destination validates the same bytes), and the control round
trips of ``complete``/``ready`` and ``go``/``resumed``. The loop subtracts
their sum from the downtime limit before it converts the limit into a byte
threshold, so every policy decides against the time that is really left for
the bytes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["WINDOW", "ALPHA", "BandwidthMeter", "PassRecord", "SwitchoverCosts", "digest_cost"]

WINDOW = 0.100
ALPHA = 0.3


class BandwidthMeter:
    """Smoothed bandwidth from cumulative (bytes, send-seconds) readings."""

    def __init__(self, window: float = WINDOW, alpha: float = ALPHA) -> None:
        if window <= 0 or not 0 < alpha <= 1:
            raise ValueError("window must be > 0 and alpha in (0, 1]")
        self.window = window
        self.alpha = alpha
        self.smoothed = 0.0
        self.deviation = 0.0
        self.last_sample = 0.0
        self.samples = 0
        self._bytes0 = 0
        self._busy0 = 0.0
        self._bytes = 0
        self._busy = 0.0
        self.cap = 0.0

    def update(self, transferred: int, busy: float, cap: float = 0.0) -> bool:
        """Feed cumulative totals and the link's ``max_bandwidth`` now
        (bytes/s, 0: none), which bounds every figure; returns True when a
        window closed."""
        self._bytes, self._busy = transferred, busy
        self.cap = max(0.0, float(cap))
        span = busy - self._busy0
        if span < self.window:
            return False
        sample = self._capped((transferred - self._bytes0) / span)
        self.last_sample = sample
        if self.samples == 0:
            self.smoothed = sample
        else:
            miss = abs(sample - self.smoothed)
            self.deviation = self.alpha * miss + (1 - self.alpha) * self.deviation
            self.smoothed = self.alpha * sample + (1 - self.alpha) * self.smoothed
        self.samples += 1
        self._bytes0, self._busy0 = transferred, busy
        return True

    def _capped(self, rate: float) -> float:
        """A rate above the cap is a burst (bucket allowance, socket
        buffers), not what the link carries: the cap, then."""
        return min(rate, self.cap) if self.cap > 0 else rate

    def estimate(self) -> float:
        """Bytes/s: the smoothed value, or the open window's rate before the
        first one closes; never above the cap (it may have been lowered)."""
        if self.samples:
            return self._capped(self.smoothed)
        span = self._busy - self._busy0
        return self._capped((self._bytes - self._bytes0) / span) if span > 0 else 0.0

    def conservative(self) -> float:
        """Bytes/s to plan a switchover with: the estimate less two deviations."""
        est = self.estimate()
        return max(est - 2 * self.deviation, 0.5 * est)


@dataclass(frozen=True)
class PassRecord:
    """One pass: the dirty sync that ends it and what was sent since the last one."""

    number: int
    time: float
    dirty_pages: int
    remaining: int
    bytes: int
    bandwidth: float
    estimate: int | None
    exact: int | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dirty-pages"] = d.pop("dirty_pages")
        return d


def digest_cost(memory: Any) -> float:
    """Wall seconds of one whole-memory digest, taken now.

    Wall time, not the thread's CPU time: the switchover pays the digest in
    wall time, on a host whose other load does not stop with the guest. While
    the guest runs its vCPUs compete too, so the figure errs long (safe).
    """
    t0 = time.perf_counter()
    memory.digest()
    return time.perf_counter() - t0


@dataclass
class SwitchoverCosts:
    """Fixed switchover costs in seconds, as last measured (0 until measured),
    named as the terms of ``downtime-breakdown``; each is measured where it
    is paid.

    ``digest`` is the source's whole-memory digest, inside the downtime only
    when ``verify`` is strict (``source_digest``): the O(memory) cost of
    strict. ``dest-digest`` is the destination's chunk root before
    ``ready`` (strict checks it against the source's digest): it rehashes
    only the chunks the final pass rewrote (``settle`` brought every earlier
    one up to date before the pause), ``chunk_seconds`` (what one chunk took
    at the last ``settled``) times the final pass's pages (``final_pages``,
    each in its own chunk at worst). Before a first ``settled``: strict,
    ``dest_digest``, the destination's own timing of a whole digest
    (``pass-ack``), the source's figure standing in until then; otherwise
    ``dest_root``, what the last ``ready`` reported (0 before a first
    switchover).
    ``final_sync`` is the least that one of the last few tracker syncs took
    (the loop sets it, ``RamHandler.final_sync_estimate``). Those syncs
    write-protected again what they found, the final one does not
    (``DirtyTracker.sync_final``), and they found what a pass or the
    settle's wait let the guest dirty, the final one only what was written
    after them (a written page costs the walk far more than an untouched
    one), so the figure errs long by that work.
    ``drain`` is the destination's wait for the end records once
    ``complete`` arrived: what it measured at the last switchover (0 before
    one). ``settle`` drained the backlog before the pause, so only the final
    pass's tail is left, and its bytes are planned in ``final-ram``.
    ``devices`` maps a device to the seconds its stop-copy state took to
    produce (stopping it, reading its state, outside the sends);
    ``expected_devices`` is, for a device not yet stopped, what its stop-copy
    should take (``mig.device_stop_costs``: its precopy production per byte
    times its pending bytes, plus the fixed stop work it measured itself);
    ``device-state`` takes the paid figure where there is one, else the
    expected one. ``load`` counts it again for the destination, which
    validates the same bytes, plus ``dest_load``, the destination's own work
    at the last switchover.
    ``end_records`` is the source's sending of the end records and
    ``complete``; ``handshake`` the control round trips of
    ``complete``/``ready`` and ``go``/``resumed``. ``dest_busy`` is how long
    the destination's loop is away from the control channel (loading device
    state), which ``complete`` waits for only when the switchover starts
    without a ``settle``: from a guest already stopped. From a running
    guest the switchover settles first, with the guest still running, so
    the destination's loop is idle when the pause comes (``settle_first``,
    which the loop sets as it plans).
    """

    pause: float = 0.0
    final_sync: float = 0.0
    digest: float = 0.0
    handshake: float = 0.0
    dest_busy: float = 0.0
    settle_first: bool = True
    dest_digest: float | None = None
    dest_root: float | None = None
    chunk_seconds: float | None = None
    final_pages: int = 0
    drain: float = 0.0
    dest_load: float = 0.0
    end_records: float = 0.0
    devices: dict[str, float] = field(default_factory=dict)
    expected_devices: dict[str, float] = field(default_factory=dict)
    source_digest: bool = True  # verify strict: the source digests in the downtime

    @property
    def device(self) -> float:
        expected = {k: v for k, v in self.expected_devices.items() if k not in self.devices}
        return sum(self.devices.values()) + sum(expected.values())

    @property
    def dest_digest_cost(self) -> float:
        """The destination's root before ``ready``."""
        if self.chunk_seconds is not None:
            return self.chunk_seconds * self.final_pages
        if self.source_digest:
            return self.digest if self.dest_digest is None else self.dest_digest
        return self.dest_root or 0.0

    @property
    def load(self) -> float:
        """The destination's work besides its wait and its digest."""
        return self.device + self.dest_load

    def terms(self) -> dict[str, float]:
        """Each term of the sum, seconds, named as in ``downtime-breakdown``."""
        out = {
            "pause": self.pause,
            "final-sync": self.final_sync,
            "device-state": self.device,
        }
        if self.source_digest:
            out["digest"] = self.digest
        out["end-records"] = self.end_records
        out["drain"] = self.drain
        out["dest-digest"] = self.dest_digest_cost
        out["load"] = self.load
        out["handshake"] = self.handshake + (0.0 if self.settle_first else self.dest_busy)
        return out

    def total(self) -> float:
        return sum(self.terms().values())
