//! Recoverable messages: the numbered stream from a sender's store to each
//! receiver ([`Outbox`]), and each receiver's verdict on every number it
//! is offered ([`Receipts`]).
//!
//! A sender numbers its recoverable messages to each receiver 1, 2, 3...
//! in its store, which has an epoch of its own (a new store, a new
//! stream). A receiver takes a number only right after the last it took,
//! so one it took before is a duplicate (acknowledged again, never handed
//! over again) and one past a gap is refused until the gap is filled: the
//! sender resends, in order, whatever failed. With the receiver's marks in
//! its store, each message reaches the application once, whatever process
//! restarts.
//!
//! Each message carries the sender's *floor*: the lowest number it still
//! holds; every number below it was acknowledged, or lost with a damaged
//! store. A receiver with no memory of the stream (its store is new), or
//! waiting for a number the sender lost, goes on from the floor instead of
//! waiting for numbers the sender no longer holds.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use transports::protocol::NodeId;

/// The sender's side: per receiver, the next number, the highest
/// acknowledged, and what waits to be sent again.
#[derive(Debug, Default)]
pub struct Outbox {
    to: HashMap<NodeId, Stream>,
}

/// One receiver's stream.
#[derive(Debug, Default)]
struct Stream {
    /// The next number to give.
    next: u64,
    /// Every number up to this one was acknowledged.
    acked: u64,
    /// Sent, outcome not known.
    in_flight: BTreeSet<u64>,
    /// Failed: to be sent again at `retry_at`.
    waiting: BTreeSet<u64>,
    retry_at: Option<Instant>,
}

impl Stream {
    /// The lowest number held, or the next if none is.
    fn floor(&self) -> u64 {
        let held = [self.in_flight.first(), self.waiting.first()];
        held.into_iter()
            .flatten()
            .copied()
            .min()
            .unwrap_or(self.next)
    }

    fn with(next: u64, acked: u64) -> Stream {
        Stream {
            next: next.max(acked + 1).max(1),
            acked,
            ..Stream::default()
        }
    }
}

/// A number given to a new message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Numbered {
    /// Its number.
    pub pseq: u64,
    /// The stream's floor when it is sent (see the module docs).
    pub floor: u64,
}

