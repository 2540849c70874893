//! [`SendOptions`]: how one send, notify or request is made.

use std::time::Duration;

use transports::protocol::Priority;

/// Options of one send, notify or request; the defaults are the config's.
///
/// ```
/// use std::time::Duration;
/// use node_runtime::SendOptions;
/// let quick = SendOptions::new().timeout(Duration::from_millis(200));
/// assert_eq!(quick.timeout_or(Duration::from_secs(10)), Duration::from_millis(200));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOptions {
    timeout: Option<Duration>,
    priority: Option<Priority>,
    recoverable: bool,
}

impl SendOptions {
    /// The config's defaults.
    pub fn new() -> SendOptions {
        SendOptions::default()
    }

    /// How long this call waits: for room, for a busy receiver, for its
    /// acknowledgements or its reply. Default `node.send_timeout_ms`.
    pub fn timeout(mut self, timeout: Duration) -> SendOptions {
        self.timeout = Some(timeout);
        self
    }

    /// Which queue the message takes on every hop: the most urgent go
    /// first (see [`Priority`]). Default `services.<service>.priority`, or
    /// [`Priority::Normal`]. A reply takes its request's priority.
    pub fn priority(mut self, priority: Priority) -> SendOptions {
        self.priority = Some(priority);
        self
    }

    /// Makes the message recoverable (`Node::send_with` or
    /// `Node::submit_with`, to one node): it
    /// is fsynced in this node's store (`node.data_dir`) before it is
    /// sent (`submit_with` returns once it is queued for the store, so that
    /// messages submitted in a row share one fsync; after a crash,
    /// `Node::recoverable_sent` says which were stored), stored by its receiver before it is acknowledged, and sent
    /// again until it is, across restarts of every process. Its receiver's
    /// application sees it once (see `Message::is_recoverable`). If it is
    /// not delivered within the timeout, the send answers
    /// `SendError::StillQueued` and delivery goes on.
    pub fn recoverable(mut self) -> SendOptions {
        self.recoverable = true;
        self
    }

    /// Whether the message is recoverable.
    pub fn is_recoverable(&self) -> bool {
        self.recoverable
    }

    /// The priority set, if any.
    pub(crate) fn given_priority(&self) -> Option<Priority> {
        self.priority
    }

    /// The timeout set, or `default`.
    pub fn timeout_or(&self, default: Duration) -> Duration {
        self.timeout.unwrap_or(default)
    }

    /// The timeout set, if any.
    pub(crate) fn given_timeout(&self) -> Option<Duration> {
        self.timeout
    }
}

/// When a service's receiver acknowledges an acknowledged message (`send`,
/// `submit`) to its sender.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AckMode {
    /// Once it is in the service's inbox (the default).
    #[default]
    OnReceipt,
    /// Once the application says it processed it: a served service's
    /// handler returned `Ok` (an `Err` goes back as `Rejected`), or an
    /// inbox's user called `Message::ack` (`Message::reject`). A receiver
    /// that stops before leaves it unacknowledged: its sender gets an
    /// error that says it may have been delivered, never "delivered".
    OnProcessed,
}

/// How a service is subscribed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    pub(crate) ack: AckMode,
}

impl SubscribeOptions {
    /// The defaults: acknowledged on receipt.
    pub fn new() -> SubscribeOptions {
        SubscribeOptions::default()
    }

    /// When its messages are acknowledged.
    pub fn ack(mut self, mode: AckMode) -> SubscribeOptions {
        self.ack = mode;
        self
    }
}
