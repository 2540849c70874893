//! The subscribed services: each one's delivery queue (drained into its
//! inbox by a pump, see `connection`), and how a delivered message is
//! answered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;
use transports::protocol::{Ack, AckStatus, Header, MessageKind, NodeId};
use transports::{Lane, OutFrame, OutQueue, Wait};

use crate::core::CoreCell;
use crate::inbox::{InboxSender, Message};

/// The subscribed services: each one's delivery queue, drained by its pump.
#[derive(Debug, Default)]
pub(crate) struct Services {
    pub(crate) inboxes: RwLock<HashMap<Arc<str>, ServiceQueue>>,
    /// Changed (under `inboxes`' write lock) whenever `inboxes` changes:
    /// readers keep the inbox they delivered to last while it stays the
    /// same (see [`crate::connection::InboxCache`]).
    pub(crate) generation: AtomicU64,
    /// Service names sent to, shared instead of allocated per message.
    names: RwLock<rustc_hash::FxHashSet<Arc<str>>>,
}

/// Most service names a node keeps shared (see [`Services::name`]).
const MAX_SERVICE_NAMES: usize = 1024;

impl Services {
    /// The subscribed services' names.
    pub(crate) fn names(&self) -> Vec<String> {
        self.inboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .map(|s| s.to_string())
            .collect()
    }

    /// `service` as a shared name: the same allocation for every message
    /// to it, for up to [`MAX_SERVICE_NAMES`] names (beyond that, each
    /// message gets its own, so that the table stays bounded).
    pub(crate) fn name(&self, service: &str) -> Arc<str> {
        thread_local! {
            /// The name this thread asked for last: a sender usually sends
            /// to one service many times in a row. Any `Arc<str>` with
            /// the same text serves, whichever node interned it.
            static LAST: std::cell::RefCell<Option<Arc<str>>> =
                const { std::cell::RefCell::new(None) };
        }
        let last = LAST.with_borrow(|last| {
            last.as_ref()
                .filter(|name| transports::protocol::same_name(name, service))
                .cloned()
        });
        if let Some(name) = last {
            return name;
        }
        let name = self.interned(service);
        LAST.set(Some(name.clone()));
        name
    }

    /// [`Services::name`] from the node's table of names.
    fn interned(&self, service: &str) -> Arc<str> {
        if let Some(name) = self
            .names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
        {
            return name.clone();
        }
        let mut names = self.names.write().unwrap_or_else(|p| p.into_inner());
        if let Some(name) = names.get(service) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(service);
        if names.len() < MAX_SERVICE_NAMES {
            names.insert(name.clone());
        }
        name
    }
}

/// A subscribed service's delivery queue, drained by its pump.
#[derive(Debug, Clone)]
pub(crate) struct ServiceQueue {
    pub(crate) tx: mpsc::Sender<Delivery>,
    /// The inbox itself, for deliveries when no backlog waits.
    pub(crate) inbox: InboxSender,
    /// Messages queued to, or held by, the pump.
    pub(crate) backlog: Arc<std::sync::atomic::AtomicUsize>,
    /// Set when the backlog stayed full for `node.inbox_wait_ms`.
    pub(crate) congested: Arc<AtomicBool>,
    /// What becomes of a message that finds the backlog full.
    pub(crate) when_full: WhenFull,
}

/// What becomes of a message that finds a service's inbox and backlog full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WhenFull {
    /// The connection it came on is held back for up to
    /// `node.inbox_wait_ms`, then it is refused (`Overloaded`): the
    /// application's services.
    Wait,
    /// It is refused (`Overloaded`) at once, holding nothing back: the
    /// built-in services, which must never slow the application's traffic.
    Refuse,
}

impl ServiceQueue {
    /// Whether under a quarter of the backlog is in use.
    pub(crate) fn is_drained(&self) -> bool {
        self.tx.capacity() * 4 >= self.tx.max_capacity() * 3
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.inbox.is_closed()
    }
}

/// A message on its way into a service's inbox, with whom to acknowledge.
pub(crate) struct Delivery {
    pub(crate) message: Message,
    pub(crate) answer: Answer,
    /// The connection the message came on.
    pub(crate) acks: OutQueue,
}

/// How to answer one delivered message.
pub(crate) struct Answer {
    pub(crate) to: NodeId,
    pub(crate) to_incarnation: u64,
    pub(crate) seq: u64,
    pub(crate) kind: MessageKind,
}

impl Answer {
    /// Acknowledges: every outcome of a `Send`, a failed `Request` (a
    /// request's success is its reply), and a failed `Notify` (so its sender
    /// counts it instead of losing it silently).
    pub(crate) async fn send(
        self,
        from: &NodeId,
        core: &CoreCell,
        queue: &OutQueue,
        status: AckStatus,
    ) {
        let needed = match self.kind {
            MessageKind::Send => true,
            MessageKind::Request | MessageKind::Notify => status != AckStatus::Accepted,
            MessageKind::Reply { .. } | MessageKind::ReplyError { .. } => false,
        };
        if !needed {
            return;
        }
        let ack = OutFrame::control(Header::Ack(Ack {
            to: self.to,
            to_incarnation: self.to_incarnation,
            seq: self.seq,
            from: from.clone(),
            from_incarnation: core.lock().incarnation(),
            status,
        }));
        // Waiting here waits only for this node's own outgoing socket.
        let _ = queue.push(ack, Lane::Control, Wait::Forever).await;
    }
}
