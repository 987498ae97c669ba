//! An order-independent digest of guest memory, kept current while pages
//! land so that the switchover only rehashes what changed.
//!
//! Memory is cut into chunks of [`CHUNK_BYTES`], and each chunk into blocks
//! of [`BLOCK_BYTES`] (one 4 KiB page). A block's hash is the xxh3-128 of
//! its bytes; a chunk's content hash is the xxh3-128 of its block hashes in
//! order; its term is that, keyed with the chunk's index (so the same bytes
//! at another place hash differently). The root is the wrapping sum of the
//! chunk terms, finalised with the memory's geometry.
//!
//! Why blocks inside chunks: a chunk stays the unit of the root, of
//! post-copy and of every API, but rehashing a chunk after a scattered write
//! reads only the blocks written since their last hash and then hashes the
//! chunk's block hashes (256 bytes for 16 blocks), instead of reading the
//! whole chunk. The switchover's rehash then costs O(pages written), not
//! O(chunks touched x chunk size). The price is one 16-byte hash per block
//! kept by the destination: 1/256 of guest memory (16 MiB for 4 GiB).
//!
//! Why a sum and not a Merkle tree: the sum does not depend on the order in
//! which chunks are hashed, and replacing one chunk's hash is one subtraction
//! and one addition, with no tree to update or lock level by level. Each term
//! is a well-mixed 128-bit hash, so an accidental difference (a page lost,
//! reordered or corrupted) leaves the sum unchanged with probability about
//! 2^-128. It is not a defence against someone who crafts memory contents
//! to collide (nor is xxh3): it checks the engine, and TLS guards the wire.
//!
//! Holes: a memfd page never written reads as zeros, but reading it through
//! the mapping would allocate it. A per-page "may hold data" bitmap (from the
//! memfd's data extents, plus every page marked written) lets hashing treat
//! the other pages as zeros without touching them.
//!
//! The destination uses [`ChunkDigest`]: receive threads call
//! [`ChunkDigest::mark_written`] after each write (a few atomic ORs, no
//! lock), the receive path rehashes the blocks a record just stored while
//! they are in cache, a [`Rehasher`] thread rehashes chunks that have
//! settled, and [`ChunkDigest::root`] rehashes only the blocks still stale.
//! The source
//! uses [`digest_frozen`]: the same root over all of memory, read in full
//! with several threads, independent of any dirty tracking.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::{xxh3_128_with_seed, Xxh3};

use crate::error::{CoreError, CoreResult};
use crate::memory::GuestMemory;

/// Bytes per chunk (rounded up to the page size if pages are larger).
///
/// The smallest size considered (64 KiB..2 MiB): a chunk costs 16 bytes of
/// table and one short keyed hash, which stays negligible at this size. A
/// stale chunk's rehash reads only its stale blocks but hashes all of its
/// block hashes again (16 bytes per block), so smaller chunks still make
/// [`ChunkDigest::root`] after a scattered final pass cheaper
/// (benches/bench_chunk_digest.py measures it).
pub const CHUNK_BYTES: usize = 64 << 10;

/// Largest chunk accepted: the zero source below covers one chunk.
const MAX_CHUNK_BYTES: usize = 2 << 20;
static ZEROS: [u8; MAX_CHUNK_BYTES] = [0; MAX_CHUNK_BYTES];

/// Bytes per block, the unit a chunk's hash is built from: one small page,
/// the unit a write marks. Fixed (not the host's page size) so that a
/// chunk's hash depends on its bytes alone.
pub const BLOCK_BYTES: usize = 4096;

/// Chunks claimed by a digest thread at a time (one atomic per claim).
const BATCH: usize = 64;

/// A block's hash.
fn block_hash(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// A chunk's content hash from its block hashes, in order. The one place
/// that defines how blocks combine: both sides and post-copy use it.
fn combine(blocks: impl IntoIterator<Item = u128>) -> u128 {
    let mut h = Xxh3::new();
    for b in blocks {
        h.update(&b.to_le_bytes());
    }
    h.digest128()
}

/// A chunk's hash keyed with its index: moved data hashes differently.
fn keyed(index: usize, content: u128) -> u128 {
    xxh3_128_with_seed(&content.to_le_bytes(), index as u64)
}

/// The root: the sum of keyed chunk hashes, bound to the memory's geometry
/// (a zero tail of another length, or another chunking, gives another root).
fn finalize(sum: u128, mem_len: usize, chunk_bytes: usize) -> u128 {
    let mut h = Xxh3::new();
    h.update(&sum.to_le_bytes());
    h.update(&(mem_len as u64).to_le_bytes());
    h.update(&(chunk_bytes as u64).to_le_bytes());
    h.digest128()
}

/// One chunk's term of the root: its bytes hashed, keyed with its index.
/// Post-copy's destination adds the terms of the chunks it places.
pub fn chunk_term(index: usize, bytes: &[u8]) -> u128 {
    keyed(index, content_hash(bytes))
}

/// The term of chunk `index` whose unkeyed hash is `content` (that of
/// [`chunk_term`]'s bytes): lets a caller hash a common content, such as a
/// chunk of zeros, once for many chunks.
pub fn chunk_term_of_hash(index: usize, content: u128) -> u128 {
    keyed(index, content)
}

/// The unkeyed hash of a chunk's bytes, for [`chunk_term_of_hash`]: the
/// combination of the hashes of its [`BLOCK_BYTES`] blocks.
pub fn content_hash(bytes: &[u8]) -> u128 {
    combine(bytes.chunks(BLOCK_BYTES).map(block_hash))
}

/// The root of a memory of `mem_len` bytes whose chunk terms sum to `sum`.
pub fn root_of_sum(sum: u128, mem_len: usize, chunk_bytes: usize) -> u128 {
    finalize(sum, mem_len, chunk_bytes)
}

/// The words a bit range spans, each with the mask of its bits in range.
fn word_masks(range: Range<usize>) -> impl Iterator<Item = (usize, u64)> {
    let mut i = range.start;
    std::iter::from_fn(move || {
        if i >= range.end {
            return None;
        }
        let (w, b) = (i / 64, i % 64);
        let n = (64 - b).min(range.end - i);
        i += n;
        Some((
            w,
            if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            },
        ))
    })
}

