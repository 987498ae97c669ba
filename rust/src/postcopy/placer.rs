//! Places pages into a fault region: each page atomically (`UFFDIO_COPY`
//! fills a fresh page and maps it in one step; with the `continue`
//! placement the page is written where the guest's mapping cannot see it
//! and `UFFDIO_CONTINUE` maps it: either way no thread ever sees it
//! half-written) and at most once.
//!
//! A page is claimed in an atomic set before it is copied, so two placers
//! racing on the same page (a requested page that the background push also
//! carries) copy it once; the loser reports `AlreadyPresent`. A page the
//! kernel already holds (never discarded) answers EEXIST and is also
//! `AlreadyPresent`, with its content untouched.
//!
//! Each placed page is shown to the [`PlaceObserver`] with exactly the bytes
//! that went in (for the destination's digest: hashed from the source
//! buffer, so a guest write right after placement cannot change the hash).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rustix::io::Errno;

use super::blocktime::Blocktime;
use super::fault_region::FaultRegion;
use super::page_set::PageSet;
use super::placement::PlacementMode;
use crate::error::{CoreError, CoreResult};

/// Sees every page as it is placed. `data` is `None` for a zero page.
pub trait PlaceObserver: Send + Sync {
    fn placed(&self, page: u64, data: Option<&[u8]>);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Placed,
    AlreadyPresent,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlacerStats {
    pub pages_placed: u64,
    pub zero_pages_placed: u64,
    pub already_present: u64,
}

pub struct Placer {
    region: Arc<FaultRegion>,
    claimed: PageSet,
    present: Arc<PageSet>,
    blocktime: Arc<Blocktime>,
    observer: Option<Arc<dyn PlaceObserver>>,
    placed: AtomicU64,
    zero_placed: AtomicU64,
    already: AtomicU64,
}

impl Placer {
    pub fn new(
        region: Arc<FaultRegion>,
        present: Arc<PageSet>,
        blocktime: Arc<Blocktime>,
        observer: Option<Arc<dyn PlaceObserver>>,
    ) -> Self {
        Placer {
            claimed: PageSet::new(region.num_pages()),
            region,
            present,
            blocktime,
            observer,
            placed: AtomicU64::new(0),
            zero_placed: AtomicU64::new(0),
            already: AtomicU64::new(0),
        }
    }

    /// Places `data` (one page) at `page`.
    pub fn place(&self, page: u64, data: &[u8]) -> CoreResult<Placement> {
        self.place_with(page, Some(data))
    }

    /// Places a page of zeros at `page` without copying.
    pub fn place_zero(&self, page: u64) -> CoreResult<Placement> {
        self.place_with(page, None)
    }

    /// Places zeros at the `n` pages from `first`: one `UFFDIO_ZEROPAGE`
    /// (or `UFFDIO_CONTINUE`) per run of pages not placed yet, rather than
    /// one per page. Returns the pages this call placed.
    pub fn place_zero_range(&self, first: u64, n: u64) -> CoreResult<u64> {
        self.place_range(first, n, None)
    }

    /// Places `data` (whole pages) from page `first`, each page atomically
    /// and at most once: one `UFFDIO_CONTINUE` per run of pages not placed
    /// yet with the `continue` placement, one `UFFDIO_COPY` per page with
    /// `copy`. Returns the pages this call placed.
    pub fn place_run(&self, first: u64, data: &[u8]) -> CoreResult<u64> {
        let ps = self.region.page_size();
        if data.is_empty() || !data.len().is_multiple_of(ps) {
            return Err(CoreError::invalid(format!(
                "page data is {} bytes, not whole pages of {ps}",
                data.len()
            )));
        }
        self.place_range(first, (data.len() / ps) as u64, Some(data))
    }

