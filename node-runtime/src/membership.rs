//! The node's view of the cluster, kept current by the message server's
//! membership events, and the stream of those events for the application.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use transports::protocol::{LeaveReason, MemberEvent, MemberInfo, NodeId};

/// Events buffered per subscriber before it lags.
pub const MEMBERSHIP_EVENT_CAPACITY: usize = 1024;

/// A change the application may react to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MembershipEvent {
    /// A node joined the cluster.
    Joined(MemberInfo),
    /// A node changed its services.
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

/// Why [`MembershipEvents::recv`] returned no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventsError {
    /// The subscriber fell behind and this many events were skipped; call
    /// [`crate::Node::members`] to resynchronise.
    #[error("membership events lagged: {0} skipped")]
    Lagged(u64),
    /// The node shut down.
    #[error("the node is shut down")]
    Closed,
}

/// A subscription to membership events.
#[derive(Debug)]
pub struct MembershipEvents {
    pub(crate) rx: broadcast::Receiver<MembershipEvent>,
}

impl MembershipEvents {
    /// The next event.
    ///
    /// # Errors
    ///
    /// [`EventsError::Lagged`] if events were skipped, [`EventsError::Closed`]
    /// after shutdown.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn recv(&mut self) -> Result<MembershipEvent, EventsError> {
        match self.rx.recv().await {
            Ok(e) => Ok(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Err(EventsError::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => Err(EventsError::Closed),
        }
    }
}

/// What applying a server event changed, for the runtime to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// A member is gone for good: fail what waits on it.
    Left(NodeId),
    /// A member (re)registered with the message server: what waits on it
    /// may be resent.
    Present(NodeId),
}

#[derive(Debug, Clone)]
struct Entry {
    info: MemberInfo,
    /// Set while the member is disconnected from the message server: it is
    /// declared gone at this instant unless it registers again.
    gone_at: Option<Instant>,
}

/// The current members, by id.
///
/// A member whose connection to the message server broke is kept for the
/// failure timeout (it may be reconnecting, or the message server may have
/// restarted); it is declared gone only if it does not register again in
/// time. A planned stop or a declared failure takes effect at once.
#[derive(Debug)]
pub(crate) struct MemberView {
    members: RwLock<BTreeMap<NodeId, Entry>>,
    /// Incarnations declared failed: nothing from them is accepted.
    failed: RwLock<std::collections::HashSet<(NodeId, u64)>>,
    /// Whether `failed` holds anything: every received message asks, and
    /// the answer is nearly always no, so it is read without the lock.
    any_failed: std::sync::atomic::AtomicBool,
    events: broadcast::Sender<MembershipEvent>,
    grace: Duration,
}

