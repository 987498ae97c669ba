//! Which fault stream the background push follows (`postcopy_push_order`
//! `stream`): the request thread asks, for each request, whether it is
//! answered with its chunk (and read-ahead, the push cursor moving after
//! it) or with its page alone (`PAGE`, the cursor staying).
//!
//! A fault stream is a vCPU walking its memory. The push follows one
//! stream at a time and keeps it while requests keep landing within
//! `STREAM_REACH` chunks of the cursor (each such request is a hit); a
//! request elsewhere while the followed stream is live (hit within
//! `STREAM_LIVE`) gets its page alone. Once the followed stream is quiet
//! the next request takes the cursor, and is followed if it shows a
//! stream.
//!
//! What shows a stream is decided from the requests, not only from where
//! the cursor happens to be: a request that takes the cursor is followed
//! when it is the first of the phase, lands near the cursor, or lands
//! where a recent request that took the cursor left it (a trail: a vCPU
//! walking memory faults next on the first chunk its request's read-ahead
//! did not send, or just past it if the push sent that one meanwhile).
//! Deciding from the cursor alone made the outcome depend on the order two
//! vCPUs faulted in: each request took the cursor to its own vCPU's
//! memory, so the other vCPU's next request never found it near; no
//! stream was followed and the push went to and fro until the end, or one
//! was, as the interleaving fell. With the trails, one of two (or up to
//! `TRAILS`) walking vCPUs is followed whatever their order, from its
//! second request at the latest.
//!
//! Scattered faults (a random workload) are answered by the chunk, as with
//! `faults`, unless one lands near the cursor or exactly past a trail; the
//! trails' windows are narrow (`TRAIL_REACH`) and few so that this stays
//! about as rare as landing near the cursor, and costs at most
//! `STREAM_LIVE` of pages alone. A page-alone request makes no trail: its
//! vCPU is recognised by its second request once it takes the cursor.

use std::time::{Duration, Instant};

use super::outgoing::READ_AHEAD;

/// Chunks either side of the push cursor that count as its stream.
pub const STREAM_REACH: usize = READ_AHEAD + 2;

/// How long after its last hit a stream is live: the followed one keeps
/// the push, a trail can still be continued.
pub const STREAM_LIVE: Duration = Duration::from_millis(10);

/// Chunks past where a request left the cursor that continue its trail.
pub const TRAIL_REACH: usize = 1;

/// Requests that took the cursor remembered: one fault stream each
/// recognised at once (a vCPU each), the oldest forgotten first.
pub const TRAILS: usize = 4;

/// How the request thread answers a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Its chunk and read-ahead; the push cursor moves after them.
    Chunk,
    /// Its page alone; the cursor stays, the chunk stays owed.
    PageAlone,
}

/// Where a request that took the cursor left it, and when.
#[derive(Clone, Copy, Debug)]
struct Trail {
    left: usize,
    at: Instant,
}

#[derive(Debug, Default)]
pub struct FaultStreams {
    /// The followed stream's last hit.
    followed: Option<Instant>,
    /// Whether any request came yet (the first one is followed).
    started: bool,
    trails: [Option<Trail>; TRAILS],
}

fn live(t: Instant, now: Instant) -> bool {
    now.saturating_duration_since(t) < STREAM_LIVE
}

impl FaultStreams {
    pub fn new() -> Self {
        Self::default()
    }

    /// How to answer a request for chunk `c` at `now`, the push's cursor at
    /// `cursor`.
    pub fn answer(&mut self, c: usize, cursor: usize, now: Instant) -> Answer {
        let on_cursor = c.abs_diff(cursor) <= STREAM_REACH;
        if self.followed.is_some_and(|t| live(t, now)) && !on_cursor {
            return Answer::PageAlone;
        }
        // The first request is the guest's first locality: following it at
        // once costs a scattered guest one `STREAM_LIVE` of pages alone.
        let shows_stream = !self.started || on_cursor || self.continued(c, now).is_some();
        self.started = true;
        self.followed = shows_stream.then_some(now);
        Answer::Chunk
    }

    /// The request for `c` (answered `Chunk` at `now`) left the cursor at
    /// `left`: a trail, in place of the one it continued, or of the oldest.
    pub fn took_cursor(&mut self, c: usize, left: usize, now: Instant) {
        let slot = self
            .continued(c, now)
            .or_else(|| self.trails.iter().position(Option::is_none))
            .or_else(|| (0..TRAILS).min_by_key(|&i| self.trails[i].map(|t| t.at)))
            .unwrap_or(0);
        self.trails[slot] = Some(Trail { left, at: now });
    }

