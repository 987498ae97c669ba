"""``--postcopy-placement`` (``mig serve``, ``mig demo``): how the destination
places the pages post-copy brings (``mig.params.POSTCOPY_PLACEMENTS``).

The demo's destination picks its memory backing as ``mig serve`` does
(``auto``: the fastest to fill, often anonymous memory), where only ``copy``
places; ``--dest-backing`` sets it, e.g. ``memfd`` for shmem, where
``continue`` works. Both are handed to the demo's ``mig serve``.
"""

from __future__ import annotations

import argparse

from mig.params import POSTCOPY_PLACEMENTS

__all__ = ["add_placement_option", "placement_args"]


def add_placement_option(
    parser: argparse.ArgumentParser, *, backings: tuple[str, ...] = ()
) -> None:
    """``--postcopy-placement``; with ``backings``, the demo's ``--dest-backing`` too."""
    parser.add_argument(
        "--postcopy-placement",
        choices=POSTCOPY_PLACEMENTS,
        default="auto",
        help="how post-copy places arriving pages on the destination: copy (UFFDIO_COPY, "
        "any backing), continue (memfd/shmem only: written into the memfd, "
        "mapped with UFFDIO_CONTINUE) or auto (continue on shmem, copy elsewhere)",
    )
    if backings:
        parser.add_argument(
            "--dest-backing",
            choices=backings,
            default="auto",
            help="the demo destination's memory backing (default auto, as mig serve)",
        )


def placement_args(args: argparse.Namespace) -> list[str]:
    """The demo's placement and destination backing, as ``mig serve`` options."""
    out = ["--postcopy-placement", str(getattr(args, "postcopy_placement", "auto"))]
    backing = getattr(args, "dest_backing", "auto")
    if backing != "auto":
        out += ["--backing", str(backing)]
    return out
