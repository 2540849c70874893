//! Duplicate suppression on the receiving side: which sequence numbers of
//! each sender incarnation were delivered here.
//!
//! A message is delivered to the application at most once per runtime
//! lifetime, also when its sender resent it after a failover. Each
//! (sender, incarnation) has a sliding window of [`DEDUP_WINDOW`] numbers.
//! A number older than the window cannot be told apart from one seen
//! before: it is [`Seen::Stale`], never delivered (it may have been) and
//! never acknowledged as accepted (it may not have been), so that its
//! sender learns of it instead of losing it silently.

use std::collections::HashMap;

use transports::protocol::NodeId;

/// Sequence numbers remembered per sender incarnation.
pub const DEDUP_WINDOW: u64 = 1 << 17;

const WORDS: usize = (DEDUP_WINDOW / 64) as usize;

/// What the window says of a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not seen before: deliver it.
    New,
    /// Seen before: acknowledge it again, do not deliver it again.
    Duplicate,
    /// Older than the window: whether it was seen cannot be told.
    Stale,
}

/// The sequence numbers of one sender incarnation seen recently.
#[derive(Debug)]
pub struct SeqWindow {
    top: u64,
    bits: Box<[u64; WORDS]>,
}

impl Default for SeqWindow {
    fn default() -> Self {
        SeqWindow {
            top: 0,
            bits: Box::new([0; WORDS]),
        }
    }
}

impl SeqWindow {
    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % DEDUP_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Records `seq`, and says whether it is new, a duplicate, or too old
    /// to tell.
    pub fn insert(&mut self, seq: u64) -> Seen {
        if seq > self.top {
            let gap = seq - self.top;
            if gap >= DEDUP_WINDOW {
                self.bits.fill(0);
            } else {
                for s in self.top + 1..seq {
                    let (w, b) = Self::bit(s);
                    self.bits[w] &= !b;
                }
            }
            self.top = seq;
            let (w, b) = Self::bit(seq);
            self.bits[w] |= b;
            return Seen::New;
        }
        if self.top - seq >= DEDUP_WINDOW {
            tracing::warn!(
                seq,
                top = self.top,
                "message older than the duplicate window: refused"
            );
            return Seen::Stale;
        }
        let (w, b) = Self::bit(seq);
        let fresh = self.bits[w] & b == 0;
        self.bits[w] |= b;
        if fresh {
            Seen::New
        } else {
            Seen::Duplicate
        }
    }
}

/// Duplicate suppression for every sender incarnation heard from.
#[derive(Debug, Default)]
pub struct Dedup {
    senders: Vec<SenderWindows>,
    /// Where each sender is in `senders`.
    index: HashMap<NodeId, usize>,
    /// Where the sender of the last message checked is: the next message
    /// is usually from it, found by comparing its name, not by hashing.
    last: usize,
}

/// One sender's windows, one per incarnation heard from.
#[derive(Debug)]
struct SenderWindows {
    /// The sender's id, handed out to its messages (shared, not allocated
    /// again per message).
    id: NodeId,
    windows: Vec<(u64, SeqWindow)>,
}

impl SenderWindows {
    fn record(&mut self, incarnation: u64, seq: u64) -> (NodeId, Seen) {
        let at = match self.windows.iter().position(|(i, _)| *i == incarnation) {
            Some(at) => at,
            None => {
                self.windows.push((incarnation, SeqWindow::default()));
                self.windows.len() - 1
            }
        };
        (self.id.clone(), self.windows[at].1.insert(seq))
    }
}

impl Dedup {
    /// Records message `seq` of `sender`'s `incarnation`; returns the
    /// sender's id (shared, not allocated per message) and what the window
    /// says of the message.
    pub fn handle_message(&mut self, sender: &str, incarnation: u64, seq: u64) -> (NodeId, Seen) {
        if let Some(entry) = self.senders.get_mut(self.last) {
            if entry.id.as_str() == sender {
                return entry.record(incarnation, seq);
            }
        }
        let at = match self.index.get(sender) {
            Some(&at) => at,
            None => {
                let id = NodeId::new(sender);
                self.senders.push(SenderWindows {
                    id: id.clone(),
                    windows: Vec::new(),
                });
                let at = self.senders.len() - 1;
                self.index.insert(id, at);
                at
            }
        };
        self.last = at;
        self.senders[at].record(incarnation, seq)
    }

