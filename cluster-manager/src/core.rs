//! [`NodeCore`]: every decision a node makes, in one state machine with no
//! sockets, no tasks and no clock.
//!
//! It follows quinn's contract. Time is an input (`now` on every
//! `handle_*`); what the node should do comes out of it:
//! [`NodeCore::poll_event`] (completions for waiting senders, membership
//! events, peers gone), [`NodeCore::poll_transmit`] (messages to send
//! again on the link to the message server) and [`NodeCore::poll_timeout`]
//! (when to call [`NodeCore::handle_timeout`]). The runtime drives it: it
//! feeds it what its sockets read and carries out what it polls.
//!
//! Beside it, one file per concept holds the rules it applies: [`crate::path`]
//! (which path, the switch rule, fallback), [`crate::link`] (back-off,
//! heartbeat deadline, primary probe), [`crate::members`] (who is a member,
//! failure deadlines), [`crate::tracker`] (outcomes, resend order),
//! [`crate::dedup`] (the duplicate window), [`crate::activation`] (hot
//! pairs) and [`crate::channels`] (a direct channel's idle and probe
//! deadlines).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use transports::protocol::{
    valid_name, Ack, AckStatus, Acks, DeliveryFailure, MemberEvent, MemberInfo, MessageHeader,
    MessageKind, NodeId, Role, Routed, Target,
};

use crate::activation::AutoActivation;
use crate::dedup::{Dedup, Seen};
use crate::error::SendError;
use crate::link::{LinkAction, LinkPolicy, LinkState};
use crate::members::{Change, Members, MembershipEvent, Update};
use crate::path::{self, Fallback, Path, PathFacts, TargetKind, TooLarge};
use crate::tracker::{Awaiting, Completion, DeliveryTracker, Resend};

/// What a node's core is configured with.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// This node.
    pub id: NodeId,
    /// Its incarnation at start.
    pub incarnation: u64,
    /// Its role.
    pub role: Role,
    /// Its groups.
    pub groups: Vec<String>,
    /// Bodies above this go over lazy channels (`lazy.threshold_bytes`).
    pub lazy_threshold_bytes: u64,
    /// Services allowed on lazy channels (`lazy.services`; `"*"` for all).
    pub lazy_services: Vec<String>,
    /// Messages within the window that make a pair hot (0: never).
    pub auto_activate_messages: u64,
    /// The auto-activation window.
    pub auto_activate_window: Duration,
    /// The largest body this node sends (`limits.max_message_bytes`).
    pub max_message_bytes: u64,
    /// The largest body the message-server path carries (negotiated).
    pub server_max_message_bytes: u64,
    /// The link's timing.
    pub link: LinkPolicy,
}

/// A message the application hands over, as path choice sees it.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// Where it goes.
    pub target: &'a Target,
    /// The service it addresses.
    pub service: &'a str,
    /// Its body's size.
    pub body_len: u64,
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through the message server.
    Server,
    /// Over the lazy channel to this node (opened if needed; if it cannot
    /// be, ask [`NodeCore::handle_open_failed`]).
    Lazy(NodeId),
    /// Resolve the members through the message server, then send to each
    /// over its lazy channel.
    LazyFanOut,
}

/// What a received message is to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    /// New: deliver it (from this sender, its id shared).
    Deliver(NodeId),
    /// Delivered before: acknowledge it again, do not deliver it again.
    Duplicate(NodeId),
    /// From an incarnation declared failed: refuse it.
    Refused,
    /// Older than the duplicate window of its sender: it may have been
    /// delivered, so it is not delivered again, and it may not have been,
    /// so it is not acknowledged as accepted. Refuse it, so that its
    /// sender learns of it.
    Stale(NodeId),
}

