//! Dirty trackers: which guest pages were written since the last `sync()`.
//!
//! Two backends:
//!
//! * **uffd**: the kernel tracks writes. A userfaultfd is opened with
//!   `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED |
//!   UFFD_FEATURE_WP_HUGETLBFS_SHMEM` and the guest mapping is registered in
//!   write-protect mode. With `WP_ASYNC` the kernel resolves each first write
//!   to a protected page itself (no fault-handler thread) and marks the PTE
//!   written. `sync()` harvests with the `PAGEMAP_SCAN` ioctl on
//!   `/proc/self/pagemap` using `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`
//!   and `PAGE_IS_WRITTEN` in both `category_mask` and `return_mask` (the only
//!   mask combination that is correct on every kernel since 6.7): the written
//!   pages are reported and write-protected again in one atomic page walk
//!   (split over threads on disjoint ranges, [`crate::written_scan`]).
//!   `sync_final()`, the switchover's last harvest with the guest stopped,
//!   reports without write-protecting again: those pages are reported once
//!   more by a later `sync()`, so a rolled-back switchover misses nothing.
//!   Every write through the mapping is seen, whichever thread makes it
//!   (Python, vCPU threads, device threads, or the kernel on behalf of a
//!   syscall that copies into the mapping). Writes made with `write()` /
//!   `pwrite()` on the memfd itself go through the page cache, not this
//!   mapping, and are **not** seen; report them with `mark()`.
//!   Creating the tracker write-protects the whole range, so the first
//!   `sync()` reports the pages written since the tracker was created.
//!   False positives: if the kernel maps a transparent huge page (shmem THP,
//!   controlled by `/sys/kernel/mm/transparent_hugepage/shmem_enabled`), the
//!   write-protect bit lives in the PMD and one write reports every page of
//!   the huge page. No page is ever missed.
//! * **soft**: writers that go through the library call `mark(pages)`. Portable,
//!   lock-free (atomic words), and exact for what is marked; nothing else.
//!
//! The system headers are older than the kernel this runs on, so the uAPI
//! constants and structs are defined here (from `linux/userfaultfd.h`; the
//! `PAGEMAP_SCAN` ones are in [`crate::pagemap`]).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Opcode, Updater};

use crate::bitmap::DirtyBitmap;
use crate::error::{CoreError, CoreResult};
use crate::hole_filler::HoleFiller;
use crate::memory::GuestMemory;
use crate::pagemap::{self, open_pagemap};
use crate::written_scan::{parts_for, written_regions, Protect, ScanBuffers};

// ---- uAPI: linux/userfaultfd.h -------------------------------------------

pub(crate) const UFFD_API: u64 = 0xAA;
/// `userfaultfd()` flag: only user-mode faults are delivered; lets an
/// unprivileged process open a userfaultfd even with
/// `vm.unprivileged_userfaultfd = 0` (Linux ≥ 5.11). WP-async faults are
/// resolved by the kernel before that distinction matters.
pub(crate) const UFFD_USER_MODE_ONLY: u32 = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// The feature bits the uffd backend needs, with their uAPI names.
pub const REQUIRED_FEATURES: [(u64, &str); 3] = [
    (UFFD_FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_ASYNC"),
    (UFFD_FEATURE_WP_UNPOPULATED, "UFFD_FEATURE_WP_UNPOPULATED"),
    (
        UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
    ),
];

fn required_mask() -> u64 {
    REQUIRED_FEATURES
        .iter()
        .map(|(b, _)| b)
        .fold(0, |a, b| a | b)
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioApi {
    pub(crate) api: u64,
    pub(crate) features: u64,
    pub(crate) ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

#[repr(C)]
#[derive(Default)]
pub(crate) struct UffdioRegister {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) ioctls: u64,
}

pub(crate) const UFFDIO_API: Opcode = opcode::read_write::<UffdioApi>(0xAA, 0x3F);
pub(crate) const UFFDIO_REGISTER: Opcode = opcode::read_write::<UffdioRegister>(0xAA, 0x00);

// ---- capability probing ----------------------------------------------------

/// What the host offers, as observed (or as faked through `MIG_FAKE_PROBE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeFacts {
    /// `uname -r`.
    pub kernel: String,
    /// Result of opening a userfaultfd.
    pub open: Result<(), Errno>,
    /// Features `UFFDIO_API` reports as supported, when the open worked.
    pub features: Option<u64>,
    /// Result of a zero-length `PAGEMAP_SCAN` on `/proc/self/pagemap`.
    pub pagemap_scan: Result<(), Errno>,
}

/// The environment variable that replaces probed facts, for testing how the
/// library behaves on a host without the feature. Comma-separated
/// `key=value`: `kernel=6.6.0`, `open=EPERM|ENOSYS|<errno number>`,
/// `features=<int, 0x.. allowed>`, `pagemap_scan=ENOTTY|EINVAL|ok|<errno>`.
pub const FAKE_PROBE_ENV: &str = "MIG_FAKE_PROBE";

/// Whether a backend works here, and why (or why not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    pub available: bool,
    pub reason: String,
    /// Names of required uffd feature bits the kernel lacks.
    pub missing: Vec<&'static str>,
}

