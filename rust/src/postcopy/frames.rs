//! The frames of post-copy's page channels (`docs/postcopy.md`).
//!
//! Two channels per migration, opened by the source at the switchover with
//! a `Postcopy` stream header: index 0 (`URGENT`) carries the destination's
//! page requests and the chunks they ask for, index 1 (`PUSH`) the
//! background push. Every frame is a 24-byte header, then `len` bytes:
//!
//! ```text
//! 0  tag u8 | 1..4 zero | 4 len u32 | 8 arg u64 | 16 crc32c(payload) u32 | 20 zero u32
//! ```
//!
//! | tag | direction | arg | payload |
//! |---|---|---|---|
//! | `DISCARD` | source → destination, first on `URGENT` | chunk pages | bitmap of the chunks to discard (u64 words) |
//! | `MISSING` | destination → source, first on `URGENT` after a reconnect | 0 | bitmap of the chunks still missing |
//! | `REQUEST` | destination → source | page | none |
//! | `CHUNK` | source → destination | chunk index | its bytes, or none for a chunk of zeros |
//! | `ZERO` | source → destination | first chunk index | chunk count (u64): a run of chunks of zeros |
//! | `PAGE` | source → destination, on `URGENT` | page | its bytes: one requested page of a chunk still owed |
//! | `DONE` | source → destination, on `PUSH` | chunks sent | none: every chunk went out |
//! | `PLACED` | destination → source | chunks placed | none: every chunk is in place |
//!
//! Every length is bounded before anything is allocated.

use std::io::{Read, Write};

use crate::error::{CoreError, CoreResult};
use crate::transport::{read_full, ReadFailure};

pub const URGENT: usize = 0;
pub const PUSH: usize = 1;
pub const CHANNELS: usize = 2;

pub const HEADER_LEN: usize = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    Discard = 1,
    Missing = 2,
    Request = 3,
    Chunk = 4,
    Done = 5,
    Placed = 6,
    Zero = 7,
    Page = 8,
}

impl Tag {
    fn from_u8(b: u8) -> Option<Tag> {
        Some(match b {
            1 => Tag::Discard,
            2 => Tag::Missing,
            3 => Tag::Request,
            4 => Tag::Chunk,
            5 => Tag::Done,
            6 => Tag::Placed,
            7 => Tag::Zero,
            8 => Tag::Page,
            _ => return None,
        })
    }
}

#[derive(Debug)]
pub struct Frame {
    pub tag: Tag,
    pub arg: u64,
    pub payload: Vec<u8>,
}

/// Writes one frame (header and payload in one vectored write).
pub fn write_frame(w: &mut dyn Write, tag: Tag, arg: u64, payload: &[u8]) -> CoreResult<()> {
    let mut h = [0u8; HEADER_LEN];
    h[0] = tag as u8;
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&arg.to_le_bytes());
    h[16..20].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let mut bufs = [std::io::IoSlice::new(&h), std::io::IoSlice::new(payload)];
    crate::transport::write_all_vectored(w, &mut bufs)
        .map_err(|e| CoreError::io(format!("post-copy: send {tag:?}"), e))
}

/// What reading a frame met.
pub enum ReadOutcome {
    Frame(Frame),
    /// No byte within the socket's read timeout: nothing lost, try again.
    Idle,
}

