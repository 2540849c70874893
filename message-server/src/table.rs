//! The routing table: who is connected, in which groups, offering which
//! services, and where each target resolves to.
//!
//! Pure state: no sockets, no clock. The connection tasks keep one table
//! behind a read-mostly lock and consult it for every message.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

#[cfg(test)]
use transports::protocol::Target;
use transports::protocol::{DeliveryFailure, MemberInfo, NodeId, TargetRef};

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// A node with this id is registered and live.
    #[error("node {id} is already registered (incarnation {incarnation})")]
    Duplicate {
        /// The node id.
        id: NodeId,
        /// The incarnation that holds it.
        incarnation: u64,
    },
}

/// Where a message goes, as resolved by the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// One receiver (`Node` and `AnyOf` targets).
    One(NodeId),
    /// Any number of receivers (`Group` and `All` targets), possibly none
    /// for `All` when the sender is alone.
    Many(Vec<NodeId>),
}

#[derive(Debug, Clone)]
struct Entry {
    info: MemberInfo,
    services: HashSet<String>,
    /// `info` as postcard encodes it, for welcomes (see
    /// [`RoutingTable::encoded_members`]); `None` if it could not be
    /// encoded (logged).
    encoded: Option<Bytes>,
}

impl Entry {
    fn new(info: MemberInfo) -> Self {
        let services = info.services.iter().map(ToString::to_string).collect();
        let mut entry = Entry {
            info,
            services,
            encoded: None,
        };
        entry.encode();
        entry
    }

    /// Encodes `info` again, after a change.
    fn encode(&mut self) {
        self.encoded = match postcard::to_allocvec(&self.info) {
            Ok(bytes) => Some(Bytes::from(bytes)),
            Err(e) => {
                tracing::error!(node = %self.info.id, error = %e, "a member's details could not be encoded");
                None
            }
        };
    }
}

/// The registry of members and the resolution of targets.
#[derive(Debug, Default)]
pub struct RoutingTable {
    nodes: BTreeMap<NodeId, Entry>,
    groups: BTreeMap<String, BTreeSet<NodeId>>,
    any_of_cursor: AtomicUsize,
}

