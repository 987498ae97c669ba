//! The RAM stream: guest RAM from the dirty tracker to the channels.
//!
//! It owns what a pre-copy pass needs: the tracker (`Harvest`), the set of
//! pages known dirty and not yet sent, the cursor that walks it round-robin,
//! the generation and the send path (`PageSink`). Each call moves one chunk:
//! `iterate(budget)` takes up to a budget's worth of known pages at the
//! cursor and sends them, with work proportional to the chunk (the words it
//! walks and the pages it takes), never to the guest. Only `sync()` touches
//! the whole guest, once: the tracker's harvest is merged into the known set.
//!
//! Generations: every sync after pages went out first closes the current
//! generation with a sync barrier on every channel, so a page resent in a
//! later pass never loses against its older copy on another channel. Within
//! a generation a page goes out at most once: it leaves the known set as it
//! is sent and only a harvest brings it back.

use std::sync::Arc;

use crate::bitmap::DirtyBitmap;
use crate::error::{CoreError, CoreResult};
use crate::sender::Sender;
use crate::tracker::DirtyTracker;

/// Pages the guest wrote since the previous harvest.
pub trait Harvest: Send {
    /// The newly written pages (a whole-guest bitmap, once per sync) and,
    /// when the tracker measures it, what the harvest cost in seconds.
    fn harvest(&mut self) -> CoreResult<(DirtyBitmap, Option<f64>)>;

    /// The switchover's last harvest, the guest stopped. A tracker may skip
    /// the work that only prepares the next harvest (re-protecting what it
    /// reports) as long as a later `harvest` still reports every page
    /// written since the previous one: the guest runs on here if the
    /// switchover is rolled back. By default, a plain harvest.
    fn harvest_final(&mut self) -> CoreResult<(DirtyBitmap, Option<f64>)> {
        self.harvest()
    }

    /// No more harvests: release the tracking.
    fn close(&mut self);
}

/// Where the pages go: the channels, or anything that stands for them.
pub trait PageSink: Send {
    /// Sends `pages` (indices, each once per generation) in `generation`;
    /// returns the wire bytes.
    fn send(&mut self, pages: &[u64], generation: u64) -> CoreResult<u64>;

    /// The barrier that closes `generation` on every channel.
    fn sync(&mut self, generation: u64) -> CoreResult<u64>;
}

impl Harvest for Arc<DirtyTracker> {
    fn harvest(&mut self) -> CoreResult<(DirtyBitmap, Option<f64>)> {
        let new = self.sync()?;
        Ok((new, Some(self.last_sync().as_secs_f64())))
    }

    fn harvest_final(&mut self) -> CoreResult<(DirtyBitmap, Option<f64>)> {
        let new = self.sync_final()?;
        Ok((new, Some(self.last_sync().as_secs_f64())))
    }

    fn close(&mut self) {
        DirtyTracker::close(self);
    }
}

impl PageSink for Arc<Sender> {
    fn send(&mut self, pages: &[u64], generation: u64) -> CoreResult<u64> {
        self.send_page_list(pages, generation)
    }

    fn sync(&mut self, generation: u64) -> CoreResult<u64> {
        Sender::sync(self, generation)
    }
}

/// Pages per `send` call of the final pass: bounds the page list in memory.
const FINAL_CHUNK_PAGES: usize = 1 << 16;

/// The least an `iterate` call moves, whatever its byte budget.
pub const MIN_ITERATE_PAGES: usize = 64;

/// `iterate` spans end on multiples of this many pages (one bitmap word).
/// In a dense pass the sender's packets then start on them too, so each
/// record holds whole digest chunks, which the receiver hashes as they land
/// (`ChunkDigest::rehash_covered`, which also hashes the blocks of a chunk
/// split between two records, and rehashes the chunk's block hashes twice).
pub const SPAN_ALIGN: usize = 64;

/// What one harvest found.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SyncReport {
    pub new_pages: u64,
    /// The tracker's own measure of the harvest, else its wall time here.
    pub seconds: f64,
}

