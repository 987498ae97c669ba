//! Whether this host can run the destination side of post-copy: userfaultfd
//! in MISSING mode on the backings mig uses (memfd/shmem and anonymous
//! memory), with `UFFDIO_COPY` and `UFFDIO_ZEROPAGE`; and, for the
//! `continue` placement, MINOR mode on shmem with `UFFDIO_CONTINUE`.
//!
//! The probe registers one real page of each backing and reads back the
//! ioctls the kernel allows on it, so the answer is what registration will
//! do, not what the kernel version suggests. Like the tracker probe, its
//! facts can be replaced through `MIG_FAKE_PROBE` (shared keys `kernel`,
//! `open`, `features`; post-copy keys in [`FAKE_KEYS`]).

use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use rustix::io::Errno;

use super::uapi::{
    self, IOCTL_CONTINUE_BIT, IOCTL_COPY_BIT, IOCTL_ZEROPAGE_BIT, UFFDIO_REGISTER_MODE_MINOR,
    UFFDIO_REGISTER_MODE_MISSING, UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_SHMEM,
    UFFD_FEATURE_THREAD_ID,
};
use crate::error::{CoreError, CoreResult};
use crate::memory::{host_page_size, GuestMemory};
use crate::tracker::{self, parse_errno, parse_int, Capability, FAKE_PROBE_ENV};

/// `MIG_FAKE_PROBE` keys of this probe: `kernel_faults=<errno|ok>` (opening a
/// userfaultfd without `UFFD_USER_MODE_ONLY`), `missing_anon=<errno|ok>` and
/// `missing_shmem=<errno|ok>` (MISSING registration of each backing),
/// `missing_ioctls=<int>` (the `uffdio_register.ioctls` mask both report),
/// `minor_shmem=<errno|ok>` (MISSING|MINOR registration of a memfd page),
/// `features_off=<int>` (`UFFDIO_API` features this probe sees withdrawn,
/// the dirty tracker's view left as it is).
pub const FAKE_KEYS: [&str; 6] = [
    "kernel_faults",
    "missing_anon",
    "missing_shmem",
    "missing_ioctls",
    "minor_shmem",
    "features_off",
];

/// What the host offers for post-copy, as observed or faked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostcopyFacts {
    pub kernel: String,
    /// Opening a userfaultfd with `UFFD_USER_MODE_ONLY` (or without it on
    /// kernels that predate the flag).
    pub open: Result<(), Errno>,
    /// Opening one that also receives faults raised inside the kernel.
    pub kernel_faults: Result<(), Errno>,
    /// Features `UFFDIO_API` offers.
    pub features: Option<u64>,
    /// `uffdio_register.ioctls` after MISSING registration of an anonymous
    /// private page, or the registration error.
    pub anon: Result<u64, Errno>,
    /// The same for a page of a memfd shared mapping (shmem).
    pub shmem: Result<u64, Errno>,
    /// The same for MISSING|MINOR registration of a memfd page (the
    /// `continue` placement).
    pub minor_shmem: Result<u64, Errno>,
}

/// The post-copy verdict, plus what kind of faults will be delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostcopyCapability {
    pub cap: Capability,
    /// Faults raised by the kernel (a `recv()` or `read()` into a missing
    /// page) wait for the page instead of failing with EFAULT.
    pub kernel_faults: bool,
    /// Fault messages name the faulting thread (per-thread blocktime).
    pub thread_id: bool,
    pub kernel_faults_note: String,
    /// The `continue` placement: MINOR mode with `UFFDIO_CONTINUE` on shmem.
    pub minor: Capability,
}

/// Registers `len` bytes at `addr` in `mode` on a fresh userfaultfd and
/// returns the allowed ioctls; the registration ends with the fd.
fn register_probe(addr: *mut u8, len: usize, mode: u64) -> Result<u64, Errno> {
    let fd: OwnedFd = open_with_api()?.0;
    let ioctls = uapi::register(&fd, addr as u64, len as u64, mode)?;
    uapi::unregister(&fd, addr as u64, len as u64)?;
    Ok(ioctls)
}

/// Opens a userfaultfd (kernel faults if permitted, else user-mode only) and
/// enables the post-copy features the kernel offers. Returns the fd, whether
/// kernel faults are delivered, and the enabled features.
pub(crate) fn open_with_api() -> Result<(OwnedFd, bool, u64), Errno> {
    let (fd, kernel_faults) = match uapi::open(true) {
        Ok(fd) => (fd, true),
        Err(_) => (open_user_mode()?, false),
    };
    let offered = {
        let probe = open_user_mode()?;
        uapi::uffd_api(&probe, 0)?
    };
    let wanted =
        offered & (UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_THREAD_ID);
    let got = uapi::uffd_api(&fd, wanted)?;
    Ok((fd, kernel_faults, got))
}

