//! The wire format: stream headers, records, control frames, their bounds.
//!
//! Every integer is fixed-width little-endian. Every length and count has an
//! upper bound that is checked before anything is allocated or read, so a
//! hostile peer can only make us reject its stream. `docs/wire-format.md`
//! is the normative description; the constants here are its numbers.

use crate::error::CoreError;

/// `"MIGS"`: first bytes of every channel and of a snapshot file.
pub const STREAM_MAGIC: [u8; 4] = *b"MIGS";
pub const VERSION: u16 = 1;
pub const STREAM_HEADER_LEN: usize = 64;
pub const RECORD_HEADER_LEN: usize = 48;
pub const MAX_CHANNELS: u16 = 64;
pub const MAX_PACKET_PAGES: u32 = 1024;
pub const MIN_PAGE_SIZE: u32 = 4096;
pub const MAX_PAGE_SIZE: u32 = 65536;
pub const MAX_MEMORY_SIZE: u64 = 1 << 46;
pub const MAX_DEVICE_CHUNK: usize = 8 << 20;
pub const MAX_CONTROL_FRAME: usize = 1 << 20;
pub const CONTROL_FRAME_HEADER_LEN: usize = 8;
pub const DIGEST_LEN: usize = 16;

/// Record tags.
pub const TAG_PAGES: [u8; 4] = *b"PAGE";
pub const TAG_DEVICE: [u8; 4] = *b"DEVS";
pub const TAG_SYNC: [u8; 4] = *b"SYNC";
pub const TAG_CONTROL: [u8; 4] = *b"CTRL";
pub const TAG_END: [u8; 4] = *b"END!";

/// PAGE flags: bits 0–1 select the payload compression.
pub const FLAG_COMPRESSION_MASK: u32 = 0b11;
/// PAGE flags: the payload went out straight from live guest memory (no
/// copy). The record CRC then covers the header and the offsets only, and
/// the header's `arg` carries the payload's CRC32C as read from the guest
/// mapping just before the send. The guest may rewrite a page between that
/// read and the kernel's copy: the tracker has then marked the page dirty
/// again, it is resent in a later generation (applied after this one), and
/// the payload CRC differs. A receiver applies such a payload and counts
/// it; the end-of-stream digest of the whole memory still has to match, so
/// a payload damaged in transit cannot pass unnoticed.
pub const FLAG_LIVE: u32 = 1 << 2;
/// DEVS flags: this chunk is the device's last.
pub const FLAG_FINAL: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Zstd = 1,
    Lz4 = 2,
}