/// Sets bits `range` of a bitmap, a word at a time.
fn set_bits(words: &[AtomicU64], range: Range<usize>, order: Ordering) {
    for (w, mask) in word_masks(range) {
        words[w].fetch_or(mask, order);
    }
}

fn get_bit(words: &[AtomicU64], i: usize) -> bool {
    words[i / 64].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
}

/// Pages that may hold data ([`GuestMemory::data_ranges`]: a memfd's data
/// extents, or the pages present in anonymous memory); the rest are holes
/// that read as zeros. On any doubt every page counts as data, which only
/// costs reads.
pub fn data_pages(mem: &GuestMemory) -> Vec<AtomicU64> {
    pages_of_ranges(mem, &mem.data_ranges())
}

/// The pages of `ranges` (byte ranges, clipped to memory), as a bitmap.
fn pages_of_ranges(mem: &GuestMemory, ranges: &[(usize, usize)]) -> Vec<AtomicU64> {
    let pages = mem.num_pages();
    let ps = mem.page_size();
    let words: Vec<AtomicU64> = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
    for &(start, end) in ranges {
        set_bits(
            &words,
            start / ps..end.div_ceil(ps).min(pages),
            Ordering::Relaxed,
        );
    }
    words
}

/// How memory is cut into chunks and blocks.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    page_size: usize,
    pages: usize,
    /// log2 of pages per chunk.
    shift: u32,
    chunks: usize,
    /// Blocks per page (1 with 4 KiB pages).
    blocks_per_page: usize,
    /// The hash of a block of zeros.
    zero_block: u128,
}

impl Geometry {
    fn new(mem: &GuestMemory, chunk_bytes: usize) -> CoreResult<Self> {
        let ps = mem.page_size();
        let chunk_bytes = chunk_bytes.max(ps);
        if !chunk_bytes.is_power_of_two() || chunk_bytes > MAX_CHUNK_BYTES.max(ps) {
            return Err(CoreError::invalid(format!(
                "chunk size {chunk_bytes} is not a power of two of at most {MAX_CHUNK_BYTES} bytes"
            )));
        }
        if !ps.is_multiple_of(BLOCK_BYTES) {
            return Err(CoreError::invalid(format!(
                "page size {ps} is not a multiple of the {BLOCK_BYTES}-byte digest block"
            )));
        }
        let shift = (chunk_bytes / ps).trailing_zeros();
        let pages = mem.num_pages();
        Ok(Geometry {
            page_size: ps,
            pages,
            shift,
            chunks: pages.div_ceil(1 << shift),
            blocks_per_page: ps / BLOCK_BYTES,
            zero_block: block_hash(&ZEROS[..BLOCK_BYTES]),
        })
    }

    fn chunk_bytes(&self) -> usize {
        self.page_size << self.shift
    }

    fn pages_of(&self, chunk: usize) -> Range<usize> {
        let first = chunk << self.shift;
        first..(first + (1 << self.shift)).min(self.pages)
    }

    fn blocks_of(&self, chunk: usize) -> Range<usize> {
        let pages = self.pages_of(chunk);
        pages.start * self.blocks_per_page..pages.end * self.blocks_per_page
    }

    fn blocks(&self) -> usize {
        self.pages * self.blocks_per_page
    }

    /// A block's hash and the bytes read for it: a page that may hold data
    /// is read from the mapping, a hole hashed as zeros without touching it.
    fn block(&self, mem: &GuestMemory, data: &[AtomicU64], block: usize) -> (u128, usize) {
        if !get_bit(data, block / self.blocks_per_page) {
            return (self.zero_block, 0);
        }
        // SAFETY: the block lies inside the mapping (a block of a page of
        // this memory). A writer racing with the hash only makes the hash a
        // mixture of old and new bytes; the destination re-marks such a
        // block and it is rehashed.
        let bytes = unsafe { mem.racy_slice(block * BLOCK_BYTES, BLOCK_BYTES) };
        (block_hash(bytes.expect("block is in range")), BLOCK_BYTES)
    }

    /// The content hash of a chunk of holes, without reading it.
    fn zero_content(&self, chunk: usize) -> u128 {
        combine(self.blocks_of(chunk).map(|_| self.zero_block))
    }
}

/// Runs `one` over `items` with up to `threads` threads taking batches from
/// a shared cursor (holes hash far faster than data, so static splits would
/// idle), and returns the results in the order of `items`.
fn hash_chunks<I: Sync, T: Send>(
    items: &[I],
    threads: usize,
    one: impl Fn(&I) -> T + Sync,
) -> Vec<T> {
    let threads = threads.clamp(1, items.len().div_ceil(BATCH).max(1));
    if threads == 1 {
        return items.iter().map(one).collect();
    }
    let next = AtomicUsize::new(0);
    let mut parts: Vec<(usize, T)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let at = next.fetch_add(BATCH, Ordering::Relaxed);
                        if at >= items.len() {
                            break done;
                        }
                        for (i, item) in items.iter().enumerate().take(at + BATCH).skip(at) {
                            done.push((i, one(item)));
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a digest thread panicked"))
            .collect()
    });
    parts.sort_unstable_by_key(|&(i, _)| i);
    parts.into_iter().map(|(_, t)| t).collect()
}

