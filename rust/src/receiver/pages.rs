//! The page decoder: reads one PAGE record's body, after its header was
//! checked, and lands its normal pages in destination memory.
//!
//! The offset table is read and every offset validated first. Then, for an
//! uncompressed payload on a plain socket, each normal page that is still a
//! hole (see [`ChunkDigest::may_hold_data`]) is received with `readv` straight into the
//! destination mapping at its offset: no intermediate buffer, and no copy
//! besides the socket's. Stores go through the mapping, never `pwrite`, so
//! channel threads do not serialise on the memfd's inode lock. Pages that may
//! hold data land in a bounce buffer and are copied once the CRC matches, so
//! their old content survives a bad record; a bad record's direct pages are
//! zero-filled again, which is what a hole held. Nothing outside the
//! validated offsets is ever written. Compressed payloads and TLS channels
//! go through buffers, as they must.

use std::io::Read;
use std::os::fd::BorrowedFd;

use crate::chunk_digest::ChunkDigest;
use crate::error::CoreError;
use crate::memory::GuestMemory;
use crate::transport::{self, ReadFailure};
use crate::wire::{self, Compression, RecordHeader, StreamHeader, RECORD_HEADER_LEN};

/// Why a PAGE body was refused.
pub enum DecodeError {
    /// Reading `what` failed.
    Read(&'static str, ReadFailure),
    /// The body breaks the wire format.
    Bad(String),
    Core(CoreError),
}

impl From<CoreError> for DecodeError {
    fn from(e: CoreError) -> Self {
        DecodeError::Core(e)
    }
}

/// Where pages land: the destination memory, the stream it was checked
/// against, and which of its pages may hold data.
pub struct Destination<'a> {
    pub stream: &'a StreamHeader,
    pub mem: &'a GuestMemory,
    pub digest: &'a ChunkDigest,
}

/// A PAGE record's header, decoded and as the raw bytes its CRC covers.
pub struct PageRecord<'a> {
    pub header: &'a RecordHeader,
    pub raw: &'a [u8; RECORD_HEADER_LEN],
}

/// The pages of an applied record, as validated byte offsets.
pub struct Pages {
    pub normal: Vec<u64>,
    pub zero: Vec<u64>,
    /// A live payload (`FLAG_LIVE`) that differs from what the sender read:
    /// the guest rewrote it during the send. It is applied all the same;
    /// the page is dirty again at the source and resent in a later
    /// generation, and the end digest settles the memory.
    pub rewritten: bool,
}

/// Where a run of adjacent normal pages is received.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Straight into destination memory.
    Direct,
    /// Into the bounce buffer at this byte, copied after the CRC check.
    Bounce(usize),
}

#[derive(Clone, Copy)]
struct Run {
    /// Byte offset in destination memory.
    dest: usize,
    len: usize,
    via: Via,
}

