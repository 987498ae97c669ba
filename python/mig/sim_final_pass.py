"""The final pass's zero pages in virtual time, and their calibration.

Inside the downtime the RAM stream sends its whole known set at once, in
chunks of up to 65536 pages (``ram_stream.rs``, ``complete``), with no
decision between them. A precopy pass sends slices of a few hundred zero
pages (its budget comes from the bandwidth meter, which zero pages, cheap on
the wire and not in time, keep low), and each slice pays a send call's
hand-off to the channel threads and back plus the loop's own work between
slices. ``HostModel.send_per_page`` (``loopback_per_page``) is calibrated on
such passes, so it holds those per-slice costs spread over each slice's
pages; charged to a final pass of many zero pages it made the pass several
times what the engine pays (a 512 MiB guest whose policy switched over
after the first slice, its final pass 127 000 zero pages).

``final_per_page`` is what a zero page costs the sender in the final pass,
measured on that shape: an idle zeroed guest whose policy (``estimate-only``
with a downtime limit far above its size's cost, and an
``avail-switchover-bandwidth`` that makes it fit at once: a measured
bandwidth counts only once its first window closed) switches over at its
first decision, so that the final pass carries every page, each a zero
page.
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["FINAL_PASS_GUEST", "final_pass_seconds_per_page"]

# The calibration guest: zeroed, idle, large enough for a final pass of tens
# of thousands of zero pages; the limit and the bandwidth given for the
# switchover let the first decision take it all.
FINAL_PASS_GUEST = 128 << 20
FINAL_PASS_LIMIT_MS = 60_000
FINAL_PASS_BANDWIDTH = 1 << 40


def final_pass_seconds_per_page(runs: int = 5) -> float:
    """Seconds per zero page of the final pass: the median over ``runs`` real
    migrations to ``mig demo``'s destination of their ``final-ram`` term over
    the pages the final pass sent. 0.0 if no run switched over with a final
    pass of zero pages (the engine then never sends one as this models).

    The median, not the best: the simulator predicts the median of real
    migrations, whose final passes pay this host's ordinary variation (on a
    host of few cores, the destination's and the guest's threads beside the
    sender), and one run that finds the host idle sets a best below what a
    final pass of the configurations it predicts usually costs."""
    from mig.sim import _idle_loopback_migration  # noqa: PLC0415

    samples = []
    for _ in range(runs):
        q, _ = _idle_loopback_migration(
            FINAL_PASS_GUEST,
            False,
            0,
            demo=True,
            policy="estimate-only",
            params={
                "downtime_limit": FINAL_PASS_LIMIT_MS,
                "avail_switchover_bandwidth": FINAL_PASS_BANDWIDTH,
            },
        )
        per_page = _per_page(q)
        if per_page:
            samples.append(per_page)
    return statistics.median(samples) if samples else 0.0


def _per_page(q: dict[str, Any]) -> float:
    """``final-ram`` over the final pass's pages, 0.0 without such a pass."""
    passes = q.get("passes", [])
    final_ram = q.get("downtime-breakdown", {}).get("final-ram", 0.0) / 1000
    if len(passes) < 2 or final_ram <= 0:
        return 0.0
    pages = passes[-2]["remaining"]  # known when the guest stopped: the final pass's pages
    return final_ram / pages if pages else 0.0