/// A 128-bit slot of lock-free storage (block hashes are read by hashers
/// that hold no lock; they are only written under the table lock).
#[derive(Default)]
struct AtomicU128([AtomicU64; 2]);

impl AtomicU128 {
    fn new(v: u128) -> Self {
        let a = AtomicU128::default();
        a.store(v);
        a
    }

    fn store(&self, v: u128) {
        self.0[0].store(v as u64, Ordering::Relaxed);
        self.0[1].store((v >> 64) as u64, Ordering::Relaxed);
    }

    fn load(&self) -> u128 {
        self.0[0].load(Ordering::Relaxed) as u128
            | (self.0[1].load(Ordering::Relaxed) as u128) << 64
    }
}

/// The threads a whole-memory digest uses by default: the host's cores,
/// at most four (memory bandwidth is shared beyond that).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// The root of all of `mem`, read in full with `threads` threads: the
/// source's digest of its frozen memory. Equal to [`ChunkDigest::root`] of
/// a destination holding the same bytes.
pub fn digest_frozen(mem: &GuestMemory, threads: usize) -> u128 {
    digest_frozen_with(mem, threads, CHUNK_BYTES).expect("the default chunk size is valid")
}

/// [`digest_frozen`] with another chunk size (for measurements).
pub fn digest_frozen_with(
    mem: &GuestMemory,
    threads: usize,
    chunk_bytes: usize,
) -> CoreResult<u128> {
    let geo = Geometry::new(mem, chunk_bytes)?;
    let data = data_pages(mem);
    let all: Vec<usize> = (0..geo.chunks).collect();
    let term = |&c: &usize| {
        let content = combine(geo.blocks_of(c).map(|b| geo.block(mem, &data, b).0));
        keyed(c, content)
    };
    let sum = hash_chunks(&all, threads, term)
        .into_iter()
        .fold(0u128, u128::wrapping_add);
    Ok(finalize(sum, mem.len(), geo.chunk_bytes()))
}

/// Chunk hashes and their sum, changed together.
struct Table {
    hashes: Vec<u128>,
    sum: u128,
    /// Chunks a hasher without the lock (the rehasher, a receive thread)
    /// claimed and is hashing: at most one such hasher per chunk. Only
    /// changed under the lock.
    in_flight: Vec<u64>,
    /// Chunks in flight that `root` took over (hashed itself, every block):
    /// the hasher's result is dropped when it returns. Only changed under
    /// the lock.
    taken_over: Vec<u64>,
}

impl Table {
    fn replace(&mut self, chunk: usize, hash: u128) {
        self.sum = self.sum.wrapping_sub(self.hashes[chunk]).wrapping_add(hash);
        self.hashes[chunk] = hash;
    }
}

/// One chunk hashed: its term, the blocks hashed anew, and the bytes read.
struct Hashed {
    chunk: usize,
    term: u128,
    /// (block, hash), in block order.
    fresh: Vec<(usize, u128)>,
    bytes: usize,
}

/// The destination's running digest: see the module documentation.
///
/// Invariant: a block whose `stale_blocks` bit is clear holds its current
/// bytes' hash in `blocks`, and a chunk whose `stale` bit is clear and that
/// is not in flight has in the table the combination of its block hashes,
/// provided every write was followed by `mark_written`. A chunk is claimed
/// (its stale bit cleared) under the table lock, then its stale blocks are
/// taken (their bits cleared) and read, so a write marked during the hash
/// sets the bits again. Block hashes, like chunk hashes, are only written
/// under the table lock, by the chunk's one hasher or by `root`.
///
/// The rehasher holds the lock only to claim and to store results, never
/// while it hashes: it runs at the lowest priority, and `root` (in the
/// downtime) must not wait for it.
pub struct ChunkDigest {
    mem: Arc<GuestMemory>,
    geo: Geometry,
    /// Per page: may hold data (else a hole that reads as zeros).
    data: Vec<AtomicU64>,
    /// Per chunk: written since its hash was taken.
    stale: Vec<AtomicU64>,
    /// Per chunk: written since the rehasher last looked (still settling).
    recent: Vec<AtomicU64>,
    /// Per block: written since its hash was taken.
    stale_blocks: Vec<AtomicU64>,
    /// Per block: its hash (16 bytes per 4 KiB: 1/256 of memory).
    blocks: Vec<AtomicU128>,
    table: Mutex<Table>,
    threads: usize,
}

fn lock(m: &Mutex<Table>) -> MutexGuard<'_, Table> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one rehash took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rehashed {
    pub chunks: usize,
    /// Bytes of memory read (stale blocks that may hold data).
    pub bytes: usize,
    pub seconds: f64,
}

/// Clears bits `range` of a bitmap and returns those that were set.
fn take_bits(words: &[AtomicU64], range: Range<usize>) -> Vec<usize> {
    let mut out = Vec::new();
    for (w, mask) in word_masks(range) {
        // Acquire pairs with mark_written's release.
        if words[w].load(Ordering::Relaxed) & mask != 0 {
            let got = words[w].fetch_and(!mask, Ordering::AcqRel) & mask;
            push_bits(&mut out, w, got);
        }
    }
    out
}

impl ChunkDigest {
    /// A digest of `mem` as it is now. Chunks that are all holes get their
    /// hash without a read; the blocks that may hold data start stale
    /// (hashed by the rehasher or at the first `root`).
    pub fn new(mem: Arc<GuestMemory>) -> CoreResult<Self> {
        Self::with_chunk(mem, CHUNK_BYTES)
    }

