"""DMA ordering: a device must be quiesced before the final RAM sync.

The final phase of a migration is driven by hand here: RAM pages are copied
by the device's DMA dirty log (the guest's vCPUs are not running at all, as
after the guest is stopped: the device still writes). Quiescing first gives
a byte-exact copy; syncing first loses the pages written in between, and the
digest shows it.
"""

from __future__ import annotations

from devlink import LoopbackLink

import mig
from mig import devices as D
from mig.device_handler import DeviceHandler


def copy_pages(src: mig.GuestMemory, dst: mig.GuestMemory, bitmap: mig.DirtyBitmap) -> None:
    ps = src.page_size
    for page in bitmap.indices():
        off = int(page) * ps
        dst.write(off, src.read(off, ps))


def final_phase(quiesce_first: bool) -> tuple[int, int]:
    src_mem = mig.GuestMemory(1 << 20)
    dst_mem = mig.GuestMemory(1 << 20)
    dev = D.create("dma:dma=16MiB/s", src_mem)
    try:
        handler = DeviceHandler(dev)
        handler.setup(LoopbackLink())
        copy_pages(src_mem, dst_mem, mig.DirtyBitmap.full(src_mem.num_pages))
        for _ in range(3):  # precopy rounds
            assert dev.wait_dma(dev.dma_pages_written)
            copy_pages(src_mem, dst_mem, dev.dma_log.take())
        if quiesce_first:
            handler.quiesce()
            copy_pages(src_mem, dst_mem, dev.dma_log.take())
        else:
            copy_pages(src_mem, dst_mem, dev.dma_log.take())
            assert dev.wait_dma(dev.dma_pages_written)  # DMA lands after the sync
            handler.quiesce()
        written = dev.dma_pages_written
        assert not dev.wait_dma(written, timeout=0.05)  # quiesced: no more DMA
        return src_mem.digest(), dst_mem.digest()
    finally:
        dev.close()


def test_quiesce_before_final_sync_is_byte_exact() -> None:
    src, dst = final_phase(quiesce_first=True)
    assert src == dst


def test_sync_before_quiesce_loses_pages_and_the_digest_shows_it() -> None:
    src, dst = final_phase(quiesce_first=False)
    assert src != dst
