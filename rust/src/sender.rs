//! The sender: pages → packets → N channels.
//!
//! The caller hands over a page list (or a bitmap) and a generation. Page
//! lists of `packet_pages` go to a shared queue; whichever channel thread is
//! idle takes the next one, reads the pages from guest memory (the guest may
//! be running: a page written after the harvest is dirty again and is resent
//! in the next generation) and separates zero pages word-wise. Uncompressed
//! pages on a plain socket then go out with one vectored write whose iovecs
//! point straight at the guest pages, after the header and offsets (QEMU
//! multifd's layout; `wire::FLAG_LIVE` says what the CRC covers). Compression,
//! TLS and files work on a copy of the pages. Records
//! that must reach every channel (sync, end) go through per-channel queues.
//! A `file:` target replaces the channels with a `Sink` (`sink.rs`): the
//! threads scan and copy pages the same way and hand them to it.

use std::io::{IoSlice, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, unbounded, Receiver as Rx, Sender as Tx};

mod sink;
mod snapshot;
use sink::Sink;

use crate::bitmap::DirtyBitmap;
use crate::error::{CoreError, CoreResult};
use crate::memory::GuestMemory;
use crate::order::{ChannelOrder, OrderError};
use crate::transport::{self, Conn, ControlLink, Endpoint};
use crate::wire::{
    self, ChannelKind, Compression, RecordHeader, RecordKind, StreamHeader, MAX_CHANNELS,
    MAX_DEVICE_CHUNK, MAX_PACKET_PAGES, RECORD_HEADER_LEN,
};
use crate::zero_copy::{self, ZeroCopy};

#[derive(Clone, Debug)]
pub struct SenderConfig {
    pub channels: usize,
    pub migration_id: u128,
    pub packet_pages: u32,
    pub compression: Compression,
    pub max_bandwidth: u64,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    /// Mutual TLS on every channel.
    pub tls: Option<Arc<transport::TlsConfig>>,
    /// `MSG_ZEROCOPY` sends of live pages (QEMU's `zero-copy-send`; see
    /// `zero_copy`): plain TCP without compression only.
    pub zero_copy_send: bool,
}

impl SenderConfig {
    fn check(&self) -> CoreResult<()> {
        if self.channels == 0 || self.channels > MAX_CHANNELS as usize {
            return Err(CoreError::invalid(format!(
                "channels must be in [1, {MAX_CHANNELS}], got {}",
                self.channels
            )));
        }
        if self.zero_copy_send && (self.compression != Compression::None || self.tls.is_some()) {
            return Err(CoreError::Unsupported(
                "zero_copy_send cannot be combined with compression or TLS (both copy the pages)"
                    .into(),
            ));
        }
        if self.packet_pages == 0 || self.packet_pages > MAX_PACKET_PAGES {
            return Err(CoreError::invalid(format!(
                "packet_pages must be in [1, {MAX_PACKET_PAGES}], got {}",
                self.packet_pages
            )));
        }
        Ok(())
    }
}

/// A packet asks the page tables for its holes only when its span is at
/// most this many times its page count.
const HOLE_QUERY_MAX_SPREAD: usize = 4;

/// Zero-page detection and compaction: splits `pages` into the byte
/// offsets of normal pages and of zero pages (like QEMU's multifd zero-page
/// detection, which partitions the offsets), keeping their order.
///
/// Two passes per batch of pages. The first loads each page's first word:
/// the loads do not depend on each other, so their cache misses overlap
/// (a one-pass scan waits for each page's first line in turn, as hardware
/// prefetchers stop at page boundaries), and a non-zero word settles a page
/// as normal at the cost of one cache line. The second reads the remaining
/// candidates in full, whose first lines are cached by then. Software
/// prefetching of the next candidate measured slower: it competes with
/// the hardware prefetcher streaming the current page.
///
/// With `check_holes`, pages that all lie in a hole of the memfd (never
/// written) are zero pages without a read, which would allocate them: the
/// pages were harvested before this call, so a page written before the
/// harvest is data by now. Callers ask only after a packet of zero pages
/// only, so memory with data pays no system call and a hole costs one packet
/// of allocation (the packet that finds it). Anonymous memory is asked every
/// dense packet, page by page, with one read of `/proc/self/pagemap` (same
/// reasoning).
pub fn scan_pages(
    mem: &GuestMemory,
    pages: &[u64],
    normal: &mut Vec<u64>,
    zero: &mut Vec<u64>,
    check_holes: bool,
) -> CoreResult<()> {
    const BATCH: usize = 256;
    let ps = mem.page_size();
    let span = match (pages.iter().min(), pages.iter().max()) {
        // Out-of-range pages fall through to the read, which reports them.
        (Some(&lo), Some(&hi)) if (hi as usize) < mem.num_pages() => {
            Some((lo as usize * ps, (hi as usize + 1) * ps))
        }
        _ => None,
    };
    if let (true, Some((lo, hi))) = (check_holes, span) {
        if mem.is_hole(lo, hi) {
            zero.extend(pages.iter().map(|&p| p * ps as u64));
            return Ok(());
        }
    }
    // Anonymous memory tells its holes for one read of the page tables:
    // each would otherwise cost a fault that maps the shared zero page. The
    // read costs the span, not the packet, so only a dense packet asks (a
    // first pass, where holes are): a sparse one holds pages the tracker
    // reported written, which are data, and reading its span would make
    // the switchover's final pass cost O(guest) for a few scattered pages.
    let holes = span
        .filter(|(lo, hi)| (hi - lo) / ps <= pages.len() * HOLE_QUERY_MAX_SPREAD)
        .and_then(|(lo, hi)| mem.anon_holes(lo / ps, (hi - lo) / ps));
    let is_data = |off: usize| {
        holes
            .as_ref()
            .is_none_or(|h| !h[(off - span.map_or(0, |s| s.0)) / ps])
    };
    let mut head = [Head::Hole; BATCH];
    for batch in pages.chunks(BATCH) {
        for (&p, h) in batch.iter().zip(head.iter_mut()) {
            let off = p as usize * ps;
            *h = if !is_data(off) {
                Head::Hole
            } else {
                // SAFETY: a racy read is the point of pre-copy: a page the
                // guest writes after the harvest is dirty again and will be
                // sent again.
                let first = unsafe { mem.racy_slice(off, 8)? };
                if first != [0u8; 8] {
                    Head::Data
                } else {
                    Head::Unknown
                }
            };
        }
        for (&p, &h) in batch.iter().zip(&head) {
            let off = p as usize * ps;
            // SAFETY: as above.
            let data = match h {
                Head::Data => true,
                Head::Hole => false,
                Head::Unknown => !wire::is_zero(unsafe { mem.racy_slice(off, ps)? }),
            };
            if data {
                normal.push(off as u64);
            } else {
                zero.push(off as u64);
            }
        }
    }
    Ok(())
}

