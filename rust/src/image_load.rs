//! Loading a raw memory image into guest memory, sparsely.
//!
//! Fresh guest memory reads as zeros, so the image's zero pages need not be
//! written: they stay holes that the kernel never allocates. That halves the
//! work and the memory for an image that is half zero pages, and a hole
//! costs the sender nothing later (an anonymous hole reads as the shared
//! zero page; a memfd hole is found with `SEEK_DATA`). Runs of data pages
//! go in with one positioned write each into a memfd (no page-table faults,
//! no mapping work), or one copy each into a mapping without a file.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{CoreError, CoreResult};
use crate::memory::GuestMemory;
use crate::wire;

/// Bytes read from the image per system call: large enough that the read
/// costs little per byte, small enough to stay in the last-level cache for
/// the zero scan and the write that follow.
const CHUNK: usize = 4 << 20;

/// Copies the image at `path` (exactly `mem.len()` bytes) into `mem`,
/// skipping zero pages; `mem` must be fresh (all zeros).
pub fn load(mem: &GuestMemory, file: &mut File, path: &Path) -> CoreResult<()> {
    let size = mem.len();
    let ps = mem.page_size();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < size {
        let want = CHUNK.min(size - off);
        read_full(file, &mut buf[..want], path, off, size)?;
        for (start, end) in data_runs(&buf[..want], ps) {
            write_run(mem, off + start, &buf[start..end])?;
        }
        off += want;
    }
    Ok(())
}

/// Fills `out` from `file`, or explains that the image ended early.
fn read_full(
    file: &mut File,
    out: &mut [u8],
    path: &Path,
    at: usize,
    size: usize,
) -> CoreResult<()> {
    let mut got = 0;
    while got < out.len() {
        let n = file
            .read(&mut out[got..])
            .map_err(|e| CoreError::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            return Err(CoreError::invalid(format!(
                "{} shrank while loading: {} of {size} bytes",
                path.display(),
                at + got
            )));
        }
        got += n;
    }
    Ok(())
}

/// Byte ranges of `buf` made of consecutive pages that are not all zeros.
pub fn data_runs(buf: &[u8], page_size: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in buf.chunks(page_size).enumerate() {
        if wire::is_zero(page) {
            continue;
        }
        let (start, end) = (i * page_size, i * page_size + page.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// Writes one run of data pages at `offset`.
fn write_run(mem: &GuestMemory, offset: usize, data: &[u8]) -> CoreResult<()> {
    match mem.writable_file() {
        Some(file) => file
            .write_all_at(data, offset as u64)
            .map_err(|e| CoreError::io("write image into the memfd", e)),
        None => mem.write_bytes(offset, data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::Backing;

    #[test]
    fn runs_cover_exactly_the_non_zero_pages() {
        let ps = 4096;
        let mut buf = vec![0u8; 8 * ps];
        for p in [1usize, 2, 5, 7] {
            buf[p * ps + ps - 1] = 1; // the last byte: the scan must read whole pages
        }
        assert_eq!(
            data_runs(&buf, ps),
            vec![(ps, 3 * ps), (5 * ps, 6 * ps), (7 * ps, 8 * ps)]
        );
        assert!(data_runs(&vec![0u8; 4 * ps], ps).is_empty());
    }

    #[test]
    fn sparse_load_is_byte_exact_and_leaves_zero_pages_unallocated() {
        let ps = crate::memory::host_page_size();
        let pages = 3 * CHUNK / ps + 5; // several chunks and a short tail
        let mut image = vec![0u8; pages * ps];
        for p in (0..pages).filter(|p| p % 3 != 0) {
            image[p * ps + (p % ps)] = (p % 251 + 1) as u8;
        }
        let dir = std::env::temp_dir().join(format!("mig-image-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img.raw");
        std::fs::write(&path, &image).unwrap();
        for backing in [Backing::Memfd, Backing::Anon] {
            let mem = GuestMemory::from_image(&path, backing).unwrap();
            // Page 0 is a zero page: never written, so still a hole (asked
            // before reading back, as reading a memfd hole allocates it).
            assert!(mem.is_hole(0, ps), "{backing:?}: a zero page was allocated");
            assert!(
                !mem.is_hole(ps, 2 * ps),
                "{backing:?}: a data page is a hole"
            );
            let mut back = vec![0u8; image.len()];
            mem.read_bytes(0, &mut back).unwrap();
            assert!(
                back == image,
                "{backing:?}: loaded memory differs from the image"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
