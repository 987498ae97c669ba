//! A channel's reading loop: every record is read and validated before
//! anything is applied, in order, until the end record.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::no_peer::NoPeer;
use super::pages::{DecodeError, Destination, PageDecoder, PageRecord};
use super::{lock, Shared};
use crate::error::{CoreError, CoreResult};
use crate::order::ChannelOrder;
use crate::transport::{self, ReadFailure};
use crate::wire::{RecordHeader, RecordKind, DIGEST_LEN, RECORD_HEADER_LEN};

/// Which records a stream may carry.
#[derive(Clone)]
pub enum StreamRole {
    /// A data channel: pages, device state, syncs, end.
    Data,
    /// A snapshot's record log: device state, control messages (queued in
    /// its `NoPeer` port for `control_recv`), end.
    Log(Arc<NoPeer>),
}

/// Where a channel's bytes come from.
pub struct ChannelInput {
    pub reader: Box<dyn Read + Send>,
    /// The plain socket under `reader`, for receiving pages straight into
    /// memory; `None` for TLS and for readers that are not sockets.
    pub direct: Option<OwnedFd>,
}

impl ChannelInput {
    pub fn buffered(reader: Box<dyn Read + Send>) -> Self {
        ChannelInput {
            reader,
            direct: None,
        }
    }
}

/// Reads channel `idx` until its end record.
pub fn run_channel(
    sh: &Shared,
    idx: u32,
    role: StreamRole,
    input: &mut ChannelInput,
) -> CoreResult<()> {
    ChannelReader {
        sh,
        idx,
        role,
        order: ChannelOrder::default(),
        pages: PageDecoder::new(&sh.stream),
        expect: 0,
    }
    .run(input)
}

struct ChannelReader<'a> {
    sh: &'a Shared,
    idx: u32,
    role: StreamRole,
    order: ChannelOrder,
    pages: PageDecoder,
    /// The number of the next record.
    expect: u64,
}

