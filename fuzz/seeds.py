"""Writes seed inputs for the wire fuzz target into the corpus directory:
a mode byte (bit 0: the target fixes CRCs; bits 1-3: packet_pages index)
followed by well-formed records of every kind."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from streamkit import record  # noqa: E402  (the tests' independent encoder)

PS = 4096


def main(out: Path) -> None:
    def page(n: int) -> bytes:
        body = struct.pack("<QQ", 0, PS) + b"\x11" * PS
        return record(b"PAGE", number=n, generation=1, c0=1, c1=1, body=body)

    def zero(n: int) -> bytes:
        return record(
            b"PAGE", number=n, generation=1, c1=2, body=struct.pack("<QQ", 2 * PS, 3 * PS)
        )

    def devs(n: int) -> bytes:
        return record(b"DEVS", number=n, generation=2, flags=1, c0=7, body=b"abc")

    stream = (
        page(0)
        + zero(1)
        + record(b"SYNC", number=2, generation=1)
        + devs(3)
        + record(b"END!", number=4, body=b"\0" * 16)
    )
    mode = bytes([1 | (3 << 1)])  # fix CRCs, packet_pages 4
    seeds = {"stream": stream, "pages": page(0), "zero": zero(0), "device": devs(0)}
    seeds = {k: mode + v for k, v in seeds.items()}
    out.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (out / f"seed-{name}").write_bytes(data)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
