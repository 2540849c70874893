//! Delivery tracking: which acknowledged messages and requests are waiting
//! for whom, and what their outcome is.
//!
//! Pure state: the runtime feeds it routing results, acknowledgements,
//! replies and membership changes, and gets back the completions to hand
//! to the waiting senders (`W` is whatever the runtime uses to wake one,
//! such as a oneshot sender). Timeouts belong to the caller: it calls
//! [`DeliveryTracker::cancel`] when its own deadline passes.
//!
//! Acknowledgements and replies may overtake the message server's routing
//! result (they travel through other connections' queues), so they are
//! recorded even before the set of receivers is known.

use std::sync::Arc;

use bytes::Bytes;
use rustc_hash::FxHashMap;
use transports::protocol::{
    Ack, AckStatus, MessageHeader, MessageKind, NodeId, Priority, Routed, Target,
};

use crate::error::{DeliveryReport, SendError};

/// What is awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaiting {
    /// Acknowledgements from every receiver.
    Acks,
    /// One reply.
    Reply,
}

/// How a tracked message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Every receiver acknowledged (possibly none, for `All` in a cluster of
    /// one).
    Delivered(DeliveryReport),
    /// The reply to a request.
    Replied {
        /// Who replied.
        from: NodeId,
        /// The reply's body.
        body: Bytes,
    },
    /// The message failed.
    Failed(SendError),
}

/// A map keyed by sequence numbers (this node's own).
pub type SeqMap<V> = FxHashMap<u64, V>;

/// A map keyed by names this node chose (the nodes it sends to).
pub type NameMap<K, V> = FxHashMap<K, V>;

/// A message waiting for an outcome, as [`DeliveryTracker::waiting`] shows
/// it.
#[derive(Debug)]
pub struct Waiting<'a, W> {
    /// Its sequence number.
    pub seq: u64,
    /// Where it went.
    pub target: &'a Target,
    /// The service it addressed.
    pub service: &'a Arc<str>,
    /// Who waits on it.
    pub waiter: &'a W,
    /// Whether it went through the message server (and is kept for
    /// resending after a reconnect).
    pub resendable: bool,
}

impl<'a, W> Waiting<'a, W> {
    fn of(seq: u64, p: &'a Pending<W>) -> Self {
        Waiting {
            seq,
            target: &p.target,
            service: &p.service,
            waiter: &p.waiter,
            resendable: p.resend.is_some(),
        }
    }
}

#[derive(Debug)]
struct Pending<W> {
    waiter: W,
    target: Target,
    service: Arc<str>,
    awaiting: Awaiting,
    /// Receivers, once known, if not just the `Node` target (see
    /// [`Pending::expected`]): from the routing result, or the members of
    /// a fan-out the sender sends itself.
    expected: Option<Vec<NodeId>>,
    delivered: Vec<NodeId>,
    failed: Vec<(NodeId, SendError)>,
    /// Set for a `Node` message sent through the message server: counted
    /// in [`DeliveryTracker::server_in_flight`].
    via_server: bool,
    /// What a reconnect sends again, for a message sent through the
    /// message server (the rest of its frame is above).
    resend: Option<Resend>,
}

/// What a message sent through the message server keeps for resending
/// until its outcome is known: what its entry does not hold already (the
/// sender is this node, in its current incarnation, as the tracker is
/// emptied when the incarnation changes).
#[derive(Debug, Clone)]
pub struct Resend {
    /// The message's kind.
    pub kind: MessageKind,
    /// Its priority.
    pub priority: Priority,
    /// When it expires (Unix milliseconds), if it does.
    pub expires_ms: Option<u64>,
    /// Its body (a reference, not a copy).
    pub body: Bytes,
}

impl<W> Pending<W> {
    /// Receivers, once known: a `Node` target's one node from the start
    /// (no list is allocated for it), others from `expected`.
    fn expected(&self) -> Option<&[NodeId]> {
        match (&self.expected, &self.target) {
            (Some(known), _) => Some(known),
            (None, Target::Node(id)) => Some(std::slice::from_ref(id)),
            (None, _) => None,
        }
    }

    fn accounted(&self, id: &NodeId) -> bool {
        self.delivered.contains(id) || self.failed.iter().any(|(n, _)| n == id)
    }

    fn is_settled(&self) -> bool {
        match self.expected() {
            None => false,
            Some(expected) => expected.iter().all(|id| self.accounted(id)),
        }
    }

