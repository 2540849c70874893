//! The node's view of the cluster, kept current by the message server's
//! membership events, and the stream of those events for the application.
//! The decisions (who is a member, when a disconnected one is declared
//! gone) are [`cluster_manager::members`]'; this shares them between the
//! node's tasks and broadcasts the events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

pub use cluster_manager::members::MembershipEvent;
use cluster_manager::members::{Change, Members, Update};
use tokio::sync::broadcast;
use transports::protocol::{MemberEvent, MemberInfo, NodeId};

/// Events buffered per subscriber before it lags.
pub const MEMBERSHIP_EVENT_CAPACITY: usize = 1024;

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

/// The members table shared by the node's tasks, and the broadcast of its
/// events.
#[derive(Debug)]
pub(crate) struct MemberView {
    members: RwLock<Members>,
    /// Whether an incarnation was declared failed: every received message
    /// asks, and the answer is nearly always no, so it is read without the
    /// lock.
    any_failed: AtomicBool,
    events: broadcast::Sender<MembershipEvent>,
}

impl MemberView {
    pub(crate) fn new(initial: Vec<MemberInfo>, grace: Duration) -> Self {
        let (events, _) = broadcast::channel(MEMBERSHIP_EVENT_CAPACITY);
        MemberView {
            members: RwLock::new(Members::new(initial, grace)),
            any_failed: AtomicBool::new(false),
            events,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Members> {
        self.members.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the table, then publishes what it produced.
    fn update(&self, f: impl FnOnce(&mut Members) -> Update) -> Vec<Change> {
        let update = {
            let mut members = self.members.write().unwrap_or_else(|p| p.into_inner());
            let update = f(&mut members);
            if members.any_failed() {
                self.any_failed.store(true, Ordering::Release);
            }
            update
        };
        for event in update.events {
            self.emit(event);
        }
        update.changes
    }

    /// Whether `incarnation` of `id` was declared failed.
    pub(crate) fn is_failed(&self, id: &str, incarnation: u64) -> bool {
        self.any_failed.load(Ordering::Acquire) && self.read().is_failed(id, incarnation)
    }

    pub(crate) fn snapshot(&self) -> Vec<MemberInfo> {
        self.read().snapshot()
    }

    /// The id of the member named `name`, shared with the membership (no
    /// allocation), or a new one for a name not (or no longer) a member.
    pub(crate) fn id_of(&self, name: &str) -> NodeId {
        self.read().id_of(name)
    }

    /// Whether `id` is a member and `f` holds for it (no copy taken).
    pub(crate) fn member_is(&self, id: &NodeId, f: impl FnOnce(&MemberInfo) -> bool) -> bool {
        self.read().get(id.as_str()).is_some_and(f)
    }

    pub(crate) fn is_member(&self, id: &NodeId) -> bool {
        self.read().is_member(id)
    }

    pub(crate) fn direct_addr(&self, id: &NodeId) -> Option<std::net::SocketAddr> {
        self.read().direct_addr(id)
    }

    pub(crate) fn is_live(&self, id: &NodeId, incarnation: u64) -> bool {
        self.read().is_live(id, incarnation)
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
        self.update(|m| m.handle_event(Instant::now(), event))
    }

    /// Takes the member list of a new connection's `Welcome`: members it
    /// lacks get the failure timeout to register again.
    pub(crate) fn reconcile(&self, current: Vec<MemberInfo>) -> Vec<Change> {
        self.update(|m| m.handle_welcome(Instant::now(), current))
    }

    /// Declares gone the members whose grace ran out.
    pub(crate) fn expire(&self, now: Instant) -> Vec<Change> {
        self.update(|m| m.handle_timeout(now))
    }

    pub(crate) fn disconnected(&self) {
        self.emit(MembershipEvent::Disconnected);
    }
}
