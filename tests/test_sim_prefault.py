"""The demo destination's prefault in the simulator (``mig.sim_prefault``) and
the phases of ``mig demo --simulate`` that it and the loopback set."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mig.clock import VirtualClock
from mig.predict import sim_config
from mig.sim import HostModel, LinkModel, SimConfig, save_host_model, simulate
from mig.sim_prefault import MIN_SHARE, Phases, PrefaultContention, PrefaultPair, prefault_share

STAMP = {"commit": "x", "date": "2026-01-01T00:00:00Z"}


def test_work_during_the_populate_takes_longer_and_advances_it() -> None:
    clock = VirtualClock()
    populate = PrefaultContention(clock, work=0.3, share=0.25)
    # 0.1 s of the source's work overlaps the populate: it takes 0.4 s.
    assert populate.advance(0.1) == pytest.approx(0.4)
    assert clock.now() == pytest.approx(0.4)
    assert populate.remaining == pytest.approx(0.2)
    # Waiting (a round trip) leaves the core to the populate: full pace.
    clock.advance(0.15)
    assert populate.remaining == pytest.approx(0.05)
    # Work that outlasts it: only the overlapped part is stretched.
    assert populate.advance(0.1) == pytest.approx(0.05 / 0.25 + 0.05)
    assert populate.remaining == 0
    assert populate.advance(0.1) == pytest.approx(0.1)
    assert populate.stretched == pytest.approx(0.3 + 0.15)


def test_a_share_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="share"):
        PrefaultContention(VirtualClock(), work=1.0, share=0.0)


def test_the_share_and_hello_wait_come_from_the_median_pairs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mig.sim_prefault as sp

    # Pairs (contended, alone): first-pass ratios 0.10/0.30, 0.20/0.90,
    # 0.12/0.40 (median 0.3); setup differences 0.14, 0.18, 0.02 (median 0.14).
    runs = iter([Phases(0.15, 0.30), Phases(0.01, 0.10), Phases(0.20, 0.90),
                 Phases(0.02, 0.20), Phases(0.05, 0.40), Phases(0.03, 0.12)])  # fmt: skip
    monkeypatch.setattr(sp, "_first_phases", lambda size, wait: next(runs))
    share, wait, pairs = prefault_share(1e-9, runs=3)
    assert share == pytest.approx(0.3)
    assert wait == pytest.approx(0.14)
    assert pairs[0] == PrefaultPair(Phases(0.15, 0.30), Phases(0.01, 0.10))
    # A host without the populate pays nothing for it; noise stays bounded.
    assert prefault_share(0.0) == (1.0, 0.0, [])
    runs = iter([Phases(0.0, 10.0), Phases(0.1, 0.01)] * 3)
    assert prefault_share(1e-9, runs=3)[:2] == (MIN_SHARE, 0.0)


def _idle(prefault: bool, host: HostModel, cap: float = 0.0, filled: bool = False) -> dict:
    params = {"max_bandwidth": cap, "multifd_channels": 1} if cap else {"multifd_channels": 1}
    config = SimConfig(
        memory=64 << 20,
        host=host,
        link=LinkModel(bottleneck=200e6, rtt=100e-6),
        params=params,
        prefilled=filled,
        warmup=0.0,
        prefault=prefault,
    )
    return simulate(config)


def _first_pass(q: dict) -> float:
    """Seconds from the end of setup to the first pass's sync."""
    return q["passes"][0]["time"] - q["setup-time"] / 1000


def test_the_first_pass_keeps_only_the_share_while_the_destination_populates() -> None:
    # A populate longer than the whole migration: every second of the
    # source's work (the bulk pass: its pages and its sync) takes 1 / share.
    host = HostModel(prefault_per_byte=1e-6, prefault_share=0.4, send_per_page=1e-6,
                     prefault_hello_wait=0.0)  # fmt: skip
    alone, contended = _idle(False, host), _idle(True, host)
    assert _first_pass(contended) == pytest.approx(_first_pass(alone) / 0.4, rel=1e-3)
    # The setup's own work is stretched the same way (its round trip is not).
    assert contended["setup-time"] > alone["setup-time"] * 2
    assert contended["sim"]["prefault-stretch"] > 0
    # A populate already done costs nothing.
    done = _idle(True, HostModel(prefault_per_byte=0.0, send_per_page=1e-6))
    assert done["total-time"] == pytest.approx(alone["total-time"])