impl Compression {
    pub fn parse(name: &str) -> Result<Self, CoreError> {
        match name {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            other => Err(CoreError::invalid(format!(
                "unknown compression {other:?}: use none, zstd or lz4"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        }
    }

    fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            2 => Some(Compression::Lz4),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    Control = 0,
    Data = 1,
    File = 2,
    /// Post-copy's page channels (`postcopy/channels.rs`): index 0 carries
    /// requests and the pages they ask for, index 1 the background push.
    Postcopy = 3,
}

/// The first 64 bytes of every channel (and of a snapshot file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub kind: ChannelKind,
    pub page_size: u32,
    pub packet_pages: u32,
    pub memory_size: u64,
    pub channel_index: u16,
    pub channel_count: u16,
    pub migration_id: u128,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl StreamHeader {
    pub fn encode(&self) -> [u8; STREAM_HEADER_LEN] {
        let mut b = [0u8; STREAM_HEADER_LEN];
        b[0..4].copy_from_slice(&STREAM_MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.kind as u8;
        b[8..12].copy_from_slice(&self.page_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.packet_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.memory_size.to_le_bytes());
        b[24..26].copy_from_slice(&self.channel_index.to_le_bytes());
        b[26..28].copy_from_slice(&self.channel_count.to_le_bytes());
        b[32..48].copy_from_slice(&self.migration_id.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and bounds-checks a stream header; the error says which field.
    pub fn decode(b: &[u8; STREAM_HEADER_LEN]) -> Result<Self, String> {
        if b[0..4] != STREAM_MAGIC {
            return Err(format!(
                "stream header: bad magic {:02x?} (expected {:02x?})",
                &b[0..4],
                STREAM_MAGIC
            ));
        }
        let version = le_u16(b, 4);
        if version != VERSION {
            return Err(format!(
                "stream header: unsupported version {version} (this side speaks {VERSION})"
            ));
        }
        let crc = le_u32(b, 60);
        if crc != crc32c::crc32c(&b[..60]) {
            return Err("stream header: CRC mismatch".into());
        }
        let kind = match b[6] {
            0 => ChannelKind::Control,
            1 => ChannelKind::Data,
            2 => ChannelKind::File,
            3 => ChannelKind::Postcopy,
            k => return Err(format!("stream header: unknown channel kind {k}")),
        };
        if b[7] != 0 || b[28..32].iter().chain(&b[48..60]).any(|&x| x != 0) {
            return Err("stream header: reserved bytes are not zero".into());
        }
        let h = StreamHeader {
            kind,
            page_size: le_u32(b, 8),
            packet_pages: le_u32(b, 12),
            memory_size: le_u64(b, 16),
            channel_index: le_u16(b, 24),
            channel_count: le_u16(b, 26),
            migration_id: u128::from_le_bytes(b[32..48].try_into().expect("16 bytes")),
        };
        h.check_bounds()?;
        Ok(h)
    }

    pub fn check_bounds(&self) -> Result<(), String> {
        let ps = self.page_size;
        if !ps.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps) {
            return Err(format!(
                "stream header: page size {ps} is not a power of two in \
                 [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]"
            ));
        }
        if !(1..=MAX_PACKET_PAGES).contains(&self.packet_pages) {
            return Err(format!(
                "stream header: packet pages {} outside [1, {MAX_PACKET_PAGES}]",
                self.packet_pages
            ));
        }
        let size = self.memory_size;
        if size == 0 || size > MAX_MEMORY_SIZE || !size.is_multiple_of(ps as u64) {
            return Err(format!(
                "stream header: memory size {size} is not a multiple of {ps} in (0, {MAX_MEMORY_SIZE}]"
            ));
        }
        if !(1..=MAX_CHANNELS).contains(&self.channel_count) {
            return Err(format!(
                "stream header: channel count {} outside [1, {MAX_CHANNELS}]",
                self.channel_count
            ));
        }
        if self.channel_index >= self.channel_count {
            return Err(format!(
                "stream header: channel index {} not below channel count {}",
                self.channel_index, self.channel_count
            ));
        }
        Ok(())
    }

    pub fn num_pages(&self) -> u64 {
        self.memory_size / self.page_size as u64
    }

    /// Largest PAGE body a peer with this header may send.
    pub fn max_pages_body(&self) -> usize {
        self.packet_pages as usize * (8 + self.page_size as usize)
    }
}

/// What a record header declares; the body follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Pages {
        compression: Compression,
        normal: u32,
        zero: u32,
        /// Sent from live memory (`FLAG_LIVE`): the payload's CRC32C.
        live_crc: Option<u32>,
    },
    /// A chunk of one device's migration state; the body is the chunk.
    Device {
        seq: u64,
        device_id: u32,
        last: bool,
    },
    Sync,
    Control,
    End,
}

/// The 48-byte header in front of every record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    /// Per-channel record number: 0, 1, 2, … with no gaps.
    pub number: u64,
    pub generation: u64,
    pub body_len: u32,
    pub crc: u32,
}

impl RecordHeader {
    /// Writes the header into `out[..48]`; the body is the concatenation of
    /// `body` parts, its length and CRC are computed here.
    pub fn encode_into(&self, out: &mut [u8], body: &[&[u8]]) {
        let (tag, flags, arg, c0, c1) = match self.kind {
            RecordKind::Pages {
                compression,
                normal,
                zero,
                live_crc,
            } => match live_crc {
                Some(c) => (
                    TAG_PAGES,
                    compression as u32 | FLAG_LIVE,
                    c as u64,
                    normal,
                    zero,
                ),
                None => (TAG_PAGES, compression as u32, 0, normal, zero),
            },
            RecordKind::Device {
                seq,
                device_id,
                last,
            } => (
                TAG_DEVICE,
                if last { FLAG_FINAL } else { 0 },
                seq,
                device_id,
                0,
            ),
            RecordKind::Sync => (TAG_SYNC, 0, 0, 0, 0),
            RecordKind::Control => (TAG_CONTROL, 0, 0, 0, 0),
            RecordKind::End => (TAG_END, 0, 0, 0, 0),
        };
        let h = &mut out[..RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&tag);
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        h[8..16].copy_from_slice(&self.number.to_le_bytes());
        h[16..24].copy_from_slice(&self.generation.to_le_bytes());
        h[24..32].copy_from_slice(&arg.to_le_bytes());
        h[32..36].copy_from_slice(&c0.to_le_bytes());
        h[36..40].copy_from_slice(&c1.to_le_bytes());
        let body_len: usize = body.iter().map(|b| b.len()).sum();
        h[40..44].copy_from_slice(&(body_len as u32).to_le_bytes());
        let crc = body
            .iter()
            .fold(crc32c::crc32c(&h[..44]), |c, b| crc32c::crc32c_append(c, b));
        h[44..48].copy_from_slice(&crc.to_le_bytes());
    }

    /// Writes the header of a `FLAG_LIVE` PAGE record: `covered` (the
    /// offsets) is under the record CRC, the `payload_len` bytes after it
    /// are not (their CRC is in the kind's `live_crc`).
    pub fn encode_live_into(&self, out: &mut [u8], covered: &[u8], payload_len: usize) {
        self.encode_into(out, &[covered]);
        let h = &mut out[..RECORD_HEADER_LEN];
        let body_len = covered.len() + payload_len;
        h[40..44].copy_from_slice(&(body_len as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..44]), covered);
        h[44..48].copy_from_slice(&crc.to_le_bytes());
    }

    /// Encodes a whole record (header + body) into a fresh buffer.
    pub fn record(kind: RecordKind, number: u64, generation: u64, body: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; RECORD_HEADER_LEN + body.len()];
        out[RECORD_HEADER_LEN..].copy_from_slice(body);
        let h = RecordHeader {
            kind,
            number,
            generation,
            body_len: body.len() as u32,
            crc: 0,
        };
        let (head, tail) = out.split_at_mut(RECORD_HEADER_LEN);
        h.encode_into(head, &[tail]);
        out
    }

