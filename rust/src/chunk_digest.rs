//! An order-independent digest of guest memory, kept current while pages
//! land so that the switchover only rehashes what changed.
//!
//! Memory is cut into chunks of [`CHUNK_BYTES`]. A chunk's hash is the
//! xxh3-128 of its bytes, keyed with its index (so the same bytes at another
//! place hash differently). The root is the wrapping sum of the keyed chunk
//! hashes, finalised with the memory's geometry.
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
//! lock), a [`Rehasher`] thread rehashes chunks that have settled, and
//! [`ChunkDigest::root`] rehashes only the chunks still stale. The source
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
/// table and one short keyed hash, which stays negligible at this size,
/// while the switchover's rehash pays a whole chunk for every stale one, so
/// smaller chunks make [`ChunkDigest::root`] after a scattered final pass
/// proportionally cheaper (benches/bench_chunk_digest.py measures both).
pub const CHUNK_BYTES: usize = 64 << 10;

/// Largest chunk accepted: the zero source below covers one chunk.
const MAX_CHUNK_BYTES: usize = 2 << 20;
static ZEROS: [u8; MAX_CHUNK_BYTES] = [0; MAX_CHUNK_BYTES];

/// Chunks claimed by a digest thread at a time (one atomic per claim).
const BATCH: usize = 64;

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
    keyed(index, xxhash_rust::xxh3::xxh3_128(bytes))
}

/// The term of chunk `index` whose unkeyed hash is `content` (that of
/// [`chunk_term`]'s bytes): lets a caller hash a common content, such as a
/// chunk of zeros, once for many chunks.
pub fn chunk_term_of_hash(index: usize, content: u128) -> u128 {
    keyed(index, content)
}

/// The unkeyed hash of a chunk's bytes, for [`chunk_term_of_hash`].
pub fn content_hash(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// The root of a memory of `mem_len` bytes whose chunk terms sum to `sum`.
pub fn root_of_sum(sum: u128, mem_len: usize, chunk_bytes: usize) -> u128 {
    finalize(sum, mem_len, chunk_bytes)
}

/// Sets bits `range` of a bitmap, a word at a time.
fn set_bits(words: &[AtomicU64], range: Range<usize>, order: Ordering) {
    let mut i = range.start;
    while i < range.end {
        let (w, b) = (i / 64, i % 64);
        let n = (64 - b).min(range.end - i);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << b
        };
        words[w].fetch_or(mask, order);
        i += n;
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

/// How memory is cut into chunks.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    page_size: usize,
    pages: usize,
    /// log2 of pages per chunk.
    shift: u32,
    chunks: usize,
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
        let shift = (chunk_bytes / ps).trailing_zeros();
        let pages = mem.num_pages();
        Ok(Geometry {
            page_size: ps,
            pages,
            shift,
            chunks: pages.div_ceil(1 << shift),
        })
    }

    fn chunk_bytes(&self) -> usize {
        self.page_size << self.shift
    }

    fn pages_of(&self, chunk: usize) -> Range<usize> {
        let first = chunk << self.shift;
        first..(first + (1 << self.shift)).min(self.pages)
    }

    /// The xxh3-128 of a chunk's bytes: runs of pages that may hold data are
    /// read from the mapping, the rest hashed as zeros without touching it.
    fn content(&self, mem: &GuestMemory, data: &[AtomicU64], chunk: usize) -> u128 {
        let ps = self.page_size;
        let pages = self.pages_of(chunk);
        let mut h = Xxh3::new();
        let mut p = pages.start;
        while p < pages.end {
            let is_data = get_bit(data, p);
            let start = p;
            p += 1;
            while p < pages.end && get_bit(data, p) == is_data {
                p += 1;
            }
            let len = (p - start) * ps;
            if is_data {
                // SAFETY: the range lies inside the mapping (pages of a
                // chunk of this memory). A writer racing with the hash only
                // makes the hash a mixture of old and new bytes; the
                // destination re-marks such a chunk and it is rehashed.
                h.update(unsafe { mem.racy_slice(start * ps, len) }.expect("chunk is in range"));
            } else if len <= ZEROS.len() {
                h.update(&ZEROS[..len]);
            } else {
                // Pages larger than the zero source (only with huge pages).
                for part in (0..len).step_by(ZEROS.len()) {
                    h.update(&ZEROS[..(len - part).min(ZEROS.len())]);
                }
            }
        }
        h.digest128()
    }

    /// The keyed hash a chunk of holes has, without reading it.
    fn zero_keyed(&self, chunk: usize, zero_full: u128, zero_tail: u128) -> u128 {
        let full = self.pages_of(chunk).len() == 1 << self.shift;
        keyed(chunk, if full { zero_full } else { zero_tail })
    }
}

