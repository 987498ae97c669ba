//! The receiver: N channel threads ([`channel`]) that validate every record
//! (header bounds, record order, generation, offsets, CRC, decompressed
//! size) and land its pages in destination memory ([`pages`]: holes straight
//! from the socket, the rest through a bounce buffer, nothing left of a bad
//! record).
//!
//! Ordering across channels: a page may travel in generation k on channel A
//! and again in generation k+1 on channel B. Each channel applies its own
//! records in order, and a sync record is a barrier: no channel passes
//! sync(k) until every channel has reached it, and the sender never sends
//! generation k+1 pages before sync(k). So the k+1 copy is applied last.
//!
//! The end digest is kept current while pages arrive (see [`ChunkDigest`]):
//! every write marks its chunks stale, a background rehasher hashes them
//! once they settle, and `wait_end` rehashes only the chunks still stale.
//!
//! Memory beyond the destination: per channel an offset table, a bounce
//! buffer of a packet's pages (allocated when first needed) and (only with
//! compression) a buffer of a compressed payload, the digest's table (16
//! bytes a chunk, one bit a page of "may hold data"), and device chunks bounded in total by
//! [`ReceiverConfig::device_buffer`].

mod channel;
mod no_peer;
mod pages;
mod snapshot;

use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::chunk_digest::{ChunkDigest, Rehasher, Throttle};
use crate::error::{CoreError, CoreResult};
use crate::memory::GuestMemory;
use crate::transport::{self, Conn, ControlLink, Listener};
use crate::wire::StreamHeader;

use channel::{run_channel, ChannelInput, StreamRole};
use no_peer::NoPeer;

#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Longest wait for a peer's next bytes before the channel fails.
    pub io_timeout: Duration,
    /// Cap on device-state bytes received but not yet drained.
    pub device_buffer: usize,
    /// Mutual TLS on every channel.
    pub tls: Option<Arc<transport::TlsConfig>>,
    /// Byte ranges of memory that may hold data, taken before the memory
    /// was prefaulted (which makes every page look present); the rest is
    /// known to be zeros. `None`: asked of the memory at accept.
    pub data_ranges: Option<Vec<(usize, usize)>>,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            io_timeout: Duration::from_secs(60),
            device_buffer: 32 << 20,
            tls: None,
            data_ranges: None,
        }
    }
}

