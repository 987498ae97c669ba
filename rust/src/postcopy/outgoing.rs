//! The source's side of post-copy: serves the destination's page requests
//! first and pushes every other chunk it still owes in the background.
//!
//! The unit is the destination digest's chunk (`chunk_digest::CHUNK_BYTES`,
//! 16 pages of 4 KiB): the destination discards, receives, places and hashes
//! whole chunks, so its digest of what it placed sums exactly the terms the
//! source's digest of its frozen memory has for them.
//!
//! Two threads, one per channel. The request thread reads `REQUEST` frames
//! on the urgent channel and answers each with its chunk on the same channel
//! at once, unless the chunk already went out, followed by up to
//! `READ_AHEAD` owed chunks after it; it then moves the push cursor past
//! them, so the push follows the locality of the faults (QEMU moves its
//! scan position the same way). The push thread walks the
//! chunks still owed from that cursor, paced to `max_bandwidth`.
//!
//! One locality at a time (`one_stream`, off by default; `fault_streams`
//! decides which stream the push follows): while the push follows a live
//! fault stream, a request elsewhere is answered with its page alone
//! (`PAGE`, QEMU's unit) and leaves the cursor where it is; the chunk stays
//! owed and goes whole later. Two vCPUs each walking their own memory would
//! otherwise pull the push to and fro, both crawling at half the link until
//! the end; this way the one the push follows has all its memory after its
//! share of the bytes and runs freely from then on, while the other still
//! gets each page it waits for within a round trip, at a small part of the
//! link. A chunk leaves the owed set exactly once, claimed by whichever
//! thread takes it.
//! Every byte on either channel is charged to one pacer at `max_bandwidth`:
//! the cap models the link's capacity, and a link carries no more however
//! its bytes are split between channels. Requests go first: a requested
//! chunk waits only for the link's current turn (at most the one chunk
//! already charged), and the push takes no turn while a request waits
//! (QEMU's postcopy-preempt likewise keeps urgent pages out of the push's
//! queue). Read-ahead goes only while the link has room. Chunks of zeros
//! travel as `ZERO` runs (a first chunk and a count), never as data.
//!
//! The guest is stopped for the whole phase: its memory is frozen, and
//! reading it races with nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::fault_streams::{Answer, FaultStreams};
use super::frames::{self, ReadOutcome, Tag, PUSH, URGENT};
use super::page_set::PageSet;
use super::phase_state::PhaseState;
use crate::bitmap::DirtyBitmap;
use crate::error::{CoreError, CoreResult};
use crate::memory::GuestMemory;
use crate::transport::Conn;

/// How often a waiting thread checks whether it should stop.
const POLL: Duration = Duration::from_millis(50);

/// The link time a late turn may still use (a token bucket's depth: at
/// 100 MiB/s, 512 KiB).
const SLACK: Duration = Duration::from_millis(5);

/// How long the push stands back while a request waits for the link.
const YIELD: Duration = Duration::from_micros(100);

/// Owed chunks sent after a requested one on the urgent channel.
pub const READ_AHEAD: usize = 3;

/// Most chunks of zeros in one `ZERO` frame (64 MiB of 64 KiB chunks): the
/// run is claimed before it is sent, so a request meanwhile finds it gone
/// and waits for this frame; a bounded run keeps that wait short.
const MAX_ZERO_RUN: usize = 1024;

/// Where the phase stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutgoingState {
    /// Serving requests and pushing.
    Active,
    /// A channel broke: `reason`. Nothing is lost; `reconnect` goes on.
    Paused(String),
    /// The destination placed every chunk.
    Placed,
}