/// Hashes `chunks` with up to `threads` threads taking batches from a shared
/// cursor (holes hash far faster than data, so static splits would idle),
/// and returns the keyed hashes in the order of `chunks`.
fn hash_chunks(
    geo: &Geometry,
    mem: &GuestMemory,
    data: &[AtomicU64],
    chunks: &[usize],
    threads: usize,
) -> Vec<u128> {
    let one = |c: usize| keyed(c, geo.content(mem, data, c));
    let threads = threads.clamp(1, chunks.len().div_ceil(BATCH).max(1));
    if threads == 1 {
        return chunks.iter().map(|&c| one(c)).collect();
    }
    let out: Vec<AtomicU128> = chunks.iter().map(|_| AtomicU128::default()).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let at = next.fetch_add(BATCH, Ordering::Relaxed);
                if at >= chunks.len() {
                    break;
                }
                for i in at..(at + BATCH).min(chunks.len()) {
                    out[i].store(one(chunks[i]));
                }
            });
        }
    });
    out.into_iter().map(|a| a.load()).collect()
}

/// A 128-bit slot written by one thread and read after the scope joins.
#[derive(Default)]
struct AtomicU128([AtomicU64; 2]);

impl AtomicU128 {
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
    let sum = hash_chunks(&geo, mem, &data, &all, threads)
        .into_iter()
        .fold(0u128, u128::wrapping_add);
    Ok(finalize(sum, mem.len(), geo.chunk_bytes()))
}

/// Chunk hashes and their sum, changed together.
struct Table {
    hashes: Vec<u128>,
    sum: u128,
    /// Chunks the rehasher claimed and is hashing without the lock. `root`
    /// takes them over (hashes them itself); the rehasher then drops its
    /// result. Only changed under the lock.
    in_flight: Vec<u64>,
}

impl Table {
    fn replace(&mut self, chunk: usize, hash: u128) {
        self.sum = self.sum.wrapping_sub(self.hashes[chunk]).wrapping_add(hash);
        self.hashes[chunk] = hash;
    }
}

/// The destination's running digest: see the module documentation.
///
/// Invariant: a chunk whose `stale` bit is clear and that is not in flight
/// has its current bytes' hash in the table, provided every write was
/// followed by `mark_written`. A chunk is claimed (its stale bit cleared)
/// under the table lock before it is read, so a write marked during the
/// hash sets the bit again.
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
    pub seconds: f64,
}