def test_a_capped_link_waits_for_tokens_at_the_caps_pace_whatever_the_populate() -> None:
    # A filled guest at 16 MiB/s: 4 s of waiting for tokens, which the
    # populate does not lengthen; only the sender's own work would be.
    host = HostModel(prefault_per_byte=1e-6, prefault_share=0.1)
    alone = _idle(False, host, cap=16 << 20, filled=True)
    contended = _idle(True, host, cap=16 << 20, filled=True)
    assert _first_pass(alone) > 3.5
    assert _first_pass(contended) == pytest.approx(_first_pass(alone), rel=0.05)


def test_a_demo_prediction_models_its_destinations_populate_and_its_loopback(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "host-model.json"
    save_host_model(HostModel(loopback_bandwidth=3e8, loopback_per_page=4e-7), path, STAMP)
    args = {"size": 64 << 20, "workload": "idle", "vcpus": 1, "devices": "none",
            "host_model": path}  # fmt: skip
    demo, _ = sim_config({"max_bandwidth": 32 << 20}, demo=True, **args)
    send, _ = sim_config({"max_bandwidth": 32 << 20}, demo=False, **args)
    # mig demo: a loopback destination that populates as the migration
    # starts, under a cap too; mig send: neither is known.
    assert demo.prefault and not send.prefault
    assert demo.link.bottleneck == 3e8 and demo.host.send_per_page == 4e-7
    assert send.link.bottleneck == 0 and send.host.send_per_page == 0


def test_the_destination_answers_hello_late_only_while_it_populates() -> None:
    # 64 MiB at 1 ns/byte: a 67 ms populate; a 50 ms hello wait fits in it.
    base = HostModel(prefault_per_byte=1e-9, prefault_share=1.0, prefault_hello_wait=0.0)
    late = replace(base, prefault_hello_wait=0.05)
    on_time, waited = _idle(True, base), _idle(True, late)
    assert waited["setup-time"] - on_time["setup-time"] == pytest.approx(50, rel=1e-6)
    assert waited["sim"]["prefault-hello-wait"] == pytest.approx(0.05)
    # A wait longer than the populate ends with it.
    longer = _idle(True, replace(base, prefault_hello_wait=5.0))
    assert longer["setup-time"] - on_time["setup-time"] < 70
    # Without a populate (mig send, or a destination that did not prealloc) no wait.
    assert _idle(False, late)["setup-time"] == pytest.approx(_idle(False, base)["setup-time"])


def test_the_stream_start_is_paid_once_by_the_first_pages() -> None:
    def run(start: float) -> dict:
        link = LinkModel(bottleneck=200e6, stream_start=start)
        return simulate(SimConfig(memory=16 << 20, link=link, params={"multifd_channels": 1}))

    plain, started = run(0.0), run(0.02)
    assert _first_pass(started) - _first_pass(plain) == pytest.approx(0.02, rel=1e-3)
    assert _pass_lengths(started)[1:] == pytest.approx(_pass_lengths(plain)[1:])


def _pass_lengths(q: dict) -> list[float]:
    times = [q["setup-time"] / 1000] + [p["time"] for p in q["passes"]]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_the_loopback_calibration_keeps_the_streams_start_and_waits_for_the_populate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mig.sim as sim

    # A host whose bulk pass costs 20 ms to start, 0.5 us per zero page and
    # 1 ns per wire byte; each guest's second run is the best (a loaded run
    # only adds time).
    settles = []

    def migration(size: int, filled: bool, cap: int, demo: bool, settle: float,
                  pages: slice) -> tuple[dict, None]:  # fmt: skip
        settles.append(settle)
        pages = size // 4096
        zero = 0 if filled else pages
        wire = (pages - zero) * 4096 + pages * 8
        extra = 0.0 if len(settles) % 3 == 2 else 0.05
        t = 0.02 + zero * 0.5e-6 + wire * 1e-9 + extra
        return {"setup-time": 7.0, "passes": [{"time": t + 0.007, "bytes": wire}]}, None

    monkeypatch.setattr(sim, "_idle_loopback_migration", migration)
    bandwidth, per_page, start = sim._loopback_costs(1e-9)
    assert bandwidth == pytest.approx(1e9)
    assert per_page == pytest.approx(0.5e-6)
    assert start == pytest.approx(0.02)
    # Each run started once its destination's populate (1 ns/byte) was done.
    sizes = [size for size, _ in sim.LOOPBACK_GUESTS for _ in range(3)]
    assert all(s > 1e-9 * size for s, size in zip(settles, sizes, strict=True))
