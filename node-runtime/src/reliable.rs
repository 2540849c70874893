//! What makes acknowledged delivery survive a lost connection: the frames
//! kept for resending on the sending side, and duplicate suppression on the
//! receiving side.
//!
//! A sender keeps every acknowledged message it sent through the message
//! server until its outcome is known (with its waiter in the delivery
//! tracker, see [`Waiter`]). After reconnecting it sends them all
//! again, in sequence order, before anything newer; after a receiver
//! re-registers it sends again what that receiver has not acknowledged.
//! Receivers remember which sequence numbers of each (sender, incarnation)
//! they delivered, in a sliding window, and deliver each at most once (a
//! duplicate `send` is acknowledged again, not delivered).

use std::collections::HashMap;

use bytes::Bytes;
use cluster_manager::tracker::DeliveryTracker;
use transports::protocol::{same_name, Header, MessageHeader, MessageKind, NodeId, Target};
use transports::OutFrame;

use crate::node::Waiter;

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
        if let Some(entry) = self.senders.get_mut(self.last) {
            if same_name(entry.id.as_str(), sender) {
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
    pub(crate) fn forget(&mut self, sender: &NodeId) {
        let Some(at) = self.index.remove(sender) else {
            return;
        };
        self.senders.swap_remove(at);
        if let Some(moved) = self.senders.get(at) {
            self.index.insert(moved.id.clone(), at);
        }
    }
}

/// An acknowledged message kept for resending: what its tracker entry does
/// not hold already (the number, target and service are there; the sender
/// is this node, in its current incarnation, as the tracker is emptied
/// when the incarnation changes).
#[derive(Debug, Clone)]
pub(crate) struct Resend {
    pub(crate) kind: MessageKind,
    pub(crate) body: Bytes,
}

/// The one node `target` names, if it is a `Node` target.
pub(crate) fn node_of(target: &Target) -> Option<&NodeId> {
    match target {
        Target::Node(id) => Some(id),
        _ => None,
    }
}

/// The messages of `tracker` kept for resending whose target `keep`
/// selects, in sequence order, as frames from `sender`'s `incarnation`
/// (the rare walks after a reconnect sort).
pub(crate) fn resend_frames(
    tracker: &DeliveryTracker<Waiter>,
    sender: &NodeId,
    incarnation: u64,
    keep: impl Fn(&Target) -> bool,
) -> Vec<OutFrame> {
    let mut chosen: Vec<_> = tracker
        .all_waiting()
        .filter(|w| w.waiter.resend.is_some() && keep(w.target))
        .collect();
    chosen.sort_unstable_by_key(|w| w.seq);
    chosen
        .into_iter()
        .filter_map(|w| {
            let resend = w.waiter.resend.as_ref()?;
            Some(OutFrame::Parts {
                header: Header::Message(MessageHeader {
                    sender: sender.clone(),
                    incarnation,
                    seq: w.seq,
                    target: w.target.clone(),
                    service: w.service.clone(),
                    kind: resend.kind,
                }),
                body: resend.body.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resend_frames_walk_what_is_tracked_in_sequence_order() {
        use cluster_manager::Awaiting;
        use tokio::sync::oneshot;
        let mut tracker = DeliveryTracker::new();
        let mut receivers = Vec::new();
        for seq in [9u64, 3, 7, 1, 5, 2, 4] {
            let to = if seq % 2 == 0 { "b" } else { "a" };
            let (tx, rx) = oneshot::channel();
            receivers.push(rx);
            // 4 went over a direct channel: tracked, nothing to resend.
            let resend = (seq != 4).then(|| Resend {
                kind: MessageKind::Send,
                body: Bytes::from(format!("body {seq}")),
            });
            let target = Target::Node(NodeId::new(to));
            tracker.track(
                seq,
                target,
                "svc".into(),
                Awaiting::Acks,
                Waiter { tx, resend },
            );
        }
        // Settled and cancelled messages are not resent.
        assert!(tracker.handle_accepted(7, &NodeId::new("a")).is_some());
        assert!(tracker.cancel(2).is_some());
        let me = NodeId::new("me");
        let frames = |keep: &dyn Fn(&Target) -> bool| -> Vec<u64> {
            resend_frames(&tracker, &me, 5, keep)
                .into_iter()
                .map(|f| match f {
                    OutFrame::Parts {
                        header: Header::Message(h),
                        body,
                    } => {
                        // The whole message, from this incarnation.
                        assert_eq!(h.sender, me);
                        assert_eq!(h.incarnation, 5);
                        assert_eq!(&*h.service, "svc");
                        assert_eq!(h.kind, MessageKind::Send);
                        assert_eq!(body, format!("body {}", h.seq));
                        h.seq
                    }
                    other => panic!("not a message: {other:?}"),
                })
                .collect()
        };
        assert_eq!(frames(&|_| true), [1, 3, 5, 9]);
        let b = NodeId::new("b");
        assert!(frames(&|t| node_of(t) == Some(&b)).is_empty());
        let a = NodeId::new("a");
        assert_eq!(frames(&|t| node_of(t) == Some(&a)), [1, 3, 5, 9]);
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

    #[test]
    fn forgetting_a_sender_keeps_the_others() {
        let mut d = Dedup::default();
        let ids: Vec<NodeId> = ["a", "b", "c", "d"].map(NodeId::new).into();
        for id in &ids {
            assert!(d.is_new(id, 1, 1));
        }
        // The first one's place goes to the last one.
        d.forget(&ids[0]);
        d.forget(&NodeId::new("never-heard-of"));
        for id in &ids[1..] {
            assert!(!d.is_new(id, 1, 1), "{id:?} is still remembered");
        }
        assert!(d.is_new(&ids[0], 1, 1), "a forgotten sender starts afresh");
        // Alternating senders, each found again by name or by its place.
        for seq in 2..100 {
            for id in ids.iter().rev() {
                assert!(d.is_new(id, 1, seq));
                assert!(!d.is_new(id, 1, seq));
            }
        }
        d.forget(&ids[3]);
        assert!(d.is_new(&ids[3], 1, 50), "forgotten: new again");
        assert!(!d.is_new(&ids[2], 1, 50));
    }
}
