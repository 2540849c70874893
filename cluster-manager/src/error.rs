//! What a sender is told: the delivery report, and the errors that say
//! whether a message was definitely not delivered or may have been.

use std::fmt;
use std::time::Duration;

use transports::protocol::{DeliveryFailure, NodeId, Target};

/// Who got a message and who did not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Receivers that accepted the message into the service's inbox,
    /// ordered by id.
    pub delivered: Vec<NodeId>,
    /// Receivers that did not, with the reason, ordered by id.
    pub failed: Vec<(NodeId, SendError)>,
}

impl DeliveryReport {
    /// Whether every receiver accepted the message.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

impl fmt::Display for DeliveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delivered to {} receiver(s), failed for {}",
            self.delivered.len(),
            self.failed.len()
        )?;
        for (node, e) in &self.failed {
            write!(f, "; {node}: {e}")?;
        }
        Ok(())
    }
}

/// Why a send, notify or request failed.
///
/// [`SendError::is_definite`] tells the two kinds apart: definitely not
/// delivered, or uncertain (it may have been delivered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No such node, or no such group or an empty one. Definite.
    #[error("unknown target: {0}")]
    UnknownTarget(Target),
    /// The target does not offer the service. Definite.
    #[error("no such service {service:?} on {target}")]
    NoSuchService {
        /// The target.
        target: Target,
        /// The service.
        service: String,
    },
    /// The body exceeds the limit. Definite: nothing was sent.
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Body size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The receiver (or the message server on its behalf) refused the
    /// message, for example because it is not keeping up. Definite.
    #[error("node {node} rejected the message: {reason}")]
    Rejected {
        /// The receiver.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The receiver is not keeping up: its inbox, or its queue at the
    /// message server, stayed full, and the message was not accepted.
    /// Definite.
    #[error("node {node} is overloaded: the message was not accepted")]
    Overloaded {
        /// The receiver.
        node: NodeId,
    },
    /// The receiver is busy (its backlog reached `node.busy_upper`): the
    /// send waited for it to drain for its whole timeout, or its queue for
    /// the service was full while it was busy. For an `AnyOf` target, every
    /// member that offers the service was busy. Definite: not delivered.
    #[error("{node} is busy (its backlog reached node.busy_upper): the message was not sent")]
    Busy {
        /// The busy receiver (for `AnyOf`, the group).
        node: NodeId,
    },
    /// The receiver answered the request with an error
    /// (`Message::reply_err`). It was delivered and handled: not
    /// definite in the sense of [`SendError::is_definite`].
    #[error("{node} answered with error {code}: {text}")]
    Remote {
        /// The receiver that answered.
        node: NodeId,
        /// The application's error code.
        code: u32,
        /// Its text.
        text: String,
    },
    /// The receiver dropped the request without replying (its handler
    /// let go of the message, or its service closed with the request in
    /// its inbox). It was delivered: not definite.
    #[error("{node} dropped the request without a reply")]
    NoReply {
        /// The receiver.
        node: NodeId,
    },
    /// The target stopped. Definite when `in_flight` is false (the message
    /// never left); uncertain when true (it may have been delivered).
    #[error("node {node} stopped {}", if *.in_flight { "while the message was in flight; it may have been delivered" } else { "before the message left" })]
    TargetStopped {
        /// The receiver.
        node: NodeId,
        /// Whether the message had already been forwarded to it.
        in_flight: bool,
    },
    /// No answer in time. Uncertain.
    #[error("no answer within {after:?} (waiting for {waiting_for:?}); the message may have been delivered")]
    Timeout {
        /// The timeout that passed.
        after: Duration,
        /// Receivers still unaccounted for; empty when not yet known.
        waiting_for: Vec<NodeId>,
    },
    /// The connection carrying the message (to the message server, or a
    /// direct channel) broke before its outcome was known. Uncertain.
    #[error("the connection carrying the message broke while it was in flight; it may have been delivered")]
    Disconnected,
    /// A body too large for the message server could not take a direct
    /// channel to `node`. Definite: nothing was sent.
    #[error(
        "no direct channel to {node} ({reason}), and the body is too large for the message server"
    )]
    DirectUnavailable {
        /// The receiver.
        node: NodeId,
        /// Why the channel could not be opened.
        reason: String,
    },
    /// Session channels are for dispatchers only. Definite.
    #[error("only a dispatcher node has session channels")]
    NotADispatcher,
    /// A session channel goes only to a server node of the dispatcher's own
    /// group. Definite.
    #[error("{node} is not a server node of this dispatcher's group: no session channel")]
    NotInSessionGroup {
        /// The requested target.
        node: NodeId,
    },
    /// A `Group` or `All` message reached some receivers but not all; the
    /// report says which.
    #[error("{0}")]
    Incomplete(DeliveryReport),
    /// The target kind does not fit the operation (a request needs one
    /// receiver: `Node` or `AnyOf`). Definite.
    #[error("{0} is not a valid target here: a request goes to one node or any member of a group")]
    InvalidTarget(Target),
    /// A service name that is empty or longer than
    /// `transports::protocol::MAX_NAME_BYTES`. Definite.
    #[error("invalid service or group name {0:?}: 1 to 255 bytes")]
    InvalidName(String),
    /// `reply` was called on a message that is not a request. Definite.
    #[error("the message is not a request; there is nobody waiting for a reply")]
    NotARequest,
    /// The node is shut down. Definite for new sends.
    #[error("the node is shut down")]
    Shutdown,
    /// The sender's permissions (`permissions.send` for it, at the message
    /// server or at the receiver) do not include the target. Definite.
    #[error("this node may not send to {target} (permissions.send)")]
    NotPermitted {
        /// The target refused.
        target: Target,
    },
    /// A stream (`Node::send_stream`) ended without its body: the receiver
    /// refused it or gave it up, its source failed or ended early, or its
    /// channel broke and could not be resumed. Definite: the receiving
    /// application sees an error, never a partial body.
    #[error("the stream to {node} failed: {reason}")]
    StreamFailed {
        /// The receiver.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// A recoverable send on a node without a store, or one the store
    /// failed to take. Definite: nothing was sent.
    #[error("the message cannot be made recoverable: {reason}")]
    NotRecoverable {
        /// Why: no `node.data_dir`, a target other than one node, or the
        /// store's error.
        reason: String,
    },
    /// A recoverable message was not delivered within its timeout. It is
    /// in the sender's store, and is sent again until its receiver
    /// acknowledges it, across restarts of every process: not an error to
    /// act on, but the send's answer that delivery goes on without it.
    #[error("recoverable message {pseq} to {node} is stored and will be sent again: {cause}")]
    StillQueued {
        /// The receiver.
        node: NodeId,
        /// Its number on this node's stream to the receiver.
        pseq: u64,
        /// Why this attempt failed.
        cause: Box<SendError>,
    },
    /// The message's time to live (`SendOptions::ttl`, or its service's
    /// `retention_ms`) ran out before it was delivered: it was not
    /// delivered, and went to the dead-letter queue. Definite.
    #[error("the message to {target} expired before it was delivered (its time to live ran out); it went to the dead-letter queue")]
    Expired {
        /// Where it was going (the node that found it expired, if one
        /// did).
        target: Target,
    },
}