#[derive(Clone, Debug)]
pub struct Capabilities {
    pub kernel: String,
    pub uffd: Capability,
    pub soft: Capability,
    /// `/sys/kernel/mm/transparent_hugepage/shmem_enabled` (selected value),
    /// which decides whether huge-page false positives can occur.
    pub shmem_thp: String,
    pub faked: bool,
}

fn open_uffd() -> Result<OwnedFd, Errno> {
    use rustix::mm::{userfaultfd, UserfaultfdFlags};
    let base = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
    // SAFETY: opening a userfaultfd has no effect until ranges are registered.
    match unsafe { userfaultfd(base | UserfaultfdFlags::from_bits_retain(UFFD_USER_MODE_ONLY)) } {
        // Kernels before 5.11 reject the flag: retry without it.
        Err(Errno::INVAL) => {
            // SAFETY: as above.
            unsafe { userfaultfd(base) }
        }
        r => r,
    }
}

/// `UFFDIO_API` handshake; returns the features the kernel grants.
pub(crate) fn uffd_api(fd: &OwnedFd, features: u64) -> Result<u64, Errno> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `UFFDIO_API` takes a `struct uffdio_api`, mirrored by `UffdioApi`.
    unsafe { ioctl(fd, Updater::<UFFDIO_API, UffdioApi>::new(&mut api))? };
    Ok(api.features)
}

pub(crate) fn real_facts() -> ProbeFacts {
    static FACTS: OnceLock<ProbeFacts> = OnceLock::new();
    FACTS
        .get_or_init(|| {
            let kernel = rustix::system::uname()
                .release()
                .to_string_lossy()
                .into_owned();
            let (open, features) = match open_uffd() {
                Ok(fd) => (Ok(()), uffd_api(&fd, 0).ok()),
                Err(e) => (Err(e), None),
            };
            ProbeFacts {
                kernel,
                open,
                features,
                pagemap_scan: pagemap::probe(),
            }
        })
        .clone()
}

pub(crate) fn parse_errno(key: &str, v: &str) -> CoreResult<Result<(), Errno>> {
    let e = match v.to_ascii_uppercase().as_str() {
        "OK" | "0" => return Ok(Ok(())),
        "EPERM" => Errno::PERM,
        "ENOSYS" => Errno::NOSYS,
        "ENOTTY" => Errno::NOTTY,
        "EINVAL" => Errno::INVAL,
        "EACCES" => Errno::ACCESS,
        other => match other.parse::<i32>() {
            Ok(n) if n > 0 => Errno::from_raw_os_error(n),
            _ => {
                return Err(CoreError::invalid(format!(
                    "{FAKE_PROBE_ENV}: {key}={v} is not an errno name or number"
                )))
            }
        },
    };
    Ok(Err(e))
}

/// A fake-probe integer, decimal or `0x` hexadecimal.
pub(crate) fn parse_int(key: &str, v: &str) -> CoreResult<u64> {
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    }
    .map_err(|_| CoreError::invalid(format!("{FAKE_PROBE_ENV}: {key}={v} is not an integer")))
}

