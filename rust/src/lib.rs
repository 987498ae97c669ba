//! mig: the Rust core of a pre-copy live-migration engine.
//!
//! Data flows one way: guest → [`tracker`] → [`bitmap`] → [`sender`] →
//! [`transport`] channels → [`receiver`] → destination [`memory`].
//! Only [`binding`] knows about Python; everything else is plain Rust and is
//! tested with `cargo test`.

pub mod backing;
pub mod bitmap;
pub mod chunk_digest;
pub mod error;
pub mod hole_filler;
pub mod image_load;
pub mod memory;
pub mod order;
pub mod pagemap;
pub mod postcopy;
pub mod ram_stream;
pub mod receiver;
pub mod sender;
pub mod tracker;
pub mod transport;
pub mod wire;
pub mod workload;
pub mod written_scan;
pub mod zero_copy;

mod binding;

pub use bitmap::DirtyBitmap;
pub use error::{CoreError, CoreResult};
pub use memory::GuestMemory;
