//! Dirty bitmaps: one bit per page in u64 words.
//!
//! Every scan is word-wise: counts use `count_ones`; `indices()` and `runs()`
//! decode set bits with SIMD where the CPU has it, on every core for large
//! bitmaps (`decode`).

use crate::error::{CoreError, CoreResult};

mod decode;

pub use decode::recycle;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    nbits: usize,
}

fn words_for(nbits: usize) -> usize {
    nbits.div_ceil(64)
}

impl DirtyBitmap {
    /// An empty bitmap covering `nbits` pages.
    pub fn new(nbits: usize) -> Self {
        DirtyBitmap {
            words: vec![0; words_for(nbits)],
            nbits,
        }
    }

    /// A bitmap with every page set.
    pub fn full(nbits: usize) -> Self {
        let mut bm = DirtyBitmap {
            words: vec![u64::MAX; words_for(nbits)],
            nbits,
        };
        bm.mask_tail();
        bm
    }

    /// Builds a bitmap from words; bits past `nbits` must be clear.
    pub fn from_words(words: Vec<u64>, nbits: usize) -> CoreResult<Self> {
        if words.len() != words_for(nbits) {
            return Err(CoreError::invalid(format!(
                "{} words cannot hold exactly {nbits} bits (need {})",
                words.len(),
                words_for(nbits)
            )));
        }
        let bm = DirtyBitmap { words, nbits };
        if let Some(&last) = bm.words.last() {
            if last & !bm.tail_mask() != 0 {
                return Err(CoreError::invalid(format!(
                    "bits set past the end of a {nbits}-bit bitmap"
                )));
            }
        }
        Ok(bm)
    }

    /// Builds a bitmap with the given page indices set.
    pub fn from_indices(indices: &[u64], nbits: usize) -> CoreResult<Self> {
        let mut bm = DirtyBitmap::new(nbits);
        for &i in indices {
            bm.try_set(i as usize)?;
        }
        Ok(bm)
    }

    fn tail_mask(&self) -> u64 {
        match self.nbits % 64 {
            0 => u64::MAX,
            r => (1u64 << r) - 1,
        }
    }

    fn mask_tail(&mut self) {
        let mask = self.tail_mask();
        if let Some(last) = self.words.last_mut() {
            *last &= mask;
        }
    }

    pub fn len(&self) -> usize {
        self.nbits
    }