    /// Parses a record header and checks every count and length against the
    /// stream's bounds before any body byte is read.
    pub fn decode(b: &[u8; RECORD_HEADER_LEN], stream: &StreamHeader) -> Result<Self, String> {
        let tag: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        let flags = le_u32(b, 4);
        let number = le_u64(b, 8);
        let generation = le_u64(b, 16);
        let arg = le_u64(b, 24);
        let c0 = le_u32(b, 32);
        let c1 = le_u32(b, 36);
        let body_len = le_u32(b, 40);
        let crc = le_u32(b, 44);
        let body = body_len as usize;
        let kind = match tag {
            TAG_PAGES => decode_pages(flags, arg, c0, c1, body, stream)?,
            TAG_DEVICE => {
                if flags & !FLAG_FINAL != 0 || c1 != 0 {
                    return Err(format!("DEVS record: bad flags {flags:#x} or count {c1}"));
                }
                if body > MAX_DEVICE_CHUNK {
                    return Err(format!(
                        "DEVS record: chunk of {body} bytes exceeds the limit of {MAX_DEVICE_CHUNK}"
                    ));
                }
                RecordKind::Device {
                    seq: arg,
                    device_id: c0,
                    last: flags & FLAG_FINAL != 0,
                }
            }
            TAG_SYNC | TAG_CONTROL | TAG_END => {
                let (kind, max, min) = match tag {
                    TAG_SYNC => (RecordKind::Sync, 0, 0),
                    TAG_CONTROL => (RecordKind::Control, MAX_CONTROL_FRAME, 0),
                    _ => (RecordKind::End, DIGEST_LEN, DIGEST_LEN),
                };
                if flags != 0 || arg != 0 || c0 != 0 || c1 != 0 {
                    return Err(format!(
                        "{} record: reserved fields are not zero",
                        String::from_utf8_lossy(&tag)
                    ));
                }
                if body < min || body > max {
                    return Err(format!(
                        "{} record: body of {body} bytes outside [{min}, {max}]",
                        String::from_utf8_lossy(&tag)
                    ));
                }
                kind
            }
            other => return Err(format!("unknown record tag {other:02x?}")),
        };
        Ok(RecordHeader {
            kind,
            number,
            generation,
            body_len,
            crc,
        })
    }