/// The outcome of `complete`.
#[derive(Debug)]
pub enum Completion {
    /// Every known page went out; the wire bytes.
    Sent(u64),
    /// The known pages exceed the budget: nothing was sent, every page is
    /// still known.
    OverBudget { remaining: u64 },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamStreamStats {
    pub pages_sent: u64,
    /// Wire bytes of pages.
    pub bytes_sent: u64,
    /// Wire bytes of pages and sync barriers.
    pub wire_bytes: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub final_pages: u64,
    pub sync_count: u64,
    pub last_sync_new_pages: u64,
}

pub struct RamStream {
    harvest: Box<dyn Harvest>,
    sink: Option<Box<dyn PageSink>>,
    known: DirtyBitmap,
    known_count: usize,
    cursor: usize,
    generation: u64,
    sent_in_generation: u64,
    page_size: u64,
    stats: RamStreamStats,
    chunk: Vec<u64>,
}

impl RamStream {
    pub fn new(num_pages: usize, page_size: u64, harvest: Box<dyn Harvest>) -> Self {
        RamStream {
            harvest,
            sink: None,
            known: DirtyBitmap::new(num_pages),
            known_count: 0,
            cursor: 0,
            generation: 0,
            sent_in_generation: 0,
            page_size,
            stats: RamStreamStats::default(),
            chunk: Vec::new(),
        }
    }

    /// Connects the send path; everything becomes known dirty.
    pub fn start(&mut self, sink: Box<dyn PageSink>) {
        self.sink = Some(sink);
        self.known = DirtyBitmap::full(self.known.len());
        self.known_count = self.known.len();
        self.cursor = 0;
    }

    pub fn num_pages(&self) -> usize {
        self.known.len()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn stats(&self) -> RamStreamStats {
        self.stats
    }

    /// Bytes of known dirty pages not yet sent (no harvest).
    pub fn pending(&self) -> u64 {
        self.known_count as u64 * self.page_size
    }

    pub fn pending_pages(&self) -> usize {
        self.known_count
    }

    /// The page the next chunk starts from.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    fn sink(&mut self) -> CoreResult<&mut Box<dyn PageSink>> {
        self.sink
            .as_mut()
            .ok_or_else(|| CoreError::invalid("the RAM stream has no link yet: call start first"))
    }

    /// Closes the generation if pages went out in it, then merges the
    /// tracker's harvest into the known set. Returns the new pages.
    pub fn sync(&mut self) -> CoreResult<(DirtyBitmap, SyncReport)> {
        self.sync_with(false)
    }

    /// `sync`, with the tracker's final harvest when `last` (guest stopped).
    fn sync_with(&mut self, last: bool) -> CoreResult<(DirtyBitmap, SyncReport)> {
        if self.sent_in_generation > 0 {
            let g = self.generation;
            let bytes = self.sink()?.sync(g)?;
            self.stats.wire_bytes += bytes;
            self.generation += 1;
            self.sent_in_generation = 0;
        }
        let t0 = std::time::Instant::now();
        let (new, seconds) = if last {
            self.harvest.harvest_final()?
        } else {
            self.harvest.harvest()?
        };
        let seconds = seconds.unwrap_or_else(|| t0.elapsed().as_secs_f64());
        self.known.or_assign(&new)?;
        self.known_count = self.known.count();
        let report = SyncReport {
            new_pages: new.count() as u64,
            seconds,
        };
        self.stats.sync_count += 1;
        self.stats.last_sync_new_pages = report.new_pages;
        Ok((new, report))
    }

    /// Takes up to `want` known pages from the cursor on, wrapping once.
    fn take_chunk(&mut self, want: usize) {
        self.chunk.clear();
        let n = self.known.len();
        let start = self.cursor;
        self.cursor = self.known.take_from(start, want, &mut self.chunk);
        if self.chunk.len() < want && start > 0 {
            let left = want - self.chunk.len();
            let mut tail = std::mem::take(&mut self.chunk);
            self.cursor = self.known.take_from(0, left, &mut tail);
            self.chunk = tail;
        }
        if self.cursor >= n {
            self.cursor = 0;
        }
        self.known_count -= self.chunk.len();
    }

