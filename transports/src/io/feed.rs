//! A feed: frames kept once and written by many connections, each from
//! where it stands in it.
//!
//! Membership events go to every member: pushed into every connection's
//! queue, the joins of N nodes cost N² pushes, each a lock, a copy and a
//! wake, all under the lock that orders membership, and every connection
//! holds its own copy of what it has not written yet. A [`Feed`] keeps each
//! frame once, encoded. A queue that follows it
//! ([`OutQueue::follow`](super::OutQueue::follow)) has a position in it,
//! and its writer takes what lies beyond that position in batches; a writer
//! with nothing to write waits on the feed too. The feed's frames and the
//! queue's control frames go in the order they came: a control frame
//! queued after an append carries a mark, and the feed's frames before the
//! mark are written first. An append wakes only the writers that wait.
//!
//! An append wakes the waiting writers at once if none was woken within
//! the linger (see [`Feed::run_linger`]); within it, once the linger is
//! over: a burst of appends (thousands of joins) wakes each writer at most
//! once per linger, and each write carries what came meanwhile, instead of
//! one write per append to every member. The linger grows with the
//! followers ([`LINGER_PER_FOLLOWER`], at most [`MAX_LINGER`]), which
//! bounds the writes a burst causes to about one per
//! [`LINGER_PER_FOLLOWER`], whatever the cluster's size.
//!
//! The feed holds what some follower has not taken yet, and no more, up to
//! a bound in bytes. A follower that falls further behind than the bound
//! loses its place: its queue is closed, and the peer, reconnecting, is
//! told the whole state again. It is counted ([`Feed::lagged`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{FrameError, LENGTH_PREFIX_BYTES, MAX_HEADER_BYTES};
use crate::protocol::Header;

/// Bytes of frames a writer takes from a feed at a time, at most (at least
/// one frame): a follower far behind catches up in batches of this size,
/// each one buffer.
pub const FEED_TAKE_BYTES: usize = 64 * 1024;

/// How much the linger grows per follower (see the module's docs): with a
/// thousand members, a burst wakes each writer at most every 100 ms, and a
/// burst costs the server about 10,000 writes a second whatever the
/// cluster's size (and each member as many reads and wakes). At 1,000
/// nodes starting at once, 100 µs converged in a median 952 ms against
/// 1,137 ms at 50 µs and 1,278 ms at 20 µs (interleaved runs of the scale
/// bench); 200 µs was no better than 100.
pub const LINGER_PER_FOLLOWER: Duration = Duration::from_micros(100);

/// The longest linger: a membership event waits at most this long.
pub const MAX_LINGER: Duration = Duration::from_millis(500);

/// Frames kept once for many connections (see the module's docs).
#[derive(Debug)]
pub struct Feed {
    state: Mutex<FeedState>,
    /// Told when a wake is due at the end of a linger.
    due: Notify,
    /// Whether [`Feed::run_linger`] runs: without it, appends wake at once.
    lingers: AtomicBool,
    /// The sequence number of the next frame appended, readable without
    /// the lock (a writer's look at whether it is behind).
    head: AtomicU64,
    /// Bytes of frames kept, at most.
    max_bytes: usize,
    /// Followers that lost their place.
    lagged: AtomicU64,
}

#[derive(Debug, Default)]
struct FeedState {
    /// The sequence number of `frames[0]`.
    base: u64,
    /// The frames kept, length prefix included.
    frames: VecDeque<Bytes>,
    /// Their bytes.
    bytes: usize,
    /// Followers' positions: how many stand at each.
    positions: BTreeMap<u64, usize>,
    /// Writers waiting for a frame beyond their position, by follower.
    waiting: HashMap<u64, Waker>,
    next_follower: u64,
    /// Followers.
    followers: usize,
    /// When waiting writers were last woken.
    last_wake: Option<Instant>,
    /// When they are to be woken next, if frames came within the linger.
    wake_due: Option<Instant>,
}