    /// Checks a PAGE record's CRCs: `table` is its offset table, `payload`
    /// its payload, which may lie in several places, given in order. A bad
    /// record CRC is an error. Returns whether the payload matches: always
    /// for a copied payload (the record CRC covers it), and for a live one
    /// (`FLAG_LIVE`) whether it is what the sender read.
    pub fn verify_pages<'a>(
        &self,
        raw: &[u8; RECORD_HEADER_LEN],
        table: &'a [u8],
        payload: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<bool, String> {
        match self.kind {
            RecordKind::Pages {
                live_crc: Some(want),
                ..
            } => {
                self.verify_crc(raw, table)?;
                Ok(payload.into_iter().fold(0, crc32c::crc32c_append) == want)
            }
            _ => self
                .verify_crc_parts(raw, std::iter::once(table).chain(payload))
                .map(|()| true),
        }
    }

    /// Checks the CRC over the raw header bytes and the body.
    pub fn verify_crc(&self, raw: &[u8; RECORD_HEADER_LEN], body: &[u8]) -> Result<(), String> {
        self.verify_crc_parts(raw, [body])
    }

    /// Checks the CRC over the raw header bytes and a body that lies in
    /// several places, given in order.
    pub fn verify_crc_parts<'a>(
        &self,
        raw: &[u8; RECORD_HEADER_LEN],
        body: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), String> {
        let crc = body
            .into_iter()
            .fold(crc32c::crc32c(&raw[..44]), crc32c::crc32c_append);
        if crc != self.crc {
            return Err(format!(
                "CRC mismatch (record says {:#010x}, computed {crc:#010x})",
                self.crc
            ));
        }
        Ok(())
    }
}

/// A validated PAGE body: offsets are page-aligned and inside memory.
#[derive(Debug)]
pub struct PagesBody<'a> {
    pub normal: Vec<u64>,
    pub zero: Vec<u64>,
    pub payload: &'a [u8],
}

/// Splits and validates a PAGE body. `normal`/`zero` were bounded by
/// [`RecordHeader::decode`], so the offset vectors are bounded too.
pub fn parse_pages<'a>(
    normal: u32,
    zero: u32,
    body: &'a [u8],
    stream: &StreamHeader,
) -> Result<PagesBody<'a>, String> {
    let total = normal as usize + zero as usize;
    let (normal, zero) = parse_offsets(normal, &body[..total * 8], stream)?;
    Ok(PagesBody {
        normal,
        zero,
        payload: &body[total * 8..],
    })
}

/// Validates a PAGE record's offset table (`count0 + count1` u64, normal
/// pages first): every offset is a page inside memory. Returns the normal
/// and the zero pages' offsets.
pub fn parse_offsets(
    normal: u32,
    table: &[u8],
    stream: &StreamHeader,
) -> Result<(Vec<u64>, Vec<u64>), String> {
    let ps = stream.page_size as u64;
    let mut offsets = Vec::with_capacity(table.len() / 8);
    for (i, chunk) in table.chunks_exact(8).enumerate() {
        let off = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        if off % ps != 0 || off >= stream.memory_size {
            return Err(format!(
                "page offset #{i} {off:#x} is not a page inside memory of {} bytes",
                stream.memory_size
            ));
        }
        offsets.push(off);
    }
    let zero = offsets.split_off((normal as usize).min(offsets.len()));
    Ok((offsets, zero))
}

/// Encodes a control frame: u32 length, u32 CRC32C of the payload, payload.
pub fn control_frame(payload: &[u8]) -> Result<Vec<u8>, CoreError> {
    if payload.len() > MAX_CONTROL_FRAME {
        return Err(CoreError::invalid(format!(
            "control message of {} bytes exceeds the limit of {MAX_CONTROL_FRAME}",
            payload.len()
        )));
    }
    let mut out = Vec::with_capacity(CONTROL_FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Checks a control frame header; returns (length, crc).
pub fn control_frame_header(b: &[u8; CONTROL_FRAME_HEADER_LEN]) -> Result<(usize, u32), String> {
    let len = le_u32(b, 0) as usize;
    if len > MAX_CONTROL_FRAME {
        return Err(format!(
            "control frame of {len} bytes exceeds the limit of {MAX_CONTROL_FRAME}"
        ));
    }
    Ok((len, le_u32(b, 4)))
}

/// Byte layout of a `file:` snapshot, derived only from the memory geometry
/// so that no offset in the file is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLayout {
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub pages_offset: u64,
    pub log_offset: u64,
}

pub const FILE_STATE_OFFSET: u64 = STREAM_HEADER_LEN as u64;
pub const FILE_STATE_LEN: usize = 32;
const FILE_ALIGN: u64 = 1 << 20;

impl FileLayout {
    pub fn new(memory_size: u64, page_size: u32) -> Self {
        let pages = memory_size / page_size as u64;
        let bitmap_len = pages.div_ceil(64) * 8;
        let bitmap_offset = 4096;
        let pages_offset = (bitmap_offset + bitmap_len).div_ceil(FILE_ALIGN) * FILE_ALIGN;
        FileLayout {
            bitmap_offset,
            bitmap_len,
            pages_offset,
            log_offset: pages_offset + memory_size,
        }
    }
}

/// The snapshot's completion block at byte 64: written last, after the
/// presence bitmap and the record log are on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileState {
    pub complete: bool,
    pub bitmap_crc: u32,
    pub log_len: u64,
}