/// What the node should do, besides sending.
#[derive(Debug)]
pub enum Event<W> {
    /// A tracked message has its outcome: hand it to its waiter.
    Completed(W, Completion),
    /// Tell the application.
    Membership(MembershipEvent),
    /// The members changed, while the application is told nothing (see
    /// [`NodeCore::set_membership_reporting`]): what waits on a member's
    /// state should look again. Once per run of changes.
    MembersChanged,
    /// A member is gone for good: close its direct channels.
    PeerGone(NodeId),
    /// Receivers missed a message that nobody waits on (a `notify`, or a
    /// send whose caller gave up): count it, never lose it silently.
    LateFailure(Routed),
}

/// A message to send again on the link to the message server.
pub type Transmit = (MessageHeader, Bytes);

/// Every decision a node makes. `W` is whatever wakes a waiting sender.
#[derive(Debug)]
pub struct NodeCore<W> {
    config: CoreConfig,
    /// Whether the allow-list holds `"*"`: decided once, not per message.
    all_services_allowed: bool,
    incarnation: u64,
    next_seq: u64,
    tracker: DeliveryTracker<W>,
    dedup: Dedup,
    members: Members,
    activation: AutoActivation,
    link: LinkState,
    events: VecDeque<Event<W>>,
    transmits: VecDeque<Transmit>,
}

impl<W> NodeCore<W> {
    /// The core of a node registered at `now` with the message server at
    /// address `index`, which welcomed it with `members`.
    pub fn new(config: CoreConfig, members: Vec<MemberInfo>, index: usize, now: Instant) -> Self {
        let grace = config.link.failure_timeout;
        NodeCore {
            all_services_allowed: config.lazy_services.iter().any(|s| s == "*"),
            incarnation: config.incarnation,
            next_seq: 1,
            tracker: DeliveryTracker::new(),
            dedup: Dedup::default(),
            members: Members::new(members, grace),
            activation: AutoActivation::new(
                config.auto_activate_messages,
                config.auto_activate_window,
            ),
            link: LinkState::new(config.link, index, now),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            config,
        }
    }

    /// This node.
    pub fn id(&self) -> &NodeId {
        &self.config.id
    }

    /// The current incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// The members (this node's view).
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// The messages awaiting an outcome.
    pub fn tracker(&self) -> &DeliveryTracker<W> {
        &self.tracker
    }

    /// The link to the message server.
    pub fn link(&self) -> &LinkState {
        &self.link
    }

    /// The next sequence number: every message takes one.
    pub fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    // ---- sending ----------------------------------------------------

    /// Checks a message and chooses its path at `now`. `lazy_open` says
    /// whether a lazy channel to the message's node (if it has one) is
    /// open: the runtime holds the channels.
    ///
    /// # Errors
    ///
    /// `PayloadTooLarge`, `InvalidName`, or, for a body only a lazy channel
    /// could carry to a node that announced no address,
    /// `DirectUnavailable`.
    pub fn handle_send(
        &mut self,
        now: Instant,
        msg: &Outgoing<'_>,
        lazy_open: bool,
    ) -> Result<Route, SendError> {
        self.check_size(msg.body_len)?;
        let target_name = match msg.target {
            Target::Node(id) => id.as_str(),
            Target::Group(g) | Target::AnyOf(g) => g,
            Target::All => "all",
        };
        for name in [msg.service, target_name] {
            if !valid_name(name) {
                return Err(SendError::InvalidName(name.chars().take(64).collect()));
            }
        }
        let threshold = self.config.lazy_threshold_bytes;
        let allowed = self.service_allowed(msg.service);
        let (kind, peer) = match msg.target {
            Target::Node(id) => (TargetKind::Node, Some(id)),
            Target::AnyOf(_) => (TargetKind::AnyOf, None),
            Target::Group(_) | Target::All => (TargetKind::FanOut, None),
        };
        let mut facts = PathFacts {
            body_len: msg.body_len,
            target: kind,
            service_allowed: allowed,
            lazy_open: false,
            hot_pair: false,
            target_reachable: false,
            server_in_flight: 0,
        };
        if let (Some(peer), true) = (peer, allowed) {
            facts.lazy_open = lazy_open;
            facts.hot_pair = self.activation.handle_message(peer, now);
            // Only a message that could go direct needs the address.
            if path::could_go_direct(threshold, msg.body_len, facts.lazy_open, facts.hot_pair) {
                facts.target_reachable =
                    *peer != self.config.id && self.members.direct_addr(peer).is_some();
                if facts.target_reachable && msg.body_len <= threshold {
                    facts.server_in_flight = self.tracker.server_in_flight(peer);
                }
            }
        }
        match (path::choose(threshold, facts), peer) {
            (Path::Lazy, Some(peer)) => Ok(Route::Lazy(peer.clone())),
            (Path::LazyFanOut, _) => Ok(Route::LazyFanOut),
            _ => {
                self.check_server_size(msg)?;
                Ok(Route::Server)
            }
        }
    }