    fn outcome(mut self) -> (W, Completion) {
        self.delivered.sort();
        self.failed.sort_by(|a, b| a.0.cmp(&b.0));
        let single = matches!(self.target, Target::Node(_) | Target::AnyOf(_));
        let completion = if self.awaiting == Awaiting::Reply || (single && !self.failed.is_empty())
        {
            match self.failed.into_iter().next() {
                Some((_, e)) => Completion::Failed(e),
                // A request settles only through a reply or a failure.
                None => Completion::Failed(SendError::Disconnected),
            }
        } else if self.failed.is_empty() {
            Completion::Delivered(DeliveryReport {
                delivered: self.delivered,
                failed: vec![],
            })
        } else {
            Completion::Failed(SendError::Incomplete(DeliveryReport {
                delivered: self.delivered,
                failed: self.failed,
            }))
        };
        (self.waiter, completion)
    }
}

/// The messages a node waits on, by sequence number.
#[derive(Debug)]
pub struct DeliveryTracker<W> {
    pending: SeqMap<Pending<W>>,
    /// Unsettled `Node` messages sent through the message server, per node.
    server_in_flight: NameMap<NodeId, usize>,
}

impl<W> Default for DeliveryTracker<W> {
    fn default() -> Self {
        DeliveryTracker {
            pending: SeqMap::default(),
            server_in_flight: NameMap::default(),
        }
    }
}

