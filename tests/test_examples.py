"""The README's runnable examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.skipif(
    not mig.capabilities()["uffd"]["available"],
    reason="needs the uffd dirty-tracking backend (userfaultfd WP_ASYNC + PAGEMAP_SCAN)",
)
def test_embed_guest_example_migrates_byte_exact() -> None:
    p = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed_guest.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "status: completed"
    assert lines[-1] == "destination verified: True, memory identical: True"
    downtime = float(lines[1].split()[1])
    assert 0 < downtime < 60_000