fn open_user_mode() -> Result<OwnedFd, Errno> {
    match uapi::open(false) {
        // Kernels before 5.11 reject UFFD_USER_MODE_ONLY: retry without it.
        Err(Errno::INVAL) => uapi::open(true),
        r => r,
    }
}

fn probe_anon() -> Result<u64, Errno> {
    let mem = GuestMemory::with_backing(host_page_size(), crate::backing::Backing::Anon)
        .map_err(|_| Errno::NOMEM)?;
    register_probe(mem.as_ptr(), mem.len(), UFFDIO_REGISTER_MODE_MISSING)
}

fn probe_shmem(mode: u64) -> Result<u64, Errno> {
    let mem = GuestMemory::new(host_page_size()).map_err(|_| Errno::NOMEM)?;
    register_probe(mem.as_ptr(), mem.len(), mode)
}

fn real_facts() -> PostcopyFacts {
    static FACTS: OnceLock<PostcopyFacts> = OnceLock::new();
    FACTS
        .get_or_init(|| {
            // Kernel, userfaultfd open and offered features: the tracker
            // probe already observed them the same way.
            let t = tracker::real_facts();
            PostcopyFacts {
                kernel: t.kernel,
                open: t.open,
                kernel_faults: uapi::open(true).map(drop),
                features: t.features,
                anon: probe_anon(),
                shmem: probe_shmem(UFFDIO_REGISTER_MODE_MISSING),
                minor_shmem: probe_shmem(UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR),
            }
        })
        .clone()
}

/// Applies a `MIG_FAKE_PROBE` specification; tracker keys it does not
/// share are left to the tracker probe.
pub fn apply_fake(mut f: PostcopyFacts, spec: &str) -> CoreResult<PostcopyFacts> {
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| {
            CoreError::invalid(format!("{FAKE_PROBE_ENV}: {item:?} is not key=value"))
        })?;
        let with_mask = |r: Result<(), Errno>, old: Result<u64, Errno>| {
            r.map(|()| old.unwrap_or(IOCTL_COPY_BIT | IOCTL_ZEROPAGE_BIT))
        };
        match k.trim() {
            "kernel" => f.kernel = v.to_string(),
            "open" => {
                f.open = parse_errno(k, v)?;
                if let Err(e) = f.open {
                    f.features = None;
                    f.kernel_faults = Err(e);
                    f.anon = Err(e);
                    f.shmem = Err(e);
                    f.minor_shmem = Err(e);
                }
            }
            "features" => f.features = Some(parse_int(k, v)?),
            "kernel_faults" => f.kernel_faults = parse_errno(k, v)?,
            "missing_anon" => f.anon = with_mask(parse_errno(k, v)?, f.anon),
            "missing_shmem" => f.shmem = with_mask(parse_errno(k, v)?, f.shmem),
            "features_off" => {
                let off = parse_int(k, v)?;
                f.features = f.features.map(|have| have & !off);
            }
            "minor_shmem" => {
                f.minor_shmem = parse_errno(k, v)?.map(|()| {
                    f.minor_shmem
                        .unwrap_or(IOCTL_COPY_BIT | IOCTL_ZEROPAGE_BIT | IOCTL_CONTINUE_BIT)
                })
            }
            "missing_ioctls" => {
                let mask = parse_int(k, v)?;
                f.anon = f.anon.map(|_| mask);
                f.shmem = f.shmem.map(|_| mask);
            }
            // Validated by the tracker probe, which rejects unknown keys.
            _ => {}
        }
    }
    Ok(f)
}

/// The facts this process sees: probed once, then `MIG_FAKE_PROBE` applied
/// (read on every call, so tests may change it).
pub fn facts() -> CoreResult<(PostcopyFacts, bool)> {
    // The tracker probe validates the whole specification first.
    let (_, faked) = tracker::facts()?;
    let real = real_facts();
    match std::env::var(FAKE_PROBE_ENV) {
        Ok(spec) if faked => Ok((apply_fake(real, &spec)?, true)),
        _ => Ok((real, false)),
    }
}

fn errno_text(e: Errno) -> String {
    std::io::Error::from(e).to_string()
}

