//! Maps the holes between data pages of anonymous guest memory to the
//! shared zero page, in the background, on idle CPU time only.
//!
//! The dirty tracker's `PAGEMAP_SCAN` walk visits every entry of the
//! guest's page tables at every sync, the final one inside the downtime.
//! Where present pages and never-written holes (write-protect markers)
//! alternate at random, as in a guest that wrote scattered pages, the
//! kernel's per-entry test mispredicts and the walk is several times slower
//! than over entries that are all alike. A hole mapped to the zero page
//! (`MADV_POPULATE_READ`) is a present entry like its neighbours and costs
//! no memory. It still reads as zeros, still counts as unwritten to the
//! tracker, and the sender still finds it zero.
//!
//! The mapping costs a page fault per hole, which is worth paying only off
//! the migration's critical path: the tracker starts the thread once the
//! first pass (which reads every page) is over, and it runs under
//! `SCHED_IDLE`, so it takes no time from the guest, the channels or the
//! peer; a guest that switches over before it is done only walks slower. Page tables that hold
//! no data stay unmapped: their entries are alike already.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::backing::Backing;
use crate::memory::GuestMemory;

/// The span of one last-level page table: 512 entries of 4 KiB pages.
const PAGE_TABLE_SPAN: usize = 2 << 20;

/// Bytes mapped per call, between which the thread checks for `stop`: one
/// page table. The kernel holds `mmap_lock` for read across a call, and a
/// `SCHED_IDLE` thread preempted inside one would keep a thread that maps
/// memory (and every reader queued behind it) waiting for an idle core: a
/// short call keeps that window short.
const STEP: usize = PAGE_TABLE_SPAN;

/// The background thread; stopped and joined on drop.
pub struct HoleFiller {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HoleFiller {
    /// Starts filling `mem`'s holes near data; `None` for memory that is not
    /// plain anonymous (a memfd's read fault would allocate a page, and a
    /// huge page maps whole blocks) or when no thread can be started.
    pub fn start(mem: Arc<GuestMemory>) -> Option<Self> {
        if mem.backing() != Backing::Anon {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mig-holes".into())
            .spawn(move || {
                at_idle_priority();
                fill(&mem, &flag);
            })
            .ok()?;
        Some(HoleFiller {
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the thread to end after its current call, without waiting.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether the thread has finished (or stopped).
    pub fn is_done(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for HoleFiller {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join(); // at most one step: it checks `stop` between calls
        }
    }
}

/// `SCHED_IDLE` for the calling thread: it runs only on a core nothing else
/// wants. Best effort: on failure it runs at normal priority.
fn at_idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param
    // that outlives the call.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
}

/// Byte ranges of `mem` covering every page table that holds data, merged.
pub fn tables_with_data(mem: &GuestMemory) -> Vec<(usize, usize)> {
    let base = mem.as_ptr() as usize;
    let end = base + mem.len();
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (s, e) in mem.data_ranges() {
        let lo = ((base + s) & !(PAGE_TABLE_SPAN - 1)).max(base) - base;
        let hi = (base + e).next_multiple_of(PAGE_TABLE_SPAN).min(end) - base;
        match out.last_mut() {
            Some(last) if last.1 >= lo => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// Maps the holes of every page table with data, `STEP` bytes at a time,
/// until done or `stop`. Errors end it quietly: the walk is only slower.
pub fn fill(mem: &GuestMemory, stop: &AtomicBool) {
    for (lo, hi) in tables_with_data(mem) {
        let mut at = lo;
        while at < hi {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let len = STEP.min(hi - at);
            if mem.populate_read(at, len).is_err() {
                return;
            }
            at += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::host_page_size;

    #[test]
    fn holes_near_data_map_the_zero_page_and_far_ones_stay_unmapped() {
        let ps = host_page_size();
        let n = 4 * PAGE_TABLE_SPAN / ps;
        let mem = GuestMemory::with_backing(n * ps, Backing::Anon).unwrap();
        mem.write_bytes(ps, &[7u8; 8]).unwrap();
        let before = mem.digest();
        fill(&mem, &AtomicBool::new(false));
        // The page after the data shares its page table: a zero-page entry
        // now, no longer a hole to the page tables. The last page, at least
        // two page tables away, is untouched.
        let near = mem.anon_holes(2, 1).unwrap();
        let far = mem.anon_holes(n - 1, 1).unwrap();
        assert_eq!((near, far), (vec![false], vec![true]));
        // Nothing was allocated or changed: the data query still sees one
        // page of data, and the content is the same.
        assert_eq!(mem.data_ranges(), vec![(ps, 2 * ps)]);
        assert!(mem.is_hole(2 * ps, n * ps));
        assert_eq!(mem.digest(), before);
    }

    #[test]
    fn a_stopped_filler_maps_nothing() {
        let mem = GuestMemory::with_backing(PAGE_TABLE_SPAN, Backing::Anon).unwrap();
        mem.write_bytes(0, &[7u8; 8]).unwrap();
        fill(&mem, &AtomicBool::new(true));
        assert_eq!(mem.anon_holes(1, 1).unwrap(), vec![true]);
    }

    #[test]
    fn only_plain_anonymous_memory_is_filled() {
        let mem = Arc::new(GuestMemory::with_backing(PAGE_TABLE_SPAN, Backing::Memfd).unwrap());
        assert!(HoleFiller::start(mem).is_none());
        let anon = Arc::new(GuestMemory::with_backing(PAGE_TABLE_SPAN, Backing::Anon).unwrap());
        anon.write_bytes(0, &[1]).unwrap();
        let filler = HoleFiller::start(anon.clone()).expect("a thread");
        let t0 = std::time::Instant::now();
        while !filler.is_done() && t0.elapsed().as_secs() < 30 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(filler.is_done());
        assert_eq!(anon.anon_holes(1, 1).unwrap(), vec![false]);
    }
}
