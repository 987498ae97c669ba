//! Who waits for which page, and for how long: fault latency and QEMU's
//! `postcopy-blocktime`.
//!
//! The fault thread reports each fault (page, thread, time it read the
//! message); the placer reports each page it places. In between, the thread
//! is blocked on that page. From these two events come:
//!
//! * fault latency: fault read → page placed, per fault (histogram);
//! * `postcopy-vcpu-blocktime`: total blocked time per faulting thread;
//! * `postcopy-blocktime`: as in QEMU, the time during which *all* vCPUs
//!   were blocked at once; it needs the vCPU count, so it is `None` when the
//!   region was created without one.
//!
//! The kernel gives no fault timestamp, so "fault" means "message read by the
//! fault thread", as in QEMU; the gap is the fault thread's wake-up time.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::latency::LatencyHistogram;
use super::page_set::PageSet;

pub struct Blocktime {
    /// Pages some thread is waiting for: lets the placer skip the lock for
    /// pages nobody faulted on (the background push).
    waited: PageSet,
    vcpus: usize,
    latency: LatencyHistogram,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    waiting: HashMap<u64, Vec<(u32, Instant)>>,
    /// Threads blocked now, with the number of pages each waits for.
    blocked: HashMap<u32, usize>,
    per_thread: BTreeMap<u32, Duration>,
    all_blocked_since: Option<Instant>,
    all_blocked: Duration,
    faults: u64,
}

/// A consistent copy of the figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlocktimeStats {
    pub faults: u64,
    pub resolved: u64,
    pub latency_p50: Option<Duration>,
    pub latency_p99: Option<Duration>,
    /// QEMU's `postcopy-blocktime`: all vCPUs blocked at once.
    pub all_blocked: Option<Duration>,
    /// QEMU's `postcopy-vcpu-blocktime`, keyed by thread id.
    pub per_thread: BTreeMap<u32, Duration>,
}

impl Blocktime {
    /// `vcpus`: threads that run the guest, 0 if unknown.
    pub fn new(num_pages: usize, vcpus: usize) -> Self {
        Blocktime {
            waited: PageSet::new(num_pages),
            vcpus,
            latency: LatencyHistogram::default(),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Thread `tid` started waiting for `page` at `at`. A repeated message
    /// for the same thread and page (a wake-up by a signal) is ignored.
    pub fn fault(&self, page: u64, tid: u32, at: Instant) {
        let mut s = self.lock();
        let w = s.waiting.entry(page).or_default();
        if w.iter().any(|&(t, _)| t == tid) {
            return;
        }
        w.push((tid, at));
        s.faults += 1;
        *s.blocked.entry(tid).or_default() += 1;
        if self.vcpus > 0 && s.blocked.len() >= self.vcpus && s.all_blocked_since.is_none() {
            s.all_blocked_since = Some(at);
        }
        drop(s);
        self.waited.insert(page as usize);
    }

    /// `page` is now present: every thread waiting for it runs again.
    pub fn placed(&self, page: u64, now: Instant) {
        if !self.waited.contains(page as usize) {
            return;
        }
        let mut s = self.lock();
        self.waited.remove(page as usize);
        let Some(waiters) = s.waiting.remove(&page) else {
            return;
        };
        for (tid, at) in waiters {
            let d = now.saturating_duration_since(at);
            self.latency.record(d);
            *s.per_thread.entry(tid).or_default() += d;
            if let Some(since) = s.all_blocked_since.take() {
                s.all_blocked += now.saturating_duration_since(since);
            }
            if let Some(n) = s.blocked.get_mut(&tid) {
                *n -= 1;
                if *n == 0 {
                    s.blocked.remove(&tid);
                }
            }
        }
    }

    pub fn stats(&self) -> BlocktimeStats {
        let s = self.lock();
        let open = s.all_blocked_since.map(|t| t.elapsed()).unwrap_or_default();
        BlocktimeStats {
            faults: s.faults,
            resolved: self.latency.count(),
            latency_p50: self.latency.quantile(0.5),
            latency_p99: self.latency.quantile(0.99),
            all_blocked: (self.vcpus > 0).then_some(s.all_blocked + open),
            per_thread: s.per_thread.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_thread_and_all_blocked_time() {
        let b = Blocktime::new(16, 2);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        b.fault(3, 10, t0);
        b.fault(3, 10, t0 + ms(1)); // repeated message: ignored
        b.fault(5, 11, t0 + ms(2)); // now both vCPUs are blocked
        b.placed(3, t0 + ms(6));
        b.placed(7, t0 + ms(7)); // nobody waited for it
        b.placed(5, t0 + ms(12));
        let s = b.stats();
        assert_eq!((s.faults, s.resolved), (2, 2));
        assert_eq!(s.per_thread.get(&10), Some(&ms(6)));
        assert_eq!(s.per_thread.get(&11), Some(&ms(10)));
        assert_eq!(s.all_blocked, Some(ms(4)));
        let p99 = s.latency_p99.unwrap();
        assert!(p99 <= ms(10) && p99 >= ms(10) * 15 / 16);
    }

    #[test]
    fn without_a_vcpu_count_there_is_no_all_blocked_figure() {
        let b = Blocktime::new(4, 0);
        b.fault(1, 1, Instant::now());
        assert_eq!(b.stats().all_blocked, None);
    }
}