    /// The lazy channel to `peer` could not be opened (`reason`): the
    /// fallback rule says whether `msg` goes through the message server.
    ///
    /// # Errors
    ///
    /// `DirectUnavailable` when the message-server path cannot carry it.
    pub fn handle_open_failed(
        &self,
        peer: &NodeId,
        body_len: u64,
        reason: String,
    ) -> Result<Route, SendError> {
        match path::fallback(body_len, self.config.server_max_message_bytes) {
            Fallback::Server => {
                tracing::debug!(%peer, %reason, "no lazy channel; falling back to the message server");
                Ok(Route::Server)
            }
            Fallback::Fail => Err(SendError::DirectUnavailable {
                node: peer.clone(),
                reason,
            }),
        }
    }

    /// Whether `service` may use lazy channels.
    pub fn service_allowed(&self, service: &str) -> bool {
        self.all_services_allowed || path::service_allowed(&self.config.lazy_services, service)
    }

    fn check_size(&self, body_len: u64) -> Result<(), SendError> {
        let max = self.config.max_message_bytes;
        if body_len > max {
            return Err(SendError::PayloadTooLarge {
                size: body_len,
                max,
            });
        }
        Ok(())
    }

    /// The error for a body the message-server path cannot carry.
    fn check_server_size(&self, msg: &Outgoing<'_>) -> Result<(), SendError> {
        let max = self.config.server_max_message_bytes;
        if msg.body_len <= max {
            return Ok(());
        }
        if let Target::Node(peer) = msg.target {
            let other_member = *peer != self.config.id && self.members.is_member(peer);
            let why = path::too_large(
                self.config.lazy_threshold_bytes,
                msg.body_len,
                self.service_allowed(msg.service),
                other_member,
            );
            if why == TooLarge::NoDirectAddress {
                return Err(SendError::DirectUnavailable {
                    node: peer.clone(),
                    reason: "it announced no direct-channel address".into(),
                });
            }
        }
        Err(SendError::PayloadTooLarge {
            size: msg.body_len,
            max,
        })
    }

    /// Checks a one-way message to `peer` over a session channel and
    /// numbers it: returns its sequence number and this node's
    /// incarnation.
    ///
    /// # Errors
    ///
    /// `PayloadTooLarge`, `InvalidName`; `NotADispatcher` unless this node
    /// is a dispatcher; `NotInSessionGroup` unless `peer` is a server node
    /// of its group.
    pub fn handle_session_send(
        &mut self,
        peer: &NodeId,
        service: &str,
        body_len: u64,
    ) -> Result<(u64, u64), SendError> {
        self.check_size(body_len)?;
        if !valid_name(service) {
            return Err(SendError::InvalidName(service.chars().take(64).collect()));
        }
        if self.config.role != Role::Dispatcher {
            return Err(SendError::NotADispatcher);
        }
        if !self.is_session_peer(peer) {
            return Err(SendError::NotInSessionGroup { node: peer.clone() });
        }
        Ok((self.next_seq(), self.incarnation))
    }

