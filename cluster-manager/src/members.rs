//! The node's view of the cluster's members, kept current by the message
//! server's membership events.
//!
//! Pure state with the time passed in. A member whose connection to the
//! message server broke is kept for the failure timeout (it may be
//! reconnecting, or the message server may have restarted); it is
//! declared gone only if it does not register again in time. A planned
//! stop or a declared failure takes effect at once. Every call returns
//! what changed for the node to act on ([`Change`]) and what the
//! application is told ([`MembershipEvent`]).

use std::collections::HashSet;

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use transports::protocol::{LeaveReason, MemberEvent, MemberInfo, NodeId, Target};

/// A change the application may react to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MembershipEvent {
    /// A node joined the cluster.
    Joined(MemberInfo),
    /// A node changed its services, or became busy or no longer busy
    /// ([`MemberInfo::busy`]).
    Updated(MemberInfo),
    /// A node left.
    Left {
        /// The node.
        id: NodeId,
        /// The incarnation that left.
        incarnation: u64,
        /// Why: a planned stop, a broken connection, or declared failed.
        reason: LeaveReason,
    },
    /// This node lost its connection to the message server; it reconnects
    /// by itself.
    Disconnected,
    /// This node is connected to a message server again (after
    /// [`MembershipEvent::Disconnected`]).
    Reconnected {
        /// The message server's address.
        address: String,
    },
}

/// What a membership update changed, for the node to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A member is gone for good: fail what waits on it, forget its
    /// duplicate window, close its channels.
    Left(NodeId),
    /// A member (re)registered with the message server: what waits on it
    /// may be resent.
    Present(NodeId),
}

/// What an update produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// For the node to act on.
    pub changes: Vec<Change>,
    /// For the application (none while nobody listens, see
    /// [`Members::set_reporting`]).
    pub events: Vec<MembershipEvent>,
    /// Whether the members changed (a member came, went, or changed its
    /// details): what waits on a member's state should look again.
    pub changed: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    info: MemberInfo,
    /// Set while the member is disconnected from the message server: it is
    /// declared gone at this instant unless it registers again.
    gone_at: Option<Instant>,
}

/// The current members, by id.
#[derive(Debug)]
pub struct Members {
    /// A hash map, not a B-tree: in a cluster of thousands, every node
    /// applies every join, and a B-tree's search and shifting of entries
    /// this size were a large part of it. What is shown in order
    /// ([`Members::snapshot`]) is sorted when asked for.
    members: FxHashMap<NodeId, Entry>,
    /// Incarnations declared failed: nothing from them is accepted.
    failed: HashSet<(NodeId, u64)>,
    grace: Duration,
    /// How many members are busy ([`MemberInfo::busy`]): a send looks
    /// further only when some are.
    busy: usize,
    /// How many members wait out their grace (`gone_at` set): the timer
    /// is looked for only when some do, not over every member at every
    /// event (a join in a cluster of thousands).
    in_grace: usize,
    /// Whether [`MembershipEvent`]s are made (see
    /// [`Members::set_reporting`]).
    report: bool,
}

impl Members {
    /// The members a node was welcomed with; a disconnected member gets
    /// `grace` (the failure timeout) to come back.
    pub fn new(initial: Vec<MemberInfo>, grace: Duration) -> Self {
        let busy = initial.iter().filter(|m| m.busy).count();
        let mut members = FxHashMap::with_capacity_and_hasher(initial.len(), Default::default());
        for info in initial {
            members.insert(
                info.id.clone(),
                Entry {
                    info,
                    gone_at: None,
                },
            );
        }
        Members {
            busy,
            in_grace: 0,
            report: true,
            members,
            failed: HashSet::new(),
            grace,
        }
    }

    /// Whether updates carry [`MembershipEvent`]s for the application (by
    /// default they do). Off while nobody listens: in a join burst of
    /// thousands, copying every member's details for events nobody reads
    /// is most of the work. [`Update::changed`] is kept either way.
    pub fn set_reporting(&mut self, report: bool) {
        self.report = report;
    }