impl ChunkDigest {
    /// A digest of `mem` as it is now. Chunks that are all holes get their
    /// hash without a read; the others start stale (hashed by the rehasher
    /// or at the first `root`).
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
        let zeros = |pages: usize| xxhash_rust::xxh3::xxh3_128(&ZEROS[..pages * geo.page_size]);
        let full = 1usize << geo.shift;
        let (zero_full, zero_tail) = (zeros(full), zeros(geo.pages - (geo.chunks - 1) * full));
        let mut sum = 0u128;
        let mut hashes = Vec::with_capacity(geo.chunks);
        for c in 0..geo.chunks {
            let h = geo.zero_keyed(c, zero_full, zero_tail);
            sum = sum.wrapping_add(h);
            hashes.push(h);
            if geo.pages_of(c).any(|p| get_bit(&data, p)) {
                set_bits(&stale, c..c + 1, Ordering::Relaxed);
            }
        }
        Ok(ChunkDigest {
            recent: bits(geo.chunks),
            mem,
            geo,
            data,
            stale,
            table: Mutex::new(Table {
                hashes,
                sum,
                in_flight: vec![0; geo.chunks.div_ceil(64)],
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
    /// after the write: a chunk being hashed at the same time is hashed again
    /// later. Lock-free; any number of threads may call it.
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
        let chunks = first >> self.geo.shift..((end - 1) >> self.geo.shift) + 1;
        set_bits(&self.recent, chunks.clone(), Ordering::Relaxed);
        // Release: whoever claims the chunk by clearing this bit sees the
        // bytes written before it (and the data bits set above).
        set_bits(&self.stale, chunks, Ordering::Release);
        Ok(())
    }

    /// Rehashes now, on the calling thread, the stale chunks whose every
    /// page is in `pages` (distinct pages one record just stored, its bytes
    /// still in this thread's cache). On a busy two-core host the
    /// low-priority rehasher can starve for a whole transfer and leave all
    /// of memory to `root` inside the downtime; a record's pages are mostly
    /// whole chunks, so the receive path keeps the digest current at the
    /// cost of one cached read. Chunks only partly in `pages` stay stale for
    /// the rehasher or `root`. Returns how many chunks were stored.
    pub fn rehash_covered(&self, pages: impl IntoIterator<Item = usize>) -> usize {
        let mut chunks: Vec<usize> = pages
            .into_iter()
            .filter(|&p| p < self.geo.pages)
            .map(|p| p >> self.geo.shift)
            .collect();
        chunks.sort_unstable();
        let mut whole = Vec::new();
        let mut i = 0;
        while i < chunks.len() {
            let c = chunks[i];
            let n = chunks[i..].iter().take_while(|&&x| x == c).count();
            if n == self.geo.pages_of(c).len() {
                whole.push(c);
            }
            i += n;
        }
        if whole.is_empty() {
            return 0;
        }
        let claimed = {
            let mut t = lock(&self.table);
            let mut claimed = Vec::with_capacity(whole.len());
            for &c in &whole {
                let (w, bit) = (c / 64, 1u64 << (c % 64));
                // Acquire pairs with mark_written's release.
                if self.stale[w].fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                    t.in_flight[w] |= bit;
                    claimed.push(c);
                }
            }
            claimed
        };
        let hashes = hash_chunks(&self.geo, &self.mem, &self.data, &claimed, 1);
        self.store_in_flight(&claimed, hashes)
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

    /// The root of memory as it is now: rehashes only the stale chunks.
    /// Writers should have stopped (a write marked during the call leaves
    /// its chunk stale for the next one).
    pub fn root(&self) -> u128 {
        self.root_timed().0
    }

    /// [`ChunkDigest::root`] and what its rehash took.
    pub fn root_timed(&self) -> (u128, Rehashed) {
        let t0 = Instant::now();
        let mut t = lock(&self.table);
        let mut chunks = self.claim(|_, bits| bits);
        // Chunks the rehasher is hashing right now: take them over.
        for (w, word) in t.in_flight.iter_mut().enumerate() {
            push_bits(&mut chunks, w, std::mem::take(word));
        }
        let hashes = hash_chunks(&self.geo, &self.mem, &self.data, &chunks, self.threads);
        for (&c, h) in chunks.iter().zip(hashes) {
            t.replace(c, h);
        }
        let rehashed = Rehashed {
            chunks: chunks.len(),
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
        let hashes = hash_chunks(&self.geo, &self.mem, &self.data, &claimed, 1);
        self.store_in_flight(&claimed, hashes)
    }

    /// Claims up to `limit` settled chunks and marks them in flight; opens
    /// the next settling window once every settled chunk is claimed.
    fn claim_settled(&self, limit: usize) -> Vec<usize> {
        let mut left = limit;
        let mut t = lock(&self.table);
        let claimed = self.claim(|w, bits| {
            let mut settled = bits & !self.recent[w].load(Ordering::Relaxed);
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

    /// Stores the hashes of chunks claimed in flight, except those another
    /// hasher finished first (`root` taking them over, or the receive path
    /// and the rehasher hashing one chunk at once). A hash not stored may be
    /// the newer one, so its chunk is marked stale again: some later hash
    /// (or `root`) covers it. Returns how many were stored.
    fn store_in_flight(&self, claimed: &[usize], hashes: Vec<u128>) -> usize {
        let mut t = lock(&self.table);
        let mut stored = 0;
        for (&c, h) in claimed.iter().zip(hashes) {
            let (w, bit) = (c / 64, 1u64 << (c % 64));
            if t.in_flight[w] & bit != 0 {
                t.in_flight[w] &= !bit;
                t.replace(c, h);
                stored += 1;
            } else {
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

    /// A record that wholly covers chunks leaves them hashed: the root then
    /// has nothing left to do for them, and still equals a full read.
    #[test]
    fn chunks_a_record_covers_are_hashed_on_the_spot() {
        let (mem, d) = setup(16); // chunks of 4 pages
        for p in 2..11 {
            write(&mem, &d, p, p as u8 + 1);
        }
        assert_eq!(d.stale_chunks(), 3);
        // Pages 2..11 cover chunk 1 (4..8) wholly; chunks 0 and 2 in part.
        assert_eq!(d.rehash_covered(2..11), 1);
        assert_eq!(d.stale_chunks(), 2);
        let (root, rehashed) = d.root_timed();
        assert_eq!((root, rehashed.chunks), (frozen(&mem), 2));
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
        let old = hash_chunks(&d.geo, &mem, &d.data, &claimed, 1);
        assert_eq!(d.root_timed().1.chunks, 1, "the chunk in flight");
        assert_eq!(d.root(), frozen(&mem));
        write(&mem, &d, 5, 2);
        let root = d.root();
        assert_eq!(d.store_in_flight(&claimed, old), 0);
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
