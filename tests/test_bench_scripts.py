"""``mig bench NAME [OPTIONS]``: the benchmark scripts of the path users run get their options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mig import lab

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(lab.USER_PATH_BENCHES))
def test_mig_bench_passes_a_scripts_own_options_to_it(name: str) -> None:
    """``mig bench downtime-scale --quick``: the script's options reach the
    script (argparse took them for ``mig bench``'s own and refused them)."""
    code = f"from mig import lab; raise SystemExit(lab.main([{name!r}, '--help']))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    script = lab.USER_PATH_BENCHES[name][0].removesuffix(".py")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script}"), done.stdout[:200]
