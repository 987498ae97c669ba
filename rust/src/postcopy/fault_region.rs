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
//! With the `continue` placement (shmem only, see [`super::placement`]) the
//! range is registered in MISSING and MINOR mode, and stale pages are
//! dropped from the guest's mapping only (`MADV_DONTNEED`), their page-cache
//! pages kept: an access then raises a MINOR fault (page cached, not mapped)
//! or, for a page the memfd never held, a MISSING one. Either waits until
//! the page is written into the page cache ([`PageCache`]) and mapped with
//! `UFFDIO_CONTINUE`. Holes are not filled in advance (`fallocate` would
//! zero every owed page during the downtime); the MISSING half of the
//! registration catches them instead.
//!
//! What MISSING mode does not see: reads and writes through the memfd itself
//! (`pread`/`pwrite`, hole-aware digests) go through the page cache, not the
//! mapping, and read a missing page as zeros without faulting.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{fallocate, FallocateFlags};
use rustix::io::Errno;
use rustix::ioctl::{ioctl, Updater};
use rustix::mm::{madvise, Advice};

use super::capability;
use super::page_cache::PageCache;
use super::page_set::PageSet;
use super::placement::{is_shmem, PlacementMode};
use super::uapi::{
    self, UffdioContinue, UffdioCopy, UffdioRange, UffdioZeropage, IOCTL_CONTINUE_BIT,
    IOCTL_COPY_BIT, IOCTL_ZEROPAGE_BIT, UFFDIO_CONTINUE, UFFDIO_COPY, UFFDIO_REGISTER_MODE_MINOR,
    UFFDIO_REGISTER_MODE_MISSING, UFFDIO_ZEROPAGE, UFFD_FEATURE_MINOR_SHMEM,
    UFFD_FEATURE_THREAD_ID,
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
    /// The memfd behind the mapping when it is shmem (the `continue`
    /// placement writes pages into it); `None` otherwise.
    fn shmem_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
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
    fn shmem_fd(&self) -> Option<BorrowedFd<'_>> {
        is_shmem(self.backing()).then(|| self.memfd()).flatten()
    }
}

pub struct FaultRegion {
    fd: OwnedFd,
    backing: Arc<dyn Backing>,
    page_size: usize,
    kernel_faults: bool,
    thread_id: bool,
    mode: PlacementMode,
    /// `continue` only: where pages are written before they are mapped.
    page_cache: Option<PageCache>,
    /// `continue` only: pages discarded as stale, whose page-cache content
    /// is overwritten when they are placed. Any other page's cached content
    /// is current and only mapped.
    stale: PageSet,
}

impl FaultRegion {
    /// Registers the whole of `backing` for `mode` (MISSING mode, plus MINOR
    /// mode for `continue`). Fails with `Unsupported` naming the missing
    /// feature when the host lacks it.
    pub fn register(backing: Arc<dyn Backing>, mode: PlacementMode) -> CoreResult<Self> {
        capability::require()?;
        let fd_len = backing.size_bytes();
        let page_cache = match mode {
            PlacementMode::Copy => None,
            PlacementMode::Continue => {
                capability::require_minor()?;
                let fd = backing.shmem_fd().ok_or_else(|| {
                    CoreError::invalid(format!(
                        "postcopy-placement continue needs memfd/shmem memory, not {}",
                        backing.kind()
                    ))
                })?;
                Some(PageCache::open(fd, fd_len)?)
            }
        };
        let unsupported = |what: &str, e: Errno| {
            CoreError::Unsupported(format!("{what}: {}", std::io::Error::from(e)))
        };
        let (fd, kernel_faults, features) =
            capability::open_with_api().map_err(|e| unsupported("userfaultfd", e))?;
        let base = backing.base() as u64;
        let len = backing.size_bytes() as u64;
        if page_cache.is_some() && features & UFFD_FEATURE_MINOR_SHMEM == 0 {
            return Err(CoreError::Unsupported(
                "post-copy placement continue unavailable: UFFDIO_API did not enable \
                 UFFD_FEATURE_MINOR_SHMEM"
                    .into(),
            ));
        }
        let reg_mode = match mode {
            PlacementMode::Copy => UFFDIO_REGISTER_MODE_MISSING,
            PlacementMode::Continue => UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR,
        };
        let ioctls = uapi::register(&fd, base, len, reg_mode).map_err(|e| match e {
            Errno::BUSY => CoreError::invalid(
                "memory is already registered with another userfaultfd \
                 (a dirty tracker or another post-copy region); close it first",
            ),
            e => unsupported(
                &format!("UFFDIO_REGISTER_MODE_MISSING on {}", backing.kind()),
                e,
            ),
        })?;
        let mut needed = vec![
            (IOCTL_COPY_BIT, "UFFDIO_COPY"),
            (IOCTL_ZEROPAGE_BIT, "UFFDIO_ZEROPAGE"),
        ];
        if page_cache.is_some() {
            needed.push((IOCTL_CONTINUE_BIT, "UFFDIO_CONTINUE"));
        }
        for (bit, name) in needed {
            if ioctls & bit == 0 {
                let _ = uapi::unregister(&fd, base, len);
                return Err(CoreError::Unsupported(format!(
                    "post-copy unavailable: {name} is not allowed on {}",
                    backing.kind()
                )));
            }
        }
        let page_size = host_page_size();
        let stale = PageSet::new(if page_cache.is_some() {
            fd_len / page_size
        } else {
            0
        });
        Ok(FaultRegion {
            fd,
            backing,
            page_size,
            kernel_faults,
            thread_id: features & UFFD_FEATURE_THREAD_ID != 0,
            mode,
            page_cache,
            stale,
        })
    }

