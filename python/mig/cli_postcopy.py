"""Post-copy and the destination's guest on the command line.

``--postcopy`` (QEMU's postcopy-ram capability) and ``--postcopy-after``
join the migration options of ``mig demo`` and ``mig send``; ``--workload``
and ``--vcpus`` on ``mig serve`` run the guest there once it resumes
(``mig.resumed_workload``); the demo passes its own to the destination.
"""

from __future__ import annotations

import argparse
from typing import Any

from mig.cli_values import MAX_VCPUS, int_range

MAX_PASSES = 1_000_000  # --postcopy-after: more than any migration runs

__all__ = [
    "add_postcopy_options",
    "add_serve_workload",
    "guest_writes",
    "postcopy_params",
    "serve_workload_args",
]


def add_postcopy_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("post-copy")
    g.add_argument(
        "--postcopy",
        action="store_true",
        help="switch to post-copy when pre-copy would go on: resume on the destination, "
        "fetch the remaining pages on demand (userfaultfd there)",
    )
    g.add_argument(
        "--postcopy-after",
        type=int_range(0, MAX_PASSES),
        default=0,
        metavar="PASSES",
        help="with --postcopy: switch after this many whole passes of pre-copy, or on "
        "non-convergence (default 0: as soon as the guest is measured dirtying memory "
        "as fast as the link sends it)",
    )


def postcopy_params(args: argparse.Namespace) -> dict[str, Any]:
    if not getattr(args, "postcopy", False):
        return {}
    return {"postcopy": True, "postcopy_after_passes": int(args.postcopy_after)}


def add_serve_workload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workload",
        metavar="SPEC",
        default=None,
        help="run this workload on the received memory once the guest resumes here",
    )
    parser.add_argument(
        "--vcpus",
        type=int_range(1, MAX_VCPUS),
        default=1,
        help="vCPUs of that workload (default 1)",
    )


def serve_workload_args(args: argparse.Namespace) -> list[str]:
    """The demo's destination runs the demo's own workload."""
    return ["--workload", str(args.workload), "--vcpus", str(args.vcpus)]


def guest_writes(writes: int, q: dict[str, Any]) -> dict[str, Any]:
    """The source guest's page writes completed during the migration (it
    runs until the switchover pauses it), and their rate over the whole
    migration, the same window the destination's figure ends with."""
    seconds = float(q.get("total-time", 0.0)) / 1000
    return {
        "writes-during-migration": writes,
        "writes-per-second": writes / seconds if seconds > 0 else 0.0,
    }
