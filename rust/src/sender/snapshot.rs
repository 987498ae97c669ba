//! Snapshot mode on the sending side: a `file:` target gets QEMU's
//! mapped-ram layout (every page at a fixed offset, a presence bitmap, a
//! record log and a completion block; see `docs/wire-format.md`). The
//! channel threads share one file through the `Sink` trait; the streaming
//! types never see it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::lock;
use super::sink::Sink;
use crate::error::{CoreError, CoreResult};
use crate::wire::{
    self, ChannelKind, FileLayout, FileState, RecordHeader, RecordKind, StreamHeader,
};

/// The snapshot file shared by the channel threads of a `file:` target.
pub struct SnapshotFile {
    file: File,
    layout: FileLayout,
    presence: Vec<AtomicU64>,
    /// Next free byte of the record log and next record number.
    log: Mutex<(u64, u64)>,
}

impl SnapshotFile {
    /// Creates (truncates) the file, writes the stream header and an
    /// incomplete completion block, and sizes it so untouched pages stay
    /// holes.
    pub fn create(path: &Path, header: &StreamHeader) -> CoreResult<Self> {
        let header = StreamHeader {
            kind: ChannelKind::File,
            ..header.clone()
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| CoreError::io(format!("create snapshot {}", path.display()), e))?;
        let layout = FileLayout::new(header.memory_size, header.page_size);
        let io = |e| CoreError::io(format!("write snapshot {}", path.display()), e);
        file.write_all_at(&header.encode(), 0).map_err(io)?;
        let incomplete = FileState {
            complete: false,
            bitmap_crc: 0,
            log_len: 0,
        };
        file.write_all_at(&incomplete.encode(), wire::FILE_STATE_OFFSET)
            .map_err(io)?;
        file.set_len(layout.log_offset).map_err(io)?;
        Ok(SnapshotFile {
            file,
            layout,
            presence: (0..layout.bitmap_len / 8)
                .map(|_| AtomicU64::new(0))
                .collect(),
            log: Mutex::new((0, 0)),
        })
    }
}

/// Pages at their fixed offsets, records in the log, the end as the
/// bitmap and completion block.
impl Sink for SnapshotFile {
    /// Appends a record to the log; returns its size.
    fn append(&self, kind: RecordKind, generation: u64, body: &[u8]) -> CoreResult<u64> {
        let mut log = lock(&self.log);
        let rec = RecordHeader::record(kind, log.1, generation, body);
        self.file
            .write_all_at(&rec, self.layout.log_offset + log.0)
            .map_err(|e| CoreError::io("snapshot: write record", e))?;
        log.0 += rec.len() as u64;
        log.1 += 1;
        Ok(rec.len() as u64)
    }

    /// Writes normal pages (`payload` holds one page per offset of
    /// `normal`) at their fixed offsets, runs of adjacent pages in one write
    /// each after `pace(bytes)`, and records presence; zero pages just clear
    /// their bit.
    fn write_pages(
        &self,
        normal: &[u64],
        zero: &[u64],
        payload: &[u8],
        page_size: usize,
        pace: &mut dyn FnMut(usize),
    ) -> std::io::Result<()> {
        let ps = page_size;
        let bit = |off: u64| {
            let p = off / ps as u64;
            (&self.presence[(p / 64) as usize], 1u64 << (p % 64))
        };
        let mut i = 0;
        while i < normal.len() {
            let mut j = i + 1;
            while j < normal.len() && normal[j] == normal[j - 1] + ps as u64 {
                j += 1;
            }
            let data = &payload[i * ps..j * ps];
            pace(data.len());
            self.file
                .write_all_at(data, self.layout.pages_offset + normal[i])?;
            i = j;
        }
        for &off in normal {
            let (w, m) = bit(off);
            w.fetch_or(m, Ordering::Relaxed);
        }
        for &off in zero {
            let (w, m) = bit(off);
            w.fetch_and(!m, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A file needs no barrier record: the sender waited for every write
    /// of the generation, so the order of writes is the order of syncs.
    fn sync(&self, _generation: u64) -> CoreResult<u64> {
        Ok(0)
    }

    /// Presence bitmap, end record, then the completion block, each made
    /// durable before the next so a torn snapshot is refused as incomplete.
    fn finish(&self, generation: u64, digest: u128) -> CoreResult<u64> {
        let io = |e| CoreError::io("snapshot: finish", e);
        let bitmap: Vec<u8> = self
            .presence
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .collect();
        self.file
            .write_all_at(&bitmap, self.layout.bitmap_offset)
            .map_err(io)?;
        let end = self.append(RecordKind::End, generation, &digest.to_le_bytes())?;
        self.file.sync_all().map_err(io)?;
        let state = FileState {
            complete: true,
            bitmap_crc: crc32c::crc32c(&bitmap),
            log_len: lock(&self.log).0,
        };
        self.file
            .write_all_at(&state.encode(), wire::FILE_STATE_OFFSET)
            .map_err(io)?;
        self.file.sync_all().map_err(io)?;
        Ok(end + bitmap.len() as u64)
    }
}
