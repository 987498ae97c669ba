//! A private anonymous mapping: the other backing post-copy registers
//! (guest RAM of VMMs that do not use a memfd).

use std::ptr::NonNull;

use rustix::mm::{mmap_anonymous, munmap, MapFlags, ProtFlags};

use crate::error::{CoreError, CoreResult};
use crate::memory::host_page_size;

pub struct AnonMemory {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping lives as long as the struct and is only reached through
// raw pointers, exactly as `GuestMemory`.
unsafe impl Send for AnonMemory {}
// SAFETY: see `Send` above.
unsafe impl Sync for AnonMemory {}

impl AnonMemory {
    pub fn new(len: usize) -> CoreResult<Self> {
        let ps = host_page_size();
        if len == 0 || !len.is_multiple_of(ps) {
            return Err(CoreError::invalid(format!(
                "size {len} is not a positive multiple of the page size {ps}"
            )));
        }
        // SAFETY: a fresh private mapping at an address the kernel picks.
        let p = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|e| CoreError::io(format!("mmap {len} anonymous bytes"), e.into()))?;
        let base = NonNull::new(p.cast()).ok_or_else(|| CoreError::invalid("null mapping"))?;
        Ok(AnonMemory { base, len })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this struct created and owns.
        let _ = unsafe { munmap(self.base.as_ptr().cast(), self.len) };
    }
}