/// One channel's decoder with its reusable buffers.
pub struct PageDecoder {
    page_size: usize,
    /// Bytes of the largest uncompressed payload a record may carry.
    max_payload: usize,
    table: Vec<u8>,
    runs: Vec<Run>,
    iov: Vec<libc::iovec>,
    /// Pages received out of line, and decompressed payloads.
    bounce: Vec<u8>,
    /// Compressed payloads.
    packed: Vec<u8>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl PageDecoder {
    pub fn new(stream: &StreamHeader) -> Self {
        PageDecoder {
            page_size: stream.page_size as usize,
            max_payload: stream.packet_pages as usize * stream.page_size as usize,
            table: Vec::new(),
            runs: Vec::new(),
            iov: Vec::new(),
            bounce: Vec::new(),
            packed: Vec::new(),
            zstd: None,
        }
    }

    /// Reads the body of `rec` from `reader`, or with `readv` from
    /// `direct` when given, and lands the normal pages in `to.mem`. Zero
    /// pages are left to the caller.
    pub fn decode(
        &mut self,
        reader: &mut dyn Read,
        direct: Option<BorrowedFd<'_>>,
        rec: &PageRecord<'_>,
        to: &Destination<'_>,
    ) -> Result<Pages, DecodeError> {
        let wire::RecordKind::Pages {
            compression,
            normal,
            zero,
            ..
        } = rec.header.kind
        else {
            return Err(DecodeError::Bad("not a PAGE record".into()));
        };
        // Counts and lengths were bounded by `RecordHeader::decode`.
        let table_len = (normal as usize + zero as usize) * 8;
        self.table.resize(table_len, 0);
        transport::read_full(reader, &mut self.table)
            .map_err(|f| DecodeError::Read("PAGE offsets", f))?;
        let (normal, zero) =
            wire::parse_offsets(normal, &self.table, to.stream).map_err(DecodeError::Bad)?;
        let matches = match compression {
            Compression::None => self.receive_plain(reader, direct, rec, &normal, to)?,
            c => {
                let payload = rec.header.body_len as usize - table_len;
                self.receive_packed(reader, rec, c, payload, &normal, to)?;
                true
            }
        };
        Ok(Pages {
            normal,
            zero,
            rewritten: !matches,
        })
    }

    /// Plans where each normal page goes: holes straight into memory when
    /// a socket is at hand, the rest through the bounce buffer.
    fn plan(&mut self, normal: &[u64], direct: bool, digest: &ChunkDigest) {
        let ps = self.page_size;
        self.runs.clear();
        let mut bounced = 0;
        for &off in normal {
            let (dest, page) = (off as usize, off as usize / ps);
            let via = if direct && !digest.may_hold_data(page) {
                Via::Direct
            } else {
                bounced += ps;
                Via::Bounce(bounced - ps)
            };
            match self.runs.last_mut() {
                Some(r)
                    if r.dest + r.len == dest
                        && match (r.via, via) {
                            (Via::Direct, Via::Direct) => true,
                            (Via::Bounce(a), Via::Bounce(b)) => a + r.len == b,
                            _ => false,
                        } =>
                {
                    r.len += ps
                }
                _ => self.runs.push(Run { dest, len: ps, via }),
            }
        }
        if bounced > 0 && self.bounce.len() < self.max_payload {
            self.bounce.resize(self.max_payload, 0);
        }
    }

    /// Returns whether the payload is what the sender read (see
    /// [`RecordHeader::verify_pages`]).
    fn receive_plain(
        &mut self,
        reader: &mut dyn Read,
        direct: Option<BorrowedFd<'_>>,
        rec: &PageRecord<'_>,
        normal: &[u64],
        to: &Destination<'_>,
    ) -> Result<bool, DecodeError> {
        let mem = to.mem;
        self.plan(normal, direct.is_some(), to.digest);
        let read = match direct {
            Some(fd) => self.readv_runs(fd, mem)?,
            None => {
                // Every run bounces: the buffer holds the payload in order.
                let len = normal.len() * self.page_size;
                transport::read_full(reader, &mut self.bounce[..len])
            }
        };
        if let Err(f) = read {
            self.undo_direct(mem)?;
            return Err(DecodeError::Read("PAGE body", f));
        }
        let crc = {
            let bounce = &self.bounce;
            let parts = self.runs.iter().map(|r| match r.via {
                // SAFETY: only this thread writes these pages (a record's
                // pages are its channel's until the next sync), and the
                // slice is dropped before anything else happens to them.
                Via::Direct => unsafe { mem.racy_slice(r.dest, r.len) }.unwrap_or(&[]),
                Via::Bounce(at) => &bounce[at..at + r.len],
            });
            rec.header.verify_pages(rec.raw, &self.table, parts)
        };
        match crc {
            Ok(matches) => {
                self.store_bounced(mem)?;
                Ok(matches)
            }
            Err(m) => {
                self.undo_direct(mem)?;
                Err(DecodeError::Bad(m))
            }
        }
    }

    /// Receives the planned runs with `readv`, each at its place.
    fn readv_runs(
        &mut self,
        fd: BorrowedFd<'_>,
        mem: &GuestMemory,
    ) -> Result<Result<(), ReadFailure>, DecodeError> {
        self.iov.clear();
        for r in &self.runs {
            let base = match r.via {
                Via::Direct => mem.range_ptr(r.dest, r.len)?,
                // In bounds: `plan` sized the buffer for a whole payload.
                Via::Bounce(at) => self.bounce[at..at + r.len].as_mut_ptr(),
            };
            self.iov.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: r.len,
            });
        }
        // SAFETY: each entry is a checked range of the destination mapping,
        // which outlives the call, or a range of `self.bounce`, which is not
        // borrowed elsewhere meanwhile.
        Ok(unsafe { transport::readv_full(fd, &mut self.iov) })
    }

    /// Zero-fills the pages received straight into memory: they were holes,
    /// so this restores what they held before a bad record.
    fn undo_direct(&self, mem: &GuestMemory) -> Result<(), DecodeError> {
        for r in self.runs.iter().filter(|r| r.via == Via::Direct) {
            mem.zero_bytes(r.dest, r.len)?;
        }
        Ok(())
    }

    fn receive_packed(
        &mut self,
        reader: &mut dyn Read,
        rec: &PageRecord<'_>,
        c: Compression,
        payload: usize,
        normal: &[u64],
        to: &Destination<'_>,
    ) -> Result<(), DecodeError> {
        // `payload` is below the raw size (`RecordHeader::decode`).
        self.packed.resize(payload, 0);
        transport::read_full(reader, &mut self.packed)
            .map_err(|f| DecodeError::Read("PAGE body", f))?;
        rec.header
            .verify_crc_parts(rec.raw, [&self.table[..], &self.packed[..]])
            .map_err(DecodeError::Bad)?;
        let raw_len = normal.len() * self.page_size;
        if self.bounce.len() < self.max_payload {
            self.bounce.resize(self.max_payload, 0);
        }
        let out = &mut self.bounce[..raw_len];
        let n = match c {
            Compression::Zstd => {
                let z = match &mut self.zstd {
                    Some(z) => z,
                    None => self.zstd.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| CoreError::io("zstd decompressor", e))?,
                    ),
                };
                z.decompress_to_buffer(&self.packed, out)
                    .map_err(|e| e.to_string())
            }
            _ => lz4_flex::block::decompress_into(&self.packed, out).map_err(|e| e.to_string()),
        }
        .map_err(|m| DecodeError::Bad(format!("{} payload: {m}", c.name())))?;
        if n != raw_len {
            return Err(DecodeError::Bad(format!(
                "payload decompresses to {n} bytes, not {raw_len}"
            )));
        }
        self.plan(normal, false, to.digest);
        self.store_bounced(to.mem)
    }

    /// Copies the bounced runs into memory, once their record checked out.
    fn store_bounced(&self, mem: &GuestMemory) -> Result<(), DecodeError> {
        for r in &self.runs {
            if let Via::Bounce(at) = r.via {
                mem.write_bytes(r.dest, &self.bounce[at..at + r.len])?;
            }
        }
        Ok(())
    }
}
