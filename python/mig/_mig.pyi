"""Type stubs for the native module ``mig._mig`` (the Rust core)."""

from collections.abc import Callable
from os import PathLike
from types import TracebackType
from typing import Any, Literal, Self, TypedDict

import numpy as np
import numpy.typing as npt

page_size: int

class MigError(Exception): ...
class UnsupportedError(MigError): ...
class ProtocolError(MigError): ...

Backing = Literal["memfd", "memfd-thp", "anon", "anon-thp", "hugetlb"]

class GuestMemory:
    """Page-aligned guest memory shared by every thread; memfd-backed unless
    another backing is asked for ("auto": the fastest to fill the host offers)."""

    def __init__(self, size: int, backing: Backing | Literal["auto"] = "memfd") -> None: ...
    @staticmethod
    def from_image(
        path: str | PathLike[str], backing: Backing | Literal["auto"] = "memfd"
    ) -> GuestMemory: ...
    def to_image(self, path: str | PathLike[str]) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def page_size(self) -> int: ...
    @property
    def num_pages(self) -> int: ...
    @property
    def fd(self) -> int | None:
        """The memfd; None for anonymous memory."""
    @property
    def backing(self) -> Backing: ...
    @property
    def backing_page_size(self) -> int:
        """The unit the kernel allocates in when it can (huge page size for THP, hugetlb)."""
    def huge_bytes(self) -> int:
        """Bytes the kernel backs with huge pages right now (/proc/self/smaps)."""
    def populate(self, offset: int = 0, len: int | None = None) -> None:
        """Allocate and zero the range now (MADV_POPULATE_WRITE); content is kept."""
    def data_ranges(self) -> list[tuple[int, int]]:
        """Byte ranges that may hold data now; the rest reads as zeros."""
    @property
    def array(self) -> npt.NDArray[np.uint8]: ...
    def digest(
        self, first: int | None = None, count: int | None = None, threads: int | None = None
    ) -> int:
        """Without a range: the chunk root of all of memory (what the end
        records carry), read with ``threads`` threads. With ``first``/``count``:
        the plain xxh3-128 of those pages' bytes."""
    def read(self, offset: int, len: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...
    def __len__(self) -> int: ...

class ChunkDigest:
    """An order-independent digest of ``memory`` kept current by
    ``mark_written``: per-chunk keyed xxh3 hashes summed into a root that
    equals ``memory.digest()`` when every write was marked."""

    def __init__(self, memory: GuestMemory, chunk_bytes: int | None = None) -> None: ...
    @property
    def chunk_bytes(self) -> int: ...
    @property
    def chunks(self) -> int: ...
    @property
    def stale_chunks(self) -> int: ...
    def mark_written(self, first: int, count: int = 1) -> None:
        """Pages ``[first, first + count)`` were written (call after the write)."""
    def root(self) -> int:
        """The root now; rehashes only the blocks written since their hash."""
    def root_timed(self) -> dict[str, int | float]:
        """``root`` with ``rehashed-chunks``, ``rehashed-bytes`` (memory
        read) and ``seconds`` it took."""
    def rehash_settled(self, limit: int) -> int:
        """One background step here: rehash up to ``limit`` settled chunks."""
    def start_rehasher(self, period: float = 0.02, batch: int = 16, duty: float = 0.5) -> None:
        """A low-priority thread rehashing settled chunks, at most ``duty``
        of a core."""
    def stop_rehasher(self) -> None: ...

def digest_frozen(
    memory: GuestMemory, threads: int | None = None, chunk_bytes: int | None = None
) -> int:
    """The chunk root of all of ``memory``, read in full with ``threads``
    threads (``GuestMemory.digest()``; ``chunk_bytes`` for measurements)."""

def mark_pages(digest: ChunkDigest, pages: int, run: int) -> None:
    """Marks pages ``[0, pages)`` in calls of ``run`` pages (benchmarks)."""

class DirtyBitmap:
    """One bit per page in u64 words."""

    def __init__(self, num_pages: int) -> None: ...
    @staticmethod
    def full(num_pages: int) -> DirtyBitmap: ...
    @staticmethod
    def from_numpy(words: npt.NDArray[np.uint64], num_pages: int) -> DirtyBitmap: ...
    @staticmethod
    def from_indices(indices: Any, num_pages: int) -> DirtyBitmap: ...
    def to_numpy(self) -> npt.NDArray[np.uint64]: ...
    @property
    def num_pages(self) -> int: ...
    def __len__(self) -> int: ...
    def count(self) -> int: ...
    def indices(self) -> npt.NDArray[np.uint64]: ...
    def runs(self) -> npt.NDArray[np.uint64]:
        """(n, 2) array of (start, length)."""
    def get(self, page: int) -> bool: ...
    def set(self, page: int) -> None: ...
    def set_range(self, start: int, length: int) -> None: ...
    def clear(self) -> None: ...
    def copy(self) -> DirtyBitmap: ...
    def test_and_clear(self, start: int, length: int) -> DirtyBitmap: ...
    def take(self) -> DirtyBitmap: ...
    def and_not(self, other: DirtyBitmap) -> None: ...
    def __ior__(self, other: DirtyBitmap) -> Self: ...
    def __or__(self, other: DirtyBitmap) -> DirtyBitmap: ...
    def __eq__(self, other: object) -> bool: ...

class DecodedBuffer:
    """The ``.base`` of arrays from ``DirtyBitmap.indices()``/``runs()``: owns
    their memory and hands it back for reuse by the next large decode."""

class DirtyTracker:
    """Pages written since the previous ``sync()``: backend ``"uffd"`` (kernel
    write-protect, async, harvested with PAGEMAP_SCAN) or ``"soft"`` (``mark()``).
    """

    def __init__(self, memory: GuestMemory, backend: Literal["uffd", "soft"] = "uffd") -> None: ...
    def sync(self) -> DirtyBitmap: ...
    def sync_final(self) -> DirtyBitmap:
        """The switchover's last sync, guest stopped: the written pages, not
        write-protected again (a later ``sync()`` reports them once more)."""
    def mark(self, pages: DirtyBitmap | npt.NDArray[np.uint64] | Any) -> None: ...
    def scan_bare(self, parts: int | None = None) -> int:
        """Benchmark baseline: the bare PAGEMAP_SCAN harvest (re-protecting), in
        ``parts`` threads (None: as ``sync()``); returns written pages."""
    @property
    def backend(self) -> Literal["uffd", "soft"]: ...
    @property
    def num_pages(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def last_sync_seconds(self) -> float: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

class BackendCapability(TypedDict):
    available: bool
    reason: str
    missing: list[str]

class PostcopyCapability(BackendCapability):
    kernel_faults: bool
    """Faults raised inside the kernel (a recv() into a missing page) wait for
    the page; False under UFFD_USER_MODE_ONLY, where they fail with EFAULT."""
    kernel_faults_note: str
    thread_ids: bool
    placement_continue: BackendCapability
    """postcopy-placement continue: userfaultfd MINOR mode on shmem with
    UFFDIO_CONTINUE (UFFD_FEATURE_MINOR_SHMEM, Linux 5.13)."""

class Capabilities(TypedDict):
    kernel: str
    faked: bool
    shmem_thp: str
    uffd: BackendCapability
    soft: BackendCapability
    postcopy: PostcopyCapability

PostcopyStats = TypedDict(
    "PostcopyStats",
    {
        "postcopy-requests": int,
        "postcopy-faults": int,
        "pages-placed": int,
        "zero-pages-placed": int,
        "already-present": int,
        "pages-discarded": int,
        "faults-resolved": int,
        "fault-latency-p50": float | None,
        "fault-latency-p99": float | None,
        "postcopy-blocktime": float | None,
        "postcopy-vcpu-blocktime": dict[int, float],
        "kernel-faults": bool,
        "thread-ids": bool,
        "postcopy-placement": str,
    },
)

class PostcopyRegion:
    """The destination's memory during post-copy: registered with userfaultfd
    in MISSING mode, so a guest access to a page not yet placed blocks until
    ``place()``/``place_zero()`` puts it there. Times in the stats are ms.
    """

    def __init__(self, vcpus: int = 0, placement: str = "copy") -> None:
        """``placement``: ``copy`` (UFFDIO_COPY) or ``continue`` (MINOR mode on
        memfd/shmem, UFFDIO_CONTINUE); ``auto`` is the shmem default."""
    def register(self, memory: GuestMemory, discard: list[tuple[int, int]] = ...) -> None:
        """Registers ``memory``, discards the stale ``(start_page, n)`` ranges and
        starts the fault thread. Raises ``UnsupportedError`` naming the missing
        feature on a host without userfaultfd MISSING mode."""
    def place(self, page: int, data: bytes | bytearray) -> bool:
        """Places one page atomically (UFFDIO_COPY, or written into the memfd
        and mapped with UFFDIO_CONTINUE); False if already present."""
    def place_zero_range(self, first: int, n: int) -> int:
        """Places zeros at ``n`` pages from ``first`` (one ioctl per run of
        missing pages); returns the pages placed."""
    def place_run(self, first: int, data: bytes | bytearray) -> int:
        """Places whole pages from ``first`` (one UFFDIO_CONTINUE per run with
        ``continue``); returns the pages placed."""
    def place_zero(self, page: int) -> bool:
        """Places a zero page (UFFDIO_ZEROPAGE); False if already present."""
    def next_requests(self, timeout: float = 0.0) -> list[int]:
        """Pages newly waited for: up to ``timeout`` s for the first, then all queued."""
    def is_placed(self, page: int) -> bool: ...
    def stats(self) -> PostcopyStats: ...
    @property
    def registered(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

class PostcopyOutgoing:
    """The source's post-copy page channels: owes the destination the chunks
    holding a page of ``owed``, answers requests first, pushes the rest
    paced to ``max_bandwidth``."""

    def __init__(
        self,
        sender: Sender,
        memory: GuestMemory,
        owed: DirtyBitmap,
        *,
        max_bandwidth: int = 0,
        max_push_bandwidth: int = 0,
        one_stream: bool = False,
    ) -> None: ...
    def connect(self, uri: str) -> None:
        """Opens the two page channels to ``uri``."""
    def start(self) -> None:
        """Names the owed chunks (``DISCARD``), then serves and pushes."""
    def reconnect(self, uri: str, timeout: float) -> None:
        """After a broken channel: new channels, what the destination misses is owed again."""
    def wait(self, timeout: float) -> tuple[str, str | None]:
        """("active" | "placed" | "paused", reason) after up to ``timeout`` s."""
    def set_max_bandwidth(self, bytes_per_s: int) -> None: ...
    def set_max_push_bandwidth(self, bytes_per_s: int) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...

class PostcopyIncoming:
    """The destination's post-copy page channels around a ``PostcopyRegion``."""

    def __init__(self, memory: GuestMemory, *, vcpus: int = 0, placement: str = "auto") -> None:
        """``placement``: ``auto``, ``copy`` or ``continue`` (memfd/shmem only;
        ``ValueError`` otherwise)."""
    @property
    def placement(self) -> str:
        """``copy`` or ``continue``: ``auto`` resolved for the memory's backing."""
    def attach(
        self, listener: Listener, receiver: Receiver, timeout: float, *, io_timeout: float = 60.0
    ) -> int:
        """Accepts the page channels, registers memory, discards the owed
        chunks, starts; returns how many chunks are owed."""
    def recover(
        self, listener: Listener, receiver: Receiver, timeout: float, *, io_timeout: float = 60.0
    ) -> None: ...
    def wait(self, timeout: float) -> tuple[str, str | None]:
        """("active" | "complete" | "paused", reason) after up to ``timeout`` s."""
    @property
    def root(self) -> int | None:
        """The digest root of memory as resumed, once every owed chunk is placed."""
    def missing_pages(self) -> list[tuple[int, int]]: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...

def capabilities() -> Capabilities: ...
def memory_backings() -> list[dict[str, Any]]:
    """What the host offers per backing, fastest to fill first: backing,
    available, page-size, reason."""

def fastest_backing(size: int) -> Backing:
    """The backing "auto" picks for memory of ``size`` bytes."""

def digest_bytes(data: npt.NDArray[np.uint8]) -> int:
    """xxh3-128 of a contiguous uint8 array (as ``GuestMemory.digest(first, count)``)."""
    ...

class WorkloadGuest:
    """Native vCPU threads writing guest memory by a workload spec."""

    def __init__(self, memory: GuestMemory, vcpus: int = 1, workload: str = "idle") -> None: ...
    def pause(self) -> float: ...
    def resume(self) -> None: ...
    def set_throttle(self, pct: float) -> None: ...
    def set_dirty_limit(self, rate: float) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    @property
    def running(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def memory(self) -> GuestMemory: ...
    @property
    def vcpus(self) -> int: ...
    @property
    def workload(self) -> str: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

class RamStream:
    """Guest RAM from a tracker to a link, one chunk per call, with the GIL
    released: the known dirty set, the cursor, the generation and the send
    path. ``tracker``: a native ``DirtyTracker`` or any object with
    ``sync() -> DirtyBitmap`` (and optionally ``last_sync_seconds``, ``close()``);
    ``start(link)``: a native ``Sender`` or any object with
    ``send_pages(bitmap, generation)`` and ``sync(generation)``."""

    def __init__(self, num_pages: int, page_size: int, tracker: Any) -> None: ...
    def start(self, link: Any) -> None: ...
    def sync(self) -> tuple[DirtyBitmap, int, float]:
        """(new pages, their count, harvest seconds); closes the generation first
        if pages went out in it."""
    def iterate(self, budget: int) -> int: ...
    def complete(self, budget: int | None = None) -> tuple[int | None, int, tuple[int, float]]:
        """(wire bytes, or None over budget with nothing sent; bytes known;
        (new pages, harvest seconds) of the final sync)."""
    def take_known(self) -> tuple[DirtyBitmap, int, float]:
        """Post-copy's hand-over: a final harvest, the known set out unsent."""
    def pending(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def num_pages(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...

class Sender:
    """Streams guest memory to ``uri`` (``tcp:HOST:PORT``, ``unix:PATH``,
    ``file:PATH``) over one control channel and ``channels`` data channels.
    ``tls_cert``/``tls_key``/``tls_ca`` (PEM paths, all or none): mutual TLS
    1.3 on every channel; the destination's certificate must chain to the CA
    and name the URI's host (``localhost`` for ``unix:``)."""

    def __init__(
        self,
        memory: GuestMemory,
        uri: str,
        *,
        migration_id: int | str | bytes,
        channels: int = 2,
        packet_pages: int = 128,
        compression: str = "none",
        max_bandwidth: int = 0,
        connect_timeout: float = 10.0,
        io_timeout: float = 60.0,
        tls_cert: str | PathLike[str] | None = None,
        tls_key: str | PathLike[str] | None = None,
        tls_ca: str | PathLike[str] | None = None,
        zero_copy_send: bool = False,
    ) -> None:
        """``zero_copy_send``: MSG_ZEROCOPY sends (QEMU's ``zero-copy-send``),
        completions reaped at every sync; ``tcp:`` only, no compression or
        TLS. On loopback the kernel always copies, so it cannot pay there."""
    @property
    def uri(self) -> str: ...
    @property
    def channels(self) -> int: ...
    @property
    def migration_id(self) -> int: ...
    def send_pages(self, bitmap: DirtyBitmap, generation: int) -> int: ...
    def send_page_list(self, pages: npt.NDArray[np.uint64], generation: int) -> int:
        """The pages by index (each once per generation); O(pages) checks."""
    def send_device_state(self, device_id: int, seq: int, data: bytes, final: bool) -> int: ...
    def sync(self, generation: int) -> int: ...
    def finish(self, digest: int) -> int: ...
    def control_send(self, data: bytes) -> None: ...
    def control_recv(self, timeout: float) -> bytes | None: ...
    def set_max_bandwidth(self, bytes_per_s: int) -> None: ...
    def stats(self) -> dict[str, object]: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> Sender: ...
    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

class Listener:
    """Binds ``uri`` (``tcp:127.0.0.1:0`` picks a port; ``.uri`` resolves it).
    With ``tls_cert``/``tls_key``/``tls_ca`` every channel must be mutual TLS
    with a client certificate that chains to the CA; others are refused."""

    def __init__(
        self,
        uri: str,
        *,
        tls_cert: str | PathLike[str] | None = None,
        tls_key: str | PathLike[str] | None = None,
        tls_ca: str | PathLike[str] | None = None,
    ) -> None: ...
    @property
    def uri(self) -> str: ...
    @property
    def tls(self) -> bool: ...
    def accept(
        self,
        memory: GuestMemory,
        timeout: float,
        *,
        io_timeout: float = 60.0,
        device_buffer: int = 33554432,
        on_refused: Callable[[str, str], object] | None = None,
        data_ranges: list[tuple[int, int]] | None = None,
    ) -> Receiver:
        """Each connection refused while waiting goes to ``on_refused(peer,
        reason)`` as it happens; by default one warning on the ``mig.listener``
        logger. ``data_ranges``: the byte ranges of ``memory`` that may hold
        data, taken before ``populate`` made every page present (the rest is
        known to be zeros, and only this session writes the memory); by
        default the memory is asked at accept."""
        ...
    def close(self) -> None: ...
    def __enter__(self) -> Listener: ...
    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

class Receiver:
    """One accepted session; channel threads validate and apply pages."""

    @property
    def migration_id(self) -> int: ...
    @property
    def channels(self) -> int: ...
    @property
    def peer(self) -> str | None:
        """The source's address as the control channel's peer; None for a file."""
    def control_send(self, data: bytes) -> None: ...
    def control_recv(self, timeout: float) -> bytes | None: ...
    def device_records(self) -> list[tuple[int, int, bytes, bool]]: ...
    def wait_end(self, timeout: float, verify: bool = True) -> dict[str, int | float]:
        """Waits for the end records and takes the destination's chunk root
        (``digest``; ``source-digest``, ``verify-time``, ``rehashed-chunks``,
        ``rehashed-bytes``).
        With ``verify``, raises unless the root equals the source's digest."""
    def memory_root(self) -> int:
        """The destination memory's chunk root now (rehashes stale chunks)."""
    def stats(self) -> dict[str, object]: ...
    def abort(self) -> None: ...

def scan_pages(
    memory: GuestMemory, bitmap: DirtyBitmap, packet_pages: int = 128
) -> dict[str, int]: ...
def read_memory(memory: GuestMemory) -> int: ...
