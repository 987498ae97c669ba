//! A range of guest memory registered with userfaultfd in MISSING mode: an
//! access to a page that is not present blocks the accessing thread and
//! queues a fault message, until the page is placed with `UFFDIO_COPY` or
//! `UFFDIO_ZEROPAGE`.
//!
//! Two backings: memfd/shmem (`GuestMemory`, MAP_SHARED) and private
//! anonymous memory (`GuestMemory` with the `anon` backing). Stale pages (those the source dirtied
//! after sending them) are discarded after registration, so no access can
//! slip in between and see stale or zero-filled content: shmem by punching a
//! hole in the memfd (page cache and page tables), anonymous memory with
//! `MADV_DONTNEED`.
//!
//! What MISSING mode does not see: reads and writes through the memfd itself
//! (`pread`/`pwrite`, hole-aware digests) go through the page cache, not the
//! mapping, and read a missing page as zeros without faulting.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustix::fs::{fallocate, FallocateFlags};
use rustix::io::Errno;
use rustix::ioctl::{ioctl, Updater};
use rustix::mm::{madvise, Advice};

use super::capability;
use super::uapi::{
    self, UffdioCopy, UffdioRange, UffdioZeropage, IOCTL_COPY_BIT, IOCTL_ZEROPAGE_BIT, UFFDIO_COPY,
    UFFDIO_ZEROPAGE, UFFD_FEATURE_THREAD_ID,
};
use crate::error::{CoreError, CoreResult};
use crate::memory::{host_page_size, GuestMemory};

/// A mapping post-copy can register, and how to drop a page of it.
pub trait Backing: Send + Sync {
    fn base(&self) -> *mut u8;
    fn size_bytes(&self) -> usize;
    /// Drops `[offset, offset + len)` so the next access faults as missing.
    fn discard(&self, offset: usize, len: usize) -> Result<(), Errno>;
    fn kind(&self) -> &'static str;
}

impl Backing for GuestMemory {
    fn base(&self) -> *mut u8 {
        self.as_ptr()
    }
    fn size_bytes(&self) -> usize {
        GuestMemory::len(self)
    }
    fn discard(&self, offset: usize, len: usize) -> Result<(), Errno> {
        match self.memfd() {
            // The mapping covers the memfd from offset 0.
            Some(fd) => fallocate(
                fd,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset as u64,
                len as u64,
            ),
            // SAFETY: the range is inside the mapping (checked by the
            // caller); MADV_DONTNEED on private anonymous memory drops the
            // pages, and the next access faults as missing.
            None => unsafe {
                madvise(self.as_ptr().add(offset).cast(), len, Advice::LinuxDontNeed)
            },
        }
    }
    fn kind(&self) -> &'static str {
        if self.memfd().is_some() {
            "memfd/shmem"
        } else {
            "anonymous memory"
        }
    }
}

pub struct FaultRegion {
    fd: OwnedFd,
    backing: Arc<dyn Backing>,
    page_size: usize,
    kernel_faults: bool,
    thread_id: bool,
}

impl FaultRegion {
    /// Registers the whole of `backing` in MISSING mode. Fails with
    /// `Unsupported` naming the missing feature when the host lacks it.
    pub fn register(backing: Arc<dyn Backing>) -> CoreResult<Self> {
        capability::require()?;
        let unsupported = |what: &str, e: Errno| {
            CoreError::Unsupported(format!("{what}: {}", std::io::Error::from(e)))
        };
        let (fd, kernel_faults, features) =
            capability::open_with_api().map_err(|e| unsupported("userfaultfd", e))?;
        let base = backing.base() as u64;
        let len = backing.size_bytes() as u64;
        let ioctls = uapi::register_missing(&fd, base, len).map_err(|e| match e {
            Errno::BUSY => CoreError::invalid(
                "memory is already registered with another userfaultfd \
                 (a dirty tracker or another post-copy region); close it first",
            ),
            e => unsupported(
                &format!("UFFDIO_REGISTER_MODE_MISSING on {}", backing.kind()),
                e,
            ),
        })?;
        for (bit, name) in [
            (IOCTL_COPY_BIT, "UFFDIO_COPY"),
            (IOCTL_ZEROPAGE_BIT, "UFFDIO_ZEROPAGE"),
        ] {
            if ioctls & bit == 0 {
                return Err(CoreError::Unsupported(format!(
                    "post-copy unavailable: {name} is not allowed on {}",
                    backing.kind()
                )));
            }
        }
        Ok(FaultRegion {
            fd,
            backing,
            page_size: host_page_size(),
            kernel_faults,
            thread_id: features & UFFD_FEATURE_THREAD_ID != 0,
        })
    }

