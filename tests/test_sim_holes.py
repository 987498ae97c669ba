"""The sender's hole queries in the simulator (``mig.sim_holes``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mig._mig import DirtyBitmap
from mig.sim import HostModel, LinkModel, SimConfig, simulate
from mig.sim_holes import asked_hole_packets


def _bitmap(indices: list[int] | np.ndarray, n: int) -> DirtyBitmap:
    return DirtyBitmap.from_indices(np.asarray(indices, dtype=np.uint64), n)


def test_packets_with_holes_amid_data_ask_the_page_tables() -> None:
    n = 1024  # 8 packets of 128
    every = DirtyBitmap.full(n)
    # One data page in every 16: each packet holds holes and data.
    holes = _bitmap([i for i in range(n) if i % 16], n)
    assert asked_hole_packets(every, holes, 128) == (8, False)
    # The same data gathered at the start: the packet that holds data and
    # holes asks, the zero packet after it too (it follows no zero packet),
    # and the rest ask only whether their span is a hole.
    assert asked_hole_packets(every, _bitmap(range(64, n), n), 128) == (2, True)
    # Nothing but holes: the first packet asks, unless the sender's last
    # packet (of an earlier call) was all zero.
    assert asked_hole_packets(every, every, 128) == (1, True)
    assert asked_hole_packets(every, every, 128, after_zero=True) == (0, True)
    # No hole, nothing to ask.
    assert asked_hole_packets(every, DirtyBitmap(n), 128) == (0, False)
    # Packets follow the sent pages in order, not memory's layout.
    sent = _bitmap(range(0, n, 2), n)
    assert asked_hole_packets(sent, _bitmap(range(0, n, 4), n), 128) == (4, False)


def _first_pass(host: HostModel, workload: str, prefilled: bool) -> float:
    config = SimConfig(memory=64 << 20, workload=workload, prefilled=prefilled, warmup=1.0,
                       host=host, link=LinkModel(bottleneck=400e6),
                       params={"multifd_channels": 1})  # fmt: skip
    q = simulate(config)
    return q["passes"][0]["time"] - q["setup-time"] / 1000


@pytest.mark.parametrize(
    ("workload", "prefilled", "at_least", "at_most"),
    [
        # A warm-up of uniform writes scatters data over a zeroed guest:
        # nearly all of its 128 packets of 128 pages hold holes amid data
        # (each slice of the pass ends in a packet of its own).
        ("uniform:rate=20000", False, 100, 140),
        # A zeroed idle guest is one hole: a packet or so per slice asks.
        ("idle", False, 1, 8),
        # A filled guest has no hole.
        ("uniform:rate=20000", True, 0, 0),
    ],
)
def test_the_first_pass_pays_each_asked_packet(
    workload: str, prefilled: bool, at_least: int, at_most: int
) -> None:
    free, query = HostModel(hole_query=0.0), 1e-3
    extra = _first_pass(replace(free, hole_query=query), workload, prefilled) - _first_pass(
        free, workload, prefilled
    )
    assert at_least * query * 0.99 <= extra <= at_most * query * 1.01 + 1e-9


def test_on_a_capped_link_the_scan_overlaps_the_wait_for_tokens() -> None:
    # A zeroed idle 64 MiB guest at 1 MiB/s: its first pass is 16384 zero
    # pages, about 0.13 s of wire at the cap.
    def first_pass(per_page: float) -> float:
        config = SimConfig(memory=64 << 20, prefilled=False, warmup=0.0,
                           host=HostModel(send_per_page=per_page, hole_query=0.0),
                           params={"multifd_channels": 1, "max_bandwidth": 1 << 20})  # fmt: skip
        q = simulate(config)
        return q["passes"][0]["time"] - q["setup-time"] / 1000

    paced = first_pass(0.0)
    assert 0.1 < paced < 0.2
    # 82 ms of scanning hides behind the wait for tokens...
    assert first_pass(5e-6) == pytest.approx(paced, abs=0.01)
    # ...330 ms does not: the pass lasts as long as the scan.
    assert first_pass(20e-6) == pytest.approx(16384 * 20e-6, rel=0.15)
