"""``mig demo --simulate``'s loopback: the link its prediction migrates over,
the stream's start, and their calibration from real loopback migrations."""

from __future__ import annotations

import pytest

from mig.predict import sim_config
from mig.sim import HostModel, LinkModel, SimConfig, save_host_model, simulate

STAMP = {"commit": "x", "date": "2026-01-01T00:00:00Z"}


def _first_pass(q: dict) -> float:
    """Seconds from the end of setup to the first pass's sync."""
    return q["passes"][0]["time"] - q["setup-time"] / 1000


def _pass_lengths(q: dict) -> list[float]:
    times = [q["setup-time"] / 1000] + [p["time"] for p in q["passes"]]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_a_demo_prediction_migrates_over_the_calibrated_loopback(tmp_path) -> None:
    path = tmp_path / "host-model.json"
    save_host_model(HostModel(loopback_bandwidth=3e8, loopback_per_page=4e-7), path, STAMP)
    args = {"size": 64 << 20, "workload": "idle", "vcpus": 1, "devices": "none",
            "host_model": path}  # fmt: skip
    demo, _ = sim_config({"max_bandwidth": 32 << 20}, demo=True, **args)
    send, _ = sim_config({"max_bandwidth": 32 << 20}, demo=False, **args)
    # mig demo: a loopback destination, under a cap too; mig send: its network is not known.
    assert demo.link.bottleneck == 3e8 and demo.host.send_per_page == 4e-7
    assert send.link.bottleneck == 0 and send.host.send_per_page == 0


def test_the_stream_start_is_paid_once_by_the_first_pages() -> None:
    def run(start: float) -> dict:
        link = LinkModel(bottleneck=200e6, stream_start=start)
        return simulate(SimConfig(memory=16 << 20, link=link, params={"multifd_channels": 1}))

    plain, started = run(0.0), run(0.02)
    assert _first_pass(started) - _first_pass(plain) == pytest.approx(0.02, rel=1e-3)
    assert _pass_lengths(started)[1:] == pytest.approx(_pass_lengths(plain)[1:])


def test_the_stream_start_is_not_send_time_for_the_bandwidth_meter() -> None:
    # The engine's first send starts right after the first decision and
    # takes its bytes' time only (4 MiB of data pages in about 1.5 ms on the
    # loopback). Counted as send time, a 20 ms start made the meter read a
    # sixth of the link's rate after a 4 MiB slice, and a policy whose
    # threshold that made too small kept sending where the engine switched
    # over. Paid before the send, it would give a capped first send 20 ms
    # of tokens the engine's does not have.
    import mig
    from mig.clock import VirtualClock
    from mig.sim import SimGuest, SimLink, SimMemory, SimTracker

    def first_send(cap: int) -> tuple[float, float, int, SimLink]:
        clock, host = VirtualClock(), HostModel(hole_query=0.0)
        memory = SimMemory(16 << 20, 1, clock, host)
        guest = SimGuest(memory, clock, host)
        link = SimLink(guest, SimTracker(memory, clock, host), clock,
                       LinkModel(bottleneck=2e9, stream_start=0.02), host, 1, [])  # fmt: skip
        if cap:
            link.set_max_bandwidth(cap)
        pages = mig.DirtyBitmap.from_indices(list(range(1024)), memory.num_pages)
        wire = link.send_pages(pages, 0)
        return clock.now(), link.busy_time(), wire, link

    now, busy, wire, _ = first_send(0)
    assert now == pytest.approx(0.02 + wire / 2e9)  # the pass pays the start...
    assert busy == pytest.approx(wire / 2e9)  # ...the send does not
    cap = 100 << 20
    now, busy, wire, _ = first_send(cap)
    assert busy == pytest.approx(wire / cap)  # an empty bucket: every byte at the cap
    assert now == pytest.approx(0.02 + wire / cap)


def test_the_loopback_calibration_keeps_the_streams_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mig.sim as sim

    # A host whose bulk pass costs 20 ms to start, 0.5 us per zero page and
    # 1 ns per wire byte; each guest's second run is the best (a loaded run
    # only adds time), and the runs go round by round.
    calls = []
    guests = len(sim.LOOPBACK_GUESTS)

    def migration(size: int, filled: bool, cap: int, demo: bool, pages: slice,
                  workload: str) -> tuple[dict, None]:  # fmt: skip
        calls.append((demo, workload))
        pages = size // 4096
        zero = 0 if filled else pages
        wire = (pages - zero) * 4096 + pages * 8
        extra = 0.0 if (len(calls) - 1) // guests == 1 else 0.05
        t = 0.02 + zero * 0.5e-6 + wire * 1e-9 + extra
        return {"setup-time": 7.0, "passes": [{"time": t + 0.007, "bytes": wire}]}, None

    monkeypatch.setattr(sim, "_idle_loopback_migration", migration)
    bandwidth, per_page, start = sim._loopback_costs()
    assert bandwidth == pytest.approx(1e9)
    assert per_page == pytest.approx(0.5e-6)
    assert start == pytest.approx(0.02)
    # Every run migrates a guest that writes to mig demo's own destination.
    assert sim.LOOPBACK_WORKLOAD.startswith("uniform:rate=")
    assert calls == [(True, sim.LOOPBACK_WORKLOAD)] * 5 * guests


def test_a_model_saved_with_the_retired_populate_fields_still_loads(tmp_path) -> None:
    import json

    from mig.sim import load_host_model

    path = tmp_path / "host-model.json"
    save_host_model(HostModel(loopback_bandwidth=3e8), path, STAMP)
    doc = json.loads(path.read_text())
    doc["host-model"].update(prefault_per_byte=1e-9, prefault_share=0.5, prefault_hello_wait=0.1)
    path.write_text(json.dumps(doc))
    model, _ = load_host_model(path)
    assert model.loopback_bandwidth == 3e8
    doc["host-model"]["no_such_term"] = 1.0
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="no_such_term"):
        load_host_model(path)
