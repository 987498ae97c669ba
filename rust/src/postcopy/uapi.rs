//! The MISSING- and MINOR-mode parts of `linux/userfaultfd.h`, plus opening
//! a userfaultfd with or without kernel-fault delivery.
//!
//! Why hand-written: the `userfaultfd` crate's `-sys` crate generates its
//! bindings with bindgen at build time, which needs libclang; the build hosts
//! of this project have no libclang, and the handful of structs below are a
//! stable kernel ABI. The write-protect items shared with the tracker live in
//! `tracker.rs` and are reused here.

use std::os::fd::OwnedFd;

use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, Opcode, Updater};

pub(crate) use crate::tracker::{
    uffd_api, UffdioRange, UffdioRegister, UFFDIO_REGISTER, UFFD_USER_MODE_ONLY,
};

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Faults on pages present in the page cache but not mapped (Linux 5.13
/// for shmem); resolved with `UFFDIO_CONTINUE`.
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

/// `UFFDIO_API` feature: MISSING registration of shmem (memfd) mappings.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFDIO_API` feature: MINOR registration of shmem (memfd) mappings.
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFDIO_API` feature: fault messages carry the faulting thread's id.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;

/// Bits of `uffdio_register.ioctls`: which range ioctls the kernel allows.
pub const IOCTL_COPY_BIT: u64 = 1 << 0x03;
pub const IOCTL_ZEROPAGE_BIT: u64 = 1 << 0x04;
pub const IOCTL_CONTINUE_BIT: u64 = 1 << 0x07;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Bytes copied, or a negated errno.
    pub copy: i64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    /// Bytes zeroed, or a negated errno.
    pub zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioContinue {
    pub range: UffdioRange,
    pub mode: u64,
    /// Bytes mapped, or a negated errno.
    pub mapped: i64,
}

pub const UFFDIO_UNREGISTER: Opcode = opcode::read::<UffdioRange>(0xAA, 0x01);
pub const UFFDIO_COPY: Opcode = opcode::read_write::<UffdioCopy>(0xAA, 0x03);
pub const UFFDIO_ZEROPAGE: Opcode = opcode::read_write::<UffdioZeropage>(0xAA, 0x04);
pub const UFFDIO_CONTINUE: Opcode = opcode::read_write::<UffdioContinue>(0xAA, 0x07);

/// `struct uffd_msg` is 32 bytes: event (u8), 7 reserved bytes, then for a
/// page fault: flags (u64), address (u64), ptid (u32).
pub const UFFD_MSG_SIZE: usize = 32;

/// One page-fault message, decoded from the kernel's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultMsg {
    pub address: u64,
    pub write: bool,
    pub tid: u32,
}

/// Decodes one `uffd_msg`; `None` for events other than page faults.
pub fn decode_msg(raw: &[u8; UFFD_MSG_SIZE]) -> Option<FaultMsg> {
    if raw[0] != UFFD_EVENT_PAGEFAULT {
        return None;
    }
    let u64_at = |o: usize| u64::from_ne_bytes(raw[o..o + 8].try_into().expect("8 bytes"));
    Some(FaultMsg {
        write: u64_at(8) & 1 != 0,
        address: u64_at(16),
        tid: u32::from_ne_bytes(raw[24..28].try_into().expect("4 bytes")),
    })
}

/// Opens a non-blocking userfaultfd. `kernel_faults = false` adds
/// `UFFD_USER_MODE_ONLY`: only faults raised by user-space accesses are
/// delivered, and a kernel access (a `recv()` or `read()` into a missing page)
/// fails with EFAULT instead of waiting. Delivering kernel faults needs
/// CAP_SYS_PTRACE, `vm.unprivileged_userfaultfd = 1`, or /dev/userfaultfd.
pub fn open(kernel_faults: bool) -> Result<OwnedFd, Errno> {
    use rustix::mm::{userfaultfd, UserfaultfdFlags};
    let mut flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
    if !kernel_faults {
        flags |= UserfaultfdFlags::from_bits_retain(UFFD_USER_MODE_ONLY);
    }
    // SAFETY: opening a userfaultfd has no effect until ranges are registered.
    unsafe { userfaultfd(flags) }
}

/// Registers `[start, start + len)` in the `UFFDIO_REGISTER_MODE_*` bits of
/// `mode`; returns the ioctls the kernel allows on it (`IOCTL_*_BIT`).
pub fn register(fd: &OwnedFd, start: u64, len: u64, mode: u64) -> Result<u64, Errno> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: `UFFDIO_REGISTER` takes a `struct uffdio_register`; the caller
    // keeps the range mapped while it stays registered.
    unsafe {
        ioctl(
            fd,
            Updater::<UFFDIO_REGISTER, UffdioRegister>::new(&mut reg),
        )?
    };
    Ok(reg.ioctls)
}

/// Ends the registration of `[start, start + len)`.
pub fn unregister(fd: &OwnedFd, start: u64, len: u64) -> Result<(), Errno> {
    let mut range = UffdioRange { start, len };
    // SAFETY: `UFFDIO_UNREGISTER` takes a `struct uffdio_range`.
    unsafe {
        ioctl(
            fd,
            Updater::<UFFDIO_UNREGISTER, UffdioRange>::new(&mut range),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!(std::mem::size_of::<UffdioRange>(), 16);
        assert_eq!(std::mem::size_of::<UffdioContinue>(), 32);
        // _IOWR(0xAA, 0x07, struct uffdio_continue), as linux/userfaultfd.h.
        assert_eq!(UFFDIO_CONTINUE, 0xC020_AA07);
    }

    #[test]
    fn decodes_a_fault_message() {
        let mut raw = [0u8; UFFD_MSG_SIZE];
        raw[0] = UFFD_EVENT_PAGEFAULT;
        raw[8..16].copy_from_slice(&1u64.to_ne_bytes());
        raw[16..24].copy_from_slice(&0x7f00_1000u64.to_ne_bytes());
        raw[24..28].copy_from_slice(&4242u32.to_ne_bytes());
        let m = decode_msg(&raw).expect("a page fault");
        assert_eq!((m.address, m.write, m.tid), (0x7f00_1000, true, 4242));
        raw[0] = 0x14; // UFFD_EVENT_FORK
        assert!(decode_msg(&raw).is_none());
    }
}