    fn place_range(&self, first: u64, n: u64, data: Option<&[u8]>) -> CoreResult<u64> {
        let total = self.region.num_pages() as u64;
        if first.checked_add(n).is_none_or(|end| end > total) {
            return Err(CoreError::invalid(format!(
                "pages [{first}, {first}+{n}) are outside the region's {total} pages"
            )));
        }
        let mut placed = 0;
        let mut page = first;
        while page < first + n {
            // The run of pages from `page` this call claims.
            let start = page;
            while page < first + n && self.claimed.insert(page as usize) {
                page += 1;
            }
            if page > start {
                let ps = self.region.page_size();
                let bytes =
                    data.map(|d| &d[(start - first) as usize * ps..(page - first) as usize * ps]);
                placed += self.run(start, page - start, bytes)?;
            }
            if page < first + n {
                self.already.fetch_add(1, Ordering::Relaxed); // claimed elsewhere
                page += 1;
            }
        }
        Ok(placed)
    }

    /// Places a run of pages this placer claimed: `data`, or zeros.
    fn run(&self, start: u64, n: u64, data: Option<&[u8]>) -> CoreResult<u64> {
        let r = match data {
            Some(d) => self.region.copy_run(start, d),
            None => self.region.zero_range(start, n),
        };
        let present = match r {
            Ok(p) => p,
            Err(e) => {
                for p in start..start + n {
                    self.claimed.remove(p as usize);
                }
                return Err(e);
            }
        };
        let now = Instant::now();
        let ps = self.region.page_size();
        let mut held = present.iter().peekable();
        for page in start..start + n {
            if held.next_if_eq(&&page).is_none() {
                if let Some(o) = &self.observer {
                    let i = (page - start) as usize;
                    o.placed(page, data.map(|d| &d[i * ps..(i + 1) * ps]));
                }
            }
            self.present.insert(page as usize);
            self.blocktime.placed(page, now);
        }
        let placed = n - present.len() as u64;
        let counter = if data.is_some() {
            &self.placed
        } else {
            &self.zero_placed
        };
        counter.fetch_add(placed, Ordering::Relaxed);
        self.already
            .fetch_add(present.len() as u64, Ordering::Relaxed);
        Ok(placed)
    }

    fn place_with(&self, page: u64, data: Option<&[u8]>) -> CoreResult<Placement> {
        let n = self.region.num_pages() as u64;
        if page >= n {
            return Err(CoreError::invalid(format!(
                "page {page} is outside the region's {n} pages"
            )));
        }
        if let Some(d) = data {
            if d.len() != self.region.page_size() {
                return Err(CoreError::invalid(format!(
                    "page data is {} bytes, expected {}",
                    d.len(),
                    self.region.page_size()
                )));
            }
        }
        if !self.claimed.insert(page as usize) {
            self.already.fetch_add(1, Ordering::Relaxed);
            return Ok(Placement::AlreadyPresent);
        }
        let r = match data {
            Some(d) => self.region.copy_page(page, d),
            None => self.region.zero_page(page),
        };
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                self.claimed.remove(page as usize);
                return Err(e);
            }
        };
        let placement = match r {
            Ok(()) => {
                if let Some(o) = &self.observer {
                    o.placed(page, data);
                }
                let counter = if data.is_some() {
                    &self.placed
                } else {
                    &self.zero_placed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Placement::Placed
            }
            Err(Errno::EXIST) => {
                self.already.fetch_add(1, Ordering::Relaxed);
                Placement::AlreadyPresent
            }
            Err(e) => {
                self.claimed.remove(page as usize);
                let what = match (self.region.mode(), data.is_some()) {
                    (PlacementMode::Continue, _) => "UFFDIO_CONTINUE",
                    (PlacementMode::Copy, true) => "UFFDIO_COPY",
                    (PlacementMode::Copy, false) => "UFFDIO_ZEROPAGE",
                };
                return Err(CoreError::io(format!("{what} page {page}"), e.into()));
            }
        };
        // Present before resolving waiters: the fault thread checks `present`
        // after recording a fault, so a fault read late is still resolved.
        self.present.insert(page as usize);
        self.blocktime.placed(page, Instant::now());
        Ok(placement)
    }

    pub fn stats(&self) -> PlacerStats {
        PlacerStats {
            pages_placed: self.placed.load(Ordering::Relaxed),
            zero_pages_placed: self.zero_placed.load(Ordering::Relaxed),
            already_present: self.already.load(Ordering::Relaxed),
        }
    }
}
