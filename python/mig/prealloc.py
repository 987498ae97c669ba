"""Destination memory faulted in ahead of the stream (QEMU's ``-mem-prealloc``).

A destination waiting for its source has nothing else to do: ``--prealloc``
populates its memory (``MADV_POPULATE_WRITE``) in a background thread from
the moment it exists, so the pages the stream later writes are already
allocated and zeroed and the receive threads only copy. Pages the stream
never writes (the source's zero pages) are allocated too, as with QEMU's
option: the price is memory, paid before the migration starts.

Populating makes every page present, so the page tables no longer tell
which pages hold data. Which ones may is taken first and handed to the
receiver (``MigrationDestination(prealloc=True)`` does both): it then still
receives pages straight into memory and leaves zero pages unwritten where
memory was zeros, as it does with holes.
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Any

__all__ = ["add_prealloc_option", "start_prealloc"]

log = logging.getLogger("mig.prealloc")


def add_prealloc_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prealloc",
        action="store_true",
        help="fault the destination's memory in while waiting for the source "
        "(like QEMU's -mem-prealloc): the stream then only copies",
    )


def start_prealloc(memory: Any) -> list[tuple[int, int]]:
    """Populates ``memory`` in a daemon thread (the call releases the GIL);
    returns the byte ranges that may hold data, taken before."""
    data_ranges: list[tuple[int, int]] = memory.data_ranges()

    def run() -> None:
        try:
            memory.populate()
        except Exception as e:  # an unsupported kernel: the stream faults pages in
            log.info("prealloc skipped: %s", e)

    threading.Thread(target=run, name="mig-prealloc", daemon=True).start()
    return data_ranges