impl ChannelReader<'_> {
    fn run(&mut self, input: &mut ChannelInput) -> CoreResult<()> {
        loop {
            self.sh.check_abort(self.idx, self.expect)?;
            let (h, raw) = self.next_header(&mut *input.reader)?;
            let r = &mut *input.reader;
            match h.kind {
                RecordKind::Pages { .. } => self.on_pages(input, &h, &raw)?,
                RecordKind::Device { .. } => self.on_device(r, &h, &raw)?,
                RecordKind::Sync => self.on_sync(&h, &raw)?,
                RecordKind::Control => self.on_control(r, &h, &raw)?,
                RecordKind::End => {
                    self.on_end(r, &h, &raw)?;
                    self.account(&h);
                    return Ok(());
                }
            }
            self.account(&h);
            self.expect += 1;
        }
    }

    fn perr(&self, msg: String) -> CoreError {
        CoreError::Protocol {
            channel: self.idx,
            packet: self.expect,
            msg,
        }
    }

    fn read_err(&self, what: &str, f: ReadFailure) -> CoreError {
        match f {
            ReadFailure::Stalled => transport::timeout_error(format!(
                "channel {}, packet {}: {what}: stalled peer, no data for {:?}",
                self.idx, self.expect, self.sh.cfg.io_timeout
            )),
            f => self.perr(format!("{what}: {f}")),
        }
    }

    /// Reads a record header and checks its bounds, its number and that
    /// this stream may carry it.
    fn next_header(&self, r: &mut dyn Read) -> CoreResult<(RecordHeader, [u8; RECORD_HEADER_LEN])> {
        let mut raw = [0u8; RECORD_HEADER_LEN];
        transport::read_full(r, &mut raw).map_err(|f| self.read_err("record header", f))?;
        let h = RecordHeader::decode(&raw, &self.sh.stream).map_err(|m| self.perr(m))?;
        if h.number != self.expect {
            return Err(self.perr(format!(
                "record number {} where {} was expected",
                h.number, self.expect
            )));
        }
        let allowed = matches!(
            (&self.role, h.kind),
            (
                StreamRole::Data,
                RecordKind::Pages { .. } | RecordKind::Sync
            ) | (StreamRole::Log(_), RecordKind::Control)
                | (_, RecordKind::Device { .. } | RecordKind::End)
        );
        if !allowed {
            return Err(self.perr(format!("record {:?} is not allowed on this stream", h.kind)));
        }
        Ok((h, raw))
    }

    /// Reads a body of `len` bytes and checks the record's CRC over it.
    fn read_body(
        &self,
        r: &mut dyn Read,
        h: &RecordHeader,
        raw: &[u8; RECORD_HEADER_LEN],
        what: &str,
        body: &mut [u8],
    ) -> CoreResult<()> {
        transport::read_full(r, body).map_err(|f| self.read_err(what, f))?;
        h.verify_crc(raw, body).map_err(|m| self.perr(m))
    }

    fn on_pages(
        &mut self,
        input: &mut ChannelInput,
        h: &RecordHeader,
        raw: &[u8; RECORD_HEADER_LEN],
    ) -> CoreResult<()> {
        // The order is checked on the header, before any page is read.
        self.order
            .on_pages(h.generation)
            .map_err(|e| self.perr(e.to_string()))?;
        let sh = self.sh;
        let direct = input.direct.as_ref().map(|fd| fd.as_fd());
        let rec = PageRecord { header: h, raw };
        let to = Destination {
            stream: &sh.stream,
            mem: &sh.mem,
            digest: &sh.digest,
        };
        let pages = self
            .pages
            .decode(&mut *input.reader, direct, &rec, &to)
            .map_err(|e| match e {
                DecodeError::Read(what, f) => self.read_err(what, f),
                DecodeError::Bad(m) => self.perr(m),
                DecodeError::Core(e) => e,
            })?;
        if pages.rewritten {
            sh.counters.live_rewritten.fetch_add(1, Ordering::Relaxed);
        }
        sh.applied(&pages.normal, &pages.zero)
    }

    fn on_device(
        &mut self,
        r: &mut dyn Read,
        h: &RecordHeader,
        raw: &[u8; RECORD_HEADER_LEN],
    ) -> CoreResult<()> {
        let RecordKind::Device {
            seq,
            device_id,
            last,
        } = h.kind
        else {
            unreachable!("dispatched on the kind")
        };
        let len = h.body_len as usize;
        // Bounded by MAX_DEVICE_CHUNK in decode, and by the device buffer's
        // free room before it is allocated.
        self.sh.reserve_device(self.idx, self.expect, len)?;
        let mut chunk = vec![0u8; len];
        match self.read_body(r, h, raw, "DEVS body", &mut chunk) {
            Ok(()) => {
                self.sh.push_device((device_id, seq, chunk, last));
                Ok(())
            }
            Err(e) => {
                self.sh.release_device(len);
                Err(e)
            }
        }
    }

    fn on_sync(&mut self, h: &RecordHeader, raw: &[u8; RECORD_HEADER_LEN]) -> CoreResult<()> {
        h.verify_crc(raw, &[]).map_err(|m| self.perr(m))?;
        self.order
            .on_sync(h.generation)
            .map_err(|e| self.perr(e.to_string()))?;
        self.sh.barrier(self.idx, self.expect, h.generation)?;
        self.sh.counters.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn on_control(
        &mut self,
        r: &mut dyn Read,
        h: &RecordHeader,
        raw: &[u8; RECORD_HEADER_LEN],
    ) -> CoreResult<()> {
        let mut buf = vec![0u8; h.body_len as usize];
        self.read_body(r, h, raw, "CTRL body", &mut buf)?;
        let StreamRole::Log(port) = &self.role else {
            unreachable!("next_header admits control records only on a log")
        };
        port.push(buf);
        Ok(())
    }

    fn on_end(
        &mut self,
        r: &mut dyn Read,
        h: &RecordHeader,
        raw: &[u8; RECORD_HEADER_LEN],
    ) -> CoreResult<()> {
        let mut d = [0u8; DIGEST_LEN];
        self.read_body(r, h, raw, "END body", &mut d)?;
        lock(&self.sh.done)
            .digests
            .push((self.idx, u128::from_le_bytes(d)));
        Ok(())
    }

    fn account(&self, h: &RecordHeader) {
        let bytes = (RECORD_HEADER_LEN + h.body_len as usize) as u64;
        self.sh.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(c) = self.sh.channel_packets.get(self.idx as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}
