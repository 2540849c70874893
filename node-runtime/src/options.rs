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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendOptions {
    timeout: Option<Duration>,
    priority: Option<Priority>,
    recoverable: bool,
    ttl: Option<Duration>,
    retry: Option<RetryPolicy>,
}

/// How a failed acknowledged send is tried again (see
/// [`SendOptions::retry`]): after `delay`, then `delay * backoff`, and so
/// on, `attempts` times in all (the first send included).
///
/// ```
/// use std::time::Duration;
/// use node_runtime::RetryPolicy;
/// let policy = RetryPolicy { attempts: 3, delay: Duration::from_millis(100), backoff: 2.0 };
/// assert_eq!(policy.delay_before(2), Some(Duration::from_millis(100)));
/// assert_eq!(policy.delay_before(3), Some(Duration::from_millis(200)));
/// assert_eq!(policy.delay_before(4), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (0 counts as 1).
    pub attempts: u32,
    /// The wait before the second attempt.
    pub delay: Duration,
    /// What each later wait is multiplied by (1.0: the same delay each
    /// time). Values below 1.0, and not-a-number, count as 1.0.
    pub backoff: f64,
}

impl RetryPolicy {
    /// As the store keeps it.
    pub(crate) fn stored(&self) -> clustercomm_store::StoredRetry {
        clustercomm_store::StoredRetry {
            attempts: self.attempts,
            delay_ms: self.delay.as_millis().min(u128::from(u64::MAX)) as u64,
            backoff_permille: (self.backoff.clamp(0.0, 1_000_000.0) * 1000.0) as u32,
        }
    }

    /// As the store kept it.
    pub(crate) fn from_stored(s: clustercomm_store::StoredRetry) -> RetryPolicy {
        RetryPolicy {
            attempts: s.attempts,
            delay: Duration::from_millis(s.delay_ms),
            backoff: f64::from(s.backoff_permille) / 1000.0,
        }
    }

    /// The wait before attempt `attempt` (2, 3, ...), or `None` past the
    /// last attempt. Waits are capped at one hour.
    pub fn delay_before(&self, attempt: u32) -> Option<Duration> {
        if attempt < 2 || attempt > self.attempts.max(1) {
            return None;
        }
        let factor = if self.backoff.is_finite() && self.backoff > 1.0 {
            self.backoff
        } else {
            1.0
        };
        let secs = self.delay.as_secs_f64() * factor.powi(attempt as i32 - 2);
        Some(Duration::from_secs_f64(secs.min(3600.0)))
    }
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

    /// How long the message lives: past it, it is never delivered,
    /// wherever it waits (the sender's queue, the message server, the
    /// receiver's inbox or store); an acknowledged send answers
    /// `SendError::Failed` with `DeliveryFailure::Expired`, and the
    /// message goes to the dead-letter queue (`Node::dead_letters`).
    /// Default `services.<service>.retention_ms`, or forever. The expiry
    /// is a wall-clock time: hosts' clocks are taken to be synchronised.
    pub fn ttl(mut self, ttl: Duration) -> SendOptions {
        self.ttl = Some(ttl);
        self
    }

    /// Tries a failed acknowledged send again (`Node::send_with`) as
    /// `policy` says, when it failed because its receiver was busy or
    /// overloaded, absent or stopped, or did not answer in time. When the
    /// attempts run out the send answers the last failure, and the
    /// message goes to the dead-letter queue (`DeadReason::RetriesExhausted`).
    /// The waits are in the sending task (this node's delay queue for
    /// non-recoverable messages). A recoverable message waits in its
    /// sender's store: it is sent again after the policy's delays (in its
    /// stream's order), for any failure, and once its attempts (counted
    /// since the node started) ran out it leaves the store for the
    /// dead-letter queue.
    pub fn retry(mut self, policy: RetryPolicy) -> SendOptions {
        self.retry = Some(policy);
        self
    }

    /// The retry policy set, if any.
    pub fn retry_policy(&self) -> Option<RetryPolicy> {
        self.retry
    }

    /// The time to live set, if any.
    pub fn given_ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// When a message to `service` sent now with these options expires, in
    /// Unix milliseconds: its TTL, or the service's retention.
    pub(crate) fn expires_ms(&self, config: &cluster_config::Config, service: &str) -> Option<u64> {
        let ttl = self.ttl.or_else(|| config.service_retention(service))?;
        Some(unix_ms().saturating_add(ttl.as_millis().min(u128::from(u64::MAX)) as u64))
    }

    /// What a send with these options carries besides its body.
    pub(crate) fn stamp(&self, config: &cluster_config::Config, service: &str) -> Stamp {
        Stamp {
            priority: self.priority,
            expires_ms: self.expires_ms(config, service),
        }
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

/// What a send carries besides its body: its priority (`None`: the
/// service's) and when it expires (Unix milliseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) priority: Option<Priority>,
    pub(crate) expires_ms: Option<u64>,
}

impl Stamp {
    /// A stamp with only a priority.
    pub(crate) fn priority(priority: Option<Priority>) -> Stamp {
        Stamp {
            priority,
            expires_ms: None,
        }
    }
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