/// Decides whether post-copy can run here, naming what is missing.
pub fn verdict(f: &PostcopyFacts) -> PostcopyCapability {
    let have = f.features.unwrap_or(0);
    let thread_id = have & UFFD_FEATURE_THREAD_ID != 0;
    let kernel_faults = f.open.is_ok() && f.kernel_faults.is_ok();
    let kernel_faults_note = if kernel_faults {
        "kernel faults delivered: a recv()/read() into a missing page waits for it".to_string()
    } else {
        format!(
            "UFFD_USER_MODE_ONLY: only user-space faults are delivered ({}); a recv()/read() \
             into a missing page fails with EFAULT, so pages are received into a buffer \
             and placed with UFFDIO_COPY (grant CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1 \
             or /dev/userfaultfd access to lift this)",
            f.kernel_faults.err().map(errno_text).unwrap_or_default()
        )
    };
    let minor = minor_verdict(f);
    let result = |cap| PostcopyCapability {
        cap,
        kernel_faults,
        thread_id,
        kernel_faults_note: kernel_faults_note.clone(),
        minor: minor.clone(),
    };
    let no = |reason: String, missing: Vec<&'static str>| {
        result(Capability {
            available: false,
            reason,
            missing,
        })
    };
    if let Err(e) = f.open {
        return no(
            format!(
                "userfaultfd MISSING mode unavailable: {}",
                tracker::open_error_text(e)
            ),
            vec!["userfaultfd"],
        );
    }
    let mut missing = Vec::new();
    let mut why = Vec::new();
    if have & UFFD_FEATURE_MISSING_SHMEM == 0 {
        missing.push("UFFD_FEATURE_MISSING_SHMEM");
        why.push("UFFDIO_API does not offer UFFD_FEATURE_MISSING_SHMEM".to_string());
    }
    for (backing, reg) in [("anonymous memory", &f.anon), ("memfd/shmem", &f.shmem)] {
        match reg {
            Err(e) => {
                missing.push("UFFDIO_REGISTER_MODE_MISSING");
                why.push(format!(
                    "MISSING registration of {backing} fails: {}",
                    errno_text(*e)
                ));
            }
            Ok(ioctls) => {
                for (bit, name) in [
                    (IOCTL_COPY_BIT, "UFFDIO_COPY"),
                    (IOCTL_ZEROPAGE_BIT, "UFFDIO_ZEROPAGE"),
                ] {
                    if ioctls & bit == 0 {
                        missing.push(name);
                        why.push(format!("{name} is not allowed on {backing}"));
                    }
                }
            }
        }
    }
    missing.dedup();
    if !missing.is_empty() {
        return no(
            format!(
                "userfaultfd MISSING mode unusable (kernel {}): {}",
                f.kernel,
                why.join("; ")
            ),
            missing,
        );
    }
    result(Capability {
        available: true,
        reason: format!(
            "userfaultfd MISSING mode with UFFDIO_COPY and UFFDIO_ZEROPAGE on memfd/shmem and \
             anonymous memory (kernel {}{})",
            f.kernel,
            if thread_id { ", fault thread ids" } else { "" }
        ),
        missing: vec![],
    })
}

/// Whether the `continue` placement (MINOR mode on shmem, pages resolved
/// with `UFFDIO_CONTINUE`) can run here, naming what is missing. Asked
/// only once MISSING mode is known to work.
pub fn minor_verdict(f: &PostcopyFacts) -> Capability {
    let have = f.features.unwrap_or(0);
    let mut missing = Vec::new();
    let mut why = Vec::new();
    if have & UFFD_FEATURE_MINOR_SHMEM == 0 {
        missing.push("UFFD_FEATURE_MINOR_SHMEM");
        why.push(
            "UFFDIO_API does not offer UFFD_FEATURE_MINOR_SHMEM (Linux 5.13 or later)".to_string(),
        );
    }
    match f.minor_shmem {
        Err(e) => {
            missing.push("UFFDIO_REGISTER_MODE_MINOR");
            why.push(format!(
                "MINOR registration of memfd/shmem fails: {}",
                errno_text(e)
            ));
        }
        Ok(ioctls) if ioctls & IOCTL_CONTINUE_BIT == 0 => {
            missing.push("UFFDIO_CONTINUE");
            why.push("UFFDIO_CONTINUE is not allowed on memfd/shmem".to_string());
        }
        Ok(_) => {}
    }
    if missing.is_empty() {
        return Capability {
            available: true,
            reason: format!(
                "userfaultfd MINOR mode with UFFDIO_CONTINUE on memfd/shmem (kernel {})",
                f.kernel
            ),
            missing,
        };
    }
    Capability {
        available: false,
        reason: format!(
            "userfaultfd MINOR mode unusable (kernel {}): {}",
            f.kernel,
            why.join("; ")
        ),
        missing,
    }
}

