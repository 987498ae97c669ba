//! The uffd tracker's harvest: one `PAGEMAP_SCAN` walk of the guest range
//! for the pages written since they were last write-protected, shared by
//! threads that claim pieces of it in turn.
//!
//! The walk visits every page table entry of the guest, whatever was
//! written, so its cost grows with the guest; and a written page costs the
//! walk far more than an untouched one (each starts a region the kernel
//! reports), so the cost is not spread evenly: a guest's hot set is one
//! range. The range is therefore cut in pieces on 2 MiB boundaries, and each
//! thread claims the next piece when it is done with one, so the threads end
//! together wherever the writes cluster, and a thread that gets a core late
//! (the host's cores are shared with the channels and the peer) only walks
//! less. The kernel takes `mmap_lock` for read and each page table's own
//! lock, so pieces on disjoint page tables do not wait for each other.
//!
//! Two kinds of walk:
//!
//! * `Protect::Again` (every pre-copy sync): the written pages are reported
//!   and write-protected again in the same walk (`PM_SCAN_WP_MATCHING`),
//!   with a TLB flush per page table that had a written page.
//! * `Protect::Keep` (the final sync, guest stopped): reported only. The
//!   pages stay writable and so stay "written" to the kernel: the next walk
//!   reports them again. Nothing is missed if the guest runs on after it (a
//!   switchover rolled back): the next sync reports these pages a second
//!   time as well as the new ones. It saves, inside the downtime, the
//!   re-protection of every page the guest dirtied last and the TLB flushes
//!   it takes.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::{CoreError, CoreResult};
use crate::pagemap::{
    self, PageRegion, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, SCAN_REGIONS,
};

/// Whether a walk write-protects the written pages it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protect {
    /// Report and write-protect again: the next walk reports only new writes.
    Again,
    /// Report only: the next walk reports these pages again.
    Keep,
}

/// The least guest bytes per thread: a smaller walk is short enough that
/// starting, and on a busy host waking, a second thread costs about what it
/// saves.
pub const MIN_PART_BYTES: u64 = 1 << 30;

/// Pieces are cut on these address boundaries (a page table's span), so no
/// two pieces share a page table.
const PART_ALIGN: u64 = 2 << 20;

/// Guest bytes per piece a thread claims: small against a thread's share,
/// so the threads end close together, and large against the fixed cost of
/// one ioctl (taking `mmap_lock`, descending to the first page table).
pub const PIECE_BYTES: u64 = 64 << 20;

/// The most threads of one walk: the walk is memory-bound, and the host's
/// other cores belong to the guest's own threads and the channels.
pub const MAX_PARTS: usize = 2;

/// Scan buffers, one per thread, kept across walks.
pub struct ScanBuffers(Vec<Vec<PageRegion>>);

impl ScanBuffers {
    pub fn new() -> Self {
        ScanBuffers(Vec::new())
    }

    fn take(&mut self, parts: usize) -> &mut [Vec<PageRegion>] {
        while self.0.len() < parts {
            self.0.push(vec![PageRegion::default(); SCAN_REGIONS]);
        }
        &mut self.0[..parts]
    }
}

impl Default for ScanBuffers {
    fn default() -> Self {
        Self::new()
    }
}

/// How many threads a walk of `bytes` takes on this host.
pub fn parts_for(bytes: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let by_size = (bytes / MIN_PART_BYTES).max(1) as usize;
    by_size.min(cores).min(MAX_PARTS)
}

/// `[start, end)` cut in `parts` contiguous ranges of about equal size, at
/// addresses on `PART_ALIGN` boundaries; empty ranges are dropped.
pub fn split(start: u64, end: u64, parts: usize) -> Vec<(u64, u64)> {
    let parts = parts.max(1) as u64;
    let step = end.saturating_sub(start) / parts;
    let mut out = Vec::with_capacity(parts as usize);
    let mut s = start;
    for k in 1..=parts {
        let e = if k == parts {
            end
        } else {
            (start + k * step).next_multiple_of(PART_ALIGN).min(end)
        };
        if e > s {
            out.push((s, e));
            s = e;
        }
    }
    out
}

