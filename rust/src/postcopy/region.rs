//! `PostcopyRegion`: the destination's memory during post-copy — registered
//! for missing-page faults, with its placer, its fault thread and the queue
//! of page requests for the source.
//!
//! Lifecycle: `register` (discard stale pages, start the fault thread) →
//! `place` / `place_zero` as pages arrive, `next_requests` to learn what the
//! guest is waiting for → `close` (stop the thread, unregister). Closing
//! wakes any thread still blocked on a missing page, which then reads that
//! page as zeros (shmem hole / anonymous zero page): close only once every
//! page has arrived, or when the guest is lost anyway.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::blocktime::{Blocktime, BlocktimeStats};
use super::fault_region::{Backing, FaultRegion};
use super::fault_thread::{FaultThread, PageRequest};
use super::page_set::PageSet;
use super::placement::PlacementMode;
use super::placer::{PlaceObserver, Placement, Placer, PlacerStats};
use crate::error::{CoreError, CoreResult};

/// How often the fault thread checks whether it should stop.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Figures of one region; names follow QEMU where it has them.
#[derive(Clone, Debug, Default)]
pub struct RegionStats {
    /// `postcopy-requests`: pages asked of the source (once per page).
    pub requests: u64,
    /// Faults recorded (one per blocked thread and page).
    pub faults: u64,
    pub placer: PlacerStats,
    pub discarded: u64,
    pub blocktime: BlocktimeStats,
    pub kernel_faults: bool,
    pub thread_ids: bool,
    /// `postcopy-placement`: `copy` or `continue` ("" before registration).
    pub placement: &'static str,
}

struct Active {
    region: Arc<FaultRegion>,
    placer: Arc<Placer>,
    fault_thread: FaultThread,
    blocktime: Arc<Blocktime>,
    present: Arc<PageSet>,
    requests: Receiver<PageRequest>,
    discarded: u64,
}

pub struct PostcopyRegion {
    vcpus: usize,
    mode: PlacementMode,
    observer: Option<Arc<dyn PlaceObserver>>,
    active: Mutex<Option<Arc<Active>>>,
    /// Figures kept after `close`.
    last: Mutex<Option<RegionStats>>,
}

impl PostcopyRegion {
    /// `vcpus`: the number of guest threads, for `postcopy-blocktime`
    /// (0 if unknown). `observer` sees each placed page. `mode`: how pages
    /// are placed (`continue` needs memfd/shmem memory).
    pub fn new(
        vcpus: usize,
        observer: Option<Arc<dyn PlaceObserver>>,
        mode: PlacementMode,
    ) -> Self {
        PostcopyRegion {
            vcpus,
            mode,
            observer,
            active: Mutex::new(None),
            last: Mutex::new(None),
        }
    }

