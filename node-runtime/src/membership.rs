//! The node's view of the cluster, kept current by the message server's
//! membership events, and the stream of those events for the application.

use std::collections::BTreeMap;
use std::sync::RwLock;

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
    /// This node lost its connection to the message server.
    Disconnected,
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

/// The current members, by id.
#[derive(Debug)]
pub(crate) struct MemberView {
    members: RwLock<BTreeMap<NodeId, MemberInfo>>,
    events: broadcast::Sender<MembershipEvent>,
}

impl MemberView {
    pub(crate) fn new(initial: Vec<MemberInfo>) -> Self {
        let (events, _) = broadcast::channel(MEMBERSHIP_EVENT_CAPACITY);
        MemberView {
            members: RwLock::new(initial.into_iter().map(|m| (m.id.clone(), m)).collect()),
            events,
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<MemberInfo> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn member(&self, id: &NodeId) -> Option<MemberInfo> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub(crate) fn is_member(&self, id: &NodeId) -> bool {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    pub(crate) fn direct_addr(&self, id: &NodeId) -> Option<std::net::SocketAddr> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .and_then(|m| m.direct_addr)
    }

    pub(crate) fn is_live(&self, id: &NodeId, incarnation: u64) -> bool {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|m| m.incarnation == incarnation)
    }

    pub(crate) fn subscribe(&self) -> MembershipEvents {
        MembershipEvents {
            rx: self.events.subscribe(),
        }
    }

    /// Applies a server event; returns the id that left, if one did.
    pub(crate) fn apply(&self, event: MemberEvent) -> Option<NodeId> {
        let mut left = None;
        let app_event = {
            let mut members = self.members.write().unwrap_or_else(|p| p.into_inner());
            match event {
                MemberEvent::Joined(info) => {
                    members.insert(info.id.clone(), info.clone());
                    Some(MembershipEvent::Joined(info))
                }
                MemberEvent::Updated(info) => match members.get(&info.id) {
                    Some(m) if m.incarnation == info.incarnation => {
                        members.insert(info.id.clone(), info.clone());
                        Some(MembershipEvent::Updated(info))
                    }
                    _ => None,
                },
                MemberEvent::Left {
                    id,
                    incarnation,
                    reason,
                } => match members.get(&id) {
                    Some(m) if m.incarnation == incarnation => {
                        members.remove(&id);
                        left = Some(id.clone());
                        Some(MembershipEvent::Left {
                            id,
                            incarnation,
                            reason,
                        })
                    }
                    _ => None,
                },
            }
        };
        if let Some(e) = app_event {
            // No subscriber is fine.
            let _ = self.events.send(e);
        }
        left
    }

    pub(crate) fn disconnected(&self) {
        let _ = self.events.send(MembershipEvent::Disconnected);
    }
}