    /// [`ChunkDigest::new`] with another chunk size (for measurements).
    pub fn with_chunk(mem: Arc<GuestMemory>, chunk_bytes: usize) -> CoreResult<Self> {
        let data = data_pages(&mem);
        Self::build(mem, chunk_bytes, data)
    }

    /// A digest of `mem` whose pages outside `data_ranges` (byte ranges) are
    /// known to be zeros, whatever the page tables say: the ranges were
    /// taken before `GuestMemory::populate` made every page present, and
    /// nothing but the stream writes the memory since.
    pub fn with_data_ranges(
        mem: Arc<GuestMemory>,
        data_ranges: &[(usize, usize)],
    ) -> CoreResult<Self> {
        let data = pages_of_ranges(&mem, data_ranges);
        Self::build(mem, CHUNK_BYTES, data)
    }

    fn build(mem: Arc<GuestMemory>, chunk_bytes: usize, data: Vec<AtomicU64>) -> CoreResult<Self> {
        let geo = Geometry::new(&mem, chunk_bytes)?;
        let bits = |n: usize| (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let stale: Vec<AtomicU64> = bits(geo.chunks);
        let stale_blocks: Vec<AtomicU64> = bits(geo.blocks());
        let (zero_full, zero_tail) = (geo.zero_content(0), geo.zero_content(geo.chunks - 1));
        let mut sum = 0u128;
        let mut hashes = Vec::with_capacity(geo.chunks);
        for c in 0..geo.chunks {
            let full = geo.pages_of(c).len() == 1 << geo.shift;
            let h = keyed(c, if full { zero_full } else { zero_tail });
            sum = sum.wrapping_add(h);
            hashes.push(h);
            for p in geo.pages_of(c).filter(|&p| get_bit(&data, p)) {
                set_bits(&stale, c..c + 1, Ordering::Relaxed);
                let first = p * geo.blocks_per_page;
                set_bits(
                    &stale_blocks,
                    first..first + geo.blocks_per_page,
                    Ordering::Relaxed,
                );
            }
        }
        Ok(ChunkDigest {
            recent: bits(geo.chunks),
            blocks: (0..geo.blocks())
                .map(|_| AtomicU128::new(geo.zero_block))
                .collect(),
            mem,
            geo,
            data,
            stale,
            stale_blocks,
            table: Mutex::new(Table {
                hashes,
                sum,
                in_flight: vec![0; geo.chunks.div_ceil(64)],
                taken_over: vec![0; geo.chunks.div_ceil(64)],
            }),
            threads: default_threads(),
        })
    }

    pub fn chunk_bytes(&self) -> usize {
        self.geo.chunk_bytes()
    }

    pub fn chunks(&self) -> usize {
        self.geo.chunks
    }

    /// Chunks written since their last hash.
    pub fn stale_chunks(&self) -> usize {
        self.stale
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }

    /// Whether a page may hold data (else it is a hole that reads as zeros).
    pub fn may_hold_data(&self, page: usize) -> bool {
        page < self.geo.pages && get_bit(&self.data, page)
    }

    /// Records that pages `[first, first + count)` were written. Call it
    /// after the write: a block being hashed at the same time is hashed
    /// again later. Lock-free; any number of threads may call it.
    pub fn mark_written(&self, first: usize, count: usize) -> CoreResult<()> {
        let end = first
            .checked_add(count)
            .filter(|&e| e <= self.geo.pages)
            .ok_or_else(|| {
                CoreError::invalid(format!(
                    "pages {first}+{count} lie outside guest memory of {} pages",
                    self.geo.pages
                ))
            })?;
        if count == 0 {
            return Ok(());
        }
        set_bits(&self.data, first..end, Ordering::Relaxed);
        let bpp = self.geo.blocks_per_page;
        // Release: whoever takes the block, or claims the chunk, by
        // clearing its bit sees the bytes written before it (and the data
        // bits set above). Blocks before chunks: a hasher claims the chunk
        // first, then takes its blocks.
        set_bits(
            &self.stale_blocks,
            first * bpp..end * bpp,
            Ordering::Release,
        );
        let chunks = first >> self.geo.shift..((end - 1) >> self.geo.shift) + 1;
        set_bits(&self.recent, chunks.clone(), Ordering::Relaxed);
        set_bits(&self.stale, chunks, Ordering::Release);
        Ok(())
    }

    /// Hashes chunk `c`, which the caller claimed: takes its stale blocks
    /// and reads them (every block, for a chunk taken over from another
    /// hasher, whose taken blocks are unknown), then combines the block
    /// hashes. Writes nothing but the stale bits it takes.
    fn hash_chunk(&self, c: usize, every_block: bool) -> Hashed {
        let range = self.geo.blocks_of(c);
        let taken = take_bits(&self.stale_blocks, range.clone());
        let read: Vec<usize> = if every_block {
            range.clone().collect()
        } else {
            taken
        };
        let mut bytes = 0;
        let fresh: Vec<(usize, u128)> = read
            .into_iter()
            .map(|b| {
                let (h, n) = self.geo.block(&self.mem, &self.data, b);
                bytes += n;
                (b, h)
            })
            .collect();
        let mut next = fresh.iter().peekable();
        let content = combine(range.map(|b| match next.peek() {
            Some(&&(fb, h)) if fb == b => {
                next.next();
                h
            }
            _ => self.blocks[b].load(),
        }));
        Hashed {
            chunk: c,
            term: keyed(c, content),
            fresh,
            bytes,
        }
    }

    /// Stores a chunk's hash and its fresh block hashes. The caller holds
    /// the table lock.
    fn store(&self, t: &mut Table, h: &Hashed) {
        for &(b, bh) in &h.fresh {
            self.blocks[b].store(bh);
        }
        t.replace(h.chunk, h.term);
    }

    /// Rehashes now, on the calling thread, the stale blocks of the chunks
    /// `pages` touch (distinct pages one record just stored, its bytes still
    /// in this thread's cache). On a busy two-core host the low-priority
    /// rehasher can starve for a whole transfer and leave all of memory to
    /// `root` inside the downtime; hashing the record's blocks here keeps
    /// the digest current at the cost of one cached read of each page, and
    /// a chunk only partly written reads only its written blocks. Chunks
    /// another hasher holds stay stale for it or `root`. Returns how many
    /// chunks were stored.
    pub fn rehash_covered(&self, pages: impl IntoIterator<Item = usize>) -> usize {
        let mut chunks: Vec<usize> = pages
            .into_iter()
            .filter(|&p| p < self.geo.pages)
            .map(|p| p >> self.geo.shift)
            .collect();
        chunks.sort_unstable();
        chunks.dedup();
        if chunks.is_empty() {
            return 0;
        }
        let claimed = {
            let mut t = lock(&self.table);
            let mut claimed = Vec::with_capacity(chunks.len());
            for &c in &chunks {
                let (w, bit) = (c / 64, 1u64 << (c % 64));
                if t.in_flight[w] & bit != 0 {
                    continue;
                }
                // Acquire pairs with mark_written's release.
                if self.stale[w].fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                    t.in_flight[w] |= bit;
                    claimed.push(c);
                }
            }
            claimed
        };
        let hashed = claimed.iter().map(|&c| self.hash_chunk(c, false)).collect();
        self.store_in_flight(hashed)
    }

