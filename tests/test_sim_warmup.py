"""The warm-up is timed from the demo guest's workload start, not the destination's spawn."""

from __future__ import annotations

import time
from typing import Any

import pytest

import mig._mig
import mig.demo_destination
import mig.devices
from mig import sim_warmup

START_UP = 0.3  # the fake destination's start-up, seconds
BUILD = 0.2  # the fake source's device build, seconds


class FakeDestination:
    """Ready ``START_UP`` seconds after it was spawned."""

    specs: list[str] = []

    def __init__(self, size: int, devices: str, *args: Any, **kw: Any) -> None:
        self.spawned = time.perf_counter()
        FakeDestination.specs.append(devices)

    def uri(self) -> str:
        time.sleep(max(0.0, self.spawned + START_UP - time.perf_counter()))
        return "tcp:127.0.0.1:1"

    def kill(self) -> None:
        pass


class FakeDevice:
    def close(self) -> None:
        pass


class FakeGuest:
    def __init__(self, *args: Any, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


builds: list[str] = []


def slow_build(spec: str, *args: Any, **kw: Any) -> list[FakeDevice]:
    builds.append(spec)
    time.sleep(BUILD)
    return [FakeDevice()]


@pytest.fixture
def fake_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mig.demo_destination, "DemoDestination", FakeDestination)
    monkeypatch.setattr(mig.devices, "create_all", slow_build)
    monkeypatch.setattr(mig._mig, "WorkloadGuest", FakeGuest)


@pytest.mark.usefixtures("fake_demo")
def test_the_source_s_build_overlapping_the_start_up_is_no_warm_up() -> None:
    ran = sim_warmup._warmup_seconds(16 << 20, "nic")
    # The workload starts after the build: it runs the start-up's rest only.
    assert START_UP - BUILD - 0.02 <= ran < START_UP - BUILD + 0.08


@pytest.mark.usefixtures("fake_demo")
def test_the_calibration_builds_the_same_devices_on_both_sides() -> None:
    FakeDestination.specs.clear()
    builds.clear()
    sim_warmup._warmup_seconds(16 << 20)
    # None by default: each side's build overlaps the other's start.
    assert FakeDestination.specs == [sim_warmup.WARMUP_DEVICES] == ["none"]
    assert builds == []
    sim_warmup._warmup_seconds(16 << 20, "nic")
    assert FakeDestination.specs[-1] == "nic" and builds == ["nic"]


@pytest.mark.usefixtures("fake_demo")
def test_the_costs_solve_base_and_per_byte_from_two_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = sim_warmup.WARMUP_SIZES
    monkeypatch.setattr(sim_warmup, "_warmup_seconds", lambda size: 0.1 + 2e-10 * size)
    base, per_byte = sim_warmup.warmup_costs(runs=1)
    assert per_byte == pytest.approx(2e-10)
    assert base == pytest.approx(0.1)
