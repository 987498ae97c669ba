"""Post-copy's page channels under mutual TLS: the destination's listener
takes only TLS sessions, so a post-copy that completes against it fetched
and pushed every owed page over TLS; both ends verify byte-exact."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from postcopykit import PLACEMENTS, needs_postcopy, run_postcopy
from tlskit import Authority, Identity

import mig
from mig.destination import MigrationDestination
from mig.source import MigrationSource

SIZE = 32 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    ca = Authority(tmp_path_factory.mktemp("pki"))
    return {"dest": ca.issue("dest"), "src": ca.issue("src")}


@needs_postcopy
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dest_workload", [None, "uniform:wss=32MiB,rate=300000"])
def test_postcopy_page_channels_under_tls_are_byte_exact(
    pki: dict[str, Identity], dest_workload: str | None, placement: str
) -> None:
    src, dst = mig.GuestMemory(SIZE), mig.GuestMemory(SIZE)
    src.array[::7] = 0x3C  # data in every chunk: none goes as a zero run
    guest = mig.WorkloadGuest(src, vcpus=1, workload="sequential:wss=8MiB,rate=200000")
    dest = MigrationDestination(
        "tcp:127.0.0.1:0", dst, idle_timeout=20, accept_timeout=8, vcpus=1,
        postcopy_placement=placement, **pki["dest"].kwargs(),
    )  # fmt: skip
    there: dict[str, Any] = {}
    if dest_workload:
        dest.on_resume = lambda: there.setdefault(
            "guest", mig.WorkloadGuest(dst, vcpus=1, workload=dest_workload)
        )
    source = MigrationSource(
        guest, uri=dest.uri, postcopy=True, timeout=60, max_bandwidth=32 << 20,
        **pki["src"].kwargs(),
    )  # fmt: skip
    # Everything owed: the page channels carry all of memory; verified
    # byte-exact (pages placed alone ahead of their chunk included).
    q, d = run_postcopy(source, dest, guest, there)
    pc = q["postcopy"]
    assert pc["owed-chunks"] == SIZE // (64 << 10)
    assert pc["requested-chunks"] + pc["pushed-chunks"] == pc["owed-chunks"]
    assert d["postcopy"]["placed-chunks"] == pc["owed-chunks"]
    if dest_workload:
        # The request channel carried chunks too.
        assert pc["requested-chunks"] > 0 and d["postcopy"]["postcopy-requests"] > 0
    else:
        assert src.digest() == dst.digest()


@needs_postcopy
def test_cli_postcopy_demo_over_tls(pki: dict[str, Identity]) -> None:
    """`mig demo --postcopy` with the TLS options: its destination runs the
    workload and fetches pages over the TLS page channels. The guest writes
    24 MiB while the 16 MiB/s link sends 4.8 MiB in the 300 ms limit: the
    switch policy goes to post-copy."""
    ident = pki["dest"]
    tls = ["--tls-cert", str(ident.cert), "--tls-key", str(ident.key), "--tls-ca", str(ident.ca)]
    p = subprocess.run(
        [sys.executable, "-m", "mig.cli", "demo", "--size", "32MiB",
         "--workload", "sequential:wss=24MiB,rate=400000", "--devices", "none",
         "--max-bandwidth", "16MiB/s", "--postcopy", "--json", *tls],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    q = json.loads(p.stdout)
    assert q["status"] == "completed" and q["verified"] is True
    assert q["end-to-end-check"] == "passed"
    assert q["postcopy"]["owed-chunks"] > 0
    assert q["postcopy"]["remaining-chunks"] == 0
