"""The destination's control loop in virtual time: one thread, one job at a time.

The real destination (``MigrationDestination._serve``) runs one loop that,
in turn, takes in the device records its receive threads drained (``bytes``
handed to Python, queued in the reorder buffer: ``HostModel``'s
``device_receive_per_byte``), loads every record a control message released
(``load_state``: ``mig.sim_devices.decode_seconds``), and handles the next
control message. So, during precopy:

* a ``pass`` that arrives while the loop takes in records waits until that
  take ends; its ``pass-ack`` goes out before the records the pass released
  are loaded, and reports the longest take since the last ``pass-ack``
  (``PassAckTimings.busy``), not their sum;
* the records a ``pass`` released are loaded after it, in one piece of
  work, and only then can ``device-initial-done`` and ``switchover-ack``
  go out: the source may not complete before the destination loaded a
  precopy device's initial data, which it sees only once a ``pass``
  announced it. A device that sends its initial data during the bulk pass
  thus holds the switchover until the bulk pass ended and the destination
  loaded all of it; meanwhile the source goes on with short passes.

Each control message is one turn of that loop too: read, decoded, handled,
its reply encoded and written (``handling`` seconds, the host's
``control_latency``: a round trip's cost beyond the link's RTT, which these
steps on the destination make up with the wake-ups of both ends). A message
that waits behind the loop's work waits behind the messages queued before
it as well: the ``pass`` messages the source sent while the destination
loaded a device's initial data are each handled in turn after that load,
and a ``settle`` sent once the ``switchover-ack`` came waits for all of them.

``DestinationLoop`` keeps that loop's busy spans: the simulated link tells it
each precopy record's receive and load costs as the record arrives, and asks
it when a control message is handled and when released loads end.
"""

from __future__ import annotations

from dataclasses import dataclass

from mig.reorder import DRAIN_BYTES

__all__ = ["POLL", "DestinationLoop"]

# How long the loop waits for a control message before it takes in the
# records that arrived meanwhile (``mig.destination._POLL``).
POLL = 0.05


@dataclass
class _Span:
    start: float
    end: float


class DestinationLoop:
    """Busy spans of the destination's loop, in virtual seconds.

    Records that arrive while the loop waits for a control message are taken
    in when it wakes: on a message, or ``poll`` seconds after it last woke,
    at most ``drain_bytes`` at once (the receiver's device buffer).
    """

    def __init__(
        self, drain_bytes: int = DRAIN_BYTES, poll: float = POLL, handling: float = 0.0
    ) -> None:
        self.drain_bytes = drain_bytes
        self.poll = poll
        self.handling = handling
        self._spans: list[_Span] = []
        # Records arrived and not yet taken in: (arrival, take seconds, bytes).
        self._arrived: list[tuple[float, float, int]] = []
        self._wake: float | None = None  # the loop's next wake-up
        # Load seconds of records taken in and not yet released, per record.
        self._decode: dict[tuple[int, int], float] = {}
        self._longest = 0.0  # the longest span forgotten before a pass-ack
        self._served = 0.0  # when the last control message's handling ends

    @property
    def free_at(self) -> float:
        """When the loop has done every piece of work it was given."""
        return self._spans[-1].end if self._spans else 0.0

    def received(self, now: float, device: int, seq: int, nbytes: int, take: float,
                 load: float) -> None:  # fmt: skip
        """A precopy record of ``nbytes`` arrived at ``now``: taking it in
        costs ``take`` seconds, loading it once released ``load``."""
        self._advance(now)
        self._decode[(device, seq)] = load
        self._arrived.append((now, take, nbytes))
        if self._wake is None:
            self._wake = now + self.poll

    def _advance(self, now: float) -> None:
        """Take in, wake by wake, what arrived before each wake up to ``now``."""
        while self._arrived and self._wake is not None and self._wake <= now:
            wake = max(self._wake, self.free_at)
            seconds, nbytes, n = 0.0, 0, 0
            for at, take, size in self._arrived:
                if at > wake or (n and nbytes + size > self.drain_bytes):
                    break
                seconds, nbytes, n = seconds + take, nbytes + size, n + 1
            del self._arrived[:n]
            if n:
                self._add(_Span(wake, wake + seconds))
                self._wake = wake + seconds + self.poll
            else:
                self._wake = self._arrived[0][0] + self.poll if self._arrived else None

    def handled_at(self, now: float) -> float:
        """When a control message arriving at ``now`` is handled: once the
        work in progress then ends, and the work queued right behind it
        (the messages before it, the loads they released). Its handling is
        work of the loop; the loop then takes in what arrived meanwhile."""
        self._advance(now)
        # Messages are taken in order: none before the one ahead was handled
        # (its span may already be reported by a ``pass-ack`` sent then).
        at = max(now, self._served)
        for span in self._spans:  # in order, each after the one before
            if span.start <= at < span.end:
                at = span.end
        self._served = at + self.handling
        if self.handling:
            self._add(_Span(at, self._served))
        if self._arrived:
            self._wake = self._served
        return at

    def answer(self, at: float) -> float:
        """The ``busy`` of a ``pass-ack`` sent at ``at``: the longest span
        that ended since the last one."""
        self._advance(at)
        done = [s for s in self._spans if s.end <= at]
        busy = max([self._longest, *(s.end - s.start for s in done)])
        self._spans = [s for s in self._spans if s.end > at]
        self._longest = 0.0
        return busy

    def release(self, at: float, records: list[tuple[int, int]]) -> float:
        """Load ``records`` (released by a message handled at ``at``) in one
        piece of work, after taking in what arrived before it; returns when
        it ends (``at`` when none of them had a load to do)."""
        self._advance(at)
        seconds = sum(self._decode.pop(r, 0.0) for r in records)
        if not seconds:
            return at
        start = max(at, self.free_at)
        self._add(_Span(start, start + seconds))
        return start + seconds

    def pending_load(self, records: list[tuple[int, int]]) -> float:
        """Load seconds of ``records``, forgotten here: they are loaded in
        another term (the stop-copy's, after ``complete``)."""
        return sum(self._decode.pop(r, 0.0) for r in records)

    def _add(self, span: _Span) -> None:
        # Spans are kept until a pass-ack reports them; the longest of those
        # forgotten before one stays in ``_longest``. Only work done by the
        # time the new span starts is forgotten: work still queued delays
        # the messages behind it (``handled_at``).
        while len(self._spans) > 64 and self._spans[0].end <= span.start:
            old = self._spans.pop(0)
            self._longest = max(self._longest, old.end - old.start)
        self._spans.append(span)