const FILE_STATE_MAGIC: [u8; 4] = *b"DONE";

impl FileState {
    pub fn encode(&self) -> [u8; FILE_STATE_LEN] {
        let mut b = [0u8; FILE_STATE_LEN];
        if self.complete {
            b[0..4].copy_from_slice(&FILE_STATE_MAGIC);
        }
        b[4..8].copy_from_slice(&self.bitmap_crc.to_le_bytes());
        b[8..16].copy_from_slice(&self.log_len.to_le_bytes());
        let crc = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; FILE_STATE_LEN]) -> Result<Self, String> {
        if b[0..4] != FILE_STATE_MAGIC {
            return Err("snapshot is incomplete: the source never finished writing it".into());
        }
        if le_u32(b, 28) != crc32c::crc32c(&b[..28]) || b[16..28].iter().any(|&x| x != 0) {
            return Err("snapshot completion block: CRC mismatch".into());
        }
        Ok(FileState {
            complete: true,
            bitmap_crc: le_u32(b, 4),
            log_len: le_u64(b, 8),
        })
    }
}

/// Word-wise zero test. The first word settles most non-zero pages; the rest
/// is OR-reduced in 256-byte blocks (which the compiler vectorises), with one
/// branch per block so a non-zero page stops the scan early.
pub fn is_zero(buf: &[u8]) -> bool {
    if let Some(first) = buf.get(..8) {
        if first != [0u8; 8] {
            return false;
        }
    }
    let mut blocks = buf.chunks_exact(256);
    for block in &mut blocks {
        let mut acc = [0u64; 4];
        for w in block.chunks_exact(32) {
            for (a, x) in acc.iter_mut().zip(w.chunks_exact(8)) {
                *a |= u64::from_ne_bytes(x.try_into().expect("8 bytes"));
            }
        }
        if acc != [0; 4] {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// A PAGE record's header fields, checked: the flags, the page counts within
/// a packet, and a body that holds exactly the offsets and the payload.
fn decode_pages(
    flags: u32,
    arg: u64,
    c0: u32,
    c1: u32,
    body: usize,
    stream: &StreamHeader,
) -> Result<RecordKind, String> {
    let ps = stream.page_size as usize;
    let live = flags & FLAG_LIVE != 0;
    let compression = Compression::from_bits(flags & FLAG_COMPRESSION_MASK)
        .filter(|_| flags & !(FLAG_COMPRESSION_MASK | FLAG_LIVE) == 0)
        // Only a raw payload can come from live memory, and its
        // CRC fits 32 bits.
        .filter(|&c| !live || (c == Compression::None && arg >> 32 == 0))
        .filter(|_| live || arg == 0)
        .ok_or_else(|| format!("PAGE record: bad flags {flags:#x} or arg {arg:#x}"))?;
    let total = c0 as u64 + c1 as u64;
    if total == 0 || total > stream.packet_pages as u64 {
        return Err(format!(
            "PAGE record: {c0} normal + {c1} zero pages outside [1, {}]",
            stream.packet_pages
        ));
    }
    let offsets = total as usize * 8;
    let raw = c0 as usize * ps;
    let payload = body
        .checked_sub(offsets)
        .ok_or_else(|| format!("PAGE record: body of {body} bytes cannot hold {total} offsets"))?;
    let ok = match compression {
        Compression::None => payload == raw,
        _ => c0 > 0 && payload > 0 && payload < raw,
    };
    if !ok {
        return Err(format!(
            "PAGE record: payload of {payload} bytes does not fit {c0} pages \
             with compression {}",
            compression.name()
        ));
    }
    Ok(RecordKind::Pages {
        compression,
        normal: c0,
        zero: c1,
        live_crc: live.then_some(arg as u32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream() -> StreamHeader {
        StreamHeader {
            kind: ChannelKind::Data,
            page_size: 4096,
            packet_pages: 8,
            memory_size: 4096 * 64,
            channel_index: 1,
            channel_count: 2,
            migration_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
        }
    }

    #[test]
    fn stream_header_roundtrip_and_rejections() {
        let h = stream();
        let b = h.encode();
        assert_eq!(StreamHeader::decode(&b).unwrap(), h);
        let mut bad = b;
        bad[0] = b'X';
        assert!(StreamHeader::decode(&bad).unwrap_err().contains("magic"));
        let mut bad = b;
        bad[4] = 9;
        assert!(StreamHeader::decode(&bad).unwrap_err().contains("version"));
        let mut bad = b;
        bad[20] ^= 1;
        assert!(StreamHeader::decode(&bad).unwrap_err().contains("CRC"));
        let mut big = h.clone();
        big.packet_pages = MAX_PACKET_PAGES + 1;
        assert!(StreamHeader::decode(&big.encode())
            .unwrap_err()
            .contains("packet pages"));
        let mut idx = h.clone();
        idx.channel_index = 2;
        assert!(StreamHeader::decode(&idx.encode())
            .unwrap_err()
            .contains("index"));
        let mut ps = h;
        ps.page_size = 3000;
        assert!(StreamHeader::decode(&ps.encode())
            .unwrap_err()
            .contains("page size"));
    }

    #[test]
    fn oversized_counts_are_rejected_before_the_body() {
        let s = stream();
        let mut rec = RecordHeader::record(
            RecordKind::Pages {
                compression: Compression::None,
                normal: 1,
                zero: 0,
                live_crc: None,
            },
            0,
            0,
            &[0u8; 8 + 4096],
        );
        rec[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        let head: [u8; RECORD_HEADER_LEN] = rec[..RECORD_HEADER_LEN].try_into().unwrap();
        assert!(RecordHeader::decode(&head, &s)
            .unwrap_err()
            .contains("zero pages"));
        let mut dev = RecordHeader::record(
            RecordKind::Device {
                seq: 0,
                device_id: 1,
                last: false,
            },
            0,
            0,
            b"n",
        );
        dev[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        let head: [u8; RECORD_HEADER_LEN] = dev[..RECORD_HEADER_LEN].try_into().unwrap();
        assert!(RecordHeader::decode(&head, &s)
            .unwrap_err()
            .contains("exceeds"));
        let frame = [0xffu8; CONTROL_FRAME_HEADER_LEN];
        assert!(control_frame_header(&frame).is_err());
    }

    /// A live PAGE record: the offsets are under the record CRC, a changed
    /// payload is reported (not refused), and live flags on a compressed
    /// payload are refused.
    #[test]
    fn live_pages_cover_offsets_strictly_and_report_the_payload() {
        let s = stream();
        let offsets: Vec<u8> = [0u64, 4096].iter().flat_map(|o| o.to_le_bytes()).collect();
        let payload = vec![9u8; 4096];
        let kind = RecordKind::Pages {
            compression: Compression::None,
            normal: 1,
            zero: 1,
            live_crc: Some(crc32c::crc32c(&payload)),
        };
        let h = RecordHeader {
            kind,
            number: 4,
            generation: 2,
            body_len: 0,
            crc: 0,
        };
        let mut head = [0u8; RECORD_HEADER_LEN];
        h.encode_live_into(&mut head, &offsets, payload.len());
        let d = RecordHeader::decode(&head, &s).unwrap();
        assert_eq!(d.kind, kind);
        assert_eq!(d.body_len as usize, offsets.len() + payload.len());
        let (mut table, mut payload) = (offsets.clone(), payload);
        assert_eq!(d.verify_pages(&head, &table, [&payload[..]]), Ok(true));
        // The guest rewrote the page during the send.
        payload[5] = 1;
        assert_eq!(d.verify_pages(&head, &table, [&payload[..]]), Ok(false));
        // A damaged offset is refused.
        table[3] ^= 1;
        assert!(d.verify_pages(&head, &table, [&payload[..]]).is_err());
        let mut lz = head;
        lz[4..8].copy_from_slice(&(FLAG_LIVE | Compression::Lz4 as u32).to_le_bytes());
        assert!(RecordHeader::decode(&lz, &s).is_err());
        // Without the flag, `arg` must stay zero.
        let mut plain = head;
        plain[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(RecordHeader::decode(&plain, &s).is_err());
    }

    fn arb_kind() -> impl Strategy<Value = (RecordKind, Vec<u8>)> {
        prop_oneof![
            (1u32..4, 0u32..4).prop_map(|(n, z)| {
                let mut body = Vec::new();
                for i in 0..n + z {
                    body.extend_from_slice(&(i as u64 * 4096).to_le_bytes());
                }
                body.resize(body.len() + n as usize * 4096, 7);
                (
                    RecordKind::Pages {
                        compression: Compression::None,
                        normal: n,
                        zero: z,
                        live_crc: None,
                    },
                    body,
                )
            }),
            (
                any::<u64>(),
                any::<u32>(),
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..100)
            )
                .prop_map(|(seq, device_id, last, chunk)| {
                    (
                        RecordKind::Device {
                            seq,
                            device_id,
                            last,
                        },
                        chunk,
                    )
                }),
            Just((RecordKind::Sync, vec![])),
            Just((RecordKind::End, vec![5u8; DIGEST_LEN])),
        ]
    }

    proptest! {
        #[test]
        fn records_roundtrip(kb in arb_kind(), number in any::<u64>(), gen in any::<u64>()) {
            let (kind, body) = kb;
            let rec = RecordHeader::record(kind, number, gen, &body);
            let head: [u8; RECORD_HEADER_LEN] = rec[..RECORD_HEADER_LEN].try_into().unwrap();
            let h = RecordHeader::decode(&head, &stream()).unwrap();
            prop_assert_eq!(h.kind, kind);
            prop_assert_eq!(h.number, number);
            prop_assert_eq!(h.generation, gen);
            prop_assert_eq!(h.body_len as usize, body.len());
            h.verify_crc(&head, &rec[RECORD_HEADER_LEN..]).unwrap();
        }

        #[test]
        fn any_flipped_bit_is_caught(kb in arb_kind(), bit in any::<prop::sample::Index>()) {
            let (kind, body) = kb;
            let mut rec = RecordHeader::record(kind, 3, 1, &body);
            let i = bit.index(rec.len() * 8);
            rec[i / 8] ^= 1 << (i % 8);
            let head: [u8; RECORD_HEADER_LEN] = rec[..RECORD_HEADER_LEN].try_into().unwrap();
            // Either the header is refused, or the body length changed (and
            // a reader would stop at the size it declares), or the CRC fails.
            if let Ok(h) = RecordHeader::decode(&head, &stream()) {
                if h.body_len as usize == body.len() {
                    prop_assert!(h.verify_crc(&head, &rec[RECORD_HEADER_LEN..]).is_err());
                }
            }
        }

        #[test]
        fn decode_never_panics(raw in proptest::collection::vec(any::<u8>(), RECORD_HEADER_LEN)) {
            let head: [u8; RECORD_HEADER_LEN] = raw.try_into().unwrap();
            let _ = RecordHeader::decode(&head, &stream());
        }

        #[test]
        fn is_zero_matches_naive(len in 0usize..300, pos in any::<prop::sample::Index>()) {
            let mut buf = vec![0u8; len];
            prop_assert!(is_zero(&buf));
            if len > 0 {
                buf[pos.index(len)] = 1;
                prop_assert!(!is_zero(&buf));
            }
        }
    }

    #[test]
    fn offsets_outside_memory_are_refused() {
        let s = stream();
        let mut body = (s.memory_size).to_le_bytes().to_vec();
        body.resize(8 + 4096, 0);
        assert!(parse_pages(1, 0, &body, &s).unwrap_err().contains("offset"));
        let mut body = 4097u64.to_le_bytes().to_vec();
        body.resize(8 + 4096, 0);
        assert!(parse_pages(1, 0, &body, &s).is_err());
    }

    #[test]
    fn file_state_roundtrip() {
        let st = FileState {
            complete: true,
            bitmap_crc: 77,
            log_len: 1234,
        };
        assert_eq!(FileState::decode(&st.encode()).unwrap(), st);
        let incomplete = FileState {
            complete: false,
            ..st
        };
        assert!(FileState::decode(&incomplete.encode())
            .unwrap_err()
            .contains("incomplete"));
        let l = FileLayout::new(1 << 30, 4096);
        assert_eq!(l.pages_offset % (1 << 20), 0);
        assert!(l.bitmap_offset + l.bitmap_len <= l.pages_offset);
    }
}
