//! The destination's side of post-copy: registers the memory, forwards the
//! guest's page requests to the source, places the chunks that arrive and
//! keeps the digest of what it placed.
//!
//! On the freshly accepted channels the source first names the chunks it
//! still owes (`DISCARD`). Those chunks' terms are taken out of the
//! receiver's digest sum (the rest is what the destination holds current),
//! the memory is registered in MISSING mode and the owed chunks discarded.
//! From then on:
//!
//! * the request thread takes the pages the fault thread reports and sends
//!   one `REQUEST` each on the urgent channel; a page missing from a chunk
//!   that is not owed is a hole of held memory (zeros on both sides), and
//!   is placed here as a zero page without asking;
//! * one reader thread per channel places each `CHUNK` (atomic per page:
//!   `UFFDIO_COPY` page by page, or with the `continue` placement the chunk
//!   written into the memfd's page cache and mapped with one
//!   `UFFDIO_CONTINUE`), then adds the chunk's digest term,
//!   hashed from the very bytes it placed, before any guest access to the
//!   chunk can have changed them; a `ZERO` run of chunks goes in with one
//!   `UFFDIO_ZEROPAGE` per run, its terms from the zero chunk's hash; a
//!   `PAGE` (one requested page of a chunk still owed) is placed alone, and
//!   its chunk's term comes with the chunk;
//! * once every owed chunk is in place the root is final, `PLACED` tells
//!   the source, and the region is unregistered.
//!
//! A broken channel pauses the phase (`postcopy-paused`): the guest keeps
//! running, blocked only on pages still missing. `recover` accepts new
//! channels, sends `MISSING` (chunks in flight when the link broke may be
//! lost) and the pages still waited for again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::frames::{self, ReadOutcome, Tag, PUSH, URGENT};
use super::page_set::PageSet;
use super::phase_state::PhaseState;
use super::region::PostcopyRegion;
use crate::chunk_digest::{chunk_term, chunk_term_of_hash, content_hash, root_of_sum};
use crate::error::{CoreError, CoreResult};
use crate::memory::GuestMemory;
use crate::transport::Conn;

const POLL: Duration = Duration::from_millis(50);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IncomingState {
    Active,
    /// A channel broke: the reason. Pages still missing stay missing.
    Paused(String),
    /// Every owed chunk is placed; the root of memory as it was resumed.
    Complete(u128),
}

#[derive(Clone, Debug, Default)]
pub struct IncomingStats {
    pub owed_chunks: u64,
    pub placed_chunks: u64,
    pub duplicate_chunks: u64,
    /// Pages of held memory that were holes, placed as zeros here.
    pub hole_pages: u64,
    pub bytes: u64,
    pub recoveries: u64,
}

/// What the destination learnt from `DISCARD`.
pub struct Handover {
    pub chunk_pages: usize,
    /// The owed chunks, in order.
    pub owed: Vec<usize>,
}

struct Shared {
    region: Arc<PostcopyRegion>,
    page_size: usize,
    num_pages: usize,
    mem_len: usize,
    chunk_pages: usize,
    chunks: usize,
    /// The unkeyed hash of a whole chunk of zeros.
    zero_hash: u128,
    owed: PageSet,
    placed: PageSet,
    /// The digest terms so far and how many owed chunks they cover.
    sum: Mutex<(u128, usize)>,
    /// The urgent channel's sending half (requests, `PLACED`, `MISSING`).
    writer: Mutex<Option<Conn>>,
    stop: AtomicBool,
    /// Every owed chunk is in: what fails from now on (the region closing
    /// under the request thread, the source closing the channels) is the end.
    finishing: AtomicBool,
    state: PhaseState<IncomingState>,
    duplicates: AtomicU64,
    holes: AtomicU64,
    bytes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn set_state(&self, s: IncomingState) {
        self.state.set(s);
    }

    fn complete(&self) -> bool {
        self.state.is_final()
    }