/// One walk of `[start, end)` in one thread; each written region (byte
/// addresses) goes to `f`.
pub fn walk(
    pagemap: &File,
    buf: &mut [PageRegion],
    start: u64,
    end: u64,
    protect: Protect,
    f: impl FnMut(u64, u64),
) -> CoreResult<()> {
    let wp = match protect {
        Protect::Again => PM_SCAN_WP_MATCHING,
        Protect::Keep => 0,
    };
    let query = pagemap::Query {
        flags: wp | PM_SCAN_CHECK_WPASYNC,
        category_mask: PAGE_IS_WRITTEN,
        anyof_mask: 0,
        return_mask: PAGE_IS_WRITTEN,
        ..Default::default()
    };
    pagemap::scan(pagemap, buf, query, start, end, f)
}

/// Written regions, as `[start, end)` byte addresses.
type Regions = Vec<(u64, u64)>;

/// The written regions of `[start, end)`, walked by `parts` threads (the
/// calling thread is one) claiming `PIECE_BYTES` pieces in address order.
/// Regions come back in address order.
pub fn written_regions(
    pagemap: &File,
    bufs: &mut ScanBuffers,
    start: u64,
    end: u64,
    parts: usize,
    protect: Protect,
) -> CoreResult<Regions> {
    let pieces = split(
        start,
        end,
        end.saturating_sub(start).div_ceil(PIECE_BYTES) as usize,
    );
    if pieces.is_empty() {
        return Ok(Vec::new());
    }
    let threads = parts.clamp(1, pieces.len());
    let bufs = bufs.take(threads);
    if threads == 1 {
        let mut found = Vec::new();
        walk(pagemap, &mut bufs[0], start, end, protect, |a, b| {
            found.push((a, b))
        })?;
        return Ok(found);
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    // Each thread: the pieces it walked, with their index, in claim order.
    let claim = |buf: &mut Vec<PageRegion>| -> CoreResult<Vec<(usize, Regions)>> {
        let mut walked = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(s, e)) = pieces.get(i) else { break };
            let mut found = Vec::new();
            if let Err(err) = walk(pagemap, buf, s, e, protect, |a, b| found.push((a, b))) {
                failed.store(true, Ordering::Relaxed);
                return Err(err);
            }
            walked.push((i, found));
        }
        Ok(walked)
    };
    let (head, tail) = bufs.split_at_mut(1);
    let results: Vec<CoreResult<_>> = std::thread::scope(|scope| {
        let handles: Vec<_> = tail
            .iter_mut()
            .map(|buf| scope.spawn(|| claim(buf)))
            .collect();
        let mut out = vec![claim(&mut head[0])];
        for h in handles {
            out.push(
                h.join()
                    .unwrap_or_else(|_| Err(CoreError::invalid("a PAGEMAP_SCAN thread panicked"))),
            );
        }
        out
    });
    let mut by_piece: Vec<Regions> = vec![Vec::new(); pieces.len()];
    for r in results {
        for (i, found) in r? {
            by_piece[i] = found;
        }
    }
    Ok(by_piece.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_range_on_page_table_boundaries() {
        let base = 0x7f00_0000_0000u64;
        let gib = 1u64 << 30;
        assert_eq!(
            split(base, base + gib, 2),
            vec![(base, base + gib / 2), (base + gib / 2, base + gib)]
        );
        // An odd size: the first part rounds up to 2 MiB, the last takes
        // the rest.
        let odd = (3 << 20) + 4096;
        let parts = split(base, base + odd, 2);
        assert_eq!(
            parts,
            vec![(base, base + (2 << 20)), (base + (2 << 20), base + odd)]
        );
        // Smaller than one boundary: one part.
        assert_eq!(split(base, base + 8192, 2), vec![(base, base + 8192)]);
        assert_eq!(split(base, base, 2), vec![]);
        // A mapping that does not start on a boundary: the cut is on the
        // next one.
        let start = base + 4096;
        let cut = base + gib / 2 + PART_ALIGN;
        assert_eq!(
            split(start, start + gib, 2),
            vec![(start, cut), (cut, start + gib)]
        );
        let three = split(start, start + gib, 3);
        assert_eq!(three.len(), 3);
        assert_eq!((three[0].0, three[2].1), (start, start + gib));
        for w in three.windows(2) {
            assert_eq!(w[0].1, w[1].0);
            assert_eq!(w[0].1 % PART_ALIGN, 0);
        }
        assert_eq!(split(base, base + gib, 1), vec![(base, base + gib)]);
    }

    #[test]
    fn parts_follow_size_and_cap() {
        assert_eq!(parts_for(4096), 1);
        assert_eq!(parts_for(MIN_PART_BYTES), 1);
        assert_eq!(parts_for(MIN_PART_BYTES + 4096), 1);
        let big = parts_for(16 << 30);
        assert!((1..=MAX_PARTS).contains(&big));
    }
}
