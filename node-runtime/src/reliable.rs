//! What makes acknowledged delivery survive a lost connection: the resend
//! buffer on the sending side, and duplicate suppression on the receiving
//! side.
//!
//! A sender keeps every acknowledged message it sent through the message
//! server until its outcome is known. After reconnecting it sends them all
//! again, in sequence order, before anything newer; after a receiver
//! re-registers it sends again what that receiver has not acknowledged.
//! Receivers remember which sequence numbers of each (sender, incarnation)
//! they delivered, in a sliding window, and deliver each at most once (a
//! duplicate `send` is acknowledged again, not delivered).

use std::collections::HashMap;

use bytes::Bytes;
use transports::protocol::{Header, MessageHeader, NodeId, Target};
use transports::OutFrame;

/// Sequence numbers remembered per sender incarnation.
pub const DEDUP_WINDOW: u64 = 1 << 17;

const WORDS: usize = (DEDUP_WINDOW / 64) as usize;

/// The sequence numbers of one sender incarnation seen recently.
#[derive(Debug)]
pub(crate) struct SeqWindow {
    top: u64,
    bits: Box<[u64; WORDS]>,
}

impl SeqWindow {
    pub(crate) fn new() -> Self {
        SeqWindow {
            top: 0,
            bits: Box::new([0; WORDS]),
        }
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % DEDUP_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Records `seq`; true if it was not seen before. A number older than
    /// the window counts as seen.
    pub(crate) fn insert(&mut self, seq: u64) -> bool {
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
            return true;
        }
        if self.top - seq >= DEDUP_WINDOW {
            tracing::warn!(
                seq,
                top = self.top,
                "message older than the duplicate window: dropped"
            );
            return false;
        }
        let (w, b) = Self::bit(seq);
        let fresh = self.bits[w] & b == 0;
        self.bits[w] |= b;
        fresh
    }
}

/// Duplicate suppression for every sender incarnation.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    senders: HashMap<NodeId, SenderWindows>,
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
    /// Records message `seq` of this sender's `incarnation`; returns the
    /// sender's id and whether the message is new.
    fn record(&mut self, incarnation: u64, seq: u64) -> (NodeId, bool) {
        let window = match self.windows.iter().position(|(i, _)| *i == incarnation) {
            Some(at) => &mut self.windows[at].1,
            None => {
                self.windows.push((incarnation, SeqWindow::new()));
                let last = self.windows.len() - 1;
                &mut self.windows[last].1
            }
        };
        (self.id.clone(), window.insert(seq))
    }
}

impl Dedup {
    /// Whether message `seq` of `sender`'s `incarnation` is new (and
    /// records it).
    #[cfg(test)]
    pub(crate) fn is_new(&mut self, sender: &NodeId, incarnation: u64, seq: u64) -> bool {
        self.check(sender.as_str(), incarnation, seq).1
    }

    /// Records message `seq` of `sender`'s `incarnation`; returns the
    /// sender's id and whether the message is new.
    pub(crate) fn check(&mut self, sender: &str, incarnation: u64, seq: u64) -> (NodeId, bool) {
        // One lookup for a sender heard from before, the usual case.
        if let Some(entry) = self.senders.get_mut(sender) {
            return entry.record(incarnation, seq);
        }
        let id = NodeId::new(sender);
        let mut entry = SenderWindows {
            id: id.clone(),
            windows: Vec::new(),
        };
        let recorded = entry.record(incarnation, seq);
        self.senders.insert(id, entry);
        recorded
    }

    /// Forgets a sender that is gone.
    pub(crate) fn forget(&mut self, sender: &NodeId) {
        self.senders.remove(sender);
    }
}

/// An acknowledged message kept for resending.
#[derive(Debug, Clone)]
pub(crate) struct Resend {
    pub(crate) header: MessageHeader,
    pub(crate) body: Bytes,
}

impl Resend {
    pub(crate) fn frame(&self) -> OutFrame {
        OutFrame::Parts {
            header: Header::Message(self.header.clone()),
            body: self.body.clone(),
        }
    }

    /// The one node it is addressed to, if it is a `Node` message.
    pub(crate) fn node(&self) -> Option<&NodeId> {
        match &self.header.target {
            Target::Node(id) => Some(id),
            _ => None,
        }
    }
}

