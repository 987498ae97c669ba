"""``--postcopy-recover``: ``mig send`` and ``mig serve`` processes whose page
channels reset mid-post-copy (through the fault proxy) recover by
themselves and end byte-exact (the destination's root of what it held and
placed equals the source's digest of its frozen memory)."""

from __future__ import annotations

import json
import subprocess
import threading
import time

from faultkit import KIND_POSTCOPY, FaultProxy
from peerkit import free_port, mig_process
from postcopykit import needs_postcopy

pytestmark = needs_postcopy

SMALL = ["--size", "32MiB", "--devices", "none", "--postcopy-recover", "1"]


def _seen(proc: subprocess.Popen[str], text: str) -> tuple[threading.Event, list[str]]:
    """An event set once ``text`` appears on the process's stderr (kept)."""
    seen, lines = threading.Event(), []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if text in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    return seen, lines


def test_send_and_serve_recover_by_themselves_after_a_reset_mid_postcopy() -> None:
    listen = f"tcp:127.0.0.1:{free_port()}"
    dst = mig_process("serve", "--listen", listen, "--once", "--log-level", "info", *SMALL)
    procs = [dst]
    proxy: FaultProxy | None = None
    try:
        listening, dst_err = _seen(dst, "listening on")
        assert listening.wait(30), "".join(dst_err)
        proxy = FaultProxy(listen)
        src = mig_process(
            "send", "--connect", proxy.uri, "--json", "--log-level", "info", *SMALL,
            "--workload", "sequential:wss=8MiB,rate=200000",
            "--postcopy", "--max-bandwidth", "2MiB/s",
        )  # fmt: skip
        procs.append(src)
        active, src_err = _seen(src, "postcopy-active")
        assert active.wait(60), "".join(src_err)
        time.sleep(0.3)  # 8 MiB owed at 2 MiB/s: the push still runs
        proxy.reset(KIND_POSTCOPY, 0)
        proxy.reset(KIND_POSTCOPY, 1)
        out, _ = src.communicate(timeout=90)
        dst.wait(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        if proxy is not None:
            proxy.close()
    q = json.loads(out)
    errs = "".join(src_err) + "".join(dst_err)
    assert src.returncode == 0 and dst.returncode == 0, errs
    assert q["status"] == "completed" and q["verified"] is True, q.get("error-desc")
    assert q["postcopy"]["recoveries"] == 1, q["postcopy"]
    assert any("postcopy-paused" in line for line in src_err), errs
