//! A second shared mapping of the guest's memfd, not registered with
//! userfaultfd: the `continue` placement writes arriving pages through it
//! into the page cache, where the guest's (registered) mapping cannot see
//! them until `UFFDIO_CONTINUE` maps them. Accesses through it never raise
//! a userfault: a hole is allocated and zeroed as in any shmem mapping.

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

use crate::error::{CoreError, CoreResult};

pub struct Alias {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; callers write disjoint pages
// they claimed, so sharing the pointer between threads is sound.
unsafe impl Send for Alias {}
// SAFETY: as above; `Alias` has no interior state besides the mapping.
unsafe impl Sync for Alias {}

impl Alias {
    /// Maps the first `len` bytes of `fd` (the whole guest memory).
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> CoreResult<Self> {
        // SAFETY: a fresh shared mapping at an address the kernel picks, so
        // it overlaps nothing; the memfd is at least `len` bytes long.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| CoreError::io("mmap the placement alias of the memfd", e.into()))?;
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| CoreError::invalid("mmap returned a null mapping"))?;
        Ok(Alias { base, len })
    }

    /// Writes `data` at `offset` (checked by the caller to lie inside).
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len, "alias write out of bounds");
        // SAFETY: inside the mapping (asserted); the caller owns the pages
        // (claimed, not mapped in the guest) so nothing else writes them.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(offset), data.len())
        };
    }

    /// Writes `len` zero bytes at `offset`.
    pub fn zero(&self, offset: usize, len: usize) {
        assert!(offset + len <= self.len, "alias write out of bounds");
        // SAFETY: as in `write`.
        unsafe { std::ptr::write_bytes(self.base.as_ptr().add(offset), 0, len) };
    }
}

impl Drop for Alias {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        let _ = unsafe { munmap(self.base.as_ptr().cast(), self.len) };
    }
}