/// Applies a `MIG_FAKE_PROBE` specification on top of `facts`.
pub fn apply_fake(mut facts: ProbeFacts, spec: &str) -> CoreResult<ProbeFacts> {
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| {
            CoreError::invalid(format!("{FAKE_PROBE_ENV}: {item:?} is not key=value"))
        })?;
        match k.trim() {
            "kernel" => facts.kernel = v.to_string(),
            "open" => {
                facts.open = parse_errno(k, v)?;
                if facts.open.is_err() {
                    facts.features = None;
                }
            }
            "features" => facts.features = Some(parse_int(k, v)?),
            "pagemap_scan" => facts.pagemap_scan = parse_errno(k, v)?,
            // Facts of the post-copy probe, applied by `postcopy::capability`.
            other if crate::postcopy::capability::FAKE_KEYS.contains(&other) => {}
            other => {
                return Err(CoreError::invalid(format!(
                    "{FAKE_PROBE_ENV}: unknown key {other:?} \
                     (expected kernel, open, features, pagemap_scan, \
                     or a post-copy key: kernel_faults, missing_anon, missing_shmem, missing_ioctls)"
                )))
            }
        }
    }
    Ok(facts)
}

/// The facts this process sees: probed once, then overridden by
/// `MIG_FAKE_PROBE` if set (read on every call, so tests may change it).
pub fn facts() -> CoreResult<(ProbeFacts, bool)> {
    let real = real_facts();
    match std::env::var(FAKE_PROBE_ENV) {
        Ok(spec) if !spec.trim().is_empty() => Ok((apply_fake(real, &spec)?, true)),
        _ => Ok((real, false)),
    }
}

fn kernel_at_least(release: &str, major: u32, minor: u32) -> Option<bool> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let ma: u32 = parts.next()?.parse().ok()?;
    let mi: u32 = parts.next()?.parse().ok()?;
    Some((ma, mi) >= (major, minor))
}

/// Why opening a userfaultfd failed, in terms a user can act on.
pub(crate) fn open_error_text(e: Errno) -> String {
    match e {
        Errno::PERM => "permission denied: vm.unprivileged_userfaultfd is 0 and the process \
                        lacks CAP_SYS_PTRACE, or a seccomp/LSM policy forbids userfaultfd"
            .to_string(),
        Errno::NOSYS => "the kernel has no userfaultfd syscall (CONFIG_USERFAULTFD off) \
                         or seccomp blocks it"
            .to_string(),
        e => format!("opening a userfaultfd failed: {}", std::io::Error::from(e)),
    }
}

/// Decides whether the uffd backend works, with a reason a user can act on.
pub fn uffd_verdict(f: &ProbeFacts) -> Capability {
    let old = match kernel_at_least(&f.kernel, 6, 7) {
        Some(false) => format!(
            "; kernel {} is older than 6.7, which added UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN",
            f.kernel
        ),
        _ => String::new(),
    };
    let no = |reason: String, missing: Vec<&'static str>| Capability {
        available: false,
        reason,
        missing,
    };
    if let Err(e) = f.open {
        return no(format!("userfaultfd: {}{old}", open_error_text(e)), vec![]);
    }
    let have = f.features.unwrap_or(0);
    let missing: Vec<&'static str> = REQUIRED_FEATURES
        .iter()
        .filter(|(bit, _)| have & bit == 0)
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return no(
            format!(
                "UFFDIO_API does not offer {} (kernel {}){old}",
                missing.join(", "),
                f.kernel
            ),
            missing,
        );
    }
    if let Err(e) = f.pagemap_scan {
        let why = match e {
            Errno::NOTTY | Errno::INVAL => "no PAGEMAP_SCAN ioctl on /proc/self/pagemap".into(),
            Errno::ACCESS | Errno::PERM | Errno::NOENT => {
                format!(
                    "cannot open /proc/self/pagemap: {}",
                    std::io::Error::from(e)
                )
            }
            e => format!("PAGEMAP_SCAN failed: {}", std::io::Error::from(e)),
        };
        return no(format!("{why} (kernel {}){old}", f.kernel), vec![]);
    }
    Capability {
        available: true,
        reason: format!(
            "userfaultfd WP_ASYNC + PAGEMAP_SCAN (kernel {}, all required features present)",
            f.kernel
        ),
        missing: vec![],
    }
}

fn shmem_thp() -> String {
    let raw = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    raw.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or("unknown")
        .to_string()
}

