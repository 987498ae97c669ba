//! Snapshot mode: restoring a `file:` snapshot (mapped-ram layout: every
//! page at a fixed offset, a presence bitmap, a record log; see
//! `docs/wire-format.md`). Pages are read from their offsets by N threads
//! (random access, no replay) and applied through the same validation as a
//! stream; the record log is parsed like a channel. The streaming types know
//! nothing of it.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::channel::{run_channel, ChannelInput, StreamRole};
use super::no_peer::NoPeer;
use super::{check_geometry, Receiver, ReceiverConfig, Shared};
use crate::bitmap::DirtyBitmap;
use crate::error::{CoreError, CoreResult};
use crate::memory::GuestMemory;
use crate::wire::{
    self, ChannelKind, FileLayout, FileState, StreamHeader, FILE_STATE_LEN, STREAM_HEADER_LEN,
};

/// Restores the `file:` snapshot at `path` into `mem`.
pub fn restore(path: &Path, mem: Arc<GuestMemory>, cfg: ReceiverConfig) -> CoreResult<Receiver> {
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
    let present = DirtyBitmap::from_words(words, mem.num_pages())
        .map_err(|e| perr(format!("presence bitmap: {e}")))?;
    let present = Arc::new(present);
    let file = Arc::new(file);
    let n = header.channel_count as usize;
    // Page threads do not take part in barriers: a snapshot holds one
    // copy of each page.
    let sh = Receiver::new_shared(mem, header.clone(), 0, cfg)?;
    let mut threads = Vec::new();
    let pages = sh.mem.num_pages();
    let stripe = pages.div_ceil(n).div_ceil(64) * 64;
    for i in 0..n {
        let (file, present) = (file.clone(), present.clone());
        let range = (i * stripe).min(pages)..((i + 1) * stripe).min(pages);
        threads.push(Receiver::spawn(
            &sh,
            format!("mig-restore-{i}"),
            move |sh| restore_pages(sh, i as u32, &file, &present, layout.pages_offset, range),
        )?);
    }
    let log = (*file).try_clone().map_err(|e| io("reopen", e))?;
    // The log's control records are the snapshot's control messages.
    let controls = Arc::new(NoPeer::default());
    let role = StreamRole::Log(controls.clone());
    let log_offset = layout.log_offset;
    let log_len = state.log_len;
    threads.push(Receiver::spawn(&sh, "mig-restore-log".into(), move |sh| {
        let reader = BufReader::new(OffsetReader {
            file: log,
            pos: log_offset,
            end: log_offset + log_len,
        });
        let mut input = ChannelInput::buffered(Box::new(reader));
        run_channel(sh, 0, role, &mut input)
    })?);
    Ok(Receiver::with_threads(sh, threads, controls))
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
    present: &DirtyBitmap,
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
        sh.apply(&normal, &zero, data)?;
        if let Some(c) = sh.channel_packets.get(idx as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        sh.counters
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        packet += 1;
    }
    Ok(())
}