    fn broken(&self, e: CoreError) {
        if !self.stop.swap(true, Ordering::SeqCst) && !self.finishing.load(Ordering::SeqCst) {
            self.set_state(IncomingState::Paused(e.to_string()));
        }
    }

    fn send(&self, tag: Tag, arg: u64, payload: &[u8]) -> CoreResult<()> {
        let mut w = lock(&self.writer);
        let conn = w
            .as_mut()
            .ok_or_else(|| CoreError::invalid("post-copy: no channel to the source"))?;
        frames::write_frame(conn, tag, arg, payload)
    }

    /// The chunk index `arg` names, checked against the memory.
    fn chunk_of(&self, arg: u64) -> CoreResult<usize> {
        usize::try_from(arg)
            .ok()
            .filter(|&c| c < self.chunks)
            .ok_or_else(|| CoreError::invalid(format!("post-copy: chunk {arg} beyond memory")))
    }

    /// Pages of chunk `c`: its first and how many (the last may be short).
    fn pages_of(&self, c: usize) -> (usize, usize) {
        let first = c * self.chunk_pages;
        (first, self.chunk_pages.min(self.num_pages - first))
    }

    /// Claims owed chunk `c` for placement: false if it is already placed.
    fn claim(&self, c: usize) -> CoreResult<bool> {
        if !self.owed.contains(c) {
            return Err(CoreError::invalid(format!(
                "post-copy: chunk {c} was not owed"
            )));
        }
        if !self.placed.insert(c) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        Ok(true)
    }

    /// Places chunk `c` from `payload` and adds its digest term.
    fn place_chunk(&self, c: usize, payload: &[u8]) -> CoreResult<()> {
        let (first, pages) = self.pages_of(c);
        let len = pages * self.page_size;
        if payload.len() != len {
            return Err(CoreError::invalid(format!(
                "post-copy: chunk {c} of {} bytes, expected {len}",
                payload.len()
            )));
        }
        if !self.claim(c)? {
            return Ok(());
        }
        if let Err(e) = self.region.place_run(first as u64, payload) {
            self.placed.remove(c);
            return Err(e);
        }
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.add_terms(chunk_term(c, payload), 1)
    }

