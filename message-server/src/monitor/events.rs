//! The recent membership events and refusals the monitor shows: two ring
//! buffers of [`EVENTS_KEPT`] entries each, and running totals.
//!
//! Recorded where the server logs the same events (a registration, a
//! departure, a failure, a refused connection): never per message.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use transports::protocol::{LeaveReason, MemberInfo, NodeId};

/// Entries each ring buffer keeps: the newest this many membership events,
/// and the newest this many refusals.
pub const EVENTS_KEPT: usize = 100;

/// Departed incarnations remembered, so that one that comes back counts as
/// a return rather than a first join.
const DEPARTED_REMEMBERED: usize = 4096;

/// Longest reason kept for a refusal, in bytes.
const REASON_MAX_BYTES: usize = 200;

/// What happened to a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipKind {
    /// A node registered for the first time (as far as this server
    /// remembers).
    Joined,
    /// A node registered again with the incarnation it had when its link to
    /// this server broke: it came back (after a reconnect, or from a
    /// standby to the primary).
    Returned,
    /// A node reconnected before its old connection was seen to break; the
    /// old connection was closed.
    Reconnected,
    /// A node said goodbye (a planned stop).
    Stopped,
    /// A node's connection broke without a goodbye.
    Disconnected,
    /// A node was declared failed: no heartbeat within the failure timeout.
    Failed,
    /// A node reported itself busy (its backlog reached `node.busy_upper`).
    Busy,
    /// A busy node reported it drained to `node.busy_lower`.
    NotBusy,
}

/// One membership event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MembershipEvent {
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// What happened.
    pub kind: MembershipKind,
    /// The node.
    pub node: NodeId,
    /// Its incarnation (a string in JSON).
    #[serde(serialize_with = "super::snapshot::as_string")]
    pub incarnation: u64,
    /// Where its connection came from, for a registration.
    pub peer: Option<SocketAddr>,
}

/// One refused connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Where the connection came from.
    pub peer: SocketAddr,
    /// The node id its hello claimed (escaped and cut short), if it got
    /// that far.
    pub node: Option<String>,
    /// Why it was refused.
    pub reason: String,
}

/// Totals since the server started (not bounded by the ring buffers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EventTotals {
    /// First registrations.
    pub joined: u64,
    /// Registrations of an incarnation that had lost its link here.
    pub returned: u64,
    /// Reconnects that took a live registration over.
    pub reconnected: u64,
    /// Planned stops.
    pub stopped: u64,
    /// Broken connections.
    pub disconnected: u64,
    /// Members declared failed.
    pub failed: u64,
    /// Times a member became busy.
    pub busy: u64,
    /// Refused connections.
    pub refused: u64,
}

/// The recent events, as the monitor serves them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecentEvents {
    /// Membership events, oldest first, at most [`EVENTS_KEPT`].
    pub membership: Vec<MembershipEvent>,
    /// Refused connections, oldest first, at most [`EVENTS_KEPT`].
    pub refusals: Vec<Refusal>,
    /// Totals since the server started.
    pub totals: EventTotals,
}

/// The server's event log (one per server, shared by its connections).
#[derive(Debug, Default)]
pub(crate) struct EventLog {
    inner: Mutex<Log>,
}

#[derive(Debug, Default)]
struct Log {
    membership: VecDeque<MembershipEvent>,
    refusals: VecDeque<Refusal>,
    totals: EventTotals,
    /// Incarnations whose link broke here, oldest first.
    departed: VecDeque<(NodeId, u64)>,
    departed_set: HashSet<(NodeId, u64)>,
}

impl EventLog {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        // Every step below leaves the log consistent: keep it after a panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A node registered; `takeover` if it took its own live registration
    /// over.
    pub(crate) fn joined(&self, me: &MemberInfo, peer: SocketAddr, takeover: bool) {
        let mut log = self.log();
        let key = (me.id.clone(), me.incarnation);
        let kind = if takeover {
            MembershipKind::Reconnected
        } else if log.departed_set.remove(&key) {
            log.departed.retain(|d| d != &key);
            MembershipKind::Returned
        } else {
            MembershipKind::Joined
        };
        log.push(kind, &me.id, me.incarnation, Some(peer));
    }

    /// A registered node left.
    pub(crate) fn left(&self, id: &NodeId, incarnation: u64, reason: LeaveReason) {
        let mut log = self.log();
        let kind = match reason {
            LeaveReason::Stopped => MembershipKind::Stopped,
            LeaveReason::Disconnected => {
                log.remember_departed(id, incarnation);
                MembershipKind::Disconnected
            }
            LeaveReason::Failed => MembershipKind::Failed,
        };
        log.push(kind, id, incarnation, None);
    }

    /// A node reported itself busy, or no longer busy.
    pub(crate) fn busy(&self, id: &NodeId, incarnation: u64, busy: bool) {
        let kind = if busy {
            MembershipKind::Busy
        } else {
            MembershipKind::NotBusy
        };
        self.log().push(kind, id, incarnation, None);
    }

