"""The destination's loop during a loopback precopy (``mig.sim_contention``):
sharing the host with the source's precopy slows its device loads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mig.devices import create
from mig.predict import sim_config
from mig.sim import HostModel, save_host_model
from mig.sim_contention import CALIBRATION_DEVICE, contended, initial_load_wait

MIB = 1 << 20


def test_the_factor_scales_the_loops_precopy_seconds() -> None:
    host = replace(HostModel(), device_load_contention=2.5)
    # (Its effect on a simulated migration: ``tests/test_sim_dest_loop.py``.)
    assert contended(host, 0.1) == 0.25
    # A model saved before the factor was measured charges the idle host's.
    assert contended(HostModel(), 0.1) == 0.1


def test_a_capped_stream_is_charged_its_share_of_the_factor() -> None:
    """The factor is measured beside an uncapped stream; a stream at a tenth
    of that rate takes a tenth of the cores, and slows the loop by a tenth of
    what the factor adds."""
    host = replace(HostModel(), device_load_contention=3.0)
    assert contended(host, 0.1, share=1.0) == 0.1 * 3.0
    assert abs(contended(host, 0.1, share=0.1) - 0.1 * 1.2) < 1e-12
    assert contended(host, 0.1, share=0.0) == 0.1
    # A cap above the loopback's rate is the uncapped stream.
    assert contended(host, 0.1, share=4.0) == 0.1 * 3.0


def test_a_capped_migration_does_not_wait_on_the_uncapped_factor() -> None:
    """The live validation's first case (a 64 MiB/s cap, a precopy device):
    its switchover-ack, and so where it stops, does not move with a factor
    measured beside an uncapped stream; one that noise put at 5 charged the
    capped loop five times its load and the simulation another pass."""
    from mig import lab  # noqa: PLC0415
    from mig.sim import simulate  # noqa: PLC0415

    case = lab.live_cases(HostModel())[0].config
    downtimes = [
        simulate(case.with_(host=replace(case.host, device_load_contention=f)))["downtime"]
        for f in (1.0, 5.0)
    ]
    assert abs(downtimes[1] - downtimes[0]) <= 0.05 * downtimes[0], downtimes


def test_a_destination_on_another_host_is_not_contended(tmp_path: Path) -> None:
    """``mig send --simulate``'s destination shares no cores with the source:
    the factor is dropped; ``mig demo --simulate``'s keeps it."""
    path = tmp_path / "host-model.json"
    save_host_model(replace(HostModel(), device_load_contention=3.0), path, {"commit": "test"})
    args = {"size": 64 * MIB, "workload": "idle", "vcpus": 1, "devices": "nic", "host_model": path}
    demo, _ = sim_config({}, demo=True, **args)
    send, _ = sim_config({}, demo=False, **args)
    assert demo.host.device_load_contention == 3.0
    assert send.host.device_load_contention == 1.0


def test_the_calibration_sees_the_initial_data_loaded_after_the_first_pass() -> None:
    """A real loopback migration: the source's first pass released the
    device's initial data (at least its whole state), and the switchover-ack
    came back after the pass."""
    wait, nbytes = initial_load_wait()
    device = create(CALIBRATION_DEVICE)
    try:
        assert nbytes >= device.state_size
    finally:
        device.close()
    assert wait > 0


def test_a_stall_beyond_the_fair_share_is_not_counted_as_sharing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Waits far beyond what sharing the cores can cost (a host's faults
    stalling the loads) leave the factor at the fair-share bound; ordinary
    waits are measured as they are."""
    import mig.sim_contention as sc
    from mig.sim_devices import decode_seconds

    host = HostModel()
    device = create(CALIBRATION_DEVICE)
    try:
        modelled = decode_seconds(host, device, 64 << 20)
    finally:
        device.close()
    bound = sc.fair_share_bound()
    assert bound >= 1.0
    monkeypatch.setattr(sc, "initial_load_wait", lambda: (50 * bound * modelled, 64 << 20))
    assert sc.load_contention(host) == bound
    monkeypatch.setattr(sc, "initial_load_wait", lambda: (1.5 * modelled, 64 << 20))
    assert 1.0 <= sc.load_contention(host) <= min(1.5, bound)
    # Two cores, the calibration's default threads: 2 + 2 channel threads,
    # 2 vCPUs, 2 loops.
    assert sc.fair_share_bound(cores=2) == 4.0
    assert sc.fair_share_bound(cores=64) == 1.0  # never below an idle host