    fn send_chunk(&mut self) -> CoreResult<u64> {
        if self.chunk.is_empty() {
            return Ok(0);
        }
        let chunk = std::mem::take(&mut self.chunk);
        let g = self.generation;
        let result = self.sink().and_then(|s| s.send(&chunk, g));
        let count = chunk.len() as u64;
        if result.is_err() {
            // Not sent: the pages stay known, nothing is lost.
            for &p in &chunk {
                self.known.set(p as usize);
            }
            self.known_count += chunk.len();
        }
        self.chunk = chunk;
        let bytes = result?;
        self.sent_in_generation += count;
        self.stats.pages_sent += count;
        self.stats.bytes_sent += bytes;
        self.stats.wire_bytes += bytes;
        Ok(bytes)
    }

    /// Sends about `budget` bytes of known pages (at least
    /// `MIN_ITERATE_PAGES`) from the cursor on; returns the wire bytes.
    ///
    /// It walks spans whose expected known count is what is left of the
    /// budget's pages (from the known set's density when the call began)
    /// and sends each span whole, until the budget is reached: a pass
    /// crosses memory in the same steps whatever the density, and the
    /// loop's pass and bandwidth figures keep the granularity its policies
    /// were chosen with. A span that falls short of the budget is followed
    /// by one sized for the shortfall, not by another whole budget's: a
    /// call then lasts about its budget however the pages happen to lie,
    /// so where the loop decides next (between calls) is not a matter of
    /// whether the first span held one page fewer than expected.
    pub fn iterate(&mut self, budget: u64) -> CoreResult<u64> {
        if self.known_count == 0 {
            return Ok(0);
        }
        let want = MIN_ITERATE_PAGES.max((budget / self.page_size) as usize);
        let (n, known) = (self.known.len(), self.known_count);
        let span_for = |left: usize| n.min(left.max(left.saturating_mul(n) / known));
        let (mut pages, mut sent) = (0, 0);
        while pages < want && self.known_count > 0 {
            self.take_span(span_for(want - pages));
            pages += self.chunk.len();
            sent += self.send_chunk()?;
        }
        self.stats.precopy_bytes += sent;
        Ok(sent)
    }

    /// Takes every known page in `span` pages from the cursor on, up to a
    /// multiple of `SPAN_ALIGN` (or the end of memory, where the cursor
    /// wraps).
    fn take_span(&mut self, span: usize) {
        self.chunk.clear();
        let n = self.known.len();
        let start = self.cursor;
        let end = (start + span.max(1)).next_multiple_of(SPAN_ALIGN);
        let len = end.min(n) - start;
        self.known.take_range(start, len, &mut self.chunk);
        self.cursor = (start + len) % n;
        self.known_count -= self.chunk.len();
    }

    /// The guest is stopped: a final harvest, then every known page and the
    /// closing barrier. With a budget, the size is checked before anything
    /// is sent; over it, nothing is lost: every page stays known.
    pub fn complete(&mut self, budget: Option<u64>) -> CoreResult<(Completion, SyncReport)> {
        let (_, report) = self.sync_with(true)?;
        let remaining = self.pending();
        if budget.is_some_and(|b| remaining > b) {
            return Ok((Completion::OverBudget { remaining }, report));
        }
        self.stats.final_pages = self.known_count as u64;
        self.cursor = 0;
        let mut sent = 0;
        while self.known_count > 0 {
            self.take_chunk(FINAL_CHUNK_PAGES);
            sent += self.send_chunk()?;
        }
        let g = self.generation;
        let bytes = self.sink()?.sync(g)?;
        // The barrier closed `g` on every channel. A switchover can still be
        // abandoned after this (the destination refuses, or `go` is lost
        // before the commit point) and precopy go on: its pages must start a
        // new generation, or the channels refuse them as sent after sync(g).
        self.generation += 1;
        self.sent_in_generation = 0;
        self.stats.wire_bytes += bytes;
        self.stats.downtime_bytes += sent;
        Ok((Completion::Sent(sent), report))
    }