/// What the first pass of `scan_pages` learned about a page.
#[derive(Clone, Copy)]
enum Head {
    /// Its first word is not zero.
    Data,
    /// Absent from the page tables: zeros, not read.
    Hole,
    /// Its first word is zero: the rest must be read.
    Unknown,
}

/// Copies the pages at `offsets` back to back into `payload`, which then
/// holds exactly the bytes the CRC covers and the socket sends, whatever
/// the guest writes meanwhile. Returns the bytes used.
pub fn copy_pages(mem: &GuestMemory, offsets: &[u64], payload: &mut [u8]) -> CoreResult<usize> {
    let ps = mem.page_size();
    let used = offsets.len() * ps;
    if payload.len() < used {
        return Err(CoreError::invalid(
            "packet buffer smaller than the page list",
        ));
    }
    for (&off, out) in offsets.iter().zip(payload.chunks_exact_mut(ps)) {
        mem.read_bytes(off as usize, out)?;
    }
    Ok(used)
}

/// Reads every byte of memory once (XOR of all words): the memory read
/// bandwidth baseline the zero-page scan is compared with.
pub fn read_all(mem: &GuestMemory) -> u64 {
    // SAFETY: plain reads; a racing writer only changes the result.
    let bytes = unsafe { mem.racy_slice(0, mem.len()) }.expect("whole memory is in range");
    let mut acc = [0u64; 8];
    for block in bytes.chunks_exact(64) {
        for (a, w) in acc.iter_mut().zip(block.chunks_exact(8)) {
            *a ^= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
    }
    acc.iter().fold(0, |x, y| x ^ y)
}

/// A token bucket shared by all channels; the rate may change at any time.
struct Bucket {
    rate: AtomicU64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        Bucket {
            rate: AtomicU64::new(rate),
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    fn set_rate(&self, rate: u64) {
        let mut s = lock(&self.state);
        *s = (0.0, Instant::now());
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// Takes `n` tokens, going into debt and sleeping it off; at most one
    /// packet of burst beyond a 50 ms allowance.
    fn take(&self, n: u64, abort: &AtomicBool) {
        let mut debt_taken = false;
        loop {
            let rate = self.rate.load(Ordering::Relaxed);
            if rate == 0 || abort.load(Ordering::Relaxed) {
                return;
            }
            let wait = {
                let mut s = lock(&self.state);
                let now = Instant::now();
                let burst = (rate as f64 * 0.05).max(n as f64);
                s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * rate as f64).min(burst);
                s.1 = now;
                if !debt_taken {
                    s.0 -= n as f64;
                    debt_taken = true;
                }
                if s.0 >= 0.0 {
                    return;
                }
                -s.0 / rate as f64
            };
            std::thread::sleep(Duration::from_secs_f64(wait.min(0.05)));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct ChannelStats {
    packets: AtomicU64,
    bytes: AtomicU64,
    busy_ns: AtomicU64,
}

/// Counters shared by the caller and the channel threads.
struct Shared {
    abort: AtomicBool,
    failure: Mutex<Option<String>>,
    bucket: Bucket,
    wire_bytes: AtomicU64,
    payload_bytes: AtomicU64,
    normal_pages: AtomicU64,
    zero_pages: AtomicU64,
    /// Zero-copy completions, and those where the kernel copied anyway.
    zero_copy_done: AtomicU64,
    zero_copy_copied: AtomicU64,
    channels: Vec<ChannelStats>,
    window: Mutex<std::collections::VecDeque<(Instant, u64)>>,
}

const WINDOW: Duration = Duration::from_secs(1);

impl Shared {
    fn fail(&self, e: &CoreError) {
        lock(&self.failure).get_or_insert_with(|| e.to_string());
    }

    fn check(&self) -> CoreResult<()> {
        if let Some(msg) = lock(&self.failure).as_ref() {
            return Err(CoreError::invalid(format!(
                "the migration stream already failed: {msg}"
            )));
        }
        if self.abort.load(Ordering::Relaxed) {
            return Err(CoreError::invalid("the migration stream was aborted"));
        }
        Ok(())
    }

    fn account(&self, channel: usize, wire: u64) {
        self.wire_bytes.fetch_add(wire, Ordering::Relaxed);
        let c = &self.channels[channel];
        c.packets.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(wire, Ordering::Relaxed);
        let now = Instant::now();
        let mut w = lock(&self.window);
        w.push_back((now, wire));
        while w
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
        {
            w.pop_front();
        }
    }

    /// Bytes per second over the last window.
    fn bandwidth(&self) -> f64 {
        let now = Instant::now();
        let w = lock(&self.window);
        let bytes: u64 = w
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= WINDOW)
            .map(|(_, b)| b)
            .sum();
        bytes as f64 / WINDOW.as_secs_f64()
    }
}

type Reply = Tx<CoreResult<u64>>;

enum Job {
    Pages {
        generation: u64,
        pages: Vec<u64>,
        reply: Reply,
    },
    Sync {
        generation: u64,
        reply: Reply,
    },
    Device {
        generation: u64,
        body: Vec<u8>,
        seq: u64,
        device_id: u32,
        last: bool,
        reply: Reply,
    },
    End {
        generation: u64,
        digest: u128,
        reply: Reply,
    },
}

/// Where one channel thread writes: its socket, or the sink that replaces
/// the channels.
enum Output {
    Socket(Conn),
    Sink(Arc<dyn Sink>),
}

/// Generation bookkeeping that lets the receiver order pages: the order
/// the receiver checks, and within one generation a page is sent at most
/// once.
struct GenState {
    order: ChannelOrder,
    sent: DirtyBitmap,
    finished: bool,
}

pub struct Sender {
    mem: Arc<GuestMemory>,
    cfg: SenderConfig,
    shared: Arc<Shared>,
    pages_tx: Mutex<Option<Tx<Job>>>,
    private: Mutex<Vec<Tx<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    control: Option<ControlLink>,
    sockets: Vec<Conn>,
    /// Takes the stream in place of the channels (`None`: stream on them).
    sink: Option<Arc<dyn Sink>>,
    gen: Mutex<GenState>,
}

impl Sender {
    /// Opens `count` further channels of `kind` to `uri` with this
    /// session's stream header, TLS and timeouts: post-copy's page channels,
    /// opened at the switchover (and again to recover).
    pub fn connect_extra(
        &self,
        uri: &str,
        kind: ChannelKind,
        count: usize,
    ) -> CoreResult<Vec<Conn>> {
        let ep = transport::parse_uri(uri)?;
        (0..count)
            .map(|i| {
                let header = StreamHeader {
                    kind,
                    page_size: self.mem.page_size() as u32,
                    packet_pages: self.cfg.packet_pages,
                    memory_size: self.mem.len() as u64,
                    channel_index: i as u16,
                    channel_count: count as u16,
                    migration_id: self.cfg.migration_id,
                };
                transport::connect(
                    &ep,
                    &header,
                    self.cfg.connect_timeout,
                    self.cfg.io_timeout,
                    self.cfg.tls.as_deref(),
                )
            })
            .collect()
    }

    pub fn connect(mem: Arc<GuestMemory>, uri: &str, cfg: SenderConfig) -> CoreResult<Self> {
        cfg.check()?;
        let ep = transport::parse_uri(uri)?;
        if cfg.zero_copy_send && !matches!(ep, Endpoint::Tcp(_)) {
            return Err(CoreError::Unsupported(
                "zero_copy_send needs tcp: channels (MSG_ZEROCOPY)".into(),
            ));
        }
        let header = |kind, index| StreamHeader {
            kind,
            page_size: mem.page_size() as u32,
            packet_pages: cfg.packet_pages,
            memory_size: mem.len() as u64,
            channel_index: index as u16,
            channel_count: cfg.channels as u16,
            migration_id: cfg.migration_id,
        };
        let control_header = header(ChannelKind::Control, 0);
        control_header.check_bounds().map_err(CoreError::invalid)?;
        let mut outputs = Vec::new();
        let mut control = None;
        let mut sockets = Vec::new();
        let sink = sink::open(&ep, &control_header, &cfg)?;
        if let Some(sink) = &sink {
            outputs = (0..cfg.channels)
                .map(|_| Output::Sink(sink.clone()))
                .collect();
        } else {
            let c = transport::connect(
                &ep,
                &control_header,
                cfg.connect_timeout,
                cfg.io_timeout,
                cfg.tls.as_deref(),
            )?;
            control = Some(ControlLink::new(c)?);
            for i in 0..cfg.channels {
                let c = transport::connect(
                    &ep,
                    &header(ChannelKind::Data, i),
                    cfg.connect_timeout,
                    cfg.io_timeout,
                    cfg.tls.as_deref(),
                )?;
                sockets.push(
                    c.try_clone()
                        .map_err(|e| CoreError::io("clone socket", e))?,
                );
                if cfg.zero_copy_send {
                    let fd = raw_fd(&c).ok_or_else(|| CoreError::invalid("no socket fd"))?;
                    zero_copy::enable(fd).map_err(|e| {
                        CoreError::Unsupported(format!("zero_copy_send: SO_ZEROCOPY: {e}"))
                    })?;
                }
                outputs.push(Output::Socket(c));
            }
        }
        let shared = Arc::new(Shared {
            abort: AtomicBool::new(false),
            failure: Mutex::new(None),
            bucket: Bucket::new(cfg.max_bandwidth),
            wire_bytes: AtomicU64::new(0),
            payload_bytes: AtomicU64::new(0),
            normal_pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            zero_copy_done: AtomicU64::new(0),
            zero_copy_copied: AtomicU64::new(0),
            channels: (0..cfg.channels).map(|_| ChannelStats::default()).collect(),
            window: Mutex::new(Default::default()),
        });
        let (pages_tx, pages_rx) = bounded::<Job>(cfg.channels * 2);
        let mut private = Vec::new();
        let mut threads = Vec::new();
        for (i, output) in outputs.into_iter().enumerate() {
            let (tx, rx) = unbounded::<Job>();
            private.push(tx);
            let worker = Worker::new(i, output, mem.clone(), shared.clone(), &cfg)?;
            let pages_rx = pages_rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("mig-send-{i}"))
                    .spawn(move || worker.run(rx, pages_rx))
                    .map_err(|e| CoreError::io("spawn sender thread", e))?,
            );
        }
        Ok(Sender {
            gen: Mutex::new(GenState {
                order: ChannelOrder::default(),
                sent: DirtyBitmap::new(mem.num_pages()),
                finished: false,
            }),
            mem,
            cfg,
            shared,
            pages_tx: Mutex::new(Some(pages_tx)),
            private: Mutex::new(private),
            threads: Mutex::new(threads),
            control,
            sockets,
            sink,
        })
    }

    pub fn channels(&self) -> usize {
        self.cfg.channels
    }

    /// Sends every page set in `bitmap` as part of `generation`; blocks until
    /// all packets are written and returns the bytes put on the wire.
    pub fn send_pages(&self, bitmap: &DirtyBitmap, generation: u64) -> CoreResult<u64> {
        self.shared.check()?;
        if bitmap.len() != self.mem.num_pages() {
            return Err(CoreError::invalid(format!(
                "bitmap covers {} pages, memory has {}",
                bitmap.len(),
                self.mem.num_pages()
            )));
        }
        {
            let mut g = lock(&self.gen);
            check_generation(&g, generation)?;
            let repeated = bitmap
                .words()
                .iter()
                .zip(g.sent.words())
                .position(|(a, b)| a & b != 0);
            if let Some(w) = repeated {
                let bits = bitmap.words()[w] & g.sent.words()[w];
                return Err(CoreError::invalid(format!(
                    "page {} was already sent in generation {generation}: sync and start a \
                     new generation to resend it",
                    w * 64 + bits.trailing_zeros() as usize
                )));
            }
            g.sent.or_assign(bitmap)?;
            g.order.on_pages(generation).map_err(out_of_order)?;
        }
        self.dispatch(bitmap.iter().map(|p| p as u64), generation)
    }

    /// Sends `pages` (page indices, each at most once per generation) as
    /// part of `generation`; blocks until every packet is written. The check
    /// and the bookkeeping cost O(pages), not O(guest): this is the path of
    /// the RAM stream, one chunk at a time.
    pub fn send_page_list(&self, pages: &[u64], generation: u64) -> CoreResult<u64> {
        self.shared.check()?;
        let n = self.mem.num_pages() as u64;
        if let Some(&p) = pages.iter().find(|&&p| p >= n) {
            return Err(CoreError::invalid(format!(
                "page {p} is outside a memory of {n} pages"
            )));
        }
        {
            let mut g = lock(&self.gen);
            check_generation(&g, generation)?;
            if let Some(&p) = pages.iter().find(|&&p| g.sent.get(p as usize)) {
                return Err(CoreError::invalid(format!(
                    "page {p} was already sent in generation {generation}: sync and start a \
                     new generation to resend it"
                )));
            }
            for &p in pages {
                g.sent.set(p as usize);
            }
            g.order.on_pages(generation).map_err(out_of_order)?;
        }
        self.dispatch(pages.iter().copied(), generation)
    }

    /// Splits `pages` into packets for whichever channel is idle and waits
    /// for all of them.
    fn dispatch(&self, pages: impl Iterator<Item = u64>, generation: u64) -> CoreResult<u64> {
        let (reply, results) = unbounded();
        let pages_tx = lock(&self.pages_tx).clone().ok_or_else(closed)?;
        let pages_tx = &pages_tx;
        let mut jobs = 0usize;
        let mut batch = Vec::with_capacity(self.cfg.packet_pages as usize);
        let mut outcome = Outcome::default();
        for p in pages {
            batch.push(p);
            if batch.len() == self.cfg.packet_pages as usize {
                let pages = std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(self.cfg.packet_pages as usize),
                );
                self.queue(pages_tx, pages, generation, &reply)?;
                jobs += 1;
                while let Ok(r) = results.try_recv() {
                    outcome.add(r);
                    jobs -= 1;
                }
                if outcome.error.is_some() {
                    break;
                }
            }
        }
        if !batch.is_empty() && outcome.error.is_none() {
            self.queue(pages_tx, batch, generation, &reply)?;
            jobs += 1;
        }
        for _ in 0..jobs {
            outcome.add(results.recv().unwrap_or_else(|_| Err(thread_gone())));
        }
        outcome.finish()
    }

    fn queue(
        &self,
        tx: &Tx<Job>,
        pages: Vec<u64>,
        generation: u64,
        reply: &Reply,
    ) -> CoreResult<()> {
        tx.send(Job::Pages {
            generation,
            pages,
            reply: reply.clone(),
        })
        .map_err(|_| thread_gone())
    }

    /// Sends one record on every channel and waits until all are written.
    fn broadcast(&self, make: impl Fn(Reply) -> Job) -> CoreResult<u64> {
        let (reply, results) = unbounded();
        let private = lock(&self.private).clone();
        if private.is_empty() {
            return Err(closed());
        }
        for tx in &private {
            tx.send(make(reply.clone())).map_err(|_| thread_gone())?;
        }
        let mut outcome = Outcome::default();
        for _ in &private {
            outcome.add(results.recv().unwrap_or_else(|_| Err(thread_gone())));
        }
        outcome.finish()
    }

    /// The iteration barrier: no page of a later generation is applied on
    /// the destination before every channel has delivered this sync.
    pub fn sync(&self, generation: u64) -> CoreResult<u64> {
        self.shared.check()?;
        let mut g = lock(&self.gen);
        if g.finished {
            return Err(CoreError::invalid("the stream is already finished"));
        }
        g.order.check_sync(generation).map_err(out_of_order)?;
        // send_pages already waited for every write of the generation.
        let bytes = match &self.sink {
            Some(sink) => sink.sync(generation)?,
            None => self.broadcast(|reply| Job::Sync { generation, reply })?,
        };
        g.order.on_sync(generation).map_err(out_of_order)?;
        g.sent.clear_all();
        Ok(bytes)
    }

    pub fn send_device_state(
        &self,
        device_id: u32,
        seq: u64,
        data: &[u8],
        last: bool,
    ) -> CoreResult<u64> {
        self.shared.check()?;
        if data.len() > MAX_DEVICE_CHUNK {
            return Err(CoreError::invalid(format!(
                "device-state chunk of {} bytes exceeds the limit of {MAX_DEVICE_CHUNK}: \
                 send it in several records",
                data.len()
            )));
        }
        let body = data.to_vec();
        let generation = lock(&self.gen).order.open().unwrap_or(0);
        let kind = RecordKind::Device {
            seq,
            device_id,
            last,
        };
        if let Some(sink) = &self.sink {
            return sink.append(kind, generation, &body);
        }
        // One channel per device keeps its records in order.
        let private = lock(&self.private).clone();
        if private.is_empty() {
            return Err(closed());
        }
        let ch = device_id as usize % private.len();
        let (reply, result) = unbounded();
        private[ch]
            .send(Job::Device {
                generation,
                body,
                seq,
                device_id,
                last,
                reply,
            })
            .map_err(|_| thread_gone())?;
        result.recv().unwrap_or_else(|_| Err(thread_gone()))
    }

    /// Sends the end record with the whole-memory digest on every channel.
    pub fn finish(&self, digest: u128) -> CoreResult<u64> {
        self.shared.check()?;
        let mut g = lock(&self.gen);
        if g.finished {
            return Err(CoreError::invalid("finish() was already called"));
        }
        let generation = g.order.latest().unwrap_or(0);
        let bytes = match &self.sink {
            Some(sink) => sink.finish(generation, digest)?,
            None => self.broadcast(|reply| Job::End {
                generation,
                digest,
                reply,
            })?,
        };
        g.finished = true;
        Ok(bytes)
    }

    pub fn control_send(&self, payload: &[u8]) -> CoreResult<()> {
        match (&self.control, &self.sink) {
            (Some(c), _) => c.send(payload),
            (None, Some(sink)) => sink.append(RecordKind::Control, 0, payload).map(|_| ()),
            (None, None) => Err(CoreError::invalid("no control channel")),
        }
    }

    /// The next control message; a sink (a `file:` target) never answers,
    /// so this waits out `timeout` and returns `None`.
    pub fn control_recv(&self, timeout: Duration) -> CoreResult<Option<Vec<u8>>> {
        match &self.control {
            Some(c) => c.recv(timeout),
            None => {
                std::thread::sleep(timeout);
                Ok(None)
            }
        }
    }

    pub fn set_max_bandwidth(&self, bytes_per_second: u64) {
        self.shared.bucket.set_rate(bytes_per_second);
    }

    pub fn stats(&self) -> SenderStats {
        let s = &self.shared;
        SenderStats {
            transferred: s.wire_bytes.load(Ordering::Relaxed),
            payload_bytes: s.payload_bytes.load(Ordering::Relaxed),
            normal: s.normal_pages.load(Ordering::Relaxed),
            zero_pages: s.zero_pages.load(Ordering::Relaxed),
            page_size: self.mem.page_size() as u64,
            channel_packets: s
                .channels
                .iter()
                .map(|c| c.packets.load(Ordering::Relaxed))
                .collect(),
            channel_bytes: s
                .channels
                .iter()
                .map(|c| c.bytes.load(Ordering::Relaxed))
                .collect(),
            channel_busy: s
                .channels
                .iter()
                .map(|c| c.busy_ns.load(Ordering::Relaxed) as f64 / 1e9)
                .collect(),
            bandwidth: s.bandwidth(),
            max_bandwidth: s.bucket.rate.load(Ordering::Relaxed),
            zero_copy_done: s.zero_copy_done.load(Ordering::Relaxed),
            zero_copy_copied: s.zero_copy_copied.load(Ordering::Relaxed),
            failure: lock(&s.failure).clone(),
        }
    }

    /// Stops at once: sockets are shut down so blocked threads return.
    pub fn abort(&self) {
        self.shared.abort.store(true, Ordering::Relaxed);
        for s in &self.sockets {
            s.shutdown();
        }
        if let Some(c) = &self.control {
            c.shutdown();
        }
        self.join();
    }

    /// Closes the channels after the queued work is written.
    pub fn close(&self) {
        self.join();
        for s in &self.sockets {
            s.shutdown();
        }
        if let Some(c) = &self.control {
            c.shutdown();
        }
    }

    fn join(&self) {
        *lock(&self.pages_tx) = None;
        lock(&self.private).clear();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.close();
    }
}

fn check_generation(g: &GenState, generation: u64) -> CoreResult<()> {
    if g.finished {
        return Err(CoreError::invalid("the stream is already finished"));
    }
    g.order.check_pages(generation).map_err(out_of_order)
}

/// The caller asked for a record the receiver would refuse.
fn out_of_order(e: OrderError) -> CoreError {
    CoreError::invalid(e.to_string())
}

fn closed() -> CoreError {
    CoreError::invalid("the sender is closed")
}

fn thread_gone() -> CoreError {
    CoreError::invalid("a sender channel thread has stopped")
}

#[derive(Default)]
struct Outcome {
    bytes: u64,
    error: Option<CoreError>,
}

impl Outcome {
    fn add(&mut self, r: CoreResult<u64>) {
        match r {
            Ok(b) => self.bytes += b,
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    fn finish(self) -> CoreResult<u64> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.bytes),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SenderStats {
    pub transferred: u64,
    pub payload_bytes: u64,
    pub normal: u64,
    pub zero_pages: u64,
    pub page_size: u64,
    pub channel_packets: Vec<u64>,
    pub channel_bytes: Vec<u64>,
    pub channel_busy: Vec<f64>,
    pub bandwidth: f64,
    pub max_bandwidth: u64,
    pub zero_copy_done: u64,
    pub zero_copy_copied: u64,
    pub failure: Option<String>,
}

/// One channel thread's state: its output and reusable buffers.
struct Worker {
    index: usize,
    output: Output,
    mem: Arc<GuestMemory>,
    shared: Arc<Shared>,
    compression: Compression,
    number: u64,
    head: Vec<u8>,
    payload: Vec<u8>,
    payload_len: usize,
    packed: Vec<u8>,
    packed_len: usize,
    normal: Vec<u64>,
    zero: Vec<u64>,
    /// The last packet was all zero pages: ask for holes (`scan_pages`).
    check_holes: bool,
    /// Normal pages go out straight from guest memory (plain socket, no
    /// compression): see `write_live_packet`.
    live: bool,
    /// Runs of adjacent normal pages of the current packet (offset, bytes).
    runs: Vec<(usize, usize)>,
    /// Outstanding `MSG_ZEROCOPY` sends, reaped at every sync and the end.
    zero_copy: Option<ZeroCopy>,
    /// Completions and copies already added to the shared statistics.
    zero_copy_reported: (u64, u64),
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Worker {
    fn new(
        index: usize,
        output: Output,
        mem: Arc<GuestMemory>,
        shared: Arc<Shared>,
        cfg: &SenderConfig,
    ) -> CoreResult<Self> {
        let pp = cfg.packet_pages as usize;
        let raw = pp * mem.page_size();
        let zstd = match cfg.compression {
            Compression::Zstd => Some(
                zstd::bulk::Compressor::new(1).map_err(|e| CoreError::io("zstd compressor", e))?,
            ),
            _ => None,
        };
        Ok(Worker {
            index,
            output,
            mem,
            shared,
            compression: cfg.compression,
            number: 0,
            head: Vec::with_capacity(RECORD_HEADER_LEN + pp * 8),
            payload: vec![0; raw],
            payload_len: 0,
            packed: vec![
                0;
                if cfg.compression == Compression::None {
                    0
                } else {
                    lz4_flex::block::get_maximum_output_size(raw)
                        .max(zstd::zstd_safe::compress_bound(raw))
                }
            ],
            packed_len: 0,
            normal: Vec::with_capacity(pp),
            zero: Vec::with_capacity(pp),
            check_holes: true,
            live: cfg.compression == Compression::None && cfg.tls.is_none(),
            runs: Vec::with_capacity(pp),
            zero_copy: cfg.zero_copy_send.then(ZeroCopy::default),
            zero_copy_reported: (0, 0),
            zstd,
        })
    }

    /// Serves both queues until both are closed: an `abort` from another
    /// thread closes the sender's own ends while a caller may still wait on
    /// queued jobs (its clone of a queue keeps it open), and every one of
    /// them must get its (failed) reply.
    fn run(mut self, private: Rx<Job>, pages: Rx<Job>) {
        let (mut private_open, mut pages_open) = (true, true);
        loop {
            let job = match (private_open, pages_open) {
                (true, true) => select! {
                    recv(private) -> j => j.map_err(|_| true),
                    recv(pages) -> j => j.map_err(|_| false),
                },
                (true, false) => private.recv().map_err(|_| true),
                (false, true) => pages.recv().map_err(|_| false),
                (false, false) => break,
            };
            let job = match job {
                Ok(job) => job,
                Err(true) => {
                    private_open = false;
                    continue;
                }
                Err(false) => {
                    pages_open = false;
                    continue;
                }
            };
            let start = Instant::now();
            let (reply, result) = match self.shared.check() {
                Err(e) => (job_reply(job), Err(e)),
                Ok(()) => self.handle(job),
            };
            self.shared.channels[self.index]
                .busy_ns
                .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if let Err(e) = &result {
                self.shared.fail(e);
            }
            let _ = reply.send(result);
        }
    }

    fn handle(&mut self, job: Job) -> (Reply, CoreResult<u64>) {
        match job {
            Job::Pages {
                generation,
                pages,
                reply,
            } => (reply, self.send_pages(generation, &pages)),
            Job::Sync { generation, reply } => {
                (reply, self.send_record(RecordKind::Sync, generation, &[]))
            }
            Job::Device {
                generation,
                body,
                seq,
                device_id,
                last,
                reply,
            } => {
                let kind = RecordKind::Device {
                    seq,
                    device_id,
                    last,
                };
                (reply, self.send_record(kind, generation, &body))
            }
            Job::End {
                generation,
                digest,
                reply,
            } => (
                reply,
                self.send_record(RecordKind::End, generation, &digest.to_le_bytes()),
            ),
        }
    }

    fn error(&self, what: &str, e: std::io::Error) -> CoreError {
        channel_error(self.index, self.number, what, e)
    }

    /// Waits for every zero-copy send of this channel to complete, so the
    /// kernel holds no pinned pages across a sync (QEMU flushes likewise).
    fn reap_zero_copy(&mut self) -> CoreResult<()> {
        let (Some(zc), Output::Socket(conn)) = (&mut self.zero_copy, &self.output) else {
            return Ok(());
        };
        let fd = raw_fd(conn).ok_or_else(|| CoreError::invalid("no socket fd"))?;
        let r = zc.reap(fd, true);
        // Completions are also reaped during sends: report all since last.
        let (done, copied) = (zc.completed(), zc.copied);
        let (done0, copied0) = std::mem::replace(&mut self.zero_copy_reported, (done, copied));
        let s = &self.shared;
        s.zero_copy_done.fetch_add(done - done0, Ordering::Relaxed);
        s.zero_copy_copied
            .fetch_add(copied - copied0, Ordering::Relaxed);
        r.map_err(|e| self.error("reap zero-copy completions", e))
    }

    fn send_record(&mut self, kind: RecordKind, generation: u64, body: &[u8]) -> CoreResult<u64> {
        if matches!(kind, RecordKind::Sync | RecordKind::End) {
            self.reap_zero_copy()?;
        }
        let Output::Socket(conn) = &mut self.output else {
            return Err(CoreError::invalid("records of a sink go to Sink::append"));
        };
        let rec = RecordHeader::record(kind, self.number, generation, body);
        self.shared
            .bucket
            .take(rec.len() as u64, &self.shared.abort);
        if let Err(e) = conn.write_all(&rec) {
            return Err(self.error("send record", e));
        }
        self.number += 1;
        self.shared.account(self.index, rec.len() as u64);
        Ok(rec.len() as u64)
    }

    fn send_pages(&mut self, generation: u64, pages: &[u64]) -> CoreResult<u64> {
        self.normal.clear();
        self.zero.clear();
        scan_pages(
            &self.mem,
            pages,
            &mut self.normal,
            &mut self.zero,
            self.check_holes,
        )?;
        self.check_holes = self.zero.len() == pages.len();
        let s = &self.shared;
        s.normal_pages
            .fetch_add(self.normal.len() as u64, Ordering::Relaxed);
        s.zero_pages
            .fetch_add(self.zero.len() as u64, Ordering::Relaxed);
        if self.live && matches!(self.output, Output::Socket(_)) {
            return self.write_live_packet(generation);
        }
        // Compression and TLS transform a copy; a sink gets the copy too.
        self.payload_len = copy_pages(&self.mem, &self.normal, &mut self.payload)?;
        let wire = match &self.output {
            Output::Sink(sink) => self.write_to_sink(sink.clone())?,
            Output::Socket(_) => self.write_packet(generation)?,
        };
        Ok(wire)
    }

    /// Compresses the payload when that makes it smaller; returns the
    /// compression actually used.
    fn compress(&mut self) -> Compression {
        if self.payload_len == 0 || self.compression == Compression::None {
            return Compression::None;
        }
        let out = &mut self.packed[..];
        let n = match (self.compression, &mut self.zstd) {
            (Compression::Zstd, Some(z)) => z
                .compress_to_buffer(&self.payload[..self.payload_len], out)
                .ok(),
            (Compression::Lz4, _) => {
                lz4_flex::block::compress_into(&self.payload[..self.payload_len], out).ok()
            }
            _ => None,
        };
        // Sent compressed only when that is smaller; the wire format relies
        // on it to bound compressed payloads by the raw size.
        match n.filter(|&n| n < self.payload_len) {
            Some(n) => {
                self.packed_len = n;
                self.compression
            }
            None => Compression::None,
        }
    }

    fn write_packet(&mut self, generation: u64) -> CoreResult<u64> {
        let used = self.compress();
        let kind = RecordKind::Pages {
            compression: used,
            normal: self.normal.len() as u32,
            zero: self.zero.len() as u32,
            live_crc: None,
        };
        self.head.clear();
        self.head.resize(RECORD_HEADER_LEN, 0);
        for off in self.normal.iter().chain(&self.zero) {
            self.head.extend_from_slice(&off.to_le_bytes());
        }
        let payload: &[u8] = if used == Compression::None {
            &self.payload[..self.payload_len]
        } else {
            &self.packed[..self.packed_len]
        };
        let (h, offsets) = self.head.split_at_mut(RECORD_HEADER_LEN);
        RecordHeader {
            kind,
            number: self.number,
            generation,
            body_len: 0,
            crc: 0,
        }
        .encode_into(h, &[offsets, payload]);
        let wire = (self.head.len() + payload.len()) as u64;
        self.shared.bucket.take(wire, &self.shared.abort);
        let Output::Socket(conn) = &mut self.output else {
            unreachable!("write_packet is only called for sockets")
        };
        let mut bufs = [IoSlice::new(&self.head), IoSlice::new(payload)];
        if let Err(e) = transport::write_all_vectored(conn, &mut bufs) {
            return Err(self.error("send packet", e));
        }
        self.shared
            .payload_bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        self.number += 1;
        self.shared.account(self.index, wire);
        Ok(wire)
    }

    /// QEMU multifd's layout without its copy: one vectored write of the
    /// header and offsets, then iovecs straight on the guest pages (one per
    /// run of adjacent pages). The payload CRC is read from the mapping just
    /// before the write (a read, not a copy) and travels in the header
    /// (`wire::FLAG_LIVE`): a page the guest rewrites in between is already
    /// dirty again in the tracker and goes out again in a later generation.
    fn write_live_packet(&mut self, generation: u64) -> CoreResult<u64> {
        let ps = self.mem.page_size();
        self.runs.clear();
        for &off in &self.normal {
            let off = off as usize;
            match self.runs.last_mut() {
                Some((start, len)) if *start + *len == off => *len += ps,
                _ => self.runs.push((off, ps)),
            }
        }
        let mut slices: Vec<&[u8]> = Vec::with_capacity(self.runs.len());
        let mut crc = 0u32;
        for &(off, len) in &self.runs {
            // SAFETY: a racy read of guest memory is the point of pre-copy
            // (see `scan_pages`); the slice lives as long as `self.mem`.
            let page = unsafe { self.mem.racy_slice(off, len)? };
            crc = crc32c::crc32c_append(crc, page);
            slices.push(page);
        }
        let payload_len = self.normal.len() * ps;
        self.head.clear();
        self.head.resize(RECORD_HEADER_LEN, 0);
        for off in self.normal.iter().chain(&self.zero) {
            self.head.extend_from_slice(&off.to_le_bytes());
        }
        let (h, offsets) = self.head.split_at_mut(RECORD_HEADER_LEN);
        RecordHeader {
            kind: RecordKind::Pages {
                compression: Compression::None,
                normal: self.normal.len() as u32,
                zero: self.zero.len() as u32,
                live_crc: Some(crc),
            },
            number: self.number,
            generation,
            body_len: 0,
            crc: 0,
        }
        .encode_live_into(h, offsets, payload_len);
        let wire = (self.head.len() + payload_len) as u64;
        self.shared.bucket.take(wire, &self.shared.abort);
        let Output::Socket(conn) = &mut self.output else {
            unreachable!("live packets are only written to sockets")
        };
        let mut bufs: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(&self.head))
            .chain(slices.iter().map(|s| IoSlice::new(s)))
            .collect();
        let written = match (&mut self.zero_copy, raw_fd(conn)) {
            // The kernel reads zero-copy buffers until their completion: the
            // header buffer is reused by the next packet, so it is copied
            // by a plain write; only the guest pages go out zero-copy.
            (Some(zc), Some(fd)) => transport::write_all_vectored(conn, &mut bufs[..1])
                .and_then(|()| zc.write_all(fd, &mut bufs[1..])),
            _ => transport::write_all_vectored(conn, &mut bufs),
        };
        if let Err(e) = written {
            let (index, number) = (self.index, self.number);
            return Err(channel_error(index, number, "send packet", e));
        }
        self.shared
            .payload_bytes
            .fetch_add(payload_len as u64, Ordering::Relaxed);
        self.number += 1;
        self.shared.account(self.index, wire);
        Ok(wire)
    }

    /// Hands the packet's copied pages to the sink.
    fn write_to_sink(&mut self, sink: Arc<dyn Sink>) -> CoreResult<u64> {
        let shared = &self.shared;
        let payload = &self.payload[..self.payload_len];
        sink.write_pages(
            &self.normal,
            &self.zero,
            payload,
            self.mem.page_size(),
            &mut |n| shared.bucket.take(n as u64, &shared.abort),
        )
        .map_err(|e| self.error("write pages to the sink", e))?;
        let wire = self.payload_len as u64;
        self.shared.payload_bytes.fetch_add(wire, Ordering::Relaxed);
        self.number += 1;
        self.shared.account(self.index, wire);
        Ok(wire)
    }
}

/// The fd of a plain TCP connection (the only kind zero-copy sends use).
fn raw_fd(c: &Conn) -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    match c {
        Conn::Tcp(s) => Some(s.as_raw_fd()),
        _ => None,
    }
}

fn channel_error(index: usize, number: u64, what: &str, e: std::io::Error) -> CoreError {
    if transport::is_timeout(&e) {
        return transport::timeout_error(format!(
            "channel {index}, packet {number}: {what}: stalled peer (I/O timeout)"
        ));
    }
    CoreError::io(format!("channel {index}, packet {number}: {what}"), e)
}

fn job_reply(job: Job) -> Reply {
    match job {
        Job::Pages { reply, .. }
        | Job::Sync { reply, .. }
        | Job::Device { reply, .. }
        | Job::End { reply, .. } => reply,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages whose first word is zero but not the rest must not pass as
    /// zero pages; both lists keep the page order, across batches.
    #[test]
    fn scan_partitions_pages_in_order() {
        let mem = GuestMemory::new(crate::memory::host_page_size() * 600).unwrap();
        let ps = mem.page_size();
        let mut expect_normal = Vec::new();
        let mut expect_zero = Vec::new();
        for p in 0..600usize {
            let off = p * ps;
            match p % 4 {
                0 => mem.write_bytes(off, &[1]).unwrap(),
                1 => mem.write_bytes(off + ps - 1, &[1]).unwrap(),
                2 => mem.write_bytes(off + 8, &[1]).unwrap(),
                _ => {}
            }
            if p % 4 == 3 {
                expect_zero.push(off as u64);
            } else {
                expect_normal.push(off as u64);
            }
        }
        let pages: Vec<u64> = (0..600).collect();
        let (mut normal, mut zero) = (Vec::new(), Vec::new());
        scan_pages(&mem, &pages, &mut normal, &mut zero, false).unwrap();
        assert_eq!(normal, expect_normal);
        assert_eq!(zero, expect_zero);
        assert!(scan_pages(&mem, &[600], &mut normal, &mut zero, false).is_err());
    }

    #[test]
    fn scan_of_anonymous_memory_leaves_holes_untouched() {
        use crate::backing::Backing;
        let ps = crate::memory::host_page_size();
        let mem = GuestMemory::with_backing(700 * ps, Backing::Anon).unwrap();
        let (mut expect_normal, mut expect_zero) = (Vec::new(), Vec::new());
        for p in 0..700usize {
            let off = p * ps;
            match p % 5 {
                0 => mem.write_bytes(off + ps - 1, &[1]).unwrap(),
                1 => mem.write_bytes(off, &[0]).unwrap(), // present, all zeros
                _ => {}                                   // holes
            }
            if p % 5 == 0 {
                expect_normal.push(off as u64);
            } else {
                expect_zero.push(off as u64);
            }
        }
        // Out of order, as a packet may list them.
        let pages: Vec<u64> = (0..700).rev().collect();
        let (mut normal, mut zero) = (Vec::new(), Vec::new());
        scan_pages(&mem, &pages, &mut normal, &mut zero, false).unwrap();
        expect_normal.reverse();
        expect_zero.reverse();
        assert_eq!(normal, expect_normal);
        assert_eq!(zero, expect_zero);
        // The holes were classified without a read: still absent.
        assert!(mem.is_hole(2 * ps, 5 * ps));
    }

    /// Under dirty tracking the holes hold write-protect markers: still
    /// holes, and a page written after the harvest is data.
    #[test]
    fn scan_under_tracking_reads_markers_as_holes() {
        use crate::backing::Backing;
        use crate::tracker::{Backend, DirtyTracker};
        let ps = crate::memory::host_page_size();
        let mem = Arc::new(GuestMemory::with_backing(64 * ps, Backing::Anon).unwrap());
        let Ok(tracker) = DirtyTracker::new(mem.clone(), Backend::Uffd) else {
            eprintln!("skipping: userfaultfd write-protect tracking is unavailable");
            return;
        };
        mem.write_bytes(3 * ps, &[9]).unwrap();
        tracker.sync().unwrap(); // write-protects, leaving markers in the holes
        mem.write_bytes(5 * ps + 7, &[9]).unwrap();
        let pages: Vec<u64> = (0..64).collect();
        let (mut normal, mut zero) = (Vec::new(), Vec::new());
        scan_pages(&mem, &pages, &mut normal, &mut zero, false).unwrap();
        assert_eq!(normal, vec![3 * ps as u64, 5 * ps as u64]);
        assert_eq!(zero.len(), 62);
        let holes = mem.anon_holes(0, 64).unwrap();
        assert!(holes[10] && !holes[3] && !holes[5], "holes: {holes:?}");
        tracker.close();
    }

    #[test]
    fn a_sparse_packet_reads_its_pages_instead_of_its_span() {
        use crate::backing::Backing;
        let ps = crate::memory::host_page_size();
        let mem = GuestMemory::with_backing(4096 * ps, Backing::Anon).unwrap();
        mem.write_bytes(7 * ps, &[1]).unwrap();
        mem.write_bytes(4000 * ps + 9, &[2]).unwrap();
        // Two written pages and one hole, 4000 pages apart: no span query,
        // each page classified by reading it.
        let pages = [7u64, 2000, 4000];
        let (mut normal, mut zero) = (Vec::new(), Vec::new());
        scan_pages(&mem, &pages, &mut normal, &mut zero, false).unwrap();
        assert_eq!(normal, vec![7 * ps as u64, 4000 * ps as u64]);
        assert_eq!(zero, vec![2000 * ps as u64]);
    }
}
