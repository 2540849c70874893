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
#[derive(Debug)]
pub(crate) struct MemberView {
    events: broadcast::Sender<MembershipEvent>,
    /// Woken at every membership event: sends held back by a busy member
    /// look again.
    pub(crate) changed: tokio::sync::Notify,
}

impl MemberView {
    pub(crate) fn new() -> Self {
        let (events, _) = broadcast::channel(MEMBERSHIP_EVENT_CAPACITY);
        MemberView {
            events,
            changed: tokio::sync::Notify::new(),
        }
    }

    pub(crate) fn subscribe(&self) -> MembershipEvents {
        MembershipEvents {
            rx: self.events.subscribe(),
        }
    }

    pub(crate) fn emit(&self, event: MembershipEvent) {
        // No subscriber is fine.
        let _ = self.events.send(event);
        self.changed.notify_waiters();
    }
}