impl MemberView {
    pub(crate) fn new(initial: Vec<MemberInfo>, grace: Duration) -> Self {
        let (events, _) = broadcast::channel(MEMBERSHIP_EVENT_CAPACITY);
        MemberView {
            members: RwLock::new(
                initial
                    .into_iter()
                    .map(|m| {
                        (
                            m.id.clone(),
                            Entry {
                                info: m,
                                gone_at: None,
                            },
                        )
                    })
                    .collect(),
            ),
            events,
            grace,
            failed: RwLock::default(),
            any_failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether `incarnation` of `id` was declared failed.
    pub(crate) fn is_failed(&self, id: &str, incarnation: u64) -> bool {
        if !self.any_failed.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        // A scan (failures are rare).
        let failed = self.failed.read().unwrap_or_else(|p| p.into_inner());
        failed
            .iter()
            .any(|(f, i)| *i == incarnation && f.as_str() == id)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<NodeId, Entry>> {
        self.members.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<NodeId, Entry>> {
        self.members.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn snapshot(&self) -> Vec<MemberInfo> {
        self.read().values().map(|e| e.info.clone()).collect()
    }

    /// The id of the member named `name`, shared with the membership (no
    /// allocation), or a new one for a name not (or no longer) a member.
    pub(crate) fn id_of(&self, name: &str) -> NodeId {
        self.read()
            .get_key_value(name)
            .map_or_else(|| NodeId::new(name), |(id, _)| id.clone())
    }

    /// Whether `id` is a member and `f` holds for it (no copy taken).
    pub(crate) fn member_is(&self, id: &NodeId, f: impl FnOnce(&MemberInfo) -> bool) -> bool {
        self.read().get(id).is_some_and(|e| f(&e.info))
    }

    pub(crate) fn is_member(&self, id: &NodeId) -> bool {
        self.read().contains_key(id)
    }

    pub(crate) fn direct_addr(&self, id: &NodeId) -> Option<std::net::SocketAddr> {
        self.read().get(id).and_then(|e| e.info.direct_addr)
    }

    pub(crate) fn is_live(&self, id: &NodeId, incarnation: u64) -> bool {
        self.read()
            .get(id)
            .is_some_and(|e| e.info.incarnation == incarnation)
    }

    pub(crate) fn subscribe(&self) -> MembershipEvents {
        MembershipEvents {
            rx: self.events.subscribe(),
        }
    }

    pub(crate) fn emit_event(&self, event: MembershipEvent) {
        self.emit(event);
    }

    fn emit(&self, event: MembershipEvent) {
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    /// Applies a server event.
    pub(crate) fn apply(&self, event: MemberEvent) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut events = Vec::new();
        {
            let mut members = self.write();
            match event {
                MemberEvent::Joined(info) | MemberEvent::Updated(info) => {
                    let id = info.id.clone();
                    let mut back = false;
                    match members.get(&id) {
                        Some(e) if e.info.incarnation == info.incarnation => {
                            back = e.gone_at.is_some();
                            if e.info != info {
                                events.push(MembershipEvent::Updated(info.clone()));
                            }
                        }
                        Some(old) => {
                            // A new incarnation: the old one is gone.
                            events.push(MembershipEvent::Left {
                                id: id.clone(),
                                incarnation: old.info.incarnation,
                                reason: LeaveReason::Disconnected,
                            });
                            changes.push(Change::Left(id.clone()));
                            events.push(MembershipEvent::Joined(info.clone()));
                        }
                        None => events.push(MembershipEvent::Joined(info.clone())),
                    }
                    members.insert(
                        id.clone(),
                        Entry {
                            info,
                            gone_at: None,
                        },
                    );
                    if back {
                        changes.push(Change::Present(id));
                    }
                }
                MemberEvent::Left {
                    id,
                    incarnation,
                    reason,
                } => match members.get_mut(&id) {
                    Some(e) if e.info.incarnation == incarnation => {
                        if reason == LeaveReason::Disconnected {
                            // Maybe reconnecting: wait for the failure timeout.
                            e.gone_at.get_or_insert(Instant::now() + self.grace);
                        } else {
                            if reason == LeaveReason::Failed {
                                self.failed
                                    .write()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert((id.clone(), incarnation));
                                self.any_failed
                                    .store(true, std::sync::atomic::Ordering::Release);
                            }
                            members.remove(&id);
                            events.push(MembershipEvent::Left {
                                id: id.clone(),
                                incarnation,
                                reason,
                            });
                            changes.push(Change::Left(id));
                        }
                    }
                    _ => {}
                },
            }
        }
        for e in events {
            self.emit(e);
        }
        changes
    }

    /// Takes the member list of a new connection's `Welcome`: members it
    /// lacks get the failure timeout to register again.
    pub(crate) fn reconcile(&self, current: Vec<MemberInfo>) -> Vec<Change> {
        let now = Instant::now();
        let mut changes = Vec::new();
        {
            let mut members = self.write();
            // A fresh chance with every new link: what happened while this
            // node was away is unknown.
            for e in members.values_mut() {
                if !current.iter().any(|m| m.id == e.info.id) {
                    e.gone_at = Some(now + self.grace);
                }
            }
        }
        for info in current {
            changes.extend(self.apply(MemberEvent::Joined(info)));
        }
        changes
    }

    /// Declares gone the members whose grace ran out.
    pub(crate) fn expire(&self, now: Instant) -> Vec<Change> {
        let gone: Vec<Entry> = {
            let mut members = self.write();
            let ids: Vec<NodeId> = members
                .iter()
                .filter(|(_, e)| e.gone_at.is_some_and(|t| t <= now))
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| members.remove(id)).collect()
        };
        gone.into_iter()
            .map(|e| {
                tracing::info!(node = %e.info.id, "member did not come back within the failure timeout");
                self.emit(MembershipEvent::Left {
                    id: e.info.id.clone(),
                    incarnation: e.info.incarnation,
                    reason: LeaveReason::Failed,
                });
                Change::Left(e.info.id)
            })
            .collect()
    }

    pub(crate) fn disconnected(&self) {
        self.emit(MembershipEvent::Disconnected);
    }
}