impl Feed {
    /// An empty feed that keeps at most `max_bytes` of frames (at least
    /// one frame) for followers that are behind.
    pub fn new(max_bytes: usize) -> Arc<Feed> {
        Arc::new(Feed {
            state: Mutex::new(FeedState::default()),
            due: Notify::new(),
            lingers: AtomicBool::new(false),
            head: AtomicU64::new(0),
            max_bytes,
            lagged: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `header` (a frame without a body), encoded once; its
    /// sequence number.
    ///
    /// # Errors
    ///
    /// The header cannot be encoded, or is over [`MAX_HEADER_BYTES`].
    pub fn append(&self, header: &Header) -> Result<u64, FrameError> {
        let encoded = postcard::to_allocvec(header).map_err(FrameError::Header)?;
        self.append_encoded(&encoded)
    }

    /// Appends a frame whose header is already encoded (`header`, without
    /// its length prefix; no body); its sequence number.
    ///
    /// # Errors
    ///
    /// [`FrameError::HeaderTooLarge`] over [`MAX_HEADER_BYTES`].
    pub fn append_encoded(&self, header: &[u8]) -> Result<u64, FrameError> {
        if header.len() > MAX_HEADER_BYTES {
            return Err(FrameError::HeaderTooLarge { size: header.len() });
        }
        let mut frame = BytesMut::with_capacity(LENGTH_PREFIX_BYTES + header.len());
        frame.put_u32(header.len() as u32);
        frame.extend_from_slice(header);
        let frame = frame.freeze();
        let (seq, waiting) = {
            let mut state = self.lock();
            let seq = state.base + state.frames.len() as u64;
            if state.positions.is_empty() {
                // Nobody to keep it for: followers from now on start after
                // it.
                state.base = seq + 1;
            } else {
                state.bytes += frame.len();
                state.frames.push_back(frame);
                while state.bytes > self.max_bytes && state.frames.len() > 1 {
                    // Followers still before it lose their place.
                    if let Some(old) = state.frames.pop_front() {
                        state.bytes -= old.len();
                        state.base += 1;
                    }
                }
            }
            self.head.store(seq + 1, Ordering::Release);
            let now = Instant::now();
            let linger = self.linger(state.followers);
            let within = state
                .last_wake
                .is_some_and(|last| now.saturating_duration_since(last) < linger);
            if !within || !self.lingers.load(Ordering::Acquire) {
                (seq, state.wake_all(now))
            } else {
                if state.wake_due.is_none() {
                    state.wake_due = state.last_wake.map(|last| last + linger);
                    self.due.notify_one();
                }
                (seq, Vec::new())
            }
        };
        for waker in waiting {
            waker.wake();
        }
        Ok(seq)
    }

    /// The linger with `followers` (see the module's docs).
    fn linger(&self, followers: usize) -> Duration {
        LINGER_PER_FOLLOWER
            .saturating_mul(u32::try_from(followers).unwrap_or(u32::MAX))
            .min(MAX_LINGER)
    }

    /// Wakes the waiting writers at the end of each linger in which frames
    /// came (see the module's docs); run it (spawned) for as long as the
    /// feed is used. Until it runs, and without it, appends wake at once.
    pub async fn run_linger(self: Arc<Self>) {
        /// Once it stops (dropped): appends wake at once again, and what
        /// waits for a linger's end is woken now.
        struct Stopped<'a>(&'a Feed);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                self.0.lingers.store(false, Ordering::Release);
                let waiting = self.0.lock().wake_all(Instant::now());
                for waker in waiting {
                    waker.wake();
                }
            }
        }
        self.lingers.store(true, Ordering::Release);
        let _stopped = Stopped(&self);
        loop {
            let due = self.due.notified();
            let when = self.lock().wake_due;
            match when {
                Some(when) => {
                    tokio::time::sleep_until(when).await;
                    let waiting = {
                        let mut state = self.lock();
                        match state.wake_due {
                            Some(due) if due <= Instant::now() => state.wake_all(Instant::now()),
                            _ => Vec::new(),
                        }
                    };
                    for waker in waiting {
                        waker.wake();
                    }
                }
                None => due.await,
            }
        }
    }

