"""The sender's hole queries in virtual time: what a zero page amid data costs it.

The sender tells a never-written page of anonymous memory (a hole) from
data without reading it (``scan_pages`` in ``rust/src/sender.rs``): a packet
that follows a packet of zero pages first asks whether its whole span is a
hole (one page-table scan, cheap); every other packet reads its pages'
``/proc/self/pagemap`` entries. Over present pages that read is cheap; over
holes lying between data pages it is not, and a guest that wrote scattered
pages (a zeroed guest after its warm-up, ``mig demo``'s) pays it on nearly
every packet of its first pass: the same data pages scattered among holes
take that pass several times as long as gathered at the start.

The simulator counts the packets of each slice (``packet_pages`` pages in
page order) that hold a hole and are asked page by page, and charges each
``HostModel.hole_query`` seconds of the sender's time. ``hole_query_seconds``
measures it on this host: one page in every ``HOLE_STRIDE`` written, against
the same pages written at the start, migrated to ``mig demo``'s destination
(ready once its memory is populated); the difference over the difference in
asked packets.
"""

from __future__ import annotations

import numpy as np

from mig._mig import DirtyBitmap

__all__ = ["asked_hole_packets", "hole_query_seconds"]

CALIBRATION_MEMORY = 256 << 20
HOLE_STRIDE = 16
PAGE_SIZE = 4096


def asked_hole_packets(
    sent: DirtyBitmap, zero: DirtyBitmap, units_per_packet: int, after_zero: bool = False
) -> tuple[int, bool]:
    """(asked, last all zero): the packets of ``sent`` (``units_per_packet``
    units each, in order) that hold a zero unit of ``zero`` and read the
    page tables page by page (all but those of zero units only that follow
    another such packet; ``after_zero``: the sender's previous packet was
    one), and whether the last packet was all zero (the sender keeps that
    from one call to the next)."""
    idx = sent.indices()
    n = len(idx)
    if not n:
        return 0, after_zero
    if not zero.count():
        return 0, False
    k = max(1, units_per_packet)
    packets = -(-n // k)
    is_zero = np.zeros(packets * k, dtype=bool)
    is_zero[:n] = np.isin(idx, zero.indices(), assume_unique=True)
    zeros = is_zero.reshape(packets, k).sum(axis=1)
    sizes = np.full(packets, k)
    sizes[-1] = n - (packets - 1) * k
    all_zero = zeros == sizes
    follows = np.concatenate(([after_zero], all_zero[:-1]))
    return int(((zeros > 0) & ~(all_zero & follows)).sum()), bool(all_zero[-1])


def _bulk_pass(pages: slice) -> float:
    from mig.sim import LOOPBACK_WORKLOAD, _idle_loopback_migration  # noqa: PLC0415

    q, _ = _idle_loopback_migration(
        CALIBRATION_MEMORY, True, 0, demo=True, pages=pages, workload=LOOPBACK_WORKLOAD
    )
    return float(q["passes"][0]["time"]) - float(q["setup-time"]) / 1000


def _asked(pages: slice, packet_pages: int) -> int:
    n = CALIBRATION_MEMORY // PAGE_SIZE
    written = np.zeros(n, dtype=bool)
    written[pages] = True
    zero = DirtyBitmap.from_indices(np.flatnonzero(~written).astype(np.uint64), n)
    return asked_hole_packets(DirtyBitmap.full(n), zero, packet_pages)[0]


def hole_query_seconds(packet_pages: int = 128, runs: int = 3) -> float:
    """Seconds of the sender's time per packet asked page by page over holes
    (best run of each guest)."""
    scattered = slice(None, None, HOLE_STRIDE)
    gathered = slice(0, CALIBRATION_MEMORY // PAGE_SIZE // HOLE_STRIDE)
    spread = min(_bulk_pass(scattered) for _ in range(runs))
    packed = min(_bulk_pass(gathered) for _ in range(runs))
    asked = _asked(scattered, packet_pages) - _asked(gathered, packet_pages)
    return max(0.0, spread - packed) / max(1, asked)
