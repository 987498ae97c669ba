//! Fuzzes the wire decoders and a receiver channel fed the same bytes.
//!
//! Input: one mode byte, then bytes. The bytes are decoded as a stream
//! header, a control frame header and a file completion block, then as a
//! data channel's records, first with the bare decoders (every accepted
//! record must respect the documented bounds), then through a real
//! `Receiver` applying them to guest memory. Mode bit 0 rewrites the record
//! CRCs first so mutations reach the checks behind the CRC; bits 1–3 pick
//! packet_pages.

#![no_main]

use std::io::Cursor;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mig::receiver::{Receiver, ReceiverConfig};
use mig::wire::{
    self, ChannelKind, Compression, FileState, RecordHeader, RecordKind, StreamHeader,
    CONTROL_FRAME_HEADER_LEN, DIGEST_LEN, FILE_STATE_LEN, MAX_CONTROL_FRAME, MAX_DEVICE_CHUNK,
    RECORD_HEADER_LEN, STREAM_HEADER_LEN,
};
use mig::GuestMemory;

const PS: u32 = 4096;
const PAGES: u64 = 32;

fn stream(mode: u8) -> StreamHeader {
    StreamHeader {
        kind: ChannelKind::Data,
        page_size: PS,
        packet_pages: [1, 2, 3, 4, 8, 16, 32, 64][(mode >> 1) as usize & 7],
        memory_size: PAGES * PS as u64,
        channel_index: 0,
        channel_count: 1,
        migration_id: 1,
    }
}

/// Walks the records; with `fix`, rewrites each CRC to match. Returns the
/// accepted records' headers.
fn walk(bytes: &mut [u8], st: &StreamHeader, fix: bool) -> Vec<RecordHeader> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + RECORD_HEADER_LEN <= bytes.len() {
        let mut raw: [u8; RECORD_HEADER_LEN] =
            bytes[at..at + RECORD_HEADER_LEN].try_into().unwrap();
        let Ok(h) = RecordHeader::decode(&raw, st) else {
            break;
        };
        let start = at + RECORD_HEADER_LEN;
        let end = start + h.body_len as usize;
        let end_clamped = end.min(bytes.len());
        if fix {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&raw[..44]), &bytes[start..end_clamped]);
            raw[44..48].copy_from_slice(&crc.to_le_bytes());
            bytes[at + 44..at + 48].copy_from_slice(&crc.to_le_bytes());
        }
        if end > bytes.len() {
            break;
        }
        let h = RecordHeader::decode(&raw, st).expect("same header decodes again");
        check_bounds(&h, &bytes[start..end], st);
        if h.verify_crc(&raw, &bytes[start..end]).is_ok() {
            out.push(h);
        }
        at = end;
    }
    out
}

/// The bounds `docs/wire-format.md` promises for every accepted record.
fn check_bounds(h: &RecordHeader, body: &[u8], st: &StreamHeader) {
    let len = body.len();
    assert_eq!(len, h.body_len as usize);
    match h.kind {
        RecordKind::Pages {
            compression,
            normal,
            zero,
        } => {
            let total = normal as usize + zero as usize;
            assert!((1..=st.packet_pages as usize).contains(&total));
            assert!(len <= st.max_pages_body());
            let raw = normal as usize * st.page_size as usize;
            match compression {
                Compression::None => assert_eq!(len, total * 8 + raw),
                _ => assert!(len > total * 8 && len - total * 8 < raw),
            }
            if let Ok(p) = wire::parse_pages(normal, zero, body, st) {
                assert_eq!(p.normal.len() + p.zero.len(), total);
                for &off in p.normal.iter().chain(&p.zero) {
                    assert!(off % st.page_size as u64 == 0 && off < st.memory_size);
                }
            }
        }
        RecordKind::Device { .. } => assert!(len <= MAX_DEVICE_CHUNK),
        RecordKind::Sync => assert_eq!(len, 0),
        RecordKind::Control => assert!(len <= MAX_CONTROL_FRAME),
        RecordKind::End => assert_eq!(len, DIGEST_LEN),
    }
}

fn memory() -> &'static Arc<GuestMemory> {
    static MEM: OnceLock<Arc<GuestMemory>> = OnceLock::new();
    MEM.get_or_init(|| Arc::new(GuestMemory::new((PAGES * PS as u64) as usize).unwrap()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if let Ok(raw) =
        <&[u8; STREAM_HEADER_LEN]>::try_from(&rest[..rest.len().min(STREAM_HEADER_LEN)])
    {
        if let Ok(h) = StreamHeader::decode(raw) {
            assert!(h.check_bounds().is_ok());
            assert_eq!(StreamHeader::decode(&h.encode()), Ok(h));
        }
    }
    if let Ok(raw) = <&[u8; CONTROL_FRAME_HEADER_LEN]>::try_from(
        &rest[..rest.len().min(CONTROL_FRAME_HEADER_LEN)],
    ) {
        if let Ok((len, _)) = wire::control_frame_header(raw) {
            assert!(len <= MAX_CONTROL_FRAME);
        }
    }
    if let Ok(raw) = <&[u8; FILE_STATE_LEN]>::try_from(&rest[..rest.len().min(FILE_STATE_LEN)]) {
        if let Ok(s) = FileState::decode(raw) {
            assert_eq!(FileState::decode(&s.encode()).ok(), Some(s));
        }
    }
    let st = stream(mode);
    let mut bytes = rest.to_vec();
    walk(&mut bytes, &st, mode & 1 != 0);

    // The same bytes through a receiver channel: an error or the end, never
    // a panic; writes stay inside guest memory (checked by its accessors).
    let cfg = ReceiverConfig {
        io_timeout: Duration::from_secs(1),
        device_buffer: 1 << 20,
        tls: None,
    };
    let mem = memory().clone();
    let r = Receiver::start(mem, st, vec![Box::new(Cursor::new(bytes))], cfg).unwrap();
    let _ = r.wait_end(Duration::from_secs(10));
    r.abort();
});
