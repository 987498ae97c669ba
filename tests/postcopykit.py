"""What the post-copy tests share: the skip for a host without userfaultfd
MISSING mode, the one capability they depend on, named with the reason."""

from __future__ import annotations

import pytest

import mig

POSTCOPY = mig.capabilities()["postcopy"]

needs_postcopy = pytest.mark.skipif(
    not POSTCOPY["available"],
    reason=f"host lacks userfaultfd MISSING mode: {POSTCOPY.get('reason')}",
)
