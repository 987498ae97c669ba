//! A `Sink` takes a sender's output in place of the streaming channels.
//!
//! The channel threads still scan each packet's pages (normal or zero), copy
//! them out of guest memory and pace the writes; a sink decides where the
//! pages land and what a sync, a record and the end of the stream become.
//! The streaming path (packets on sockets, records broadcast on every
//! channel) knows no sink by name: `open` picks one from the URI. A `file:`
//! snapshot (`snapshot.rs`) is the one sink today.

use std::sync::Arc;

use super::snapshot::SnapshotFile;
use super::SenderConfig;
use crate::error::{CoreError, CoreResult};
use crate::transport::Endpoint;
use crate::wire::{Compression, RecordKind, StreamHeader};

/// Output that replaces the channels (see the module comment).
pub(super) trait Sink: Send + Sync {
    /// Writes the pages of one packet: `payload` holds one page per offset
    /// of `normal`; `zero` pages are known zero. `pace(bytes)` is called
    /// before each write, so the bandwidth cap applies to sinks too.
    fn write_pages(
        &self,
        normal: &[u64],
        zero: &[u64],
        payload: &[u8],
        page_size: usize,
        pace: &mut dyn FnMut(usize),
    ) -> std::io::Result<()>;

    /// The iteration barrier of `generation`; returns the bytes written.
    fn sync(&self, generation: u64) -> CoreResult<u64>;

    /// Appends a record (device state, a control message); returns its size.
    fn append(&self, kind: RecordKind, generation: u64, body: &[u8]) -> CoreResult<u64>;

    /// Ends the stream with the whole-memory digest; returns the bytes written.
    fn finish(&self, generation: u64, digest: u128) -> CoreResult<u64>;
}

/// The sink `ep` names, or `None` when the stream goes on channels;
/// `header` is the stream's (its kind is the sink's to set).
pub(super) fn open(
    ep: &Endpoint,
    header: &StreamHeader,
    cfg: &SenderConfig,
) -> CoreResult<Option<Arc<dyn Sink>>> {
    let Endpoint::File(path) = ep else {
        return Ok(None);
    };
    if cfg.compression != Compression::None {
        return Err(CoreError::Unsupported(
            "file: snapshots store pages at fixed offsets and cannot be compressed".into(),
        ));
    }
    Ok(Some(Arc::new(SnapshotFile::create(path, header)?)))
}