    pub fn is_empty(&self) -> bool {
        self.nbits == 0
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    pub fn into_words(self) -> Vec<u64> {
        self.words
    }

    fn check_index(&self, i: usize) -> CoreResult<()> {
        if i >= self.nbits {
            return Err(CoreError::invalid(format!(
                "page {i} is outside a bitmap of {} pages",
                self.nbits
            )));
        }
        Ok(())
    }

    fn check_same_len(&self, other: &DirtyBitmap) -> CoreResult<()> {
        if self.nbits != other.nbits {
            return Err(CoreError::invalid(format!(
                "bitmaps differ in length: {} and {} pages",
                self.nbits, other.nbits
            )));
        }
        Ok(())
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.nbits && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Sets page `i`; panics-free, returns an error when out of range.
    pub fn try_set(&mut self, i: usize) -> CoreResult<()> {
        self.check_index(i)?;
        self.words[i / 64] |= 1 << (i % 64);
        Ok(())
    }

    /// Sets page `i`, which the caller knows is in range.
    pub fn set(&mut self, i: usize) {
        debug_assert!(i < self.nbits);
        self.words[i / 64] |= 1 << (i % 64);
    }

    pub fn clear(&mut self, i: usize) {
        if i < self.nbits {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// Sets pages `[start, start + len)`.
    pub fn set_range(&mut self, start: usize, len: usize) -> CoreResult<()> {
        let end = self.range_end(start, len)?;
        for (wi, mask) in Self::range_masks(start, end) {
            self.words[wi] |= mask;
        }
        Ok(())
    }

    fn range_end(&self, start: usize, len: usize) -> CoreResult<usize> {
        match start.checked_add(len) {
            Some(end) if end <= self.nbits => Ok(end),
            _ => Err(CoreError::invalid(format!(
                "page range {start}+{len} is outside a bitmap of {} pages",
                self.nbits
            ))),
        }
    }

    /// The words overlapping `[start, end)` with, for each, the mask of its
    /// bits inside the range.
    fn range_masks(start: usize, end: usize) -> impl Iterator<Item = (usize, u64)> {
        let (first, last) = (start / 64, end.saturating_sub(1) / 64);
        let words = if start < end { first..last + 1 } else { 0..0 };
        words.map(move |wi| {
            let lo = if wi == first { start % 64 } else { 0 };
            let hi = if wi == last { (end - 1) % 64 + 1 } else { 64 };
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            (wi, mask)
        })
    }

    /// Number of set pages.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Number of set pages in `[start, start + len)`.
    pub fn count_range(&self, start: usize, len: usize) -> CoreResult<usize> {
        let end = self.range_end(start, len)?;
        Ok(Self::range_masks(start, end)
            .map(|(wi, mask)| (self.words[wi] & mask).count_ones() as usize)
            .sum())
    }

    /// `self |= other`.
    pub fn or_assign(&mut self, other: &DirtyBitmap) -> CoreResult<()> {
        self.check_same_len(other)?;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        Ok(())
    }

    /// `self &= !other`: drops the pages `other` has.
    pub fn and_not_assign(&mut self, other: &DirtyBitmap) -> CoreResult<()> {
        self.check_same_len(other)?;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
        Ok(())
    }

    /// Returns the set pages of `[start, start + len)` as a new full-size
    /// bitmap and clears them here.
    pub fn test_and_clear_range(&mut self, start: usize, len: usize) -> CoreResult<DirtyBitmap> {
        let end = self.range_end(start, len)?;
        let mut taken = DirtyBitmap::new(self.nbits);
        for (wi, mask) in Self::range_masks(start, end) {
            taken.words[wi] = self.words[wi] & mask;
            self.words[wi] &= !mask;
        }
        Ok(taken)
    }

    /// Clears up to `want` set pages at or after page `from`, in ascending
    /// order, appending them to `out`; returns the page after the last one
    /// examined (the next cursor: the bitmap's length when it reached the
    /// end). The work is proportional to the words walked and the pages
    /// taken, never to the whole bitmap (like vm-memory's range API).
    pub fn take_from(&mut self, from: usize, want: usize, out: &mut Vec<u64>) -> usize {
        if from >= self.nbits || want == 0 {
            return from.min(self.nbits);
        }
        let mut taken = 0;
        let mut wi = from / 64;
        // Bits below `from` in its word are not ours to take.
        let mut mask = u64::MAX << (from % 64);
        while wi < self.words.len() {
            let mut w = self.words[wi] & mask;
            while w != 0 {
                let bit = w.trailing_zeros() as usize;
                self.words[wi] &= !(1u64 << bit);
                out.push((wi * 64 + bit) as u64);
                taken += 1;
                if taken == want {
                    return (wi * 64 + bit + 1).min(self.nbits);
                }
                w &= w - 1;
            }
            wi += 1;
            mask = u64::MAX;
        }
        self.nbits
    }

    /// Clears every set page in `[start, start + len)`, in ascending order,
    /// appending them to `out`; returns how many. The work is proportional
    /// to the words of the range, never to the whole bitmap.
    pub fn take_range(&mut self, start: usize, len: usize, out: &mut Vec<u64>) -> usize {
        let end = start.saturating_add(len).min(self.nbits);
        if start >= end {
            return 0;
        }
        let before = out.len();
        let last = (end - 1) / 64;
        for wi in start / 64..=last {
            let mut mask = u64::MAX;
            if wi == start / 64 {
                mask &= u64::MAX << (start % 64);
            }
            if wi == last && !end.is_multiple_of(64) {
                mask &= u64::MAX >> (64 - end % 64);
            }
            let mut w = self.words[wi] & mask;
            self.words[wi] &= !mask;
            while w != 0 {
                out.push((wi * 64 + w.trailing_zeros() as usize) as u64);
                w &= w - 1;
            }
        }
        out.len() - before
    }

    /// Moves every set page out, leaving this bitmap empty.
    pub fn take(&mut self) -> DirtyBitmap {
        let nbits = self.nbits;
        DirtyBitmap {
            words: std::mem::replace(&mut self.words, vec![0; words_for(nbits)]),
            nbits,
        }
    }

    /// Iterates the set page indices in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words
            .iter()
            .enumerate()
            .filter(|(_, w)| **w != 0)
            .flat_map(|(wi, &w)| SetBits {
                word: w,
                base: wi * 64,
            })
    }

    /// The set page indices, ascending.
    pub fn indices(&self) -> Vec<u64> {
        decode::positions(&decode::Plain(&self.words), false)
    }

    /// Maximal runs of set pages as `(start, length)`.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        self.runs_flat()
            .chunks_exact(2)
            .map(|c| (c[0], c[1]))
            .collect()
    }

    /// Maximal runs as a flat `[start0, len0, start1, len1, ...]` vector.
    ///
    /// Decodes the edge words (see `decode::Edges`), whose set bits alternate
    /// run start, run end, straight into the output, turning each end into a
    /// length in place.
    pub fn runs_flat(&self) -> Vec<u64> {
        let out = decode::positions(&decode::Edges(&self.words), true);
        self.close_last_run(out)
    }

    /// An odd number of edges means a run reaches the last page: it ends at
    /// the bitmap's end (`positions` reserved the slot).
    fn close_last_run(&self, mut out: Vec<u64>) -> Vec<u64> {
        if let Some(&start) = out.last().filter(|_| out.len() % 2 == 1) {
            out.push(self.nbits as u64 - start);
        }
        out
    }
}

struct SetBits {
    word: u64,
    base: usize,
}

impl Iterator for SetBits {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.word == 0 {
            return None;
        }
        let bit = self.word.trailing_zeros() as usize;
        self.word &= self.word - 1;
        Some(self.base + bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn take_from_stops_at_want_and_reports_where() {
        let mut bm = DirtyBitmap::from_indices(&[1, 3, 64, 65, 200, 299], 300).unwrap();
        let mut out = Vec::new();
        // Page 1 is behind the cursor: left alone.
        assert_eq!(bm.take_from(2, 3, &mut out), 66);
        assert_eq!(out, vec![3, 64, 65]);
        assert!(bm.get(1) && !bm.get(3) && !bm.get(65));
        out.clear();
        // Fewer than wanted: runs to the end.
        assert_eq!(bm.take_from(66, 10, &mut out), 300);
        assert_eq!(out, vec![200, 299]);
        out.clear();
        assert_eq!(bm.take_from(300, 1, &mut out), 300);
        assert_eq!(bm.take_from(0, 0, &mut out), 0);
        assert!(out.is_empty());
        assert_eq!(bm.count(), 1);
    }

    fn naive_runs(bits: &[bool]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bits.len() {
            if bits[i] {
                let s = i;
                while i < bits.len() && bits[i] {
                    i += 1;
                }
                out.push((s as u64, (i - s) as u64));
            } else {
                i += 1;
            }
        }
        out
    }

    /// Indices and runs from every decode kernel this CPU has, on 1 to 4
    /// threads, checked against bit-by-bit models.
    fn check_all_kernels(bm: &DirtyBitmap) -> Result<(), TestCaseError> {
        let bits: Vec<bool> = (0..bm.len()).map(|i| bm.get(i)).collect();
        let idx: Vec<u64> = (0..bm.len() as u64).filter(|&i| bits[i as usize]).collect();
        let runs: Vec<u64> = naive_runs(&bits)
            .into_iter()
            .flat_map(|(s, l)| [s, l])
            .collect();
        for kernel in decode::Kernel::available() {
            for threads in 1..=4 {
                let got =
                    decode::positions_with(&decode::Plain(bm.words()), false, kernel, threads);
                prop_assert_eq!(&got, &idx, "indices, {:?} on {} threads", kernel, threads);
                let edges =
                    decode::positions_with(&decode::Edges(bm.words()), true, kernel, threads);
                let got = bm.close_last_run(edges);
                prop_assert_eq!(&got, &runs, "runs, {:?} on {} threads", kernel, threads);
            }
        }
        Ok(())
    }

    /// Words that exercise every decode path: empty, full (64 positions:
    /// the SIMD kernel's longest store), single bits, edges, sparse, dense.
    fn word() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(u64::MAX),
            (0u32..64).prop_map(|k| 1u64 << k),
            (0u32..64).prop_map(|k| u64::MAX << k),
            (0u32..64).prop_map(|k| u64::MAX >> k),
            any::<u64>(),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| a & b & c),
            (any::<u64>(), any::<u64>()).prop_map(|(a, b)| a | b),
        ]
    }