    /// Whether `incarnation` of `id` was declared failed.
    pub fn is_failed(&self, id: &str, incarnation: u64) -> bool {
        // A scan: failures are rare, and this is asked per message.
        !self.failed.is_empty()
            && self
                .failed
                .iter()
                .any(|(f, i)| *i == incarnation && f.as_str() == id)
    }

    /// Whether any incarnation was declared failed.
    pub fn any_failed(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Every member's information, by id.
    pub fn snapshot(&self) -> Vec<MemberInfo> {
        let mut all: Vec<MemberInfo> = self.members.values().map(|e| e.info.clone()).collect();
        all.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member `id`, if it is one.
    pub fn get(&self, id: &str) -> Option<&MemberInfo> {
        self.members.get(id).map(|e| &e.info)
    }

    /// The id of the member named `name`, shared with the table (no
    /// allocation), or a new one for a name not (or no longer) a member.
    pub fn id_of(&self, name: &str) -> NodeId {
        self.members
            .get_key_value(name)
            .map_or_else(|| NodeId::new(name), |(id, _)| id.clone())
    }

    /// Whether `id` is a member.
    pub fn is_member(&self, id: &NodeId) -> bool {
        self.members.contains_key(id)
    }

    /// The direct-channel address `id` announced.
    pub fn direct_addr(&self, id: &NodeId) -> Option<std::net::SocketAddr> {
        self.get(id.as_str()).and_then(|m| m.direct_addr)
    }

    /// How many members are busy.
    pub fn busy_count(&self) -> usize {
        self.busy
    }

    /// The busy member that holds back a message from `me` to `target`'s
    /// `service`, if any: a busy `Node`; a busy member of a `Group` that
    /// offers the service; for `AnyOf`, the group itself when every member
    /// that could take it is busy (another member offering the service is
    /// preferred over `me`, as the message server chooses). `All` is
    /// never held back. Members unknown here are left to the message
    /// server to answer.
    pub fn busy_blocker(&self, me: &NodeId, target: &Target, service: &str) -> Option<NodeId> {
        if self.busy == 0 {
            return None;
        }
        let in_group = |g: &str| -> Vec<&MemberInfo> {
            self.members
                .values()
                .map(|e| &e.info)
                .filter(|m| {
                    m.services.iter().any(|s| s == service) && m.groups.iter().any(|mg| mg == g)
                })
                .collect()
        };
        match target {
            Target::Node(id) => self
                .get(id.as_str())
                .filter(|m| m.busy)
                .map(|m| m.id.clone()),
            // The first by id, whatever the map's order.
            Target::Group(g) => in_group(g)
                .into_iter()
                .filter(|m| m.busy)
                .min_by(|a, b| a.id.cmp(&b.id))
                .map(|m| m.id.clone()),
            Target::AnyOf(g) => {
                let all = in_group(g);
                let others: Vec<&MemberInfo> =
                    all.iter().copied().filter(|m| m.id != *me).collect();
                let pool = if others.is_empty() { all } else { others };
                (!pool.is_empty() && pool.iter().all(|m| m.busy)).then(|| NodeId::new(g))
            }
            Target::All => None,
        }
    }

    /// Puts `entry` in, keeping the busy count.
    fn insert(&mut self, id: NodeId, entry: Entry) {
        self.busy += usize::from(entry.info.busy);
        self.in_grace += usize::from(entry.gone_at.is_some());
        if let Some(old) = self.members.insert(id, entry) {
            self.busy -= usize::from(old.info.busy);
            self.in_grace -= usize::from(old.gone_at.is_some());
        }
    }

    /// Takes `id` out, keeping the busy count.
    fn remove(&mut self, id: &NodeId) -> Option<Entry> {
        let old = self.members.remove(id)?;
        self.busy -= usize::from(old.info.busy);
        self.in_grace -= usize::from(old.gone_at.is_some());
        Some(old)
    }

    /// Whether `incarnation` of `id` is the member now and connected (not
    /// waiting out the failure timeout after a disconnect): an update of
    /// it changes nothing but its details.
    pub fn is_present(&self, id: &NodeId, incarnation: u64) -> bool {
        self.members
            .get(id)
            .is_some_and(|e| e.info.incarnation == incarnation && e.gone_at.is_none())
    }

    /// Whether `incarnation` of `id` is the member now.
    pub fn is_live(&self, id: &NodeId, incarnation: u64) -> bool {
        self.get(id.as_str())
            .is_some_and(|m| m.incarnation == incarnation)
    }

    /// Applies a server event received at `now`.
    pub fn handle_event(&mut self, now: Instant, event: MemberEvent) -> Update {
        let mut update = Update::default();
        let report = self.report;
        match event {
            MemberEvent::Joined(info) | MemberEvent::Updated(info) => {
                let id = info.id.clone();
                let mut back = false;
                update.changed = true;
                match self.members.get(&id) {
                    Some(e) if e.info.incarnation == info.incarnation => {
                        back = e.gone_at.is_some();
                        if report && e.info != info {
                            update.events.push(MembershipEvent::Updated(info.clone()));
                        }
                    }
                    Some(old) => {
                        // A new incarnation: the old one is gone.
                        if report {
                            update.events.push(MembershipEvent::Left {
                                id: id.clone(),
                                incarnation: old.info.incarnation,
                                reason: LeaveReason::Disconnected,
                            });
                            update.events.push(MembershipEvent::Joined(info.clone()));
                        }
                        update.changes.push(Change::Left(id.clone()));
                    }
                    None if report => update.events.push(MembershipEvent::Joined(info.clone())),
                    None => {}
                }
                self.insert(
                    id.clone(),
                    Entry {
                        info,
                        gone_at: None,
                    },
                );
                if back {
                    update.changes.push(Change::Present(id));
                }
            }
            MemberEvent::Left {
                id,
                incarnation,
                reason,
            } => match self.members.get_mut(&id) {
                Some(e) if e.info.incarnation == incarnation => {
                    update.changed = true;
                    if reason == LeaveReason::Disconnected {
                        // Maybe reconnecting: wait for the failure timeout.
                        if e.gone_at.is_none() {
                            e.gone_at = Some(now + self.grace);
                            self.in_grace += 1;
                        }
                    } else {
                        if reason == LeaveReason::Failed {
                            self.failed.insert((id.clone(), incarnation));
                        }
                        self.remove(&id);
                        if report {
                            update.events.push(MembershipEvent::Left {
                                id: id.clone(),
                                incarnation,
                                reason,
                            });
                        }
                        update.changes.push(Change::Left(id));
                    }
                }
                _ => {}
            },
        }
        update
    }

    /// Takes the member list of a new link's `Welcome` at `now`: members
    /// it lacks get the failure timeout to register again (what happened
    /// while this node was away is unknown).
    pub fn handle_welcome(&mut self, now: Instant, current: Vec<MemberInfo>) -> Update {
        // A set, not a scan per member: welcomes to thousands of members
        // come all at once after a server restart.
        let listed: HashSet<&str> = current.iter().map(|m| m.id.as_str()).collect();
        for e in self.members.values_mut() {
            if !listed.contains(e.info.id.as_str()) {
                if e.gone_at.is_none() {
                    self.in_grace += 1;
                }
                e.gone_at = Some(now + self.grace);
            }
        }
        let mut update = Update::default();
        for info in current {
            let one = self.handle_event(now, MemberEvent::Joined(info));
            update.changes.extend(one.changes);
            update.events.extend(one.events);
            update.changed |= one.changed;
        }
        update
    }

    /// When the next disconnected member's grace runs out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.in_grace == 0 {
            return None;
        }
        self.members.values().filter_map(|e| e.gone_at).min()
    }

