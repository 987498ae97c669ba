//! The control port of a stream that has no peer (a `file:` snapshot): its
//! control messages are records of the stream itself, queued here by the
//! channel that reads them (`StreamRole::Log`), and nothing can be answered.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{lock, ControlPort, POLL};
use crate::error::{CoreError, CoreResult};

/// Control messages read from the stream, oldest first.
#[derive(Default)]
pub struct NoPeer {
    queue: Mutex<VecDeque<Vec<u8>>>,
    arrived: Condvar,
}

impl NoPeer {
    /// Queues a control message the stream carried.
    pub fn push(&self, message: Vec<u8>) {
        lock(&self.queue).push_back(message);
        self.arrived.notify_all();
    }
}

impl ControlPort for NoPeer {
    fn send(&self, _payload: &[u8]) -> CoreResult<()> {
        Err(CoreError::Unsupported(
            "a file: snapshot is one-way; there is no source to answer".into(),
        ))
    }

    fn recv(&self, timeout: Duration) -> CoreResult<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut q = lock(&self.queue);
        loop {
            if let Some(m) = q.pop_front() {
                return Ok(Some(m));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            q = self
                .arrived
                .wait_timeout(q, left.min(POLL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_back_in_order_and_nothing_can_be_sent() {
        let port = NoPeer::default();
        port.push(b"one".to_vec());
        port.push(b"two".to_vec());
        let wait = Duration::from_millis(10);
        assert_eq!(port.recv(wait).unwrap(), Some(b"one".to_vec()));
        assert_eq!(port.recv(wait).unwrap(), Some(b"two".to_vec()));
        let started = Instant::now();
        assert_eq!(port.recv(wait).unwrap(), None);
        assert!(started.elapsed() >= wait);
        let err = port.send(b"ready").unwrap_err().to_string();
        assert!(err.contains("one-way"), "{err}");
    }
}