#[derive(Clone, Debug, Default)]
pub struct OutgoingStats {
    /// `postcopy-requests`: requests received.
    pub requests: u64,
    /// Chunks sent because they were requested.
    pub requested_chunks: u64,
    /// Requested pages sent alone (`PAGE`), their chunk still owed.
    pub requested_pages: u64,
    /// Chunks sent by the background push.
    pub pushed_chunks: u64,
    /// Chunks of zeros (sent without payload).
    pub zero_chunks: u64,
    /// Chunks owed at the hand-over, and still owed now.
    pub owed_chunks: u64,
    pub remaining_chunks: u64,
    pub bytes: u64,
    /// Reconnections after a broken channel.
    pub recoveries: u64,
}

/// Bytes per second, and when the bytes charged so far have had their time.
struct Pacer {
    rate: u64,
    next: Instant,
}

impl Pacer {
    fn new(rate: u64) -> Mutex<Pacer> {
        Mutex::new(Pacer {
            rate,
            next: Instant::now(),
        })
    }

    /// A new rate applies from now: time owed at the old one is forgiven
    /// (a push held at 1 byte/s would otherwise wait for hours).
    fn set_rate(pacer: &Mutex<Pacer>, rate: u64) {
        let mut p = lock(pacer);
        p.rate = rate;
        p.next = p.next.min(Instant::now());
    }
}

struct Shared {
    mem: Arc<GuestMemory>,
    chunk_pages: usize,
    chunks: usize,
    /// Chunks not yet sent.
    remaining: PageSet,
    /// Where the push goes on (a chunk index).
    cursor: AtomicUsize,
    /// The link (`max_bandwidth`): every chunk.
    pacer: Mutex<Pacer>,
    /// The push alone (`max_postcopy_bandwidth`, 0 = no further limit).
    push_pacer: Mutex<Pacer>,
    /// Requests waiting for the link's turn: the push stands back meanwhile.
    urgent_waiting: AtomicUsize,
    /// One locality at a time: requests away from a live stream get a page.
    one_stream: bool,
    stop: AtomicBool,
    state: PhaseState<OutgoingState>,
    requests: AtomicU64,
    requested: AtomicU64,
    requested_pages: AtomicU64,
    pushed: AtomicU64,
    zero: AtomicU64,
    bytes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn set_state(&self, s: OutgoingState) {
        self.state.set(s);
    }

