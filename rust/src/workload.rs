//! Workload vCPUs: native threads that write guest memory by a spec.
//!
//! Each write adds one to a u64 in the page (at a slot owned by the vCPU),
//! so every write changes the page's content and a page a migration misses
//! shows up in the digest. Threads start when the guest is created and run
//! without the GIL.
//!
//! Spec grammar: `PATTERN[:key=value,...]`
//!
//! | pattern | keys (defaults) |
//! |---|---|
//! | `idle` | none: the vCPUs never write |
//! | `sequential` | `wss` (all memory), `rate` (`max`): each vCPU sweeps its share of the working set, one write per page |
//! | `uniform` | `wss`, `rate`: uniformly random pages of the working set |
//! | `hotset` | `wss`, `rate`, `hot` (0.1, fraction of the set), `hotprob` (0.9, probability a write goes to the hot part) |
//! | `zipf` | `wss`, `rate`, `s` (1.1): page of rank k (k = 1 is page 0) written with probability ∝ 1/k^s |
//!
//! `wss` is a size (`256MiB`, `64KiB`, `1GiB`, `4096`, binary units), whole
//! pages. `rate` is the guest's page writes per second, shared evenly by its
//! vCPUs, or `max` for unthrottled.
//!
//! Pacing is against a monotonic clock in batches of about 1 ms of writes: a
//! vCPU sleeps until the absolute time its next batch is due, so sleep
//! overshoot is repaid by the next batch rather than accumulating. A vCPU that
//! falls more than 50 ms behind (no free core) drops the debt instead of
//! bursting, and `stats()["rate"]` reports what was achieved.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use crate::error::{CoreError, CoreResult};
use crate::memory::GuestMemory;

/// Upper bound on vCPU threads, so a typo cannot spawn a million threads.
pub const MAX_VCPUS: usize = 256;
/// Throttle ceiling, as QEMU's `cpu-throttle-percentage` max of 99.
pub const MAX_THROTTLE: f64 = 0.99;
const SLICE: Duration = Duration::from_millis(10);
const BATCH_PERIOD: f64 = 0.001;
const MAX_BATCH: usize = 4096;
const MAX_LAG: Duration = Duration::from_millis(50);

#[derive(Clone, Debug, PartialEq)]
pub enum Pattern {
    Idle,
    Sequential,
    Uniform,
    Hotset { hot: f64, hotprob: f64 },
    Zipf { s: f64 },
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadSpec {
    pub pattern: Pattern,
    /// Working-set size in bytes; `None` means all of guest memory.
    pub wss: Option<u64>,
    /// Guest-wide page writes per second; `None` means `max`.
    pub rate: Option<f64>,
}

/// Parses a byte size with an optional binary unit: `4096`, `64KiB`, `256MiB`,
/// `1GiB`, `2TiB` (also `K`, `M`, `G`, `T`, `KB`.. as binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("{s:?} is not a size (expected e.g. 256MiB)"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (number too large)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => {
            return Err(format!(
                "{s:?} has an unknown unit {u:?} (use KiB, MiB, GiB, TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} overflows 64 bits"))
}

fn parse_fraction(key: &str, v: &str, open_low: bool) -> CoreResult<f64> {
    let x: f64 = v
        .parse()
        .map_err(|_| CoreError::invalid(format!("workload field {key}={v}: not a number")))?;
    let ok = if open_low {
        x > 0.0 && x < 1.0
    } else {
        (0.0..=1.0).contains(&x)
    };
    if !ok {
        let range = if open_low { "(0, 1)" } else { "[0, 1]" };
        return Err(CoreError::invalid(format!(
            "workload field {key}={v}: must lie in {range}"
        )));
    }
    Ok(x)
}