impl RoutingTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of registered members.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no member is registered.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Registers a member.
    ///
    /// # Errors
    ///
    /// [`RegisterError::Duplicate`] if the id is taken.
    pub fn register(&mut self, info: MemberInfo) -> Result<(), RegisterError> {
        if let Some(existing) = self.nodes.get(&info.id) {
            return Err(RegisterError::Duplicate {
                id: info.id.clone(),
                incarnation: existing.info.incarnation,
            });
        }
        for g in &info.groups {
            self.groups
                .entry(g.to_string())
                .or_default()
                .insert(info.id.clone());
        }
        self.nodes.insert(info.id.clone(), Entry::new(info));
        Ok(())
    }

    /// Removes a member if `incarnation` is the registered one; returns what
    /// was removed.
    pub fn remove(&mut self, id: &NodeId, incarnation: u64) -> Option<MemberInfo> {
        if self.nodes.get(id)?.info.incarnation != incarnation {
            return None;
        }
        let entry = self.nodes.remove(id)?;
        for g in &entry.info.groups {
            if let Some(members) = self.groups.get_mut(g.as_str()) {
                members.remove(id);
                if members.is_empty() {
                    self.groups.remove(g.as_str());
                }
            }
        }
        Some(entry.info)
    }

    /// Adds a service to a member; returns the updated member, or `None` if
    /// the member is unknown or already offered it.
    pub fn subscribe(&mut self, id: &NodeId, service: &str) -> Option<MemberInfo> {
        let entry = self.nodes.get_mut(id)?;
        if !entry.services.insert(service.to_owned()) {
            return None;
        }
        entry.info.services.push(service.into());
        entry.encode();
        Some(entry.info.clone())
    }

    /// Removes a service from a member; returns the updated member, or
    /// `None` if nothing changed.
    pub fn unsubscribe(&mut self, id: &NodeId, service: &str) -> Option<MemberInfo> {
        let entry = self.nodes.get_mut(id)?;
        if !entry.services.remove(service) {
            return None;
        }
        entry.info.services.retain(|s| s != service);
        entry.encode();
        Some(entry.info.clone())
    }

    /// Sets whether member `id` is busy; returns the updated member, or
    /// `None` if nothing changed.
    pub fn set_busy(&mut self, id: &NodeId, busy: bool) -> Option<MemberInfo> {
        let entry = self.nodes.get_mut(id)?;
        if entry.info.busy == busy {
            return None;
        }
        entry.info.busy = busy;
        entry.encode();
        Some(entry.info.clone())
    }

    /// The member registered under `id`.
    pub fn member(&self, id: &NodeId) -> Option<&MemberInfo> {
        self.nodes.get(id).map(|e| &e.info)
    }

    /// Every member, ordered by id.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.nodes.values().map(|e| e.info.clone()).collect()
    }

    /// Every member as postcard encodes it, ordered by id: what a welcome
    /// carries (see [`transports::protocol::Welcome::encode_with_members`]).
    /// `None` if one could not be encoded.
    pub fn encoded_members(&self) -> Option<Vec<Bytes>> {
        self.nodes.values().map(|e| e.encoded.clone()).collect()
    }

    fn offers(&self, id: &str, service: &str) -> bool {
        self.nodes
            .get(id)
            .is_some_and(|e| e.services.contains(service))
    }

    /// Resolves a `Node` target without looking at services (for replies,
    /// which go to the requesting runtime).
    ///
    /// # Errors
    ///
    /// [`DeliveryFailure::UnknownTarget`] for an unknown node or another
    /// kind of target.
    pub fn resolve_node<'t>(
        &self,
        target: impl Into<TargetRef<'t>>,
    ) -> Result<Resolution, DeliveryFailure> {
        match target.into() {
            TargetRef::Node(id) => match self.nodes.get_key_value(id) {
                Some((id, _)) => Ok(Resolution::One(id.clone())),
                None => Err(DeliveryFailure::UnknownTarget),
            },
            _ => Err(DeliveryFailure::UnknownTarget),
        }
    }

    /// The members of `group` an `AnyOf` message from `sender` to `service`
    /// may go to: those offering the service, other members preferred over
    /// the sender (which is a candidate only when it is the only one).
    ///
    /// # Errors
    ///
    /// [`DeliveryFailure::UnknownTarget`] for an unknown or empty group;
    /// [`DeliveryFailure::NoSuchService`] when no member offers the service.
    pub fn any_of_candidates(
        &self,
        sender: &str,
        group: &str,
        service: &str,
    ) -> Result<Vec<NodeId>, DeliveryFailure> {
        let members = self
            .groups
            .get(group)
            .ok_or(DeliveryFailure::UnknownTarget)?;
        let candidates: Vec<&NodeId> = members
            .iter()
            .filter(|id| self.offers(id.as_str(), service))
            .collect();
        if candidates.is_empty() {
            return Err(DeliveryFailure::NoSuchService);
        }
        let others: Vec<NodeId> = candidates
            .iter()
            .filter(|id| id.as_str() != sender)
            .map(|id| (*id).clone())
            .collect();
        if others.is_empty() {
            Ok(candidates.into_iter().cloned().collect())
        } else {
            Ok(others)
        }
    }

    /// Resolves `target` for a message from `sender` to `service`.
    ///
    /// - `Node`: the node, if registered and offering the service.
    /// - `Group`: every member offering the service, the sender included if
    ///   it is a member.
    /// - `AnyOf`: the member offering the service with the lowest `load`,
    ///   other members preferred over the sender; ties rotate.
    /// - `All`: every other member offering the service (possibly none).
    ///
    /// # Errors
    ///
    /// [`DeliveryFailure::UnknownTarget`] for an unknown node or an empty
    /// group; [`DeliveryFailure::NoSuchService`] when no candidate offers
    /// the service.
    pub fn resolve<'t>(
        &self,
        sender: &str,
        target: impl Into<TargetRef<'t>>,
        service: &str,
        load: impl Fn(&NodeId) -> usize,
    ) -> Result<Resolution, DeliveryFailure> {
        match target.into() {
            TargetRef::Node(id) => match self.nodes.get_key_value(id) {
                None => Err(DeliveryFailure::UnknownTarget),
                Some((_, e)) if !e.services.contains(service) => {
                    Err(DeliveryFailure::NoSuchService)
                }
                Some((id, _)) => Ok(Resolution::One(id.clone())),
            },
            TargetRef::Group(g) => {
                let members = self.groups.get(g).ok_or(DeliveryFailure::UnknownTarget)?;
                let receivers: Vec<NodeId> = members
                    .iter()
                    .filter(|id| self.offers(id.as_str(), service))
                    .cloned()
                    .collect();
                if receivers.is_empty() {
                    return Err(DeliveryFailure::NoSuchService);
                }
                Ok(Resolution::Many(receivers))
            }
            TargetRef::AnyOf(g) => {
                let pool = self.any_of_candidates(sender, g, service)?;
                let turn = self.any_of_cursor.fetch_add(1, Ordering::Relaxed);
                let i = least_loaded(pool.len(), turn, |i| load(&pool[i]))
                    .ok_or(DeliveryFailure::NoSuchService)?;
                Ok(Resolution::One(pool[i].clone()))
            }
            TargetRef::All => Ok(Resolution::Many(
                self.nodes
                    .iter()
                    .filter(|(id, e)| id.as_str() != sender && e.services.contains(service))
                    .map(|(id, _)| id.clone())
                    .collect(),
            )),
        }
    }
}

