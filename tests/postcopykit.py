"""What the post-copy tests share: the skip for a host without userfaultfd
MISSING mode, the one capability they depend on, named with the reason;
a post-copy from the start run to its checked end."""

from __future__ import annotations

from typing import Any

import pytest

import mig

POSTCOPY = mig.capabilities()["postcopy"]

needs_postcopy = pytest.mark.skipif(
    not POSTCOPY["available"],
    reason=f"host lacks userfaultfd MISSING mode: {POSTCOPY.get('reason')}",
)


def run_postcopy(source: Any, dest: Any, guest: Any, there: dict[str, Any]) -> tuple[dict, dict]:
    """Starts both ends, switches to post-copy at once (everything owed),
    waits for both, closes the guests (``there["guest"]``: the destination's),
    and checks both ends completed and verified byte-exact; returns both
    queries."""
    dest.start()
    source.start()
    source.start_postcopy()
    try:
        q, d = source.wait(90), dest.wait(30)
    finally:
        guest.close()
        if "guest" in there:
            there["guest"].close()
    assert q["status"] == "completed", q.get("error-desc")
    assert d["status"] == "completed", d.get("error-desc")
    # The destination's root of held and placed chunks equals the source's
    # digest of its frozen memory.
    assert q["verified"] and d["verified"], (q.get("verify-error"), d.get("verify-error"))
    return q, d
