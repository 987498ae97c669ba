//! `MSG_ZEROCOPY` sends and their completions (QEMU's `zero-copy-send`).
//!
//! The kernel pins the user pages of a zero-copy send and transmits from
//! them later; each successful `sendmsg` is one notification, and the error
//! queue reports ranges of finished notifications. They are reaped at every
//! sync (as QEMU flushes at each sync) so the pinned pages stay bounded.
//!
//! It cannot pay on loopback: there the kernel always falls back to a copy
//! (Documentation/networking/msg_zerocopy.rst), reported here as `copied`
//! completions. It pays only for sends above about 10 KB, and needs
//! locked-memory room (`RLIMIT_MEMLOCK`, the socket's optmem): without it
//! `sendmsg` fails with `ENOBUFS`, and the send falls back to a copy.

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// `SO_ZEROCOPY` (include/uapi/asm-generic/socket.h).
const SO_ZEROCOPY: libc::c_int = 60;
/// `SO_EE_ORIGIN_ZEROCOPY` and `SO_EE_CODE_ZEROCOPY_COPIED`
/// (include/uapi/linux/errqueue.h).
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// Turns zero-copy sends on for a socket.
pub fn enable(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and a pointer to a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ZEROCOPY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One socket's outstanding zero-copy sends.
#[derive(Default)]
pub struct ZeroCopy {
    /// Notifications issued (successful zero-copy `sendmsg` calls).
    issued: u64,
    /// Notifications the kernel reported finished.
    completed: u64,
    /// Of those, the ones where the kernel copied after all.
    pub copied: u64,
    /// Sends that fell back to a plain copy (`ENOBUFS`).
    pub fallbacks: u64,
}

impl ZeroCopy {
    /// Writes all of `bufs` with `MSG_ZEROCOPY` (falling back to a plain
    /// send on `ENOBUFS` after reaping what completed). The kernel reads
    /// `bufs` until their completion: they must stay untouched (guest pages,
    /// not reused buffers) — send reused buffers with a plain write first.
    pub fn write_all(&mut self, fd: RawFd, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let flags = libc::MSG_ZEROCOPY;
            match sendmsg(fd, bufs, flags) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    self.issued += 1;
                    IoSlice::advance_slices(&mut bufs, n);
                    // Keep the error queue short: each queued notification
                    // holds socket memory.
                    self.reap(fd, false)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.reap(fd, false)?;
                    let n = sendmsg(fd, bufs, 0)?;
                    self.fallbacks += 1;
                    IoSlice::advance_slices(&mut bufs, n);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads the completions queued on the socket's error queue; with
    /// `wait`, until every issued send has completed (or `timeout` passed).
    pub fn reap(&mut self, fd: RawFd, wait: bool) -> io::Result<()> {
        self.reap_until(fd, wait, Duration::from_secs(60))
    }

    fn reap_until(&mut self, fd: RawFd, wait: bool, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some((n, copied)) = recv_completion(fd)? {
                self.completed += n;
                if copied {
                    self.copied += n;
                }
            }
            if !wait || self.completed >= self.issued {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "zero-copy sends: {} of {} completions after {timeout:?}",
                        self.completed, self.issued
                    ),
                ));
            }
            let mut p = libc::pollfd {
                fd,
                events: 0, // POLLERR is always reported
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as libc::c_int) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }

    pub fn completed(&self) -> u64 {
        self.completed
    }

    pub fn outstanding(&self) -> u64 {
        self.issued - self.completed
    }
}

fn sendmsg(fd: RawFd, bufs: &[IoSlice<'_>], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid; the iovec array is `bufs`
    // (IoSlice is ABI-compatible with iovec), at most IOV_MAX entries.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(1024) as _;
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(fd, &msg, flags | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One message from the error queue: how many notifications it completes
/// and whether the kernel copied; None when the queue is empty.
fn recv_completion(fd: RawFd) -> io::Result<Option<(u64, bool)>> {
    let mut control = [0u64; 16];
    // SAFETY: an all-zero msghdr is valid; the control buffer is ours.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` and its control buffer are valid for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(None),
            Some(libc::EINTR) => recv_completion(fd),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel filled `msg_control`; the CMSG macros walk it
    // within `msg_controllen`.
    let mut cm = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cm.is_null() {
        // SAFETY: `cm` is a header inside the control buffer.
        let (level, kind) = unsafe { ((*cm).cmsg_level, (*cm).cmsg_type) };
        let recverr = (level == libc::SOL_IP && kind == libc::IP_RECVERR)
            || (level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR);
        if recverr {
            // SAFETY: an IP(V6)_RECVERR message carries a sock_extended_err;
            // read unaligned from the data area.
            let err: libc::sock_extended_err =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast()) };
            if err.ee_origin == SO_EE_ORIGIN_ZEROCOPY && err.ee_errno == 0 {
                let copied = err.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0;
                // The inclusive range [ee_info, ee_data] of notifications.
                let n = u64::from(err.ee_data.wrapping_sub(err.ee_info)) + 1;
                return Ok(Some((n, copied)));
            }
        }
        // SAFETY: as above.
        cm = unsafe { libc::CMSG_NXTHDR(&msg, cm) };
    }
    // Some other queued error: nothing for the zero-copy count.
    Ok(Some((0, false)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    /// On loopback every completion arrives, reported as copied.
    #[test]
    fn loopback_sends_complete_and_report_the_copy() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut r, _) = l.accept().unwrap();
        let fd = s.as_raw_fd();
        enable(fd).unwrap();
        let data = vec![7u8; 256 << 10];
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            r.read_to_end(&mut got).unwrap();
            assert_eq!(got.len(), 400 * (256 << 10));
            got
        });
        let mut zc = ZeroCopy::default();
        for _ in 0..400 {
            let mut bufs = [IoSlice::new(&data[..1000]), IoSlice::new(&data[1000..])];
            zc.write_all(fd, &mut bufs).unwrap();
        }
        zc.reap(fd, true).unwrap();
        assert_eq!(zc.outstanding(), 0);
        assert!(zc.completed >= 400 - zc.fallbacks);
        // Loopback: the kernel copied every one.
        assert_eq!(zc.copied, zc.completed);
        s.shutdown(std::net::Shutdown::Both).unwrap();
        assert_eq!(reader.join().unwrap().len(), 400 * data.len());
    }
}
