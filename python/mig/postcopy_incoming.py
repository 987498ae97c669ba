"""``PostcopyIncoming``: the destination's post-copy, from advise to the last page.

At ``postcopy-advise`` it checks that this host can register memory for
missing-page faults (userfaultfd MISSING mode), and for the ``continue``
placement MINOR mode on shmem, and fails the migration naming the missing
feature otherwise. At ``postcopy-run`` (before the
source opens them) it starts accepting the source's two page channels on
the session's listener, in a thread: their connect, a TLS handshake
included, completes while the stop-copy goes on. At ``go`` it waits for
that thread, which lets the native ``PostcopyIncoming`` register the
memory (discarding the pages the source still owes, named by the
``DISCARD`` the source sends after ``go``) and start its threads, all
before the guest resumes. After ``resumed`` it waits, with the guest running, until every
owed page is placed; the root of memory as resumed then replaces the one
taken at ``ready``, for the after-resume verification.

A broken page channel pauses the phase (``postcopy-paused``): the guest
keeps running, blocked only on pages still missing, until ``recover()``
accepts new channels. Cancelling then ends it: the guest is lost, and
``missing-pages`` says which pages never arrived.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from mig import _mig
from mig.errors import MigrationEnded
from mig.params import POSTCOPY_PLACEMENTS
from mig.postcopy_pause import RecoverGate

__all__ = ["PostcopyIncoming", "require_postcopy"]

_POLL = 0.1


def require_postcopy(placement: str = "copy") -> None:
    """Raise ``MigrationEnded`` naming the missing feature unless post-copy
    runs here with ``placement`` (``copy`` or ``continue``)."""
    cap = _mig.capabilities().get("postcopy") or {}
    if not cap.get("available"):
        missing = ", ".join(cap.get("missing") or ()) or "userfaultfd MISSING mode"
        reason = cap.get("reason") or "unknown"
        raise MigrationEnded(
            "failed", f"post-copy unavailable on the destination: needs {missing} ({reason})"
        )
    minor = cap.get("placement_continue") or {}
    if placement == "continue" and not minor.get("available"):
        missing = ", ".join(minor.get("missing") or ()) or "userfaultfd MINOR mode"
        raise MigrationEnded(
            "failed",
            f"post-copy placement continue unavailable on the destination: needs {missing} "
            f"({minor.get('reason') or 'unknown'}); postcopy-placement copy works without it",
        )


class PostcopyIncoming:
    """The destination's post-copy phase around a native ``PostcopyIncoming``."""

    def __init__(self, memory: Any, vcpus: int, io_timeout: float, placement: str = "auto") -> None:
        if placement not in POSTCOPY_PLACEMENTS:
            raise ValueError(
                f"postcopy_placement must be one of {', '.join(POSTCOPY_PLACEMENTS)}, "
                f"not {placement!r}"
            )
        self.native = _mig.PostcopyIncoming(memory, vcpus=vcpus, placement=placement)
        # "copy" or "continue": ``auto`` resolved for this memory's backing.
        self.placement: str = self.native.placement
        self.io_timeout = io_timeout
        self.attached = False
        self.gate = RecoverGate()
        self._recover_error: str | None = None
        self._missing: list[tuple[int, int]] | None = None
        self._accepting: threading.Thread | None = None
        self._accept_error: BaseException | None = None

    def accept(self, listener: Any, receiver: Any, timeout: float) -> None:
        """Start accepting the page channels (once): in a thread, which then
        reads ``DISCARD``, registers, discards what is owed and starts."""
        if self._accepting is not None:
            return
        if listener is None or receiver is None:
            raise MigrationEnded("failed", "post-copy needs a real session (listener and receiver)")
        self._session = (listener, receiver, timeout)

        def run() -> None:
            try:
                self.native.attach(listener, receiver, timeout, io_timeout=self.io_timeout)
            except BaseException as e:  # re-raised by attach(), on the serving thread
                self._accept_error = e

        self._accepting = threading.Thread(target=run, name="mig-postcopy-accept", daemon=True)
        self._accepting.start()

    def attach(self, listener: Any, receiver: Any, timeout: float) -> None:
        """``go``: the page channels accepted, the memory registered and the
        owed pages discarded; the guest may run once this returns."""
        self.accept(listener, receiver, timeout)
        assert self._accepting is not None
        self._accepting.join()
        if self._accept_error is not None:
            raise self._accept_error
        self.attached = True

    def run(
        self,
        set_status: Callable[[str], None],
        check_cancel: Callable[[], str | None],
    ) -> int:
        """Wait, the guest running, until every owed page is placed; returns
        the root. A broken channel waits for ``recover()``; a cancel then
        ends with the guest lost."""
        while True:
            state, reason = self.native.wait(_POLL)
            if state == "complete":
                return int(self.native.root)
            if state == "active":
                continue
            cancelled = self.gate.wait(reason, set_status, check_cancel)
            if cancelled is not None:
                self._lose(cancelled)
            listener, receiver, timeout = self._session
            try:
                self.native.recover(listener, receiver, timeout, io_timeout=self.io_timeout)
            except Exception as e:
                self._recover_error = str(e)
                continue
            self.gate.resumed(set_status)

    def recover(self) -> None:
        """Accept the source's new page channels (QEMU's migrate-recover)."""
        self.gate.request()

    def _lose(self, why: str) -> None:
        self._missing = [tuple(r) for r in self.native.missing_pages()]  # type: ignore[misc]
        pages = sum(n for _, n in self._missing)
        self.native.close()
        raise MigrationEnded(
            "failed",
            f"post-copy ended with {pages} pages that never arrived ({why}): the guest is lost",
            by_peer=True,
        )

    def close(self) -> None:
        self.native.close()

    def stats(self) -> dict[str, Any]:
        if not self.attached:
            return {}
        out = dict(self.native.stats())
        paused = self.gate.paused_reason
        if paused is not None:
            out["paused-reason"] = paused
        if self._recover_error is not None:
            out["recover-error"] = self._recover_error
        missing = self._missing
        if missing is None and paused is not None:
            missing = [tuple(r) for r in self.native.missing_pages()]  # type: ignore[misc]
        if missing is not None:
            out["missing-pages"] = missing
        return out
