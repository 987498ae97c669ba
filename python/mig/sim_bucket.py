"""The sender's token bucket (``rust/src/sender.rs``, ``Bucket``) in virtual time.

The engine's rule, which this model follows:

* one bucket shared by every channel; ``max_bandwidth`` is its rate, 0 none;
* a new rate (the sender's construction, ``set_max_bandwidth``) starts an
  empty bucket;
* tokens accrue at the rate all the time, whether or not anything is sent,
  up to ``BURST_SECONDS`` of the rate (or one packet, if that is larger);
* a send of ``n`` bytes takes ``n`` tokens at once, going into debt, and
  waits until the debt is paid off.

So a sender that went slower than the cap for a while (an idle link between
passes, a sync, a settle, a pause, but also a pass whose zero pages cost the
sender more time than their few wire bytes cost tokens) has a full bucket,
and its next ``BURST_SECONDS`` of the cap's bytes leave at the link's own
pace. The final pass, inside the downtime, is the send that gains most.

A send is modelled as a fluid: over ``[now, now + dt]`` the bytes cannot
leave faster than the link and the sender allow (``unpaced`` seconds for all
of them) nor faster than the tokens held at ``now`` plus those that accrue,
so ``dt = max(unpaced, (n - tokens) / rate)``; the tokens left are what
accrued less what was taken, capped at the burst.
"""

from __future__ import annotations

__all__ = ["BURST_SECONDS", "SimBucket"]

# Seconds of the rate the engine's bucket holds at most (``Bucket::take``).
BURST_SECONDS = 0.05


class SimBucket:
    """Tokens (bytes) of a capped sender, as of virtual time ``at``."""

    def __init__(self, rate: float = 0.0, now: float = 0.0, packet: int = 0) -> None:
        # The largest single take: the engine's burst is never below one packet.
        self.packet = int(packet)
        self.rate = 0.0
        self.tokens = 0.0
        self.at = now
        self.set_rate(rate, now)

    def set_rate(self, rate: float, now: float) -> None:
        """A new rate starts an empty bucket, as ``Bucket::set_rate`` does."""
        self.rate = float(rate)
        self.tokens, self.at = 0.0, now

    @property
    def burst(self) -> float:
        """The most tokens the bucket holds."""
        return max(self.rate * BURST_SECONDS, float(self.packet))

    def level(self, now: float) -> float:
        """Tokens held at ``now`` (what accrued since ``at``, up to the burst)."""
        if not self.rate:
            return 0.0
        return min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)

    def send(self, nbytes: float, now: float, unpaced: float, slowdown: float = 1.0) -> float:
        """Seconds a send of ``nbytes`` starting at ``now`` takes, when the
        link and the sender alone would take ``unpaced`` seconds; the bucket
        is left as of the send's end. ``slowdown`` stretches the paced part
        (the link running below the cap for a while)."""
        if not self.rate:
            return unpaced
        held = self.level(now)
        paced = max(0.0, nbytes - held) / self.rate * slowdown
        dt = max(unpaced, paced)
        self.tokens = min(self.burst, held + self.rate * dt - nbytes)
        self.at = now + dt
        return dt
