//! Decoding the set-bit positions of a word sequence into a flat `u64`
//! buffer: `indices()` decodes the bitmap's words, `runs()` its edge words.
//!
//! A first pass counts the positions so the output is allocated once, at its
//! exact size, and handed to the caller (numpy) without a copy. Large bitmaps
//! are cut into one word range per core: each thread counts its range, then
//! decodes it straight into its own slice of the output, so the first-touch
//! page faults of a large output are taken in parallel too.
//!
//! Zero words are dropped first, branch-free, a block at a time; then, per
//! word, the fastest kernel the CPU has: AVX-512 VBMI2 compresses the byte
//! offsets of the set bits (`VPCOMPRESSB`) and widens them eight at a time,
//! with no data-dependent branch for words of up to eight bits; without it,
//! Lemire's branch-light scalar loop. Kernels keep a 72-slot margin for
//! their unconditional stores and finish the last positions of a range
//! exactly, so no thread ever writes into a neighbour's slice.

use std::mem::MaybeUninit;
use std::ops::Range;

/// Below this many words (16 MiB of bitmap, 128 Mi pages) one thread does
/// everything: it finishes in a few milliseconds, about what waking a second
/// thread can take on a loaded host.
const PARALLEL_WORDS: usize = 1 << 21;
/// Words decoded between two passes turning (start, end) pairs into
/// (start, length): the fresh positions are still in L1.
const BLOCK: usize = 256;
/// A SIMD word stores up to 64 positions rounded up to 8, plus 8 spare.
const MARGIN: usize = 72;

/// Where the words come from.
pub(super) trait Source: Sync {
    fn len(&self) -> usize;
    fn word(&self, i: usize) -> u64;
    /// Set bits in words `r`.
    fn count(&self, r: Range<usize>) -> usize;
}

/// The bitmap's own words: their set bits are the dirty pages.
pub(super) struct Plain<'a>(pub &'a [u64]);

/// Edge words: bit i of `w ^ (w << 1 | carry)` is set where page i differs
/// from page i-1, so the edges alternate run start, run end.
pub(super) struct Edges<'a>(pub &'a [u64]);

impl Source for Plain<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn word(&self, i: usize) -> u64 {
        self.0[i]
    }
    #[inline(always)]
    fn count(&self, r: Range<usize>) -> usize {
        self.0[r].iter().map(|w| w.count_ones() as usize).sum()
    }
}

impl Source for Edges<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn word(&self, i: usize) -> u64 {
        let carry = if i == 0 { 0 } else { self.0[i - 1] >> 63 };
        self.0[i] ^ (self.0[i] << 1 | carry)
    }
    #[inline(always)]
    fn count(&self, r: Range<usize>) -> usize {
        if r.is_empty() {
            return 0;
        }
        let w = &self.0[r.clone()];
        let rest: usize = w[1..]
            .iter()
            .zip(w)
            .map(|(&cur, &prev)| (cur ^ (cur << 1 | prev >> 63)).count_ones() as usize)
            .sum();
        self.word(r.start).count_ones() as usize + rest
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kernel {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Bmi,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub(super) fn best() -> Kernel {
        Self::available().pop().unwrap_or(Kernel::Generic)
    }

    /// Every kernel this CPU runs, slowest first (tests compare them all).
    pub(super) fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut v = vec![Kernel::Generic];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("popcnt") && has!("bmi1") {
                v.push(Kernel::Bmi);
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512vbmi2") && has!("popcnt") {
                v.push(Kernel::Avx512);
            }
        }
        v
    }
}

/// Positions of the set bits of `src`'s words (word i covers bits `64 i ..`),
/// ascending. With `pairs`, consecutive positions (p0, p1), (p2, p3), ... are
/// stored as (p0, p1 - p0), ...; an odd last position is left as is, with
/// one spare slot reserved after it.
pub(super) fn positions<S: Source>(src: &S, pairs: bool) -> Vec<u64> {
    let threads = if src.len() >= PARALLEL_WORDS {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
    } else {
        1
    };
    positions_with(src, pairs, Kernel::best(), threads)
}

