//! Which destination pages may hold data: one bit per page, set for the
//! memory's data ranges when the receive starts and for every page stored
//! since. A page whose bit is clear is a hole: it reads as zeros without
//! being allocated, so a zero page needs no write there, the digest hashes
//! it as zeros without reading it, and a normal page can be received into
//! it straight from the socket (zero-filling it again undoes that).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::GuestMemory;

pub struct DataMap {
    words: Vec<AtomicU64>,
}

impl DataMap {
    /// The pages of `mem`'s data ranges (see [`GuestMemory::data_ranges`]).
    pub fn of(mem: &GuestMemory) -> Self {
        let n = mem.num_pages();
        let ps = mem.page_size();
        let map = DataMap {
            words: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        };
        for (from, to) in mem.data_ranges() {
            for p in from / ps..to.div_ceil(ps).min(n) {
                map.mark(p);
            }
        }
        map
    }

    /// `page` must be a page of the memory the map was made for.
    pub fn mark(&self, page: usize) {
        self.words[page / 64].fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    pub fn may_hold_data(&self, page: usize) -> bool {
        self.words[page / 64].load(Ordering::Relaxed) & (1 << (page % 64)) != 0
    }
}