/// Messages sent again to one receiver, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resend {
    /// The receiver.
    pub receiver: NodeId,
    /// The numbers, lowest first.
    pub pseqs: Vec<u64>,
    /// The stream's floor.
    pub floor: u64,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// Restores a receiver's stream from the store: its next number, its
    /// acknowledged mark, and the messages still held (due at once).
    pub fn restore(&mut self, receiver: NodeId, next: u64, acked: u64, held: &[u64], now: Instant) {
        let stream = self
            .to
            .entry(receiver)
            .or_insert_with(|| Stream::with(next, acked));
        stream.next = stream.next.max(next);
        stream.acked = stream.acked.max(acked);
        for &pseq in held {
            if pseq > stream.acked {
                stream.waiting.insert(pseq);
                stream.next = stream.next.max(pseq + 1);
            }
        }
        if !stream.waiting.is_empty() {
            stream.retry_at = Some(now);
        }
    }

    /// Numbers a new message to `receiver`, sent at once (in flight).
    pub fn number(&mut self, receiver: &NodeId) -> Numbered {
        let stream = self
            .to
            .entry(receiver.clone())
            .or_insert_with(|| Stream::with(1, 0));
        let pseq = stream.next;
        let floor = stream.floor();
        stream.next += 1;
        stream.in_flight.insert(pseq);
        Numbered { pseq, floor }
    }

    /// The floor of the stream to `receiver`.
    pub fn floor(&self, receiver: &NodeId) -> u64 {
        self.to.get(receiver).map_or(1, Stream::floor)
    }

    /// The number the next message to `receiver` takes (its store's
    /// `NextSeq` mark).
    pub fn next(&self, receiver: &NodeId) -> u64 {
        self.to.get(receiver).map_or(1, |s| s.next)
    }

    /// `receiver` acknowledged `pseq`, and so every number before it (it
    /// takes them in order). Returns the numbers now done, to remove from
    /// the store with the new acknowledged mark; none if `pseq` was
    /// already acknowledged or never given.
    pub fn delivered(&mut self, receiver: &NodeId, pseq: u64) -> Vec<u64> {
        let Some(stream) = self.to.get_mut(receiver) else {
            return vec![];
        };
        if pseq <= stream.acked || pseq >= stream.next {
            return vec![];
        }
        stream.acked = pseq;
        let mut done = Vec::new();
        for set in [&mut stream.in_flight, &mut stream.waiting] {
            let later = set.split_off(&(pseq + 1));
            done.extend(std::mem::replace(set, later));
        }
        done.sort_unstable();
        if stream.waiting.is_empty() {
            stream.retry_at = None;
        }
        done
    }

    /// `pseq` to `receiver` can no longer be sent (its store lost it): it is
    /// held no more, and once every number before it is acknowledged the
    /// floor passes it. Nothing below it is taken as acknowledged.
    pub fn lost(&mut self, receiver: &NodeId, pseq: u64) {
        if let Some(stream) = self.to.get_mut(receiver) {
            stream.in_flight.remove(&pseq);
            stream.waiting.remove(&pseq);
            if stream.waiting.is_empty() {
                stream.retry_at = None;
            }
        }
    }

    /// Sending `pseq` to `receiver` failed: it is sent again after
    /// `delay` (with every other failed one of its stream, in order).
    pub fn failed(&mut self, receiver: &NodeId, pseq: u64, now: Instant, delay: Duration) {
        let Some(stream) = self.to.get_mut(receiver) else {
            return;
        };
        if pseq <= stream.acked || !stream.in_flight.remove(&pseq) {
            return;
        }
        stream.waiting.insert(pseq);
        let at = now + delay;
        stream.retry_at = Some(stream.retry_at.map_or(at, |t| t.min(at)));
    }

    /// Streams whose failed messages are due at `now`: they are in flight
    /// again, to be sent in the order given.
    pub fn due(&mut self, now: Instant) -> Vec<Resend> {
        let mut out = Vec::new();
        for (receiver, stream) in &mut self.to {
            if stream.retry_at.is_some_and(|t| t <= now) {
                stream.retry_at = None;
                let floor = stream.floor();
                let pseqs: Vec<u64> = std::mem::take(&mut stream.waiting).into_iter().collect();
                stream.in_flight.extend(&pseqs);
                if !pseqs.is_empty() {
                    out.push(Resend {
                        receiver: receiver.clone(),
                        pseqs,
                        floor,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.receiver.cmp(&b.receiver));
        out
    }

    /// When [`Outbox::due`] next has something.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.to.values().filter_map(|s| s.retry_at).min()
    }

    /// Messages held (in flight or waiting), over all receivers.
    pub fn held(&self) -> usize {
        self.to
            .values()
            .map(|s| s.in_flight.len() + s.waiting.len())
            .sum()
    }
}

/// What a receiver does with a recoverable message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The next on its stream: store it, then acknowledge it.
    Store,
    /// Taken before and stored: acknowledge it again, hand nothing over.
    StoredBefore,
    /// Taken before, not stored yet: its own acknowledgement comes once it
    /// is; nothing now.
    Storing,
    /// Past a gap: refused; the sender sends the gap first.
    Gap {
        /// The number the receiver takes next.
        expected: u64,
    },
    /// A stream this receiver will not keep: the sender has
    /// [`MAX_EPOCHS_PER_SENDER`] streams here already, or the stream's
    /// numbers ran out. Refused.
    Refused,
}

/// Streams (stores) of one sender a receiver keeps marks for, at most: a
/// sender makes a new one only when its store is made anew, so more is a
/// sender inventing epochs to grow the receiver's memory and store.
pub const MAX_EPOCHS_PER_SENDER: usize = 16;

/// The receiver's side: per sender stream (node and epoch), the highest
/// number taken and the highest stored.
#[derive(Debug, Default)]
pub struct Receipts {
    from: HashMap<(NodeId, u64), Taken>,
    /// Streams known per sender.
    epochs: HashMap<NodeId, usize>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Taken {
    decided: u64,
    stored: u64,
}

impl Receipts {
    /// No streams known.
    pub fn new() -> Receipts {
        Receipts::default()
    }

    /// Restores a stream's mark from the store.
    pub fn restore(&mut self, origin: NodeId, epoch: u64, received: u64) {
        let key = (origin.clone(), epoch);
        if !self.from.contains_key(&key) {
            *self.epochs.entry(origin).or_default() += 1;
        }
        let taken = self.from.entry(key).or_default();
        taken.decided = taken.decided.max(received);
        taken.stored = taken.stored.max(received);
    }

    /// The verdict on number `pseq` of `origin`'s stream `epoch`, sent
    /// with `floor`. A `Store` verdict takes the number.
    pub fn receive(&mut self, origin: &NodeId, epoch: u64, pseq: u64, floor: u64) -> Verdict {
        let key = (origin.clone(), epoch);
        if !self.from.contains_key(&key) {
            let known = self.epochs.entry(origin.clone()).or_default();
            if *known >= MAX_EPOCHS_PER_SENDER {
                return Verdict::Refused;
            }
            *known += 1;
        }
        let taken = self.from.entry(key).or_default();
        // Everything below the floor was acknowledged by this node once;
        // a node that does not remember it (a new store) starts there.
        let below = floor.saturating_sub(1);
        if below > taken.decided {
            taken.decided = below;
            taken.stored = taken.stored.max(below);
        }
        if pseq != 0 && pseq <= taken.stored {
            return Verdict::StoredBefore;
        }
        if pseq != 0 && pseq <= taken.decided {
            return Verdict::Storing;
        }
        // The numbers a sender claims are checked, never trusted to add up.
        let Some(expected) = taken.decided.checked_add(1) else {
            return Verdict::Refused;
        };
        if pseq == expected {
            taken.decided = pseq;
            Verdict::Store
        } else {
            Verdict::Gap { expected }
        }
    }

    /// Number `pseq` of the stream is stored (in order: the writer
    /// commits in the order verdicts were given).
    pub fn stored(&mut self, origin: &NodeId, epoch: u64, pseq: u64) {
        if let Some(taken) = self.from.get_mut(&(origin.clone(), epoch)) {
            taken.stored = taken.stored.max(pseq);
        }
    }

    /// A store commit failed after `Store` verdicts up to `pseq`: they are
    /// not taken (the next copy is stored again).
    pub fn not_stored(&mut self, origin: &NodeId, epoch: u64, pseq: u64) {
        if let Some(taken) = self.from.get_mut(&(origin.clone(), epoch)) {
            if taken.decided >= pseq {
                taken.decided = taken.stored.max(pseq - 1).min(taken.decided);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> NodeId {
        NodeId::new("b")
    }

    #[test]
    fn a_stream_numbers_in_order_and_acknowledgements_cover_what_came_before() {
        let now = Instant::now();
        let mut out = Outbox::new();
        let n: Vec<Numbered> = (0..4).map(|_| out.number(&b())).collect();
        assert_eq!(
            n.iter().map(|n| (n.pseq, n.floor)).collect::<Vec<_>>(),
            vec![(1, 1), (2, 1), (3, 1), (4, 1)]
        );
        // 2 failed; 3 acknowledged covers 1 and 2 (the receiver takes in
        // order, so 2 was taken after all: its failure was a lost answer).
        out.failed(&b(), 2, now, Duration::from_secs(1));
        assert_eq!(out.delivered(&b(), 3), vec![1, 2, 3]);
        assert_eq!(out.floor(&b()), 4);
        assert_eq!(out.poll_timeout(), None, "nothing waits");
        // Stale and unknown acknowledgements change nothing.
        assert_eq!(out.delivered(&b(), 3), Vec::<u64>::new());
        assert_eq!(out.delivered(&b(), 99), Vec::<u64>::new());
        assert_eq!(out.delivered(&NodeId::new("z"), 1), Vec::<u64>::new());
        assert_eq!(out.held(), 1);
    }

    #[test]
    fn failed_messages_are_sent_again_in_order_when_due() {
        let now = Instant::now();
        let mut out = Outbox::new();
        for _ in 0..3 {
            out.number(&b());
        }
        out.failed(&b(), 3, now, Duration::from_millis(500));
        out.failed(&b(), 1, now, Duration::from_millis(100));
        assert_eq!(out.poll_timeout(), Some(now + Duration::from_millis(100)));
        assert!(out.due(now).is_empty());
        let due = out.due(now + Duration::from_millis(100));
        assert_eq!(
            due,
            vec![Resend {
                receiver: b(),
                pseqs: vec![1, 3],
                floor: 1
            }]
        );
        assert!(out.due(now + Duration::from_secs(9)).is_empty(), "once");
        assert_eq!(out.held(), 3);
    }

    #[test]
    fn a_restored_stream_goes_on_from_its_marks_and_sends_what_it_held() {
        let now = Instant::now();
        let mut out = Outbox::new();
        out.restore(b(), 8, 4, &[3, 5, 7], now);
        assert_eq!(
            out.due(now),
            vec![Resend {
                receiver: b(),
                pseqs: vec![5, 7],
                floor: 5
            }]
        );
        assert_eq!(out.number(&b()).pseq, 8);
        // 6 was lost with a damaged store: once 5 is acknowledged, the
        // floor passes it, and the receiver goes on from 7.
        assert_eq!(out.delivered(&b(), 5), vec![5]);
        assert_eq!(out.floor(&b()), 7);
        // 7 is lost at run time: 8 (in flight) becomes the floor; nothing
        // is taken as acknowledged.
        out.lost(&b(), 7);
        assert_eq!(out.floor(&b()), 8);
        assert_eq!(out.held(), 1);
        // A store that lost its NextSeq mark still never reuses a held
        // number.
        let mut out = Outbox::new();
        out.restore(b(), 0, 0, &[1, 2], now);
        assert_eq!(out.number(&b()).pseq, 3);
    }

    #[test]
    fn a_receiver_takes_numbers_in_order_once() {
        let a = NodeId::new("a");
        let mut r = Receipts::new();
        let table = [
            // (pseq, floor, verdict)
            (2, 1, Verdict::Gap { expected: 1 }),
            (1, 1, Verdict::Store),
            (1, 1, Verdict::Storing),
            (3, 1, Verdict::Gap { expected: 2 }),
            (2, 1, Verdict::Store),
            (0, 1, Verdict::Gap { expected: 3 }),
        ];
        for (pseq, floor, want) in table {
            assert_eq!(r.receive(&a, 7, pseq, floor), want, "pseq {pseq}");
        }
        r.stored(&a, 7, 2);
        assert_eq!(r.receive(&a, 7, 1, 1), Verdict::StoredBefore);
        assert_eq!(r.receive(&a, 7, 2, 1), Verdict::StoredBefore);
        // Another epoch is another stream.
        assert_eq!(r.receive(&a, 8, 2, 1), Verdict::Gap { expected: 1 });
    }

    #[test]
    fn claimed_numbers_and_epochs_cannot_grow_or_break_a_receiver() {
        let m = NodeId::new("mallory");
        let mut r = Receipts::new();
        // Numbers at the end of the range: no overflow, refused past it.
        assert_eq!(r.receive(&m, 1, u64::MAX, u64::MAX), Verdict::Store);
        assert_eq!(r.receive(&m, 1, u64::MAX, u64::MAX), Verdict::Storing);
        r.stored(&m, 1, u64::MAX);
        assert_eq!(r.receive(&m, 1, 5, 1), Verdict::StoredBefore);
        assert_eq!(
            r.receive(&m, 1, 0, 1),
            Verdict::Refused,
            "nothing comes next"
        );
        // Epochs invented by the sender: a bounded number of streams.
        for epoch in 2..=MAX_EPOCHS_PER_SENDER as u64 {
            assert_eq!(r.receive(&m, epoch, 1, 1), Verdict::Store, "epoch {epoch}");
        }
        let one_more = MAX_EPOCHS_PER_SENDER as u64 + 1;
        assert_eq!(r.receive(&m, one_more, 1, 1), Verdict::Refused);
        // Known streams go on; another sender is not affected.
        assert_eq!(r.receive(&m, 2, 2, 1), Verdict::Store);
        assert_eq!(r.receive(&NodeId::new("a"), 9, 1, 1), Verdict::Store);
    }

    #[test]
    fn a_receiver_with_no_memory_starts_at_the_floor_and_restored_marks_hold() {
        let a = NodeId::new("a");
        let mut r = Receipts::new();
        assert_eq!(r.receive(&a, 1, 40, 40), Verdict::Store);
        assert_eq!(r.receive(&a, 1, 39, 40), Verdict::StoredBefore);
        let mut r = Receipts::new();
        r.restore(a.clone(), 1, 10);
        assert_eq!(r.receive(&a, 1, 10, 5), Verdict::StoredBefore);
        assert_eq!(r.receive(&a, 1, 12, 5), Verdict::Gap { expected: 11 });
        assert_eq!(r.receive(&a, 1, 11, 5), Verdict::Store);
        r.not_stored(&a, 1, 11);
        assert_eq!(r.receive(&a, 1, 11, 5), Verdict::Store, "taken again");
    }
}
