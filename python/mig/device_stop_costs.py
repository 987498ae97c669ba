"""``DeviceStopCosts``: what each device's stop-copy will cost, before it is paid.

A device's stop-copy work (``device-state`` at the source, counted again in
``load`` for the destination, which validates the same bytes) is learned
where it is paid: at a stopped exact size or a switchover
(``Precopy.timed_device_work``). Before the first, the plan would count it as
nothing, and a default demo's first switchover pays milliseconds the plan
never saw. So until then each device's term is measured from what the loop
can see with the guest running:

- the time the device's precopy reads took per byte, outside the sends
  (``iterated``): stop-copy produces its bytes the same way, so its pending
  bytes cost the same per byte;
- the fixed stop work the device measured itself
  (``MigrationDevice.stop_copy_seconds``: for a sample device its END
  record's combining of its cell hashes), which no precopy read pays.

Both are measurements in the loop's clock (the device's own figure aside),
never constants, and a real stop replaces them for that device.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeviceStopCosts"]


@dataclass
class _Production:
    seconds: float = 0.0
    bytes: int = 0


class DeviceStopCosts:
    """Per device: precopy production per byte and the device's own stop figure."""

    def __init__(self) -> None:
        self._production: dict[str, _Production] = {}

    def iterated(self, name: str, seconds: float, nbytes: int) -> None:
        """A precopy read of ``nbytes`` took ``seconds`` outside the link's sends."""
        if nbytes <= 0:
            return
        p = self._production.setdefault(name, _Production())
        p.seconds += max(0.0, seconds)
        p.bytes += nbytes

    def seconds_per_byte(self, name: str) -> float:
        p = self._production.get(name)
        return p.seconds / p.bytes if p is not None and p.bytes else 0.0

    def expected(self, name: str, pending: int, fixed: float | None) -> float:
        """Seconds the device's stop-copy should take with ``pending`` bytes
        left: ``fixed``, the device's own figure (None: it reports none), plus
        the pending bytes at the measured precopy production rate."""
        return (fixed or 0.0) + self.seconds_per_byte(name) * max(0, pending)