    /// Whether `peer` is a server node sharing a group with this
    /// dispatcher: a session channel's only allowed target.
    pub fn is_session_peer(&self, peer: &NodeId) -> bool {
        *peer != self.config.id
            && self.members.get(peer.as_str()).is_some_and(|m| {
                m.role == Role::Server
                    && m.groups
                        .iter()
                        .any(|g| self.config.groups.iter().any(|c| c == g))
            })
    }

    /// Tracks message `seq` until its outcome is known; `resend` is kept
    /// for one sent through the message server (sent again after a
    /// reconnect).
    pub fn track(
        &mut self,
        seq: u64,
        target: Target,
        service: Arc<str>,
        awaiting: Awaiting,
        waiter: W,
        resend: Option<Resend>,
    ) {
        self.tracker.track(seq, target, service, awaiting, waiter);
        if let Some(resend) = resend {
            self.tracker.mark_via_server(seq, resend);
        }
    }

    /// Tracks a fan-out this node sends to each of `members` itself.
    pub fn track_fan_out(
        &mut self,
        seq: u64,
        target: Target,
        service: Arc<str>,
        awaiting: Awaiting,
        members: Vec<NodeId>,
        waiter: W,
    ) {
        let done = self
            .tracker
            .track_expecting(seq, target, service, awaiting, members, waiter);
        self.complete(done);
    }

    /// The sender stopped waiting for message `seq` (its deadline passed,
    /// or it was dropped): it is no longer tracked, nor resent. Returns
    /// the receivers that had not answered.
    pub fn handle_cancel(&mut self, seq: u64) -> Option<(W, Vec<NodeId>)> {
        self.tracker.cancel(seq)
    }

    /// Receiver `node` of message `seq` failed for a reason this node
    /// found itself (a channel broke or could not be opened).
    pub fn handle_failure(&mut self, seq: u64, node: &NodeId, error: SendError) {
        let done = self.tracker.handle_failure(seq, node, error);
        self.complete(done);
    }

    // ---- receiving --------------------------------------------------

    /// A message from `sender`'s `incarnation` numbered `seq` arrived:
    /// whether to deliver it. One-way messages are never resent, so they
    /// skip the duplicate window.
    pub fn handle_message(
        &mut self,
        sender: &str,
        incarnation: u64,
        seq: u64,
        kind: MessageKind,
    ) -> Receipt {
        if self.members.is_failed(sender, incarnation) {
            return Receipt::Refused;
        }
        if kind == MessageKind::Notify {
            return Receipt::Deliver(self.members.id_of(sender));
        }
        match self.dedup.handle_message(sender, incarnation, seq) {
            (id, Seen::New) => Receipt::Deliver(id),
            (id, Seen::Duplicate) => Receipt::Duplicate(id),
            (id, Seen::Stale) => Receipt::Stale(id),
        }
    }

    /// A reply from `sender` to this node's request `request_seq` (sent by
    /// `requester_incarnation`).
    pub fn handle_reply(
        &mut self,
        sender: &str,
        requester_incarnation: u64,
        request_seq: u64,
        body: Bytes,
    ) {
        if requester_incarnation != self.incarnation {
            return;
        }
        let from = self.members.id_of(sender);
        let done = self.tracker.handle_reply(request_seq, &from, body);
        self.complete(done);
    }

    /// An error answer from `sender` to this node's request `request_seq`
    /// (sent by `requester_incarnation`): `code` from the application's
    /// `reply_err`, or `None` when the request was dropped without a
    /// reply; `text` is the error's text.
    pub fn handle_reply_error(
        &mut self,
        sender: &str,
        requester_incarnation: u64,
        request_seq: u64,
        code: Option<u32>,
        text: &[u8],
    ) {
        if requester_incarnation != self.incarnation {
            return;
        }
        let from = self.members.id_of(sender);
        let error = match code {
            Some(code) => SendError::Remote {
                node: from.clone(),
                code,
                text: String::from_utf8_lossy(text).into_owned(),
            },
            None => SendError::NoReply { node: from.clone() },
        };
        let done = self.tracker.handle_reply_error(request_seq, &from, error);
        self.complete(done);
    }