    pub fn mode(&self) -> PlacementMode {
        self.mode
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
            let (off, len) = (start as usize * ps, n as usize * ps);
            let dropped = match self.page_cache {
                None => self.backing.discard(off, len),
                Some(_) => {
                    for p in start..start + n {
                        self.stale.insert(p as usize);
                    }
                    // SAFETY: the range is inside the registered mapping
                    // (checked above). On a shared mapping MADV_DONTNEED
                    // drops the page-table entries only; the page cache
                    // keeps the pages, so the next access is a MINOR fault.
                    unsafe {
                        madvise(
                            self.backing.base().add(off).cast(),
                            len,
                            Advice::LinuxDontNeed,
                        )
                    }
                }
            };
            dropped.map_err(|e| {
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
        if self.page_cache.is_some() {
            return Ok(self.fill_one(page, Some(src)));
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
        if self.page_cache.is_some() {
            return Ok(self.fill_one(page, None));
        }
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
        if self.page_cache.is_some() {
            return self.fill_range(start, n, None);
        }
        Self::over_range(start, n, "UFFDIO_ZEROPAGE", |p, k| self.zero_ioctl(p, k))
    }

    /// Runs a range ioctl (`ioctl(page, n)`: its result and the whole pages
    /// it did) over `n` pages from `start`, as few times as the kernel
    /// allows: going on after a part done (EAGAIN: the mapping changed) and
    /// past a page already present (EEXIST). Returns the pages present.
    fn over_range(
        start: u64,
        n: u64,
        what: &str,
        ioctl: impl Fn(u64, u64) -> (Result<(), Errno>, u64),
    ) -> CoreResult<Vec<u64>> {
        let (mut page, end, mut present) = (start, start + n, Vec::new());
        while page < end {
            match ioctl(page, end - page) {
                (Ok(()), _) => break,
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
                        format!("{what} pages [{page}, {end})"),
                        e.into(),
                    ))
                }
            }
        }
        Ok(present)
    }

    /// Places the pages of `data` (whole pages) from `start`, each
    /// atomically; a page already present is left as it is. `continue`
    /// maps the run with one `UFFDIO_CONTINUE`, `copy` takes one
    /// `UFFDIO_COPY` per page. Returns the pages found present.
    pub fn copy_run(&self, start: u64, data: &[u8]) -> CoreResult<Vec<u64>> {
        let ps = self.page_size;
        if !data.len().is_multiple_of(ps) {
            return Err(CoreError::invalid(format!(
                "run of {} bytes is not whole pages of {ps}",
                data.len()
            )));
        }
        let n = (data.len() / ps) as u64;
        self.check_pages(start, n)?;
        if self.page_cache.is_some() {
            return self.fill_range(start, n, Some(data));
        }
        let mut present = Vec::new();
        for (i, page) in data.chunks_exact(ps).enumerate() {
            let p = start + i as u64;
            match self.copy_page(p, page)? {
                Ok(()) => {}
                Err(Errno::EXIST) => present.push(p),
                Err(e) => return Err(CoreError::io(format!("UFFDIO_COPY page {p}"), e.into())),
            }
        }
        Ok(present)
    }