    /// A node was declared failed.
    pub(crate) fn failed(&self, id: &NodeId, incarnation: u64) {
        self.left(id, incarnation, LeaveReason::Failed);
    }

    /// A connection was refused; `node` is the id its hello claimed.
    pub(crate) fn refused(&self, peer: SocketAddr, node: Option<&str>, reason: &str) {
        let refusal = Refusal {
            at_unix_ms: unix_ms(),
            peer,
            node: node.map(transports::handshake::for_log),
            reason: cut(reason, REASON_MAX_BYTES),
        };
        let mut log = self.log();
        log.totals.refused += 1;
        if log.refusals.len() >= EVENTS_KEPT {
            log.refusals.pop_front();
        }
        log.refusals.push_back(refusal);
    }

    /// A copy of what is kept.
    pub(crate) fn recent(&self) -> RecentEvents {
        let log = self.log();
        RecentEvents {
            membership: log.membership.iter().cloned().collect(),
            refusals: log.refusals.iter().cloned().collect(),
            totals: log.totals,
        }
    }
}

impl Log {
    fn push(
        &mut self,
        kind: MembershipKind,
        id: &NodeId,
        incarnation: u64,
        peer: Option<SocketAddr>,
    ) {
        let total = match kind {
            MembershipKind::Joined => Some(&mut self.totals.joined),
            MembershipKind::Returned => Some(&mut self.totals.returned),
            MembershipKind::Reconnected => Some(&mut self.totals.reconnected),
            MembershipKind::Stopped => Some(&mut self.totals.stopped),
            MembershipKind::Disconnected => Some(&mut self.totals.disconnected),
            MembershipKind::Failed => Some(&mut self.totals.failed),
            MembershipKind::Busy => Some(&mut self.totals.busy),
            MembershipKind::NotBusy => None,
        };
        if let Some(total) = total {
            *total += 1;
        }
        if self.membership.len() >= EVENTS_KEPT {
            self.membership.pop_front();
        }
        self.membership.push_back(MembershipEvent {
            at_unix_ms: unix_ms(),
            kind,
            node: id.clone(),
            incarnation,
            peer,
        });
    }

    fn remember_departed(&mut self, id: &NodeId, incarnation: u64) {
        let key = (id.clone(), incarnation);
        if !self.departed_set.insert(key.clone()) {
            return;
        }
        if self.departed.len() >= DEPARTED_REMEMBERED {
            if let Some(old) = self.departed.pop_front() {
                self.departed_set.remove(&old);
            }
        }
        self.departed.push_back(key);
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, incarnation: u64) -> MemberInfo {
        MemberInfo {
            id: NodeId::new(id),
            incarnation,
            role: Default::default(),
            groups: vec![],
            services: vec![],
            direct_addr: None,
            session_key: [0; 32],
            busy: false,
        }
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5000))
    }

    #[test]
    fn kinds_follow_the_member_s_history() {
        let log = EventLog::default();
        let a = member("a", 1);
        log.joined(&a, peer(), false);
        log.left(&a.id, 1, LeaveReason::Disconnected);
        log.joined(&a, peer(), false);
        log.joined(&a, peer(), true);
        log.left(&a.id, 1, LeaveReason::Stopped);
        // A new incarnation after a planned stop is a first join.
        log.joined(&member("a", 2), peer(), false);
        log.failed(&a.id, 2);
        let kinds: Vec<_> = log.recent().membership.iter().map(|e| e.kind).collect();
        use MembershipKind::*;
        assert_eq!(
            kinds,
            [
                Joined,
                Disconnected,
                Returned,
                Reconnected,
                Stopped,
                Joined,
                Failed
            ]
        );
        let totals = log.recent().totals;
        assert_eq!((totals.joined, totals.returned, totals.failed), (2, 1, 1));
    }

    #[test]
    fn ring_buffers_keep_the_newest() {
        let log = EventLog::default();
        for i in 0..(EVENTS_KEPT + 50) {
            log.joined(&member(&format!("n{i}"), 1), peer(), false);
            log.refused(peer(), Some("x\ny"), &"r".repeat(1000));
        }
        let recent = log.recent();
        assert_eq!(recent.membership.len(), EVENTS_KEPT);
        assert_eq!(recent.refusals.len(), EVENTS_KEPT);
        assert_eq!(recent.membership[0].node.as_str(), "n50");
        assert_eq!(recent.totals.refused, (EVENTS_KEPT + 50) as u64);
        let refusal = &recent.refusals[0];
        assert!(refusal.reason.len() <= REASON_MAX_BYTES + '…'.len_utf8());
        assert!(!refusal.node.as_deref().unwrap_or("").contains('\n'));
    }

    #[test]
    fn departed_incarnations_are_bounded() {
        let log = EventLog::default();
        for i in 0..(DEPARTED_REMEMBERED + 10) {
            log.left(&NodeId::new(format!("n{i}")), 1, LeaveReason::Disconnected);
        }
        let inner = log.log();
        assert_eq!(inner.departed.len(), DEPARTED_REMEMBERED);
        assert_eq!(inner.departed_set.len(), DEPARTED_REMEMBERED);
    }
}