    fn broken(&self, e: CoreError) {
        if !self.stop.load(Ordering::SeqCst) {
            self.set_state(OutgoingState::Paused(e.to_string()));
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether chunk `c` is all zeros; if not, its bytes are left in `buf`.
    fn is_zero_chunk(&self, c: usize, buf: &mut Vec<u8>) -> CoreResult<bool> {
        let ps = self.mem.page_size();
        let first = c * self.chunk_pages;
        let pages = self.chunk_pages.min(self.mem.num_pages() - first);
        buf.resize(pages * ps, 0);
        // A hole reads as zeros; reading it through a memfd mapping would
        // allocate it page by page.
        Ok(self.mem.is_hole(first * ps, (first + pages) * ps) || {
            self.mem.read_bytes(first * ps, buf)?;
            is_zero(buf)
        })
    }

    /// Sends chunk `c`, claimed by the caller, on `conn`: its bytes, or a
    /// `ZERO` run of one. Returns the bytes it put on the wire.
    fn send_chunk(&self, conn: &mut Conn, c: usize, buf: &mut Vec<u8>) -> CoreResult<usize> {
        if self.is_zero_chunk(c, buf)? {
            return self.send_zero_run(conn, c, 1);
        }
        self.send_frame(conn, Tag::Chunk, c as u64, buf, c..c + 1)
    }

    /// Sends the `count` chunks of zeros from `first`, claimed by the caller,
    /// as one `ZERO` frame: the destination maps them with one ioctl per run
    /// instead of placing them page by page.
    fn send_zero_run(&self, conn: &mut Conn, first: usize, count: usize) -> CoreResult<usize> {
        let payload = (count as u64).to_le_bytes();
        let wire = self.send_frame(
            conn,
            Tag::Zero,
            first as u64,
            &payload,
            first..first + count,
        )?;
        self.zero.fetch_add(count as u64, Ordering::Relaxed);
        Ok(wire)
    }

    /// Writes one frame carrying `chunks` and charges it to the link.
    fn send_frame(
        &self,
        conn: &mut Conn,
        tag: Tag,
        arg: u64,
        payload: &[u8],
        chunks: std::ops::Range<usize>,
    ) -> CoreResult<usize> {
        if let Err(e) = frames::write_frame(conn, tag, arg, payload) {
            // Not delivered as far as we know: owed again.
            for c in chunks {
                self.remaining.insert(c);
            }
            return Err(e);
        }
        let wire = payload.len() + frames::HEADER_LEN;
        self.bytes.fetch_add(wire as u64, Ordering::Relaxed);
        Self::charge(&self.pacer, wire);
        Ok(wire)
    }

    /// Charges `bytes` sent to `pacer`.
    fn charge(pacer: &Mutex<Pacer>, bytes: usize) {
        let mut p = lock(pacer);
        if p.rate == 0 {
            return;
        }
        let d = Duration::from_secs_f64(bytes as f64 / p.rate as f64);
        // A turn taken late (a sleep overshoots, a thread waits for a core)
        // keeps up to `SLACK` of the link's time it missed: the link was
        // idle for it. Without it every late wake-up is lost bandwidth.
        let now = Instant::now();
        let earliest = now.checked_sub(SLACK).unwrap_or(now);
        // A tiny rate (a push held back on purpose) must not overflow.
        p.next = p.next.max(earliest).checked_add(d).unwrap_or(p.next);
    }

    /// Whether the bytes charged so far to `pacer` have had their time.
    fn has_turn(pacer: &Mutex<Pacer>) -> bool {
        let p = lock(pacer);
        p.rate == 0 || Instant::now() >= p.next
    }

    /// Sleeps until the bytes charged so far to `pacer` have had their time.
    fn wait_turn(&self, pacer: &Mutex<Pacer>) {
        while !self.stop.load(Ordering::Relaxed) {
            let until = {
                let p = lock(pacer);
                if p.rate == 0 {
                    return;
                }
                p.next
            };
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep((until - now).min(POLL));
        }
    }

    /// Sends the chunks right after requested chunk `c` on the same channel
    /// while the link has room: a guest walking memory would fault on them
    /// next, one round trip per chunk. Returns the first chunk not sent.
    fn read_ahead(&self, conn: &mut Conn, c: usize, buf: &mut Vec<u8>) -> CoreResult<usize> {
        let mut next = c + 1;
        while next < self.chunks && next <= c + READ_AHEAD {
            let room = Self::has_turn(&self.pacer) && Self::has_turn(&self.push_pacer);
            if !room || !self.remaining.remove(next) {
                break;
            }
            let wire = self.send_chunk(conn, next, buf)?;
            Self::charge(&self.push_pacer, wire);
            self.pushed.fetch_add(1, Ordering::Relaxed);
            next += 1;
        }
        Ok(next)
    }

    /// Runs `send` on the link's next turn: the push stands back until it
    /// is done, so a request waits at most for the chunk already charged.
    fn on_urgent_turn<T>(&self, send: impl FnOnce() -> T) -> T {
        self.urgent_waiting.fetch_add(1, Ordering::SeqCst);
        self.wait_turn(&self.pacer);
        let out = send();
        self.urgent_waiting.fetch_sub(1, Ordering::SeqCst);
        out
    }

    /// Sends requested `page` of owed chunk `c` alone, the chunk still owed;
    /// a chunk of zeros goes whole instead, as a `ZERO` run of one.
    fn send_page(
        &self,
        conn: &mut Conn,
        page: usize,
        c: usize,
        buf: &mut Vec<u8>,
    ) -> CoreResult<()> {
        if !self.remaining.contains(c) {
            return Ok(()); // the push took the chunk meanwhile
        }
        if self.is_zero_chunk(c, buf)? {
            if self.remaining.remove(c) {
                self.send_zero_run(conn, c, 1)?;
                self.requested.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        let ps = self.mem.page_size();
        let at = (page - c * self.chunk_pages) * ps;
        // Not claimed: the chunk goes whole later (a frame carrying it
        // must not put it back in `remaining` if this send fails).
        frames::write_frame(conn, Tag::Page, page as u64, &buf[at..at + ps])?;
        let wire = ps + frames::HEADER_LEN;
        self.bytes.fetch_add(wire as u64, Ordering::Relaxed);
        Self::charge(&self.pacer, wire);
        self.requested_pages.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Answers requests on the urgent channel until the destination reports
    /// every chunk placed, the channel breaks or `stop`.
    fn serve_requests(&self, mut conn: Conn) -> CoreResult<()> {
        let mut buf = Vec::new();
        let mut streams = FaultStreams::new();
        while !self.stop.load(Ordering::SeqCst) {
            if !conn
                .wait_readable(POLL)
                .map_err(|e| CoreError::io("post-copy: poll", e))?
            {
                continue;
            }
            let f = match frames::read_frame(&mut conn, 0)? {
                ReadOutcome::Frame(f) => f,
                ReadOutcome::Idle => continue,
            };
            match f.tag {
                Tag::Request => {
                    self.requests.fetch_add(1, Ordering::Relaxed);
                    let c = (f.arg / self.chunk_pages as u64) as usize;
                    if c >= self.chunks || f.arg >= self.mem.num_pages() as u64 {
                        return Err(CoreError::invalid(format!(
                            "post-copy: request for page {} beyond memory",
                            f.arg
                        )));
                    }
                    let cursor = self.cursor.load(Ordering::Relaxed);
                    let now = Instant::now();
                    if self.one_stream && streams.answer(c, cursor, now) == Answer::PageAlone {
                        let page = f.arg as usize;
                        self.on_urgent_turn(|| self.send_page(&mut conn, page, c, &mut buf))?;
                        continue;
                    }
                    // The link's next turn is this request's: the push
                    // stands back until it is sent.
                    if self.remaining.contains(c) {
                        let sent = self.on_urgent_turn(|| {
                            if self.remaining.remove(c) {
                                self.send_chunk(&mut conn, c, &mut buf).map(Some)
                            } else {
                                Ok(None) // the push had claimed it before the request came
                            }
                        });
                        if sent?.is_some() {
                            self.requested.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let next = self.read_ahead(&mut conn, c, &mut buf)?;
                    self.cursor.store(next, Ordering::Relaxed);
                    if self.one_stream {
                        streams.took_cursor(c, next, now);
                    }
                }
                Tag::Placed => {
                    self.set_state(OutgoingState::Placed);
                    return Ok(());
                }
                t => {
                    return Err(CoreError::invalid(format!(
                        "post-copy: unexpected {t:?} frame from the destination"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Pushes every chunk still owed, from the cursor on, then `DONE`.
    fn push(&self, mut conn: Conn) -> CoreResult<()> {
        let mut buf = Vec::new();
        while !self.stop.load(Ordering::SeqCst) {
            // Paced before a chunk is claimed: a chunk waiting here for its
            // turn is still free for a request to take at once.
            self.wait_turn(&self.push_pacer);
            self.wait_turn(&self.pacer);
            if self.urgent_waiting.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(YIELD); // this turn is a request's
                continue;
            }
            let from = self.cursor.load(Ordering::Relaxed);
            let Some(c) = self.remaining.first_from(from) else {
                let sent =
                    self.requested.load(Ordering::Relaxed) + self.pushed.load(Ordering::Relaxed);
                return frames::write_frame(&mut conn, Tag::Done, sent, &[]);
            };
            if !self.remaining.remove(c) {
                continue; // the request thread took it
            }
            // A chunk of zeros takes the owed zero chunks after it along.
            let mut count = 1;
            let wire = if self.is_zero_chunk(c, &mut buf)? {
                while count < MAX_ZERO_RUN
                    && c + count < self.chunks
                    && self.remaining.contains(c + count)
                    && self.is_zero_chunk(c + count, &mut buf)?
                    && self.remaining.remove(c + count)
                {
                    count += 1;
                }
                self.send_zero_run(&mut conn, c, count)?
            } else {
                self.send_frame(&mut conn, Tag::Chunk, c as u64, &buf, c..c + 1)?
            };
            // Move on from here unless a request moved the cursor meanwhile.
            let _ =
                self.cursor
                    .compare_exchange(from, c + count, Ordering::Relaxed, Ordering::Relaxed);
            Self::charge(&self.push_pacer, wire);
            self.pushed.fetch_add(count as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: any bit pattern is a valid u64; `align_to` splits off the
        // unaligned ends.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && body.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

pub struct PostcopyOutgoing {
    shared: Arc<Shared>,
    owed: u64,
    recoveries: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl PostcopyOutgoing {
    /// The chunks of `mem` (of `chunk_bytes`) holding a page of `owed`: the
    /// pages the destination does not hold current.
    pub fn new(
        mem: Arc<GuestMemory>,
        owed: &DirtyBitmap,
        chunk_bytes: usize,
        max_bandwidth: u64,
        max_push_bandwidth: u64,
        one_stream: bool,
    ) -> CoreResult<Self> {
        let ps = mem.page_size();
        if chunk_bytes < ps || !chunk_bytes.is_multiple_of(ps) {
            return Err(CoreError::invalid(format!(
                "post-copy chunk of {chunk_bytes} bytes is not a multiple of the page size {ps}"
            )));
        }
        if owed.len() != mem.num_pages() {
            return Err(CoreError::invalid(format!(
                "post-copy: bitmap of {} pages for a memory of {}",
                owed.len(),
                mem.num_pages()
            )));
        }
        let chunk_pages = chunk_bytes / ps;
        let chunks = mem.num_pages().div_ceil(chunk_pages);
        let remaining = PageSet::new(chunks);
        for p in owed.iter() {
            remaining.insert(p / chunk_pages);
        }
        let owed = remaining.count() as u64;
        Ok(PostcopyOutgoing {
            shared: Arc::new(Shared {
                mem,
                chunk_pages,
                chunks,
                remaining,
                cursor: AtomicUsize::new(0),
                pacer: Pacer::new(max_bandwidth),
                push_pacer: Pacer::new(max_push_bandwidth),
                urgent_waiting: AtomicUsize::new(0),
                one_stream,
                stop: AtomicBool::new(false),
                state: PhaseState::new(OutgoingState::Active, |s| *s == OutgoingState::Placed),
                requests: AtomicU64::new(0),
                requested: AtomicU64::new(0),
                requested_pages: AtomicU64::new(0),
                pushed: AtomicU64::new(0),
                zero: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            }),
            owed,
            recoveries: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
        })
    }

    pub fn chunk_pages(&self) -> usize {
        self.shared.chunk_pages
    }

    /// The owed chunks as u64 words, for the `DISCARD` frame.
    fn owed_words(&self) -> Vec<u64> {
        let s = &self.shared;
        let mut words = vec![0u64; s.chunks.div_ceil(64)];
        for c in 0..s.chunks {
            if s.remaining.contains(c) {
                words[c / 64] |= 1 << (c % 64);
            }
        }
        words
    }

    /// Hands over on freshly opened channels: `DISCARD` names the owed
    /// chunks, then both threads start.
    pub fn start(&self, mut conns: Vec<Conn>) -> CoreResult<()> {
        let words = self.owed_words();
        let urgent = conns
            .get_mut(URGENT)
            .ok_or_else(|| CoreError::invalid("post-copy needs its two channels"))?;
        frames::write_frame(
            urgent,
            Tag::Discard,
            self.shared.chunk_pages as u64,
            &frames::bitmap_bytes(&words),
        )?;
        self.spawn(conns)
    }

    /// Goes on after a broken channel, on newly opened ones: the
    /// destination first says which chunks it still misses (chunks in
    /// flight when the link broke may be lost), those are owed again.
    pub fn reconnect(&self, mut conns: Vec<Conn>, timeout: Duration) -> CoreResult<()> {
        self.join();
        let s = &self.shared;
        let urgent = conns
            .get_mut(URGENT)
            .ok_or_else(|| CoreError::invalid("post-copy needs its two channels"))?;
        let deadline = Instant::now() + timeout;
        let frame = loop {
            if Instant::now() >= deadline {
                return Err(CoreError::invalid(
                    "post-copy recovery: the destination did not say what it misses",
                ));
            }
            if !urgent
                .wait_readable(POLL)
                .map_err(|e| CoreError::io("post-copy: poll", e))?
            {
                continue;
            }
            if let ReadOutcome::Frame(f) = frames::read_frame(urgent, s.chunks.div_ceil(64) * 8)? {
                break f;
            }
        };
        if frame.tag != Tag::Missing {
            return Err(CoreError::invalid(format!(
                "post-copy recovery: expected MISSING, got {:?}",
                frame.tag
            )));
        }
        let words = frames::bitmap_words(&frame.payload, s.chunks)?;
        for c in 0..s.chunks {
            if words[c / 64] & (1 << (c % 64)) != 0 {
                s.remaining.insert(c);
            }
        }
        self.recoveries.fetch_add(1, Ordering::Relaxed);
        s.stop.store(false, Ordering::SeqCst);
        s.state.set(OutgoingState::Active);
        self.spawn(conns)
    }

    fn spawn(&self, mut conns: Vec<Conn>) -> CoreResult<()> {
        if conns.len() != frames::CHANNELS {
            return Err(CoreError::invalid("post-copy needs its two channels"));
        }
        let push = conns.remove(PUSH);
        let urgent = conns.remove(URGENT);
        let mut threads = lock(&self.threads);
        for (name, conn, is_push) in [
            ("mig-pc-requests", urgent, false),
            ("mig-pc-push", push, true),
        ] {
            let s = self.shared.clone();
            let t = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let r = if is_push {
                        s.push(conn)
                    } else {
                        s.serve_requests(conn)
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

    /// Waits up to `timeout` for the state to leave `Active`.
    pub fn wait(&self, timeout: Duration) -> OutgoingState {
        self.shared
            .state
            .wait_while(&OutgoingState::Active, timeout)
    }

    pub fn state(&self) -> OutgoingState {
        self.shared.state.get()
    }

    pub fn set_max_bandwidth(&self, rate: u64) {
        Pacer::set_rate(&self.shared.pacer, rate);
    }

    /// `max_postcopy_bandwidth` changed while the phase runs (QEMU applies
    /// it at once too); 0 = no further limit than the link's.
    pub fn set_max_push_bandwidth(&self, rate: u64) {
        Pacer::set_rate(&self.shared.push_pacer, rate);
    }

    pub fn stats(&self) -> OutgoingStats {
        let s = &self.shared;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        OutgoingStats {
            requests: get(&s.requests),
            requested_chunks: get(&s.requested),
            requested_pages: get(&s.requested_pages),
            pushed_chunks: get(&s.pushed),
            zero_chunks: get(&s.zero),
            owed_chunks: self.owed,
            remaining_chunks: s.remaining.count() as u64,
            bytes: get(&s.bytes),
            recoveries: self.recoveries.load(Ordering::Relaxed),
        }
    }

    /// Stops both threads (their channels close with them).
    fn join(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }

    pub fn close(&self) {
        self.join();
    }
}

impl Drop for PostcopyOutgoing {
    fn drop(&mut self) {
        self.join();
    }
}
