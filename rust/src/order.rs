//! The generation order of one channel, kept the same way by the sender
//! (before it sends) and by the receiver (before it applies).
//!
//! A page may go out in generation k and again in generation k+1 on another
//! channel. The receiver applies the k+1 copy last because of two rules,
//! which this type enforces on each channel's sequence of records:
//!
//! * pages of one generation until its sync: no page of generation k+1
//!   before sync(k), and none of generation k after it;
//! * syncs move forwards: sync(k) closes generation k and every one before.
//!
//! The receiver adds the cross-channel half, a barrier at every sync.

/// Why a record breaks the order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderError {
    /// Pages of a generation that a sync already closed.
    Closed { generation: u64, synced: u64 },
    /// Pages of a new generation while another is still open.
    Unsynced { generation: u64, open: u64 },
    /// A sync for a generation that is not after everything seen so far.
    SyncBackwards {
        generation: u64,
        open: Option<u64>,
        synced: Option<u64>,
    },
}

impl std::fmt::Display for OrderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            OrderError::Closed { generation, synced } => write!(
                f,
                "generation {generation} pages after sync({synced}): generation {generation} \
                 was already closed by sync({synced})"
            ),
            OrderError::Unsynced { generation, open } => write!(
                f,
                "generation {generation} pages before sync({open}): generation {generation} \
                 cannot follow generation {open} without sync({open})"
            ),
            OrderError::SyncBackwards {
                generation,
                open,
                synced,
            } => write!(
                f,
                "sync({generation}) goes backwards (pages of generation {open:?}, last sync \
                 {synced:?})"
            ),
        }
    }
}

/// One channel's position in the generation order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelOrder {
    /// The generation whose pages are flowing, until its sync.
    open: Option<u64>,
    /// The last sync.
    synced: Option<u64>,
}

impl ChannelOrder {
    /// Whether pages of `generation` may come next.
    pub fn check_pages(&self, generation: u64) -> Result<(), OrderError> {
        if let Some(synced) = self.synced.filter(|&s| generation <= s) {
            return Err(OrderError::Closed { generation, synced });
        }
        if let Some(open) = self.open.filter(|&o| o != generation) {
            return Err(OrderError::Unsynced { generation, open });
        }
        Ok(())
    }

    /// Records pages of `generation`, if they may come next.
    pub fn on_pages(&mut self, generation: u64) -> Result<(), OrderError> {
        self.check_pages(generation)?;
        self.open = Some(generation);
        Ok(())
    }

    /// Whether sync(`generation`) may come next.
    pub fn check_sync(&self, generation: u64) -> Result<(), OrderError> {
        if self.open.is_some_and(|o| generation < o) || self.synced.is_some_and(|s| generation <= s)
        {
            return Err(OrderError::SyncBackwards {
                generation,
                open: self.open,
                synced: self.synced,
            });
        }
        Ok(())
    }

    /// Records sync(`generation`), if it may come next: it closes every
    /// generation up to it.
    pub fn on_sync(&mut self, generation: u64) -> Result<(), OrderError> {
        self.check_sync(generation)?;
        self.synced = Some(generation);
        self.open = None;
        Ok(())
    }

    /// The generation whose pages are flowing, if any.
    pub fn open(&self) -> Option<u64> {
        self.open
    }

    /// The newest generation seen: the open one, else the last synced.
    pub fn latest(&self) -> Option<u64> {
        self.open.or(self.synced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_of_one_generation_then_its_sync_then_the_next() {
        let mut o = ChannelOrder::default();
        assert_eq!(o.latest(), None);
        o.on_pages(1).unwrap();
        o.on_pages(1).unwrap();
        assert_eq!(o.open(), Some(1));
        o.on_sync(1).unwrap();
        assert_eq!((o.open(), o.latest()), (None, Some(1)));
        o.on_pages(2).unwrap();
        assert_eq!(o.latest(), Some(2));
    }

    #[test]
    fn a_new_generation_needs_the_sync_of_the_open_one() {
        let mut o = ChannelOrder::default();
        o.on_pages(2).unwrap();
        let e = o.on_pages(3).unwrap_err();
        assert_eq!(
            e,
            OrderError::Unsynced {
                generation: 3,
                open: 2
            }
        );
        let text = e.to_string();
        assert!(text.contains("before sync(2)") && text.contains("without sync(2)"));
        assert_eq!(o.open(), Some(2), "a refused record changes nothing");
    }

    #[test]
    fn a_closed_generation_stays_closed() {
        let mut o = ChannelOrder::default();
        o.on_sync(4).unwrap();
        for g in [0, 3, 4] {
            let e = o.on_pages(g).unwrap_err();
            assert_eq!(
                e,
                OrderError::Closed {
                    generation: g,
                    synced: 4
                }
            );
            assert!(e.to_string().contains("pages after sync(4)"));
            assert!(e.to_string().contains("closed by sync(4)"));
        }
        o.on_pages(5).unwrap();
    }

    #[test]
    fn syncs_only_move_forwards() {
        let mut o = ChannelOrder::default();
        o.on_sync(0).unwrap();
        assert!(o.check_sync(0).is_err());
        o.on_pages(3).unwrap();
        let e = o.on_sync(2).unwrap_err();
        assert!(e.to_string().contains("sync(2) goes backwards"), "{e}");
        assert_eq!(o.open(), Some(3));
        // Skipping generations is allowed: sync(5) closes 3, 4 and 5.
        o.on_sync(5).unwrap();
        assert!(o.check_pages(4).is_err() && o.check_pages(6).is_ok());
    }
}