    proptest! {
        #[test]
        fn kernels_match_naive(mut words in proptest::collection::vec(word(), 0..700), trim in 0usize..64) {
            let nbits = (words.len() * 64).saturating_sub(trim);
            if nbits % 64 != 0 {
                *words.last_mut().unwrap() &= (1u64 << (nbits % 64)) - 1;
            }
            words.truncate(nbits.div_ceil(64));
            check_all_kernels(&DirtyBitmap::from_words(words, nbits).unwrap())?;
        }

        #[test]
        fn scans_match_naive(bits in proptest::collection::vec(any::<bool>(), 0..400)) {
            let idx: Vec<u64> = bits.iter().enumerate().filter(|(_, b)| **b).map(|(i, _)| i as u64).collect();
            let bm = DirtyBitmap::from_indices(&idx, bits.len()).unwrap();
            prop_assert_eq!(bm.count(), idx.len());
            prop_assert_eq!(bm.indices(), idx.clone());
            prop_assert_eq!(bm.iter().map(|i| i as u64).collect::<Vec<_>>(), idx);
            prop_assert_eq!(bm.runs(), naive_runs(&bits));
        }

        #[test]
        fn test_and_clear_splits_exactly(bits in proptest::collection::vec(any::<bool>(), 1..300), a in 0usize..300, b in 0usize..300) {
            let n = bits.len();
            let (start, end) = { let (x, y) = (a % (n + 1), b % (n + 1)); (x.min(y), x.max(y)) };
            let idx: Vec<u64> = bits.iter().enumerate().filter(|(_, b)| **b).map(|(i, _)| i as u64).collect();
            let mut bm = DirtyBitmap::from_indices(&idx, n).unwrap();
            let before = bm.clone();
            let taken = bm.test_and_clear_range(start, end - start).unwrap();
            for i in 0..n {
                let inside = i >= start && i < end;
                prop_assert_eq!(taken.get(i), inside && before.get(i));
                prop_assert_eq!(bm.get(i), !inside && before.get(i));
            }
        }
    }

