"""Sample devices: specs, precopy info, data_size, state growth, DMA into guest RAM."""

from __future__ import annotations

import time

import pytest

import mig
from mig import devices as D
from mig.devices import MigState as S


def drain(stream: D.SaveStream) -> bytes:
    """Read a saving session until its temporary (precopy) or final end."""
    out = bytearray()
    while True:
        try:
            data = stream.read(1 << 16)
        except D.NoData:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


def wait_until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return False


def test_parse_specs_splits_devices_and_fields() -> None:
    specs = D.parse_specs("nic:state=64MiB,rate=20MiB/s,fixed")
    assert [s.model for s in specs] == ["nic", "fixed"]
    assert specs[0].options == {"state": "64MiB", "rate": "20MiB/s"}
    assert [s.model for s in D.parse_specs(["gpu:state=4MiB", "opaque; dma:dma=1MiB/s"])] == [
        "gpu",
        "opaque",
        "dma",
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nic:rate=20XB/s", "field 'rate'"),
        ("nic:state=lots", "field 'state'"),
        ("gpu:colour=red", "unknown field 'colour'"),
        ("toaster:state=1MiB", "unknown device type 'toaster'"),
        ("state=1MiB", "must start with a device type"),
        ("nic:state=8MiB,max=4MiB", "field 'max'"),
        ("fixed:fail=sideways", "field 'fail'"),
        ("nic:p2p=maybe", "field 'p2p'"),
    ],
)
def test_bad_specs_name_the_field(spec: str, message: str) -> None:
    with pytest.raises(D.DeviceSpecError, match=message):
        D.parse_specs(spec)


def test_dma_needs_memory() -> None:
    with pytest.raises(D.DeviceSpecError, match="needs the guest memory"):
        D.create("dma")


def test_default_gpu_state_is_large_but_tests_pick_small() -> None:
    # Defaults are checked without allocating them.
    assert D.config_from_spec(D.parse_specs("gpu")[0]).state >= 256 << 20
    with D.create("gpu:state=2MiB,rate=8MiB/s") as gpu:
        assert gpu.state_size == 2 << 20


def test_fixed_has_no_precopy_and_exact_data_size() -> None:
    with D.create("fixed:state=4KiB") as dev:
        assert not dev.caps & D.MigCap.PRE_COPY
        with pytest.raises(D.InvalidTransition, match="PRE_COPY needs"):
            dev.set_state(S.PRE_COPY)
        with pytest.raises(D.DeviceError, match="only in PRE_COPY"):
            dev.precopy_info()
        dev.set_state(S.RUNNING_P2P)
        size = dev.data_size()
        stream = dev.set_state(S.STOP_COPY)
        assert len(drain(stream)) == size


def test_nic_precopy_info_tracks_reads_and_traffic() -> None:
    with D.create("nic:state=1MiB,rate=8MiB/s,grow=2MiB/s,max=4MiB,chunk=16KiB") as nic:
        size0 = nic.state_size
        running_size = nic.data_size()  # callable while RUNNING
        assert running_size > size0
        stream = nic.set_state(S.PRE_COPY)
        initial, dirty = nic.precopy_info()
        assert initial >= size0 and dirty == 0
        first = stream.read(100_000)
        assert len(first) == 100_000
        assert nic.precopy_info()[0] == initial - 100_000
        drain(stream)
        assert nic.precopy_info()[0] == 0
        assert wait_until(lambda: nic.precopy_info()[1] > 0), "traffic dirties state"
        assert wait_until(lambda: nic.state_size > size0), "state grows with traffic"
        # data_size() covers exactly what STOP_COPY still produces.
        nic.set_state(S.PRE_COPY_P2P)
        remaining = nic.data_size()
        nic.set_state(S.STOP_COPY)
        assert len(drain(stream)) == remaining


def test_opaque_size_is_known_only_by_producing_it() -> None:
    with D.create("opaque:state=256KiB,rate=4MiB/s,chunk=16KiB") as dev:
        with pytest.raises(mig.UnsupportedError, match="MIG_DATA_SIZE"):
            dev.data_size()
        sizes = set()
        for _ in range(20):
            sizes.add(dev.state_size)
            time.sleep(0.01)
        assert len(sizes) > 1, "the opaque state changes size while it runs"
        stream = dev.set_state(S.STOP_COPY)
        size = dev.state_size
        data = drain(stream)
        assert len(data) > size and dev.state_size == size  # stopped: frozen


def test_gpu_worker_dirties_state_during_precopy() -> None:
    with D.create("gpu:state=4MiB,rate=32MiB/s,chunk=256KiB") as gpu:
        stream = gpu.set_state(S.PRE_COPY)
        drain(stream)
        assert wait_until(lambda: gpu.precopy_info()[1] >= 1 << 20)
        gpu.set_state(S.PRE_COPY_P2P)  # quiesced: the worker stops
        digest = gpu.state_digest()
        time.sleep(0.05)
        assert gpu.state_digest() == digest


def test_dma_writes_guest_memory_until_p2p() -> None:
    mem = mig.GuestMemory(1 << 20)
    with D.create("dma:dma=8MiB/s", mem) as dev:
        before = mem.digest()
        assert dev.wait_dma(0)
        assert mem.digest() != before
        # Pages carry the device's sequence stamp and are in its DMA log.
        pages = dev.dma_log.take().indices()
        assert len(pages) > 0
        page = int(pages[0])
        stamp = mem.read(page * mem.page_size, 8)
        assert int.from_bytes(stamp, "little") > 0
        # Precopy does not stop DMA; a P2P state does.
        dev.set_state(S.PRE_COPY)
        assert dev.wait_dma(dev.dma_pages_written)
        dev.set_state(S.PRE_COPY_P2P)
        frozen, written = mem.digest(), dev.dma_pages_written
        time.sleep(0.05)
        assert mem.digest() == frozen and dev.dma_pages_written == written
        dev.set_state(S.PRE_COPY)
        assert dev.wait_dma(written)


def test_destination_device_stays_idle_until_loaded() -> None:
    mem = mig.GuestMemory(1 << 20)
    with D.create("dma:dma=8MiB/s", mem, active=False) as dev:
        time.sleep(0.05)
        assert dev.dma_pages_written == 0 and mem.digest() == mig.GuestMemory(1 << 20).digest()


def test_create_all_names_devices_per_kind() -> None:
    devs = D.create_all("fixed,fixed,nic:state=64KiB,name=uplink")
    try:
        assert [d.name for d in devs] == ["fixed0", "fixed1", "uplink"]
    finally:
        for d in devs:
            d.close()