impl WorkloadSpec {
    pub fn parse(text: &str) -> CoreResult<Self> {
        let text = text.trim();
        let (name, rest) = text.split_once(':').unwrap_or((text, ""));
        let mut wss = None;
        let mut rate = None;
        let (mut hot, mut hotprob, mut s) = (0.1, 0.9, 1.1);
        let allowed: &[&str] = match name {
            "idle" => &[],
            "sequential" | "uniform" => &["wss", "rate"],
            "hotset" => &["wss", "rate", "hot", "hotprob"],
            "zipf" => &["wss", "rate", "s"],
            other => {
                return Err(CoreError::invalid(format!(
                    "unknown workload {other:?} (expected idle, sequential, uniform, hotset, zipf)"
                )))
            }
        };
        for item in rest.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| {
                CoreError::invalid(format!("workload field {item:?} is not key=value"))
            })?;
            let (k, v) = (k.trim(), v.trim());
            if !allowed.contains(&k) {
                return Err(CoreError::invalid(format!(
                    "workload {name} has no field {k:?} (fields: {})",
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.join(", ")
                    }
                )));
            }
            match k {
                "wss" => {
                    let b = parse_size(v)
                        .map_err(|e| CoreError::invalid(format!("workload field wss: {e}")))?;
                    if b == 0 {
                        return Err(CoreError::invalid("workload field wss=0: must be positive"));
                    }
                    wss = Some(b);
                }
                "rate" => {
                    rate = if v == "max" {
                        None
                    } else {
                        let r: f64 = v.parse().map_err(|_| {
                            CoreError::invalid(format!(
                                "workload field rate={v}: expected page writes/s or 'max'"
                            ))
                        })?;
                        if !(r.is_finite() && r > 0.0) {
                            return Err(CoreError::invalid(format!(
                                "workload field rate={v}: must be positive or 'max'"
                            )));
                        }
                        Some(r)
                    }
                }
                "hot" => hot = parse_fraction(k, v, true)?,
                "hotprob" => hotprob = parse_fraction(k, v, false)?,
                "s" => {
                    s = v
                        .parse()
                        .ok()
                        .filter(|x: &f64| x.is_finite() && *x > 0.0)
                        .ok_or_else(|| {
                            CoreError::invalid(format!("workload field s={v}: must be positive"))
                        })?
                }
                _ => unreachable!("checked against the allowed list"),
            }
        }
        let pattern = match name {
            "idle" => Pattern::Idle,
            "sequential" => Pattern::Sequential,
            "uniform" => Pattern::Uniform,
            "hotset" => Pattern::Hotset { hot, hotprob },
            _ => Pattern::Zipf { s },
        };
        Ok(WorkloadSpec { pattern, wss, rate })
    }

    /// The working set in pages for a memory, or an error naming `wss`.
    pub fn wss_pages(&self, mem_size: usize, page_size: usize) -> CoreResult<usize> {
        let bytes = self.wss.unwrap_or(mem_size as u64);
        if bytes > mem_size as u64 {
            return Err(CoreError::invalid(format!(
                "workload field wss={bytes} bytes exceeds guest memory of {mem_size} bytes"
            )));
        }
        if !bytes.is_multiple_of(page_size as u64) {
            return Err(CoreError::invalid(format!(
                "workload field wss={bytes} bytes is not a multiple of the page size {page_size}"
            )));
        }
        Ok((bytes / page_size as u64) as usize)
    }
}

/// Picks the pages one vCPU writes.
enum Sampler {
    Idle,
    Sequential { lo: usize, len: usize, next: usize },
    Uniform { n: usize },
    Hotset { hot: usize, n: usize, p: f64 },
    Zipf(Zipf<f64>, usize),
}

impl Sampler {
    fn new(pattern: &Pattern, wss: usize, vcpu: usize, vcpus: usize) -> CoreResult<Self> {
        Ok(match *pattern {
            Pattern::Idle => Sampler::Idle,
            Pattern::Sequential => {
                let (lo, hi) = (wss * vcpu / vcpus, wss * (vcpu + 1) / vcpus);
                // More vCPUs than pages: the extra vCPUs sweep the whole set.
                let (lo, len) = if hi > lo { (lo, hi - lo) } else { (0, wss) };
                Sampler::Sequential { lo, len, next: 0 }
            }
            Pattern::Uniform => Sampler::Uniform { n: wss },
            Pattern::Hotset { hot, hotprob } => Sampler::Hotset {
                hot: ((wss as f64 * hot).round() as usize).clamp(1, wss),
                n: wss,
                p: hotprob,
            },
            Pattern::Zipf { s } => Sampler::Zipf(
                Zipf::new(wss as f64, s)
                    .map_err(|e| CoreError::invalid(format!("workload field s={s}: {e}")))?,
                wss,
            ),
        })
    }

