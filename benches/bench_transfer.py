"""Loopback bulk transfer vs iperf3, same run.

Source: a 2 GiB image, half random pages and half zero pages (interleaved).
Destination: another process with fresh guest memory, listening on
tcp:127.0.0.1. Total time runs from opening the Sender to the destination's
"done" on the control channel, i.e. connect, scan, send, receive, validate,
apply, end records and the destination's whole-memory digest check. The
digest check is also timed on its own (the destination's `verify-time`), so
the transfer proper (total minus verification) is reported separately. The
source digest is computed before the clock starts. Baseline: iperf3 carrying
the same 1 GiB of payload over loopback (its own receiver-side seconds).
Rounds alternate baseline and transfers; medians of per-round ratios are
reported (target: <= 1.35 x iperf3). For information each round also
times a second full pass into the destination the first pass populated,
the path of later live-migration passes.

    python benches/bench_transfer.py [--size-mib 2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

import mig


def ensure_iperf3() -> str:
    path = shutil.which("iperf3")
    if path is None:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "iperf3"], check=True, capture_output=True)
        path = shutil.which("iperf3")
    assert path, "iperf3 could not be installed"
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iperf3_seconds(iperf3: str, nbytes: int) -> float:
    port = free_port()
    server = subprocess.Popen(
        [iperf3, "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        for _ in range(100):
            out = subprocess.run(
                [iperf3, "-c", "127.0.0.1", "-p", str(port), "-n", str(nbytes), "-J"],
                capture_output=True,
                text=True,
            )
            result = json.loads(out.stdout) if out.stdout.strip() else {}
            received = result.get("end", {}).get("sum_received")
            if out.returncode == 0 and received:
                return float(received["seconds"])
            time.sleep(0.1)  # server not listening yet
        raise RuntimeError(f"iperf3 client failed: {out.stdout[-500:]}")
    finally:
        server.kill()
        server.wait()


TLS_OPTIONS = ("tls_cert", "tls_key", "tls_ca")


def destination(size: int, tls: dict[str, str]) -> None:
    """Child process: print the URI, receive one session, report."""
    mem = mig.GuestMemory(size)
    listener = mig.Listener("tcp:127.0.0.1:0", **tls)
    print(listener.uri, flush=True)
    receiver = listener.accept(mem, 60.0)
    end = receiver.wait_end(120.0)
    reply = {"digest": end["digest"], "verify-time": end["verify-time"]}
    receiver.control_send(json.dumps(reply).encode())
    # Wait for the source to hang up before exiting.
    try:
        receiver.control_recv(30.0)
    except OSError:
        pass


def timed_session(
    src: mig.GuestMemory,
    digest: int,
    channels: int,
    passes: int = 1,
    dest_tls: dict[str, str] | None = None,
    tls: dict[str, str] | None = None,
) -> tuple[float, float]:
    """Sends every page `passes` times (one generation each) to a fresh
    destination process; only the last pass is timed, from its start (for
    a single pass: from opening the Sender) to the destination's reply.
    `dest_tls`/`tls`: the two sides' TLS options.
    Returns (seconds, of which the destination's digest check)."""
    flags = [a for k, v in (dest_tls or {}).items() for a in ("--" + k, v)]
    child = subprocess.Popen(
        [sys.executable, __file__, "--dest", "--size-mib", str(src.size >> 20), *flags],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    uri = child.stdout.readline().strip()
    full = mig.DirtyBitmap.full(src.num_pages)
    t0 = time.perf_counter()
    sender = mig.Sender(
        src, uri, migration_id=int(time.time_ns()), channels=channels, **(tls or {})
    )
    for generation in range(passes):
        if generation == passes - 1 and passes > 1:
            t0 = time.perf_counter()
        sender.send_pages(full, generation)
        sender.sync(generation)
    sender.finish(digest)
    reply = sender.control_recv(120.0)
    elapsed = time.perf_counter() - t0
    assert reply is not None
    answer = json.loads(reply)
    assert answer["digest"] == digest
    sender.close()
    child.wait(timeout=60)
    return elapsed, float(answer["verify-time"])


def transfer_seconds(
    src: mig.GuestMemory,
    digest: int,
    channels: int,
    dest_tls: dict[str, str] | None = None,
    tls: dict[str, str] | None = None,
) -> float:
    """Total seconds of one single-pass transfer, digest check included."""
    return timed_session(src, digest, channels, 1, dest_tls, tls)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dest", action="store_true", help=argparse.SUPPRESS)
    for k in TLS_OPTIONS:
        ap.add_argument("--" + k, help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = args.size_mib << 20
    if args.dest:
        destination(size, {k: getattr(args, k) for k in TLS_OPTIONS if getattr(args, k)})
        return
    from bench_zero_scan import half_random_half_zero

    iperf3 = ensure_iperf3()
    src = half_random_half_zero(size)
    digest = src.digest()
    payload = size // 2
    base: list[float] = []
    total: dict[int, list[float]] = {1: [], 2: []}
    verify: dict[int, list[float]] = {1: [], 2: []}
    resend: list[tuple[float, float]] = []
    for _ in range(args.rounds):
        base.append(iperf3_seconds(iperf3, payload))
        for ch in (1, 2):
            t, v = timed_session(src, digest, ch, passes=1)
            total[ch].append(t)
            verify[ch].append(v)
        resend.append(timed_session(src, digest, 1, passes=2))
    med = statistics.median
    print(f"image {args.size_mib} MiB (half random, half zero); payload {payload >> 20} MiB")
    print(f"iperf3 {payload >> 20} MiB over loopback: median {med(base):.3f} s")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for ch in (1, 2):
        ratio = med([t / b for t, b in zip(total[ch], base, strict=True)])
        moved = [t - v for t, v in zip(total[ch], verify[ch], strict=True)]
        ratio_moved = med([m / b for m, b in zip(moved, base, strict=True)])
        print(
            f"mig {ch} channel(s): total median {med(total[ch]):.3f} s, ratio {ratio:.2f}; "
            f"transfer without the digest check {med(moved):.3f} s, ratio {ratio_moved:.2f}; "
            f"digest check {med(verify[ch]):.3f} s (target <= 1.35)"
        )
    again = [t - v for t, v in resend]
    print(
        f"mig second pass, 1 channel, populated destination: "
        f"{med(again):.3f} s without the digest check, ratio "
        f"{med([a / b for a, b in zip(again, base, strict=True)]):.2f}; "
        f"digest check {med([v for _, v in resend]):.3f} s (information)"
    )


if __name__ == "__main__":
    main()