/// Reads one frame whose payload is at most `max_len` bytes.
pub fn read_frame(r: &mut dyn Read, max_len: usize) -> CoreResult<ReadOutcome> {
    let mut h = [0u8; HEADER_LEN];
    // The first byte alone, so an idle channel is told from a cut frame.
    match r.read(&mut h[..1]) {
        Ok(0) => return Err(CoreError::invalid("post-copy: the peer closed the channel")),
        Ok(_) => {}
        Err(e) if crate::transport::is_timeout(&e) => return Ok(ReadOutcome::Idle),
        Err(e) => return Err(CoreError::io("post-copy: receive", e)),
    }
    read_full(r, &mut h[1..]).map_err(failure)?;
    let tag = Tag::from_u8(h[0])
        .ok_or_else(|| CoreError::invalid(format!("post-copy: unknown frame tag {}", h[0])))?;
    if h[1..4].iter().chain(&h[20..24]).any(|&b| b != 0) {
        return Err(CoreError::invalid(
            "post-copy: reserved frame bytes are not zero",
        ));
    }
    let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) as usize;
    if len > max_len {
        return Err(CoreError::invalid(format!(
            "post-copy: {tag:?} frame of {len} bytes exceeds the limit of {max_len}"
        )));
    }
    let arg = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
    let mut payload = vec![0u8; len];
    read_full(r, &mut payload).map_err(failure)?;
    if crc32c::crc32c(&payload) != crc {
        return Err(CoreError::invalid(format!(
            "post-copy: {tag:?} frame {arg}: CRC mismatch"
        )));
    }
    Ok(ReadOutcome::Frame(Frame { tag, arg, payload }))
}

fn failure(e: ReadFailure) -> CoreError {
    CoreError::invalid(format!("post-copy: {e}"))
}

/// A chunk bitmap as u64 words, little endian.
pub fn bitmap_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The chunk bitmap of a `DISCARD` or `MISSING` payload for `chunks` chunks.
pub fn bitmap_words(payload: &[u8], chunks: usize) -> CoreResult<Vec<u64>> {
    let want = chunks.div_ceil(64) * 8;
    if payload.len() != want {
        return Err(CoreError::invalid(format!(
            "post-copy: chunk bitmap of {} bytes, expected {want}",
            payload.len()
        )));
    }
    let words: Vec<u64> = payload
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    if !chunks.is_multiple_of(64) && words.last().is_some_and(|w| w >> (chunks % 64) != 0) {
        return Err(CoreError::invalid(
            "post-copy: chunk bitmap has bits beyond the last chunk",
        ));
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Tag::Chunk, 7, b"abc").unwrap();
        write_frame(&mut buf, Tag::Request, 42, &[]).unwrap();
        let mut r = &buf[..];
        let ReadOutcome::Frame(f) = read_frame(&mut r, 3).unwrap() else {
            panic!("idle")
        };
        assert_eq!((f.tag, f.arg, &f.payload[..]), (Tag::Chunk, 7, &b"abc"[..]));
        let ReadOutcome::Frame(f) = read_frame(&mut r, 3).unwrap() else {
            panic!("idle")
        };
        assert_eq!((f.tag, f.arg), (Tag::Request, 42));
        assert!(read_frame(&mut r, 3).is_err(), "closed");
        let mut page = Vec::new();
        write_frame(&mut page, Tag::Page, 9, b"pg").unwrap();
        let ReadOutcome::Frame(f) = read_frame(&mut &page[..], 2).unwrap() else {
            panic!("idle")
        };
        assert_eq!((f.tag, f.arg, &f.payload[..]), (Tag::Page, 9, &b"pg"[..]));
        assert!(read_frame(&mut &buf[..], 2).is_err(), "too long");
        let mut bad = buf.clone();
        bad[HEADER_LEN] ^= 1;
        assert!(read_frame(&mut &bad[..], 3).is_err(), "crc");
        bad = buf.clone();
        bad[0] = 99;
        assert!(read_frame(&mut &bad[..], 3).is_err(), "tag");
        assert!(read_frame(&mut &buf[..10], 3).is_err(), "cut");
    }

    #[test]
    fn bitmaps_are_bounded() {
        let words = vec![0b1011u64];
        let b = bitmap_bytes(&words);
        assert_eq!(bitmap_words(&b, 4).unwrap(), words);
        assert!(bitmap_words(&b, 3).is_err(), "bit beyond the end");
        assert!(bitmap_words(&b, 65).is_err(), "wrong length");
    }
}