impl<W> DeliveryTracker<W> {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages waiting for an outcome.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Message `seq`, if it is waiting for an outcome: its target, service
    /// and waiter.
    pub fn waiting(&self, seq: u64) -> Option<Waiting<'_, W>> {
        self.pending.get(&seq).map(|p| Waiting::of(seq, p))
    }

    /// Every message waiting for an outcome, in no particular order.
    pub fn all_waiting(&self) -> impl Iterator<Item = Waiting<'_, W>> {
        self.pending.iter().map(|(seq, p)| Waiting::of(*seq, p))
    }

    /// Whether message `seq` is waiting for an outcome.
    pub fn is_tracked(&self, seq: u64) -> bool {
        self.pending.contains_key(&seq)
    }

    /// Starts tracking message `seq`.
    pub fn track(
        &mut self,
        seq: u64,
        target: Target,
        service: Arc<str>,
        awaiting: Awaiting,
        waiter: W,
    ) {
        self.pending.insert(
            seq,
            Pending {
                waiter,
                target,
                service,
                awaiting,
                expected: None,
                delivered: Vec::new(),
                failed: Vec::new(),
                via_server: false,
                resend: None,
            },
        );
    }

    /// Notes that message `seq` went through the message server, keeping
    /// `resend` to send it again after a reconnect; for a `Node` message,
    /// a switch of that node's traffic to a direct channel then waits
    /// until nothing sent the other way is still unsettled (order).
    pub fn mark_via_server(&mut self, seq: u64, resend: Resend) {
        let Some(p) = self.pending.get_mut(&seq) else {
            return;
        };
        p.resend = Some(resend);
        if let (false, Target::Node(id)) = (p.via_server, &p.target) {
            p.via_server = true;
            // The id is cloned only for a node not counted yet.
            match self.server_in_flight.get_mut(id) {
                Some(n) => *n += 1,
                None => {
                    self.server_in_flight.insert(id.clone(), 1);
                }
            }
        }
    }

    /// Unsettled `Node` messages to `node` sent through the message server.
    pub fn server_in_flight(&self, node: &NodeId) -> usize {
        self.server_in_flight.get(node).copied().unwrap_or(0)
    }

    /// The messages kept for resending whose target `keep` selects, in
    /// sequence order (the order they were first sent in), as the headers
    /// and bodies `sender`'s `incarnation` sends again: after a reconnect
    /// all of them go out before anything newer; after a receiver
    /// re-registers, those to it. Receivers drop the duplicates.
    pub fn resend_order(
        &self,
        sender: &NodeId,
        incarnation: u64,
        keep: impl Fn(&Target) -> bool,
    ) -> Vec<(MessageHeader, Bytes)> {
        let mut chosen: Vec<(u64, &Pending<W>, &Resend)> = self
            .pending
            .iter()
            .filter_map(|(seq, p)| Some((*seq, p, p.resend.as_ref()?)))
            .filter(|(_, p, _)| keep(&p.target))
            .collect();
        // The rare walks after a reconnect sort; sends never do.
        chosen.sort_unstable_by_key(|(seq, _, _)| *seq);
        chosen
            .into_iter()
            .map(|(seq, p, resend)| {
                let header = MessageHeader {
                    sender: sender.clone(),
                    incarnation,
                    seq,
                    target: p.target.clone(),
                    service: p.service.clone(),
                    kind: resend.kind,
                    priority: resend.priority,
                    expires_ms: resend.expires_ms,
                };
                (header, resend.body.clone())
            })
            .collect()
    }

    /// Removes a pending entry, keeping the per-node counts right.
    fn take(&mut self, seq: u64) -> Option<Pending<W>> {
        let p = self.pending.remove(&seq)?;
        if let (true, Target::Node(id)) = (p.via_server, &p.target) {
            if let Some(n) = self.server_in_flight.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    self.server_in_flight.remove(id);
                }
            }
        }
        Some(p)
    }

    /// Starts tracking message `seq` whose receivers the sender already
    /// knows (a fan-out it sends to each member itself).
    pub fn track_expecting(
        &mut self,
        seq: u64,
        target: Target,
        service: Arc<str>,
        awaiting: Awaiting,
        expected: Vec<NodeId>,
        waiter: W,
    ) -> Option<(W, Completion)> {
        self.track(seq, target, service, awaiting, waiter);
        if let Some(p) = self.pending.get_mut(&seq) {
            p.expected = Some(expected);
        }
        self.settle(seq)
    }

    /// Receiver `node` of message `seq` failed for a reason the sender
    /// found itself (a direct channel broke, could not be opened, ...).
    pub fn handle_failure(
        &mut self,
        seq: u64,
        node: &NodeId,
        error: SendError,
    ) -> Option<(W, Completion)> {
        let p = self.pending.get_mut(&seq)?;
        if p.accounted(node) {
            return None;
        }
        p.failed.push((node.clone(), error));
        if p.expected().is_none() {
            p.expected = Some(vec![node.clone()]);
        }
        self.settle(seq)
    }

    /// Stops tracking `seq` (its sender gave up, for example on timeout);
    /// returns the waiter and the receivers still unaccounted for (empty if
    /// they were not yet known).
    pub fn cancel(&mut self, seq: u64) -> Option<(W, Vec<NodeId>)> {
        let p = self.take(seq)?;
        let missing = p
            .expected()
            .map(|e| e.iter().filter(|id| !p.accounted(id)).cloned().collect())
            .unwrap_or_default();
        Some((p.waiter, missing))
    }

    fn settle(&mut self, seq: u64) -> Option<(W, Completion)> {
        if self.pending.get(&seq)?.is_settled() {
            self.take(seq).map(Pending::outcome)
        } else {
            None
        }
    }

    /// The message server's word on where `routed.seq` went. `is_live`
    /// tells whether a receiver incarnation is still a member: one that
    /// already left counts as stopped with the message in flight.
    pub fn handle_routed(
        &mut self,
        routed: &Routed,
        is_live: impl Fn(&NodeId, u64) -> bool,
    ) -> Option<(W, Completion)> {
        let p = self.pending.get_mut(&routed.seq)?;
        if routed.error.is_some() && p.expected().is_some() && !routed.failed.is_empty() {
            // The sender knows its receivers (one node, or a fan-out it sends
            // itself): the failure is that receiver's, not the whole
            // message's.
            for (id, failure) in &routed.failed {
                if !p.accounted(id) {
                    let e = SendError::from_failure(failure, &p.target, Some(id), &p.service);
                    p.failed.push((id.clone(), e));
                }
            }
            return self.settle(routed.seq);
        }
        if let Some(failure) = &routed.error {
            let node = routed.failed.first().map(|(n, _)| n);
            let err = SendError::from_failure(failure, &p.target, node, &p.service);
            let p = self.take(routed.seq)?;
            return Some((p.waiter, Completion::Failed(err)));
        }
        let mut expected: Vec<NodeId> = routed.receivers.iter().map(|(id, _)| id.clone()).collect();
        for (id, failure) in &routed.failed {
            expected.push(id.clone());
            if !p.accounted(id) {
                let e = SendError::from_failure(failure, &p.target, Some(id), &p.service);
                p.failed.push((id.clone(), e));
            }
        }
        for (id, incarnation) in &routed.receivers {
            if !p.accounted(id) && !is_live(id, *incarnation) {
                p.failed.push((
                    id.clone(),
                    SendError::TargetStopped {
                        node: id.clone(),
                        in_flight: true,
                    },
                ));
            }
        }
        if let Some(known) = p.expected() {
            // A `Node` target: keep the one receiver known at send time.
            for id in known {
                if !expected.contains(id) {
                    expected.push(id.clone());
                }
            }
        }
        p.expected = Some(expected);
        self.settle(routed.seq)
    }

    /// A receiver's acknowledgement. The caller has checked that it is meant
    /// for this incarnation.
    pub fn handle_ack(&mut self, ack: &Ack) -> Option<(W, Completion)> {
        let p = self.pending.get_mut(&ack.seq)?;
        if p.accounted(&ack.from) {
            return None;
        }
        match &ack.status {
            AckStatus::Accepted => p.delivered.push(ack.from.clone()),
            AckStatus::Failed(failure) => {
                let e = SendError::from_failure(failure, &p.target, Some(&ack.from), &p.service);
                p.failed.push((ack.from.clone(), e));
            }
        }
        self.settle(ack.seq)
    }

    /// [`DeliveryTracker::handle_ack`] for an `Accepted` acknowledgement of
    /// message `seq` by `from` (one of a batch); `None` also when `seq` is
    /// not tracked.
    pub fn handle_accepted(&mut self, seq: u64, from: &NodeId) -> Option<(W, Completion)> {
        let p = self.pending.get_mut(&seq)?;
        if p.accounted(from) {
            return None;
        }
        p.delivered.push(from.clone());
        if p.is_settled() {
            self.take(seq).map(Pending::outcome)
        } else {
            None
        }
    }

    /// Request `request_seq`, taken out if `from` may answer it: only
    /// the receiver the request went to (any, for `AnyOf` before the
    /// routing result names it).
    fn take_answered(&mut self, request_seq: u64, from: &NodeId) -> Option<Pending<W>> {
        match self.pending.get(&request_seq) {
            Some(p)
                if p.awaiting == Awaiting::Reply
                    && p.expected().is_none_or(|e| e.contains(from)) => {}
            _ => return None,
        }
        self.take(request_seq)
    }

    /// The reply to request `request_seq`.
    pub fn handle_reply(
        &mut self,
        request_seq: u64,
        from: &NodeId,
        body: Bytes,
    ) -> Option<(W, Completion)> {
        let p = self.take_answered(request_seq, from)?;
        Some((
            p.waiter,
            Completion::Replied {
                from: from.clone(),
                body,
            },
        ))
    }

    /// An error answer (see [`SendError::Remote`], [`SendError::NoReply`])
    /// from `from` to request `request_seq`: it fails with `error`.
    pub fn handle_reply_error(
        &mut self,
        request_seq: u64,
        from: &NodeId,
        error: SendError,
    ) -> Option<(W, Completion)> {
        let p = self.take_answered(request_seq, from)?;
        Some((p.waiter, Completion::Failed(error)))
    }

    /// A member left: every message waiting on it fails for that receiver
    /// (it may have been delivered).
    pub fn handle_member_left(&mut self, id: &NodeId) -> Vec<(W, Completion)> {
        let mut settled = Vec::new();
        for (seq, p) in self.pending.iter_mut() {
            let waits = p.expected().is_some_and(|e| e.contains(id)) && !p.accounted(id);
            if waits {
                p.failed.push((
                    id.clone(),
                    SendError::TargetStopped {
                        node: id.clone(),
                        in_flight: true,
                    },
                ));
                if p.is_settled() {
                    settled.push(*seq);
                }
            }
        }
        settled
            .into_iter()
            .filter_map(|seq| self.take(seq).map(Pending::outcome))
            .collect()
    }

    /// Fails everything still waiting, as when the connection is lost.
    pub fn fail_all(&mut self, error: &SendError) -> Vec<(W, Completion)> {
        self.server_in_flight.clear();
        self.pending
            .drain()
            .map(|(_, p)| (p.waiter, Completion::Failed(error.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use transports::protocol::DeliveryFailure;

    fn id(s: &str) -> NodeId {
        NodeId::new(s)
    }

    fn ack(seq: u64, from: &str, status: AckStatus) -> Ack {
        Ack {
            to: id("me"),
            to_incarnation: 1,
            seq,
            from: id(from),
            from_incarnation: 7,
            status,
        }
    }

    fn routed(
        seq: u64,
        receivers: &[&str],
        failed: Vec<(NodeId, DeliveryFailure)>,
        error: Option<DeliveryFailure>,
    ) -> Routed {
        Routed {
            seq,
            receivers: receivers.iter().map(|r| (id(r), 7)).collect(),
            failed,
            error,
        }
    }

    fn svc() -> Arc<str> {
        Arc::from("svc")
    }

    #[test]
    fn node_send_completes_on_ack() {
        let mut t = DeliveryTracker::new();
        t.track(1, Target::Node(id("b")), svc(), Awaiting::Acks, "w1");
        let (w, c) = t
            .handle_ack(&ack(1, "b", AckStatus::Accepted))
            .expect("settled");
        assert_eq!(w, "w1");
        assert_eq!(
            c,
            Completion::Delivered(DeliveryReport {
                delivered: vec![id("b")],
                failed: vec![]
            })
        );
        assert!(t.is_empty());
        assert!(
            t.handle_ack(&ack(1, "b", AckStatus::Accepted)).is_none(),
            "a late duplicate is ignored"
        );
    }

    /// A batched acceptance settles like a plain ack: once per receiver,
    /// ignored when untracked or already counted.
    #[test]
    fn batched_acceptances_settle_like_acks() {
        let mut t = DeliveryTracker::new();
        t.track(1, Target::Group("g".into()), svc(), Awaiting::Acks, "w1");
        assert!(t
            .handle_routed(&routed(1, &["a", "b"], vec![], None), |_, _| true)
            .is_none());
        assert!(t.handle_accepted(1, &id("a")).is_none());
        assert!(t.handle_accepted(1, &id("a")).is_none(), "counted once");
        assert!(t.handle_accepted(9, &id("a")).is_none(), "untracked");
        let (w, c) = t.handle_accepted(1, &id("b")).expect("settled");
        assert_eq!(w, "w1");
        assert_eq!(
            c,
            Completion::Delivered(DeliveryReport {
                delivered: vec![id("a"), id("b")],
                failed: vec![]
            })
        );
        assert!(t.is_empty());
    }

    #[test]
    fn group_send_waits_for_routed_and_all_acks_in_any_order() {
        let mut t = DeliveryTracker::new();
        t.track(5, Target::Group("g".into()), svc(), Awaiting::Acks, ());
        // An ack overtakes the routing result.
        assert!(t.handle_ack(&ack(5, "a", AckStatus::Accepted)).is_none());
        assert!(t
            .handle_routed(&routed(5, &["a", "b"], vec![], None), |_, _| true)
            .is_none());
        let (_, c) = t
            .handle_ack(&ack(5, "b", AckStatus::Accepted))
            .expect("settled");
        assert_eq!(
            c,
            Completion::Delivered(DeliveryReport {
                delivered: vec![id("a"), id("b")],
                failed: vec![]
            })
        );
    }

    #[test]
    fn outcomes_table() {
        type Case = (&'static str, Target, Vec<Step>, Completion);
        enum Step {
            Routed(Routed),
            Ack(Ack),
            Left(&'static str),
        }
        let stopped = |n: &str| SendError::TargetStopped {
            node: id(n),
            in_flight: true,
        };
        let cases: Vec<Case> = vec![
            (
                "unknown node",
                Target::Node(id("x")),
                vec![Step::Routed(routed(
                    1,
                    &[],
                    vec![],
                    Some(DeliveryFailure::UnknownTarget),
                ))],
                Completion::Failed(SendError::UnknownTarget(Target::Node(id("x")))),
            ),
            (
                "receiver lacks service",
                Target::Node(id("b")),
                vec![Step::Ack(ack(
                    1,
                    "b",
                    AckStatus::Failed(DeliveryFailure::NoSuchService),
                ))],
                Completion::Failed(SendError::NoSuchService {
                    target: Target::Node(id("b")),
                    service: "svc".into(),
                }),
            ),
            (
                "node target left in flight",
                Target::Node(id("b")),
                vec![Step::Left("b")],
                Completion::Failed(stopped("b")),
            ),
            (
                "all in a cluster of one",
                Target::All,
                vec![Step::Routed(routed(1, &[], vec![], None))],
                Completion::Delivered(DeliveryReport::default()),
            ),
            (
                "group member left",
                Target::Group("g".into()),
                vec![
                    Step::Routed(routed(1, &["a", "b"], vec![], None)),
                    Step::Ack(ack(1, "a", AckStatus::Accepted)),
                    Step::Left("b"),
                ],
                Completion::Failed(SendError::Incomplete(DeliveryReport {
                    delivered: vec![id("a")],
                    failed: vec![(id("b"), stopped("b"))],
                })),
            ),
            (
                "group member overloaded at the server",
                Target::Group("g".into()),
                vec![
                    Step::Routed(routed(
                        1,
                        &["a"],
                        vec![(id("b"), DeliveryFailure::ReceiverOverloaded)],
                        None,
                    )),
                    Step::Ack(ack(1, "a", AckStatus::Accepted)),
                ],
                Completion::Failed(SendError::Incomplete(DeliveryReport {
                    delivered: vec![id("a")],
                    failed: vec![(id("b"), SendError::Overloaded { node: id("b") })],
                })),
            ),
            (
                "any-of routed then acked",
                Target::AnyOf("g".into()),
                vec![
                    Step::Routed(routed(1, &["c"], vec![], None)),
                    Step::Ack(ack(1, "c", AckStatus::Accepted)),
                ],
                Completion::Delivered(DeliveryReport {
                    delivered: vec![id("c")],
                    failed: vec![],
                }),
            ),
        ];
        for (name, target, steps, expected) in cases {
            let mut t = DeliveryTracker::new();
            t.track(1, target, svc(), Awaiting::Acks, ());
            let mut got = None;
            for step in steps {
                let r = match step {
                    Step::Routed(r) => t.handle_routed(&r, |_, _| true),
                    Step::Ack(a) => t.handle_ack(&a),
                    Step::Left(n) => t.handle_member_left(&id(n)).pop(),
                };
                if let Some((_, c)) = r {
                    assert!(got.is_none(), "{name}: settled twice");
                    got = Some(c);
                }
            }
            assert_eq!(got.as_ref(), Some(&expected), "{name}");
            assert!(t.is_empty(), "{name}: nothing left pending");
        }
    }

    fn resend(seq: u64) -> Resend {
        Resend {
            kind: MessageKind::Send,
            priority: Priority::Normal,
            expires_ms: None,
            body: Bytes::from(format!("body {seq}")),
        }
    }

    /// What a reconnect sends again: every message that went through the
    /// message server and awaits its outcome, in sequence order, from the
    /// current incarnation; what went direct, settled or was given up is
    /// not resent.
    #[test]
    fn resend_order_table() {
        let mut t = DeliveryTracker::new();
        for seq in [9u64, 3, 7, 1, 5, 2, 4] {
            let to = if seq % 2 == 0 { "b" } else { "a" };
            t.track(seq, Target::Node(id(to)), svc(), Awaiting::Acks, ());
            // 4 went over a direct channel: tracked, nothing to resend.
            if seq != 4 {
                t.mark_via_server(seq, resend(seq));
            }
        }
        assert!(t.handle_accepted(7, &id("a")).is_some());
        assert!(t.cancel(2).is_some());
        let me = id("me");
        let order = |keep: &dyn Fn(&Target) -> bool| -> Vec<u64> {
            t.resend_order(&me, 5, keep)
                .into_iter()
                .map(|(h, body)| {
                    assert_eq!((h.sender.as_str(), h.incarnation), ("me", 5));
                    assert_eq!(h.kind, MessageKind::Send);
                    assert_eq!(body, format!("body {}", h.seq));
                    h.seq
                })
                .collect()
        };
        type Keep = Box<dyn Fn(&Target) -> bool>;
        let cases: Vec<(&str, Keep, Vec<u64>)> = vec![
            (
                "after a reconnect: all",
                Box::new(|_| true),
                vec![1, 3, 5, 9],
            ),
            (
                "a is back",
                Box::new(|t| *t == Target::Node(id("a"))),
                vec![1, 3, 5, 9],
            ),
            (
                "b is back: 2 given up, 4 went direct",
                Box::new(|t| *t == Target::Node(id("b"))),
                vec![],
            ),
        ];
        for (name, keep, expected) in cases {
            assert_eq!(order(&*keep), expected, "{name}");
        }
        assert!(t.waiting(9).is_some_and(|w| w.resendable));
        assert!(t.waiting(4).is_some_and(|w| !w.resendable));
    }

    #[test]
    fn server_in_flight_counts_node_messages_until_settled() {
        let mut t = DeliveryTracker::new();
        for seq in 1..=3 {
            t.track(seq, Target::Node(id("b")), svc(), Awaiting::Acks, ());
            t.mark_via_server(seq, resend(seq));
            t.mark_via_server(seq, resend(seq)); // twice counts once
        }
        t.track(4, Target::Node(id("b")), svc(), Awaiting::Acks, ()); // direct
        assert_eq!(t.server_in_flight(&id("b")), 3);
        t.handle_ack(&ack(1, "b", AckStatus::Accepted));
        t.cancel(2);
        assert_eq!(t.server_in_flight(&id("b")), 1);
        t.handle_member_left(&id("b"));
        assert_eq!(t.server_in_flight(&id("b")), 0);
        assert!(t.is_empty());
    }

    #[test]
    fn fan_out_sent_by_the_sender_settles_per_member() {
        let mut t = DeliveryTracker::new();
        let expected = vec![id("a"), id("b"), id("c")];
        assert!(t
            .track_expecting(
                9,
                Target::Group("g".into()),
                svc(),
                Awaiting::Acks,
                expected,
                ()
            )
            .is_none());
        assert!(t.handle_ack(&ack(9, "a", AckStatus::Accepted)).is_none());
        // b was sent through the server as a fallback and is gone.
        let r = routed(
            9,
            &[],
            vec![(id("b"), DeliveryFailure::UnknownTarget)],
            Some(DeliveryFailure::UnknownTarget),
        );
        assert!(t.handle_routed(&r, |_, _| true).is_none());
        // c's direct channel broke.
        let (_, c) = t
            .handle_failure(9, &id("c"), SendError::Disconnected)
            .expect("settled");
        assert_eq!(
            c,
            Completion::Failed(SendError::Incomplete(DeliveryReport {
                delivered: vec![id("a")],
                failed: vec![
                    (id("b"), SendError::UnknownTarget(Target::Node(id("b")))),
                    (id("c"), SendError::Disconnected),
                ],
            }))
        );
        // An empty fan-out settles at once.
        let done = t.track_expecting(10, Target::All, svc(), Awaiting::Acks, vec![], ());
        assert_eq!(
            done.map(|(_, c)| c),
            Some(Completion::Delivered(DeliveryReport::default()))
        );
    }

    #[test]
    fn routed_to_a_receiver_that_already_left_fails_it() {
        let mut t = DeliveryTracker::new();
        t.track(3, Target::AnyOf("g".into()), svc(), Awaiting::Acks, ());
        let (_, c) = t
            .handle_routed(&routed(3, &["b"], vec![], None), |_, _| false)
            .expect("settled at once");
        assert_eq!(
            c,
            Completion::Failed(SendError::TargetStopped {
                node: id("b"),
                in_flight: true
            })
        );
    }

    #[test]
    fn requests_settle_on_reply_or_failure() {
        let mut t = DeliveryTracker::new();
        t.track(1, Target::Node(id("b")), svc(), Awaiting::Reply, 1);
        t.track(2, Target::Node(id("b")), svc(), Awaiting::Reply, 2);
        let (w, c) = t
            .handle_reply(1, &id("b"), Bytes::from_static(b"hi"))
            .expect("reply");
        assert_eq!(
            (w, c),
            (
                1,
                Completion::Replied {
                    from: id("b"),
                    body: Bytes::from_static(b"hi")
                }
            )
        );
        let left = t.handle_member_left(&id("b"));
        assert_eq!(left.len(), 1);
        assert_eq!(
            left[0].1,
            Completion::Failed(SendError::TargetStopped {
                node: id("b"),
                in_flight: true
            })
        );
    }

    #[test]
    fn cancel_reports_missing_receivers_and_fail_all_drains() {
        let mut t = DeliveryTracker::new();
        t.track(1, Target::Group("g".into()), svc(), Awaiting::Acks, ());
        t.handle_routed(&routed(1, &["a", "b"], vec![], None), |_, _| true);
        t.handle_ack(&ack(1, "a", AckStatus::Accepted));
        assert_eq!(t.cancel(1).map(|(_, m)| m), Some(vec![id("b")]));
        t.track(2, Target::All, svc(), Awaiting::Acks, ());
        t.track(3, Target::All, svc(), Awaiting::Acks, ());
        assert_eq!(t.fail_all(&SendError::Disconnected).len(), 2);
        assert!(t.is_empty());
    }
}
