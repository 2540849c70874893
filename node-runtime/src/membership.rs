//! The node's view of the cluster, kept current by the message server's
//! membership events, and the stream of those events for the application.
//! The decisions (who is a member, when a disconnected one is declared
//! gone) are [`cluster_manager::members`]', made in the node's core; this
//! broadcasts the events they produce.

pub use cluster_manager::members::MembershipEvent;
use tokio::sync::broadcast;

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

/// The broadcast of membership events to the application's
/// subscriptions (the members themselves are the core's).
///
/// The channel is made at the first subscription: a node nobody watches
/// holds no buffer of [`MEMBERSHIP_EVENT_CAPACITY`] events (in a process
/// of hundreds of nodes, that buffer alone was most of their memory), and
/// its core makes no events until then (see
/// `NodeCore::set_membership_reporting`).
#[derive(Debug)]
pub(crate) struct MemberView {
    events: std::sync::OnceLock<broadcast::Sender<MembershipEvent>>,
    /// Woken at every membership event: sends held back by a busy member
    /// look again.
    pub(crate) changed: tokio::sync::Notify,
}

impl MemberView {
    pub(crate) fn new() -> Self {
        MemberView {
            events: std::sync::OnceLock::new(),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub(crate) fn subscribe(&self) -> MembershipEvents {
        let events = self
            .events
            .get_or_init(|| broadcast::channel(MEMBERSHIP_EVENT_CAPACITY).0);
        MembershipEvents {
            rx: events.subscribe(),
        }
    }

    pub(crate) fn emit(&self, event: MembershipEvent) {
        if let Some(events) = self.events.get() {
            // No subscriber is fine.
            let _ = events.send(event);
        }
        self.changed.notify_waiters();
    }
}