/// `positions` with a chosen kernel and number of word ranges (threads).
pub(super) fn positions_with<S: Source>(
    src: &S,
    pairs: bool,
    kernel: Kernel,
    threads: usize,
) -> Vec<u64> {
    let nwords = src.len();
    let threads = threads.clamp(1, nwords.max(1));
    let ranges: Vec<Range<usize>> = (0..threads)
        .map(|t| nwords * t / threads..nwords * (t + 1) / threads)
        .collect();
    let counts: Vec<usize> = if threads == 1 {
        vec![count(src, 0..nwords, kernel)]
    } else {
        std::thread::scope(|s| {
            let hs: Vec<_> = ranges
                .iter()
                .map(|r| s.spawn(move || count(src, r.clone(), kernel)))
                .collect();
            hs.into_iter().map(|h| h.join().expect("count")).collect()
        })
    };
    let total: usize = counts.iter().sum();
    let mut out = output(total + usize::from(pairs && total % 2 == 1));

    // Each range's slice of the output, and its first position's index.
    let mut slices = Vec::with_capacity(threads);
    let mut rest = &mut out.spare_capacity_mut()[..total];
    let mut first = 0;
    for (r, &c) in ranges.into_iter().zip(&counts) {
        let (mine, tail) = rest.split_at_mut(c);
        slices.push((r, mine, first));
        rest = tail;
        first += c;
    }
    let run = |(r, slice, first): (Range<usize>, &mut [MaybeUninit<u64>], usize)| {
        let want = slice.len();
        let got = decode_range(src, r, slice, pairs && first % 2 == 1, pairs, kernel);
        assert_eq!(got, want, "bitmap changed while being decoded");
    };
    if threads == 1 {
        slices.into_iter().for_each(run);
    } else {
        std::thread::scope(|s| {
            for job in slices {
                s.spawn(move || run(job));
            }
        });
    }
    // SAFETY: every range wrote exactly its counted positions (asserted
    // above), and the ranges' slices tile [0, total).
    unsafe { out.set_len(total) };
    if pairs {
        // A pair cut by a range boundary: its end opens the next range.
        let mut first = 0;
        for &c in &counts {
            if first % 2 == 1 && c > 0 {
                out[first] -= out[first - 1];
            }
            first += c;
        }
    }
    out
}

fn count<S: Source>(src: &S, r: Range<usize>, kernel: Kernel) -> usize {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            #[target_feature(enable = "avx512f,avx512vpopcntdq,popcnt")]
            fn fast<S: Source>(src: &S, r: Range<usize>) -> usize {
                src.count(r)
            }
            // SAFETY: Kernel::Avx512 is only chosen when the CPU has AVX-512
            // F and BW; VPOPCNTDQ is checked here.
            if std::arch::is_x86_feature_detected!("avx512vpopcntdq") {
                return unsafe { fast(src, r) };
            }
            src.count(r)
        }
        _ => src.count(r),
    }
}

