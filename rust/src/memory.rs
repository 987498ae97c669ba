//! Guest memory: one page-aligned mapping, backed as [`crate::backing`]
//! describes (memfd by default).
//!
//! The mapping is shared by every thread of the process: vCPU threads write
//! it, the sender reads it while they run, the receiver writes it on the
//! destination. Concurrent access is the nature of live migration; all access
//! goes through raw pointers and byte copies, never through `&mut [u8]`
//! references that would claim exclusivity.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;

use rustix::mm::munmap;
use xxhash_rust::xxh3::Xxh3;

use crate::backing::{self, Backing};
use crate::error::{CoreError, CoreResult};
use crate::pagemap;

/// The longest span of pages `GuestMemory::anon_holes` reads the page
/// tables for at once (512 KiB of pagemap entries).
pub const MAX_HOLE_QUERY: usize = 1 << 16;

/// The host page size, which is also mig's unit of tracking and transfer.
pub fn host_page_size() -> usize {
    rustix::param::page_size()
}

/// How much `populate` faults in per call, at least (a multiple of every
/// page size up to 64 MiB; larger huge pages go one page per call).
const POPULATE_STEP: usize = 64 << 20;

pub struct GuestMemory {
    /// The memfd, as a `File` for positioned reads; `None` for anonymous
    /// memory.
    fd: Option<File>,
    base: NonNull<u8>,
    len: usize,
    page_size: usize,
    backing: Backing,
    /// The unit the kernel allocates this memory in when it can.
    alloc_page_size: usize,
}

