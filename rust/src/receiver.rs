//! The receiver: N channel threads that validate every record completely
//! (header bounds, CRC, record order, generation, offsets, decompressed
//! size) before touching destination memory, then copy or zero-fill pages.
//!
//! Ordering across channels: a page may travel in generation k on channel A
//! and again in generation k+1 on channel B. Each channel applies its own
//! records in order, and a sync record is a barrier: no channel passes
//! sync(k) until every channel has reached it, and the sender never sends
//! generation k+1 pages before sync(k). So the k+1 copy is applied last.
//!
//! The end digest is computed while pages arrive (see [`Verify`]), so for a
//! single pass in address order `wait_end` has only the tail left to hash.
//!
//! Memory beyond the destination: per channel one wire buffer and (only
//! with compression) one decompression buffer of a packet each, a one-bit
//! per page "may hold data" map, and device chunks bounded in total by
//! [`ReceiverConfig::device_buffer`].

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{CoreError, CoreResult};
use crate::memory::{GuestMemory, SparseDigest};
use crate::transport::{self, Conn, ControlLink, Listener, ReadFailure};
use crate::wire::{
    self, ChannelKind, Compression, FileLayout, FileState, RecordHeader, RecordKind, StreamHeader,
    DIGEST_LEN, FILE_STATE_LEN, RECORD_HEADER_LEN, STREAM_HEADER_LEN,
};

#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Longest wait for a peer's next bytes before the channel fails.
    pub io_timeout: Duration,
    /// Cap on device-state bytes received but not yet drained.
    pub device_buffer: usize,
    /// Mutual TLS on every channel.
    pub tls: Option<Arc<transport::TlsConfig>>,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            io_timeout: Duration::from_secs(60),
            device_buffer: 32 << 20,
            tls: None,
        }
    }
}

/// One device-state record as it arrived.
pub type DeviceRecord = (String, u64, Vec<u8>, bool);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A copy of a stored error (CoreError holds an io::Error, not Clone).
fn clone_error(e: &CoreError) -> CoreError {
    match e {
        CoreError::Invalid(m) => CoreError::Invalid(m.clone()),
        CoreError::Unsupported(m) => CoreError::Unsupported(m.clone()),
        CoreError::Protocol {
            channel,
            packet,
            msg,
        } => CoreError::Protocol {
            channel: *channel,
            packet: *packet,
            msg: msg.clone(),
        },
        CoreError::Io { context, source } => CoreError::Io {
            context: context.clone(),
            source: match source.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(source.kind(), source.to_string()),
            },
        },
    }
}

#[derive(Default)]
struct Barrier {
    waiting: Option<u64>,
    arrived: usize,
    passed: Option<u64>,
}

#[derive(Default)]
struct Done {
    running: usize,
    digests: Vec<(u32, u128)>,
}

#[derive(Default)]
struct Devices {
    queue: VecDeque<DeviceRecord>,
    bytes: usize,
}

#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    normal: AtomicU64,
    zero: AtomicU64,
    zero_filled: AtomicU64,
    syncs: AtomicU64,
    /// Live PAGE payloads that differ from what the sender read.
    live_rewritten: AtomicU64,
    device_records: AtomicU64,
    device_bytes: AtomicU64,
}

struct Shared {
    mem: Arc<GuestMemory>,
    stream: StreamHeader,
    /// Channels that take part in sync barriers.
    channels: usize,
    cfg: ReceiverConfig,
    abort: AtomicBool,
    error: Mutex<Option<CoreError>>,
    barrier: Mutex<Barrier>,
    barrier_cv: Condvar,
    done: Mutex<Done>,
    done_cv: Condvar,
    devices: Mutex<Devices>,
    devices_cv: Condvar,
    controls: Mutex<VecDeque<Vec<u8>>>,
    controls_cv: Condvar,
    /// Pages that may hold non-zero bytes: a zero page elsewhere needs no
    /// write (and no allocation) on a fresh destination.
    maybe_data: Vec<AtomicU64>,
    counters: Counters,
    channel_packets: Vec<AtomicU64>,
    verify: Verify,
}

/// The end digest, computed while pages arrive: a thread hashes memory
/// front to back up to the pages every channel has passed (streams send
/// pages in address order within a pass). A write below the hashed prefix
/// afterwards (a page sent again in a later generation, or a stream out of
/// order) marks the running digest stale and `wait_end` starts over, so
/// the result never depends on that guess.
struct Verify {
    digest: Mutex<SparseDigest>,
    /// Pages below this are hashed (or being hashed).
    hashed: AtomicUsize,
    stale: AtomicBool,
    stop: AtomicBool,
    /// Per channel: one past the highest page it applied; `usize::MAX` once
    /// it can apply no more.
    progress: Vec<AtomicUsize>,
}

