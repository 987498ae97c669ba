"""Post-copy and the destination's guest on the command line.

``--postcopy`` (QEMU's postcopy-ram capability) and ``--postcopy-after``
join the migration options of ``mig demo`` and ``mig send``; ``--workload``
and ``--vcpus`` on ``mig serve`` run the guest there once it resumes
(``mig.resumed_workload``); the demo passes its own to the destination.

``--postcopy-recover N`` (``mig send``, ``mig serve``, ``mig demo``): a
post-copy whose page channels broke recovers by itself, up to N times, as
QEMU's ``migrate-recover`` and ``migrate`` with ``resume`` do on request
(those two are the QMP way, with ``--qmp``). Without it a paused post-copy
waits for Ctrl-C, which ends it with the guest lost.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from mig.cli_values import MAX_VCPUS, int_range
from mig.params import POSTCOPY_PUSH_ORDERS

log = logging.getLogger("mig.cli")

MAX_PASSES = 1_000_000  # --postcopy-after: more than any migration runs

__all__ = [
    "AutoRecover",
    "add_postcopy_options",
    "add_recover_option",
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
    add_recover_option(g)
    g.add_argument(
        "--postcopy-after",
        type=int_range(0, MAX_PASSES),
        default=0,
        metavar="PASSES",
        help="with --postcopy: switch after this many whole passes of pre-copy, or on "
        "non-convergence (default 0: as soon as the guest is measured dirtying memory "
        "as fast as the link sends it)",
    )
    g.add_argument(
        "--postcopy-push-order",
        choices=POSTCOPY_PUSH_ORDERS,
        default="stream",
        help="the locality the background push follows: one fault stream at a time "
        "(stream, the default: requests elsewhere get their page alone) or every "
        "request's (faults, as QEMU)",
    )


def add_recover_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--postcopy-recover",
        type=int_range(0, MAX_PASSES),
        default=0,
        metavar="ATTEMPTS",
        help="a post-copy whose page channels broke reconnects by itself, up to this "
        "many times (default 0: it waits, paused, for Ctrl-C, which loses the guest)",
    )


class AutoRecover:
    """An ``on_status`` that calls ``recover`` at each ``postcopy-paused``
    while attempts are left, after passing the status on to ``then``."""

    def __init__(
        self,
        attempts: int,
        recover: Callable[[], None],
        then: Callable[[str], None] | None = None,
    ) -> None:
        self.left = int(attempts)
        self.recover = recover
        self.then = then

    def __call__(self, status: str) -> None:
        if self.then is not None:
            self.then(status)
        if status != "postcopy-paused" or self.left <= 0:
            return
        self.left -= 1
        log.info("post-copy paused: recovering (%d attempts left after this one)", self.left)
        try:
            self.recover()
        except RuntimeError as e:  # no longer paused: nothing to recover
            log.info("post-copy recovery not started: %s", e)


def auto_recover(args: argparse.Namespace, side: Any) -> None:
    """With ``--postcopy-recover``, ``side`` (a source or destination) recovers by itself."""
    attempts = int(getattr(args, "postcopy_recover", 0) or 0)
    if attempts:
        side.on_status = AutoRecover(attempts, side.recover, side.on_status)


def postcopy_params(args: argparse.Namespace) -> dict[str, Any]:
    if not getattr(args, "postcopy", False):
        return {}
    return {
        "postcopy": True,
        "postcopy_after_passes": int(args.postcopy_after),
        "postcopy_push_order": str(args.postcopy_push_order),
    }


def add_serve_workload(parser: argparse.ArgumentParser) -> None:
    add_recover_option(parser)
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
    """The demo's destination runs the demo's own workload (and recovers alike)."""
    out = ["--workload", str(args.workload), "--vcpus", str(args.vcpus)]
    if getattr(args, "postcopy_recover", 0):
        out += ["--postcopy-recover", str(args.postcopy_recover)]
    return out


def guest_writes(writes: int, q: dict[str, Any]) -> dict[str, Any]:
    """The source guest's page writes completed during the migration (it
    runs until the switchover pauses it), and their rate over the whole
    migration, the same window the destination's figure ends with."""
    seconds = float(q.get("total-time", 0.0)) / 1000
    return {
        "writes-during-migration": writes,
        "writes-per-second": writes / seconds if seconds > 0 else 0.0,
    }
