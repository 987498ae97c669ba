//! The core's error type: plain Rust, mapped to Python exceptions in `binding`.

use std::io;

pub type CoreResult<T> = Result<T, CoreError>;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A caller passed a value outside what the operation accepts.
    #[error("{0}")]
    Invalid(String),
    /// The host lacks a kernel feature or permission the operation needs.
    #[error("{0}")]
    Unsupported(String),
    /// The peer sent something the wire format forbids.
    #[error("channel {channel}, packet {packet}: {msg}")]
    Protocol {
        channel: u32,
        packet: u64,
        msg: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl CoreError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        CoreError::Invalid(msg.into())
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        CoreError::Io {
            context: context.into(),
            source,
        }
    }
}
