//! The fault thread: reads userfaultfd messages, records who waits for which
//! page, and asks for each missing page once.
//!
//! It polls with a timeout so that `stop()` ends it within one interval.
//! A fault on a page already requested is recorded (its thread is blocked
//! too) but not requested again; a fault on a page placed meanwhile is
//! resolved at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use super::blocktime::Blocktime;
use super::fault_region::FaultRegion;
use super::page_set::PageSet;
use super::uapi::{decode_msg, UFFD_MSG_SIZE};
use crate::error::{CoreError, CoreResult};

/// One page the destination needs from the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    pub page: u64,
    /// The first thread that faulted on it (0 without thread ids).
    pub tid: u32,
    pub at: Instant,
}

#[derive(Default)]
pub struct FaultCounters {
    /// Page requests handed on (one per page).
    pub requests: AtomicU64,
}

pub struct FaultThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<CoreResult<()>>>,
    counters: Arc<FaultCounters>,
}

const BATCH: usize = 64;

struct Loop<F> {
    region: Arc<FaultRegion>,
    present: Arc<PageSet>,
    requested: PageSet,
    blocktime: Arc<Blocktime>,
    counters: Arc<FaultCounters>,
    stop: Arc<AtomicBool>,
    on_request: F,
    poll_interval: Duration,
}

impl<F: FnMut(PageRequest)> Loop<F> {
    fn run(mut self) -> CoreResult<()> {
        let mut buf = [0u8; UFFD_MSG_SIZE * BATCH];
        let ts = Timespec {
            tv_sec: self.poll_interval.as_secs() as _,
            tv_nsec: self.poll_interval.subsec_nanos() as _,
        };
        while !self.stop.load(Ordering::Acquire) {
            let mut fds = [PollFd::new(self.region.uffd(), PollFlags::IN)];
            match poll(&mut fds, Some(&ts)) {
                Ok(0) | Err(Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(CoreError::io("poll userfaultfd", e.into())),
            }
            let n = match rustix::io::read(self.region.uffd(), &mut buf) {
                Ok(n) => n,
                Err(Errno::AGAIN) | Err(Errno::INTR) => continue,
                Err(e) => return Err(CoreError::io("read userfaultfd", e.into())),
            };
            let now = Instant::now();
            for raw in buf[..n].chunks_exact(UFFD_MSG_SIZE) {
                let raw: &[u8; UFFD_MSG_SIZE] = raw.try_into().expect("exact chunk");
                if let Some(msg) = decode_msg(raw) {
                    self.fault(msg.address, msg.tid, now);
                }
            }
        }
        Ok(())
    }

    fn fault(&mut self, addr: u64, tid: u32, now: Instant) {
        let Some(page) = self.region.page_of(addr) else {
            return;
        };
        self.blocktime.fault(page, tid, now);
        if self.present.contains(page as usize) {
            // Placed after the fault was raised: the copy woke the thread.
            self.blocktime.placed(page, now);
        } else if self.requested.insert(page as usize) {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            (self.on_request)(PageRequest { page, tid, at: now });
        }
    }
}

impl FaultThread {
    /// Starts reading faults of `region`; `on_request` gets each missing
    /// page once, on the fault thread (keep it short: hand it on).
    pub fn spawn(
        region: Arc<FaultRegion>,
        present: Arc<PageSet>,
        blocktime: Arc<Blocktime>,
        poll_interval: Duration,
        on_request: impl FnMut(PageRequest) + Send + 'static,
    ) -> CoreResult<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(FaultCounters::default());
        let lp = Loop {
            requested: PageSet::new(region.num_pages()),
            region,
            present,
            blocktime,
            counters: counters.clone(),
            stop: stop.clone(),
            on_request,
            poll_interval,
        };
        let handle = std::thread::Builder::new()
            .name("mig-postcopy-fault".into())
            .spawn(move || lp.run())
            .map_err(|e| CoreError::io("spawning the fault thread", e))?;
        Ok(FaultThread {
            stop,
            handle: Some(handle),
            counters,
        })
    }

    pub fn counters(&self) -> &FaultCounters {
        &self.counters
    }

    /// Stops the thread (within one poll interval) and returns its outcome.
    pub fn stop(&mut self) -> CoreResult<()> {
        self.stop.store(true, Ordering::Release);
        match self.handle.take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(CoreError::invalid("the fault thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
