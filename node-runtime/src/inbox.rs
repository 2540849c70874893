//! Service inboxes and the messages in them.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use transports::protocol::{MessageKind, NodeId};

use crate::node::Inner;
use crate::SendError;

/// A message delivered to a service on this node.
pub struct Message {
    pub(crate) sender: NodeId,
    pub(crate) sender_incarnation: u64,
    pub(crate) seq: u64,
    pub(crate) service: Arc<str>,
    pub(crate) body: Bytes,
    pub(crate) kind: MessageKind,
    /// Set for requests: the runtime that sends the reply.
    pub(crate) replier: Option<Arc<Inner>>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("sender", &self.sender)
            .field("sender_incarnation", &self.sender_incarnation)
            .field("seq", &self.seq)
            .field("service", &self.service)
            .field("kind", &self.kind)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Message {
    /// The node that sent it.
    pub fn sender(&self) -> &NodeId {
        &self.sender
    }

    /// The sender's incarnation.
    pub fn sender_incarnation(&self) -> u64 {
        self.sender_incarnation
    }

    /// The sender's sequence number of this message.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The service it was addressed to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The body (a shared buffer; cloning it copies nothing).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Takes the body.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// Whether the sender awaits a reply.
    pub fn is_request(&self) -> bool {
        self.kind == MessageKind::Request
    }

    /// Answers a request.
    ///
    /// # Errors
    ///
    /// [`SendError::NotARequest`] if the message is not a request;
    /// [`SendError::PayloadTooLarge`] for a body over the limit;
    /// [`SendError::Shutdown`] if the node stopped.
    pub async fn reply(&self, body: impl Into<Bytes>) -> Result<(), SendError> {
        let Some(inner) = &self.replier else {
            return Err(SendError::NotARequest);
        };
        inner
            .send_reply(
                &self.sender,
                self.sender_incarnation,
                self.seq,
                &self.service,
                body.into(),
            )
            .await
    }
}

/// The inbox of one service: messages in arrival order.
///
/// Bounded: `node.inbox_capacity` messages in the inbox, and as many again
/// waiting to enter it. A message is acknowledged once it is in the inbox.
/// When both are full, the connection the next message came on is held
/// back (its sender slows down) for up to `node.inbox_wait_ms`; if the
/// application has not made room by then, that message and the following
/// ones are answered `Overloaded` until the backlog drains. The node's
/// other traffic (its own acknowledgements, replies, membership) never
/// waits longer than that. Dropping the inbox unsubscribes the service;
/// messages that arrive afterwards are answered with `NoSuchService`.
#[derive(Debug)]
pub struct Inbox {
    pub(crate) service: String,
    pub(crate) rx: mpsc::Receiver<Message>,
}

impl Inbox {
    /// The service this inbox serves.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The next message, or `None` once the node has shut down.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: no message is lost if the call is cancelled.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// A message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}
