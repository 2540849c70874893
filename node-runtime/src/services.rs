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
    /// Acknowledged once processed (`AckMode::OnProcessed`), not on
    /// receipt.
    pub(crate) on_processed: bool,
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
#[derive(Debug, Clone)]
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
            MessageKind::Send | MessageKind::Recoverable { .. } => true,
            MessageKind::Request | MessageKind::Notify => status != AckStatus::Accepted,
            MessageKind::Reply { .. } | MessageKind::ReplyError { .. } => false,
        };
        if !needed {
            return;
        }
        // Waiting here waits only for this node's own outgoing socket.
        let _ = queue
            .push(self.frame(from, core, status), Lane::Control, Wait::Forever)
            .await;
    }

    /// The acknowledgement frame carrying `status`, from `from`.
    fn frame(self, from: &NodeId, core: &CoreCell, status: AckStatus) -> OutFrame {
        OutFrame::control(Header::Ack(Ack {
            to: self.to,
            to_incarnation: self.to_incarnation,
            seq: self.seq,
            from: from.clone(),
            from_incarnation: core.lock().incarnation(),
            status,
        }))
    }
}

/// The acknowledgement of one message of an `AckMode::OnProcessed`
/// service, sent when the application says it processed it. Dropped
/// unsent, it refuses the message (`Rejected`); a receiver that dies with
/// it sends nothing, and its sender learns the message may have been
/// delivered.
#[derive(Debug)]
pub(crate) struct AckToken {
    answer: Option<Answer>,
    from: NodeId,
    core: std::sync::Weak<CoreCell>,
    /// The connection the message came on (weakly: a message the
    /// application keeps does not keep it open).
    queue: transports::WeakOutQueue,
    /// Removed from when sent or dropped.
    unacked: std::sync::Weak<Unacked>,
}

/// The messages of `AckMode::OnProcessed` services handed over and not
/// yet acknowledged, by (sender, incarnation, sequence number): a resent
/// copy of one is not acknowledged again while it is being processed.
#[derive(Debug, Default)]
pub(crate) struct Unacked(std::sync::Mutex<std::collections::HashSet<(NodeId, u64, u64)>>);

impl Unacked {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<(NodeId, u64, u64)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this message is being processed.
    pub(crate) fn contains(&self, sender: &NodeId, incarnation: u64, seq: u64) -> bool {
        self.lock().contains(&(sender.clone(), incarnation, seq))
    }
}

impl AckToken {
    /// The token of message `answer` of a `Send`, to be acknowledged
    /// on `queue` from node `from`.
    pub(crate) fn new(
        answer: Answer,
        from: &NodeId,
        core: &std::sync::Arc<CoreCell>,
        queue: &OutQueue,
        unacked: &std::sync::Arc<Unacked>,
    ) -> AckToken {
        unacked
            .lock()
            .insert((answer.to.clone(), answer.to_incarnation, answer.seq));
        AckToken {
            answer: Some(answer),
            from: from.clone(),
            core: std::sync::Arc::downgrade(core),
            queue: queue.downgrade(),
            unacked: std::sync::Arc::downgrade(unacked),
        }
    }

    /// Sends `status` (waiting for room in this node's own outgoing
    /// queue).
    pub(crate) async fn send(mut self, status: AckStatus) {
        let Some(answer) = self.answer.take() else {
            return;
        };
        self.forget(&answer);
        let (Some(core), Some(queue)) = (self.core.upgrade(), self.queue.upgrade()) else {
            // The connection is gone: the sender resends, and the copy
            // is acknowledged as a duplicate of a processed message.
            return;
        };
        answer.send(&self.from, &core, &queue, status).await;
    }

    /// Sends `status` if there is room for it now in this node's own
    /// outgoing queue (otherwise the sender's timeout ends its wait).
    pub(crate) fn try_send(mut self, status: AckStatus) {
        let Some(answer) = self.answer.take() else {
            return;
        };
        self.forget(&answer);
        let (Some(core), Some(queue)) = (self.core.upgrade(), self.queue.upgrade()) else {
            return;
        };
        let _ = queue.try_push(answer.frame(&self.from, &core, status), Lane::Control);
    }

    /// Leaves the message to be answered otherwise (it was refused).
    pub(crate) fn disarm(mut self) {
        if let Some(answer) = self.answer.take() {
            self.forget(&answer);
        }
    }

    fn forget(&self, answer: &Answer) {
        if let Some(unacked) = self.unacked.upgrade() {
            unacked
                .lock()
                .remove(&(answer.to.clone(), answer.to_incarnation, answer.seq));
        }
    }
}

impl Drop for AckToken {
    fn drop(&mut self) {
        let Some(answer) = self.answer.take() else {
            return;
        };
        self.forget(&answer);
        // Dropped by the application without a word: refused, if there
        // is room to say so now (otherwise the sender's timeout ends its
        // wait, uncertain).
        let (Some(core), Some(queue)) = (self.core.upgrade(), self.queue.upgrade()) else {
            return;
        };
        let status = AckStatus::Failed(transports::protocol::DeliveryFailure::Rejected(
            "dropped by the application without an acknowledgement".into(),
        ));
        let _ = queue.try_push(answer.frame(&self.from, &core, status), Lane::Control);
    }
}
