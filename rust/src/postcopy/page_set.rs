//! A fixed-size set of page indices that many threads update without locks.
//!
//! Post-copy keeps two: the pages present on the destination (placed once,
//! never again) and the pages already requested from the source (one request
//! per page however many threads fault on it). Sequentially consistent, so
//! "insert here, then check there" pairs between two threads never both miss.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub struct PageSet {
    words: Box<[AtomicU64]>,
    len: usize,
    count: AtomicUsize,
}

impl PageSet {
    pub fn new(len: usize) -> Self {
        PageSet {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
            count: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn contains(&self, page: usize) -> bool {
        page < self.len && self.words[page / 64].load(Ordering::SeqCst) & (1 << (page % 64)) != 0
    }

    /// Adds `page`; true if this call added it (exactly one caller wins).
    pub fn insert(&self, page: usize) -> bool {
        let bit = 1u64 << (page % 64);
        let won = self.words[page / 64].fetch_or(bit, Ordering::SeqCst) & bit == 0;
        if won {
            self.count.fetch_add(1, Ordering::SeqCst);
        }
        won
    }

    /// Removes `page`; true if it was present.
    pub fn remove(&self, page: usize) -> bool {
        let bit = 1u64 << (page % 64);
        let was = self.words[page / 64].fetch_and(!bit, Ordering::SeqCst) & bit != 0;
        if was {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        was
    }

    /// The first page in the set at or after `start`, wrapping once.
    pub fn first_from(&self, start: usize) -> Option<usize> {
        let scan = |from: usize, to: usize| -> Option<usize> {
            let mut w = from / 64;
            let mut mask = u64::MAX << (from % 64);
            while w * 64 < to {
                let bits = self.words[w].load(Ordering::SeqCst) & mask;
                if bits != 0 {
                    let p = w * 64 + bits.trailing_zeros() as usize;
                    return (p < to).then_some(p);
                }
                w += 1;
                mask = u64::MAX;
            }
            None
        };
        let start = if start >= self.len { 0 } else { start };
        scan(start, self.len).or_else(|| scan(0, start))
    }

    /// The pages not in the set, in order.
    pub fn absent(&self) -> Vec<u64> {
        (0..self.len)
            .filter(|&p| !self.contains(p))
            .map(|p| p as u64)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn exactly_one_thread_wins_each_page() {
        let set = Arc::new(PageSet::new(1000));
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let set = &set;
                    s.spawn(move || (0..1000).filter(|&p| set.insert(p)).count())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1000);
        assert_eq!(set.count(), 1000);
        assert!(set.remove(999) && !set.remove(999));
        assert_eq!(set.absent(), vec![999]);
        assert!(!set.contains(5000));
        assert_eq!(set.first_from(0), Some(0));
        let sparse = PageSet::new(200);
        assert_eq!(sparse.first_from(7), None);
        sparse.insert(3);
        sparse.insert(130);
        assert_eq!(sparse.first_from(4), Some(130));
        assert_eq!(sparse.first_from(131), Some(3));
        assert_eq!(sparse.first_from(500), Some(3));
    }
}
