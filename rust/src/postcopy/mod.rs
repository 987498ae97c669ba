//! The destination side of post-copy: the guest runs before all of its
//! memory has arrived, and each access to a page still missing blocks the
//! accessing thread until the page is placed.
//!
//! * [`capability`]: does this host offer userfaultfd MISSING mode on the
//!   backings mig uses, and MINOR mode on shmem;
//! * [`fault_region`]: a mapping registered in MISSING (and for `continue`,
//!   MINOR) mode, stale pages discarded, the raw placements;
//! * [`page_cache`]: `continue` writes arriving pages into the page cache;
//! * [`placement`]: `copy` (`UFFDIO_COPY`) or `continue` (MINOR mode on
//!   shmem, `UFFDIO_CONTINUE`), the `postcopy-placement` parameter;
//! * [`placer`]: atomic, at-most-once placement with an observer hook;
//! * [`fault_thread`]: reads faults, requests each missing page once;
//! * [`blocktime`], [`latency`]: fault latency and `postcopy-blocktime`;
//! * [`region`]: all of the above behind one handle (`PostcopyRegion`);
//! * [`frames`]: the frames of the two post-copy page channels;
//! * [`outgoing`]: the source serving requests first, pushing the rest;
//! * [`fault_streams`]: which fault stream the source's push follows;
//! * [`incoming`]: the destination forwarding requests, placing chunks and
//!   keeping the digest of what it placed.

pub mod blocktime;
pub mod capability;
pub mod fault_region;
pub mod fault_streams;
pub mod fault_thread;
pub mod frames;
pub mod incoming;
pub mod latency;
pub mod outgoing;
pub mod page_cache;
pub mod page_set;
pub mod phase_state;
pub mod placement;
pub mod placer;
pub mod region;
mod uapi;

pub use region::{PostcopyRegion, RegionStats};