/// One device-state record as it arrived.
pub type DeviceRecord = (u32, u64, Vec<u8>, bool);

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
    /// The digest of destination memory, marked by every write. It also
    /// knows which pages may hold non-zero bytes: a zero page elsewhere
    /// needs no write (and no allocation) on a fresh destination, and a
    /// normal page there can be received straight from the socket.
    digest: Arc<ChunkDigest>,
    counters: Counters,
    channel_packets: Vec<AtomicU64>,
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

    fn may_have_data(&self, page: u64) -> bool {
        self.digest.may_hold_data(page as usize)
    }

    /// Copies pages whose bytes are in a buffer (a snapshot's) into
    /// destination memory: `data` holds one page per offset of `normal`,
    /// which are validated offsets. Runs of adjacent pages go in one copy.
    fn apply(&self, normal: &[u64], zero: &[u64], data: &[u8]) -> CoreResult<()> {
        let ps = self.stream.page_size as usize;
        debug_assert_eq!(data.len(), normal.len() * ps);
        let mut i = 0;
        while i < normal.len() {
            let mut j = i + 1;
            while j < normal.len() && normal[j] == normal[j - 1] + ps as u64 {
                j += 1;
            }
            self.mem
                .write_bytes(normal[i] as usize, &data[i * ps..j * ps])?;
            i = j;
        }
        self.applied(normal, zero)
    }

    /// Completes a record whose normal pages are in destination memory
    /// (validated offsets): zero-fills its zero pages where memory may hold
    /// data, counts, and marks what changed in the digest, after the writes
    /// (a chunk hashed meanwhile is hashed again).
    fn applied(&self, normal: &[u64], zero: &[u64]) -> CoreResult<()> {
        let ps = self.stream.page_size as usize;
        let mut i = 0;
        while i < normal.len() {
            let mut j = i + 1;
            while j < normal.len() && normal[j] == normal[j - 1] + ps as u64 {
                j += 1;
            }
            self.digest.mark_written(normal[i] as usize / ps, j - i)?;
            i = j;
        }
        for &off in zero {
            if self.may_have_data(off / ps as u64) {
                self.mem.zero_bytes(off as usize, ps)?;
                self.digest.mark_written(off as usize / ps, 1)?;
                self.counters.zero_filled.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Every page of the record is final for its generation now: hash
        // its blocks, and the chunks they touch, while they are in this
        // thread's cache.
        let pages = normal.iter().chain(zero).map(|&off| off as usize / ps);
        self.digest.rehash_covered(pages);
        self.counters
            .normal
            .fetch_add(normal.len() as u64, Ordering::Relaxed);
        self.counters
            .zero
            .fetch_add(zero.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// The destination's end of the control messages: the session's control
/// link, or what stands in for a peer when there is none (a snapshot's
/// record log, see `snapshot.rs`).
trait ControlPort: Send + Sync {
    fn send(&self, payload: &[u8]) -> CoreResult<()>;
    fn recv(&self, timeout: Duration) -> CoreResult<Option<Vec<u8>>>;
    fn shutdown(&self) {}
}

impl ControlPort for ControlLink {
    fn send(&self, payload: &[u8]) -> CoreResult<()> {
        ControlLink::send(self, payload)
    }

    fn recv(&self, timeout: Duration) -> CoreResult<Option<Vec<u8>>> {
        ControlLink::recv(self, timeout)
    }

    fn shutdown(&self) {
        ControlLink::shutdown(self)
    }
}

pub struct Receiver {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    rehasher: Mutex<Option<Rehasher>>,
    thread_count: usize,
    control: Arc<dyn ControlPort>,
    sockets: Vec<Conn>,
    refused: Vec<String>,
    /// The source as the control channel's peer address; None for a file.
    peer: Option<String>,
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
    /// Chunks of the memory digest written since they were last hashed:
    /// what `wait_end` would rehash now.
    pub stale_chunks: usize,
    pub chunk_bytes: usize,
}

/// What `wait_end` does with the source's digest from the end records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndCheck {
    /// Fail unless the destination's root equals it.
    Now,
    /// Only report both roots: the caller compares them later (a source
    /// that sends its digest after the destination resumed).
    Later,
}

#[derive(Clone, Debug)]
pub struct EndInfo {
    pub digest: u128,
    pub channels: usize,
    pub generation_syncs: u64,
    /// The source's digest from the end records.
    pub source_digest: u128,
    /// Time spent rehashing the chunks still stale at the end.
    pub verify_seconds: f64,
    /// Chunks rehashed at the end.
    pub rehashed_chunks: usize,
    /// Bytes of memory read by that rehash (its stale blocks).
    pub rehashed_bytes: usize,
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

/// Data ranges must lie in memory: a range outside it is a caller's error.
pub fn check_data_ranges(mem: &GuestMemory, ranges: &[(usize, usize)]) -> CoreResult<()> {
    match ranges.iter().find(|&&(s, e)| s > e || e > mem.len()) {
        Some((s, e)) => Err(CoreError::invalid(format!(
            "data range [{s}, {e}) is not a range of memory of {} bytes",
            mem.len()
        ))),
        None => Ok(()),
    }
}

impl Receiver {
    fn new_shared(
        mem: Arc<GuestMemory>,
        stream: StreamHeader,
        channels: usize,
        cfg: ReceiverConfig,
    ) -> CoreResult<Arc<Shared>> {
        let digest = match &cfg.data_ranges {
            Some(ranges) => {
                check_data_ranges(&mem, ranges)?;
                ChunkDigest::with_data_ranges(mem.clone(), ranges)?
            }
            None => ChunkDigest::new(mem.clone())?,
        };
        Ok(Arc::new(Shared {
            digest: Arc::new(digest),
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
            counters: Counters::default(),
        }))
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

    fn with_threads(
        shared: Arc<Shared>,
        threads: Vec<JoinHandle<()>>,
        control: Arc<dyn ControlPort>,
    ) -> Self {
        // Without this thread every stale chunk is simply hashed in wait_end.
        let rehasher = Rehasher::start(shared.digest.clone(), Throttle::default()).ok();
        Receiver {
            rehasher: Mutex::new(rehasher),
            shared,
            thread_count: threads.len(),
            threads: Mutex::new(threads),
            control,
            sockets: Vec::new(),
            refused: Vec::new(),
            peer: None,
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
        let inputs = streams.into_iter().map(ChannelInput::buffered).collect();
        Self::start_channels(mem, stream, inputs, cfg)
    }

    fn start_channels(
        mem: Arc<GuestMemory>,
        stream: StreamHeader,
        inputs: Vec<ChannelInput>,
        cfg: ReceiverConfig,
    ) -> CoreResult<Self> {
        check_geometry(&mem, &stream)?;
        let sh = Self::new_shared(mem, stream, inputs.len(), cfg)?;
        let mut threads = Vec::new();
        for (i, mut input) in inputs.into_iter().enumerate() {
            threads.push(Self::spawn(&sh, format!("mig-recv-{i}"), move |sh| {
                run_channel(sh, i as u32, StreamRole::Data, &mut input)
            })?);
        }
        Ok(Self::with_threads(sh, threads, Arc::new(NoPeer::default())))
    }

    /// Waits for a session on `listener` and starts applying it to `mem`;
    /// `on_refused` hears of each connection refused meanwhile.
    pub fn accept(
        listener: &Listener,
        mem: Arc<GuestMemory>,
        timeout: Duration,
        cfg: ReceiverConfig,
        on_refused: Option<&transport::RefusalHook>,
    ) -> CoreResult<Self> {
        if let Listener::File(path) = listener {
            return snapshot::restore(path, mem, cfg);
        }
        let tls = cfg.tls.as_deref();
        let session = listener.accept_session(timeout, cfg.io_timeout, tls, on_refused)?;
        let mut sockets = Vec::new();
        let mut inputs = Vec::new();
        for c in session.data {
            let clone = |e| CoreError::io("clone socket", e);
            sockets.push(c.try_clone().map_err(clone)?);
            inputs.push(ChannelInput {
                direct: c.direct_fd().map_err(clone)?,
                reader: Box::new(c),
            });
        }
        let mut r = Self::start_channels(mem, session.header, inputs, cfg)?;
        r.control = Arc::new(ControlLink::new(session.control)?);
        r.sockets = sockets;
        r.refused = session.refused;
        r.peer = Some(session.peer);
        Ok(r)
    }

    pub fn migration_id(&self) -> u128 {
        self.shared.stream.migration_id
    }

    /// Who sent this session: the control channel's peer address.
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    pub fn channels(&self) -> usize {
        self.shared.stream.channel_count as usize
    }

    /// Waits for every channel's end record, checks that they agree, and
    /// takes the root of destination memory; with [`EndCheck::Now`] also
    /// checks that it equals the source's digest.
    pub fn wait_end(&self, timeout: Duration, check: EndCheck) -> CoreResult<EndInfo> {
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
        // Every channel ended: nothing writes memory any more, and the
        // rest is cheaper hashed here at once than paced in the background.
        if let Some(r) = &*lock(&self.rehasher) {
            r.signal_stop();
        }
        let (dest, rehashed) = self.shared.digest.root_timed();
        if check == EndCheck::Now && dest != source {
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
            source_digest: source,
            channels: digests.len(),
            generation_syncs: self.shared.counters.syncs.load(Ordering::Relaxed),
            verify_seconds: rehashed.seconds,
            rehashed_chunks: rehashed.chunks,
            rehashed_bytes: rehashed.bytes,
        })
    }

    /// Post-copy: the sum of the chunk terms of destination memory without
    /// the chunks in `excluded`, and the chunk size in bytes. Joins the
    /// rehasher first: once those chunks are discarded, a read of them
    /// through the mapping would fault.
    pub fn held_sum(&self, excluded: impl IntoIterator<Item = usize>) -> (u128, usize) {
        self.stop_rehasher();
        let d = &self.shared.digest;
        (d.sum_excluding(excluded), d.chunk_bytes())
    }

    /// The root of destination memory now (rehashing the stale chunks).
    pub fn memory_root(&self) -> u128 {
        self.shared.digest.root()
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
        self.control.send(payload)
    }

    pub fn control_recv(&self, timeout: Duration) -> CoreResult<Option<Vec<u8>>> {
        self.control.recv(timeout)
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
            stale_chunks: self.shared.digest.stale_chunks(),
            chunk_bytes: self.shared.digest.chunk_bytes(),
        }
    }

    pub fn abort(&self) {
        self.shared
            .fail(CoreError::Invalid("receive aborted".into()));
        for s in &self.sockets {
            s.shutdown();
        }
        self.control.shutdown();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        self.stop_rehasher();
    }

    fn stop_rehasher(&self) {
        // Dropping it stops and joins the thread.
        drop(lock(&self.rehasher).take());
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if !lock(&self.threads).is_empty() {
            self.abort();
        }
        self.stop_rehasher();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ChannelKind, Compression, RecordHeader, RecordKind, RECORD_HEADER_LEN};
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
        crate::chunk_digest::digest_frozen(&m, 1)
    }

    fn wait(r: &Receiver) -> CoreResult<EndInfo> {
        r.wait_end(Duration::from_secs(10), EndCheck::Now)
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
        let info = wait(&r).unwrap();
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
        wait(&r).unwrap();
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

    /// The rehasher hashes generation 1 while the stream pauses; the page
    /// sent again in generation 2 lands in a chunk it already hashed, which
    /// is marked stale again and rehashed by the receive path (its one
    /// block), so the end check sees the new page with nothing left to read.
    #[test]
    fn a_page_sent_again_into_a_hashed_chunk_still_verifies() {
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
        assert_eq!(r.stats().stale_chunks, 0, "generation 1 was hashed");
        let end = wait(&r).unwrap();
        assert_eq!((end.digest, end.rehashed_bytes), (d, 0));
    }

    #[test]
    fn mismatched_sync_generations_fail_instead_of_hanging() {
        let mem = Arc::new(GuestMemory::new(PS * 16).unwrap());
        let ch0 = channel(&[sync(0, 1)], 0);
        let ch1 = channel(&[sync(0, 2)], 100);
        let r = Receiver::start(mem, header(2), vec![ch0, ch1], Default::default()).unwrap();
        let e = wait(&r).unwrap_err().to_string();
        assert!(
            e.contains("sync(2) while other channels are at sync(1)"),
            "{e}"
        );
    }

    /// A record of adjacent and scattered pages, each filled with its own
    /// byte.
    fn pages_record(number: u64, generation: u64, pages: &[(u64, u8)]) -> Vec<u8> {
        let mut body: Vec<u8> = pages
            .iter()
            .flat_map(|(p, _)| (p * PS as u64).to_le_bytes())
            .collect();
        for &(_, fill) in pages {
            body.extend(std::iter::repeat_n(fill, PS));
        }
        let kind = RecordKind::Pages {
            compression: Compression::None,
            normal: pages.len() as u32,
            zero: 0,
            live_crc: None,
        };
        RecordHeader::record(kind, number, generation, &body)
    }

    /// Feeds `bytes` through a socket pair and receives with `readv`
    /// straight into memory; returns the outcome of `wait_end`.
    fn receive_direct(mem: &Arc<GuestMemory>, bytes: Vec<u8>) -> CoreResult<EndInfo> {
        receive_direct_stats(mem, bytes).0
    }

    /// `receive_direct`, with the receiver's statistics afterwards.
    fn receive_direct_stats(
        mem: &Arc<GuestMemory>,
        bytes: Vec<u8>,
    ) -> (CoreResult<EndInfo>, ReceiverStats) {
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = tx.write_all(&bytes);
        });
        let mut h = header(1);
        h.packet_pages = 8;
        let input = ChannelInput {
            direct: Some(std::os::fd::AsFd::as_fd(&rx).try_clone_to_owned().unwrap()),
            reader: Box::new(rx),
        };
        let r = match Receiver::start_channels(mem.clone(), h, vec![input], Default::default()) {
            Ok(r) => r,
            Err(e) => panic!("receiver did not start: {e}"),
        };
        let out = wait(&r);
        writer.join().unwrap();
        (out, r.stats())
    }

    /// A live PAGE record (`FLAG_LIVE`): `read` is what the sender read
    /// (its CRC goes in the header), `sent` what went out, each a fill
    /// byte per page of `pages`.
    fn live_record(
        number: u64,
        generation: u64,
        pages: &[u64],
        read: &[u8],
        sent: &[u8],
    ) -> Vec<u8> {
        let offsets: Vec<u8> = pages
            .iter()
            .flat_map(|p| (p * PS as u64).to_le_bytes())
            .collect();
        let payload = |fills: &[u8]| -> Vec<u8> {
            fills
                .iter()
                .flat_map(|&f| std::iter::repeat_n(f, PS))
                .collect()
        };
        let h = RecordHeader {
            kind: RecordKind::Pages {
                compression: Compression::None,
                normal: pages.len() as u32,
                zero: 0,
                live_crc: Some(crc32c::crc32c(&payload(read))),
            },
            number,
            generation,
            body_len: 0,
            crc: 0,
        };
        let mut out = vec![0u8; RECORD_HEADER_LEN];
        h.encode_live_into(&mut out, &offsets, pages.len() * PS);
        out.extend_from_slice(&offsets);
        out.extend_from_slice(&payload(sent));
        out
    }

    /// A live payload the guest rewrote during its send is applied (holes
    /// straight from the socket, a page with data through the bounce
    /// buffer) and counted, not refused; one that matches is not counted.
    #[test]
    fn a_rewritten_live_payload_is_applied_and_counted() {
        let mem = Arc::new(GuestMemory::new(PS * 16).unwrap());
        mem.write_bytes(5 * PS, &[9; PS]).unwrap();
        let want = GuestMemory::new(PS * 16).unwrap();
        for (p, fill) in [(4, 7), (5, 2), (6, 3), (9, 4)] {
            want.write_bytes(p * PS, &[fill; PS]).unwrap();
        }
        let d = crate::chunk_digest::digest_frozen(&want, 1);
        let bytes = [
            live_record(0, 1, &[4, 5, 6], &[1, 2, 3], &[7, 2, 3]),
            live_record(1, 1, &[9], &[4], &[4]),
            end(2, d),
        ]
        .concat();
        let (end, stats) = receive_direct_stats(&mem, bytes);
        assert_eq!(end.unwrap().digest, d);
        assert_eq!(stats.live_rewritten, 1);
        assert_eq!(page(&mem, 4), vec![7; PS]);
        assert_eq!(page(&mem, 5), vec![2; PS]);
    }

    /// A live record's offsets stay under the record CRC: a damaged one is
    /// refused and memory is as it was.
    #[test]
    fn a_live_record_with_damaged_offsets_is_refused() {
        let mem = Arc::new(GuestMemory::new(PS * 16).unwrap());
        mem.write_bytes(5 * PS, &[9; PS]).unwrap();
        let before = mem.digest();
        let mut rec = live_record(0, 1, &[4, 5], &[1, 2], &[1, 2]);
        // Page 4 becomes page 2: still a valid offset, so only the CRC can
        // tell.
        rec[RECORD_HEADER_LEN + 1] ^= 0x60;
        let e = receive_direct(&mem, rec).unwrap_err().to_string();
        assert!(e.contains("CRC mismatch"), "{e}");
        assert_eq!(mem.digest(), before);
    }

    fn page(mem: &GuestMemory, p: usize) -> Vec<u8> {
        let mut out = vec![0u8; PS];
        mem.read_bytes(p * PS, &mut out).unwrap();
        out
    }

    /// Holes take their pages straight from the socket, pages with data
    /// through the bounce buffer, in one record; the result is byte exact.
    #[test]
    fn pages_received_straight_into_memory_are_byte_exact() {
        let mem = Arc::new(GuestMemory::new(PS * 16).unwrap());
        mem.write_bytes(5 * PS, &[9; PS]).unwrap();
        let want = GuestMemory::new(PS * 16).unwrap();
        let pages = [(4, 1), (5, 2), (6, 3), (7, 4), (12, 5), (0, 6)];
        for &(p, fill) in &pages {
            want.write_bytes(p as usize * PS, &[fill; PS]).unwrap();
        }
        let d = crate::chunk_digest::digest_frozen(&want, 1);
        let bytes = [pages_record(0, 1, &pages), end(1, d)].concat();
        assert_eq!(receive_direct(&mem, bytes).unwrap().digest, d);
        for &(p, fill) in &pages {
            assert_eq!(page(&mem, p as usize), vec![fill; PS]);
        }
    }

    /// A bad CRC is found after the pages landed: holes are zero again and
    /// a page that held data keeps it.
    #[test]
    fn a_bad_crc_leaves_memory_as_it_was() {
        let mem = Arc::new(GuestMemory::new(PS * 16).unwrap());
        mem.write_bytes(5 * PS, &[9; PS]).unwrap();
        let before = mem.digest();
        let mut rec = pages_record(0, 1, &[(4, 1), (5, 2), (6, 3)]);
        let last = rec.len() - 1;
        rec[last] ^= 0xFF;
        let e = receive_direct(&mem, rec).unwrap_err().to_string();
        assert!(
            e.contains("channel 0, packet 0") && e.contains("CRC mismatch"),
            "{e}"
        );
        assert_eq!(mem.digest(), before);
        assert_eq!(page(&mem, 5), vec![9; PS]);
    }

    /// A peer that closes in the middle of a payload: the same.
    #[test]
    fn a_truncated_payload_leaves_memory_as_it_was() {
        let mem = Arc::new(GuestMemory::new(PS * 16).unwrap());
        mem.write_bytes(5 * PS, &[9; PS]).unwrap();
        let before = mem.digest();
        let mut rec = pages_record(0, 1, &[(4, 1), (5, 2), (6, 3)]);
        rec.truncate(rec.len() - PS / 2);
        let e = receive_direct(&mem, rec).unwrap_err().to_string();
        assert!(e.contains("truncated stream"), "{e}");
        assert_eq!(mem.digest(), before);
    }
}