    /// `continue`: writes one page (`src`, or zeros) into the page cache and
    /// maps it. A page that was not discarded holds current content: it is
    /// only mapped, and answers EEXIST like a present page; only if the
    /// memfd never held it (a hole: `UFFDIO_CONTINUE` finds no page and
    /// answers EFAULT) is it written.
    fn fill_one(&self, page: u64, src: Option<&[u8]>) -> Result<(), Errno> {
        if !self.stale.contains(page as usize) {
            match self.continue_retrying(page, 1) {
                Ok(()) | Err(Errno::EXIST) => return Err(Errno::EXIST),
                Err(Errno::FAULT) => {}
                Err(e) => return Err(e),
            }
        }
        self.write_cache(page, 1, src)?;
        self.continue_retrying(page, 1)
    }

    /// `continue`: places `n` pages from `start` (`src` covers them all, or
    /// zeros). A run of stale pages, the usual case, is written into the
    /// page cache and mapped with one `UFFDIO_CONTINUE` (zeros over a hole:
    /// one `UFFDIO_ZEROPAGE`, nothing written); otherwise page by page.
    fn fill_range(&self, start: u64, n: u64, src: Option<&[u8]>) -> CoreResult<Vec<u64>> {
        let ps = self.page_size;
        let all_stale = (start..start + n).all(|p| self.stale.contains(p as usize));
        if !all_stale {
            let mut present = Vec::new();
            for p in start..start + n {
                let off = (p - start) as usize * ps;
                match self.fill_one(p, src.map(|d| &d[off..off + ps])) {
                    Ok(()) => {}
                    Err(Errno::EXIST) => present.push(p),
                    Err(e) => {
                        return Err(CoreError::io(format!("UFFDIO_CONTINUE page {p}"), e.into()))
                    }
                }
            }
            return Ok(present);
        }
        let (off, len) = (start as usize * ps, n as usize * ps);
        if src.is_none()
            && self
                .page_cache
                .as_ref()
                .is_some_and(|c| c.is_hole(off, len))
        {
            // Zeros where the memfd holds nothing: no bytes to write, the
            // MISSING half of the registration maps them as `copy` does.
            return Self::over_range(start, n, "UFFDIO_ZEROPAGE", |p, k| self.zero_ioctl(p, k));
        }
        self.write_cache(start, n, src).map_err(|e| {
            CoreError::io(
                format!("writing pages [{start}, {start}+{n}) into the memfd"),
                e.into(),
            )
        })?;
        Self::over_range(start, n, "UFFDIO_CONTINUE", |p, k| {
            self.continue_ioctl(p, k)
        })
    }

    /// Writes `n` pages from `start` (`src`, or zeros) into the page cache.
    fn write_cache(&self, start: u64, n: u64, src: Option<&[u8]>) -> Result<(), Errno> {
        let cache = self
            .page_cache
            .as_ref()
            .expect("the continue placement has a page cache");
        let (off, len) = (start as usize * self.page_size, n as usize * self.page_size);
        match src {
            Some(d) => cache.write(off, &d[..len]),
            None => cache.zero(off, len),
        }
    }

    fn continue_retrying(&self, page: u64, n: u64) -> Result<(), Errno> {
        loop {
            match self.continue_ioctl(page, n) {
                (Err(Errno::AGAIN), 0) => std::thread::yield_now(),
                (r, _) => return r,
            }
        }
    }

    /// One `UFFDIO_CONTINUE` over `n` pages from `page` (checked by the
    /// caller): maps their page-cache pages into the guest's mapping and
    /// wakes their waiters. Its result and the whole pages it mapped.
    fn continue_ioctl(&self, page: u64, n: u64) -> (Result<(), Errno>, u64) {
        let mut arg = UffdioContinue {
            range: UffdioRange {
                start: self.page_addr(page),
                len: n * self.page_size as u64,
            },
            mode: 0,
            mapped: 0,
        };
        // SAFETY: `UFFDIO_CONTINUE` takes a `struct uffdio_continue`; the
        // range is `n` pages inside the range registered in MINOR mode.
        let r = unsafe {
            ioctl(
                &self.fd,
                Updater::<UFFDIO_CONTINUE, UffdioContinue>::new(&mut arg),
            )
        };
        let done = if arg.mapped > 0 {
            arg.mapped as u64 / self.page_size as u64
        } else {
            0
        };
        (r, done)
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
