"""Stream guest memory to a destination in the same process and verify it.

    python examples/stream_loopback.py [tcp:127.0.0.1:0 | unix:/tmp/mig.sock | file:/tmp/s.mig]

The source memory is written between iterations; each iteration sends the
pages written since the previous one as a new generation, then syncs.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

import mig


def main(uri: str = "tcp:127.0.0.1:0") -> None:
    size = 64 << 20
    src, dst = mig.GuestMemory(size), mig.GuestMemory(size)
    pages = src.array.reshape(src.num_pages, src.page_size)
    rng = np.random.default_rng(0)
    pages[: src.num_pages // 2] = rng.integers(
        0, 256, (src.num_pages // 2, src.page_size), np.uint8
    )

    listener = mig.Listener(uri)
    got: dict[str, mig.Receiver] = {}
    accept = threading.Thread(target=lambda: got.setdefault("r", listener.accept(dst, 30.0)))
    if not uri.startswith("file:"):
        accept.start()

    with mig.Sender(src, listener.uri, migration_id=2024, channels=2) as sender:
        dirty = mig.DirtyBitmap.full(src.num_pages)
        for generation in range(3):
            sent = sender.send_pages(dirty, generation)
            sender.sync(generation)
            print(f"generation {generation}: {dirty.count()} pages, {sent} bytes on the wire")
            touched = rng.integers(0, src.num_pages, 200)
            pages[touched, :8] = generation + 1
            dirty = mig.DirtyBitmap.from_indices(np.unique(touched), src.num_pages)
        sender.send_pages(dirty, 3)
        sender.send_device_state(1, 0, b"device state", True)
        sender.finish(src.digest())
        if uri.startswith("file:"):
            accept.start()
        accept.join()
        end = got["r"].wait_end(30.0)
        print("sender:", sender.stats())
    print("destination digest matches:", end["digest"] == src.digest() == dst.digest())
    print("device records:", got["r"].device_records())


if __name__ == "__main__":
    main(*sys.argv[1:])