/// `AnyOf`'s choice among `n` candidates: the least loaded (`load(i)`),
/// the first found from a start that moves with `turn`, so that ties
/// rotate. `None` when there is no candidate. The routing table and the
/// connections' route caches both choose with it.
pub(crate) fn least_loaded(n: usize, turn: usize, load: impl Fn(usize) -> usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let start = turn % n;
    let mut best = start;
    let mut best_load = load(start);
    for k in 1..n {
        let i = (start + k) % n;
        let l = load(i);
        if l < best_load {
            best = i;
            best_load = l;
        }
    }
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use transports::protocol::Role;

    fn member(id: &str, groups: &[&str], services: &[&str]) -> MemberInfo {
        MemberInfo {
            id: NodeId::new(id),
            incarnation: 1,
            role: Role::Server,
            groups: groups.iter().map(|s| (*s).into()).collect(),
            services: services.iter().map(|s| (*s).into()).collect(),
            direct_addr: None,
            session_key: [0; 32],
            busy: false,
        }
    }

    fn table() -> RoutingTable {
        let mut t = RoutingTable::new();
        t.register(member("a", &["web"], &["svc"])).expect("a");
        t.register(member("b", &["web"], &["svc"])).expect("b");
        t.register(member("c", &["batch"], &["svc", "other"]))
            .expect("c");
        t.register(member("d", &["batch"], &[])).expect("d");
        t
    }

    fn ids(list: &[&str]) -> Vec<NodeId> {
        list.iter().map(NodeId::new).collect()
    }

    #[test]
    fn resolves_each_target_kind() {
        let t = table();
        let a = NodeId::new("a");
        let none = |_: &NodeId| 0;
        let cases: Vec<(Target, &str, Result<Resolution, DeliveryFailure>)> = vec![
            (
                Target::Node("b".into()),
                "svc",
                Ok(Resolution::One("b".into())),
            ),
            (
                Target::Node("zz".into()),
                "svc",
                Err(DeliveryFailure::UnknownTarget),
            ),
            (
                Target::Node("d".into()),
                "svc",
                Err(DeliveryFailure::NoSuchService),
            ),
            (
                Target::Group("web".into()),
                "svc",
                Ok(Resolution::Many(ids(&["a", "b"]))),
            ),
            (
                Target::Group("batch".into()),
                "svc",
                Ok(Resolution::Many(ids(&["c"]))),
            ),
            (
                Target::Group("batch".into()),
                "nope",
                Err(DeliveryFailure::NoSuchService),
            ),
            (
                Target::Group("nogroup".into()),
                "svc",
                Err(DeliveryFailure::UnknownTarget),
            ),
            (
                Target::AnyOf("nogroup".into()),
                "svc",
                Err(DeliveryFailure::UnknownTarget),
            ),
            (
                Target::AnyOf("web".into()),
                "svc",
                Ok(Resolution::One("b".into())),
            ),
            (Target::All, "svc", Ok(Resolution::Many(ids(&["b", "c"])))),
            (Target::All, "other", Ok(Resolution::Many(ids(&["c"])))),
            (Target::All, "nope", Ok(Resolution::Many(vec![]))),
        ];
        for (target, service, expected) in cases {
            assert_eq!(
                t.resolve(a.as_str(), &target, service, none),
                expected,
                "{target} {service}"
            );
        }
    }

    #[test]
    fn replies_resolve_without_services() {
        let t = table();
        assert_eq!(
            t.resolve_node(&Target::Node("d".into())),
            Ok(Resolution::One("d".into()))
        );
        assert_eq!(
            t.resolve_node(&Target::Node("zz".into())),
            Err(DeliveryFailure::UnknownTarget)
        );
        assert_eq!(
            t.resolve_node(&Target::All),
            Err(DeliveryFailure::UnknownTarget)
        );
    }

    #[test]
    fn least_loaded_table() {
        // (loads, turns, the choices)
        let cases: Vec<(&str, Vec<usize>, Vec<usize>)> = vec![
            ("ties rotate", vec![0, 0, 0], vec![0, 1, 2, 0]),
            (
                "the least loaded wins from any start",
                vec![5, 0, 5],
                vec![1, 1, 1],
            ),
            (
                "ties among the least rotate",
                vec![1, 0, 3, 0],
                vec![1, 1, 3, 3, 1],
            ),
            ("one candidate", vec![9], vec![0, 0]),
        ];
        for (name, loads, expected) in cases {
            let got: Vec<usize> = (0..expected.len())
                .map(|turn| least_loaded(loads.len(), turn, |i| loads[i]).expect("some"))
                .collect();
            assert_eq!(got, expected, "{name}");
        }
        assert_eq!(least_loaded(0, 3, |_| 0), None);
    }

    #[test]
    fn any_of_rotates_and_prefers_least_loaded() {
        let mut t = RoutingTable::new();
        for id in ["a", "b", "c", "s"] {
            t.register(member(id, &["g"], &["svc"])).expect("register");
        }
        let s = NodeId::new("s");
        let mut counts = BTreeMap::new();
        for _ in 0..30 {
            match t.resolve(s.as_str(), &Target::AnyOf("g".into()), "svc", |_| 0) {
                Ok(Resolution::One(id)) => *counts.entry(id).or_insert(0) += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            counts.len(),
            3,
            "the sender is never picked while others exist"
        );
        assert!(counts.values().all(|&c| c == 10), "{counts:?}");

        let loaded = |id: &NodeId| if id == "b" { 0 } else { 5 };
        for _ in 0..5 {
            assert_eq!(
                t.resolve(s.as_str(), &Target::AnyOf("g".into()), "svc", loaded),
                Ok(Resolution::One("b".into()))
            );
        }
    }

    #[test]
    fn duplicate_registration_is_refused_and_remove_checks_incarnation() {
        let mut t = table();
        assert!(matches!(
            t.register(member("a", &[], &[])),
            Err(RegisterError::Duplicate { .. })
        ));
        assert_eq!(t.remove(&"a".into(), 99), None, "another incarnation");
        assert!(t.remove(&"a".into(), 1).is_some());
        assert!(t.register(member("a", &[], &[])).is_ok());
    }

    #[test]
    fn remove_cleans_groups_and_subscribe_updates_services() {
        let mut t = table();
        t.remove(&"c".into(), 1);
        t.remove(&"d".into(), 1);
        let a = NodeId::new("a");
        assert_eq!(
            t.resolve(a.as_str(), &Target::Group("batch".into()), "svc", |_| 0),
            Err(DeliveryFailure::UnknownTarget)
        );
        assert!(t.subscribe(&"b".into(), "new").is_some());
        assert!(t.subscribe(&"b".into(), "new").is_none(), "no change twice");
        assert_eq!(
            t.resolve(a.as_str(), &Target::Node("b".into()), "new", |_| 0),
            Ok(Resolution::One("b".into()))
        );
        assert!(t.unsubscribe(&"b".into(), "new").is_some());
        assert_eq!(
            t.resolve(a.as_str(), &Target::Node("b".into()), "new", |_| 0),
            Err(DeliveryFailure::NoSuchService)
        );
    }
}
