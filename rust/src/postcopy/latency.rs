//! Fault latency: how long a faulting thread waited for its page, kept as a
//! log-linear histogram so memory stays fixed however many faults occur.
//!
//! Each power of two is split into 16 buckets, so a reported percentile is
//! within 1/16 (6.25 %) of the true value; values below 16 ns are exact.

use std::sync::Mutex;
use std::time::Duration;

const SUB: u32 = 16;
const BUCKETS: usize = (SUB as usize) * 61;

pub struct LatencyHistogram {
    inner: Mutex<Inner>,
}

struct Inner {
    buckets: Box<[u64; BUCKETS]>,
    count: u64,
    max_ns: u64,
}

fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let e = 63 - ns.leading_zeros(); // >= 4
    let sub = (ns >> (e - 4)) & (SUB as u64 - 1);
    ((e - 3) * SUB) as usize + sub as usize
}

/// The smallest value that falls in bucket `i`.
fn lower_bound(i: usize) -> u64 {
    if i < SUB as usize {
        return i as u64;
    }
    let e = (i / SUB as usize) as u32 + 3;
    let sub = (i % SUB as usize) as u64;
    (1u64 << e) | (sub << (e - 4))
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            inner: Mutex::new(Inner {
                buckets: Box::new([0; BUCKETS]),
                count: 0,
                max_ns: 0,
            }),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.buckets[bucket(ns).min(BUCKETS - 1)] += 1;
        g.count += 1;
        g.max_ns = g.max_ns.max(ns);
    }

    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).count
    }

    /// The `q`-quantile (0 < q <= 1): the lower bound of the bucket holding
    /// it, capped by the largest value seen. `None` before any sample.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.count == 0 {
            return None;
        }
        let rank = ((q * g.count as f64).ceil() as u64).clamp(1, g.count);
        let mut seen = 0;
        for (i, n) in g.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_nanos(lower_bound(i).min(g.max_ns)));
            }
        }
        Some(Duration::from_nanos(g.max_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 40, u64::MAX / 2]) {
            let b = bucket(ns);
            assert!(b >= last);
            last = b;
            let lo = lower_bound(b);
            assert!(lo <= ns && ns - lo <= ns / 16, "{ns} in bucket from {lo}");
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5).unwrap().as_nanos() as f64;
        let p99 = h.quantile(0.99).unwrap().as_nanos() as f64;
        assert!((50_000.0 * 15.0 / 16.0..=50_000.0).contains(&p50), "{p50}");
        assert!((99_000.0 * 15.0 / 16.0..=99_000.0).contains(&p99), "{p99}");
        assert_eq!(h.count(), 100);
    }
}
