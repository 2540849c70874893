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

/// The current members, by id.
///
/// Laid out for clusters of thousands, where every node holds every
/// member: the details sit in one dense list (the `Welcome`'s own, taken
/// over without a copy), found through a small index of positions, and
/// the few members waiting out their grace are kept apart. A hash map of
/// whole entries was about twice the memory (half its slots empty after
/// each doubling): in the scale bench, a process of 500 nodes in a
/// cluster of 1,000 held 347 MiB once they had converged, 271 MiB with
/// this layout. What is shown in order ([`Members::snapshot`]) is sorted
/// when asked for.
#[derive(Debug)]
pub struct Members {
    /// Every member's details, in no particular order.
    list: Vec<MemberInfo>,
    /// Where each member is in `list`.
    index: FxHashMap<NodeId, usize>,
    /// The members disconnected from the message server, each declared
    /// gone at its instant unless it registers again.
    gone_at: FxHashMap<NodeId, Instant>,
    /// Incarnations declared failed: nothing from them is accepted.
    failed: HashSet<(NodeId, u64)>,
    grace: Duration,
    /// How many members are busy ([`MemberInfo::busy`]): a send looks
    /// further only when some are.
    busy: usize,
    /// Whether [`MembershipEvent`]s are made (see
    /// [`Members::set_reporting`]).
    report: bool,
}