    /// Claims the stale chunks `pick` selects from each word of stale bits
    /// (given the word's index and its bits). The caller holds the table
    /// lock.
    fn claim(&self, pick: impl FnMut(usize, u64) -> u64) -> Vec<usize> {
        let mut pick = pick;
        let mut claimed = Vec::new();
        for (w, word) in self.stale.iter().enumerate() {
            let bits = pick(w, word.load(Ordering::Relaxed));
            if bits == 0 {
                continue;
            }
            // Acquire pairs with mark_written's release.
            let got = word.fetch_and(!bits, Ordering::AcqRel) & bits;
            push_bits(&mut claimed, w, got);
        }
        claimed
    }

    /// The root of memory as it is now: rehashes only the stale blocks.
    /// Writers should have stopped (a write marked during the call leaves
    /// its chunk stale for the next one).
    pub fn root(&self) -> u128 {
        self.root_timed().0
    }

    /// [`ChunkDigest::root`] and what its rehash took.
    pub fn root_timed(&self) -> (u128, Rehashed) {
        let t0 = Instant::now();
        let mut t = lock(&self.table);
        let stale = self.claim(|_, bits| bits);
        // Chunks another hasher is hashing right now: take them over, every
        // block (its taken blocks are unknown); its result is dropped.
        let t = &mut *t;
        let mut chunks = stale;
        for (w, (fly, over)) in t.in_flight.iter().zip(t.taken_over.iter_mut()).enumerate() {
            push_bits(&mut chunks, w, fly & !*over);
            *over |= fly;
        }
        chunks.sort_unstable();
        chunks.dedup();
        let over = &t.taken_over;
        let work: Vec<(usize, bool)> = chunks
            .into_iter()
            .map(|c| (c, over[c / 64] & (1 << (c % 64)) != 0))
            .collect();
        let hashed = hash_chunks(&work, self.threads, |&(c, every)| self.hash_chunk(c, every));
        let mut bytes = 0;
        for h in &hashed {
            self.store(t, h);
            bytes += h.bytes;
        }
        let rehashed = Rehashed {
            chunks: hashed.len(),
            bytes,
            seconds: t0.elapsed().as_secs_f64(),
        };
        (
            finalize(t.sum, self.mem.len(), self.geo.chunk_bytes()),
            rehashed,
        )
    }

    /// The sum of the current chunk terms, leaving out the chunks in
    /// `excluded` (post-copy: the chunks the destination discards and then
    /// receives again). Rehashes the stale chunks first, as `root` does.
    pub fn sum_excluding(&self, excluded: impl IntoIterator<Item = usize>) -> u128 {
        self.root();
        let t = lock(&self.table);
        excluded
            .into_iter()
            .filter(|&c| c < self.geo.chunks)
            .fold(t.sum, |sum, c| sum.wrapping_sub(t.hashes[c]))
    }

    /// One step of background work: rehashes up to `limit` chunks that are
    /// stale but were not written since the previous step (chunks still
    /// being written would only be hashed twice), then starts a new settling
    /// window. Returns the chunks rehashed.
    pub fn rehash_settled(&self, limit: usize) -> usize {
        let claimed = self.claim_settled(limit);
        let hashed = claimed.iter().map(|&c| self.hash_chunk(c, false)).collect();
        self.store_in_flight(hashed)
    }

    /// Claims up to `limit` settled chunks no other hasher holds and marks
    /// them in flight; opens the next settling window once every settled
    /// chunk is claimed.
    fn claim_settled(&self, limit: usize) -> Vec<usize> {
        let mut left = limit;
        let mut t = lock(&self.table);
        let in_flight = &t.in_flight;
        let claimed = self.claim(|w, bits| {
            let mut settled = bits & !self.recent[w].load(Ordering::Relaxed) & !in_flight[w];
            // Keep the lowest `left` bits.
            while settled.count_ones() as usize > left {
                settled &= !(1u64 << (63 - settled.leading_zeros()));
            }
            left -= settled.count_ones() as usize;
            settled
        });
        for &c in &claimed {
            t.in_flight[c / 64] |= 1 << (c % 64);
        }
        drop(t);
        if left > 0 {
            for w in &self.recent {
                if w.load(Ordering::Relaxed) != 0 {
                    w.store(0, Ordering::Relaxed);
                }
            }
        }
        claimed
    }