    fn active(&self) -> CoreResult<Arc<Active>> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| CoreError::invalid("the post-copy region is not registered"))
    }

    pub fn mode(&self) -> PlacementMode {
        self.mode
    }

    /// Registers `memory` for the region's placement mode, then discards the `(start_page, n)`
    /// ranges (validated first; nothing is registered if one is bad).
    pub fn register(&self, memory: Arc<dyn Backing>, discard: &[(u64, u64)]) -> CoreResult<()> {
        let mut slot = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Err(CoreError::invalid(
                "the post-copy region is already registered",
            ));
        }
        let region = Arc::new(FaultRegion::register(memory, self.mode)?);
        let discarded = region.discard(discard)?;
        let n = region.num_pages();
        let present = Arc::new(PageSet::new(n));
        let blocktime = Arc::new(Blocktime::new(n, self.vcpus));
        let placer = Arc::new(Placer::new(
            region.clone(),
            present.clone(),
            blocktime.clone(),
            self.observer.clone(),
        ));
        // One request per page at most: the queue is bounded by the region.
        let (tx, rx) = crossbeam_channel::unbounded();
        let fault_thread = FaultThread::spawn(
            region.clone(),
            present.clone(),
            blocktime.clone(),
            POLL_INTERVAL,
            move |r| {
                let _ = tx.send(r);
            },
        )?;
        *slot = Some(Arc::new(Active {
            region,
            placer,
            fault_thread,
            blocktime,
            present,
            requests: rx,
            discarded,
        }));
        Ok(())
    }

    pub fn place(&self, page: u64, data: &[u8]) -> CoreResult<Placement> {
        self.active()?.placer.place(page, data)
    }

    pub fn place_zero(&self, page: u64) -> CoreResult<Placement> {
        self.active()?.placer.place_zero(page)
    }

    /// Places the whole pages of `data` from `first`, one `UFFDIO_CONTINUE`
    /// per run of missing pages with the `continue` placement; returns the
    /// pages placed.
    pub fn place_run(&self, first: u64, data: &[u8]) -> CoreResult<u64> {
        self.active()?.placer.place_run(first, data)
    }

    /// Places zeros at the `n` pages from `first`, one ioctl per run of
    /// missing pages; returns the pages placed.
    pub fn place_zero_range(&self, first: u64, n: u64) -> CoreResult<u64> {
        self.active()?.placer.place_zero_range(first, n)
    }

    /// Waits up to `timeout` for the first request, then takes every request
    /// already queued.
    pub fn next_requests(&self, timeout: Duration) -> CoreResult<Vec<PageRequest>> {
        let a = self.active()?;
        let first = match a.requests.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => return Ok(vec![]),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(CoreError::invalid("the fault thread has stopped"))
            }
        };
        let mut out = vec![first];
        out.extend(a.requests.try_iter());
        Ok(out)
    }

    /// Whether `page` was placed through this region.
    pub fn is_placed(&self, page: u64) -> CoreResult<bool> {
        Ok(self.active()?.present.contains(page as usize))
    }

    fn stats_of(a: &Active) -> RegionStats {
        let c = a.fault_thread.counters();
        RegionStats {
            requests: c.requests.load(std::sync::atomic::Ordering::Relaxed),
            faults: a.blocktime.stats().faults,
            placer: a.placer.stats(),
            discarded: a.discarded,
            blocktime: a.blocktime.stats(),
            kernel_faults: a.region.kernel_faults(),
            thread_ids: a.region.thread_ids(),
            placement: a.region.mode().name(),
        }
    }

    pub fn stats(&self) -> RegionStats {
        match self.active().ok() {
            Some(a) => Self::stats_of(&a),
            None => self
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default(),
        }
    }

    pub fn is_registered(&self) -> bool {
        self.active().is_ok()
    }

    /// Stops the fault thread and unregisters the memory. Idempotent.
    pub fn close(&self) -> CoreResult<()> {
        let taken = self.active.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(a) = taken else { return Ok(()) };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Self::stats_of(&a));
        // A place() running now holds its own reference; the registration
        // ends when the last one is dropped.
        match Arc::try_unwrap(a) {
            Ok(mut a) => a.fault_thread.stop(),
            Err(_) => Ok(()),
        }
    }
}

impl Drop for PostcopyRegion {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemory;

    fn anon_memory(size: usize) -> GuestMemory {
        GuestMemory::with_backing(size, crate::backing::Backing::Anon).unwrap()
    }
    use crate::postcopy::capability;

    const WAIT: Duration = Duration::from_secs(10);

    fn available() -> bool {
        let c = capability::capability().expect("probe");
        if !c.cap.available {
            eprintln!(
                "skipping: host lacks userfaultfd MISSING mode: {}",
                c.cap.reason
            );
        }
        c.cap.available
    }

    /// (anonymous memory?, placement) for each case this host can run:
    /// `copy` on both backings, `continue` on shmem where MINOR mode is.
    fn cases() -> Vec<(bool, PlacementMode)> {
        let mut out = vec![(false, PlacementMode::Copy), (true, PlacementMode::Copy)];
        let c = capability::capability().expect("probe");
        if c.minor.available {
            out.push((false, PlacementMode::Continue));
        } else {
            eprintln!(
                "skipping continue cases: host lacks {:?}: {}",
                c.minor.missing, c.minor.reason
            );
        }
        out
    }