impl Members {
    /// The members a node was welcomed with; a disconnected member gets
    /// `grace` (the failure timeout) to come back.
    pub fn new(initial: Vec<MemberInfo>, grace: Duration) -> Self {
        let mut members = Members {
            busy: 0,
            report: true,
            list: Vec::new(),
            index: FxHashMap::default(),
            gone_at: FxHashMap::default(),
            failed: HashSet::new(),
            grace,
        };
        let mut index = FxHashMap::with_capacity_and_hasher(initial.len(), Default::default());
        let unique = initial
            .iter()
            .enumerate()
            .all(|(i, m)| index.insert(m.id.clone(), i).is_none());
        if unique {
            members.busy = initial.iter().filter(|m| m.busy).count();
            members.list = initial;
            members.index = index;
        } else {
            // A list naming a member twice (the last one counts): one by
            // one.
            for info in initial {
                members.insert(info);
            }
        }
        members
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
        let mut all = self.list.clone();
        all.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The member `id`, if it is one.
    pub fn get(&self, id: &str) -> Option<&MemberInfo> {
        self.index.get(id).map(|&i| &self.list[i])
    }

    /// The id of the member named `name`, shared with the table (no
    /// allocation), or a new one for a name not (or no longer) a member.
    pub fn id_of(&self, name: &str) -> NodeId {
        self.index
            .get_key_value(name)
            .map_or_else(|| NodeId::new(name), |(id, _)| id.clone())
    }

    /// Whether `id` is a member.
    pub fn is_member(&self, id: &NodeId) -> bool {
        self.index.contains_key(id)
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
            self.list
                .iter()
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
            // The first by id, whatever the list's order.
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

    /// Puts `info` in, connected (not waiting out a grace), keeping the
    /// busy count. Whether it was waiting out its grace.
    fn insert(&mut self, info: MemberInfo) -> bool {
        let back = self.gone_at.remove(&info.id).is_some();
        self.busy += usize::from(info.busy);
        match self.index.get(&info.id) {
            Some(&i) => {
                let old = std::mem::replace(&mut self.list[i], info);
                self.busy -= usize::from(old.busy);
            }
            None => {
                self.index.insert(info.id.clone(), self.list.len());
                self.list.push(info);
            }
        }
        back
    }

    /// Takes `id` out, keeping the busy count.
    fn remove(&mut self, id: &NodeId) -> Option<MemberInfo> {
        let at = self.index.remove(id)?;
        self.gone_at.remove(id);
        let old = self.list.swap_remove(at);
        if let Some(moved) = self.list.get(at) {
            self.index.insert(moved.id.clone(), at);
        }
        self.busy -= usize::from(old.busy);
        Some(old)
    }

    /// Whether `incarnation` of `id` is the member now and connected (not
    /// waiting out the failure timeout after a disconnect): an update of
    /// it changes nothing but its details.
    pub fn is_present(&self, id: &NodeId, incarnation: u64) -> bool {
        self.is_live(id, incarnation) && !self.gone_at.contains_key(id)
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
                update.changed = true;
                let old = self.get(id.as_str());
                let same = old.is_some_and(|old| old.incarnation == info.incarnation);
                match old {
                    Some(old) if !same => {
                        // A new incarnation: the old one is gone.
                        if report {
                            update.events.push(MembershipEvent::Left {
                                id: id.clone(),
                                incarnation: old.incarnation,
                                reason: LeaveReason::Disconnected,
                            });
                            update.events.push(MembershipEvent::Joined(info.clone()));
                        }
                        update.changes.push(Change::Left(id.clone()));
                    }
                    Some(old) if report && *old != info => {
                        update.events.push(MembershipEvent::Updated(info.clone()));
                    }
                    None if report => update.events.push(MembershipEvent::Joined(info.clone())),
                    _ => {}
                }
                let back = self.insert(info);
                if back && same {
                    update.changes.push(Change::Present(id));
                }
            }
            MemberEvent::Left {
                id,
                incarnation,
                reason,
            } => {
                if !self.is_live(&id, incarnation) {
                    return update;
                }
                update.changed = true;
                if reason == LeaveReason::Disconnected {
                    // Maybe reconnecting: wait for the failure timeout.
                    self.gone_at.entry(id).or_insert(now + self.grace);
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
        for m in &self.list {
            if !listed.contains(m.id.as_str()) {
                self.gone_at.insert(m.id.clone(), now + self.grace);
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
        self.gone_at.values().copied().min()
    }

    /// Declares gone the members whose grace ran out by `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Update {
        if self.gone_at.is_empty() {
            return Update::default();
        }
        let mut ids: Vec<NodeId> = self
            .gone_at
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| id.clone())
            .collect();
        // Told in order of id, whatever the map's order.
        ids.sort_unstable();
        let mut update = Update::default();
        for id in ids {
            let Some(info) = self.remove(&id) else {
                continue;
            };
            tracing::info!(node = %id, "member did not come back within the failure timeout");
            update.changed = true;
            if self.report {
                update.events.push(MembershipEvent::Left {
                    id: id.clone(),
                    incarnation: info.incarnation,
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

    /// The list and its index stay one: members taken out from anywhere
    /// (the last moves into the gap) and put back are all found, a list
    /// naming a member twice keeps the last, and the busy count follows.
    #[test]
    fn members_taken_out_and_put_back_are_all_found() {
        let t0 = Instant::now();
        let mut busy_c = info("c", 1);
        busy_c.busy = true;
        let mut m = Members::new(
            vec![
                info("a", 1),
                busy_c,
                info("c", 2),
                info("d", 1),
                info("e", 1),
            ],
            Duration::from_secs(1),
        );
        assert_eq!(m.len(), 4, "c named twice counts once");
        assert_eq!(m.get("c").map(|c| c.incarnation), Some(2), "the last c");
        assert_eq!(m.busy_count(), 0);
        let mut busy_e = info("e", 1);
        busy_e.busy = true;
        m.handle_event(t0, MemberEvent::Updated(busy_e));
        assert_eq!(m.busy_count(), 1);
        m.handle_event(t0, left("a", 1, LeaveReason::Stopped));
        m.handle_event(t0, left("c", 2, LeaveReason::Failed));
        assert_eq!(m.busy_count(), 1);
        for (id, there) in [("a", false), ("c", false), ("d", true), ("e", true)] {
            assert_eq!(m.is_member(&NodeId::new(id)), there, "{id}");
            assert_eq!(
                m.get(id).is_some_and(|x| x.id.as_str() == id),
                there,
                "{id}"
            );
        }
        m.handle_event(t0, left("e", 1, LeaveReason::Stopped));
        assert_eq!(m.busy_count(), 0);
        m.handle_event(t0, MemberEvent::Joined(info("a", 2)));
        m.handle_event(t0, MemberEvent::Joined(info("f", 1)));
        let ids: Vec<String> = m.snapshot().iter().map(|x| x.id.to_string()).collect();
        assert_eq!(ids, ["a", "d", "f"]);
        for id in ["a", "d", "f"] {
            assert_eq!(m.get(id).map(|x| x.id.as_str()), Some(id));
        }
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