    /// Stores the hashes of chunks this hasher claimed in flight, except
    /// those `root` took over meanwhile. A result not stored may hold newer
    /// blocks than `root` read, so its blocks and chunk are marked stale
    /// again: some later hash (or `root`) covers them. Returns how many
    /// were stored.
    fn store_in_flight(&self, hashed: Vec<Hashed>) -> usize {
        let mut t = lock(&self.table);
        let mut stored = 0;
        for h in hashed {
            let (w, bit) = (h.chunk / 64, 1u64 << (h.chunk % 64));
            t.in_flight[w] &= !bit;
            if t.taken_over[w] & bit == 0 {
                self.store(&mut t, &h);
                stored += 1;
            } else {
                t.taken_over[w] &= !bit;
                for &(b, _) in &h.fresh {
                    set_bits(&self.stale_blocks, b..b + 1, Ordering::Release);
                }
                self.stale[w].fetch_or(bit, Ordering::Release);
            }
        }
        stored
    }
}

/// Appends the chunk indices of the set bits of word `w`.
fn push_bits(out: &mut Vec<usize>, w: usize, mut bits: u64) {
    while bits != 0 {
        out.push(w * 64 + bits.trailing_zeros() as usize);
        bits &= bits - 1;
    }
}

/// How the background rehasher paces itself.
#[derive(Clone, Copy, Debug)]
pub struct Throttle {
    /// The settling window: a chunk is rehashed once no write marked it for
    /// this long.
    pub period: Duration,
    /// Most chunks rehashed per lock hold, so `root` waits little.
    pub batch: usize,
    /// Largest share of one core the rehasher uses (0 < duty <= 1).
    pub duty: f64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            period: Duration::from_millis(20),
            batch: 16,
            duty: 0.5,
        }
    }
}

