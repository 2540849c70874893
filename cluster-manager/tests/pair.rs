//! Two nodes' cores and a message server on a virtual clock, in the manner
//! of quinn's `Pair`: the failover scenarios the process tests cover
//! (`tests/tests/failover.rs`, `failure_detection.rs`, `killed_receiver.rs`,
//! `partition.rs`), driven through [`NodeCore`] alone, in milliseconds.
//!
//! The simulated server routes `Node` messages between connected cores,
//! forwards acknowledgements, answers `Routed` for targets it does not
//! know, and announces members; a crash loses whatever it held. Nothing
//! here sleeps: time moves only when a test says so.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster_manager::core::{CoreConfig, Event, NodeCore, Outgoing, Receipt, Route};
use cluster_manager::link::{LinkAction, LinkPolicy};
use cluster_manager::members::MembershipEvent;
use cluster_manager::tracker::{Awaiting, Completion, Resend};
use cluster_manager::SendError;
use transports::protocol::{
    Ack, AckStatus, DeliveryFailure, LeaveReason, MemberEvent, MemberInfo, MessageHeader,
    MessageKind, NodeId, Role, Routed, Target,
};

const RECONNECT: Duration = Duration::from_millis(100);
const MAX_RECONNECT: Duration = Duration::from_millis(400);
const FAILURE: Duration = Duration::from_millis(1_000);

fn id(s: &str) -> NodeId {
    NodeId::new(s)
}

/// What the server carries.
enum Wire {
    Message(MessageHeader, Bytes),
    Ack(Ack),
}

/// One node: its core, and what it saw.
struct SimNode {
    core: NodeCore<u64>,
    info: MemberInfo,
    connected: bool,
    /// Outcomes, by waiter (the message's number here).
    outcomes: BTreeMap<u64, Completion>,
    /// What the application got: (sender, number, body).
    app: Vec<(NodeId, u64, Bytes)>,
    duplicates: usize,
    membership: Vec<MembershipEvent>,
    gone: Vec<NodeId>,
}

struct Pair {
    now: Instant,
    nodes: BTreeMap<NodeId, SimNode>,
    server_up: bool,
    wire: VecDeque<Wire>,
}