    fn page_of(fill: u8, ps: usize) -> Vec<u8> {
        (0..ps).map(|i| fill ^ (i as u8)).collect()
    }

    /// Reads one page through the mapping (faulting if it is missing).
    fn read_page(base: usize, page: u64, ps: usize) -> Vec<u8> {
        let mut out = vec![0u8; ps];
        // SAFETY: `base` is a live mapping of at least `page + 1` pages.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (base as *const u8).add(page as usize * ps),
                out.as_mut_ptr(),
                ps,
            )
        };
        out
    }

    fn blocked_reader_gets_exactly_the_placed_bytes(
        backing: Arc<dyn Backing>,
        base: usize,
        mode: PlacementMode,
    ) {
        let ps = crate::memory::host_page_size();
        let r = PostcopyRegion::new(1, None, mode);
        r.register(backing, &[]).unwrap();
        let reader = std::thread::spawn(move || read_page(base, 3, ps));
        let reqs = r.next_requests(WAIT).unwrap();
        assert_eq!(reqs.iter().map(|q| q.page).collect::<Vec<_>>(), vec![3]);
        assert!(
            !reader.is_finished(),
            "the reader ran before its page arrived"
        );
        let data = page_of(0x5a, ps);
        assert_eq!(r.place(3, &data).unwrap(), Placement::Placed);
        assert_eq!(reader.join().unwrap(), data);
        // Zero pages, and a page placed twice is a no-op.
        assert_eq!(r.place_zero(4).unwrap(), Placement::Placed);
        assert_eq!(read_page(base, 4, ps), vec![0u8; ps]);
        assert_eq!(
            r.place(3, &page_of(0x11, ps)).unwrap(),
            Placement::AlreadyPresent
        );
        assert_eq!(r.place_zero(3).unwrap(), Placement::AlreadyPresent);
        assert_eq!(read_page(base, 3, ps), data);
        let s = r.stats();
        assert_eq!((s.requests, s.faults), (1, 1));
        assert_eq!(s.placer.pages_placed, 1);
        assert_eq!(s.placer.zero_pages_placed, 1);
        assert_eq!(s.placer.already_present, 2);
        assert_eq!(s.blocktime.resolved, 1);
        assert!(s.blocktime.latency_p50.is_some());
        r.close().unwrap();
        assert_eq!(r.stats().placer.pages_placed, 1);
    }

    #[test]
    fn a_reader_blocks_until_placed() {
        if !available() {
            return;
        }
        for (anon, mode) in cases() {
            let (mem, base) = memory_and_base(anon, 16 * crate::memory::host_page_size());
            blocked_reader_gets_exactly_the_placed_bytes(mem, base, mode);
        }
    }

    #[test]
    fn continue_is_refused_on_anonymous_memory() {
        if !available() {
            return;
        }
        let r = PostcopyRegion::new(0, None, PlacementMode::Continue);
        let (mem, _) = memory_and_base(true, 4 * crate::memory::host_page_size());
        let e = r.register(mem, &[]).unwrap_err().to_string();
        assert!(e.contains("memfd/shmem") || e.contains("MINOR"), "{e}");
        assert!(!r.is_registered());
    }

    #[test]
    fn a_run_goes_in_whole_and_leaves_placed_pages_alone() {
        if !available() {
            return;
        }
        let ps = crate::memory::host_page_size();
        for (anon, mode) in cases() {
            let (backing, base) = memory_and_base(anon, 16 * ps);
            for p in 0..16u64 {
                // SAFETY: inside the 16-page mapping made above.
                unsafe { std::ptr::write_bytes((base as *mut u8).add(p as usize * ps), 0xee, ps) };
            }
            let r = PostcopyRegion::new(1, None, mode);
            r.register(backing, &[(0, 16)]).unwrap();
            let reader = std::thread::spawn(move || read_page(base, 5, ps));
            assert_eq!(r.next_requests(WAIT).unwrap()[0].page, 5, "{mode:?}");
            r.place(6, &page_of(66, ps)).unwrap();
            let run: Vec<u8> = (2..10u8).flat_map(|p| page_of(p, ps)).collect();
            assert_eq!(r.place_run(2, &run).unwrap(), 7, "{mode:?}");
            assert_eq!(reader.join().unwrap(), page_of(5, ps), "{mode:?}");
            for p in 2..10u64 {
                let want = if p == 6 {
                    page_of(66, ps)
                } else {
                    page_of(p as u8, ps)
                };
                assert_eq!(read_page(base, p, ps), want, "page {p} {mode:?}");
            }
            assert!(
                r.place_run(15, &run[..2 * ps]).is_err(),
                "beyond the region"
            );
            assert!(r.place_run(0, &run[1..]).is_err(), "not whole pages");
            let s = r.stats();
            assert_eq!(s.placer.pages_placed, 8, "{mode:?}");
            assert_eq!(s.placer.already_present, 1, "{mode:?}");
            assert_eq!(s.placement, mode.name());
            r.close().unwrap();
        }
    }

    /// Records what the placer shows it, for the digest hook.
    #[derive(Default)]
    struct Seen(Mutex<Vec<(u64, Option<Vec<u8>>)>>);

    impl PlaceObserver for Seen {
        fn placed(&self, page: u64, data: Option<&[u8]>) {
            self.0
                .lock()
                .unwrap()
                .push((page, data.map(<[u8]>::to_vec)));
        }
    }

    #[test]
    fn the_observer_sees_each_placed_page_once_with_its_bytes() {
        if !available() {
            return;
        }
        for (_, mode) in cases().into_iter().filter(|c| !c.0) {
            let ps = crate::memory::host_page_size();
            let seen = Arc::new(Seen::default());
            let r = PostcopyRegion::new(0, Some(seen.clone()), mode);
            let mem = Arc::new(GuestMemory::new(4 * ps).unwrap());
            mem.write_bytes(3 * ps, &page_of(9, ps)).unwrap(); // held: EEXIST
            r.register(mem, &[]).unwrap();
            r.place(0, &page_of(1, ps)).unwrap();
            r.place(0, &page_of(2, ps)).unwrap();
            r.place_zero(1).unwrap();
            r.place(3, &page_of(3, ps)).unwrap();
            let got = seen.0.lock().unwrap().clone();
            assert_eq!(got, vec![(0, Some(page_of(1, ps))), (1, None)]);
        }
    }

    /// Anonymous or memfd memory of `size` bytes, and its address.
    fn memory_and_base(anon: bool, size: usize) -> (Arc<dyn Backing>, usize) {
        let m = Arc::new(if anon {
            anon_memory(size)
        } else {
            GuestMemory::new(size).unwrap()
        });
        let base = m.as_ptr() as usize;
        (m, base)
    }

    #[test]
    fn a_zero_range_wakes_its_waiters_and_leaves_present_pages_alone() {
        if !available() {
            return;
        }
        let ps = crate::memory::host_page_size();
        for (anon, mode) in cases() {
            let (backing, base) = memory_and_base(anon, 16 * ps);
            // Page 9 is held (never discarded): the kernel answers EEXIST.
            // SAFETY: inside the 16-page mapping made above.
            unsafe { std::ptr::write_bytes((base as *mut u8).add(9 * ps), 0xee, ps) };
            let seen = Arc::new(Seen::default());
            let r = PostcopyRegion::new(1, Some(seen.clone()), mode);
            r.register(backing, &[(0, 9), (10, 6)]).unwrap();
            let reader = std::thread::spawn(move || read_page(base, 6, ps));
            let reqs = r.next_requests(WAIT).unwrap();
            assert_eq!(reqs[0].page, 6, "anon={anon} {mode:?}");
            // Page 4 placed before: the range skips it.
            r.place(4, &page_of(4, ps)).unwrap();
            assert_eq!(
                r.place_zero_range(2, 10).unwrap(),
                8,
                "anon={anon} {mode:?}"
            );
            assert_eq!(
                reader.join().unwrap(),
                vec![0u8; ps],
                "anon={anon} {mode:?}"
            );
            assert_eq!(read_page(base, 4, ps), page_of(4, ps));
            assert_eq!(read_page(base, 9, ps), vec![0xee; ps]);
            assert_eq!(read_page(base, 11, ps), vec![0u8; ps]);
            assert!(r.place_zero_range(15, 2).is_err(), "beyond the region");
            assert!(r.place_zero_range(u64::MAX, 2).is_err(), "overflow");
            let s = r.stats();
            assert_eq!(s.placer.zero_pages_placed, 8, "anon={anon} {mode:?}");
            assert_eq!(s.placer.already_present, 2, "anon={anon} {mode:?}");
            assert_eq!(s.blocktime.resolved, 1, "anon={anon} {mode:?}");
            let zero_pages: Vec<u64> = seen
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, d)| d.is_none())
                .map(|(p, _)| *p)
                .collect();
            assert_eq!(
                zero_pages,
                vec![2, 3, 5, 6, 7, 8, 10, 11],
                "anon={anon} {mode:?}"
            );
            // Pages still missing after it are still caught.
            let reader = std::thread::spawn(move || read_page(base, 12, ps));
            assert_eq!(r.next_requests(WAIT).unwrap()[0].page, 12);
            assert_eq!(r.place_zero_range(12, 1).unwrap(), 1);
            assert_eq!(reader.join().unwrap(), vec![0u8; ps]);
            r.close().unwrap();
        }
    }

    #[test]
    fn discard_drops_stale_content_and_keeps_the_rest() {
        if !available() {
            return;
        }
        let ps = crate::memory::host_page_size();
        for (anon, mode) in cases() {
            let (backing, base) = memory_and_base(anon, 8 * ps);
            for p in 0..8u64 {
                // SAFETY: inside the 8-page mapping made above.
                unsafe { std::ptr::write_bytes((base as *mut u8).add(p as usize * ps), 0xee, ps) };
            }
            let r = PostcopyRegion::new(0, None, mode);
            assert!(
                r.register(backing.clone(), &[(7, 2)]).is_err(),
                "out of range"
            );
            r.register(backing, &[(1, 2), (6, 1)]).unwrap();
            assert_eq!(r.stats().discarded, 3);
            // Kept pages read without faulting.
            assert_eq!(read_page(base, 0, ps), vec![0xee; ps]);
            let reader = std::thread::spawn(move || read_page(base, 2, ps));
            let reqs = r.next_requests(WAIT).unwrap();
            assert_eq!(reqs[0].page, 2, "anon={anon} {mode:?}");
            let fresh = page_of(1, ps);
            r.place(2, &fresh).unwrap();
            assert_eq!(reader.join().unwrap(), fresh, "anon={anon} {mode:?}");
            // Zeros over a stale page (its old bytes still cached with
            // `continue`) read as zeros.
            assert_eq!(r.place_zero_range(6, 1).unwrap(), 1, "anon={anon} {mode:?}");
            assert_eq!(
                read_page(base, 6, ps),
                vec![0u8; ps],
                "anon={anon} {mode:?}"
            );
            // A page held (never discarded) is left as it is.
            assert_eq!(r.place(0, &fresh).unwrap(), Placement::AlreadyPresent);
            assert_eq!(read_page(base, 0, ps), vec![0xee; ps]);
            assert!(r.place(8, &fresh).is_err());
            assert!(r.place(1, &fresh[1..]).is_err());
            r.close().unwrap();
        }
    }
}