    /// Forgets a sender that is gone.
    pub fn forget(&mut self, sender: &NodeId) {
        let Some(at) = self.index.remove(sender) else {
            return;
        };
        self.senders.swap_remove(at);
        if let Some(moved) = self.senders.get(at) {
            self.index.insert(moved.id.clone(), at);
        }
    }

    /// Senders remembered.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// Whether no sender is remembered.
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_new(d: &mut Dedup, sender: &NodeId, incarnation: u64, seq: u64) -> bool {
        d.handle_message(sender.as_str(), incarnation, seq).1 == Seen::New
    }

    #[test]
    fn window_delivers_each_number_once_in_any_order() {
        let mut w = SeqWindow::default();
        use Seen::*;
        let steps: Vec<(u64, Seen)> = vec![
            (1, New),
            (2, New),
            (2, Duplicate),
            (5, New),
            (3, New), // late, within the window
            (3, Duplicate),
            (4, New),
            (1, Duplicate),
            (5, Duplicate),
            (5 + DEDUP_WINDOW, New),
            (5, Stale), // now older than the window: cannot tell
            (6 + DEDUP_WINDOW, New),
            (4 + DEDUP_WINDOW, New), // in the gap that was cleared
            (3 * DEDUP_WINDOW, New), // a jump past the window clears it all
            (6 + DEDUP_WINDOW, Stale),
            (3 * DEDUP_WINDOW - 1, New),
            (3 * DEDUP_WINDOW - 1, Duplicate),
        ];
        for (i, (seq, seen)) in steps.into_iter().enumerate() {
            assert_eq!(w.insert(seq), seen, "step {i}: seq {seq}");
        }
    }

    #[test]
    fn dedup_is_per_sender_incarnation() {
        let mut d = Dedup::default();
        let a = NodeId::new("a");
        assert!(is_new(&mut d, &a, 1, 7));
        assert!(!is_new(&mut d, &a, 1, 7));
        assert!(is_new(&mut d, &a, 2, 7), "a new incarnation starts afresh");
        assert!(is_new(&mut d, &NodeId::new("b"), 1, 7));
        assert_eq!(d.len(), 2);
        d.forget(&a);
        assert!(is_new(&mut d, &a, 1, 7));
    }

    #[test]
    fn forgetting_a_sender_keeps_the_others() {
        let mut d = Dedup::default();
        let ids: Vec<NodeId> = ["a", "b", "c", "d"].map(NodeId::new).into();
        for id in &ids {
            assert!(is_new(&mut d, id, 1, 1));
        }
        // The first one's place goes to the last one.
        d.forget(&ids[0]);
        d.forget(&NodeId::new("never-heard-of"));
        for id in &ids[1..] {
            assert!(!is_new(&mut d, id, 1, 1), "{id:?} is still remembered");
        }
        assert!(
            is_new(&mut d, &ids[0], 1, 1),
            "a forgotten sender starts afresh"
        );
        // Alternating senders, each found again by name or by its place.
        for seq in 2..100 {
            for id in ids.iter().rev() {
                assert!(is_new(&mut d, id, 1, seq));
                assert!(!is_new(&mut d, id, 1, seq));
            }
        }
        d.forget(&ids[3]);
        assert!(is_new(&mut d, &ids[3], 1, 50), "forgotten: new again");
        assert!(!is_new(&mut d, &ids[2], 1, 50));
    }

    #[test]
    fn the_sender_id_handed_out_is_the_one_kept() {
        let mut d = Dedup::default();
        let (first, _) = d.handle_message("a-sender-with-a-long-name-not-inline", 1, 1);
        let (again, _) = d.handle_message("a-sender-with-a-long-name-not-inline", 1, 2);
        assert_eq!(first, again);
    }
}