    /// Post-copy's hand-over, the guest stopped: a final harvest, then the
    /// whole known set is taken out (the pages the destination does not
    /// hold current) instead of being sent. Ends the last generation with
    /// its barrier so every page already sent lands before the end records.
    pub fn take_known(&mut self) -> CoreResult<(DirtyBitmap, SyncReport)> {
        let (_, report) = self.sync_with(true)?;
        self.stats.final_pages = self.known_count as u64;
        let taken = self.known.take();
        self.known_count = 0;
        self.cursor = 0;
        let g = self.generation;
        let bytes = self.sink()?.sync(g)?;
        self.stats.wire_bytes += bytes;
        Ok((taken, report))
    }

    /// No more syncs: releases the tracker.
    pub fn close(&mut self) {
        self.harvest.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A tracker that hands out pages the test marks as written.
    struct Marks(Arc<Mutex<DirtyBitmap>>);

    impl Harvest for Marks {
        fn harvest(&mut self) -> CoreResult<(DirtyBitmap, Option<f64>)> {
            Ok((self.0.lock().unwrap().take(), None))
        }
        fn close(&mut self) {}
    }

    /// Records every call: (generation, pages) per send, barriers apart,
    /// and every call in order through the channel's own order checks.
    #[derive(Default)]
    struct Log {
        sends: Vec<(u64, Vec<u64>)>,
        syncs: Vec<u64>,
        order: crate::order::ChannelOrder,
        order_errors: Vec<String>,
    }

    struct Recorder(Arc<Mutex<Log>>);

    impl PageSink for Recorder {
        fn send(&mut self, pages: &[u64], generation: u64) -> CoreResult<u64> {
            let mut log = self.0.lock().unwrap();
            if let Err(e) = log.order.on_pages(generation) {
                log.order_errors.push(e.to_string());
            }
            log.sends.push((generation, pages.to_vec()));
            Ok(pages.len() as u64 * 4096)
        }
        fn sync(&mut self, generation: u64) -> CoreResult<u64> {
            let mut log = self.0.lock().unwrap();
            if let Err(e) = log.order.on_sync(generation) {
                log.order_errors.push(e.to_string());
            }
            log.syncs.push(generation);
            Ok(48)
        }
    }

    fn stream(pages: usize) -> (RamStream, Arc<Mutex<DirtyBitmap>>, Arc<Mutex<Log>>) {
        let marks = Arc::new(Mutex::new(DirtyBitmap::new(pages)));
        let log = Arc::new(Mutex::new(Log::default()));
        let mut s = RamStream::new(pages, 4096, Box::new(Marks(marks.clone())));
        s.sync().unwrap();
        s.start(Box::new(Recorder(log.clone())));
        (s, marks, log)
    }

    #[test]
    fn first_pass_sends_every_page_once_in_chunks() {
        let (mut s, _, log) = stream(1000);
        let mut n = 0;
        while s.iterate(100 * 4096).unwrap() > 0 {
            n += 1;
        }
        // Each call sends at least the budget while pages are left; the span
        // grows as the known set thins (1000 / 872 / ... pages known) and
        // ends on a multiple of SPAN_ALIGN.
        assert_eq!(n, 6);
        let log = log.lock().unwrap();
        let all: Vec<u64> = log.sends.iter().flat_map(|(_, p)| p.clone()).collect();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        let sizes: Vec<usize> = log.sends.iter().map(|(_, p)| p.len()).collect();
        assert_eq!(sizes, [128, 128, 192, 192, 320, 40]);
        assert!(log.sends.iter().all(|(g, _)| *g == 0));
        assert_eq!(s.pending(), 0);
    }

    /// A chunk walks only the words between the cursor and its last page
    /// (`take_from` is the only per-chunk walk, and the cursor records where
    /// it stopped): on a 2^26-page guest, a dense chunk of 64 pages moves the
    /// cursor by 64 pages, one word.
    #[test]
    fn chunk_work_follows_the_chunk_not_the_guest() {
        let pages = 1 << 26;
        let (mut s, marks, log) = stream(pages);
        // Drain the initial pass.
        s.complete(None).unwrap();
        log.lock().unwrap().sends.clear();
        for p in [5u64, 1 << 20, (1 << 26) - 1] {
            marks.lock().unwrap().set(p as usize);
        }
        s.sync().unwrap();
        assert_eq!(s.iterate(1).unwrap(), 3 * 4096);
        assert_eq!(
            log.lock().unwrap().sends[0].1,
            vec![5, 1 << 20, (1 << 26) - 1]
        );
        // The cursor moved past the first chunk: a one-page budget on a
        // dense set takes the next MIN_ITERATE_PAGES pages only.
        marks.lock().unwrap().set_range(0, pages).unwrap();
        s.sync().unwrap();
        let (before, from) = (s.pending_pages(), s.cursor());
        s.iterate(1).unwrap();
        assert_eq!(before - s.pending_pages(), MIN_ITERATE_PAGES);
        assert_eq!(s.cursor() - from, MIN_ITERATE_PAGES);
    }

    /// A sparse known set whose first span holds one page fewer than the
    /// budget: the call tops it up with a span sized for that page, and
    /// does not take a second whole budget's span (all 200 pages here).
    #[test]
    fn a_span_that_falls_short_is_topped_up_not_doubled() {
        let (mut s, marks, log) = stream(4096);
        s.complete(None).unwrap();
        log.lock().unwrap().sends.clear();
        {
            let mut m = marks.lock().unwrap();
            (0..99).for_each(|i| m.set(i * 20));
            (0..101).for_each(|i| m.set(2048 + i * 20));
        }
        s.sync().unwrap();
        // 100 pages of budget over 200 known in 4096: a first span of
        // 2048 pages, which holds 99 of them.
        let sent = s.iterate(100 * 4096).unwrap() / 4096;
        let log = log.lock().unwrap();
        assert_eq!(log.sends[0].1.len(), 99);
        // The top-up: 20 pages' span for one page, rounded to SPAN_ALIGN.
        assert_eq!(log.sends.len(), 2);
        assert_eq!(log.sends[1].1, [2048, 2068, 2088, 2108]);
        assert_eq!(sent, 103);
        assert_eq!(s.pending_pages(), 97);
    }

    #[test]
    fn a_resent_page_gets_a_new_generation_after_a_barrier() {
        let (mut s, marks, log) = stream(256);
        s.iterate(128 * 4096).unwrap();
        marks.lock().unwrap().set(3);
        s.sync().unwrap();
        assert_eq!(s.generation(), 1);
        s.complete(None).unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.syncs, vec![0, 1]);
        let gen1: Vec<u64> = log
            .sends
            .iter()
            .filter(|(g, _)| *g == 1)
            .flat_map(|(_, p)| p.clone())
            .collect();
        let mut expect: Vec<u64> = (128..256).collect();
        expect.insert(0, 3);
        assert_eq!(gen1, expect);
        // Within a generation no page repeats.
        for g in 0..2 {
            let mut seen = std::collections::HashSet::new();
            for (_, p) in log.sends.iter().filter(|(x, _)| *x == g) {
                assert!(p.iter().all(|x| seen.insert(*x)));
            }
        }
    }