impl Pair {
    /// Nodes `a` and `b`, registered with a running server.
    fn new() -> Pair {
        let now = Instant::now();
        let infos: Vec<MemberInfo> = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, n)| MemberInfo {
                id: id(n),
                incarnation: 10 + i as u64,
                role: Role::Server,
                groups: vec!["g".into()],
                services: vec!["svc".into()],
                direct_addr: None,
                session_key: [0; 32],
                busy: false,
            })
            .collect();
        let nodes = infos
            .iter()
            .map(|info| {
                let config = CoreConfig {
                    id: info.id.clone(),
                    incarnation: info.incarnation,
                    role: Role::Server,
                    groups: info.groups.iter().map(ToString::to_string).collect(),
                    lazy_threshold_bytes: 1 << 16,
                    lazy_services: vec!["*".into()],
                    auto_activate_messages: 0,
                    auto_activate_window: Duration::from_secs(1),
                    max_message_bytes: 1 << 20,
                    server_max_message_bytes: 1 << 20,
                    link: LinkPolicy {
                        addresses: 1,
                        reconnect_delay: RECONNECT,
                        reconnect_max_delay: MAX_RECONNECT,
                        failure_timeout: FAILURE,
                        jitter_seed: 0,
                    },
                };
                let node = SimNode {
                    core: NodeCore::new(config, infos.clone(), 0, now),
                    info: info.clone(),
                    connected: true,
                    outcomes: BTreeMap::new(),
                    app: Vec::new(),
                    duplicates: 0,
                    membership: Vec::new(),
                    gone: Vec::new(),
                };
                (info.id.clone(), node)
            })
            .collect();
        Pair {
            now,
            nodes,
            server_up: true,
            wire: VecDeque::new(),
        }
    }

    fn node(&mut self, n: &str) -> &mut SimNode {
        self.nodes.get_mut(&id(n)).expect("a node of the pair")
    }

    /// `from` sends `count` acknowledged messages to `to`, numbered in
    /// order; returns their numbers.
    fn send(&mut self, from: &str, to: &str, count: usize) -> Vec<u64> {
        let now = self.now;
        let target = Target::Node(id(to));
        let mut seqs = Vec::new();
        for i in 0..count {
            let body = Bytes::from(format!("{from}->{to} #{i}"));
            let node = self.node(from);
            let msg = Outgoing {
                target: &target,
                service: "svc",
                body_len: body.len() as u64,
            };
            let route = node.core.handle_send(now, &msg, false).expect("routable");
            assert_eq!(route, Route::Server, "small messages go through the server");
            let seq = node.core.next_seq();
            let resend = Resend {
                kind: MessageKind::Send,
                priority: transports::protocol::Priority::Normal,
                expires_ms: None,
                body: body.clone(),
            };
            let service: Arc<str> = Arc::from("svc");
            node.core.track(
                seq,
                target.clone(),
                service.clone(),
                Awaiting::Acks,
                seq,
                Some(resend),
            );
            let header = MessageHeader {
                sender: id(from),
                incarnation: node.core.incarnation(),
                seq,
                target: target.clone(),
                service,
                kind: MessageKind::Send,
                priority: transports::protocol::Priority::Normal,
                expires_ms: None,
            };
            if node.connected && self.server_up {
                self.wire.push_back(Wire::Message(header, body));
            }
            seqs.push(seq);
        }
        seqs
    }

    /// Lets the server carry `n` items (all if `None`), and the nodes act
    /// on what they received.
    fn deliver(&mut self, n: Option<usize>) {
        let mut left = n.unwrap_or(usize::MAX);
        while left > 0 {
            let Some(item) = self.wire.pop_front() else {
                break;
            };
            left -= 1;
            match item {
                Wire::Message(h, body) => {
                    let Target::Node(to) = h.target.clone() else {
                        unreachable!("the pair sends to nodes")
                    };
                    let reachable = self.nodes.get(&to).is_some_and(|t| t.connected);
                    if !reachable {
                        let sender = self.nodes.get_mut(&h.sender).expect("sender");
                        sender.core.handle_routed(Routed {
                            seq: h.seq,
                            receivers: vec![],
                            failed: vec![(to.clone(), DeliveryFailure::UnknownTarget)],
                            error: Some(DeliveryFailure::UnknownTarget),
                        });
                        continue;
                    }
                    let receiver = self.nodes.get_mut(&to).expect("receiver");
                    let receipt = receiver.core.handle_message(
                        h.sender.as_str(),
                        h.incarnation,
                        h.seq,
                        h.kind,
                    );
                    let status = match receipt {
                        Receipt::Deliver(sender) => {
                            receiver.app.push((sender, h.seq, body));
                            AckStatus::Accepted
                        }
                        Receipt::Duplicate(_) => {
                            receiver.duplicates += 1;
                            AckStatus::Accepted
                        }
                        Receipt::Refused => AckStatus::Failed(DeliveryFailure::Rejected(
                            "failed incarnation".into(),
                        )),
                        Receipt::Stale(_) => AckStatus::Failed(DeliveryFailure::Rejected(
                            "older than the window".into(),
                        )),
                    };
                    let ack = Ack {
                        to: h.sender.clone(),
                        to_incarnation: h.incarnation,
                        seq: h.seq,
                        from: to.clone(),
                        from_incarnation: receiver.core.incarnation(),
                        status,
                    };
                    self.wire.push_back(Wire::Ack(ack));
                }
                Wire::Ack(ack) => {
                    if let Some(node) = self.nodes.get_mut(&ack.to).filter(|n| n.connected) {
                        node.core.handle_ack(&ack);
                    }
                }
            }
            self.drain();
        }
        self.drain();
    }

    /// Takes every node's events and transmits.
    fn drain(&mut self) {
        let server_up = self.server_up;
        for node in self.nodes.values_mut() {
            while let Some(event) = node.core.poll_event() {
                match event {
                    Event::Completed(waiter, c) => {
                        assert!(
                            node.outcomes.insert(waiter, c).is_none(),
                            "one outcome each"
                        );
                    }
                    Event::Membership(e) => node.membership.push(e),
                    Event::PeerGone(peer) => node.gone.push(peer),
                    Event::LateFailure(_) | Event::MembersChanged => {}
                }
            }
            while let Some((header, body)) = node.core.poll_transmit() {
                if server_up && node.connected {
                    self.wire.push_back(Wire::Message(header, body));
                }
            }
        }
    }

    /// The server dies: what it held is lost, every link breaks.
    fn crash_server(&mut self) {
        self.server_up = false;
        self.wire.clear();
        let now = self.now;
        for node in self.nodes.values_mut() {
            node.connected = false;
            node.core.handle_link_lost(now);
        }
        self.drain();
    }

    /// Moves the clock by `d`, giving every core its timeouts on the way;
    /// nodes whose reconnect round is due register if the server is up.
    fn advance(&mut self, d: Duration) -> Vec<(NodeId, LinkAction)> {
        let end = self.now + d;
        let mut actions = Vec::new();
        loop {
            let next = self
                .nodes
                .values()
                .filter_map(|n| n.core.poll_timeout())
                .min()
                .expect("every node has a deadline in these scenarios");
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            let now = self.now;
            let members: Vec<MemberInfo> = self
                .nodes
                .values()
                .filter(|n| n.connected)
                .map(|n| n.info.clone())
                .collect();
            let ids: Vec<NodeId> = self.nodes.keys().cloned().collect();
            for n in ids {
                let server_up = self.server_up;
                let node = self.nodes.get_mut(&n).expect("node");
                if node.core.poll_timeout().is_none_or(|due| due > now) {
                    continue;
                }
                let Some(action) = node.core.handle_timeout(now) else {
                    continue;
                };
                actions.push((n.clone(), action));
                match action {
                    LinkAction::Reconnect if server_up => {
                        let mut welcome = members.clone();
                        welcome.push(node.info.clone());
                        node.connected = true;
                        node.core.handle_link_up(now, 0, welcome);
                    }
                    LinkAction::Reconnect => node.core.handle_attempts_failed(now),
                    LinkAction::Dead => {
                        node.connected = false;
                        node.core.handle_link_lost(now);
                    }
                    LinkAction::ProbePrimary => {}
                }
            }
            self.drain();
        }
        self.now = end;
        actions
    }

    /// Both nodes answer heartbeats from a live server.
    fn pong(&mut self) {
        let now = self.now;
        for node in self.nodes.values_mut().filter(|n| n.connected) {
            node.core.handle_ping(1);
            node.core.handle_pong(now, 1);
        }
    }

    /// The server tells the others that `n` left (or came back).
    fn announce(&mut self, event: MemberEvent) {
        let now = self.now;
        for node in self.nodes.values_mut().filter(|n| n.connected) {
            node.core.handle_member_event(now, event.clone());
        }
        self.drain();
    }

    fn delivered_once_in_order(&mut self, to: &str, expected: &[u64]) {
        let got: Vec<u64> = self.node(to).app.iter().map(|(_, seq, _)| *seq).collect();
        assert_eq!(got, expected, "each message delivered once, in order");
    }
}