/// The background rehasher: a low-priority thread that hashes settled
/// chunks off the receive path. Stops when dropped.
pub struct Rehasher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Rehasher {
    pub fn start(digest: Arc<ChunkDigest>, throttle: Throttle) -> CoreResult<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mig-rehash".into())
            .spawn(move || run_rehasher(&digest, throttle, &flag))
            .map_err(|e| CoreError::io("spawn rehash thread", e))?;
        Ok(Rehasher {
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the thread to stop without waiting for it: `root` does not
    /// need it gone (it takes over chunks in flight), and a thread of the
    /// lowest priority may wait long for a core on a busy host.
    pub fn signal_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Rehasher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_rehasher(d: &ChunkDigest, th: Throttle, stop: &AtomicBool) {
    // The lowest priority for this thread alone: with two cores the receive
    // threads always win the CPU; failure only means a normal priority.
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
    let duty = th.duty.clamp(0.01, 1.0);
    let batch = th.batch.max(1);
    while !stop.load(Ordering::SeqCst) {
        let t0 = Instant::now();
        let n = d.rehash_settled(batch);
        let busy = t0.elapsed();
        // Rest so that work / (work + rest) <= duty; a full window when idle.
        let rest = if n == 0 {
            th.period
        } else {
            busy.mul_f64((1.0 - duty) / duty)
        };
        std::thread::park_timeout(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ps() -> usize {
        crate::memory::host_page_size()
    }

    /// Memory of `pages` pages and a digest with 4-page chunks (small, so
    /// tests cross many chunk boundaries).
    fn setup(pages: usize) -> (Arc<GuestMemory>, ChunkDigest) {
        let mem = Arc::new(GuestMemory::new(pages * ps()).unwrap());
        let d = ChunkDigest::with_chunk(mem.clone(), 4 * ps()).unwrap();
        (mem, d)
    }

    fn frozen(mem: &GuestMemory) -> u128 {
        digest_frozen_with(mem, 2, 4 * ps()).unwrap()
    }

    fn write(mem: &GuestMemory, d: &ChunkDigest, page: usize, fill: u8) {
        mem.write_bytes(page * ps(), &vec![fill; ps()]).unwrap();
        d.mark_written(page, 1).unwrap();
    }

    /// A record's pages are hashed on the spot, in whole and partial
    /// chunks alike: the root then has nothing left to do for them, and
    /// still equals a full read.
    #[test]
    fn chunks_a_record_touches_are_hashed_on_the_spot() {
        let (mem, d) = setup(16); // chunks of 4 pages
        for p in 2..11 {
            write(&mem, &d, p, p as u8 + 1);
        }
        assert_eq!(d.stale_chunks(), 3);
        // Pages 2..11 cover chunk 1 (4..8) wholly; chunks 0 and 2 in part.
        assert_eq!(d.rehash_covered(2..11), 3);
        assert_eq!(d.stale_chunks(), 0);
        let (root, rehashed) = d.root_timed();
        assert_eq!(
            (root, rehashed.chunks, rehashed.bytes),
            (frozen(&mem), 0, 0)
        );
        // A chunk another hasher holds is left stale for it (or root).
        write(&mem, &d, 12, 1);
        assert_eq!(d.rehash_settled(1), 0); // opens the window
        assert_eq!(d.claim_settled(1), vec![3]);
        write(&mem, &d, 13, 2);
        assert_eq!(d.rehash_covered([13]), 0);
        assert_eq!(d.root(), frozen(&mem));
    }

    /// The switchover's rehash reads only the blocks written since their
    /// last hash: one page written into a hashed chunk of data costs one
    /// block read, not a chunk.
    #[test]
    fn a_one_page_write_rehashes_one_block() {
        let mem = Arc::new(GuestMemory::new(CHUNK_BYTES * 4).unwrap());
        let d = ChunkDigest::new(mem.clone()).unwrap();
        let pages = mem.num_pages();
        for p in 0..pages {
            write(&mem, &d, p, p as u8 | 1);
        }
        let (_, first) = d.root_timed();
        assert_eq!((first.chunks, first.bytes), (4, mem.len()));
        write(&mem, &d, pages / 2 + 3, 0x5A);
        let (root, one) = d.root_timed();
        assert_eq!((one.chunks, one.bytes), (1, ps()));
        assert_eq!(root, digest_frozen(&mem, 1));
        // Scattered pages: bytes read grow with the pages, not the chunks.
        for p in [1, pages / 4 + 2, pages - 1] {
            write(&mem, &d, p, 0xC3);
        }
        let (root, three) = d.root_timed();
        assert_eq!((three.chunks, three.bytes), (3, 3 * ps()));
        assert_eq!(root, digest_frozen(&mem, 1));
    }

    #[test]
    fn fresh_memory_roots_agree_without_reading() {
        let (mem, d) = setup(37); // a partial last chunk
        assert_eq!(d.stale_chunks(), 0);
        assert_eq!(d.root(), frozen(&mem));
        assert!(
            mem.is_hole(0, mem.len()),
            "hashing holes must not allocate them"
        );
    }

    #[test]
    fn the_default_chunking_agrees_between_both_sides() {
        let mem = Arc::new(GuestMemory::new(CHUNK_BYTES * 3 + ps()).unwrap());
        let d = ChunkDigest::new(mem.clone()).unwrap();
        mem.write_bytes(CHUNK_BYTES + 5, b"x").unwrap();
        d.mark_written(CHUNK_BYTES / ps(), 1).unwrap();
        assert_eq!(d.root(), digest_frozen(&mem, 1));
        assert_eq!(digest_frozen(&mem, 1), digest_frozen(&mem, 3));
        assert_eq!(d.chunk_bytes(), CHUNK_BYTES);
    }

    #[test]
    fn memory_with_data_at_creation_is_hashed_at_the_first_root() {
        let mem = Arc::new(GuestMemory::new(64 * ps()).unwrap());
        mem.write_bytes(9 * ps(), &[3; 100]).unwrap();
        let d = ChunkDigest::with_chunk(mem.clone(), 4 * ps()).unwrap();
        assert_eq!(d.stale_chunks(), 1);
        assert_eq!(d.root(), frozen(&mem));
        assert_eq!(d.stale_chunks(), 0);
    }

    #[test]
    fn moved_data_changes_the_root() {
        let (mem, d) = setup(16);
        write(&mem, &d, 1, 7);
        let before = d.root();
        mem.zero_bytes(ps(), ps()).unwrap();
        d.mark_written(1, 1).unwrap();
        write(&mem, &d, 5, 7); // the same chunk content, one chunk further
        assert_ne!(d.root(), before);
        assert_eq!(d.root(), frozen(&mem));
    }

    #[test]
    fn a_missed_mark_is_caught_by_the_frozen_digest() {
        let (mem, d) = setup(16);
        write(&mem, &d, 2, 1);
        assert_eq!(d.root(), frozen(&mem));
        mem.write_bytes(2 * ps() + 17, &[9]).unwrap(); // written, never marked
        assert_ne!(d.root(), frozen(&mem));
        // And a write into a hole the digest never heard of.
        let (mem, d) = setup(16);
        mem.write_bytes(11 * ps(), &[9]).unwrap();
        assert_ne!(d.root(), frozen(&mem));
    }

    #[test]
    fn bad_ranges_are_refused_and_change_nothing() {
        let (mem, d) = setup(16);
        let root = d.root();
        for (first, count) in [(16, 1), (15, 2), (usize::MAX, 2), (0, usize::MAX)] {
            let e = d.mark_written(first, count).unwrap_err().to_string();
            assert!(e.contains("outside guest memory of 16 pages"), "{e}");
        }
        d.mark_written(16, 0).unwrap();
        assert_eq!((d.stale_chunks(), d.root()), (0, root));
        assert!(!d.may_hold_data(16) && !d.may_hold_data(usize::MAX));
        assert!(ChunkDigest::with_chunk(mem.clone(), 3 * ps()).is_err());
        assert!(digest_frozen_with(&mem, 1, 4 << 20).is_err());
    }

    #[test]
    fn the_rehasher_hashes_settled_chunks_and_root_does_the_rest() {
        let (mem, d) = setup(64);
        let d = Arc::new(d);
        for p in 0..64 {
            write(&mem, &d, p, p as u8 + 1);
        }
        assert_eq!(d.stale_chunks(), 16);
        assert_eq!(d.rehash_settled(100), 0, "all were just written");
        assert_eq!(d.rehash_settled(5), 5, "settled after one window");
        write(&mem, &d, 63, 0xEE); // the last chunk settles again
        assert_eq!(d.rehash_settled(100), 10);
        let mut r = Rehasher::start(d.clone(), Throttle::default()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.stale_chunks() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        r.stop();
        assert_eq!(d.stale_chunks(), 0);
        let (root, work) = d.root_timed();
        assert_eq!((root, work.chunks), (frozen(&mem), 0));
    }

    /// `root` runs while the rehasher hashes old bytes of a chunk that is
    /// written again meanwhile: root takes the chunk over, and the
    /// rehasher's late result for the old bytes is dropped.
    #[test]
    fn root_takes_over_chunks_in_flight_and_late_results_are_dropped() {
        let (mem, d) = setup(16);
        write(&mem, &d, 5, 1);
        assert_eq!(d.rehash_settled(1), 0); // opens the window: the chunk settles
        let claimed = d.claim_settled(10);
        assert_eq!(claimed, vec![1]);
        let old: Vec<Hashed> = claimed.iter().map(|&c| d.hash_chunk(c, false)).collect();
        assert_eq!(d.root_timed().1.chunks, 1, "the chunk in flight");
        assert_eq!(d.root(), frozen(&mem));
        write(&mem, &d, 5, 2);
        let root = d.root();
        assert_eq!(d.store_in_flight(old), 0);
        assert_eq!(d.root(), root);
        assert_eq!(root, frozen(&mem));
    }

    #[test]
    fn roots_taken_while_the_rehasher_runs_are_right() {
        let (mem, d) = setup(256);
        let d = Arc::new(d);
        let _r = Rehasher::start(
            d.clone(),
            Throttle {
                period: Duration::from_micros(100),
                batch: 8,
                duty: 1.0,
            },
        )
        .unwrap();
        for round in 0..50usize {
            for k in 0..20 {
                write(&mem, &d, (round * 31 + k * 13) % 256, (round + k) as u8);
            }
            std::thread::sleep(Duration::from_micros(300));
            assert_eq!(d.root(), frozen(&mem), "round {round}");
        }
    }

    #[test]
    fn writers_on_several_threads_racing_the_rehasher_end_equal() {
        let (mem, d) = setup(256);
        let d = Arc::new(d);
        let r = Rehasher::start(
            d.clone(),
            Throttle {
                period: Duration::from_micros(200),
                batch: 4,
                duty: 1.0,
            },
        )
        .unwrap();
        std::thread::scope(|s| {
            for t in 0..2u8 {
                let (mem, d) = (&mem, &d);
                s.spawn(move || {
                    for round in 0..200usize {
                        let p = (round * 37 + t as usize * 101) % 256;
                        write(mem, d, p, round as u8 ^ t);
                    }
                });
            }
        });
        drop(r);
        assert_eq!(d.root(), frozen(&mem));
    }

    proptest! {
        /// Equal memory gives equal roots, whatever the order of the writes,
        /// how often a chunk was rehashed in between, and which extra
        /// chunks were marked.
        #[test]
        fn roots_depend_only_on_the_bytes(
            writes in proptest::collection::vec((0usize..40, any::<u8>()), 0..60),
            extra in proptest::collection::vec(0usize..40, 0..10),
            seed in any::<u64>(),
        ) {
            let (a_mem, a) = setup(40);
            for &(p, v) in &writes {
                write(&a_mem, &a, p, v);
                if v % 3 == 0 {
                    a.rehash_settled(2);
                    a.rehash_settled(2);
                }
            }
            // The same final bytes, written once each in another order.
            let mut last = std::collections::BTreeMap::new();
            for &(p, v) in &writes {
                last.insert(p, v);
            }
            let mut order: Vec<(usize, u8)> = last.into_iter().collect();
            let n = order.len().max(1);
            order.rotate_left(seed as usize % n);
            if seed % 2 == 1 {
                order.reverse();
            }
            let (b_mem, b) = setup(40);
            for &(p, v) in &order {
                write(&b_mem, &b, p, v);
            }
            for &p in &extra {
                b.mark_written(p, 1).unwrap();
            }
            prop_assert_eq!(a.root(), b.root());
            prop_assert_eq!(a.root(), frozen(&a_mem));
            prop_assert_eq!(frozen(&a_mem), digest_frozen_with(&b_mem, 1, 4 * ps()).unwrap());
        }

        /// After arbitrary partial writes, each chunk's hash built from its
        /// block hashes equals the one computed from its bytes alone
        /// (`chunk_term`, as post-copy and the source compute it), whichever
        /// path rehashed which blocks in between.
        #[test]
        fn chunk_hashes_over_blocks_equal_those_from_memory(
            writes in proptest::collection::vec(
                (0usize..40 * 4096, 1usize..9000, any::<u8>(), 0u8..4), 1..40),
        ) {
            let (mem, d) = setup(40);
            let len = mem.len();
            for &(at, n, v, then) in &writes {
                let at = at % len;
                let n = n.min(len - at);
                mem.write_bytes(at, &vec![v; n]).unwrap();
                let (first, last) = (at / ps(), (at + n - 1) / ps());
                d.mark_written(first, last - first + 1).unwrap();
                match then {
                    0 => { d.rehash_covered(first..=last); }
                    1 => { d.rehash_settled(3); }
                    2 => { d.root(); }
                    _ => {}
                }
            }
            let root = d.root();
            let t = lock(&d.table);
            for c in 0..d.chunks() {
                let r = d.geo.pages_of(c);
                let mut bytes = vec![0u8; r.len() * ps()];
                mem.read_bytes(r.start * ps(), &mut bytes).unwrap();
                prop_assert_eq!(t.hashes[c], chunk_term(c, &bytes), "chunk {}", c);
            }
            drop(t);
            prop_assert_eq!(root, frozen(&mem));
        }

        /// Memories that differ in one byte give different roots.
        #[test]
        fn one_changed_byte_changes_the_root(page in 0usize..40, at in 0usize..4096, v in 1u8..) {
            let (mem, d) = setup(40);
            let before = d.root();
            let at = at % ps();
            mem.write_bytes(page * ps() + at, &[v]).unwrap();
            d.mark_written(page, 1).unwrap();
            prop_assert_ne!(d.root(), before);
            prop_assert_eq!(d.root(), frozen(&mem));
        }
    }
}