// SAFETY: the mapping lives as long as the struct; all access is through raw
// pointers with byte-wise copies, so sharing the handle between threads cannot
// create aliasing `&mut` references. Racing reads of pages being written are
// intended (pre-copy re-sends them) and are plain byte copies.
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send` above.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Allocates `size` bytes of zeroed, memfd-backed shared memory.
    pub fn new(size: usize) -> CoreResult<Self> {
        Self::with_backing(size, Backing::Memfd)
    }

    /// Allocates `size` bytes of zeroed memory with the given backing.
    pub fn with_backing(size: usize, backing: Backing) -> CoreResult<Self> {
        let page_size = host_page_size();
        if size == 0 || !size.is_multiple_of(page_size) {
            return Err(CoreError::invalid(format!(
                "memory size {size} is not a positive multiple of the page size {page_size}"
            )));
        }
        let m = backing::map(size, backing)?;
        Ok(GuestMemory {
            fd: m.fd,
            base: m.base,
            len: m.len,
            page_size,
            backing,
            alloc_page_size: m.alloc_page_size,
        })
    }

    /// Loads a raw memory image; its size must be a multiple of the page size.
    pub fn from_image(path: &Path, backing: Backing) -> CoreResult<Self> {
        let mut file =
            File::open(path).map_err(|e| CoreError::io(format!("open {}", path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| CoreError::io(format!("stat {}", path.display()), e))?
            .len() as usize;
        let mem = GuestMemory::with_backing(size, backing)?;
        crate::image_load::load(&mem, &mut file, path)?;
        Ok(mem)
    }

    /// Saves the whole memory as a raw image.
    pub fn to_image(&self, path: &Path) -> CoreResult<()> {
        let mut file = File::create(path)
            .map_err(|e| CoreError::io(format!("create {}", path.display()), e))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < self.len {
            let n = buf.len().min(self.len - off);
            self.read_bytes(off, &mut buf[..n])?;
            file.write_all(&buf[..n])
                .map_err(|e| CoreError::io(format!("write {}", path.display()), e))?;
            off += n;
        }
        file.sync_all()
            .map_err(|e| CoreError::io(format!("fsync {}", path.display()), e))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn num_pages(&self) -> usize {
        self.len / self.page_size
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// The memfd, for sharing the memory with another process; `None` for
    /// anonymous memory.
    /// The memfd behind the mapping, if it has one (anonymous memory has not).
    pub fn memfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.fd.as_ref().map(|f| f.as_fd())
    }

    pub fn fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// The memfd when it takes `write(2)` (shmem does, hugetlbfs not):
    /// filling it that way allocates pages without faulting them in.
    pub fn writable_file(&self) -> Option<&File> {
        match self.backing {
            Backing::Memfd | Backing::MemfdThp => self.fd.as_ref(),
            _ => None,
        }
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The unit the kernel allocates this memory in when it can: the huge
    /// page size for the THP and hugetlb backings.
    pub fn alloc_page_size(&self) -> usize {
        self.alloc_page_size
    }

    /// Bytes the kernel backs with huge pages right now: what the memory
    /// actually got, which for THP depends on the kernel finding free huge
    /// pages at fault time.
    pub fn huge_bytes(&self) -> usize {
        backing::huge_bytes(self.base.as_ptr() as usize, self.len)
    }

    /// Populates `[offset, offset + len)` for writing (`MADV_POPULATE_WRITE`,
    /// Linux 5.14): the kernel allocates and zeroes the pages now, so later
    /// stores do not fault. Pages already present keep their content.
    ///
    /// It goes `POPULATE_STEP` bytes per call: the kernel holds the process's
    /// mmap lock across one call, and on a host where fresh pages are slow
    /// (a hypervisor taking free memory back) one call over gigabytes would
    /// stall every thread that maps memory (thread stacks, large buffers)
    /// for seconds, and with them the migration that runs meanwhile.
    pub fn populate(&self, offset: usize, len: usize) -> CoreResult<()> {
        self.check_range(offset, len)?;
        self.advise_in_steps(offset, len, rustix::mm::Advice::LinuxPopulateWrite)
            .map_err(|e| match e {
                rustix::io::Errno::INVAL => CoreError::Unsupported(
                    "MADV_POPULATE_WRITE is not supported (needs Linux 5.14)".into(),
                ),
                e => CoreError::io("MADV_POPULATE_WRITE", e.into()),
            })
    }

    /// Maps the never-written pages of `[offset, offset + len)` to the
    /// shared zero page (`MADV_POPULATE_READ`, Linux 5.14): anonymous
    /// memory allocates nothing for it. Content is kept.
    pub fn populate_read(&self, offset: usize, len: usize) -> CoreResult<()> {
        self.check_range(offset, len)?;
        self.advise_in_steps(offset, len, rustix::mm::Advice::LinuxPopulateRead)
            .map_err(|e| CoreError::io("MADV_POPULATE_READ", e.into()))
    }

    /// `madvise(advice)` over `[offset, offset + len)`, which the caller
    /// checked lies in the mapping, `POPULATE_STEP` bytes per call.
    fn advise_in_steps(
        &self,
        offset: usize,
        len: usize,
        advice: rustix::mm::Advice,
    ) -> Result<(), rustix::io::Errno> {
        let end = offset + len;
        let stride = POPULATE_STEP.max(self.alloc_page_size());
        let mut at = offset;
        while at < end {
            let step = stride.min(end - at);
            // SAFETY: advice on a checked range of our mapping; populating
            // only faults pages in, it never changes their content.
            unsafe { rustix::mm::madvise(self.base.as_ptr().add(at).cast(), step, advice) }?;
            at += step;
        }
        Ok(())
    }

    /// Byte ranges that may hold data; everything else reads as zeros and
    /// is not allocated. memfd: its data extents (`SEEK_DATA`); anonymous
    /// and hugetlb memory: the pages present or swapped in this process's
    /// page tables (`PAGEMAP_SCAN`). On any doubt the whole memory counts.
    pub fn data_ranges(&self) -> Vec<(usize, usize)> {
        let found = match self.seekable() {
            Some(fd) => seek_data_ranges(fd, self.len),
            None => self.present_ranges(0, self.len, false),
        };
        found.unwrap_or_else(|| vec![(0, self.len)])
    }

    /// Pages of `[offset, offset + len)` that hold data as byte ranges:
    /// present or swapped in this process's page tables, and not the shared
    /// zero page (which a read of a hole maps). With `first_only`, the first
    /// range only.
    fn present_ranges(
        &self,
        offset: usize,
        len: usize,
        first_only: bool,
    ) -> Option<Vec<(usize, usize)>> {
        let pagemap = pagemap::open_pagemap().ok()?;
        // Data and holes alternate at worst page by page.
        let regions = if first_only {
            1
        } else {
            (len / self.page_size / 2 + 1).min(pagemap::SCAN_REGIONS)
        };
        let mut buf = vec![pagemap::PageRegion::default(); regions];
        let query = pagemap::Query {
            flags: 0,
            category_mask: pagemap::PAGE_IS_PFNZERO,
            inverted: pagemap::PAGE_IS_PFNZERO,
            anyof_mask: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED,
            return_mask: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED,
            first_only,
        };
        let base = self.base.as_ptr() as u64;
        let (start, end) = (base + offset as u64, base + (offset + len) as u64);
        let mut out = Vec::new();
        pagemap::scan(&pagemap, &mut buf, query, start, end, |s, e| {
            let (s, e) = (s.clamp(start, end), e.clamp(start, end));
            out.push(((s - base) as usize, (e - base) as usize));
        })
        .ok()?;
        Some(out)
    }

    /// Anonymous memory only: for each of `count` pages from `first`,
    /// whether it is a hole, known from this process's page tables without
    /// touching it: not present, and either empty or holding only a marker
    /// (the dirty tracker's write-protect marker; a swapped-out page is
    /// data). `None` for other backings (a memfd's pages live in its page
    /// cache, not in the page tables), for spans longer than
    /// `MAX_HOLE_QUERY` pages, and on errors.
    pub fn anon_holes(&self, first: usize, count: usize) -> Option<Vec<bool>> {
        if !matches!(self.backing, Backing::Anon | Backing::AnonThp) || count > MAX_HOLE_QUERY {
            return None;
        }
        self.check_range(first * self.page_size, count * self.page_size)
            .ok()?;
        let vpage = self.base.as_ptr() as usize / self.page_size + first;
        let entries = pagemap::read_entries(vpage, count).ok()?;
        Some(entries.into_iter().map(pagemap::entry_is_hole).collect())
    }

    /// A raw pointer to `[offset, offset + len)` after checking that the
    /// range lies inside the mapping: for the kernel to write into (`readv`).
    pub fn range_ptr(&self, offset: usize, len: usize) -> CoreResult<*mut u8> {
        self.check_range(offset, len)?;
        // SAFETY: the range was checked against the mapping.
        Ok(unsafe { self.base.as_ptr().add(offset) })
    }

    fn check_range(&self, offset: usize, len: usize) -> CoreResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(CoreError::invalid(format!(
                "range {offset}+{len} lies outside guest memory of {} bytes",
                self.len
            ))),
        }
    }

    /// Copies bytes out of guest memory (possibly while vCPUs write it).
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) -> CoreResult<()> {
        self.check_range(offset, out.len())?;
        // SAFETY: the range was checked against the mapping; `out` is a
        // distinct Rust buffer, so the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    /// Copies bytes into guest memory.
    pub fn write_bytes(&self, offset: usize, data: &[u8]) -> CoreResult<()> {
        self.check_range(offset, data.len())?;
        // SAFETY: the range was checked against the mapping; `data` is a
        // distinct Rust buffer, so the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Zero-fills a byte range of guest memory.
    pub fn zero_bytes(&self, offset: usize, len: usize) -> CoreResult<()> {
        self.check_range(offset, len)?;
        // SAFETY: the range was checked against the mapping.
        unsafe { std::ptr::write_bytes(self.base.as_ptr().add(offset), 0, len) };
        Ok(())
    }

    /// A read-only view of a page range, for hashing and scanning.
    ///
    /// # Safety
    /// The caller accepts that other threads may write the range while the
    /// slice lives (the bytes may change under it); it must only be used for
    /// byte-wise reads whose result is allowed to be stale.
    pub unsafe fn racy_slice(&self, offset: usize, len: usize) -> CoreResult<&[u8]> {
        self.check_range(offset, len)?;
        Ok(std::slice::from_raw_parts(
            self.base.as_ptr().add(offset),
            len,
        ))
    }

    /// xxh3-128 digest of pages `[first, first + count)`.
    ///
    /// Works in 1 MiB chunks: a chunk that is all hole (never written) is
    /// hashed as zeros without reading it (reading a shmem hole through the
    /// mapping would allocate it); a chunk of data and holes is read with
    /// `pread`, which returns zeros for holes without allocating; a chunk of
    /// data only is hashed straight from the mapping.
    pub fn digest_pages(&self, first: usize, count: usize) -> CoreResult<u128> {
        let off = first
            .checked_mul(self.page_size)
            .ok_or_else(|| CoreError::invalid("page index overflows"))?;
        let len = count
            .checked_mul(self.page_size)
            .ok_or_else(|| CoreError::invalid("page count overflows"))?;
        self.check_range(off, len)?;
        const CHUNK: usize = 1 << 20;
        static ZEROS: [u8; CHUNK] = [0; CHUNK];
        let mut buf = vec![0u8; CHUNK.min(len)];
        let mut hasher = Xxh3::new();
        let end = off + len;
        let mut pos = off;
        // The data extent at or after the current position, found once per
        // extent (a SEEK_HOLE walks the whole extent, so not once per chunk).
        let mut extent = (0, 0);
        while pos < end {
            let n = CHUNK.min(end - pos);
            if extent.1 <= pos {
                extent = self.data_extent(pos, end);
            }
            let kind = if extent.0 >= pos + n {
                Extent::Hole
            } else if extent.0 <= pos && extent.1 >= pos + n {
                Extent::Data
            } else {
                Extent::Mixed
            };
            match kind {
                Extent::Hole => hasher.update(&ZEROS[..n]),
                Extent::Data => {
                    // SAFETY: a digest of memory that is being written is
                    // some mixture of old and new bytes; callers pause
                    // writers first when they need a stable answer.
                    hasher.update(unsafe { self.racy_slice(pos, n)? })
                }
                // Anonymous memory has no fd to pread; reading its holes
                // through the mapping maps the shared zero page, no memory.
                Extent::Mixed if self.seekable().is_none() => {
                    // SAFETY: as for `Extent::Data`.
                    hasher.update(unsafe { self.racy_slice(pos, n)? })
                }
                Extent::Mixed => {
                    self.pread_exact(pos, &mut buf[..n])?;
                    hasher.update(&buf[..n]);
                }
            }
            pos += n;
        }
        Ok(hasher.digest128())
    }

    /// The first data extent at or after `pos` as `[start, end)`, clipped
    /// to `limit` (`(limit, limit)` if none). On errors the whole rest counts
    /// as data, which is always hashed correctly.
    fn data_extent(&self, pos: usize, limit: usize) -> (usize, usize) {
        use rustix::fs::{seek, SeekFrom};
        let Some(fd) = self.seekable() else {
            return match self.present_ranges(pos, limit - pos, true) {
                Some(r) => r
                    .first()
                    .map_or((limit, limit), |&(s, e)| (s, e.max(s + 1))),
                None => (pos, limit),
            };
        };
        match seek(fd, SeekFrom::Data(pos as u64)) {
            Ok(start) => {
                let start = (start as usize).clamp(pos, limit);
                let stop = seek(fd, SeekFrom::Hole(start as u64))
                    .map_or(limit, |h| (h as usize).min(limit));
                (start, stop.max(start + 1).min(limit.max(start + 1)))
            }
            Err(rustix::io::Errno::NXIO) => (limit, limit),
            Err(_) => (pos, limit),
        }
    }

    /// The memfd when it answers `SEEK_DATA`/`SEEK_HOLE` (shmem does;
    /// hugetlbfs reports everything as data).
    fn seekable(&self) -> Option<&File> {
        match self.backing {
            Backing::Memfd | Backing::MemfdThp => self.fd.as_ref(),
            _ => None,
        }
    }

    /// Whether `[start, end)` was never written (a hole: a memfd's, or
    /// pages absent from the page tables of anonymous memory): it reads as
    /// zeros, and reading it through a memfd mapping would allocate it. A
    /// page written before the call is data by then. On errors, false.
    pub fn is_hole(&self, start: usize, end: usize) -> bool {
        use rustix::fs::{seek, SeekFrom};
        let Some(fd) = self.seekable() else {
            return self
                .check_range(start, end.saturating_sub(start))
                .ok()
                .and_then(|()| self.present_ranges(start, end - start, true))
                .is_some_and(|r| r.is_empty());
        };
        match seek(fd, SeekFrom::Data(start as u64)) {
            Ok(data) => data as usize >= end,
            Err(rustix::io::Errno::NXIO) => true,
            Err(_) => false,
        }
    }

    /// Reads through the memfd; only for memory that has one (`Extent::Mixed`
    /// is found only through `seekable`).
    fn pread_exact(&self, offset: usize, out: &mut [u8]) -> CoreResult<()> {
        let fd = self
            .fd
            .as_ref()
            .ok_or_else(|| CoreError::invalid("anonymous memory has no fd to read"))?;
        fd.read_exact_at(out, offset as u64)
            .map_err(|e| CoreError::io("pread guest memory", e))
    }

    /// xxh3-128 digest of the whole memory.
    pub fn digest(&self) -> u128 {
        self.digest_pages(0, self.num_pages())
            .expect("the whole memory is always in range")
    }
}

/// A memfd's data extents as byte ranges (`None` if the file system cannot
/// tell).
fn seek_data_ranges(fd: &File, len: usize) -> Option<Vec<(usize, usize)>> {
    use rustix::fs::{seek, SeekFrom};
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < len as u64 {
        match seek(fd, SeekFrom::Data(off)) {
            Ok(start) => {
                let end = seek(fd, SeekFrom::Hole(start))
                    .unwrap_or(len as u64)
                    .max(start + 1);
                out.push((start as usize, (end as usize).min(len)));
                off = end;
            }
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return None,
        }
    }
    Some(out)
}

/// xxh3-128 of a plain buffer (device state): the digest guest memory uses.
pub fn digest_bytes(data: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(data)
}

enum Extent {
    Hole,
    Data,
    Mixed,
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe the mapping created in `new`, and no
        // borrow of it can outlive `self`.
        let _ = unsafe { munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unaligned_size() {
        let err = GuestMemory::new(4097).err().expect("must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("4097") && msg.contains(&host_page_size().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn write_read_digest_roundtrip() {
        let ps = host_page_size();
        let mem = GuestMemory::new(ps * 8).unwrap();
        let zero_digest = mem.digest();
        mem.write_bytes(ps * 3 + 5, b"hello").unwrap();
        let mut out = [0u8; 5];
        mem.read_bytes(ps * 3 + 5, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert_ne!(mem.digest(), zero_digest);
        assert_eq!(mem.digest_pages(0, 3).unwrap(), {
            let other = GuestMemory::new(ps * 8).unwrap();
            other.digest_pages(0, 3).unwrap()
        });
        assert!(mem.write_bytes(ps * 8 - 2, b"abc").is_err());
    }

    #[test]
    fn digest_of_holes_data_and_mixed_chunks_matches_a_plain_hash() {
        let ps = host_page_size();
        let n = (3 << 20) / ps; // three 1 MiB chunks: data, mixed, hole
        let mem = GuestMemory::new(n * ps).unwrap();
        let mut plain = vec![0u8; n * ps];
        let mut fill = |p: usize, v: u8| {
            mem.write_bytes(p * ps, &vec![v; ps]).unwrap();
            plain[p * ps..(p + 1) * ps].fill(v);
        };
        for p in 0..n / 3 {
            fill(p, 1 + (p % 200) as u8);
        }
        for p in (n / 3..2 * n / 3).step_by(3) {
            fill(p, 9);
        }
        assert_eq!(mem.digest(), xxhash_rust::xxh3::xxh3_128(&plain));
        assert_eq!(
            mem.digest_pages(n / 3 - 1, 5).unwrap(),
            xxhash_rust::xxh3::xxh3_128(&plain[(n / 3 - 1) * ps..(n / 3 + 4) * ps])
        );
    }

    #[test]
    fn holes_are_the_ranges_never_written() {
        let ps = host_page_size();
        let mem = GuestMemory::new(64 * ps).unwrap();
        assert!(mem.is_hole(0, 64 * ps));
        mem.write_bytes(10 * ps, &vec![0u8; ps]).unwrap(); // written zeros are data
        assert!(mem.is_hole(0, 10 * ps) && mem.is_hole(11 * ps, 64 * ps));
        assert!(!mem.is_hole(0, 11 * ps) && !mem.is_hole(10 * ps, 11 * ps));
    }

    #[test]
    fn holes_of_anonymous_memory_are_the_pages_never_touched() {
        let ps = host_page_size();
        let mem = GuestMemory::with_backing(64 * ps, Backing::Anon).unwrap();
        assert!(mem.fd().is_none());
        assert!(mem.is_hole(0, 64 * ps));
        assert!(mem.data_ranges().is_empty());
        mem.write_bytes(10 * ps, &[1u8; 8]).unwrap();
        mem.write_bytes(11 * ps, &[1u8; 8]).unwrap();
        assert!(mem.is_hole(0, 10 * ps) && mem.is_hole(12 * ps, 64 * ps));
        assert!(!mem.is_hole(0, 11 * ps) && !mem.is_hole(11 * ps, 64 * ps));
        assert_eq!(mem.data_ranges(), vec![(10 * ps, 12 * ps)]);
        // Holes are hashed as zeros, written pages read: the same digest.
        let plain = GuestMemory::new(64 * ps).unwrap();
        plain.write_bytes(10 * ps, &[1u8; 8]).unwrap();
        plain.write_bytes(11 * ps, &[1u8; 8]).unwrap();
        assert_eq!(mem.digest(), plain.digest());
        assert_eq!(
            mem.digest_pages(9, 4).unwrap(),
            plain.digest_pages(9, 4).unwrap()
        );
        // Reading a hole maps the zero page: still a hole.
        let mut out = [0u8; 8];
        mem.read_bytes(30 * ps, &mut out).unwrap();
        assert!(mem.is_hole(12 * ps, 64 * ps));
    }

    #[test]
    fn image_roundtrip() {
        let ps = host_page_size();
        let mem = GuestMemory::new(ps * 4).unwrap();
        mem.write_bytes(ps + 1, &[7u8; 100]).unwrap();
        let path = std::env::temp_dir().join(format!("mig-img-{}", std::process::id()));
        mem.to_image(&path).unwrap();
        let back = GuestMemory::from_image(&path, Backing::Anon).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.digest(), mem.digest());
    }
}