fn delivered(outcomes: &BTreeMap<u64, Completion>, seqs: &[u64]) -> usize {
    seqs.iter()
        .filter(|s| matches!(outcomes.get(s), Some(Completion::Delivered(_))))
        .count()
}

/// `tests/failover.rs` in miniature: the message server dies with
/// messages delivered but not acknowledged, and others not delivered at
/// all; after the restart the sender resends what awaits an outcome, in
/// order, and the receiver delivers each message once.
#[test]
fn a_server_restart_resends_what_awaits_an_outcome_and_delivers_each_once() {
    let mut p = Pair::new();
    let mut seqs = p.send("a", "b", 60);
    // The server forwards the 60 messages, and 40 acknowledgements come
    // back; then 40 more messages are sent, and the server dies with them
    // and the last 20 acknowledgements.
    p.deliver(Some(60 + 40));
    let acked_before = delivered(&p.node("a").outcomes, &seqs);
    assert_eq!(acked_before, 40);
    seqs.extend(p.send("a", "b", 40));
    p.crash_server();
    assert!(p
        .node("a")
        .membership
        .contains(&MembershipEvent::Disconnected));
    // Down for three reconnect rounds; then it is back.
    let actions = p.advance(RECONNECT * 3);
    assert!(actions.iter().all(|(_, a)| *a == LinkAction::Reconnect));
    p.server_up = true;
    p.advance(MAX_RECONNECT);
    assert!(
        p.nodes.values().all(|n| n.connected),
        "both registered again"
    );
    p.deliver(None);
    assert_eq!(
        delivered(&p.node("a").outcomes, &seqs),
        100,
        "every send settles"
    );
    assert_eq!(p.node("a").core.tracker().len(), 0);
    p.delivered_once_in_order("b", &seqs);
    assert_eq!(
        p.node("b").duplicates,
        60 - acked_before,
        "resent, acked again, not delivered again"
    );
}

/// The reconnect rounds after a loss: one reconnect delay, then doubling
/// up to the cap, while the server stays away.
#[test]
fn reconnect_rounds_back_off_while_the_server_is_away() {
    let mut p = Pair::new();
    let start = p.now;
    p.crash_server();
    let mut rounds = Vec::new();
    for _ in 0..20 {
        if rounds.len() == 6 {
            break;
        }
        let actions = p.advance(Duration::from_millis(1));
        if actions
            .iter()
            .any(|(n, a)| n == &id("a") && *a == LinkAction::Reconnect)
        {
            rounds.push(p.now.duration_since(start).as_millis() as u64);
        }
        // Jump to just before the next round of `a`.
        let next = p
            .node("a")
            .core
            .poll_timeout()
            .expect("a down link has its next round");
        p.now = next - Duration::from_millis(1);
    }
    // After one delay, then 200 ms, then capped at 400 ms.
    assert_eq!(rounds, [100, 300, 700, 1_100, 1_500, 1_900]);
}

