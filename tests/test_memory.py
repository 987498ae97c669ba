"""GuestMemory: allocation, zero-copy numpy view, images and digests."""

import numpy as np
import pytest

import mig


def test_size_must_be_page_multiple() -> None:
    with pytest.raises(ValueError, match=r"4097.*4096"):
        mig.GuestMemory(4097)


def test_array_is_a_writable_zero_copy_view() -> None:
    mem = mig.GuestMemory(16 * mig.GuestMemory(4096).page_size)
    arr = mem.array
    assert arr.dtype == np.uint8 and arr.size == mem.size and arr.flags.writeable
    arr[mem.page_size * 3 : mem.page_size * 3 + 4] = [1, 2, 3, 4]
    assert mem.read(mem.page_size * 3, 4) == b"\x01\x02\x03\x04"
    mem.write(0, b"xyz")
    assert bytes(arr[:3]) == b"xyz"


def test_view_keeps_memory_alive() -> None:
    arr = mig.GuestMemory(1 << 16).array
    arr[:] = 5
    assert int(arr.sum()) == 5 * (1 << 16)


def test_digest_tracks_content_and_ranges(tmp_path) -> None:
    a = mig.GuestMemory(1 << 20)
    b = mig.GuestMemory(1 << 20)
    assert a.digest() == b.digest()
    a.array[12345] = 1
    assert a.digest() != b.digest()
    page = 12345 // a.page_size
    assert a.digest(0, page) == b.digest(0, page)
    assert a.digest(page, 1) != b.digest(page, 1)

    path = tmp_path / "img.raw"
    a.to_image(path)
    assert path.stat().st_size == a.size
    c = mig.GuestMemory.from_image(path)
    assert c.digest() == a.digest() and c.size == a.size


def test_out_of_range_access_is_refused() -> None:
    mem = mig.GuestMemory(1 << 16)
    with pytest.raises(ValueError, match="outside"):
        mem.write(mem.size - 1, b"ab")
    with pytest.raises(ValueError):
        mem.read(0, mem.size + 1)


def test_digest_bytes_is_the_page_digest_of_the_same_bytes() -> None:
    mem = mig.GuestMemory(1 << 20)
    mem.array[:] = np.arange(mem.size, dtype=np.uint64) % 251
    ps = mem.page_size
    assert mig._mig.digest_bytes(mem.array) == mem.digest(0, mem.num_pages)
    assert mig._mig.digest_bytes(mem.array[ps : 3 * ps].copy()) == mem.digest(1, 2)
    assert mig._mig.digest_bytes(mem.array[:ps]) != mig._mig.digest_bytes(mem.array[: ps + 1])
    with pytest.raises(ValueError, match="contiguous"):
        mig._mig.digest_bytes(mem.array[::2])
