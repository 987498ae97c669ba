"""``--postcopy-placement`` on ``mig serve``: a placement the memory cannot
take is a usage error naming the option, before anything listens."""

from __future__ import annotations

import subprocess
import sys


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mig.cli", "serve", "--listen", "tcp:127.0.0.1:0", "--once",
         "--size", "4MiB", "--devices", "none", *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_continue_on_anonymous_memory_is_a_usage_error() -> None:
    r = serve("--backing", "anon", "--postcopy-placement", "continue")
    assert r.returncode == 2, r.stderr
    assert "--postcopy-placement" in r.stderr and "memfd/shmem" in r.stderr, r.stderr


def test_an_unknown_placement_is_refused() -> None:
    r = serve("--postcopy-placement", "minor")
    assert r.returncode == 2 and "--postcopy-placement" in r.stderr, r.stderr