/// `tests/failure_detection.rs`: a server that stops answering heartbeats
/// (stopped, or cut off) is given up at the failure timeout, not before,
/// even though no connection broke.
#[test]
fn a_silent_server_is_given_up_at_the_failure_timeout() {
    let mut p = Pair::new();
    for _ in 0..5 {
        p.advance(FAILURE / 2);
        p.pong();
    }
    assert!(p.nodes.values().all(|n| n.connected), "answering: kept");
    let actions = p.advance(FAILURE);
    assert!(actions.is_empty(), "silent for exactly the timeout: kept");
    let actions = p.advance(Duration::from_millis(1));
    assert_eq!(
        actions,
        [(id("a"), LinkAction::Dead), (id("b"), LinkAction::Dead)],
        "silent past it: dead"
    );
}

/// `tests/killed_receiver.rs`: the receiver disconnects and does not come
/// back within the failure timeout. Its messages are parked meanwhile,
/// then fail as possibly delivered; nothing hangs.
#[test]
fn a_receiver_gone_past_the_failure_timeout_fails_what_waits_on_it() {
    let mut p = Pair::new();
    p.node("b").connected = false;
    p.announce(MemberEvent::Left {
        id: id("b"),
        incarnation: 11,
        reason: LeaveReason::Disconnected,
    });
    let seqs = p.send("a", "b", 5);
    p.deliver(None);
    assert!(
        p.node("a").outcomes.is_empty(),
        "parked while b may come back"
    );
    p.pong();
    p.advance(FAILURE - Duration::from_millis(1));
    p.pong();
    assert!(p.node("a").outcomes.is_empty(), "still within its grace");
    p.advance(Duration::from_millis(1));
    let outcomes = &p.node("a").outcomes;
    for seq in &seqs {
        assert!(
            matches!(
                outcomes.get(seq),
                Some(Completion::Failed(SendError::TargetStopped {
                    in_flight: true,
                    ..
                }))
            ),
            "{seq}: {:?}",
            outcomes.get(seq)
        );
    }
    assert_eq!(p.node("a").gone, [id("b")], "its channels are closed");
}

/// `tests/partition.rs`: the receiver is cut off and comes back within the
/// failure timeout. What it missed goes to it again when it registers,
/// before anything newer, and is delivered once.
#[test]
fn a_receiver_back_in_time_gets_what_it_missed_first() {
    let mut p = Pair::new();
    let first = p.send("a", "b", 3);
    p.deliver(None);
    p.node("b").connected = false;
    p.announce(MemberEvent::Left {
        id: id("b"),
        incarnation: 11,
        reason: LeaveReason::Disconnected,
    });
    let missed = p.send("a", "b", 4);
    p.deliver(None);
    p.pong();
    p.advance(FAILURE / 2);
    p.node("b").connected = true;
    let info = p.node("b").info.clone();
    p.announce(MemberEvent::Joined(info));
    let newer = p.send("a", "b", 2);
    p.deliver(None);
    let all: Vec<u64> = first.iter().chain(&missed).chain(&newer).copied().collect();
    p.delivered_once_in_order("b", &all);
    assert_eq!(delivered(&p.node("a").outcomes, &all), all.len());
    assert!(p.node("a").gone.is_empty(), "b never left for good");
}

/// A node declared failed rejoins as a new incarnation: what the old one
/// waited for fails at once (it may have been delivered), and the
/// receiver refuses anything still coming from the old incarnation.
#[test]
fn a_node_declared_failed_rejoins_and_its_old_messages_are_refused() {
    let mut p = Pair::new();
    let old = p.send("a", "b", 3);
    // The server declared a failed while these were held up.
    let held: Vec<Wire> = p.wire.drain(..).collect();
    p.node("a").connected = false;
    p.announce(MemberEvent::Left {
        id: id("a"),
        incarnation: 10,
        reason: LeaveReason::Failed,
    });
    let now = p.now;
    p.node("a").core.handle_link_lost(now);
    p.node("a").core.handle_new_incarnation(now, 99);
    p.drain();
    for seq in &old {
        assert_eq!(
            p.node("a").outcomes.get(seq),
            Some(&Completion::Failed(SendError::Disconnected)),
            "{seq}"
        );
    }
    assert_eq!(
        p.node("a").core.tracker().len(),
        0,
        "nothing left to resend"
    );
    // The old incarnation's messages arrive late: refused, not delivered.
    p.wire.extend(held);
    p.deliver(None);
    assert!(p.node("b").app.is_empty());
    // The new incarnation is welcome.
    p.node("a").info.incarnation = 99;
    p.node("a").connected = true;
    let info = p.node("a").info.clone();
    p.announce(MemberEvent::Joined(info));
    let fresh = p.send("a", "b", 2);
    p.deliver(None);
    p.delivered_once_in_order("b", &fresh);
}
