"""Destination memory faulted in ahead of the stream (QEMU's ``-mem-prealloc``).

A destination waiting for its source has nothing else to do: ``--prealloc``
populates its memory (``MADV_POPULATE_WRITE``) in a background thread from
the moment it exists, so the pages the stream later writes are already
allocated and zeroed and the receive threads only copy. Pages the stream
never writes (the source's zero pages) are allocated too, as with QEMU's
option: the price is memory, paid before the migration starts.

As QEMU populates at start-up, before it takes an incoming migration, the
destination accepts no source before the populate is done (``Prealloc.wait``):
a populate running beside the migration would compete with its setup and
first pass for the cores, and hold the memory map while the receive threads
start. ``mig serve`` reports ready only after it.

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
import time
from collections.abc import Callable
from typing import Any

from mig.errors import MigrationEnded

__all__ = ["Prealloc", "accept_populated", "add_prealloc_option", "start_prealloc"]

log = logging.getLogger("mig.prealloc")


def add_prealloc_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prealloc",
        action="store_true",
        help="fault the destination's memory in before accepting a source "
        "(like QEMU's -mem-prealloc): the stream then only copies",
    )


class Prealloc:
    """A populate running in a daemon thread (the call releases the GIL).

    ``data_ranges``: the byte ranges that may hold data, taken before it
    started. ``error``: why it was skipped (an unsupported kernel: the stream
    then faults pages in), None otherwise."""

    def __init__(self, memory: Any) -> None:
        self.data_ranges: list[tuple[int, int]] = memory.data_ranges()
        self.error: str | None = None
        self._done = threading.Event()
        self._memory = memory
        threading.Thread(target=self._run, name="mig-prealloc", daemon=True).start()

    def _run(self) -> None:
        try:
            self._memory.populate()
        except Exception as e:  # the destination still accepts: nothing was lost
            self.error = str(e)
            log.info("prealloc skipped: %s", e)
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the populate ended (done or skipped), False after ``timeout``."""
        return self._done.wait(timeout)


def start_prealloc(memory: Any) -> Prealloc:
    """Starts populating ``memory``; ``Prealloc.wait`` says when it is done."""
    return Prealloc(memory)


# Seconds between looks at a cancel while the populate runs.
_CANCEL_POLL = 0.05


def accept_populated(
    listener: Any,
    memory: Any,
    prealloc: Prealloc | None,
    timeout: float,
    io_timeout: float,
    cancelled: Callable[[], str | None],
) -> Any:
    """``listener.accept`` of a source into ``memory`` once ``prealloc``'s
    populate ended (None: none runs), all within ``timeout`` seconds; a cancel
    while it runs ends the migration, and so does the timeout, with the
    listener's reason."""
    t0 = time.monotonic()
    while prealloc is not None and not prealloc.wait(_CANCEL_POLL):
        reason = cancelled()
        if reason is not None:
            raise MigrationEnded("cancelled", reason)
        if time.monotonic() - t0 >= timeout:
            break  # the accept's own timeout tells it
    left = max(timeout - (time.monotonic() - t0), _CANCEL_POLL)
    ranges = None if prealloc is None else prealloc.data_ranges
    try:
        return listener.accept(memory, left, io_timeout=io_timeout, data_ranges=ranges)
    except TimeoutError as e:
        # No whole session came in time: the listener says what was missing
        # (no source at all, or channels short). Read as a phase's stall, it
        # would blame a source that never spoke.
        raise MigrationEnded("failed", e.strerror or str(e)) from None