impl SendError {
    /// Whether the message was definitely not delivered (to anyone, for a
    /// fan-out: an `Incomplete` report is neither).
    pub fn is_definite(&self) -> bool {
        match self {
            SendError::UnknownTarget(_)
            | SendError::NoSuchService { .. }
            | SendError::PayloadTooLarge { .. }
            | SendError::Rejected { .. }
            | SendError::Overloaded { .. }
            | SendError::Busy { .. }
            | SendError::InvalidTarget(_)
            | SendError::NotARequest
            | SendError::InvalidName(_)
            | SendError::DirectUnavailable { .. }
            | SendError::NotADispatcher
            | SendError::NotInSessionGroup { .. }
            | SendError::NotPermitted { .. }
            | SendError::StreamFailed { .. }
            | SendError::NotRecoverable { .. }
            | SendError::Expired { .. }
            | SendError::Shutdown => true,
            SendError::TargetStopped { in_flight, .. } => !in_flight,
            SendError::Timeout { .. }
            | SendError::Disconnected
            | SendError::Incomplete(_)
            | SendError::Remote { .. }
            | SendError::NoReply { .. }
            | SendError::StillQueued { .. } => false,
        }
    }

    /// The error for a wire-level failure at `node` (or the whole target).
    pub fn from_failure(
        failure: &DeliveryFailure,
        target: &Target,
        node: Option<&NodeId>,
        service: &str,
    ) -> SendError {
        let node_or_target = || node.cloned().map_or_else(|| target.clone(), Target::Node);
        match failure {
            DeliveryFailure::UnknownTarget => SendError::UnknownTarget(node_or_target()),
            DeliveryFailure::NoSuchService => SendError::NoSuchService {
                target: node_or_target(),
                service: service.to_owned(),
            },
            DeliveryFailure::PayloadTooLarge { size, max } => SendError::PayloadTooLarge {
                size: *size,
                max: *max,
            },
            DeliveryFailure::ReceiverOverloaded => SendError::Overloaded {
                node: node
                    .cloned()
                    .unwrap_or_else(|| NodeId::new(target.to_string())),
            },
            DeliveryFailure::ReceiverBusy => SendError::Busy {
                node: node
                    .cloned()
                    .unwrap_or_else(|| NodeId::new(target.to_string())),
            },
            DeliveryFailure::Rejected(reason) => SendError::Rejected {
                node: node
                    .cloned()
                    .unwrap_or_else(|| NodeId::new(target.to_string())),
                reason: reason.clone(),
            },
            DeliveryFailure::NotPermitted => SendError::NotPermitted {
                target: target.clone(),
            },
            DeliveryFailure::TargetStopped => SendError::TargetStopped {
                node: node
                    .cloned()
                    .unwrap_or_else(|| NodeId::new(target.to_string())),
                in_flight: false,
            },
            DeliveryFailure::Expired => SendError::Expired {
                target: node_or_target(),
            },
            _ => SendError::Rejected {
                node: node
                    .cloned()
                    .unwrap_or_else(|| NodeId::new(target.to_string())),
                reason: failure.to_string(),
            },
        }
    }
}