    fn next(&mut self, rng: &mut SmallRng) -> usize {
        match self {
            Sampler::Idle => 0,
            Sampler::Sequential { lo, len, next } => {
                let p = *lo + *next;
                *next = (*next + 1) % *len;
                p
            }
            Sampler::Uniform { n } => rng.random_range(0..*n),
            Sampler::Hotset { hot, n, p } => {
                if *hot == *n || rng.random::<f64>() < *p {
                    rng.random_range(0..*hot)
                } else {
                    rng.random_range(*hot..*n)
                }
            }
            Sampler::Zipf(z, n) => (z.sample(rng) as usize).clamp(1, *n) - 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadStats {
    pub writes: u64,
    pub vcpu_writes: Vec<u64>,
    /// Seconds spent paused, including a pause in progress.
    pub paused_time: f64,
    /// Achieved page writes/s since the last change of regime (creation,
    /// resume, set_throttle, set_dirty_limit), over running time only.
    pub rate: f64,
    pub target_rate: Option<f64>,
    pub throttle: f64,
    pub dirty_limit: u64,
    pub running: bool,
    /// Seconds the last `pause()` took until every vCPU was parked.
    pub stop_latency: f64,
    pub elapsed: f64,
}

struct Ctl {
    parked: usize,
    paused_since: Option<Instant>,
    paused_total: Duration,
    regime_start: Instant,
    regime_writes: u64,
    stop_latency: Duration,
}

/// A cache line per counter, so vCPUs do not share one.
#[repr(align(64))]
struct Counter(AtomicU64);

struct Shared {
    mem: Arc<GuestMemory>,
    pattern: Pattern,
    wss_pages: usize,
    vcpu_rate: Option<f64>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    paused: AtomicBool,
    stop: AtomicBool,
    /// Throttle fraction, as f64 bits.
    throttle: AtomicU64,
    /// Per-vCPU page writes/s cap; 0 for none.
    dirty_limit: AtomicU64,
    /// Bumped on every control change so sleeping vCPUs re-plan.
    epoch: AtomicU64,
    writes: Vec<Counter>,
    created: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn total_writes(&self) -> u64 {
        self.writes
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum()
    }

    /// Sleeps until `deadline`, waking early on pause, stop or a control
    /// change (so a 990 ms throttle sleep does not delay `pause()`).
    fn sleep_until(&self, deadline: Instant, epoch: u64) {
        let mut g = self.lock();
        loop {
            let now = Instant::now();
            if now >= deadline
                || self.stop.load(Ordering::Relaxed)
                || self.paused.load(Ordering::Relaxed)
                || self.epoch.load(Ordering::Relaxed) != epoch
            {
                return;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn park(&self) {
        let mut g = self.lock();
        g.parked += 1;
        self.cv.notify_all();
        while self.paused.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed) {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.parked -= 1;
    }

    /// Per-vCPU writes/s under the spec rate and the dirty limit.
    fn effective_rate(&self) -> Option<f64> {
        let limit = self.dirty_limit.load(Ordering::Relaxed);
        let limit = (limit > 0).then_some(limit as f64);
        match (self.vcpu_rate, limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Adds one to the vCPU's u64 slot in `page`: always changes the page.
    #[inline]
    fn write_page(&self, page: usize, slot: usize) {
        let off = page * self.mem.page_size() + slot;
        // SAFETY: page < wss_pages <= num_pages and slot + 8 <= page_size, so
        // the u64 lies inside the mapping, 8-byte aligned (mapping and page
        // are page aligned, slot is a multiple of 8). Other writers of the
        // same word use atomics or plain stores; guest memory is shared by
        // design and a lost increment only changes which value is written.
        let word = unsafe { AtomicU64::from_ptr(self.mem.as_ptr().add(off).cast()) };
        word.fetch_add(1, Ordering::Relaxed);
    }

    fn run_vcpu(&self, id: usize, mut sampler: Sampler) {
        let mut rng = SmallRng::seed_from_u64(0x6d69_6700 ^ id as u64);
        let slot = (id % (self.mem.page_size() / 8)) * 8;
        let idle = matches!(sampler, Sampler::Idle);
        let mut epoch = self.epoch.load(Ordering::Acquire);
        let mut next_due = Instant::now();
        let mut slice_start = next_due;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if self.paused.load(Ordering::Acquire) {
                self.park();
                next_due = Instant::now();
                slice_start = next_due;
                continue;
            }
            let e = self.epoch.load(Ordering::Acquire);
            if e != epoch {
                epoch = e;
                next_due = Instant::now();
                slice_start = next_due;
            }
            if idle {
                self.sleep_until(Instant::now() + Duration::from_secs(3600), epoch);
                continue;
            }
            let rate = self.effective_rate();
            let batch = match rate {
                Some(r) => ((r * BATCH_PERIOD) as usize).clamp(1, MAX_BATCH),
                None => MAX_BATCH,
            };
            for _ in 0..batch {
                self.write_page(sampler.next(&mut rng), slot);
            }
            self.writes[id].0.fetch_add(batch as u64, Ordering::Relaxed);

            let pct = f64::from_bits(self.throttle.load(Ordering::Relaxed));
            if pct > 0.0 && slice_start.elapsed() >= SLICE {
                let nap = SLICE.mul_f64(pct / (1.0 - pct));
                self.sleep_until(Instant::now() + nap, epoch);
                next_due = Instant::now();
                slice_start = next_due;
                continue;
            }
            if let Some(r) = rate {
                next_due += Duration::from_secs_f64(batch as f64 / r);
                let now = Instant::now();
                if next_due > now {
                    self.sleep_until(next_due, epoch);
                } else if now - next_due > MAX_LAG {
                    next_due = now;
                }
            }
        }
    }
}

pub struct WorkloadGuest {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    vcpus: usize,
    spec_text: String,
}

impl WorkloadGuest {
    /// Starts `vcpus` threads running `workload` on `mem`.
    pub fn new(mem: Arc<GuestMemory>, vcpus: usize, workload: &str) -> CoreResult<Self> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(CoreError::invalid(format!(
                "vcpus={vcpus}: must be between 1 and {MAX_VCPUS}"
            )));
        }
        let spec = WorkloadSpec::parse(workload)?;
        let wss_pages = spec.wss_pages(mem.len(), mem.page_size())?;
        let samplers = (0..vcpus)
            .map(|id| Sampler::new(&spec.pattern, wss_pages, id, vcpus))
            .collect::<CoreResult<Vec<_>>>()?;
        let now = Instant::now();
        let shared = Arc::new(Shared {
            mem,
            pattern: spec.pattern.clone(),
            wss_pages,
            vcpu_rate: spec.rate.map(|r| r / vcpus as f64),
            ctl: Mutex::new(Ctl {
                parked: 0,
                paused_since: None,
                paused_total: Duration::ZERO,
                regime_start: now,
                regime_writes: 0,
                stop_latency: Duration::ZERO,
            }),
            cv: Condvar::new(),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            throttle: AtomicU64::new(0f64.to_bits()),
            dirty_limit: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            writes: (0..vcpus).map(|_| Counter(AtomicU64::new(0))).collect(),
            created: now,
        });
        let mut threads = Vec::with_capacity(vcpus);
        for (id, sampler) in samplers.into_iter().enumerate() {
            let sh = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("mig-vcpu{id}"))
                .spawn(move || sh.run_vcpu(id, sampler));
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    shared.stop.store(true, Ordering::Release);
                    shared.cv.notify_all();
                    for h in threads {
                        let _ = h.join();
                    }
                    return Err(CoreError::io(format!("spawning vCPU thread {id}"), e));
                }
            }
        }
        Ok(WorkloadGuest {
            shared,
            threads: Mutex::new(threads),
            vcpus,
            spec_text: workload.trim().to_string(),
        })
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.mem
    }

    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    pub fn workload(&self) -> &str {
        &self.spec_text
    }

    pub fn wss_pages(&self) -> usize {
        self.shared.wss_pages
    }

    pub fn pattern(&self) -> &Pattern {
        &self.shared.pattern
    }

    fn check_open(&self) -> CoreResult<()> {
        if self.shared.stop.load(Ordering::Acquire) {
            return Err(CoreError::invalid("the workload guest is closed"));
        }
        Ok(())
    }

    /// Stops every vCPU; returns once all are parked, with the time that took.
    /// Pausing a paused guest returns zero.
    pub fn pause(&self) -> CoreResult<Duration> {
        self.check_open()?;
        let sh = &self.shared;
        let t0 = Instant::now();
        let mut g = sh.lock();
        if g.paused_since.is_some() {
            return Ok(Duration::ZERO);
        }
        sh.paused.store(true, Ordering::Release);
        g.paused_since = Some(t0);
        sh.cv.notify_all();
        while g.parked < self.vcpus {
            g = sh.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        let latency = t0.elapsed();
        g.stop_latency = latency;
        Ok(latency)
    }

    /// Lets the vCPUs run again (no-op when running).
    pub fn resume(&self) -> CoreResult<()> {
        self.check_open()?;
        let sh = &self.shared;
        let mut g = sh.lock();
        if let Some(since) = g.paused_since.take() {
            g.paused_total += since.elapsed();
            sh.paused.store(false, Ordering::Release);
            Self::new_regime(sh, &mut g);
            sh.cv.notify_all();
        }
        Ok(())
    }

    fn new_regime(sh: &Shared, g: &mut Ctl) {
        g.regime_start = Instant::now();
        g.regime_writes = sh.total_writes();
    }

    fn control_changed(&self) {
        let sh = &self.shared;
        let mut g = sh.lock();
        sh.epoch.fetch_add(1, Ordering::AcqRel);
        Self::new_regime(sh, &mut g);
        sh.cv.notify_all();
    }

    /// CPU throttling: each 10 ms of running is followed by a sleep of
    /// `pct / (1 - pct) × 10 ms`.
    pub fn set_throttle(&self, pct: f64) -> CoreResult<()> {
        self.check_open()?;
        if !(0.0..=MAX_THROTTLE).contains(&pct) {
            return Err(CoreError::invalid(format!(
                "throttle {pct} must lie in [0.0, {MAX_THROTTLE}]"
            )));
        }
        self.shared.throttle.store(pct.to_bits(), Ordering::Relaxed);
        self.control_changed();
        Ok(())
    }

    /// Caps each vCPU at `pages_per_second` page writes/s (0 removes the cap).
    pub fn set_dirty_limit(&self, pages_per_second: u64) -> CoreResult<()> {
        self.check_open()?;
        self.shared
            .dirty_limit
            .store(pages_per_second, Ordering::Relaxed);
        self.control_changed();
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        !self.shared.stop.load(Ordering::Acquire) && !self.shared.paused.load(Ordering::Acquire)
    }

    pub fn is_closed(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> WorkloadStats {
        let sh = &self.shared;
        let g = sh.lock();
        let now = Instant::now();
        let vcpu_writes: Vec<u64> = sh
            .writes
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .collect();
        let writes: u64 = vcpu_writes.iter().sum();
        let paused_time = g.paused_total + g.paused_since.map_or(Duration::ZERO, |s| now - s);
        let run_end = g.paused_since.unwrap_or(now);
        let running = run_end
            .saturating_duration_since(g.regime_start)
            .as_secs_f64();
        let rate = if running > 0.0 {
            writes.saturating_sub(g.regime_writes) as f64 / running
        } else {
            0.0
        };
        WorkloadStats {
            writes,
            vcpu_writes,
            paused_time: paused_time.as_secs_f64(),
            rate,
            target_rate: sh.vcpu_rate.map(|r| r * self.vcpus as f64),
            throttle: f64::from_bits(sh.throttle.load(Ordering::Relaxed)),
            dirty_limit: sh.dirty_limit.load(Ordering::Relaxed),
            running: self.is_running(),
            stop_latency: g.stop_latency.as_secs_f64(),
            elapsed: (now - sh.created).as_secs_f64(),
        }
    }

    /// Stops and joins every vCPU thread. Idempotent.
    pub fn close(&self) {
        {
            let _g = self.shared.lock();
            self.shared.stop.store(true, Ordering::Release);
            self.shared.cv.notify_all();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for h in threads {
            let _ = h.join();
        }
    }
}

impl Drop for WorkloadGuest {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_pattern() {
        let s = WorkloadSpec::parse("sequential:wss=256MiB,rate=26000").unwrap();
        assert_eq!(s.pattern, Pattern::Sequential);
        assert_eq!(s.wss, Some(256 << 20));
        assert_eq!(s.rate, Some(26000.0));
        assert_eq!(WorkloadSpec::parse("idle").unwrap().pattern, Pattern::Idle);
        let u = WorkloadSpec::parse("uniform:rate=max").unwrap();
        assert_eq!((u.pattern, u.wss, u.rate), (Pattern::Uniform, None, None));
        let h = WorkloadSpec::parse("hotset:wss=1GiB,hot=0.2,hotprob=0.95,rate=1e5").unwrap();
        assert_eq!(
            h.pattern,
            Pattern::Hotset {
                hot: 0.2,
                hotprob: 0.95
            }
        );
        assert_eq!(h.rate, Some(100000.0));
        let z = WorkloadSpec::parse("zipf:wss=64KiB,s=1.3").unwrap();
        assert_eq!(z.pattern, Pattern::Zipf { s: 1.3 });
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
    }

    #[test]
    fn errors_name_the_bad_field() {
        let cases = [
            ("sequental:rate=5", "unknown workload"),
            ("uniform:wss=12XB", "wss"),
            ("uniform:wss=", "wss"),
            ("uniform:rate=fast", "rate=fast"),
            ("uniform:rate=0", "rate=0"),
            ("uniform:rate=-5", "rate=-5"),
            ("hotset:hot=1.5", "hot=1.5"),
            ("hotset:hotprob=2", "hotprob=2"),
            ("zipf:s=0", "s=0"),
            ("uniform:hot=0.1", "no field \"hot\""),
            ("idle:rate=5", "no field \"rate\""),
            ("uniform:rate", "key=value"),
            ("uniform:wss=99999999999999999999GiB", "wss"),
        ];
        for (spec, needle) in cases {
            let e = WorkloadSpec::parse(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
        let s = WorkloadSpec::parse("uniform:wss=8KiB").unwrap();
        assert!(s
            .wss_pages(4096, 4096)
            .unwrap_err()
            .to_string()
            .contains("wss"));
        let s = WorkloadSpec::parse("uniform:wss=5000").unwrap();
        assert!(s
            .wss_pages(1 << 20, 4096)
            .unwrap_err()
            .to_string()
            .contains("multiple"));
    }

    #[test]
    fn samplers_stay_in_the_working_set() {
        let mut rng = SmallRng::seed_from_u64(1);
        let pats = [
            Pattern::Sequential,
            Pattern::Uniform,
            Pattern::Hotset {
                hot: 0.1,
                hotprob: 0.9,
            },
            Pattern::Zipf { s: 1.1 },
        ];
        for p in pats {
            for vcpus in [1, 3, 20] {
                let mut smp = Sampler::new(&p, 10, vcpus - 1, vcpus).unwrap();
                for _ in 0..1000 {
                    assert!(smp.next(&mut rng) < 10, "{p:?}");
                }
            }
        }
        // Sequential vCPUs together cover each page exactly once per sweep.
        let mut seen = vec![0; 10];
        for id in 0..3 {
            let mut smp = Sampler::new(&Pattern::Sequential, 10, id, 3).unwrap();
            let Sampler::Sequential { len, .. } = smp else {
                unreachable!()
            };
            for _ in 0..len {
                seen[smp.next(&mut rng)] += 1;
            }
        }
        assert_eq!(seen, vec![1; 10]);
    }

    #[test]
    fn pause_parks_and_counts_writes() {
        let mem = Arc::new(GuestMemory::new(4096 * 64).unwrap());
        let g = WorkloadGuest::new(mem.clone(), 2, "uniform:rate=max").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        g.pause().unwrap();
        assert!(!g.is_running());
        let a = g.stats().writes;
        let d = mem.digest();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.stats().writes, a, "no writes while paused");
        assert_eq!(mem.digest(), d);
        assert!(a > 0);
        g.resume().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(g.stats().writes > a);
        g.close();
        assert!(g.pause().is_err());
        assert!(WorkloadGuest::new(mem, 0, "idle").is_err());
    }
}