    /// The live trail `c` continues, if any.
    fn continued(&self, c: usize, now: Instant) -> Option<usize> {
        self.trails.iter().position(|t| {
            t.is_some_and(|t| live(t.at, now) && (t.left..=t.left + TRAIL_REACH).contains(&c))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    /// Answers a request for `c` as the request thread does: a chunk's
    /// read-ahead sends the next `READ_AHEAD`, the cursor goes after them.
    fn request(s: &mut FaultStreams, cursor: &mut usize, c: usize, now: Instant) -> Answer {
        let a = s.answer(c, *cursor, now);
        if a == Answer::Chunk {
            *cursor = c + 1 + READ_AHEAD;
            s.took_cursor(c, *cursor, now);
        }
        a
    }

    /// Two vCPUs walking their own memory from chunks `a` and `b`,
    /// faulting in turn, after a scattered request long quiet (so neither
    /// is the first of the phase). Returns the answers to each vCPU.
    fn two_walks(a: usize, b: usize) -> [Vec<Answer>; 2] {
        let t0 = Instant::now();
        let mut s = FaultStreams::new();
        let mut cursor = 4000;
        request(&mut s, &mut cursor, 4000, t0);
        let mut answers = [Vec::new(), Vec::new()];
        let mut next = [a, b];
        for i in 0..6 {
            for who in 0..2 {
                let x = request(&mut s, &mut cursor, next[who], ms(t0, 20 + i));
                // A walk faults next past its read-ahead, or on the next
                // chunk when it got its page alone.
                next[who] += if x == Answer::Chunk {
                    1 + READ_AHEAD
                } else {
                    1
                };
                answers[who].push(x);
            }
        }
        answers
    }

    #[test]
    fn one_of_two_walks_is_followed_whichever_faults_first() {
        for (a, b) in [(0, 1000), (1000, 0)] {
            let [first, second] = two_walks(a, b);
            // Each takes the cursor once; the first to continue its own
            // trail keeps it, the other gets pages alone from then on.
            assert!(first.iter().all(|&x| x == Answer::Chunk), "{first:?}");
            assert_eq!(second[0], Answer::Chunk);
            assert!(
                second[1..].iter().all(|&x| x == Answer::PageAlone),
                "{second:?}"
            );
        }
    }

    #[test]
    fn the_first_request_of_the_phase_is_followed() {
        let t0 = Instant::now();
        let mut s = FaultStreams::new();
        let mut cursor = 0;
        // Far from the cursor, yet the first: a second walk gets pages alone.
        assert_eq!(request(&mut s, &mut cursor, 1000, t0), Answer::Chunk);
        assert_eq!(
            request(&mut s, &mut cursor, 0, ms(t0, 1)),
            Answer::PageAlone
        );
    }

    #[test]
    fn a_quiet_stream_lets_the_next_request_take_the_cursor() {
        let t0 = Instant::now();
        let mut s = FaultStreams::new();
        let mut cursor = 0;
        assert_eq!(request(&mut s, &mut cursor, 0, t0), Answer::Chunk);
        assert_eq!(
            request(&mut s, &mut cursor, 1000, ms(t0, 1)),
            Answer::PageAlone
        );
        // The followed stream's last hit was 10 ms ago: quiet. The other
        // walk takes the cursor (its page alone made no trail), the first
        // walk takes it back, and the other walk, continuing its trail,
        // keeps it: the first walk's next request gets its page alone.
        assert_eq!(
            request(&mut s, &mut cursor, 1001, ms(t0, 10)),
            Answer::Chunk
        );
        assert_eq!(request(&mut s, &mut cursor, 4, ms(t0, 11)), Answer::Chunk);
        assert_eq!(
            request(&mut s, &mut cursor, 1005, ms(t0, 12)),
            Answer::Chunk
        );
        assert_eq!(
            request(&mut s, &mut cursor, 8, ms(t0, 13)),
            Answer::PageAlone
        );
    }

    #[test]
    fn scattered_faults_take_the_cursor_each() {
        let t0 = Instant::now();
        let mut s = FaultStreams::new();
        let mut cursor = 0;
        // The first request is followed; 10 ms later its stream is quiet.
        assert_eq!(request(&mut s, &mut cursor, 0, t0), Answer::Chunk);
        for (i, c) in [300usize, 40, 900, 170, 620, 80, 450]
            .into_iter()
            .enumerate()
        {
            let a = request(&mut s, &mut cursor, c, ms(t0, 10 + i as u64));
            assert_eq!(a, Answer::Chunk, "request {i} for chunk {c}");
            assert!(
                s.followed.is_none(),
                "request {i} for chunk {c} was followed"
            );
        }
    }

    #[test]
    fn trails_are_bounded_and_the_oldest_goes_first() {
        let t0 = Instant::now();
        let mut s = FaultStreams::new();
        for i in 0..=TRAILS {
            s.took_cursor(0, 100 * (i + 1), ms(t0, i as u64));
        }
        let left: Vec<usize> = s.trails.iter().flatten().map(|t| t.left).collect();
        assert_eq!(left.len(), TRAILS);
        assert!(!left.contains(&100), "{left:?}");
    }
}
