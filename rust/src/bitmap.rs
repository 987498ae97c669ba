//! Dirty bitmaps: one bit per page in u64 words.
//!
//! Every scan is word-wise: all-zero words are skipped, set bits are walked
//! with `trailing_zeros` and `w &= w - 1`, counts use `count_ones`.

use crate::error::{CoreError, CoreResult};

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
        let words = &self.words;
        decode_positions(words.len(), self.count(), |i| words[i])
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
    /// Works on edge words: bit i of `w ^ (w << 1 | carry)` is set where page
    /// i differs from page i-1, so the edges alternate run start, run end.
    /// Decoding them is the same branch-light loop as `indices()`.
    pub fn runs_flat(&self) -> Vec<u64> {
        let words = &self.words;
        let edge = |i: usize| {
            let carry = if i == 0 { 0 } else { words[i - 1] >> 63 };
            words[i] ^ (words[i] << 1 | carry)
        };
        let total = (0..words.len())
            .map(|i| edge(i).count_ones() as usize)
            .sum::<usize>();
        let mut out = decode_positions(words.len(), total, edge);
        if out.len() % 2 == 1 {
            // A run reaches the last page: it ends at the bitmap's end.
            out.push(self.nbits as u64);
        }
        for pair in out.chunks_exact_mut(2) {
            pair[1] -= pair[0];
        }
        out
    }
}

/// Positions of the set bits of `nwords` words (word i covers bits
/// `64 i ..`), `total` of them in all, ascending.
///
/// Lemire's bitset decoding: each non-zero word writes eight positions
/// unconditionally and then advances by its popcount, so words with up to
/// eight bits take no data-dependent branch. Compiled with POPCNT/BMI1 when
/// the CPU has them.
fn decode_positions(nwords: usize, total: usize, word: impl Fn(usize) -> u64) -> Vec<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("popcnt")
            && std::arch::is_x86_feature_detected!("bmi1")
        {
            #[target_feature(enable = "popcnt,bmi1")]
            fn fast(nwords: usize, total: usize, word: impl Fn(usize) -> u64) -> Vec<u64> {
                decode_generic(nwords, total, word)
            }
            // SAFETY: the CPU supports the enabled features (checked above).
            return unsafe { fast(nwords, total, word) };
        }
    }
    decode_generic(nwords, total, word)
}

/// Asks for transparent huge pages on a large output buffer, as numpy does
/// for its arrays: first-touch faults otherwise cost more than the decoding.
fn advise_huge(v: &mut Vec<u64>) {
    const HUGE: usize = 2 << 20;
    let bytes = v.capacity() * std::mem::size_of::<u64>();
    if bytes < 2 * HUGE {
        return;
    }
    let start = (v.as_mut_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_mut_ptr() as usize + bytes) & !(HUGE - 1);
    if end > start {
        // SAFETY: advice only, on whole huge pages inside the Vec's own
        // allocation; it never changes contents or validity of the memory.
        let _ = unsafe {
            rustix::mm::madvise(
                start as *mut std::ffi::c_void,
                end - start,
                rustix::mm::Advice::LinuxHugepage,
            )
        };
    }
}

#[inline(always)]
fn decode_generic(nwords: usize, total: usize, word: impl Fn(usize) -> u64) -> Vec<u64> {
    const SLACK: usize = 8;
    let mut out: Vec<u64> = Vec::with_capacity(total + SLACK);
    advise_huge(&mut out);
    let p = out.as_mut_ptr();
    let mut n = 0usize;
    for i in 0..nwords {
        let mut w = word(i);
        if w == 0 {
            continue;
        }
        let cnt = w.count_ones() as usize;
        if n + cnt > total {
            break; // cannot happen when `total` is the true count
        }
        let base = i as u64 * 64;
        // SAFETY: n + cnt <= total, so the first min(cnt, 8) writes are within
        // the counted positions and the rest land in the SLACK spare slots
        // (n + 8 <= total + SLACK); all are inside the allocation and beyond
        // `len` until `set_len`, which only covers written positions.
        unsafe {
            for k in 0..SLACK {
                *p.add(n + k) = base + w.trailing_zeros() as u64;
                w &= w.wrapping_sub(1);
            }
            let mut k = SLACK;
            while w != 0 {
                *p.add(n + k) = base + w.trailing_zeros() as u64;
                w &= w - 1;
                k += 1;
            }
        }
        n += cnt;
    }
    // SAFETY: positions [0, n) were all written above.
    unsafe { out.set_len(n) };
    out
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

    proptest! {
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