    #[test]
    fn large_bitmaps_decode_in_parallel() {
        // Enough words for the automatic multi-threaded path, with long
        // all-ones and all-zero stretches crossing the range boundaries.
        let n = (1 << 21) * 64 + 5;
        let mut bm = DirtyBitmap::new(n);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for (i, w) in bm.words_mut().iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = match (i / 1000) % 4 {
                0 => 0,
                1 => u64::MAX,
                2 => x & (x >> 3) & (x >> 7),
                _ => x,
            };
        }
        bm.mask_tail();
        let idx: Vec<u64> = bm.iter().map(|i| i as u64).collect();
        assert_eq!(bm.indices(), idx);
        let mut runs = Vec::new();
        for &i in &idx {
            match runs.last_mut() {
                Some((s, l)) if *s + *l == i => *l += 1,
                _ => runs.push((i, 1)),
            }
        }
        assert_eq!(bm.runs(), runs);
        check_all_kernels(&bm).unwrap();
    }

    #[test]
    fn recycled_outputs_hold_only_new_positions() {
        let full = DirtyBitmap::full(1 << 20).indices(); // 8 MiB
        let address = full.as_ptr();
        recycle(full);
        let idx: Vec<u64> = (0..1 << 20).filter(|i| i % 3 != 0).collect();
        let bm = DirtyBitmap::from_indices(&idx, 1 << 20).unwrap();
        let got = bm.indices();
        assert_eq!(got.as_ptr(), address);
        assert_eq!(got, idx);
        recycle(got);
        let runs = bm.runs_flat();
        assert_eq!(runs.len(), (1 << 20) / 3 * 2);
        assert_eq!(&runs[..4], &[1, 2, 4, 2]);
    }

    #[test]
    fn set_operations_and_bounds() {
        let mut a = DirtyBitmap::from_indices(&[1, 2, 64, 99], 100).unwrap();
        let b = DirtyBitmap::from_indices(&[2, 70], 100).unwrap();
        a.or_assign(&b).unwrap();
        assert_eq!(a.indices(), vec![1, 2, 64, 70, 99]);
        a.and_not_assign(&b).unwrap();
        assert_eq!(a.indices(), vec![1, 64, 99]);
        assert!(a.try_set(100).is_err());
        assert!(a.or_assign(&DirtyBitmap::new(101)).is_err());
        assert_eq!(DirtyBitmap::full(70).count(), 70);
        assert!(DirtyBitmap::from_words(vec![0, 1 << 10], 70).is_err());
        assert_eq!(a.count_range(0, 65).unwrap(), 2);
    }
}
