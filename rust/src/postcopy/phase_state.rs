//! Where one side's post-copy phase stands, and waiting for it to change:
//! a state behind a lock with a condition variable, whose final state no
//! later report overwrites (an error on a channel closing after the end is
//! no news).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub struct PhaseState<S> {
    state: Mutex<S>,
    changed: Condvar,
    is_final: fn(&S) -> bool,
}

impl<S: Clone + PartialEq> PhaseState<S> {
    pub fn new(initial: S, is_final: fn(&S) -> bool) -> Self {
        PhaseState {
            state: Mutex::new(initial),
            changed: Condvar::new(),
            is_final,
        }
    }

    fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self) -> S {
        self.lock().clone()
    }

    pub fn is_final(&self) -> bool {
        (self.is_final)(&self.lock())
    }

    /// Moves to `s` unless the phase already ended; wakes the waiters.
    pub fn set(&self, s: S) {
        let mut st = self.lock();
        if !(self.is_final)(&st) {
            *st = s;
        }
        self.changed.notify_all();
    }

    /// Waits up to `timeout` while the state is `busy`; returns the state.
    pub fn wait_while(&self, busy: &S, timeout: Duration) -> S {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while *st == *busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.clone()
    }
}