/// Decodes words `r` into `out`, returns how many positions it wrote (at most
/// `out.len()`). With `pairs`, converts ends to lengths for the pairs whose
/// start is at an even global index; `odd` says `out[0]` has an odd one.
fn decode_range<S: Source>(
    src: &S,
    r: Range<usize>,
    out: &mut [MaybeUninit<u64>],
    odd: bool,
    pairs: bool,
    kernel: Kernel,
) -> usize {
    match kernel {
        Kernel::Generic => decode_blocks(src, r, out, odd, pairs, scalar_words),
        #[cfg(target_arch = "x86_64")]
        Kernel::Bmi => {
            // SAFETY: Kernel::Bmi is only chosen when the CPU has POPCNT and
            // BMI1 (Kernel::available).
            unsafe { decode_bmi(src, r, out, odd, pairs) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            // SAFETY: Kernel::Avx512 is only chosen when the CPU has AVX-512
            // F, BW, VBMI2 and POPCNT (Kernel::available).
            unsafe { decode_avx512(src, r, out, odd, pairs) }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt,bmi1")]
fn decode_bmi<S: Source>(
    src: &S,
    r: Range<usize>,
    out: &mut [MaybeUninit<u64>],
    odd: bool,
    pairs: bool,
) -> usize {
    decode_blocks(src, r, out, odd, pairs, scalar_words)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
fn decode_avx512<S: Source>(
    src: &S,
    r: Range<usize>,
    out: &mut [MaybeUninit<u64>],
    odd: bool,
    pairs: bool,
) -> usize {
    // The closure inherits this function's target features.
    decode_blocks(src, r, out, odd, pairs, |nz, o, n| avx512_words(nz, o, n))
}

/// The non-zero words of a block and their word numbers.
struct Nonzero {
    words: [u64; BLOCK],
    at: [usize; BLOCK],
    len: usize,
}

/// Runs `words` over `r` in blocks. Each block's non-zero words are first
/// gathered without a branch, so the kernels never see (or mispredict on)
/// zero words; finished (start, end) pairs become (start, length) while they
/// are still in cache.
#[inline(always)]
fn decode_blocks<S: Source>(
    src: &S,
    r: Range<usize>,
    out: &mut [MaybeUninit<u64>],
    odd: bool,
    pairs: bool,
    words: impl Fn(&Nonzero, &mut [MaybeUninit<u64>], usize) -> usize,
) -> usize {
    let mut nz = Nonzero {
        words: [0; BLOCK],
        at: [0; BLOCK],
        len: 0,
    };
    let mut n = 0;
    let mut done = usize::from(odd); // first position not yet paired
    let mut i = r.start;
    while i < r.end {
        let end = (i + BLOCK).min(r.end);
        let mut k = 0;
        for j in i..end {
            let w = src.word(j);
            // k < BLOCK: at most one slot per word of the block.
            nz.words[k % BLOCK] = w;
            nz.at[k % BLOCK] = j;
            k += usize::from(w != 0);
        }
        nz.len = k;
        n = words(&nz, out, n);
        i = end;
        // A range can hold no position at all while `done` starts at 1.
        if pairs && n > done {
            let whole = n.saturating_sub(done) & !1;
            // SAFETY: positions [0, n) were written by `words`.
            let fresh = unsafe { &mut *(&mut out[done..done + whole] as *mut _ as *mut [u64]) };
            for p in fresh.chunks_exact_mut(2) {
                p[1] -= p[0];
            }
            done += whole;
        }
    }
    n
}

/// Lemire's decoding: each word writes eight positions unconditionally and
/// then advances by its popcount, so words with up to eight bits take no
/// data-dependent branch.
#[inline(always)]
fn scalar_words(nz: &Nonzero, out: &mut [MaybeUninit<u64>], mut n: usize) -> usize {
    let cap = out.len();
    let p = out.as_mut_ptr() as *mut u64;
    for (&w, &at) in nz.words[..nz.len].iter().zip(&nz.at) {
        let base = at as u64 * 64;
        if n + MARGIN > cap {
            n = exact_word(w, base, out, n);
            continue;
        }
        let cnt = w.count_ones() as usize;
        let mut w = w;
        // SAFETY: n + 64 + 8 <= cap: the eight unconditional stores and the
        // up to 64 positions of the word are all inside `out`.
        unsafe {
            for k in 0..8 {
                *p.add(n + k) = base + w.trailing_zeros() as u64;
                w &= w.wrapping_sub(1);
            }
            let mut k = 8;
            while w != 0 {
                *p.add(n + k) = base + w.trailing_zeros() as u64;
                w &= w - 1;
                k += 1;
            }
        }
        n += cnt;
    }
    n
}

/// Writes the positions of `w` one by one, never past the end of `out`.
#[inline(always)]
fn exact_word(mut w: u64, base: u64, out: &mut [MaybeUninit<u64>], mut n: usize) -> usize {
    while w != 0 && n < out.len() {
        out[n].write(base + w.trailing_zeros() as u64);
        w &= w - 1;
        n += 1;
    }
    n
}

/// VPCOMPRESSB packs the byte offsets (0..63) of the set bits of a word into
/// the low bytes of a vector; they are widened to u64 eight at a time,
/// offset by the word's first page, and stored unaligned.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
#[inline]
fn avx512_words(nz: &Nonzero, out: &mut [MaybeUninit<u64>], mut n: usize) -> usize {
    use std::arch::x86_64::*;
    let cap = out.len();
    let p = out.as_mut_ptr() as *mut u64;
    let mut bytes = [0u8; 64];
    // SAFETY: IOTA is 64 readable bytes; the load is unaligned.
    let iota = unsafe { _mm512_loadu_si512(IOTA.as_ptr() as *const _) };
    for (&w, &at) in nz.words[..nz.len].iter().zip(&nz.at) {
        let base = at as u64 * 64;
        if n + MARGIN > cap {
            n = exact_word(w, base, out, n);
            continue;
        }
        let cnt = w.count_ones() as usize;
        let offs = _mm512_maskz_compress_epi8(w, iota);
        let b = _mm512_set1_epi64(base as i64);
        let eight = _mm512_cvtepu8_epi64(_mm512_castsi512_si128(offs));
        // SAFETY: n + 72 <= cap, and this word stores lanes [n, n + cnt
        // rounded up to 8) with cnt <= 64: all inside `out`. `bytes` is 64
        // bytes and j + 8 <= 64 for every read.
        unsafe {
            _mm512_storeu_si512(p.add(n) as *mut _, _mm512_add_epi64(eight, b));
            if cnt > 8 {
                _mm512_storeu_si512(bytes.as_mut_ptr() as *mut _, offs);
                let mut j = 8;
                while j < cnt {
                    let raw = _mm_loadl_epi64(bytes.as_ptr().add(j) as *const _);
                    let v = _mm512_add_epi64(_mm512_cvtepu8_epi64(raw), b);
                    _mm512_storeu_si512(p.add(n + j) as *mut _, v);
                    j += 8;
                }
            }
        }
        n += cnt;
    }
    n
}

#[cfg(target_arch = "x86_64")]
const IOTA: [u8; 64] = {
    let mut a = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        a[i] = i as u8;
        i += 1;
    }
    a
};

/// Outputs smaller than this come from the allocator's own free lists
/// cheaply; larger ones cost first-touch page faults (the kernel zeroes
/// every page) that take longer than decoding into them.
const SPARE_MIN_BYTES: usize = 4 << 20;

/// The one large output buffer kept after its array was freed.
static SPARE: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

/// An empty vector with room for `cap` positions: the spare buffer when it
/// fits (and is at most twice the size), else a fresh allocation.
fn output(cap: usize) -> Vec<u64> {
    if cap * 8 >= SPARE_MIN_BYTES {
        let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
        if spare.capacity() >= cap && spare.capacity() / 2 <= cap {
            return std::mem::take(&mut *spare);
        }
    }
    let mut out = Vec::with_capacity(cap);
    advise_huge(&mut out);
    out
}

/// Takes back a vector returned by `indices()` or `runs_flat()` once its
/// caller is done with it, so the next large decode writes into pages that
/// are already mapped. Keeps one buffer of at most 1/16 of the machine's
/// memory, and only large ones; anything else is freed.
pub fn recycle(mut v: Vec<u64>) {
    let bytes = v.capacity() * 8;
    if bytes < SPARE_MIN_BYTES || bytes > ram_bytes() / 16 {
        return;
    }
    v.clear();
    let old = std::mem::replace(&mut *SPARE.lock().unwrap_or_else(|p| p.into_inner()), v);
    drop(old); // freed outside the lock
}

fn ram_bytes() -> usize {
    // SAFETY: sysconf only reads system parameters.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as usize).saturating_mul(size.max(0) as usize)
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