    /// A receiver's acknowledgement.
    pub fn handle_ack(&mut self, ack: &Ack) {
        if ack.to_incarnation != self.incarnation {
            tracing::trace!(seq = ack.seq, "dropping ack for another incarnation");
            return;
        }
        if self.tracker.is_tracked(ack.seq) {
            let done = self.tracker.handle_ack(ack);
            self.complete(done);
        } else if let AckStatus::Failed(f) = &ack.status {
            self.events.push_back(Event::LateFailure(Routed {
                seq: ack.seq,
                receivers: vec![],
                failed: vec![(ack.from.clone(), f.clone())],
                error: None,
            }));
        }
    }

    /// Several acknowledgements of accepted messages.
    pub fn handle_acks(&mut self, acks: &Acks) {
        if acks.to_incarnation != self.incarnation {
            tracing::trace!(n = acks.seqs.len(), "dropping acks for another incarnation");
            return;
        }
        for &seq in &acks.seqs {
            let done = self.tracker.handle_accepted(seq, &acks.from);
            self.complete(done);
        }
    }

    /// The message server's word on where a message went. A `Node`
    /// message to a member that is only reconnecting (the server does not
    /// know it right now) is parked: it goes out again when that member
    /// registers.
    pub fn handle_routed(&mut self, routed: Routed) {
        if routed.error == Some(DeliveryFailure::UnknownTarget) {
            let parked_for = self
                .tracker
                .waiting(routed.seq)
                .filter(|w| w.resendable)
                .and_then(|w| match w.target {
                    Target::Node(id) => Some(id.clone()),
                    _ => None,
                });
            if let Some(node) = parked_for {
                if self.members.is_member(&node) {
                    tracing::debug!(%node, seq = routed.seq, "target reconnecting: message parked");
                    return;
                }
            }
        }
        if !self.tracker.is_tracked(routed.seq) {
            self.events.push_back(Event::LateFailure(routed));
            return;
        }
        let members = &self.members;
        let done = self
            .tracker
            .handle_routed(&routed, |id, inc| members.is_live(id, inc));
        self.complete(done);
    }

    // ---- membership and the link ------------------------------------

    /// Whether membership changes become [`Event::Membership`] events (by
    /// default they do) or only [`Event::MembersChanged`]: off while the
    /// application does not listen (see [`Members::set_reporting`]).
    pub fn set_membership_reporting(&mut self, report: bool) {
        self.members.set_reporting(report);
    }

    /// A membership event from the message server.
    pub fn handle_member_event(&mut self, now: Instant, event: MemberEvent) {
        let update = self.members.handle_event(now, event);
        self.apply(update);
    }

    /// The link broke (or was dropped for the primary) at `now`.
    pub fn handle_link_lost(&mut self, now: Instant) {
        self.link.handle_lost(now);
        self.events
            .push_back(Event::Membership(MembershipEvent::Disconnected));
    }

    /// Registered again at `now`, with address `index`, which welcomed
    /// this node with `members`. Members it lacks get the failure timeout
    /// to register; every message awaiting an outcome through the message
    /// server is sent again, in sequence order, before anything newer
    /// ([`NodeCore::poll_transmit`]).
    pub fn handle_link_up(&mut self, now: Instant, index: usize, members: Vec<MemberInfo>) {
        let mut update = self.members.handle_welcome(now, members);
        // The resend below covers the members that are back.
        update.changes.retain(|c| matches!(c, Change::Left(_)));
        self.apply(update);
        self.link.handle_connected(now, index);
        let resend = self
            .tracker
            .resend_order(&self.config.id, self.incarnation, |_| true);
        self.transmits.clear();
        self.transmits.extend(resend);
    }

    /// A round of connection attempts failed at `now`.
    pub fn handle_attempts_failed(&mut self, now: Instant) {
        self.link.handle_round_failed(now);
    }