impl Verify {
    fn new(channels: usize) -> Self {
        Verify {
            digest: Mutex::new(SparseDigest::default()),
            hashed: AtomicUsize::new(0),
            stale: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            progress: (0..channels).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    fn done(&self, channel: u32) {
        if let Some(p) = self.progress.get(channel as usize) {
            p.store(usize::MAX, Ordering::Release);
        }
    }
}

const POLL: Duration = Duration::from_millis(100);

impl Shared {
    fn fail(&self, e: CoreError) {
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(e);
        }
        drop(slot);
        self.abort.store(true, Ordering::SeqCst);
        self.barrier_cv.notify_all();
        self.devices_cv.notify_all();
        self.controls_cv.notify_all();
    }

    fn first_error(&self) -> Option<CoreError> {
        lock(&self.error).as_ref().map(clone_error)
    }

    fn check_abort(&self, channel: u32, packet: u64) -> CoreResult<()> {
        if self.abort.load(Ordering::SeqCst) {
            return Err(CoreError::Protocol {
                channel,
                packet,
                msg: "receive aborted".into(),
            });
        }
        Ok(())
    }

    fn barrier(&self, channel: u32, packet: u64, generation: u64) -> CoreResult<()> {
        let mut b = lock(&self.barrier);
        match b.waiting {
            None => {
                b.waiting = Some(generation);
                b.arrived = 1;
            }
            Some(w) if w == generation => b.arrived += 1,
            Some(w) => {
                return Err(CoreError::Protocol {
                    channel,
                    packet,
                    msg: format!("sync({generation}) while other channels are at sync({w})"),
                })
            }
        }
        if b.arrived == self.channels {
            b.passed = Some(generation);
            b.waiting = None;
            b.arrived = 0;
            self.barrier_cv.notify_all();
            return Ok(());
        }
        // No deadline here: a channel that stalls fails on its own socket
        // timeout and aborts everyone.
        while b.passed.is_none_or(|p| p < generation) {
            self.check_abort(channel, packet)?;
            b = self
                .barrier_cv
                .wait_timeout(b, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Reserves room for a device chunk of `len` bytes before it is read,
    /// waiting while the undrained total would exceed the cap: device state
    /// never holds more than `device_buffer` bytes of memory.
    fn reserve_device(&self, channel: u32, packet: u64, len: usize) -> CoreResult<()> {
        let cap = self.cfg.device_buffer;
        if len > cap {
            return Err(CoreError::Protocol {
                channel,
                packet,
                msg: format!("device-state chunk of {len} bytes exceeds the buffer of {cap}"),
            });
        }
        let deadline = Instant::now() + self.cfg.io_timeout;
        let mut d = lock(&self.devices);
        while d.bytes + len > cap {
            self.check_abort(channel, packet)?;
            if Instant::now() >= deadline {
                return Err(transport::timeout_error(format!(
                    "channel {channel}, packet {packet}: device-state buffer of {cap} bytes \
                     stayed full for {:?}; drain it with device_records()",
                    self.cfg.io_timeout
                )));
            }
            d = self
                .devices_cv
                .wait_timeout(d, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        d.bytes += len;
        Ok(())
    }

    fn release_device(&self, len: usize) {
        lock(&self.devices).bytes -= len;
        self.devices_cv.notify_all();
    }

    /// Queues a record whose room `reserve_device` reserved.
    fn push_device(&self, rec: DeviceRecord) {
        let len = rec.2.len() as u64;
        lock(&self.devices).queue.push_back(rec);
        self.counters.device_records.fetch_add(1, Ordering::Relaxed);
        self.counters.device_bytes.fetch_add(len, Ordering::Relaxed);
    }

    fn mark_data(&self, page: u64) {
        self.maybe_data[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    fn may_have_data(&self, page: u64) -> bool {
        self.maybe_data[(page / 64) as usize].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }

    /// The one place pages enter destination memory. Offsets were checked
    /// by `wire::parse_pages`; `data` holds exactly one page per offset.
    fn apply(&self, channel: u32, normal: &[u64], zero: &[u64], data: &[u8]) -> CoreResult<()> {
        let ps = self.stream.page_size as usize;
        let mut lowest = normal.iter().min().copied();
        debug_assert_eq!(data.len(), normal.len() * ps);
        // Runs of adjacent pages, alike in whether they may hold data, are
        // stored with one write each: pages that do are populated and are
        // copied through the mapping (no syscall); holes get `pwrite`, which
        // allocates and fills them without a page fault or zeroing first.
        let mut i = 0;
        while i < normal.len() {
            let populated = self.may_have_data(normal[i] / ps as u64);
            let mut j = i + 1;
            while j < normal.len()
                && normal[j] == normal[j - 1] + ps as u64
                && self.may_have_data(normal[j] / ps as u64) == populated
            {
                j += 1;
            }
            let (off, bytes) = (normal[i] as usize, &data[i * ps..j * ps]);
            if populated {
                self.mem.write_bytes(off, bytes)?;
            } else {
                self.mem.store_bytes(off, bytes)?;
            }
            for &off in &normal[i..j] {
                self.mark_data(off / ps as u64);
            }
            i = j;
        }
        for &off in zero {
            if self.may_have_data(off / ps as u64) {
                self.mem.zero_bytes(off as usize, ps)?;
                lowest = lowest.min(Some(off)).or(Some(off));
                self.counters.zero_filled.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.counters
            .normal
            .fetch_add(normal.len() as u64, Ordering::Relaxed);
        self.counters
            .zero
            .fetch_add(zero.len() as u64, Ordering::Relaxed);
        let v = &self.verify;
        if let Some(lowest) = lowest {
            // Pairs with the store of `hashed` before the hashing thread
            // reads: either it read these bytes, or this sees its claim.
            std::sync::atomic::fence(Ordering::SeqCst);
            if (lowest / ps as u64) < v.hashed.load(Ordering::SeqCst) as u64 {
                v.stale.store(true, Ordering::Relaxed);
            }
        }
        if let (Some(p), Some(&top)) = (
            v.progress.get(channel as usize),
            normal.iter().chain(zero).max(),
        ) {
            p.fetch_max(top as usize / ps + 1, Ordering::Release);
        }
        Ok(())
    }

    /// The digest thread: hashes in 1 MiB steps what every channel has
    /// passed, until stopped or stale.
    fn run_verify(&self) {
        let step = (1 << 20) / self.mem.page_size();
        let v = &self.verify;
        // Polls while nothing new arrives, backing off to 20 ms (a
        // throttled stream may crawl for minutes).
        let mut idle = 0;
        loop {
            let frontier = v
                .progress
                .iter()
                .map(|p| p.load(Ordering::Acquire))
                .min()
                .unwrap_or(0);
            let mut d = lock(&v.digest);
            if v.stop.load(Ordering::SeqCst)
                || v.stale.load(Ordering::Relaxed)
                || self.abort.load(Ordering::Relaxed)
                || d.next_page() >= self.mem.num_pages()
            {
                return;
            }
            let end = frontier.min(d.next_page() + step).min(self.mem.num_pages());
            if end <= d.next_page() {
                drop(d);
                idle = (idle + 1).min(20);
                std::thread::sleep(Duration::from_millis(idle));
                continue;
            }
            idle = 0;
            v.hashed.store(end, Ordering::SeqCst);
            d.advance(&self.mem, end, |p| self.may_have_data(p as u64));
        }
    }
}

/// Which records a stream may carry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamRole {
    /// A data channel: pages, device state, syncs, end.
    Data,
    /// A snapshot's record log: device state, control messages, end.
    Log,
}

/// A channel's reading loop: every record is read in full and validated
/// before anything is applied. Returns at the end record.
fn run_channel(sh: &Shared, idx: u32, role: StreamRole, r: &mut dyn Read) -> CoreResult<()> {
    let st = &sh.stream;
    let ps = st.page_size as usize;
    let mut body = vec![
        0u8;
        if role == StreamRole::Data {
            st.max_pages_body()
        } else {
            0
        }
    ];
    let mut plain: Vec<u8> = Vec::new();
    let mut zstd: Option<zstd::bulk::Decompressor<'static>> = None;
    let mut expect = 0u64;
    let mut synced: Option<u64> = None;
    let mut current: Option<u64> = None;
    let perr = |packet: u64, msg: String| CoreError::Protocol {
        channel: idx,
        packet,
        msg,
    };
    let read_err = |packet: u64, what: &str, f: ReadFailure| match f {
        ReadFailure::Stalled => transport::timeout_error(format!(
            "channel {idx}, packet {packet}: {what}: stalled peer, no data for {:?}",
            sh.cfg.io_timeout
        )),
        f => perr(packet, format!("{what}: {f}")),
    };
    loop {
        sh.check_abort(idx, expect)?;
        let mut raw = [0u8; RECORD_HEADER_LEN];
        transport::read_full(r, &mut raw).map_err(|f| read_err(expect, "record header", f))?;
        let h = RecordHeader::decode(&raw, st).map_err(|m| perr(expect, m))?;
        if h.number != expect {
            return Err(perr(
                expect,
                format!("record number {} where {expect} was expected", h.number),
            ));
        }
        let len = h.body_len as usize;
        let allowed = matches!(
            (role, h.kind),
            (
                StreamRole::Data,
                RecordKind::Pages { .. } | RecordKind::Sync
            ) | (StreamRole::Log, RecordKind::Control)
                | (_, RecordKind::Device { .. } | RecordKind::End)
        );
        if !allowed {
            return Err(perr(
                expect,
                format!("record {:?} is not allowed on this stream", h.kind),
            ));
        }
        match h.kind {
            RecordKind::Pages {
                compression,
                normal,
                zero,
                ..
            } => {
                let body = &mut body[..len];
                transport::read_full(r, body).map_err(|f| read_err(expect, "PAGE body", f))?;
                let offsets = (normal + zero) as usize * 8;
                // A live payload that differs from what the sender read was
                // rewritten during the send: applied, counted, and resent in
                // a later generation; the end digest settles the memory.
                if !h
                    .verify_pages(&raw, body, offsets)
                    .map_err(|m| perr(expect, m))?
                {
                    sh.counters.live_rewritten.fetch_add(1, Ordering::Relaxed);
                }
                let g = h.generation;
                if let Some(s) = synced.filter(|&s| g <= s) {
                    return Err(perr(
                        expect,
                        format!("generation {g} pages after sync({s}) closed it"),
                    ));
                }
                if let Some(c) = current.filter(|&c| c != g) {
                    return Err(perr(
                        expect,
                        format!("generation {g} pages before sync({c}) on this channel"),
                    ));
                }
                let pages =
                    wire::parse_pages(normal, zero, body, st).map_err(|m| perr(expect, m))?;
                let raw_len = normal as usize * ps;
                let data: &[u8] = match compression {
                    Compression::None => pages.payload,
                    c => {
                        if plain.is_empty() {
                            plain = vec![0u8; st.packet_pages as usize * ps];
                        }
                        let out = &mut plain[..raw_len];
                        let n = match c {
                            Compression::Zstd => {
                                let z = match &mut zstd {
                                    Some(z) => z,
                                    None => zstd.insert(
                                        zstd::bulk::Decompressor::new()
                                            .map_err(|e| CoreError::io("zstd decompressor", e))?,
                                    ),
                                };
                                z.decompress_to_buffer(pages.payload, out)
                                    .map_err(|e| e.to_string())
                            }
                            _ => lz4_flex::block::decompress_into(pages.payload, out)
                                .map_err(|e| e.to_string()),
                        }
                        .map_err(|m| perr(expect, format!("{} payload: {m}", c.name())))?;
                        if n != raw_len {
                            return Err(perr(
                                expect,
                                format!("payload decompresses to {n} bytes, not {raw_len}"),
                            ));
                        }
                        &plain[..raw_len]
                    }
                };
                current = Some(g);
                sh.apply(idx, &pages.normal, &pages.zero, data)?;
            }
            RecordKind::Device { seq, id_len, last } => {
                // Bounded by MAX_DEVICE_CHUNK in decode, and by the device
                // buffer's free room before it is allocated.
                let chunk_len = len - id_len as usize;
                sh.reserve_device(idx, expect, chunk_len)?;
                let mut buf = vec![0u8; len];
                let parsed = transport::read_full(r, &mut buf)
                    .map_err(|f| read_err(expect, "DEVS body", f))
                    .and_then(|()| h.verify_crc(&raw, &buf).map_err(|m| perr(expect, m)))
                    .and_then(|()| {
                        let chunk = buf.split_off(id_len as usize);
                        String::from_utf8(buf)
                            .map(|id| (id, chunk))
                            .map_err(|_| perr(expect, "device id is not UTF-8".into()))
                    });
                match parsed {
                    Ok((id, chunk)) => sh.push_device((id, seq, chunk, last)),
                    Err(e) => {
                        sh.release_device(chunk_len);
                        return Err(e);
                    }
                }
            }
            RecordKind::Sync => {
                h.verify_crc(&raw, &[]).map_err(|m| perr(expect, m))?;
                let g = h.generation;
                if current.is_some_and(|c| g < c) || synced.is_some_and(|s| g <= s) {
                    return Err(perr(
                        expect,
                        format!("sync({g}) goes backwards (pages {current:?}, synced {synced:?})"),
                    ));
                }
                sh.barrier(idx, expect, g)?;
                sh.counters.syncs.fetch_add(1, Ordering::Relaxed);
                synced = Some(g);
                current = None;
            }
            RecordKind::Control => {
                let mut buf = vec![0u8; len];
                transport::read_full(r, &mut buf).map_err(|f| read_err(expect, "CTRL body", f))?;
                h.verify_crc(&raw, &buf).map_err(|m| perr(expect, m))?;
                lock(&sh.controls).push_back(buf);
                sh.controls_cv.notify_all();
            }
            RecordKind::End => {
                let mut d = [0u8; DIGEST_LEN];
                transport::read_full(r, &mut d).map_err(|f| read_err(expect, "END body", f))?;
                h.verify_crc(&raw, &d).map_err(|m| perr(expect, m))?;
                lock(&sh.done).digests.push((idx, u128::from_le_bytes(d)));
                if role == StreamRole::Data {
                    sh.verify.done(idx);
                }
                account(sh, idx, RECORD_HEADER_LEN + len);
                return Ok(());
            }
        }
        account(sh, idx, RECORD_HEADER_LEN + len);
        expect += 1;
    }
}

fn account(sh: &Shared, idx: u32, bytes: usize) {
    sh.counters.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    if let Some(c) = sh.channel_packets.get(idx as usize) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Pages that may already hold data: the memfd's data extents (holes read
/// as zero). On any doubt every page counts as possibly non-zero.
fn data_extents(mem: &GuestMemory) -> Vec<AtomicU64> {
    let n = mem.num_pages() as u64;
    let ps = mem.page_size() as u64;
    let words: Vec<AtomicU64> = (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
    let set = |from: u64, to: u64| {
        for p in from / ps..to.div_ceil(ps).min(n) {
            words[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
    };
    let len = mem.len() as u64;
    let mut off = 0u64;
    while off < len {
        use rustix::fs::{seek, SeekFrom};
        match seek(mem.as_fd(), SeekFrom::Data(off)) {
            Ok(start) => {
                let end = seek(mem.as_fd(), SeekFrom::Hole(start)).unwrap_or(len);
                set(start, end.max(start + 1));
                off = end.max(start + 1);
            }
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => {
                set(0, len);
                break;
            }
        }
    }
    words
}

enum ControlSide {
    Link(ControlLink),
    /// A snapshot: control messages come from its record log.
    Log,
}

pub struct Receiver {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    verifier: Mutex<Option<JoinHandle<()>>>,
    thread_count: usize,
    control: ControlSide,
    sockets: Vec<Conn>,
    refused: Vec<String>,
    started: Instant,
}

#[derive(Clone, Debug)]
pub struct ReceiverStats {
    pub bytes: u64,
    pub normal: u64,
    pub zero_pages: u64,
    pub zero_filled: u64,
    pub syncs: u64,
    pub live_rewritten: u64,
    pub device_records: u64,
    pub device_bytes: u64,
    pub channel_packets: Vec<u64>,
    pub refused: Vec<String>,
    pub failure: Option<String>,
    pub elapsed: f64,
}

#[derive(Clone, Debug)]
pub struct EndInfo {
    pub digest: u128,
    pub channels: usize,
    pub generation_syncs: u64,
    /// Time spent computing the destination digest.
    pub verify_seconds: f64,
}

fn check_geometry(mem: &GuestMemory, h: &StreamHeader) -> CoreResult<()> {
    if h.page_size as usize != mem.page_size() || h.memory_size != mem.len() as u64 {
        return Err(CoreError::Protocol {
            channel: h.channel_index as u32,
            packet: 0,
            msg: format!(
                "stream header: source has {} bytes in pages of {}, destination {} in pages of {}",
                h.memory_size,
                h.page_size,
                mem.len(),
                mem.page_size()
            ),
        });
    }
    Ok(())
}

impl Receiver {
    fn new_shared(
        mem: Arc<GuestMemory>,
        stream: StreamHeader,
        channels: usize,
        cfg: ReceiverConfig,
    ) -> Arc<Shared> {
        let verify = Verify::new(stream.channel_count as usize);
        Arc::new(Shared {
            maybe_data: data_extents(&mem),
            mem,
            channel_packets: (0..stream.channel_count)
                .map(|_| AtomicU64::new(0))
                .collect(),
            stream,
            channels,
            cfg,
            abort: AtomicBool::new(false),
            error: Mutex::new(None),
            barrier: Mutex::new(Barrier::default()),
            barrier_cv: Condvar::new(),
            done: Mutex::new(Done::default()),
            done_cv: Condvar::new(),
            devices: Mutex::new(Devices::default()),
            devices_cv: Condvar::new(),
            controls: Mutex::new(VecDeque::new()),
            controls_cv: Condvar::new(),
            counters: Counters::default(),
            verify,
        })
    }

    fn spawn(
        sh: &Arc<Shared>,
        name: String,
        work: impl FnOnce(&Shared) -> CoreResult<()> + Send + 'static,
    ) -> CoreResult<JoinHandle<()>> {
        lock(&sh.done).running += 1;
        let sh2 = sh.clone();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Err(e) = work(&sh2) {
                    sh2.fail(e);
                }
                lock(&sh2.done).running -= 1;
                sh2.done_cv.notify_all();
            })
            .map_err(|e| {
                lock(&sh.done).running -= 1;
                CoreError::io("spawn receiver thread", e)
            })
    }

    fn with_threads(shared: Arc<Shared>, threads: Vec<JoinHandle<()>>) -> Self {
        let sh = shared.clone();
        // Without this thread the digest is simply computed in wait_end.
        let verifier = std::thread::Builder::new()
            .name("mig-verify".into())
            .spawn(move || sh.run_verify())
            .ok();
        Receiver {
            verifier: Mutex::new(verifier),
            shared,
            thread_count: threads.len(),
            threads: Mutex::new(threads),
            control: ControlSide::Log,
            sockets: Vec::new(),
            refused: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Starts receiving on already-validated streams; used by `accept` and
    /// by tests that feed channels directly.
    pub fn start(
        mem: Arc<GuestMemory>,
        stream: StreamHeader,
        streams: Vec<Box<dyn Read + Send>>,
        cfg: ReceiverConfig,
    ) -> CoreResult<Self> {
        check_geometry(&mem, &stream)?;
        let sh = Self::new_shared(mem, stream, streams.len(), cfg);
        let mut threads = Vec::new();
        for (i, mut s) in streams.into_iter().enumerate() {
            threads.push(Self::spawn(&sh, format!("mig-recv-{i}"), move |sh| {
                run_channel(sh, i as u32, StreamRole::Data, &mut *s)
            })?);
        }
        Ok(Self::with_threads(sh, threads))
    }

    /// Waits for a session on `listener` and starts applying it to `mem`.
    pub fn accept(
        listener: &Listener,
        mem: Arc<GuestMemory>,
        timeout: Duration,
        cfg: ReceiverConfig,
    ) -> CoreResult<Self> {
        if let Listener::File(path) = listener {
            return Self::restore(path, mem, cfg);
        }
        let session = listener.accept_session(timeout, cfg.io_timeout, cfg.tls.as_deref())?;
        let mut sockets = Vec::new();
        let mut streams: Vec<Box<dyn Read + Send>> = Vec::new();
        for c in session.data {
            sockets.push(
                c.try_clone()
                    .map_err(|e| CoreError::io("clone socket", e))?,
            );
            streams.push(Box::new(c));
        }
        let mut r = Self::start(mem, session.header, streams, cfg)?;
        r.control = ControlSide::Link(ControlLink::new(session.control)?);
        r.sockets = sockets;
        r.refused = session.refused;
        Ok(r)
    }

    /// Restores a `file:` snapshot: pages are read from their fixed offsets
    /// by N threads (random access, no replay) and applied through the same
    /// validation; the record log is parsed like a channel.
    fn restore(
        path: &std::path::Path,
        mem: Arc<GuestMemory>,
        cfg: ReceiverConfig,
    ) -> CoreResult<Self> {
        let io = |what: &str, e| CoreError::io(format!("snapshot {}: {what}", path.display()), e);
        let file = File::open(path).map_err(|e| io("open", e))?;
        let perr = |msg: String| CoreError::Protocol {
            channel: 0,
            packet: 0,
            msg: format!("snapshot {}: {msg}", path.display()),
        };
        let file_len = file.metadata().map_err(|e| io("stat", e))?.len();
        let mut raw = [0u8; STREAM_HEADER_LEN];
        file.read_exact_at(&mut raw, 0)
            .map_err(|_| perr("truncated stream header".into()))?;
        let header = StreamHeader::decode(&raw).map_err(perr)?;
        if header.kind != ChannelKind::File {
            return Err(perr("not a snapshot file (channel kind)".into()));
        }
        check_geometry(&mem, &header)?;
        let mut st = [0u8; FILE_STATE_LEN];
        file.read_exact_at(&mut st, wire::FILE_STATE_OFFSET)
            .map_err(|_| perr("truncated completion block".into()))?;
        let state = FileState::decode(&st).map_err(perr)?;
        let layout = FileLayout::new(header.memory_size, header.page_size);
        let log_end = layout.log_offset.checked_add(state.log_len);
        if log_end.is_none_or(|end| end > file_len) {
            return Err(perr(format!(
                "truncated stream: file has {file_len} bytes, record log claims to end at {}",
                layout.log_offset.saturating_add(state.log_len)
            )));
        }
        // The bitmap's size follows from the destination's geometry, which
        // the header was just checked against.
        let mut bitmap = vec![0u8; layout.bitmap_len as usize];
        file.read_exact_at(&mut bitmap, layout.bitmap_offset)
            .map_err(|_| perr("truncated presence bitmap".into()))?;
        if crc32c::crc32c(&bitmap) != state.bitmap_crc {
            return Err(perr("presence bitmap: CRC mismatch".into()));
        }
        let words: Vec<u64> = bitmap
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect();
        let present = crate::bitmap::DirtyBitmap::from_words(words, mem.num_pages())
            .map_err(|e| perr(format!("presence bitmap: {e}")))?;
        let present = Arc::new(present);
        let file = Arc::new(file);
        let n = header.channel_count as usize;
        // Page threads do not take part in barriers: a snapshot holds one
        // copy of each page.
        let sh = Self::new_shared(mem, header.clone(), 0, cfg);
        let mut threads = Vec::new();
        let pages = sh.mem.num_pages();
        let stripe = pages.div_ceil(n).div_ceil(64) * 64;
        for i in 0..n {
            let (file, present) = (file.clone(), present.clone());
            let range = (i * stripe).min(pages)..((i + 1) * stripe).min(pages);
            threads.push(Self::spawn(&sh, format!("mig-restore-{i}"), move |sh| {
                restore_pages(sh, i as u32, &file, &present, layout.pages_offset, range)
            })?);
        }
        let log = (*file).try_clone().map_err(|e| io("reopen", e))?;
        let log_offset = layout.log_offset;
        let log_len = state.log_len;
        threads.push(Self::spawn(&sh, "mig-restore-log".into(), move |sh| {
            let mut r = BufReader::new(OffsetReader {
                file: log,
                pos: log_offset,
                end: log_offset + log_len,
            });
            run_channel(sh, 0, StreamRole::Log, &mut r)
        })?);
        Ok(Self::with_threads(sh, threads))
    }

    pub fn migration_id(&self) -> u128 {
        self.shared.stream.migration_id
    }

    pub fn channels(&self) -> usize {
        self.shared.stream.channel_count as usize
    }

    /// Waits for every channel's end record, then checks that they agree and
    /// that the destination memory has the source's digest.
    pub fn wait_end(&self, timeout: Duration) -> CoreResult<EndInfo> {
        let deadline = Instant::now() + timeout;
        let mut d = lock(&self.shared.done);
        while d.running > 0 {
            if let Some(e) = self.shared.first_error() {
                return Err(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(transport::timeout_error(format!(
                    "end of stream not reached within {timeout:?}: {} of {} channel threads \
                     still receiving",
                    d.running, self.thread_count
                )));
            }
            d = self
                .shared
                .done_cv
                .wait_timeout(d, left.min(POLL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if let Some(e) = self.shared.first_error() {
            return Err(e);
        }
        let digests = d.digests.clone();
        drop(d);
        let Some(&(_, source)) = digests.first() else {
            return Err(CoreError::Protocol {
                channel: 0,
                packet: 0,
                msg: "stream ended without an end record".into(),
            });
        };
        if let Some(&(ch, other)) = digests.iter().find(|(_, x)| *x != source) {
            return Err(CoreError::Protocol {
                channel: ch,
                packet: self.shared.channel_packets[ch as usize].load(Ordering::Relaxed),
                msg: format!("end records disagree: digest {other:032x} vs {source:032x}"),
            });
        }
        // Only the channels write destination memory while it is received,
        // so pages outside `maybe_data` are still holes (zeros).
        let verify = Instant::now();
        let sh = &self.shared;
        sh.verify.stop.store(true, Ordering::SeqCst);
        let dest = {
            let running = std::mem::take(&mut *lock(&sh.verify.digest));
            let may_hold_data = |p: usize| sh.may_have_data(p as u64);
            if sh.verify.stale.load(Ordering::SeqCst) {
                sh.mem.digest_sparse(may_hold_data)
            } else {
                running.finish(&sh.mem, may_hold_data)
            }
        };
        let verify_seconds = verify.elapsed().as_secs_f64();
        if dest != source {
            return Err(CoreError::Protocol {
                channel: 0,
                packet: self.shared.channel_packets[0].load(Ordering::Relaxed),
                msg: format!(
                    "memory digest mismatch: source {source:032x}, destination {dest:032x}"
                ),
            });
        }
        Ok(EndInfo {
            digest: dest,
            channels: digests.len(),
            generation_syncs: self.shared.counters.syncs.load(Ordering::Relaxed),
            verify_seconds,
        })
    }

    /// Takes every device-state record received so far.
    pub fn device_records(&self) -> Vec<DeviceRecord> {
        let mut d = lock(&self.shared.devices);
        let out: Vec<DeviceRecord> = d.queue.drain(..).collect();
        d.bytes -= out.iter().map(|r| r.2.len()).sum::<usize>();
        self.shared.devices_cv.notify_all();
        out
    }

    pub fn control_send(&self, payload: &[u8]) -> CoreResult<()> {
        match &self.control {
            ControlSide::Link(c) => c.send(payload),
            ControlSide::Log => Err(CoreError::Unsupported(
                "a file: snapshot is one-way; there is no source to answer".into(),
            )),
        }
    }

    pub fn control_recv(&self, timeout: Duration) -> CoreResult<Option<Vec<u8>>> {
        match &self.control {
            ControlSide::Link(c) => c.recv(timeout),
            ControlSide::Log => {
                let deadline = Instant::now() + timeout;
                let mut q = lock(&self.shared.controls);
                loop {
                    if let Some(m) = q.pop_front() {
                        return Ok(Some(m));
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    q = self
                        .shared
                        .controls_cv
                        .wait_timeout(q, left.min(POLL))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    pub fn stats(&self) -> ReceiverStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReceiverStats {
            bytes: get(&c.bytes),
            normal: get(&c.normal),
            zero_pages: get(&c.zero),
            zero_filled: get(&c.zero_filled),
            syncs: get(&c.syncs),
            live_rewritten: get(&c.live_rewritten),
            device_records: get(&c.device_records),
            device_bytes: get(&c.device_bytes),
            channel_packets: self.shared.channel_packets.iter().map(get).collect(),
            refused: self.refused.clone(),
            failure: self.shared.first_error().map(|e| e.to_string()),
            elapsed: self.started.elapsed().as_secs_f64(),
        }
    }

    pub fn abort(&self) {
        self.shared
            .fail(CoreError::Invalid("receive aborted".into()));
        for s in &self.sockets {
            s.shutdown();
        }
        if let ControlSide::Link(c) = &self.control {
            c.shutdown();
        }
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        self.stop_verifier();
    }

    fn stop_verifier(&self) {
        self.shared.verify.stop.store(true, Ordering::SeqCst);
        if let Some(t) = lock(&self.verifier).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if !lock(&self.threads).is_empty() {
            self.abort();
        }
        self.stop_verifier();
    }
}

/// Reads `[pos, end)` of a file with positioned reads.
struct OffsetReader {
    file: File,
    pos: u64,
    end: u64,
}

impl Read for OffsetReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = (self.end - self.pos).min(buf.len() as u64) as usize;
        let n = self.file.read_at(&mut buf[..left], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Restores pages `range` of a snapshot: runs of present pages are read in
/// packets of at most `packet_pages` and applied; absent pages are zero.
fn restore_pages(
    sh: &Shared,
    idx: u32,
    file: &File,
    present: &crate::bitmap::DirtyBitmap,
    pages_offset: u64,
    range: std::ops::Range<usize>,
) -> CoreResult<()> {
    let ps = sh.stream.page_size as usize;
    let pp = sh.stream.packet_pages as usize;
    let mut buf = vec![0u8; pp * ps];
    let mut normal = Vec::with_capacity(pp);
    let mut zero = Vec::with_capacity(pp);
    let mut packet = 0u64;
    let mut p = range.start;
    while p < range.end {
        sh.check_abort(idx, packet)?;
        normal.clear();
        zero.clear();
        let end = (p + pp).min(range.end);
        // A batch is either a contiguous run of present pages (one read) or
        // absent pages.
        let first = present.get(p);
        while p < end && present.get(p) == first {
            if first {
                normal.push((p * ps) as u64);
            } else {
                zero.push((p * ps) as u64);
            }
            p += 1;
        }
        let data = &mut buf[..normal.len() * ps];
        if let Some(&start) = normal.first() {
            file.read_exact_at(data, pages_offset + start)
                .map_err(|e| CoreError::Protocol {
                    channel: idx,
                    packet,
                    msg: format!("truncated stream: page data at {start:#x}: {e}"),
                })?;
        }
        sh.apply(idx, &normal, &zero, data)?;
        if let Some(c) = sh.channel_packets.get(idx as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        sh.counters
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        packet += 1;
    }
    sh.verify.done(idx);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const PS: usize = 4096;

    fn header(channels: u16) -> StreamHeader {
        StreamHeader {
            kind: ChannelKind::Data,
            page_size: PS as u32,
            packet_pages: 4,
            memory_size: (PS * 16) as u64,
            channel_index: 0,
            channel_count: channels,
            migration_id: 42,
        }
    }

    fn page_record(number: u64, generation: u64, page: u64, fill: u8) -> Vec<u8> {
        let mut body = (page * PS as u64).to_le_bytes().to_vec();
        body.resize(8 + PS, fill);
        RecordHeader::record(
            RecordKind::Pages {
                compression: Compression::None,
                normal: 1,
                zero: 0,
                live_crc: None,
            },
            number,
            generation,
            &body,
        )
    }

    fn sync(number: u64, generation: u64) -> Vec<u8> {
        RecordHeader::record(RecordKind::Sync, number, generation, &[])
    }

    fn end(number: u64, digest: u128) -> Vec<u8> {
        RecordHeader::record(RecordKind::End, number, 0, &digest.to_le_bytes())
    }

    /// Delivers its bytes only after `delay`: a slow channel.
    struct Delayed {
        inner: Cursor<Vec<u8>>,
        delay: Option<Duration>,
    }

    impl Read for Delayed {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if let Some(d) = self.delay.take() {
                std::thread::sleep(d);
            }
            self.inner.read(buf)
        }
    }

    fn channel(records: &[Vec<u8>], delay_ms: u64) -> Box<dyn Read + Send> {
        Box::new(Delayed {
            inner: Cursor::new(records.concat()),
            delay: (delay_ms > 0).then(|| Duration::from_millis(delay_ms)),
        })
    }

    fn expected_digest(fill: u8) -> u128 {
        let m = GuestMemory::new(PS * 16).unwrap();
        m.write_bytes(3 * PS, &[fill; PS]).unwrap();
        m.digest()
    }

    /// Page 3 goes out in generation 1 on channel 0 (content 0xAA) and in
    /// generation 2 on channel 1 (content 0xBB). Channel 0 is held back so
    /// channel 1's newer copy arrives first; the sync barrier must still
    /// make the newer copy win.
    #[test]
    fn newer_generation_wins_when_channels_are_reordered() {
        let mem = Arc::new(GuestMemory::new(PS * 16).unwrap());
        let d = expected_digest(0xBB);
        let ch0 = channel(&[page_record(0, 1, 3, 0xAA), sync(1, 1), end(2, d)], 300);
        let ch1 = channel(&[sync(0, 1), page_record(1, 2, 3, 0xBB), end(2, d)], 0);
        let r =
            Receiver::start(mem.clone(), header(2), vec![ch0, ch1], Default::default()).unwrap();
        let info = r.wait_end(Duration::from_secs(10)).unwrap();
        assert_eq!(info.digest, d);
        let mut page = vec![0u8; PS];
        mem.read_bytes(3 * PS, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0xBB));
    }

    /// The same streams without the sync records: nothing orders the two
    /// copies, so the delayed old copy lands last. This is what the barrier
    /// prevents, and shows the test above can fail.
    #[test]
    fn without_a_sync_the_delayed_old_copy_lands_last() {
        let mem = Arc::new(GuestMemory::new(PS * 16).unwrap());
        let d = expected_digest(0xAA);
        let ch0 = channel(&[page_record(0, 1, 3, 0xAA), end(1, d)], 300);
        let ch1 = channel(&[page_record(0, 2, 3, 0xBB), end(1, d)], 0);
        let r =
            Receiver::start(mem.clone(), header(2), vec![ch0, ch1], Default::default()).unwrap();
        r.wait_end(Duration::from_secs(10)).unwrap();
    }

    /// Delivers `first`, then waits before delivering `rest`.
    struct Paused {
        first: Cursor<Vec<u8>>,
        pause: Duration,
        rest: Cursor<Vec<u8>>,
    }

    impl Read for Paused {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.first.read(buf)? {
                0 => {
                    std::thread::sleep(std::mem::take(&mut self.pause));
                    self.rest.read(buf)
                }
                n => Ok(n),
            }
        }
    }

    /// The digest thread hashes generation 1 while the stream pauses; the
    /// page sent again in generation 2 lies below what it hashed, so the
    /// running digest is dropped and the end check still sees the new page.
    #[test]
    fn a_page_sent_again_below_the_hashed_prefix_still_verifies() {
        let mem = Arc::new(GuestMemory::new(PS * 16).unwrap());
        let d = expected_digest(0xBB);
        let first = [page_record(0, 1, 3, 0xAA), page_record(1, 1, 9, 0)].concat();
        let rest = [sync(2, 1), page_record(3, 2, 3, 0xBB), end(4, d)].concat();
        let ch: Box<dyn Read + Send> = Box::new(Paused {
            first: Cursor::new(first),
            pause: Duration::from_millis(300),
            rest: Cursor::new(rest),
        });
        let r = Receiver::start(mem.clone(), header(1), vec![ch], Default::default()).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        assert!(r.shared.verify.hashed.load(Ordering::SeqCst) > 3);
        assert_eq!(r.wait_end(Duration::from_secs(10)).unwrap().digest, d);
        assert!(r.shared.verify.stale.load(Ordering::SeqCst));
    }

    #[test]
    fn newer_generation_before_its_sync_is_refused() {
        let mem = Arc::new(GuestMemory::new(PS * 16).unwrap());
        let before = mem.digest();
        let ch0 = channel(&[page_record(0, 2, 5, 1), page_record(1, 3, 6, 1)], 0);
        let r = Receiver::start(mem.clone(), header(1), vec![ch0], Default::default()).unwrap();
        let e = r.wait_end(Duration::from_secs(10)).unwrap_err().to_string();
        assert!(
            e.contains("channel 0, packet 1") && e.contains("before sync(2)"),
            "{e}"
        );
        let mut page = vec![0u8; PS];
        mem.read_bytes(6 * PS, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        assert_ne!(mem.digest(), before, "the valid first packet was applied");
    }

    #[test]
    fn mismatched_sync_generations_fail_instead_of_hanging() {
        let mem = Arc::new(GuestMemory::new(PS * 16).unwrap());
        let ch0 = channel(&[sync(0, 1)], 0);
        let ch1 = channel(&[sync(0, 2)], 100);
        let r = Receiver::start(mem, header(2), vec![ch0, ch1], Default::default()).unwrap();
        let e = r.wait_end(Duration::from_secs(10)).unwrap_err().to_string();
        assert!(
            e.contains("sync(2) while other channels are at sync(1)"),
            "{e}"
        );
    }
}
