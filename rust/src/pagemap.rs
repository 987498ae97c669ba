//! The `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` (Linux 6.7): a walk of
//! this process's page tables that reports the regions of a range whose
//! pages match a set of categories, and optionally write-protects them in
//! the same walk. The dirty tracker harvests written pages with it; guest
//! memory asks it which anonymous pages are populated.
//!
//! The system headers are older than the kernel this runs on, so the uAPI
//! constants and structs are defined here (from `linux/fs.h`).

use std::fs::File;

use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Ioctl, IoctlOutput, Opcode};

use crate::error::{CoreError, CoreResult};

pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Mapped to the shared zero page (a read of a never-written page).
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const PAGEMAP_SCAN: Opcode = opcode::read_write::<PmScanArg>(b'f', 16);

/// `PAGEMAP_SCAN` returns how many regions it filled; rustix's `Updater`
/// discards the return value, hence this small `Ioctl`.
struct PmScan<'a>(&'a mut PmScanArg);

// SAFETY: the opcode is `_IOWR('f', 16, struct pm_scan_arg)` and the pointer
// is to a `#[repr(C)]` copy of that struct; the kernel writes `walk_end` and
// at most `vec_len` regions into `vec`, which the caller sizes.
unsafe impl Ioctl for PmScan<'_> {
    type Output = usize;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        PAGEMAP_SCAN
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        (self.0 as *mut PmScanArg).cast()
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<usize> {
        Ok(out as usize)
    }
}

/// Regions fetched per `PAGEMAP_SCAN` call (96 KiB of `page_region`).
pub const SCAN_REGIONS: usize = 4096;

/// Which pages a scan matches and what it does to them.
#[derive(Clone, Copy, Default)]
pub struct Query {
    pub flags: u64,
    /// Every one of these categories must hold.
    pub category_mask: u64,
    /// At least one of these categories must hold.
    pub anyof_mask: u64,
    /// Categories whose meaning is inverted in both masks ("must not").
    pub inverted: u64,
    pub return_mask: u64,
    /// End the scan after the first call that reports a region (with a
    /// one-region buffer: the first matching region).
    pub first_only: bool,
}

pub fn open_pagemap() -> Result<File, Errno> {
    File::open("/proc/self/pagemap")
        .map_err(|e| Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)))
}

/// The raw `/proc/self/pagemap` entries (one `u64` per page) of `count`
/// pages from virtual page number `vpage`.
pub fn read_entries(vpage: usize, count: usize) -> Result<Vec<u64>, Errno> {
    use std::os::unix::fs::FileExt;
    let file = open_pagemap()?;
    let mut raw = vec![0u8; count * 8];
    file.read_exact_at(&mut raw, vpage as u64 * 8)
        .map_err(|e| Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)))?;
    Ok(raw
        .chunks_exact(8)
        .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
        .collect())
}

/// Pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
/// A swap entry's type sits in bits 0-4; the last type is the kernel's PTE
/// marker (`SWP_PTE_MARKER`), which holds no data. Without
/// `CAP_SYS_ADMIN` the kernel zeroes these bits: type 0, a swap file,
/// which counts as data, the safe answer.
const PM_SWAP_TYPE_MASK: u64 = 0x1f;
const SWP_PTE_MARKER: u64 = 0x1f;

/// Whether a pagemap entry describes a page without data: not present,
/// and empty or a marker (never swapped-out or migrating data).
pub fn entry_is_hole(entry: u64) -> bool {
    entry & PM_PRESENT == 0 && (entry & PM_SWAP == 0 || entry & PM_SWAP_TYPE_MASK == SWP_PTE_MARKER)
}

/// A zero-length scan: the kernel only validates, so this tells whether the
/// ioctl exists.
pub fn probe() -> Result<(), Errno> {
    let file = open_pagemap()?;
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        ..Default::default()
    };
    // SAFETY: an empty range with no output vector: the kernel only validates.
    unsafe { ioctl(&file, PmScan(&mut arg)) }.map(|_| ())
}

/// Scans `[start, end)` (byte addresses of a mapping the caller keeps
/// alive) and reports each matching region to `f`. Loops until the
/// kernel's `walk_end` reaches `end` (it stops early when `buf` fills).
pub fn scan(
    pagemap: &File,
    buf: &mut [PageRegion],
    query: Query,
    start: u64,
    end: u64,
    mut f: impl FnMut(u64, u64),
) -> CoreResult<()> {
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: query.flags,
        start,
        end,
        vec: buf.as_mut_ptr() as u64,
        vec_len: buf.len() as u64,
        category_mask: query.category_mask,
        category_anyof_mask: query.anyof_mask,
        category_inverted: query.inverted,
        return_mask: query.return_mask,
        ..Default::default()
    };
    loop {
        arg.walk_end = 0;
        // SAFETY: `arg` describes `buf`, which outlives the call; the range is
        // a mapping the caller owns.
        let n = match unsafe { ioctl(pagemap, PmScan(&mut arg)) } {
            Ok(n) => n.min(buf.len()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(CoreError::io("PAGEMAP_SCAN", e.into())),
        };
        for r in &buf[..n] {
            f(r.start, r.end);
        }
        if arg.walk_end >= end || (query.first_only && n > 0) {
            return Ok(());
        }
        if arg.walk_end <= arg.start && n == 0 {
            return Err(CoreError::invalid(format!(
                "PAGEMAP_SCAN made no progress at {:#x}",
                arg.start
            )));
        }
        arg.start = arg.walk_end;
    }
}
