//! Writes into the guest memfd's page cache with `pwrite`, not through any
//! mapping: the `continue` placement puts an arriving page there, where the
//! guest's (registered) mapping cannot see it until `UFFDIO_CONTINUE` maps
//! it. A write never raises a userfault (no mapping is involved), and costs
//! no page fault either, where writing through a second mapping would take
//! one per page to map it there first.

use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs::{seek, SeekFrom};
use rustix::io::{fcntl_dupfd_cloexec, pwrite, Errno};

use crate::error::{CoreError, CoreResult};

/// Zeros written per call when a run of pages is zeroed.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

pub struct PageCache {
    fd: OwnedFd,
    len: usize,
}

impl PageCache {
    /// Writes to the first `len` bytes of `fd` (the whole guest memory).
    pub fn open(fd: BorrowedFd<'_>, len: usize) -> CoreResult<Self> {
        let fd = fcntl_dupfd_cloexec(fd, 0)
            .map_err(|e| CoreError::io("dup the guest memfd", e.into()))?;
        Ok(PageCache { fd, len })
    }

    /// Writes all of `data` at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), Errno> {
        assert!(
            offset + data.len() <= self.len,
            "page-cache write out of bounds"
        );
        let mut done = 0;
        while done < data.len() {
            match pwrite(&self.fd, &data[done..], (offset + done) as u64) {
                Ok(0) => return Err(Errno::NOSPC),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether `[offset, offset + len)` holds no page at all (a hole in the
    /// memfd): zeros then need no write, `UFFDIO_ZEROPAGE` maps them.
    pub fn is_hole(&self, offset: usize, len: usize) -> bool {
        match seek(&self.fd, SeekFrom::Data(offset as u64)) {
            Ok(next) => next >= (offset + len) as u64,
            Err(Errno::NXIO) => true, // no data from `offset` to the end
            Err(_) => false,
        }
    }

    /// Writes `len` zero bytes at `offset`.
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), Errno> {
        let mut at = 0;
        while at < len {
            let n = (len - at).min(ZEROS.len());
            self.write(offset + at, &ZEROS[..n])?;
            at += n;
        }
        Ok(())
    }
}
