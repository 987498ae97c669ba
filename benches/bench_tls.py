"""Throughput cost of mutual TLS on the loopback bulk transfer, same run.

The image and the measured span are ``bench_transfer.py``'s (its transfer
is reused): a half-random, half-zero image sent to a destination process
over tcp:127.0.0.1, timed from opening the Sender (connect and handshakes
included) to the destination's "done" after its digest check. Each round
runs a plain and a TLS transfer back to back (order alternating); the
report is the median of the per-round ratios TLS / plain. Certificates are
made fresh for the run (tests/tlskit.py).

    python benches/bench_tls.py [--size-mib 2048] [--rounds 5] [--channels 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--channels", type=int, default=2)
    args = ap.parse_args()
    size = args.size_mib << 20
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "tests"))
    from bench_transfer import transfer_seconds
    from bench_zero_scan import half_random_half_zero
    from tlskit import Authority

    src = half_random_half_zero(size)
    digest = src.digest()
    with tempfile.TemporaryDirectory() as tmp:
        ca = Authority(Path(tmp))
        dest_tls, src_tls = ca.issue("dest").kwargs(), ca.issue("src").kwargs()
        plain, secure, ratios = [], [], []
        for r in range(args.rounds):
            order = ("plain", "tls") if r % 2 == 0 else ("tls", "plain")
            t = {}
            for mode in order:
                kw = (dest_tls, src_tls) if mode == "tls" else ({}, {})
                t[mode] = transfer_seconds(src, digest, args.channels, *kw)
            plain.append(t["plain"])
            secure.append(t["tls"])
            ratios.append(t["tls"] / t["plain"])
    payload = size // 2
    med_p, med_t = statistics.median(plain), statistics.median(secure)
    print(f"image {args.size_mib} MiB (half random, half zero); payload {payload >> 20} MiB")
    print(f"{args.channels} channel(s), {args.rounds} rounds")
    print(f"plain: median {med_p:.3f} s ({payload / med_p / 1e9:.2f} GB/s payload)")
    print(f"TLS:   median {med_t:.3f} s ({payload / med_t / 1e9:.2f} GB/s payload)")
    print(f"TLS / plain: median of per-round ratios {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