    pub fn uffd(&self) -> &OwnedFd {
        &self.fd
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn num_pages(&self) -> usize {
        self.backing.size_bytes() / self.page_size
    }

    /// Whether faults raised inside the kernel are delivered (see
    /// `capability::PostcopyCapability::kernel_faults`).
    pub fn kernel_faults(&self) -> bool {
        self.kernel_faults
    }

    /// Whether fault messages carry the faulting thread's id.
    pub fn thread_ids(&self) -> bool {
        self.thread_id
    }

    pub fn page_addr(&self, page: u64) -> u64 {
        self.backing.base() as u64 + page * self.page_size as u64
    }

    /// The page holding `addr`, if it is inside the region.
    pub fn page_of(&self, addr: u64) -> Option<u64> {
        let off = addr.checked_sub(self.backing.base() as u64)?;
        (off < self.backing.size_bytes() as u64).then(|| off / self.page_size as u64)
    }

    fn check_pages(&self, start: u64, n: u64) -> CoreResult<()> {
        match start.checked_add(n) {
            Some(end) if end <= self.num_pages() as u64 => Ok(()),
            _ => Err(CoreError::invalid(format!(
                "pages [{start}, {start}+{n}) exceed the region's {} pages",
                self.num_pages()
            ))),
        }
    }

    /// Drops each `(start_page, n)` range; returns the pages discarded. Every
    /// range is checked before any is dropped.
    pub fn discard(&self, ranges: &[(u64, u64)]) -> CoreResult<u64> {
        for &(start, n) in ranges {
            self.check_pages(start, n)?;
        }
        let ps = self.page_size;
        let mut total = 0;
        for &(start, n) in ranges.iter().filter(|r| r.1 > 0) {
            self.backing
                .discard(start as usize * ps, n as usize * ps)
                .map_err(|e| {
                    CoreError::io(format!("discarding pages [{start}, {start}+{n})"), e.into())
                })?;
            total += n;
        }
        Ok(total)
    }

    /// Copies one page atomically into a missing page and wakes its waiters.
    /// EAGAIN (the mapping was changing) is retried here; EEXIST (already
    /// present) is returned to the caller.
    pub fn copy_page(&self, page: u64, src: &[u8]) -> CoreResult<Result<(), Errno>> {
        self.check_pages(page, 1)?;
        if src.len() != self.page_size {
            return Err(CoreError::invalid(format!(
                "page data is {} bytes, expected {}",
                src.len(),
                self.page_size
            )));
        }
        loop {
            let mut arg = UffdioCopy {
                dst: self.page_addr(page),
                src: src.as_ptr() as u64,
                len: self.page_size as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: `UFFDIO_COPY` takes a `struct uffdio_copy`; `dst` is one
            // page inside the registered range and `src` a readable buffer of
            // exactly one page that outlives the call.
            match unsafe { ioctl(&self.fd, Updater::<UFFDIO_COPY, UffdioCopy>::new(&mut arg)) } {
                Err(Errno::AGAIN) if arg.copy <= 0 => std::thread::yield_now(),
                r => return Ok(r),
            }
        }
    }

    /// Maps the zero page at a missing page and wakes its waiters.
    pub fn zero_page(&self, page: u64) -> CoreResult<Result<(), Errno>> {
        self.check_pages(page, 1)?;
        loop {
            match self.zero_ioctl(page, 1) {
                (Err(Errno::AGAIN), 0) => std::thread::yield_now(),
                (r, _) => return Ok(r),
            }
        }
    }

    /// Maps the zero page at the `n` missing pages from `start` with as few
    /// `UFFDIO_ZEROPAGE` calls as the kernel allows (one for a range of
    /// missing pages), waking their waiters. A page already present is left
    /// as it is. Returns the pages found present.
    pub fn zero_range(&self, start: u64, n: u64) -> CoreResult<Vec<u64>> {
        self.check_pages(start, n)?;
        let (mut page, end, mut present) = (start, start + n, Vec::new());
        while page < end {
            match self.zero_ioctl(page, end - page) {
                (Ok(()), _) => break,
                // Stopped part way (the mapping changed): go on after the
                // pages it did.
                (Err(Errno::AGAIN), done) => {
                    if done == 0 {
                        std::thread::yield_now();
                    }
                    page += done;
                }
                (Err(Errno::EXIST), done) => {
                    present.push(page + done);
                    page += done + 1;
                }
                (Err(e), _) => {
                    return Err(CoreError::io(
                        format!("UFFDIO_ZEROPAGE pages [{page}, {end})"),
                        e.into(),
                    ))
                }
            }
        }
        Ok(present)
    }

    /// One `UFFDIO_ZEROPAGE` over `n` pages from `page` (checked by the
    /// caller): its result and the whole pages it mapped.
    fn zero_ioctl(&self, page: u64, n: u64) -> (Result<(), Errno>, u64) {
        let mut arg = UffdioZeropage {
            range: UffdioRange {
                start: self.page_addr(page),
                len: n * self.page_size as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: `UFFDIO_ZEROPAGE` takes a `struct uffdio_zeropage`; the
        // range is `n` pages inside the registered range.
        let r = unsafe {
            ioctl(
                &self.fd,
                Updater::<UFFDIO_ZEROPAGE, UffdioZeropage>::new(&mut arg),
            )
        };
        let done = if arg.zeropage > 0 {
            arg.zeropage as u64 / self.page_size as u64
        } else {
            0
        };
        (r, done)
    }
}

impl Drop for FaultRegion {
    fn drop(&mut self) {
        // Closing the fd afterwards wakes any thread still blocked on a
        // missing page.
        let _ = uapi::unregister(
            &self.fd,
            self.backing.base() as u64,
            self.backing.size_bytes() as u64,
        );
    }
}
