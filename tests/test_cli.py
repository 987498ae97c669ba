"""The ``mig`` command, driven through real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

import mig
from mig.display import progress_view, summary_table
from mig.policies import policy_names

MIB = 1 << 20
# Small and quick: a 64 MiB guest whose hot set a loopback link outruns.
SMALL = ["--size", "64MiB", "--workload", "hotset:rate=20000"]
SMALL_NIC = "nic:state=4MiB,rate=2MiB/s"


def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mig.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def only_json(stdout: str) -> dict[str, Any]:
    """stdout must be exactly one JSON object and nothing else."""
    obj = json.loads(stdout)
    assert isinstance(obj, dict)
    return obj


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_image(path: Path, size: int, seed: int) -> int:
    """A raw image of random bytes; returns its digest as GuestMemory computes it."""
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return mig.GuestMemory.from_image(str(path)).digest()


# ------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def demo_json() -> dict[str, Any]:
    p = run("demo", *SMALL, "--devices", SMALL_NIC, "--json")
    assert p.returncode == 0, p.stderr
    return only_json(p.stdout)


def test_demo_json_fields_and_types(demo_json: dict[str, Any]) -> None:
    q = demo_json
    assert q["status"] == "completed"
    assert q["verified"] is True
    assert q["policy"] in policy_names()
    for key in ("total-time", "downtime", "setup-time", "guest-stopped-time"):
        assert isinstance(q[key], float), key
    assert 0 < q["downtime"] < q["total-time"]
    assert isinstance(q["cpu-throttle-percentage"], int)
    assert isinstance(q["guest-stops"], int)
    assert set(q["downtime-breakdown"]) >= {"final-sync", "final-ram", "device-state", "load"}
    assert sum(q["downtime-breakdown"].values()) == pytest.approx(q["downtime"], rel=0.01)
    ram = q["ram"]
    assert ram["total"] == 64 * MIB
    assert ram["remaining"] == 0
    assert ram["dirty-sync-count"] >= 1 and isinstance(ram["dirty-sync-count"], int)
    assert ram["normal-bytes"] == ram["normal"] * ram["page-size"]
    assert ram["transferred"] >= ram["normal-bytes"]
    assert ram["precopy-bytes"] + ram["downtime-bytes"] <= ram["transferred"]
    assert ram["mbps"] > 0
    assert q["passes"] and all(isinstance(p["dirty-pages"], int) for p in q["passes"])
    (nic,) = q["devices"]
    assert nic["name"] == "nic0"
    # The nic's 4 MiB state crossed over in precopy, stop-copy or both.
    assert nic["precopy-bytes"] + nic["stop-copy-bytes"] >= 4 * MIB


def test_demo_verifies_end_to_end_by_default_and_no_verify_skips_it(
    demo_json: dict[str, Any],
) -> None:
    # By default the demo compares the destination's memory and device
    # digests with the stopped source's after the migration.
    assert demo_json["end-to-end-check"] == "passed"
    # The default verify mode answered after the guest resumed on the destination.
    assert demo_json["verify"] == "after-resume" and demo_json["verified"] is True
    assert demo_json["verify-time"] >= 0 and "verify-error" not in demo_json
    p = run("demo", *SMALL, "--devices", SMALL_NIC, "--json", "--no-verify")
    assert p.returncode == 0, p.stderr
    q = only_json(p.stdout)
    assert q["status"] == "completed"
    assert q["end-to-end-check"] == "skipped"


def test_progress_and_summary_render_query_values(demo_json: dict[str, Any]) -> None:
    console = Console(record=True, width=120)
    console.print(progress_view(demo_json))
    console.print(summary_table(demo_json))
    text = console.export_text()
    assert "completed" in text
    assert demo_json["policy"] in text
    assert f"{demo_json['downtime']:.0f} ms" in text
    assert f"{demo_json['ram']['mbps']:.0f} Mbit/s" in text
    assert "device nic0" in text


def test_demo_summary_table_without_json() -> None:
    p = run("demo", *SMALL, "--devices", "none")
    assert p.returncode == 0, p.stderr
    assert "migration summary" in p.stdout
    assert "completed" in p.stdout
    lines = [line for line in p.stdout.splitlines() if "verified" in line]
    assert lines and "yes" in lines[0]


def test_demo_options_reach_the_migration(tmp_path: Path) -> None:
    # Random content: lz4 cannot shrink it, so the wire carries all 16 MiB.
    image = tmp_path / "guest.img"
    random_image(image, 16 * MIB, seed=11)
    cap = 40 * MIB
    p = run(
        "demo",
        "--image",
        str(image),
        "--workload",
        "hotset:rate=20000",
        "--vcpus",
        "1",
        "--devices",
        "fixed,opaque:state=1MiB",
        "--policy",
        "stop-exact-resume",
        "--max-bandwidth",
        "40MiB/s",
        "--downtime-limit",
        "200ms",
        "--channels",
        "3",
        "--compress",
        "lz4",
        "--auto-converge",
        "qemu",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    q = only_json(p.stdout)
    assert q["status"] == "completed" and q["verified"] is True
    assert q["policy"] == "stop-exact-resume"
    assert [d["name"] for d in q["devices"]] == ["fixed0", "opaque0"]
    # The cap holds over the whole run: average rate no more than the cap plus 10 %.
    assert q["ram"]["total"] == 16 * MIB
    assert q["ram"]["transferred"] >= 16 * MIB
    total_s = (q["total-time"] - q["setup-time"]) / 1000
    assert q["ram"]["transferred"] / total_s <= cap * 1.1


def test_failed_migration_exits_1_with_the_reason() -> None:
    # A hot set rewritten faster than a 10 MiB/s link can send never converges.
    p = run(
        "demo",
        "--size",
        "64MiB",
        "--workload",
        "hotset:wss=64MiB,hot=0.5",
        "--devices",
        "none",
        "--max-bandwidth",
        "10MiB/s",
        "--timeout",
        "1.5s",
        "--json",
    )
    assert p.returncode == 1
    q = only_json(p.stdout)
    assert q["status"] in ("cancelled", "failed")
    assert "timeout" in q["error-desc"]
    assert "timeout" in p.stderr.splitlines()[-1]
    assert "source guest resumed: running" in p.stderr


def test_ctrl_c_cancels_and_the_source_guest_resumes() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mig.cli",
            "demo",
            "--size",
            "64MiB",
            "--workload",
            "hotset:wss=64MiB,hot=0.5",
            "--devices",
            "nic:state=1MiB",
            "--max-bandwidth",
            "20MiB/s",
            "--json",
            "--log-level",
            "info",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 30
    for line in proc.stderr:
        seen.append(line)
        if ": active" in line or time.monotonic() > deadline:
            break
    assert any(": active" in line for line in seen), "".join(seen)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    q = only_json(out)
    assert q["status"] == "cancelled"
    assert "interrupted" in q["error-desc"]
    resumed = [line for line in err.splitlines() if "source guest resumed" in line]
    assert resumed, err
    writes = int(resumed[0].split("running, ")[1].split()[0])
    assert writes > 0


# ------------------------------------------------------------ serve / send
def test_serve_and_send_over_loopback(tmp_path: Path) -> None:
    image = tmp_path / "guest.img"
    digest = random_image(image, 32 * MIB, seed=7)
    uri = f"tcp:127.0.0.1:{free_port()}"
    common = ["--devices", "fixed", "--json"]
    serve = subprocess.Popen(
        [sys.executable, "-m", "mig.cli", "serve", "--listen", uri, "--once"]
        + ["--size", "32MiB", "--timeout", "30s", *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # An idle guest keeps the image as loaded, so its digest is known here.
        p = run("send", "--connect", uri, "--image", str(image), "--workload", "idle", *common)
        out, err = serve.communicate(timeout=30)
    finally:
        serve.kill()
    assert p.returncode == 0, p.stderr
    assert serve.returncode == 0, err
    src, dst = only_json(p.stdout), only_json(out)
    assert src["status"] == dst["status"] == "completed"
    assert src["verified"] is True and dst["verified"] is True
    assert dst["memory-digest"] == format(digest, "032x")
    assert dst["passes"] >= 1
    assert [d["name"] for d in dst["devices"]] == ["fixed0"]


def test_send_to_a_mismatched_destination_fails_with_the_reason() -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    serve = subprocess.Popen(
        [sys.executable, "-m", "mig.cli", "serve", "--listen", uri, "--once", "--json"]
        + ["--size", "16MiB", "--devices", "none", "--timeout", "30s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        p = run("send", "--connect", uri, *SMALL, "--devices", "none", "--json")
        out, _ = serve.communicate(timeout=30)
    finally:
        serve.kill()
    assert p.returncode == 1
    assert serve.returncode == 1
    q = only_json(p.stdout)
    assert q["status"] == "failed" and q["error-desc"]
    assert q["error-desc"] in p.stderr.splitlines()[-1]
    # The destination refuses the session and names both sizes.
    d = only_json(out)
    assert d["status"] == "failed"
    assert str(64 * MIB) in d["error-desc"] and str(16 * MIB) in d["error-desc"]


@pytest.mark.parametrize("mode", ["strict", "off"])
def test_demo_verify_modes_reach_both_sides(mode: str) -> None:
    p = run("demo", *SMALL, "--devices", "none", "--json", "--verify", mode)
    assert p.returncode == 0, p.stderr
    q = only_json(p.stdout)
    assert q["status"] == "completed" and q["verify"] == mode
    assert q["verified"] is (mode == "strict")
    # The demo's own comparison of the two memories runs in every mode.
    assert q["end-to-end-check"] == "passed"
    assert ("digest" in q["downtime-breakdown"]) is (mode == "strict")


def test_serve_refuses_a_source_with_another_verify_mode() -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    serve = subprocess.Popen(
        [sys.executable, "-m", "mig.cli", "serve", "--listen", uri, "--once", "--json"]
        + ["--size", "16MiB", "--devices", "none", "--timeout", "30s", "--verify", "strict"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        p = run("send", "--connect", uri, "--size", "16MiB", "--devices", "none", "--json",
                "--verify", "off")  # fmt: skip
        out, _ = serve.communicate(timeout=30)
    finally:
        serve.kill()
    assert p.returncode == 1 and serve.returncode == 1
    q, d = only_json(p.stdout), only_json(out)
    assert q["status"] == d["status"] == "failed"
    assert "verify mode 'off' != 'strict'" in d["error-desc"]
    assert "verify mode 'off' != 'strict'" in q["error-desc"]


# ------------------------------------------------------- snapshot / restore
def test_snapshot_and_restore_verify(tmp_path: Path) -> None:
    image = tmp_path / "guest.img"
    random_image(image, 16 * MIB, seed=3)
    snap = tmp_path / "guest.snap"
    p = run(
        "snapshot",
        "--out",
        str(snap),
        "--image",
        str(image),
        "--workload",
        "uniform:rate=20000",
        "--devices",
        "nic:state=2MiB,dma",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    saved = only_json(p.stdout)
    assert saved["status"] == "completed"
    assert saved["ram"]["total"] == 16 * MIB
    assert [d["name"] for d in saved["devices"]] == ["nic0", "dma0"]

    p = run("restore", str(snap), "--json")
    assert p.returncode == 0, p.stderr
    loaded = only_json(p.stdout)
    assert loaded["verified"] is True
    assert loaded["memory-digest"] == saved["memory-digest"]
    assert [(d["name"], d["state-digest"]) for d in loaded["devices"]] == [
        (d["name"], d["state-digest"]) for d in saved["devices"]
    ]

    # One flipped byte inside the page area fails the restore, with the reason.
    raw = bytearray(snap.read_bytes())
    raw[len(raw) // 4] ^= 0xFF
    snap.write_bytes(bytes(raw))
    p = run("restore", str(snap), "--json")
    assert p.returncode == 1
    q = only_json(p.stdout)
    assert q["status"] == "failed" and q["verified"] is False
    assert "digest" in q["error-desc"]
    assert "restore failed" in p.stderr


# ------------------------------------------------------------------- info
def test_info_reports_capabilities() -> None:
    p = run("info", "--json")
    assert p.returncode == 0, p.stderr
    info = only_json(p.stdout)
    caps = mig.capabilities()
    assert info["kernel"] == caps["kernel"] == os.uname().release
    assert info["page-size"] == os.sysconf("SC_PAGE_SIZE")
    for backend in ("uffd", "soft"):
        assert info["dirty-tracking"][backend]["available"] is caps[backend]["available"]
    assert "postcopy" not in info["dirty-tracking"]
    assert info["postcopy"]["available"] is caps["postcopy"]["available"]
    assert info["postcopy"]["kernel_faults"] is caps["postcopy"]["kernel_faults"]
    flags = {f["flag"]: f["present"] for f in info["cpu-features"]}
    assert {"sse2", "sse4_2", "popcnt", "bmi1", "avx512_vbmi2"} <= set(flags)
    cpu = next(
        ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")
    )
    words = set(cpu.split(":", 1)[1].split())
    assert all(present == (flag in words) for flag, present in flags.items())


def test_bench_is_listed_and_hands_over_to_the_policy_lab() -> None:
    top = run("--help")
    assert top.returncode == 0 and "bench" in top.stdout
    p = run("bench", "--help")
    assert p.returncode == 0, p.stderr
    assert "usage: mig bench" in p.stdout and "policies" in p.stdout and "kernels" in p.stdout
    bad = run("bench", "policies", "--frobnicate")
    assert bad.returncode == 2 and "--frobnicate" in bad.stderr


# ---------------------------------------------------------- bad arguments
BAD = [
    (["demo", "--size", "12XB"], "--size"),
    (["demo", "--size", "0"], "--size"),
    (["demo", "--downtime-limit", "fast"], "--downtime-limit"),
    (["demo", "--max-bandwidth", "10furlongs/s"], "--max-bandwidth"),
    (["demo", "--avail-switchover-bandwidth", "x"], "--avail-switchover-bandwidth"),
    (["demo", "--vcpus", "0"], "--vcpus"),
    (["serve", "--listen", "tcp:127.0.0.1:0", "--vcpus", "0"], "--vcpus"),
    (["demo", "--postcopy", "--postcopy-after", "-1"], "--postcopy-after"),
    (["demo", "--channels", "65"], "--channels"),
    (["demo", "--devices", "warpdrive"], "--devices"),
    (["demo", "--devices", "nic:state=lots"], "--devices"),
    (["demo", "--policy", "yolo"], "--policy"),
    (["demo", "--verify", "sometimes"], "--verify"),
    (["serve", "--listen", "tcp:127.0.0.1:0", "--verify", "later"], "--verify"),
    (["demo", "--compress", "gzip"], "--compress"),
    (["demo", "--auto-converge", "sometimes"], "--auto-converge"),
    (["demo", "--dirty-limit", "many"], "--dirty-limit"),
    (["demo", "--timeout=-1s"], "--timeout"),
    (["demo", "--size", "4MiB", "--workload", "zigzag"], "--workload"),
    (["demo", "--image", "/nonexistent/guest.img"], "--image"),
    (["send", "--size", "4MiB"], "--connect"),
    (["serve"], "--listen"),
    (["serve", "--listen", "carrier-pigeon:coop", "--size", "4MiB"], "--listen"),
    (["snapshot", "--size", "4MiB"], "--out"),
    (["restore", "/nonexistent/guest.snap"], "FILE"),
    ([], "COMMAND"),
]


@pytest.mark.parametrize(("argv", "option"), BAD, ids=[" ".join(a) or "none" for a, _ in BAD])
def test_bad_argument_exits_2_with_one_line_naming_it(argv: list[str], option: str) -> None:
    p = run(*argv, timeout=30)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("mig: error:")
    assert option in lines[0]
    assert p.stdout == ""


def test_an_image_maps_in_huge_pages_only_where_the_host_offers_them(monkeypatch: Any) -> None:
    """``mig demo --image`` takes anonymous transparent huge pages where the
    host offers them, base pages elsewhere, never a backing it lacks."""
    import mig.cli

    offers = {"anon-thp": True, "anon": True}
    monkeypatch.setattr(
        mig,
        "memory_backings",
        lambda: [{"backing": b, "available": ok} for b, ok in offers.items()],
    )
    assert mig.cli.image_backing() == "anon-thp"
    offers["anon-thp"] = False
    assert mig.cli.image_backing() == "anon"