/// Fails with an `Unsupported` error naming the missing feature unless the
/// `continue` placement can run here.
pub fn require_minor() -> CoreResult<()> {
    let c = capability()?.minor;
    if !c.available {
        return Err(CoreError::Unsupported(format!(
            "post-copy placement continue unavailable: {}",
            c.reason
        )));
    }
    Ok(())
}

/// The post-copy capability of this process.
pub fn capability() -> CoreResult<PostcopyCapability> {
    Ok(verdict(&facts()?.0))
}

/// Fails with an `Unsupported` error naming the missing feature.
pub fn require() -> CoreResult<PostcopyCapability> {
    let c = capability()?;
    if !c.cap.available {
        return Err(CoreError::Unsupported(format!(
            "post-copy unavailable: {}",
            c.cap.reason
        )));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_facts() -> PostcopyFacts {
        PostcopyFacts {
            kernel: "6.18.0".into(),
            open: Ok(()),
            kernel_faults: Ok(()),
            features: Some(
                UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_THREAD_ID,
            ),
            anon: Ok(IOCTL_COPY_BIT | IOCTL_ZEROPAGE_BIT),
            shmem: Ok(IOCTL_COPY_BIT | IOCTL_ZEROPAGE_BIT),
            minor_shmem: Ok(IOCTL_COPY_BIT | IOCTL_ZEROPAGE_BIT | IOCTL_CONTINUE_BIT),
        }
    }

    #[test]
    fn verdict_names_what_is_missing() {
        let v = verdict(&ok_facts());
        assert!(v.cap.available && v.kernel_faults && v.thread_id);

        let f = apply_fake(ok_facts(), "open=ENOSYS").unwrap();
        let v = verdict(&f);
        assert!(!v.cap.available);
        assert!(v.cap.reason.contains("CONFIG_USERFAULTFD"));
        assert_eq!(v.cap.missing, vec!["userfaultfd"]);

        let f = apply_fake(ok_facts(), "missing_shmem=EINVAL").unwrap();
        let v = verdict(&f);
        assert!(v.cap.reason.contains("memfd/shmem"), "{}", v.cap.reason);
        assert_eq!(v.cap.missing, vec!["UFFDIO_REGISTER_MODE_MISSING"]);

        let f = apply_fake(ok_facts(), "missing_ioctls=0x8").unwrap();
        let v = verdict(&f);
        assert_eq!(v.cap.missing, vec!["UFFDIO_ZEROPAGE"]);

        let f = apply_fake(ok_facts(), "features=0").unwrap();
        let v = verdict(&f);
        assert_eq!(v.cap.missing, vec!["UFFD_FEATURE_MISSING_SHMEM"]);
        assert!(!v.thread_id);

        let f = apply_fake(ok_facts(), "kernel_faults=EPERM").unwrap();
        let v = verdict(&f);
        assert!(v.cap.available && !v.kernel_faults);
        assert!(v.kernel_faults_note.contains("EFAULT"));
    }

    #[test]
    fn minor_verdict_names_what_is_missing() {
        assert!(minor_verdict(&ok_facts()).available);
        assert!(verdict(&ok_facts()).minor.available);
        // Features without UFFD_FEATURE_MINOR_SHMEM: MISSING mode still works.
        let f = apply_fake(ok_facts(), "features=0x120").unwrap();
        assert!(verdict(&f).cap.available);
        let v = minor_verdict(&f);
        assert!(!v.available);
        assert_eq!(v.missing, vec!["UFFD_FEATURE_MINOR_SHMEM"]);
        assert!(
            v.reason.contains("UFFD_FEATURE_MINOR_SHMEM"),
            "{}",
            v.reason
        );
        let f = apply_fake(ok_facts(), "features_off=0x400").unwrap();
        assert!(verdict(&f).cap.available);
        assert_eq!(minor_verdict(&f).missing, vec!["UFFD_FEATURE_MINOR_SHMEM"]);
        let f = apply_fake(ok_facts(), "minor_shmem=EINVAL").unwrap();
        let v = minor_verdict(&f);
        assert_eq!(v.missing, vec!["UFFDIO_REGISTER_MODE_MINOR"]);
        let mut f = ok_facts();
        f.minor_shmem = Ok(IOCTL_COPY_BIT);
        assert_eq!(minor_verdict(&f).missing, vec!["UFFDIO_CONTINUE"]);
    }

    #[test]
    fn bad_fake_values_are_errors() {
        assert!(apply_fake(ok_facts(), "missing_ioctls=lots").is_err());
        assert!(apply_fake(ok_facts(), "missing_anon=EWHAT").is_err());
    }
}
