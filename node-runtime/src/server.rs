//! The node's link to the message server as the senders see it: the
//! outgoing queue (its writer is the link task's, see `supervisor`), the
//! send order, this node's `Hello`, and requests awaiting the server's
//! answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;
use transports::protocol::{DeliveryFailure, Hello, NodeId};
use transports::OutQueue;

/// The members a target resolves to, or why not.
pub(crate) type ResolveResult = Result<Vec<(NodeId, u64)>, DeliveryFailure>;

/// Where the current message server takes heartbeats, and the session
/// secret they are signed with.
#[derive(Debug, Clone)]
pub(crate) struct Heartbeat {
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) mac: transports::auth::SessionMac,
}

/// The node's link to the message server, as the senders see it.
#[derive(Debug)]
pub(crate) struct ServerLink {
    /// The outgoing queue; its writer is the link task's.
    pub(crate) queue: OutQueue,
    /// Each target's share of it (`node.target_queue_bytes`).
    pub(crate) fair: crate::fair::FairShare,
    /// Orders message-server sends: the sequence number is taken and the
    /// frame queued under it, so the wire order is the number order (also
    /// for what a member that is back gets again).
    pub(crate) send_lock: tokio::sync::Mutex<()>,
    /// The body limit of the message-server path (negotiated).
    pub(crate) max_message: u64,
    /// What this node says when it opens a connection.
    pub(crate) hello: Mutex<Hello>,
    /// The groups this node joins, told the server at each registration.
    pub(crate) groups: Vec<String>,
    /// Where the message server takes heartbeats, for the current link.
    pub(crate) heartbeat: Mutex<Option<Heartbeat>>,
    pub(crate) tokens: AtomicU64,
    /// Subscriptions waiting for the server's confirmation.
    pub(crate) subscriptions: Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>,
    /// The running trace's sink, if any.
    pub(crate) trace: Mutex<Option<crate::trace::TraceSink>>,
    /// Dead-letter queries awaiting the server's answer.
    pub(crate) dead_letters: crate::dead_letters::Queries,
    /// Fan-outs waiting for their member lists.
    pub(crate) resolves: Mutex<HashMap<u64, oneshot::Sender<ResolveResult>>>,
}

impl ServerLink {
    /// A token for a request to the server.
    pub(crate) fn next_token(&self) -> u64 {
        self.tokens.fetch_add(1, Ordering::Relaxed)
    }

    /// This node's `Hello` as it stands (role, direct address).
    pub(crate) fn hello(&self) -> Hello {
        self.hello.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