    /// Declares gone the members whose grace ran out by `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Update {
        if self.in_grace == 0 {
            return Update::default();
        }
        let mut ids: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, e)| e.gone_at.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        // Told in order of id, whatever the map's order.
        ids.sort_unstable();
        let mut update = Update::default();
        for id in ids {
            let Some(e) = self.remove(&id) else {
                continue;
            };
            tracing::info!(node = %id, "member did not come back within the failure timeout");
            update.changed = true;
            if self.report {
                update.events.push(MembershipEvent::Left {
                    id: id.clone(),
                    incarnation: e.info.incarnation,
                    reason: LeaveReason::Failed,
                });
            }
            update.changes.push(Change::Left(id));
        }
        update
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, incarnation: u64) -> MemberInfo {
        MemberInfo {
            id: NodeId::new(id),
            incarnation,
            role: transports::protocol::Role::Server,
            groups: vec![],
            services: vec![],
            direct_addr: None,
            session_key: [0; 32],
            busy: false,
        }
    }

    fn left(id: &str, incarnation: u64, reason: LeaveReason) -> MemberEvent {
        MemberEvent::Left {
            id: NodeId::new(id),
            incarnation,
            reason,
        }
    }

    #[test]
    fn the_grace_timer_is_there_exactly_while_a_member_waits_out_its_grace() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(1);
        let mut m = Members::new(vec![info("a", 1), info("b", 1), info("c", 1)], grace);
        assert_eq!(m.poll_timeout(), None);
        m.handle_event(t0, left("b", 1, LeaveReason::Disconnected));
        m.handle_event(t0, left("b", 1, LeaveReason::Disconnected));
        assert_eq!(m.poll_timeout(), Some(t0 + grace), "b waits");
        // A welcome without b and c: c starts waiting too.
        m.handle_welcome(t0, vec![info("a", 1)]);
        m.handle_event(t0, MemberEvent::Joined(info("b", 1)));
        assert_eq!(m.poll_timeout(), Some(t0 + grace), "c still waits");
        m.handle_event(t0, MemberEvent::Joined(info("c", 2)));
        assert_eq!(m.poll_timeout(), None, "nobody waits");
        m.handle_event(t0, left("a", 1, LeaveReason::Disconnected));
        m.handle_event(t0, left("a", 1, LeaveReason::Stopped));
        assert_eq!(m.poll_timeout(), None, "a left for good while waiting");
        assert!(m.handle_timeout(t0 + grace).events.is_empty());
    }

    /// With reporting off, the members change as before and say so, but
    /// no event is made.
    #[test]
    fn without_reporting_changes_are_kept_and_no_events_made() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(1);
        let mut quiet = Members::new(vec![], grace);
        quiet.set_reporting(false);
        let mut told = Members::new(vec![], grace);
        let mut busy_b = info("b", 1);
        busy_b.busy = true;
        let events = [
            MemberEvent::Joined(info("a", 1)),
            MemberEvent::Joined(info("b", 1)),
            MemberEvent::Updated(busy_b),
            MemberEvent::Joined(info("a", 2)),
            left("b", 1, LeaveReason::Disconnected),
            left("a", 2, LeaveReason::Failed),
            left("x", 1, LeaveReason::Stopped),
        ];
        for event in events {
            let q = quiet.handle_event(t0, event.clone());
            let t = told.handle_event(t0, event);
            assert!(q.events.is_empty(), "{q:?}");
            assert_eq!(q.changes, t.changes);
            assert_eq!(q.changed, t.changed);
        }
        assert_eq!(quiet.snapshot(), told.snapshot());
        assert_eq!(quiet.busy_count(), 1);
        assert!(quiet.is_failed("a", 2));
        let q = quiet.handle_timeout(t0 + grace);
        let t = told.handle_timeout(t0 + grace);
        assert!(q.changed && q.events.is_empty());
        assert_eq!(q.changes, t.changes);
        assert_eq!(t.events.len(), 1);
        assert!(quiet.is_empty() && told.is_empty());
    }

    #[test]
    fn failure_deadline_table() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let b = NodeId::new("b");
        // (offset, event or a timeout, the changes it makes)
        enum Step {
            Event(MemberEvent),
            Welcome(Vec<MemberInfo>),
            Timeout,
        }
        type Case = (&'static str, Vec<(u64, Step, Vec<Change>)>);
        let cases: Vec<Case> = vec![
            (
                "disconnected and back in time: present again, never left",
                vec![
                    (
                        0,
                        Step::Event(left("b", 1, LeaveReason::Disconnected)),
                        vec![],
                    ),
                    (999, Step::Timeout, vec![]),
                    (
                        999,
                        Step::Event(MemberEvent::Joined(info("b", 1))),
                        vec![Change::Present(b.clone())],
                    ),
                    (5_000, Step::Timeout, vec![]),
                ],
            ),
            (
                "disconnected for the failure timeout: gone",
                vec![
                    (
                        0,
                        Step::Event(left("b", 1, LeaveReason::Disconnected)),
                        vec![],
                    ),
                    (
                        500,
                        Step::Event(left("b", 1, LeaveReason::Disconnected)),
                        vec![],
                    ),
                    (1_000, Step::Timeout, vec![Change::Left(b.clone())]),
                ],
            ),
            (
                "a planned stop: gone at once",
                vec![(
                    0,
                    Step::Event(left("b", 1, LeaveReason::Stopped)),
                    vec![Change::Left(b.clone())],
                )],
            ),
            (
                "another incarnation's leave is ignored",
                vec![
                    (0, Step::Event(left("b", 2, LeaveReason::Stopped)), vec![]),
                    (5_000, Step::Timeout, vec![]),
                ],
            ),
            (
                "a new incarnation replaces the old one",
                vec![(
                    0,
                    Step::Event(MemberEvent::Joined(info("b", 2))),
                    vec![Change::Left(b.clone())],
                )],
            ),
            (
                "missing from a new server's welcome: the grace starts",
                vec![
                    (0, Step::Welcome(vec![]), vec![]),
                    (999, Step::Timeout, vec![]),
                    (1_000, Step::Timeout, vec![Change::Left(b.clone())]),
                ],
            ),
            (
                "in the welcome: nothing changes",
                vec![
                    (0, Step::Welcome(vec![info("b", 1)]), vec![]),
                    (5_000, Step::Timeout, vec![]),
                ],
            ),
        ];
        for (name, steps) in cases {
            let mut m = Members::new(vec![info("b", 1)], ms(1_000));
            for (i, (at, step, changes)) in steps.into_iter().enumerate() {
                let now = t0 + ms(at);
                let update = match step {
                    Step::Event(e) => m.handle_event(now, e),
                    Step::Welcome(list) => m.handle_welcome(now, list),
                    Step::Timeout => m.handle_timeout(now),
                };
                assert_eq!(update.changes, changes, "{name}: step {i}");
            }
        }
    }

    #[test]
    fn a_failed_incarnation_is_remembered_and_events_name_it() {
        let t0 = Instant::now();
        let mut m = Members::new(vec![info("b", 1)], Duration::from_secs(1));
        assert!(!m.any_failed());
        let update = m.handle_event(t0, left("b", 1, LeaveReason::Failed));
        assert_eq!(
            update.events,
            [MembershipEvent::Left {
                id: NodeId::new("b"),
                incarnation: 1,
                reason: LeaveReason::Failed
            }]
        );
        assert!(m.is_failed("b", 1));
        assert!(!m.is_failed("b", 2));
        assert!(!m.is_member(&NodeId::new("b")));
        let update = m.handle_event(t0, MemberEvent::Joined(info("b", 2)));
        assert_eq!(update.events, [MembershipEvent::Joined(info("b", 2))]);
        assert!(m.is_live(&NodeId::new("b"), 2));
        assert_eq!(m.poll_timeout(), None);
    }
}
