"""What the post-copy tests share: the skip for a host without userfaultfd
MISSING mode, the one capability they depend on, named with the reason;
the two placements (``continue`` skipped, named, without MINOR mode); a
post-copy from the start run to its checked end."""

from __future__ import annotations

from typing import Any

import pytest

import mig

POSTCOPY = mig.capabilities()["postcopy"]

needs_postcopy = pytest.mark.skipif(
    not POSTCOPY["available"],
    reason=f"host lacks userfaultfd MISSING mode: {POSTCOPY.get('reason')}",
)


CONTINUE = POSTCOPY.get("placement_continue") or {}

# The destination's two post-copy placements (``postcopy_placement``);
# ``continue`` runs only where the host has userfaultfd MINOR mode on shmem.
PLACEMENTS = [
    pytest.param("copy", id="copy"),
    pytest.param(
        "continue",
        id="continue",
        marks=pytest.mark.skipif(
            not CONTINUE.get("available"),
            reason=f"host lacks userfaultfd MINOR mode on shmem "
            f"({', '.join(CONTINUE.get('missing') or ())}): {CONTINUE.get('reason')}",
        ),
    ),
]


def start_and_wait(
    source: Any, dest: Any, guest: Any, there: dict[str, Any], *, start_postcopy: bool = False
) -> tuple[dict, dict]:
    """Starts both ends (switching to post-copy at once with
    ``start_postcopy``), waits for both and closes the guests
    (``there["guest"]``: the destination's, whose last stats go to
    ``there["stats"]``); returns both queries."""
    dest.start()
    source.start()
    if start_postcopy:
        source.start_postcopy()
    try:
        return source.wait(90), dest.wait(30)
    finally:
        guest.close()
        if "guest" in there:
            there["stats"] = there["guest"].stats()
            there["guest"].close()


def run_postcopy(source: Any, dest: Any, guest: Any, there: dict[str, Any]) -> tuple[dict, dict]:
    """Switches to post-copy at once (everything owed), runs to the end
    (`start_and_wait`) and checks both ends completed and verified
    byte-exact; returns both queries."""
    q, d = start_and_wait(source, dest, guest, there, start_postcopy=True)
    assert q["status"] == "completed", q.get("error-desc")
    assert d["status"] == "completed", d.get("error-desc")
    # The destination's root of held and placed chunks equals the source's
    # digest of its frozen memory.
    assert q["verified"] and d["verified"], (q.get("verify-error"), d.get("verify-error"))
    return q, d