/// The resend buffer, by sequence number. Inserting and removing cost the
/// same wherever the number falls; the rare full walks (after a reconnect)
/// sort.
#[derive(Debug, Default)]
pub(crate) struct ResendBuffer {
    by_seq: cluster_manager::tracker::SeqMap<Resend>,
}

impl ResendBuffer {
    pub(crate) fn insert(&mut self, seq: u64, resend: Resend) {
        self.by_seq.insert(seq, resend);
    }

    pub(crate) fn remove(&mut self, seq: u64) {
        self.by_seq.remove(&seq);
    }

    /// The entries `keep` selects, in sequence order, as frames.
    fn frames(&self, keep: impl Fn(u64, &Resend) -> bool) -> Vec<OutFrame> {
        let mut chosen: Vec<(u64, &Resend)> = self
            .by_seq
            .iter()
            .filter(|(seq, r)| keep(**seq, r))
            .map(|(seq, r)| (*seq, r))
            .collect();
        chosen.sort_unstable_by_key(|(seq, _)| *seq);
        chosen.into_iter().map(|(_, r)| r.frame()).collect()
    }

    /// Every message still waiting for its outcome, in sequence order.
    pub(crate) fn all(&self, still_tracked: impl Fn(u64) -> bool) -> Vec<OutFrame> {
        self.frames(|seq, _| still_tracked(seq))
    }

    /// The messages to `node` still waiting, in sequence order.
    pub(crate) fn to_node(
        &self,
        node: &NodeId,
        still_tracked: impl Fn(u64) -> bool,
    ) -> Vec<OutFrame> {
        self.frames(|seq, r| r.node() == Some(node) && still_tracked(seq))
    }

    pub(crate) fn get(&self, seq: u64) -> Option<&Resend> {
        self.by_seq.get(&seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resend_buffer_walks_in_sequence_order() {
        use transports::protocol::MessageKind;
        let resend = |seq: u64, to: &str| Resend {
            header: MessageHeader {
                sender: NodeId::new("me"),
                incarnation: 1,
                seq,
                target: Target::Node(NodeId::new(to)),
                service: "svc".into(),
                kind: MessageKind::Send,
            },
            body: Bytes::new(),
        };
        let mut buffer = ResendBuffer::default();
        for seq in [9u64, 3, 7, 1, 5, 2] {
            buffer.insert(seq, resend(seq, if seq % 2 == 0 { "b" } else { "a" }));
        }
        buffer.remove(7);
        let seqs = |frames: Vec<OutFrame>| -> Vec<u64> {
            frames
                .into_iter()
                .map(|f| match f {
                    OutFrame::Parts {
                        header: Header::Message(h),
                        ..
                    } => h.seq,
                    other => panic!("not a message: {other:?}"),
                })
                .collect()
        };
        assert_eq!(seqs(buffer.all(|_| true)), [1, 2, 3, 5, 9]);
        assert_eq!(seqs(buffer.all(|s| s != 3)), [1, 2, 5, 9]);
        assert_eq!(
            seqs(buffer.to_node(&NodeId::new("a"), |_| true)),
            [1, 3, 5, 9]
        );
        assert!(buffer.get(7).is_none());
        assert_eq!(buffer.get(9).map(|r| r.header.seq), Some(9));
    }

    #[test]
    fn window_delivers_each_number_once_in_any_order() {
        let mut w = SeqWindow::new();
        let steps: Vec<(u64, bool)> = vec![
            (1, true),
            (2, true),
            (2, false),
            (5, true),
            (3, true), // late, within the window
            (3, false),
            (4, true),
            (1, false),
            (5, false),
            (5 + DEDUP_WINDOW, true),
            (5, false), // now older than the window
            (6 + DEDUP_WINDOW, true),
            (4 + DEDUP_WINDOW, true), // in the gap that was cleared
        ];
        for (i, (seq, fresh)) in steps.into_iter().enumerate() {
            assert_eq!(w.insert(seq), fresh, "step {i}: seq {seq}");
        }
    }

    #[test]
    fn dedup_is_per_sender_incarnation() {
        let mut d = Dedup::default();
        let a = NodeId::new("a");
        assert!(d.is_new(&a, 1, 7));
        assert!(!d.is_new(&a, 1, 7));
        assert!(d.is_new(&a, 2, 7), "a new incarnation starts afresh");
        assert!(d.is_new(&NodeId::new("b"), 1, 7));
        d.forget(&a);
        assert!(d.is_new(&a, 1, 7));
    }
}
