//! How the destination places a page that arrives during post-copy
//! (`postcopy-placement`):
//!
//! * `copy`: the memory is registered in MISSING mode and each page goes in
//!   with `UFFDIO_COPY` (a fresh page filled and mapped in one step). Works
//!   on every backing.
//! * `continue`: shmem only. The memory is registered in MISSING and MINOR
//!   mode; a page is written into the memfd's page cache (`pwrite`, no
//!   mapping involved), then `UFFDIO_CONTINUE` maps it
//!   into the guest's mapping. The guest's mapping has no entry for the page
//!   until then, so it never sees it half-written, and one `UFFDIO_CONTINUE`
//!   maps a whole run of pages (a chunk) where `UFFDIO_COPY` takes one call
//!   per page.
//!
//! `auto` picks by backing: [`SHMEM_DEFAULT`] for memfd/shmem where the
//! host has MINOR mode there, `copy` elsewhere. benches/postcopy_placement.py
//! measures the two on shmem; the default is the one that places chunks
//! faster (pages per second, ratio of medians, same run).

use crate::backing::Backing;
use crate::error::{CoreError, CoreResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementMode {
    Copy,
    Continue,
}

/// The placement `auto` gives memfd/shmem memory: the one
/// benches/postcopy_placement.py measured faster there.
pub const SHMEM_DEFAULT: PlacementMode = PlacementMode::Continue;

/// Whether `continue` can place into memory of this backing: shmem only
/// (hugetlbfs has its own MINOR feature and huge-page granularity).
pub fn is_shmem(backing: Backing) -> bool {
    matches!(backing, Backing::Memfd | Backing::MemfdThp)
}

impl PlacementMode {
    /// Parses `auto`, `copy` or `continue` for memory of `backing` on this
    /// host (`auto` is `copy` where MINOR mode is missing).
    pub fn choose(name: &str, backing: Backing) -> CoreResult<Self> {
        let minor = name == "auto" && super::capability::capability()?.minor.available;
        Self::choose_with(name, backing, minor)
    }

    /// [`Self::choose`] on a host that has MINOR mode on shmem or not.
    pub fn choose_with(name: &str, backing: Backing, minor: bool) -> CoreResult<Self> {
        match name {
            "auto" if is_shmem(backing) && minor => Ok(SHMEM_DEFAULT),
            "auto" | "copy" => Ok(PlacementMode::Copy),
            "continue" if is_shmem(backing) => Ok(PlacementMode::Continue),
            "continue" => Err(CoreError::invalid(format!(
                "postcopy-placement continue needs memfd/shmem memory, not {}",
                backing.name()
            ))),
            other => Err(CoreError::invalid(format!(
                "unknown postcopy-placement {other:?} (expected auto, copy or continue)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PlacementMode::Copy => "copy",
            PlacementMode::Continue => "continue",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_backing_and_bad_names_are_refused() {
        let c = |name, backing| PlacementMode::choose_with(name, backing, true);
        assert_eq!(c("auto", Backing::Memfd).unwrap(), SHMEM_DEFAULT);
        assert_eq!(
            PlacementMode::choose_with("auto", Backing::Memfd, false).unwrap(),
            PlacementMode::Copy
        );
        assert_eq!(c("auto", Backing::Anon).unwrap(), PlacementMode::Copy);
        assert_eq!(c("copy", Backing::Memfd).unwrap(), PlacementMode::Copy);
        assert_eq!(
            c("continue", Backing::MemfdThp).unwrap(),
            PlacementMode::Continue
        );
        let e = c("continue", Backing::AnonThp).unwrap_err().to_string();
        assert!(e.contains("memfd/shmem") && e.contains("anon-thp"), "{e}");
        assert!(c("minor", Backing::Memfd).is_err());
    }
}
