"""The vCPU calibration (``mig.sim._vcpu_costs``): a guest that never ran
while it was measured gives no sample."""

from __future__ import annotations

from typing import Any

import pytest

import mig._mig
from mig.sim import _vcpu_costs


class _Guest:
    """A workload guest whose pauses take ``pause`` seconds and that made
    ``writes`` writes per second."""

    def __init__(self, pause: float, writes: float) -> None:
        self._pause, self._writes = pause, writes

    def __enter__(self) -> _Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def pause(self) -> float:
        return self._pause

    def resume(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"rate": self._writes}


def _guests(monkeypatch: pytest.MonkeyPatch, *guests: _Guest) -> list[_Guest]:
    made: list[_Guest] = []
    queue = list(guests)

    def make(mem: Any, vcpus: int, workload: str) -> _Guest:
        made.append(queue.pop(0))
        return made[-1]

    monkeypatch.setattr(mig._mig, "WorkloadGuest", make)
    return made


def test_a_guest_that_made_no_writes_is_measured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first guest's vCPU stalled: its pauses timed the stall.
    made = _guests(monkeypatch, _Guest(0.150, 0.0), _Guest(60e-6, 4e7))
    assert _vcpu_costs(object()) == (pytest.approx(60e-6), 4e7)
    assert len(made) == 2


def test_a_guest_that_never_ran_fails_the_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    _guests(monkeypatch, *[_Guest(0.150, 0.0)] * 3)
    with pytest.raises(RuntimeError, match="made no writes in 3 tries"):
        _vcpu_costs(object())
