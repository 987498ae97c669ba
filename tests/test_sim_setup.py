"""The source's setup in virtual time (``mig.sim_setup``): paid before
``hello``, as the engine pays it, and so outside the round trip the source
plans the switchover's handshake with."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mig.sim import HostModel, LinkModel, SimConfig, simulate

MIB = 1 << 20


def _migrate(policy: str, setup: float) -> dict:
    """An idle 128 MiB guest over a 128 MiB/s link (uncapped: no token
    bucket, so the bandwidth meter reads the link), ``setup`` seconds of
    setup before ``hello``."""
    q = simulate(
        SimConfig(
            memory=128 * MIB,
            workload="idle",
            policy=policy,
            link=LinkModel(bottleneck=128 * MIB),
            params={"timeout": 60.0},
            host=replace(HostModel(), setup_base=setup, register_per_page=0.0),
        )
    )
    assert q["status"] == "completed" and q["sim"]["verified"], q.get("error-desc")
    return q


@pytest.mark.parametrize("policy", ["estimate-only", "exact-running"])
def test_a_slow_setup_delays_the_migration_but_does_not_change_its_plan(policy: str) -> None:
    """Until a pass is acknowledged the planned handshake is twice hello's
    round trip. Both migrations switch over in the bulk pass, once what is
    left fits the 300 ms limit. Were the 200 ms setup inside hello's round
    trip, the planned handshake (over 400 ms) would exceed the limit and the
    slow one would send all of memory before it could switch over."""
    quick, slow = _migrate(policy, 0.0), _migrate(policy, 0.2)
    assert slow["setup-time"] - quick["setup-time"] == pytest.approx(200, abs=1)
    assert quick["ram"]["downtime-bytes"] > 8 * MIB  # the switchover came in the bulk pass
    assert slow["ram"]["downtime-bytes"] == quick["ram"]["downtime-bytes"]
    assert [p["bytes"] for p in slow["passes"]] == [p["bytes"] for p in quick["passes"]]
    assert slow["switchover-costs"]["handshake"] == quick["switchover-costs"]["handshake"]
    assert slow["downtime"] == pytest.approx(quick["downtime"], abs=0.5)
    assert slow["downtime"] <= 300


def test_the_registration_walks_the_page_tables_a_written_page_made() -> None:
    """A page table exists once any of its 512 pages was written: a page
    alone maps its whole table, a never-written table maps nothing."""
    import mig
    from mig.sim_setup import mapped_pages

    units = 4 * 512  # four tables of 4 KiB pages
    never = mig.DirtyBitmap.full(units)
    assert mapped_pages(never, 1, units) == 0
    one = mig.DirtyBitmap.full(units)
    one.and_not(mig.DirtyBitmap.from_indices([600], units))  # a page of the second table
    assert mapped_pages(one, 1, units) == 512
    # Units of 8 pages (64 per table): the first unit maps the first table.
    coarse = mig.DirtyBitmap.full(units // 8)
    coarse.and_not(mig.DirtyBitmap.from_indices([0], units // 8))
    assert mapped_pages(coarse, 8, units) == 512


def test_a_zeroed_guest_registers_only_the_tables_its_warmup_wrote() -> None:
    """The same guest filled and zeroed (its warm-up writing a 16 MiB working
    set at its start): the zeroed one's setup pays the registration over 16
    MiB of the 256, the filled one's over all of it."""
    host = replace(HostModel(), setup_base=0.001, register_per_page=1e-6)

    def setup_ms(prefilled: bool) -> float:
        q = simulate(
            SimConfig(
                memory=256 * MIB,
                workload="sequential:wss=16MiB,rate=20000",
                prefilled=prefilled,
                policy="estimate-only",
                params={"timeout": 60.0},
                host=host,
            )
        )
        assert q["status"] == "completed" and q["sim"]["verified"], q.get("error-desc")
        return float(q["setup-time"])

    pages = 256 * MIB // 4096
    filled, zeroed = setup_ms(True), setup_ms(False)
    assert filled - zeroed == pytest.approx(1e3 * 1e-6 * (pages - 16 * MIB // 4096), rel=0.02)