    #[test]
    fn a_sync_with_nothing_sent_keeps_the_generation() {
        let (mut s, _, log) = stream(64);
        s.sync().unwrap();
        s.sync().unwrap();
        assert_eq!(s.generation(), 0);
        assert!(log.lock().unwrap().syncs.is_empty());
    }

    #[test]
    fn complete_over_budget_leaves_every_page_known() {
        let (mut s, marks, log) = stream(1024);
        s.iterate(512 * 4096).unwrap();
        marks.lock().unwrap().set_range(0, 10).unwrap();
        let (outcome, report) = s.complete(Some(4096)).unwrap();
        assert_eq!(report.new_pages, 10);
        match outcome {
            Completion::OverBudget { remaining } => assert_eq!(remaining, (512 + 10) * 4096),
            Completion::Sent(_) => panic!("sent over budget"),
        }
        assert_eq!(s.pending(), (512 + 10) * 4096);
        let sent_before = log.lock().unwrap().sends.len();
        // The guest ran on; the next attempt fits and sends everything.
        let (outcome, _) = s.complete(None).unwrap();
        assert!(matches!(outcome, Completion::Sent(b) if b == 522 * 4096));
        assert_eq!(s.pending(), 0);
        let log = log.lock().unwrap();
        let last: Vec<u64> = log.sends[sent_before..]
            .iter()
            .flat_map(|(_, p)| p.clone())
            .collect();
        let mut expect: Vec<u64> = (0..10).chain(512..1024).collect();
        expect.sort();
        assert_eq!(last, expect);
        assert_eq!(s.stats().final_pages, 522);
    }