    /// A message server said this incarnation was declared failed: the
    /// node rejoins as `incarnation`; what the old one waited for fails
    /// (and with it what would have been resent).
    pub fn handle_new_incarnation(&mut self, now: Instant, incarnation: u64) {
        self.incarnation = incarnation;
        let done = self.tracker.fail_all(&SendError::Disconnected);
        self.complete(done);
        self.link.handle_rejoin(now);
    }

    /// A heartbeat with `nonce` went to the message server.
    pub fn handle_ping(&mut self, nonce: u64) {
        self.link.handle_ping(nonce);
    }

    /// The message server answered the heartbeat `nonce` at `now`; a pong
    /// to no recent ping is not believed (returns false).
    pub fn handle_pong(&mut self, now: Instant, nonce: u64) -> bool {
        self.link.handle_pong(now, nonce)
    }

    /// The node stops: everything pending fails with `error`.
    pub fn handle_shutdown(&mut self, error: &SendError) {
        let done = self.tracker.fail_all(error);
        self.complete(done);
    }

    /// When [`NodeCore::handle_timeout`] has something to do next; `None`
    /// while nothing is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let link = self.link.poll_timeout();
        // Members are declared gone only while the link is up (while it is
        // down, nothing is known).
        let gone = self.members.poll_timeout().filter(|_| self.link.is_up());
        match (link, gone) {
            (Some(l), Some(g)) => Some(l.min(g)),
            (l, g) => l.or(g),
        }
    }

    /// The message server of this link takes no heartbeats: its silence is
    /// not watched (see [`LinkState::handle_no_heartbeats`]).
    pub fn handle_no_heartbeats(&mut self) {
        self.link.handle_no_heartbeats();
    }

    /// What is due at `now`: members whose grace ran out are gone, stale
    /// activation counters are forgotten, and the link's deadlines say
    /// what the runtime should do.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<LinkAction> {
        if self.link.is_up() {
            let update = self.members.handle_timeout(now);
            self.apply(update);
        }
        self.activation.handle_timeout(now);
        self.link.handle_timeout(now)
    }

    /// A lazy channel to `peer` closed for idling: its traffic returns to
    /// the message server until the pair is hot again.
    pub fn handle_channel_idle(&mut self, peer: &NodeId) {
        self.activation.forget(peer);
    }

    // ---- outputs ----------------------------------------------------

    /// The next thing for the runtime to do.
    pub fn poll_event(&mut self) -> Option<Event<W>> {
        self.events.pop_front()
    }

    /// The next message to send again on the link to the message server.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    fn complete(&mut self, done: impl IntoIterator<Item = (W, Completion)>) {
        for (waiter, completion) in done {
            self.events.push_back(Event::Completed(waiter, completion));
        }
    }

    fn apply(&mut self, update: Update) {
        if update.events.is_empty() {
            if update.changed && !matches!(self.events.back(), Some(Event::MembersChanged)) {
                self.events.push_back(Event::MembersChanged);
            }
        } else {
            for event in update.events {
                self.events.push_back(Event::Membership(event));
            }
        }
        for change in update.changes {
            match change {
                Change::Left(id) => {
                    tracing::info!(node = %id, "member left");
                    self.dedup.forget(&id);
                    self.activation.forget(&id);
                    let done = self.tracker.handle_member_left(&id);
                    self.complete(done);
                    self.events.push_back(Event::PeerGone(id));
                }
                Change::Present(id) => {
                    // It was disconnected, so acknowledgements (or the
                    // messages) may be lost: what it has not acknowledged
                    // goes again, in order.
                    let again = self.tracker.resend_order(
                        &self.config.id,
                        self.incarnation,
                        |t| matches!(t, Target::Node(n) if *n == id),
                    );
                    if !again.is_empty() {
                        tracing::debug!(node = %id, messages = again.len(), "member back: resending what it has not acknowledged");
                    }
                    self.transmits.extend(again);
                }
            }
        }
    }
}