    /// Places one requested page of an owed chunk ahead of the chunk. No
    /// digest term: the chunk still comes whole, and its term is hashed from
    /// that frame's bytes, which are this page's too (the source's memory is
    /// frozen); its copy of this page finds the page present and leaves it.
    fn place_page(&self, page: u64, payload: &[u8]) -> CoreResult<()> {
        let p = usize::try_from(page)
            .ok()
            .filter(|&p| p < self.num_pages)
            .ok_or_else(|| CoreError::invalid(format!("post-copy: page {page} beyond memory")))?;
        if payload.len() != self.page_size {
            return Err(CoreError::invalid(format!(
                "post-copy: page {page} of {} bytes, expected {}",
                payload.len(),
                self.page_size
            )));
        }
        let c = p / self.chunk_pages;
        if !self.owed.contains(c) {
            return Err(CoreError::invalid(format!(
                "post-copy: page {page} of chunk {c}, which was not owed"
            )));
        }
        if !self.placed.contains(c) {
            self.region.place(page, payload)?;
            self.bytes
                .fetch_add(payload.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Places the `count` chunks of zeros from `c`: one `UFFDIO_ZEROPAGE`
    /// per run of chunks not placed yet, not one per page, and terms from
    /// the zero chunk's hash taken once.
    fn place_zero_chunks(&self, c: usize, count: usize) -> CoreResult<()> {
        let end = c
            .checked_add(count)
            .filter(|&e| e <= self.chunks && count > 0)
            .ok_or_else(|| {
                CoreError::invalid(format!("post-copy: zero chunks {c}+{count} beyond memory"))
            })?;
        let mut next = c;
        while next < end {
            // The run of chunks from `next` this call claims.
            let start = next;
            while next < end && self.claim(next)? {
                next += 1;
            }
            if next > start {
                let (first, _) = self.pages_of(start);
                let (last, n) = self.pages_of(next - 1);
                let pages = (last + n - first) as u64;
                if let Err(e) = self.region.place_zero_range(first as u64, pages) {
                    for k in start..next {
                        self.placed.remove(k);
                    }
                    return Err(e);
                }
                let sum = (start..next).fold(0u128, |acc, k| {
                    let term = if self.pages_of(k).1 == self.chunk_pages {
                        chunk_term_of_hash(k, self.zero_hash)
                    } else {
                        chunk_term(k, &vec![0u8; self.pages_of(k).1 * self.page_size])
                    };
                    acc.wrapping_add(term)
                });
                self.add_terms(sum, next - start)?;
            }
            if next < end {
                next += 1; // placed already
            }
        }
        Ok(())
    }

    /// Adds the digest terms of `n` chunks just placed.
    fn add_terms(&self, terms: u128, n: usize) -> CoreResult<()> {
        // The last term in completes the root; counted under the same lock
        // as the sum, so no chunk still being placed is left out of it.
        let done = {
            let mut s = lock(&self.sum);
            s.0 = s.0.wrapping_add(terms);
            s.1 += n;
            (s.1 == self.owed.count()).then_some(s.0)
        };
        if let Some(sum) = done {
            self.finish(sum)?;
        }
        Ok(())
    }

    fn finish(&self, sum: u128) -> CoreResult<()> {
        self.finishing.store(true, Ordering::SeqCst);
        let root = root_of_sum(sum, self.mem_len, self.chunk_pages * self.page_size);
        // Every page is here: nothing faults any more.
        let _ = self.region.close();
        // Complete before the source can hear of it (it then closes the
        // channels, which must not read as a break here), and told under
        // the writer's lock, so a `close` right after cannot cut the frame.
        let mut w = lock(&self.writer);
        self.set_state(IncomingState::Complete(root));
        let conn = w
            .as_mut()
            .ok_or_else(|| CoreError::invalid("post-copy: no channel to the source"))?;
        frames::write_frame(conn, Tag::Placed, self.placed.count() as u64, &[])
    }

    fn read_chunks(&self, mut conn: Conn) -> CoreResult<()> {
        let max = self.chunk_pages * self.page_size;
        while !self.stop.load(Ordering::SeqCst) && !self.complete() {
            if !conn
                .wait_readable(POLL)
                .map_err(|e| CoreError::io("post-copy: poll", e))?
            {
                continue;
            }
            let f = match frames::read_frame(&mut conn, max)? {
                ReadOutcome::Frame(f) => f,
                ReadOutcome::Idle => continue,
            };
            match f.tag {
                Tag::Chunk => self.place_chunk(self.chunk_of(f.arg)?, &f.payload)?,
                Tag::Page => self.place_page(f.arg, &f.payload)?,
                Tag::Zero => {
                    let count: [u8; 8] = f.payload[..].try_into().map_err(|_| {
                        CoreError::invalid("post-copy: ZERO frame without its count")
                    })?;
                    let count = usize::try_from(u64::from_le_bytes(count)).unwrap_or(usize::MAX);
                    self.place_zero_chunks(self.chunk_of(f.arg)?, count)?;
                }
                Tag::Done => {}
                t => {
                    return Err(CoreError::invalid(format!(
                        "post-copy: unexpected {t:?} frame from the source"
                    )))
                }
            }
        }
        Ok(())
    }

    fn forward_requests(&self) -> CoreResult<()> {
        while !self.stop.load(Ordering::SeqCst) && !self.complete() {
            let reqs = match self.region.next_requests(POLL) {
                Ok(r) => r,
                Err(_) if self.finishing.load(Ordering::SeqCst) => return Ok(()),
                Err(e) => return Err(e),
            };
            for r in reqs {
                let c = r.page as usize / self.chunk_pages;
                if !self.owed.contains(c) {
                    self.region.place_zero(r.page)?;
                    self.holes.fetch_add(1, Ordering::Relaxed);
                } else if !self.placed.contains(c) {
                    self.send(Tag::Request, r.page, &[])?;
                }
            }
        }
        Ok(())
    }

    /// The owed chunks not placed yet, as u64 words.
    fn missing_words(&self) -> Vec<u64> {
        let mut words = vec![0u64; self.chunks.div_ceil(64)];
        for c in 0..self.chunks {
            if self.owed.contains(c) && !self.placed.contains(c) {
                words[c / 64] |= 1 << (c % 64);
            }
        }
        words
    }
}

pub struct PostcopyIncoming {
    shared: Arc<Shared>,
    recoveries: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Reads the source's `DISCARD` frame from the urgent channel.
pub fn read_handover(
    conn: &mut Conn,
    chunks_of: impl Fn(usize) -> usize,
    timeout: Duration,
) -> CoreResult<Handover> {
    let deadline = Instant::now() + timeout;
    loop {
        if Instant::now() >= deadline {
            return Err(CoreError::invalid(
                "post-copy: the source did not name the pages it owes",
            ));
        }
        if !conn
            .wait_readable(POLL)
            .map_err(|e| CoreError::io("post-copy: poll", e))?
        {
            continue;
        }
        // At most one bit per page.
        let f = match frames::read_frame(conn, chunks_of(1).div_ceil(64) * 8)? {
            ReadOutcome::Frame(f) => f,
            ReadOutcome::Idle => continue,
        };
        if f.tag != Tag::Discard {
            return Err(CoreError::invalid(format!(
                "post-copy: expected DISCARD first, got {:?}",
                f.tag
            )));
        }
        let chunk_pages = usize::try_from(f.arg).unwrap_or(0);
        if chunk_pages == 0 {
            return Err(CoreError::invalid("post-copy: chunk of 0 pages"));
        }
        let chunks = chunks_of(chunk_pages);
        let words = frames::bitmap_words(&f.payload, chunks)?;
        let owed = (0..chunks)
            .filter(|c| words[c / 64] & (1 << (c % 64)) != 0)
            .collect();
        return Ok(Handover { chunk_pages, owed });
    }
}

impl PostcopyIncoming {
    /// Registers `mem` with `region`, discarding the owed chunks, and starts
    /// the threads on `conns`. `held_sum`: the digest terms of the chunks
    /// not owed, taken before anything was discarded.
    pub fn start(
        mem: Arc<GuestMemory>,
        region: Arc<PostcopyRegion>,
        handover: &Handover,
        held_sum: u128,
        conns: Vec<Conn>,
    ) -> CoreResult<Self> {
        let chunk_pages = handover.chunk_pages;
        let num_pages = mem.num_pages();
        let chunks = num_pages.div_ceil(chunk_pages);
        let owed = PageSet::new(chunks);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &c in &handover.owed {
            owed.insert(c);
            let first = (c * chunk_pages) as u64;
            let n = chunk_pages.min(num_pages - c * chunk_pages) as u64;
            match runs.last_mut() {
                Some((s, len)) if *s + *len == first => *len += n,
                _ => runs.push((first, n)),
            }
        }
        region.register(mem.clone(), &runs)?;
        let shared = Arc::new(Shared {
            region,
            page_size: mem.page_size(),
            num_pages,
            mem_len: mem.len(),
            chunk_pages,
            chunks,
            zero_hash: content_hash(&vec![0u8; chunk_pages * mem.page_size()]),
            owed,
            placed: PageSet::new(chunks),
            sum: Mutex::new((held_sum, 0)),
            writer: Mutex::new(None),
            stop: AtomicBool::new(false),
            finishing: AtomicBool::new(false),
            state: PhaseState::new(IncomingState::Active, |s| {
                matches!(s, IncomingState::Complete(_))
            }),
            duplicates: AtomicU64::new(0),
            holes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        let inc = PostcopyIncoming {
            shared,
            recoveries: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
        };
        if handover.owed.is_empty() {
            *lock(&inc.shared.writer) = conns.into_iter().next();
            inc.shared.finish(held_sum)?;
            return Ok(inc);
        }
        inc.spawn(conns)?;
        Ok(inc)
    }

    fn spawn(&self, mut conns: Vec<Conn>) -> CoreResult<()> {
        if conns.len() != frames::CHANNELS {
            return Err(CoreError::invalid("post-copy needs its two channels"));
        }
        let push = conns.remove(PUSH);
        let urgent = conns.remove(URGENT);
        *lock(&self.shared.writer) = Some(
            urgent
                .try_clone()
                .map_err(|e| CoreError::io("post-copy: clone channel", e))?,
        );
        let mut threads = lock(&self.threads);
        let jobs: [(&str, Option<Conn>); 3] = [
            ("mig-pc-urgent", Some(urgent)),
            ("mig-pc-push", Some(push)),
            ("mig-pc-requests", None),
        ];
        for (name, conn) in jobs {
            let s = self.shared.clone();
            let t = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let r = match conn {
                        Some(c) => s.read_chunks(c),
                        None => s.forward_requests(),
                    };
                    if let Err(e) = r {
                        s.broken(e);
                    }
                })
                .map_err(|e| CoreError::io("spawn post-copy thread", e))?;
            threads.push(t);
        }
        Ok(())
    }

    /// Goes on after a broken channel on newly accepted ones: tells the
    /// source what is still missing, asks again for what the guest waits on.
    pub fn recover(&self, conns: Vec<Conn>) -> CoreResult<()> {
        self.join();
        let s = &self.shared;
        if s.complete() {
            return Ok(());
        }
        s.stop.store(false, Ordering::SeqCst);
        s.state.set(IncomingState::Active);
        self.spawn(conns)?;
        s.send(Tag::Missing, 0, &frames::bitmap_bytes(&s.missing_words()))?;
        self.recoveries.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn wait(&self, timeout: Duration) -> IncomingState {
        self.shared
            .state
            .wait_while(&IncomingState::Active, timeout)
    }

    pub fn state(&self) -> IncomingState {
        self.shared.state.get()
    }

    /// Pages of owed chunks never placed, as `(first page, count)` runs.
    pub fn missing_pages(&self) -> Vec<(u64, u64)> {
        let s = &self.shared;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in 0..s.chunks {
            if s.owed.contains(c) && !s.placed.contains(c) {
                let first = (c * s.chunk_pages) as u64;
                let n = s.chunk_pages.min(s.num_pages - c * s.chunk_pages) as u64;
                match runs.last_mut() {
                    Some((f, len)) if *f + *len == first => *len += n,
                    _ => runs.push((first, n)),
                }
            }
        }
        runs
    }

    pub fn region(&self) -> &Arc<PostcopyRegion> {
        &self.shared.region
    }

    pub fn stats(&self) -> IncomingStats {
        let s = &self.shared;
        IncomingStats {
            owed_chunks: s.owed.count() as u64,
            placed_chunks: s.placed.count() as u64,
            duplicate_chunks: s.duplicates.load(Ordering::Relaxed),
            hole_pages: s.holes.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            recoveries: self.recoveries.load(Ordering::Relaxed),
        }
    }

    fn join(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(w) = lock(&self.shared.writer).take() {
            w.shutdown();
        }
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }

    /// Stops the threads. With pages still missing this also unregisters the
    /// memory: threads blocked on them then read zeros (the guest is lost).
    pub fn close(&self) {
        self.join();
        let _ = self.shared.region.close();
    }
}

impl Drop for PostcopyIncoming {
    fn drop(&mut self) {
        self.close();
    }
}