    #[test]
    fn precopy_after_an_abandoned_switchover_keeps_the_channel_order() {
        let (mut s, marks, log) = stream(256);
        s.iterate(128 * 4096).unwrap();
        assert!(matches!(s.complete(None).unwrap().0, Completion::Sent(_)));
        // The switchover was abandoned; the guest runs on and dirties pages.
        marks.lock().unwrap().set_range(0, 4).unwrap();
        s.sync().unwrap();
        s.iterate(4 * 4096).unwrap();
        marks.lock().unwrap().set(9);
        assert!(matches!(s.complete(None).unwrap().0, Completion::Sent(_)));
        let log = log.lock().unwrap();
        assert_eq!(log.order_errors, Vec::<String>::new());
        assert!(log.syncs.windows(2).all(|w| w[0] < w[1]), "{:?}", log.syncs);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn the_cursor_wraps_to_pages_behind_it() {
        let (mut s, marks, log) = stream(256);
        s.iterate(192 * 4096).unwrap();
        marks.lock().unwrap().set(7);
        s.sync().unwrap();
        // 64 pages ahead of the cursor, then page 7 behind it.
        s.iterate(100 * 4096).unwrap();
        let log = log.lock().unwrap();
        let n = log.sends.len();
        assert_eq!(log.sends[n - 2].1, (192..256).collect::<Vec<_>>());
        assert_eq!(log.sends[n - 1].1, [7]);
        assert_eq!(s.pending(), 0);
    }

    /// Counts which harvest each call used: (plain, final).
    struct Counting(Arc<Mutex<(u32, u32)>>);

    impl Harvest for Counting {
        fn harvest(&mut self) -> CoreResult<(DirtyBitmap, Option<f64>)> {
            self.0.lock().unwrap().0 += 1;
            Ok((DirtyBitmap::new(128), None))
        }
        fn harvest_final(&mut self) -> CoreResult<(DirtyBitmap, Option<f64>)> {
            self.0.lock().unwrap().1 += 1;
            Ok((DirtyBitmap::new(128), None))
        }
        fn close(&mut self) {}
    }

    #[test]
    fn only_the_stopped_guest_harvests_are_final() {
        let calls = Arc::new(Mutex::new((0, 0)));
        let log = Arc::new(Mutex::new(Log::default()));
        let mut s = RamStream::new(128, 4096, Box::new(Counting(calls.clone())));
        s.sync().unwrap();
        s.start(Box::new(Recorder(log.clone())));
        s.iterate(4096).unwrap();
        s.sync().unwrap();
        assert_eq!(*calls.lock().unwrap(), (2, 0));
        // Over budget: the final harvest happened, the guest runs on.
        assert!(matches!(
            s.complete(Some(0)).unwrap().0,
            Completion::OverBudget { .. }
        ));
        s.sync().unwrap();
        s.complete(None).unwrap();
        s.take_known().unwrap();
        assert_eq!(*calls.lock().unwrap(), (3, 3));
    }

    #[test]
    fn iterate_before_start_is_an_error_and_loses_nothing() {
        let marks = Arc::new(Mutex::new(DirtyBitmap::new(64)));
        let mut s = RamStream::new(64, 4096, Box::new(Marks(marks.clone())));
        marks.lock().unwrap().set(1);
        s.sync().unwrap();
        assert!(s.iterate(4096).is_err());
        assert_eq!(
            s.pending(),
            4096,
            "the page that was not sent is still known"
        );
    }
}