/// What this host supports, per backend.
pub fn capabilities() -> CoreResult<Capabilities> {
    let (f, faked) = facts()?;
    Ok(Capabilities {
        uffd: uffd_verdict(&f),
        soft: Capability {
            available: true,
            reason: "portable: pages reported through mark()".into(),
            missing: vec![],
        },
        kernel: f.kernel,
        shmem_thp: shmem_thp(),
        faked,
    })
}

// ---- the trackers ------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Uffd,
    Soft,
}

impl Backend {
    pub fn parse(s: &str) -> CoreResult<Self> {
        match s {
            "uffd" => Ok(Backend::Uffd),
            "soft" => Ok(Backend::Soft),
            other => Err(CoreError::invalid(format!(
                "unknown tracker backend {other:?} (expected \"uffd\" or \"soft\")"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Uffd => "uffd",
            Backend::Soft => "soft",
        }
    }
}

/// The `sync()` that starts the hole filler: a migration's first syncs
/// it at setup, its second at the end of the first pass. That pass reads
/// every page, so the filler's page faults and `mmap_lock` would only
/// compete with it; after it the channels idle between short passes.
const FILL_AT_SYNC: u32 = 2;

/// The kernel side of the uffd backend.
struct Uffd {
    /// Keeps the registration alive; closing it unregisters the range.
    _fd: OwnedFd,
    pagemap: File,
    bufs: ScanBuffers,
    /// Makes the walk cheaper in the background: started by the sync that
    /// ends the first pass (`FILL_AT_SYNC`), stopped by the final sync or
    /// with the tracker.
    holes: Option<HoleFiller>,
    /// `sync()` calls so far.
    syncs: u32,
}

/// Page-granular set of explicit marks, safe to update from many threads.
struct Marks {
    words: Vec<AtomicU64>,
    any: AtomicBool,
}

impl Marks {
    fn new(num_pages: usize) -> Self {
        Marks {
            words: (0..num_pages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            any: AtomicBool::new(false),
        }
    }

    /// Moves the marks into `bm` (OR) and clears them.
    fn drain_into(&self, bm: &mut DirtyBitmap) {
        if !self.any.swap(false, Ordering::AcqRel) {
            return;
        }
        for (dst, src) in bm.words_mut().iter_mut().zip(&self.words) {
            if src.load(Ordering::Relaxed) != 0 {
                *dst |= src.swap(0, Ordering::AcqRel);
            }
        }
    }
}

pub struct DirtyTracker {
    mem: Arc<GuestMemory>,
    backend: Backend,
    uffd: Mutex<Option<Uffd>>,
    marks: Marks,
    closed: AtomicBool,
    last_sync_ns: AtomicU64,
}

impl DirtyTracker {
    pub fn new(mem: Arc<GuestMemory>, backend: Backend) -> CoreResult<Self> {
        let uffd = match backend {
            Backend::Uffd => Some(Self::open_uffd_backend(&mem)?),
            Backend::Soft => None,
        };
        Ok(DirtyTracker {
            marks: Marks::new(mem.num_pages()),
            mem,
            backend,
            uffd: Mutex::new(uffd),
            closed: AtomicBool::new(false),
            last_sync_ns: AtomicU64::new(0),
        })
    }

    fn open_uffd_backend(mem: &Arc<GuestMemory>) -> CoreResult<Uffd> {
        let (f, _) = facts()?;
        let cap = uffd_verdict(&f);
        if !cap.available {
            return Err(CoreError::Unsupported(format!(
                "uffd dirty tracking unavailable: {}",
                cap.reason
            )));
        }
        let unsupported = |what: &str, e: Errno| {
            CoreError::Unsupported(format!("{what}: {}", std::io::Error::from(e)))
        };
        let fd = open_uffd().map_err(|e| unsupported("userfaultfd", e))?;
        uffd_api(&fd, required_mask()).map_err(|e| unsupported("UFFDIO_API", e))?;
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: mem.as_ptr() as u64,
                len: mem.len() as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `UFFDIO_REGISTER` takes a `struct uffdio_register`; the range
        // is the guest mapping, which `mem` keeps alive as long as the tracker.
        unsafe {
            ioctl(
                &fd,
                Updater::<UFFDIO_REGISTER, UffdioRegister>::new(&mut reg),
            )
        }
        .map_err(|e| match e {
            Errno::BUSY => CoreError::invalid(
                "guest memory is already tracked by another uffd tracker; close it first",
            ),
            e => unsupported("UFFDIO_REGISTER (write-protect mode)", e),
        })?;
        let pagemap = open_pagemap().map_err(|e| unsupported("open /proc/self/pagemap", e))?;
        let mut uffd = Uffd {
            _fd: fd,
            pagemap,
            bufs: ScanBuffers::new(),
            holes: None,
            syncs: 0,
        };
        // Write-protect everything now: the first sync() then reports exactly
        // the pages written since creation, not the history before it.
        let (start, end) = Self::range(mem);
        let parts = parts_for(end - start);
        written_regions(
            &uffd.pagemap,
            &mut uffd.bufs,
            start,
            end,
            parts,
            Protect::Again,
        )?;
        Ok(uffd)
    }

    fn range(mem: &GuestMemory) -> (u64, u64) {
        let start = mem.as_ptr() as u64;
        (start, start + mem.len() as u64)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    pub fn num_pages(&self) -> usize {
        self.mem.num_pages()
    }

    fn check_open(&self) -> CoreResult<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(CoreError::invalid("the dirty tracker is closed"));
        }
        Ok(())
    }

    fn lock_uffd(&self) -> MutexGuard<'_, Option<Uffd>> {
        self.uffd.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports pages as written (both backends; on uffd it adds writes the
    /// kernel cannot see, such as `write()` on the memfd).
    pub fn mark(&self, pages: &[u64]) -> CoreResult<()> {
        self.check_open()?;
        let n = self.num_pages() as u64;
        if let Some(&bad) = pages.iter().find(|&&p| p >= n) {
            return Err(CoreError::invalid(format!(
                "page {bad} is outside guest memory of {n} pages"
            )));
        }
        for &p in pages {
            self.marks.words[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
        self.marks.any.store(true, Ordering::Release);
        Ok(())
    }

    /// Reports every page set in `bm` as written.
    pub fn mark_bitmap(&self, bm: &DirtyBitmap) -> CoreResult<()> {
        self.check_open()?;
        if bm.len() != self.num_pages() {
            return Err(CoreError::invalid(format!(
                "bitmap of {} pages does not match guest memory of {} pages",
                bm.len(),
                self.num_pages()
            )));
        }
        for (dst, &w) in self.marks.words.iter().zip(bm.words()) {
            if w != 0 {
                dst.fetch_or(w, Ordering::Relaxed);
            }
        }
        self.marks.any.store(true, Ordering::Release);
        Ok(())
    }

    /// The pages written since the previous sync (or since creation), which
    /// are write-protected again in the same kernel walk.
    pub fn sync(&self) -> CoreResult<DirtyBitmap> {
        self.collect(Protect::Again)
    }

    /// The final sync of a switchover, the guest stopped: the pages written
    /// since the previous sync, left writable (uffd). Tracking normally ends
    /// here; if the guest runs on instead (a switchover rolled back), the
    /// next `sync()` reports these pages again with the new writes, so no
    /// write is missed. Marks are drained as by `sync()`.
    pub fn sync_final(&self) -> CoreResult<DirtyBitmap> {
        // The guest is stopped: nothing may share the cores or the mmap
        // lock with the switchover from here on. A switchover that rolls
        // back only walks slower after it.
        if let Some(h) = self.lock_uffd().as_ref().and_then(|u| u.holes.as_ref()) {
            h.stop();
        }
        self.collect(Protect::Keep)
    }

    fn collect(&self, protect: Protect) -> CoreResult<DirtyBitmap> {
        self.collect_in(protect, parts_for(self.mem.len() as u64))
    }

    /// `collect` with the walk in `parts` threads.
    fn collect_in(&self, protect: Protect, parts: usize) -> CoreResult<DirtyBitmap> {
        self.check_open()?;
        let t0 = Instant::now();
        let mut bm = DirtyBitmap::new(self.num_pages());
        {
            let mut guard = self.lock_uffd();
            if let Some(u) = guard.as_mut() {
                let (base, end) = Self::range(&self.mem);
                let ps = self.mem.page_size() as u64;
                let found = written_regions(&u.pagemap, &mut u.bufs, base, end, parts, protect)?;
                if protect == Protect::Again {
                    u.syncs += 1;
                    if u.syncs == FILL_AT_SYNC {
                        u.holes = HoleFiller::start(self.mem.clone());
                    }
                }
                for (s, e) in found {
                    if s < base || e > end || s >= e {
                        return Err(CoreError::invalid(format!(
                            "PAGEMAP_SCAN reported {s:#x}..{e:#x} outside {base:#x}..{end:#x}"
                        )));
                    }
                    let first = (s - base) / ps;
                    let count = (e - s).div_ceil(ps);
                    bm.set_range(first as usize, count as usize)?;
                }
            }
        }
        self.marks.drain_into(&mut bm);
        self.last_sync_ns
            .store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(bm)
    }

    /// Benchmark baseline: the bare `PAGEMAP_SCAN` harvest `sync()` uses
    /// (same flags, masks and buffers), without building a bitmap, in
    /// `parts` threads (`None`: as many as `sync()` uses). Returns the number
    /// of written pages. It re-protects what it finds, so the pages it
    /// reports are lost to the next `sync()`.
    pub fn scan_bare(&self, parts: Option<usize>) -> CoreResult<u64> {
        self.check_open()?;
        let mut guard = self.lock_uffd();
        let u = guard
            .as_mut()
            .ok_or_else(|| CoreError::invalid("scan_bare needs the uffd backend"))?;
        let (base, end) = Self::range(&self.mem);
        let parts = parts.unwrap_or_else(|| parts_for(end - base)).max(1);
        let found = written_regions(&u.pagemap, &mut u.bufs, base, end, parts, Protect::Again)?;
        let bytes: u64 = found.iter().map(|(s, e)| e.saturating_sub(*s)).sum();
        Ok(bytes / self.mem.page_size() as u64)
    }

    pub fn last_sync(&self) -> Duration {
        Duration::from_nanos(self.last_sync_ns.load(Ordering::Relaxed))
    }

    /// Stops tracking; the userfaultfd is closed, which unregisters the range.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.lock_uffd().take();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64 as A;

    fn uffd_ok() -> bool {
        let c = capabilities().unwrap();
        if !c.uffd.available {
            eprintln!("skipping: uffd backend unavailable: {}", c.uffd.reason);
        }
        c.uffd.available
    }

    fn touch(mem: &GuestMemory, page: usize) {
        let ps = mem.page_size();
        // SAFETY: page < num_pages (callers), 8-byte aligned within the mapping.
        let a = unsafe { A::from_ptr(mem.as_ptr().add(page * ps).cast()) };
        a.fetch_add(1, Ordering::Relaxed);
    }

    #[test]
    fn soft_reports_exactly_marks() {
        let mem = Arc::new(GuestMemory::new(4096 * 200).unwrap());
        let n = mem.num_pages();
        let t = DirtyTracker::new(mem, Backend::Soft).unwrap();
        assert_eq!(t.sync().unwrap().count(), 0);
        t.mark(&[0, 5, 63, 64, (n - 1) as u64]).unwrap();
        t.mark_bitmap(&DirtyBitmap::from_indices(&[7, 5], n).unwrap())
            .unwrap();
        assert_eq!(
            t.sync().unwrap().indices(),
            vec![0, 5, 7, 63, 64, (n - 1) as u64]
        );
        assert_eq!(t.sync().unwrap().count(), 0);
        let err = t.mark(&[n as u64]).unwrap_err().to_string();
        assert!(err.contains(&n.to_string()), "{err}");
        t.close();
        assert!(t.sync().is_err());
    }

    #[test]
    fn uffd_reports_exactly_written_pages() {
        if !uffd_ok() {
            return;
        }
        let mem = Arc::new(GuestMemory::new(4096 * 1000).unwrap());
        // Written before creation: must not be reported.
        touch(&mem, 3);
        let t = DirtyTracker::new(mem.clone(), Backend::Uffd).unwrap();
        assert_eq!(t.sync().unwrap().count(), 0);
        let pages = [0usize, 1, 2, 500, 511, 512, 999];
        for &p in &pages {
            touch(&mem, p);
        }
        let got = t.sync().unwrap();
        assert_eq!(
            got.indices(),
            pages.iter().map(|&p| p as u64).collect::<Vec<_>>()
        );
        assert_eq!(t.sync().unwrap().count(), 0, "sync re-protects");
        touch(&mem, 500);
        assert_eq!(t.sync().unwrap().indices(), vec![500]);
        // A second tracker on the same mapping is refused, not silently empty.
        assert!(DirtyTracker::new(mem.clone(), Backend::Uffd).is_err());
        t.close();
        // After close, the range can be tracked again.
        let t2 = DirtyTracker::new(mem.clone(), Backend::Uffd).unwrap();
        touch(&mem, 7);
        assert_eq!(t2.sync().unwrap().indices(), vec![7]);
    }

    /// Memory mapped in transparent huge pages is still tracked page by
    /// page: the first write to a write-protected huge page splits it
    /// (async write-protect resolves a fault per base page), so one written
    /// base page reads as one, not as its 2 MiB block. Image-backed demo
    /// guests rely on it.
    #[test]
    fn uffd_on_huge_pages_reports_base_pages() {
        if !uffd_ok() {
            return;
        }
        let offer = crate::backing::offers()
            .into_iter()
            .find(|o| o.backing == crate::backing::Backing::AnonThp);
        if !offer.is_some_and(|o| o.available) {
            eprintln!("skipping: the host offers no transparent huge pages for anonymous memory");
            return;
        }
        let mem =
            Arc::new(GuestMemory::with_backing(4 << 21, crate::backing::Backing::AnonThp).unwrap());
        mem.populate(0, mem.len()).unwrap();
        if mem.huge_bytes() == 0 {
            eprintln!("skipping: the kernel served no transparent huge page (none free)");
            return;
        }
        let t = DirtyTracker::new(mem.clone(), Backend::Uffd).unwrap();
        assert_eq!(t.sync().unwrap().count(), 0);
        let pages = [0usize, 511, 512, 1500, 2047];
        for &p in &pages {
            touch(&mem, p);
        }
        let want: Vec<u64> = pages.iter().map(|&p| p as u64).collect();
        assert_eq!(t.sync().unwrap().indices(), want);
        touch(&mem, 1500);
        touch(&mem, 1501);
        assert_eq!(t.sync_final().unwrap().indices(), vec![1500, 1501]);
    }

    /// The final sync reports every written page and leaves it writable: a
    /// guest that runs on (a rolled-back switchover) writes it again
    /// without a fault, and the next sync still reports it, then protects.
    #[test]
    fn uffd_final_sync_reports_without_losing_a_later_write() {
        if !uffd_ok() {
            return;
        }
        let mem = Arc::new(GuestMemory::new(4096 * 1000).unwrap());
        let t = DirtyTracker::new(mem.clone(), Backend::Uffd).unwrap();
        let pages = [0usize, 63, 64, 511, 512, 999];
        for &p in &pages {
            touch(&mem, p);
        }
        t.mark(&[700]).unwrap();
        let mut want: Vec<u64> = pages.iter().map(|&p| p as u64).collect();
        let with_mark = {
            let mut v = want.clone();
            v.push(700);
            v.sort();
            v
        };
        assert_eq!(t.sync_final().unwrap().indices(), with_mark);
        // Not protected again: reported again, marks (drained) aside.
        assert_eq!(t.sync_final().unwrap().indices(), want);
        // The guest runs on: rewrites of reported pages, and a new page.
        touch(&mem, 64);
        touch(&mem, 300);
        want.push(300);
        want.sort();
        assert_eq!(t.sync().unwrap().indices(), want);
        assert_eq!(t.sync().unwrap().count(), 0, "sync protects again");
        touch(&mem, 999);
        assert_eq!(t.sync_final().unwrap().indices(), vec![999]);
    }

    /// A walk shared by threads claiming pieces reports what one walk does,
    /// across the piece boundaries, for both kinds of walk.
    #[test]
    fn the_hole_filler_starts_at_the_sync_that_ends_the_first_pass() {
        if !uffd_ok() {
            eprintln!("skipping: userfaultfd write-protect tracking is unavailable");
            return;
        }
        let ps = crate::memory::host_page_size();
        let mem =
            Arc::new(GuestMemory::with_backing(1024 * ps, crate::backing::Backing::Anon).unwrap());
        mem.write_bytes(ps, &[1]).unwrap();
        let t = DirtyTracker::new(mem.clone(), Backend::Uffd).unwrap();
        t.sync().unwrap(); // a migration's setup: the first pass is to come
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(mem.anon_holes(2, 1).unwrap(), vec![true]);
        t.sync().unwrap(); // the first pass is over
        let t0 = Instant::now();
        while mem.anon_holes(2, 1).unwrap() == vec![true] && t0.elapsed().as_secs() < 20 {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(mem.anon_holes(2, 1).unwrap(), vec![false]);
        // A zero-page entry is not a write: the next sync reports nothing.
        assert_eq!(t.sync().unwrap().count(), 0);
        t.close();
    }

    #[test]
    fn uffd_walk_in_parts_matches_one_walk() {
        if !uffd_ok() {
            return;
        }
        let pages_per_part = (crate::written_scan::PIECE_BYTES / 4096) as usize;
        let n = pages_per_part * 3 + 17;
        let mem = Arc::new(GuestMemory::new(4096 * n).unwrap());
        let t = DirtyTracker::new(mem.clone(), Backend::Uffd).unwrap();
        let pages = [
            0,
            pages_per_part - 1,
            pages_per_part,
            2 * pages_per_part - 1,
            2 * pages_per_part,
            3 * pages_per_part,
            n - 1,
        ];
        let want: Vec<u64> = pages.iter().map(|&p| p as u64).collect();
        for parts in [1, 2, 3, 4] {
            for &p in &pages {
                touch(&mem, p);
            }
            let kept = t.collect_in(Protect::Keep, parts).unwrap();
            assert_eq!(kept.indices(), want, "keep, {parts} parts");
            let got = t.collect_in(Protect::Again, parts).unwrap();
            assert_eq!(got.indices(), want, "again, {parts} parts");
            assert_eq!(t.collect_in(Protect::Again, parts).unwrap().count(), 0);
        }
    }

    #[test]
    fn uffd_scan_bare_counts_pages() {
        if !uffd_ok() {
            return;
        }
        let mem = Arc::new(GuestMemory::new(4096 * 256).unwrap());
        let t = DirtyTracker::new(mem.clone(), Backend::Uffd).unwrap();
        for p in (0..256).step_by(3) {
            touch(&mem, p);
        }
        assert_eq!(t.scan_bare(None).unwrap(), 86);
        touch(&mem, 255);
        assert_eq!(t.scan_bare(Some(2)).unwrap(), 1);
        assert_eq!(t.sync().unwrap().count(), 0);
    }

    fn facts_ok() -> ProbeFacts {
        ProbeFacts {
            kernel: "6.18.0".into(),
            open: Ok(()),
            features: Some(required_mask() | 1),
            pagemap_scan: Ok(()),
        }
    }

    #[test]
    fn verdict_names_what_is_missing() {
        assert!(uffd_verdict(&facts_ok()).available);
        let eperm = apply_fake(facts_ok(), "open=EPERM").unwrap();
        let v = uffd_verdict(&eperm);
        assert!(!v.available && v.reason.contains("unprivileged_userfaultfd"));
        let old = apply_fake(facts_ok(), "kernel=6.6.0,features=0x2000").unwrap();
        let v = uffd_verdict(&old);
        assert!(!v.available);
        assert_eq!(
            v.missing,
            vec!["UFFD_FEATURE_WP_ASYNC", "UFFD_FEATURE_WP_HUGETLBFS_SHMEM"]
        );
        assert!(v.reason.contains("older than 6.7"), "{}", v.reason);
        let noscan = apply_fake(facts_ok(), "pagemap_scan=ENOTTY").unwrap();
        assert!(uffd_verdict(&noscan).reason.contains("no PAGEMAP_SCAN"));
        assert!(apply_fake(facts_ok(), "colour=blue").is_err());
        assert!(apply_fake(facts_ok(), "open=EWHATEVER").is_err());
        assert_eq!(kernel_at_least("6.7.0-rc1", 6, 7), Some(true));
        assert_eq!(kernel_at_least("5.15.0-91-generic", 6, 7), Some(false));
    }
}