    /// The sequence number the next frame appended gets: a follower that
    /// starts there gets every frame appended from now on.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Followers that lost their place (fell more than the bound behind).
    pub fn lagged(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }

    /// Frames and bytes kept for followers that are behind.
    pub fn held(&self) -> (usize, usize) {
        let state = self.lock();
        (state.frames.len(), state.bytes)
    }

    /// Followers.
    pub fn followers(&self) -> usize {
        self.lock().followers
    }
}

impl FeedState {
    /// The waiting writers, to be woken once the lock is released; the
    /// linger starts again.
    fn wake_all(&mut self, now: Instant) -> Vec<Waker> {
        self.last_wake = Some(now);
        self.wake_due = None;
        self.waiting.drain().map(|(_, w)| w).collect()
    }

    /// Moves a follower from `from` to `to`.
    fn reposition(&mut self, from: u64, to: u64) {
        *self.positions.entry(to).or_default() += 1;
        self.leave(from);
    }

    /// A follower at `at` goes; frames nobody needs any more are dropped.
    fn leave(&mut self, at: u64) {
        if let Some(n) = self.positions.get_mut(&at) {
            *n -= 1;
            if *n == 0 {
                self.positions.remove(&at);
            }
        }
        let keep_from = self
            .positions
            .keys()
            .next()
            .copied()
            .unwrap_or(self.base + self.frames.len() as u64);
        while self.base < keep_from {
            let Some(old) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= old.len();
            self.base += 1;
        }
    }
}

/// A follower lost its place: frames it had not taken were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("fell behind the membership feed by more than its bound ({missed} frames dropped before they were written)")]
pub(super) struct Lagged {
    /// Frames it missed.
    pub(super) missed: u64,
}

/// A queue's place in a feed.
#[derive(Debug)]
pub(super) struct Follower {
    feed: Arc<Feed>,
    id: u64,
    position: u64,
}

impl Follower {
    /// Follows `feed` from `from` on (at most its head).
    pub(super) fn new(feed: &Arc<Feed>, from: u64) -> Follower {
        let mut state = feed.lock();
        let head = state.base + state.frames.len() as u64;
        let position = from.min(head).max(state.base);
        let id = state.next_follower;
        state.next_follower += 1;
        state.followers += 1;
        *state.positions.entry(position).or_default() += 1;
        Follower {
            feed: feed.clone(),
            id,
            position,
        }
    }

    /// Its position: the sequence number of the next frame it takes.
    pub(super) fn position(&self) -> u64 {
        self.position
    }

    /// Takes the frames beyond its position, up to about `max_bytes` (at
    /// least one), as one buffer, and how many; `None` if there are none.
    ///
    /// # Errors
    ///
    /// [`Lagged`] if frames it had not taken were dropped: it cannot go
    /// on (and has left the feed).
    #[cfg(test)]
    pub(super) fn take(&mut self, max_bytes: usize) -> Result<Option<(Bytes, usize)>, Lagged> {
        self.take_before(max_bytes, u64::MAX)
    }

    /// [`Follower::take`] of the frames before sequence number `end` only.
    ///
    /// # Errors
    ///
    /// As [`Follower::take`].
    pub(super) fn take_before(
        &mut self,
        max_bytes: usize,
        end: u64,
    ) -> Result<Option<(Bytes, usize)>, Lagged> {
        if self.feed.head().min(end) <= self.position {
            return Ok(None);
        }
        let mut state = self.feed.lock();
        if self.position < state.base {
            let missed = state.base - self.position;
            state.followers -= 1;
            state.leave(self.position);
            state.waiting.remove(&self.id);
            self.position = u64::MAX;
            drop(state);
            self.feed.lagged.fetch_add(1, Ordering::Relaxed);
            return Err(Lagged { missed });
        }
        let skip = (self.position - state.base) as usize;
        let until = usize::try_from(end.saturating_sub(state.base))
            .unwrap_or(usize::MAX)
            .min(state.frames.len());
        let mut len = 0;
        let mut count = 0;
        for frame in state.frames.range(skip..until.max(skip)) {
            if count > 0 && len + frame.len() > max_bytes {
                break;
            }
            len += frame.len();
            count += 1;
        }
        if count == 0 {
            return Ok(None);
        }
        let taken = if count == 1 {
            state.frames[skip].clone()
        } else {
            let mut buf = BytesMut::with_capacity(len);
            for frame in state.frames.range(skip..skip + count) {
                buf.extend_from_slice(frame);
            }
            buf.freeze()
        };
        let to = self.position + count as u64;
        state.reposition(self.position, to);
        self.position = to;
        Ok(Some((taken, count)))
    }

    /// Whether there are frames beyond its position; if not, `waker` is
    /// woken once there are.
    pub(super) fn behind_or_wake(&self, waker: &Waker) -> bool {
        let mut state = self.feed.lock();
        if state.base + state.frames.len() as u64 > self.position || self.position < state.base {
            return true;
        }
        match state.waiting.get(&self.id) {
            Some(w) if w.will_wake(waker) => {}
            _ => {
                state.waiting.insert(self.id, waker.clone());
            }
        }
        false
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if self.position == u64::MAX {
            return;
        }
        let mut state = self.feed.lock();
        state.waiting.remove(&self.id);
        state.followers -= 1;
        state.leave(self.position);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Header;

    fn ping(n: u64) -> Header {
        Header::Subscribed { token: n }
    }

    fn frames(bytes: &Bytes) -> Vec<Header> {
        let mut out = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[..4].try_into().expect("a prefix")) as usize;
            out.push(postcard::from_bytes(&rest[4..4 + len]).expect("a header"));
            rest = &rest[4 + len..];
        }
        out
    }

    #[test]
    fn keeps_nothing_without_followers() {
        let feed = Feed::new(1 << 20);
        for n in 0..10 {
            assert_eq!(feed.append(&ping(n)).expect("appends"), n);
        }
        assert_eq!(feed.held(), (0, 0));
        assert_eq!(feed.head(), 10);
        let mut f = Follower::new(&feed, feed.head());
        assert_eq!(f.take(usize::MAX).expect("in place"), None);
        feed.append(&ping(10)).expect("appends");
        let (bytes, n) = f.take(usize::MAX).expect("in place").expect("frames");
        assert_eq!((frames(&bytes), n), (vec![ping(10)], 1));
    }

    #[test]
    fn each_follower_gets_everything_from_its_start_in_order() {
        let feed = Feed::new(1 << 20);
        let mut a = Follower::new(&feed, 0);
        append_all(&feed, 0..5);
        let mut b = Follower::new(&feed, feed.head());
        append_all(&feed, 5..8);
        let (bytes, n) = a.take(usize::MAX).expect("in place").expect("frames");
        assert_eq!(n, 8);
        assert_eq!(frames(&bytes), (0..8).map(ping).collect::<Vec<_>>());
        let (bytes, _) = b.take(usize::MAX).expect("in place").expect("frames");
        assert_eq!(frames(&bytes), (5..8).map(ping).collect::<Vec<_>>());
        // Everything taken by everyone: nothing kept.
        assert_eq!(feed.held(), (0, 0));
    }

    #[test]
    fn takes_in_batches_of_the_bound() {
        let feed = Feed::new(1 << 20);
        let mut a = Follower::new(&feed, 0);
        append_all(&feed, 0..100);
        let one = 4 + postcard::to_allocvec(&ping(0)).expect("encodes").len();
        let mut got = Vec::new();
        while let Some((bytes, n)) = a.take(10 * one).expect("in place") {
            assert!(n <= 10 && bytes.len() <= 10 * one);
            got.extend(frames(&bytes));
        }
        assert_eq!(got, (0..100).map(ping).collect::<Vec<_>>());
        // A frame over the bound still goes, alone.
        feed.append(&ping(100)).expect("appends");
        assert_eq!(a.take(1).expect("in place").expect("frames").1, 1);
    }

    #[test]
    fn keeps_what_the_slowest_needs_and_drops_it_after() {
        let feed = Feed::new(1 << 20);
        let mut fast = Follower::new(&feed, 0);
        let slow = Follower::new(&feed, 0);
        append_all(&feed, 0..4);
        fast.take(usize::MAX).expect("in place");
        assert_eq!(feed.held().0, 4);
        drop(slow);
        assert_eq!(feed.held().0, 0);
        assert_eq!(feed.followers(), 1);
        drop(fast);
        assert_eq!(feed.followers(), 0);
    }

    #[test]
    fn a_follower_past_the_bound_loses_its_place() {
        let one = 4 + postcard::to_allocvec(&ping(0)).expect("encodes").len();
        let feed = Feed::new(10 * one);
        let mut slow = Follower::new(&feed, 0);
        let mut fast = Follower::new(&feed, 0);
        for n in 0..30 {
            feed.append(&ping(n)).expect("appends");
            fast.take(usize::MAX).expect("in place");
        }
        // The bound holds, whoever lags.
        assert!(feed.held().1 <= 10 * one);
        assert_eq!(slow.take(usize::MAX), Err(Lagged { missed: 20 }));
        assert_eq!(feed.lagged(), 1);
        assert_eq!(feed.followers(), 1);
        assert_eq!(feed.held(), (0, 0));
        drop(slow);
        assert_eq!(feed.followers(), 1);
    }

    /// Appends `ping(n)` for each `n` of `range`.
    fn append_all(feed: &Feed, range: std::ops::Range<u64>) {
        for n in range {
            feed.append(&ping(n)).expect("appends");
        }
    }

    /// A waker, and how many times it was woken.
    fn counting_waker() -> (Waker, impl Fn() -> usize) {
        use std::sync::atomic::AtomicUsize;
        use std::task::Wake;
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        (waker, move || count.0.load(Ordering::SeqCst))
    }

    #[test]
    fn a_waiting_writer_is_woken_by_an_append() {
        let (waker, count) = counting_waker();
        let feed = Feed::new(1 << 20);
        let f = Follower::new(&feed, 0);
        assert!(!f.behind_or_wake(&waker));
        assert!(!f.behind_or_wake(&waker));
        feed.append(&ping(0)).expect("appends");
        assert_eq!(count(), 1, "woken once");
        assert!(f.behind_or_wake(&waker));
        feed.append(&ping(1)).expect("appends");
        assert_eq!(count(), 1, "not waiting any more");
    }

    /// Within a linger an append wakes nobody; the linger's end wakes the
    /// writers that wait, once, with everything that came meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_burst_wakes_a_waiting_writer_once_per_linger() {
        let (waker, count) = counting_waker();
        let feed = Feed::new(1 << 20);
        let followers: Vec<Follower> = (0..100).map(|_| Follower::new(&feed, 0)).collect();
        let linger = LINGER_PER_FOLLOWER * 101;
        tokio::spawn(feed.clone().run_linger());
        tokio::task::yield_now().await;
        let mut f = Follower::new(&feed, 0);
        assert!(!f.behind_or_wake(&waker));
        // The first append after a quiet spell wakes at once.
        feed.append(&ping(0)).expect("appends");
        assert_eq!(count(), 1);
        f.take(usize::MAX).expect("in place");
        assert!(!f.behind_or_wake(&waker));
        append_all(&feed, 1..50);
        tokio::task::yield_now().await;
        assert_eq!(count(), 1, "not within the linger");
        tokio::time::sleep(linger).await;
        tokio::task::yield_now().await;
        assert_eq!(count(), 2, "once, at the linger's end");
        let (bytes, n) = f.take(usize::MAX).expect("in place").expect("frames");
        assert_eq!((n, frames(&bytes).len()), (49, 49));
        drop(followers);
    }

    #[test]
    fn refuses_an_oversized_header() {
        let feed = Feed::new(1 << 20);
        assert!(matches!(
            feed.append_encoded(&vec![0u8; MAX_HEADER_BYTES + 1]),
            Err(FrameError::HeaderTooLarge { .. })
        ));
        assert_eq!(feed.head(), 0);
    }
}
