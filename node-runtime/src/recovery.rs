//! Recoverable messages on a node with a store (`node.data_dir`): the
//! driver of [`cluster_manager::recovery`].
//!
//! - **Sending.** [`Runtime::submit_recoverable`] numbers the message on
//!   the stream to its receiver and queues it, with the stream's next
//!   number, for the store; the dispatch task sends it (as a
//!   `MessageKind::Recoverable`) only once that is fsynced, in number
//!   order, so that messages submitted one after another share fsyncs.
//!   The watch task learns its outcome: an acknowledgement removes it from
//!   the store; a failure leaves it there, and the redelivery task sends
//!   it again (its body read back from the store), in order with the
//!   others of its stream, until it is acknowledged. At start the node
//!   sends again whatever its store holds.
//! - **Receiving.** The connection that reads a recoverable message asks
//!   [`cluster_manager::recovery::Receipts`] for a verdict. A new one goes
//!   to the receipt task, which commits it with its stream's `Received`
//!   mark (many in one transaction), acknowledges it, and queues it for its
//!   service's inbox. `Inbox::recv` (or `recv_many`) removes the record
//!   and raises the stream's `Handed` mark, fsynced, before it returns the
//!   message (`poll_recv` and `try_recv` once it is dropped). At start,
//!   the stored messages not yet handed over are queued for their service
//!   when it is subscribed, before anything new.
//!
//! Order holds per sender and receiver among recoverable messages. The
//! application is handed each once; a message in its hands when it
//! crashes is its own loss.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use cluster_manager::recovery::{Outbox, Receipts};
use cluster_manager::{Completion, SendError};
use clustercomm_store::{Change, Incoming, Mark, MarkKind, Outgoing, Record, RecordKey, Store};
use tokio::sync::{mpsc, oneshot, Notify};
use transports::protocol::{
    AckStatus, DeadReason, DeliveryFailure, MessageKind, NodeId, Priority, Target,
};
use transports::OutQueue;

use crate::connection::AckBatch;
use crate::dead_letters::GivenUp;
use crate::inbox::Message;
use crate::options::{RetryPolicy, Stamp};
use crate::pending::Pending;
use crate::runtime::Runtime;
use crate::services::{Answer, Delivery, ServiceQueue};

/// How long a failed recoverable message waits before it is sent again.
const RETRY_DELAY: Duration = Duration::from_millis(250);

/// How much later than the node's own handle on a recoverable message the
/// application's handle times out (the node's answers first, saying the
/// message is still queued).
const WATCH_SLACK: Duration = Duration::from_millis(250);

/// Recoverable messages handed to the watch task and not yet taken, at
/// most (those it watches are bounded by `node.max_in_flight`).
const WATCH_QUEUE: usize = 1024;

/// A recoverable message numbered and queued for the store, to send once
/// it is on disk.
struct Dispatch {
    receiver: NodeId,
    pseq: u64,
    floor: u64,
    service: Arc<str>,
    priority: Priority,
    expires_ms: Option<u64>,
    body: Bytes,
    durable: clustercomm_store::Queued,
    tx: oneshot::Sender<Completion>,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

/// A recoverable message sent for the first time, watched until its
/// outcome is known.
struct Watched {
    receiver: NodeId,
    pseq: u64,
    pending: Pending,
    tx: oneshot::Sender<Completion>,
    timeout: Duration,
}

/// Received messages waiting for the receipt task, at most.
const RECEIPT_QUEUE: usize = 1024;

/// Messages sent again in one go, at most (their bodies are read from the
/// store together, and their outcomes awaited before the next).
const RESEND_BATCH: usize = 256;

/// A received message for the receipt task: to store, acknowledge, and
/// queue for its service.
pub(crate) struct Receipt {
    pub(crate) origin: NodeId,
    pub(crate) epoch: u64,
    pub(crate) pseq: u64,
    pub(crate) message: Message,
    /// The acknowledgement, and the connection it goes on.
    pub(crate) answer: (Answer, OutQueue),
    pub(crate) queue: ServiceQueue,
}

/// A node's recoverable messages, sent and received.
#[derive(Debug)]
pub(crate) struct Recovery {
    pub(crate) store: Store,
    pub(crate) epoch: u64,
    outbox: Mutex<Outbox>,
    /// Numbering and queueing a commit happen under this, so the store
    /// commits each stream's numbers in order (no gap after a crash).
    order: tokio::sync::Mutex<()>,
    pub(crate) receipts: Mutex<Receipts>,
    receipt_tx: mpsc::Sender<Receipt>,
    receipt_rx: Mutex<Option<mpsc::Receiver<Receipt>>>,
    dispatch_tx: mpsc::Sender<Dispatch>,
    dispatch_rx: Mutex<Option<mpsc::Receiver<Dispatch>>>,
    watch_tx: mpsc::Sender<Watched>,
    watch_rx: Mutex<Option<mpsc::Receiver<Watched>>>,
    /// Wakes the redelivery task: something failed.
    wake: Notify,
    /// Messages stored and not handed over at start, by service.
    replay: Mutex<HashMap<String, Vec<Incoming>>>,
    /// The messages sent with a retry policy, by receiver and number: the
    /// attempts they made since this node started.
    retries: Mutex<HashMap<(NodeId, u64), Retrying>>,
}

/// A recoverable message with a retry policy (see
/// [`crate::SendOptions::retry`]).
#[derive(Debug)]
struct Retrying {
    policy: RetryPolicy,
    /// Attempts that failed.
    failed: u32,
    /// Why the last one failed.
    last: Option<DeliveryFailure>,
}

impl Retrying {
    /// Whether its attempts ran out.
    fn exhausted(&self) -> bool {
        self.failed >= self.policy.attempts.max(1)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Recovery {
    /// The recovery of a node whose store was opened with `contents`.
    pub(crate) fn new(store: Store, contents: clustercomm_store::Contents) -> Recovery {
        tracing::debug!(epoch = contents.epoch, "recovery state restored");
        let now = std::time::Instant::now();
        let mut outbox = Outbox::new();
        let mut receipts = Receipts::new();
        // Only the numbers stay in memory: the bodies are read back from
        // the store when they are sent again.
        let mut by_receiver: HashMap<String, Vec<u64>> = HashMap::new();
        let mut retries = HashMap::new();
        for o in contents.outgoing {
            if let Some(stored) = o.retry {
                let retrying = Retrying {
                    policy: RetryPolicy::from_stored(stored),
                    failed: 0,
                    last: None,
                };
                retries.insert((NodeId::new(&o.receiver), o.pseq), retrying);
            }
            by_receiver
                .entry(o.receiver.clone())
                .or_default()
                .push(o.pseq);
        }
        let mut streams: Vec<String> = by_receiver.keys().cloned().collect();
        for m in &contents.marks {
            match m.kind {
                MarkKind::NextSeq | MarkKind::Acked => streams.push(m.node.clone()),
                MarkKind::Received => receipts.restore(NodeId::new(&m.node), m.epoch, m.value),
                _ => {}
            }
        }
        streams.sort();
        streams.dedup();
        for receiver in streams {
            let next = mark(&contents.marks, MarkKind::NextSeq, &receiver);
            let acked = mark(&contents.marks, MarkKind::Acked, &receiver);
            let pseqs = by_receiver.remove(&receiver).unwrap_or_default();
            outbox.restore(NodeId::new(&receiver), next, acked, &pseqs, now);
        }
        let mut replay: HashMap<String, Vec<Incoming>> = HashMap::new();
        for i in contents.incoming {
            replay.entry(i.service.clone()).or_default().push(i);
        }
        let (receipt_tx, receipt_rx) = mpsc::channel(RECEIPT_QUEUE);
        let (watch_tx, watch_rx) = mpsc::channel(WATCH_QUEUE);
        let (dispatch_tx, dispatch_rx) = mpsc::channel(WATCH_QUEUE);
        Recovery {
            store,
            epoch: contents.epoch,
            outbox: Mutex::new(outbox),
            order: tokio::sync::Mutex::new(()),
            receipts: Mutex::new(receipts),
            receipt_tx,
            receipt_rx: Mutex::new(Some(receipt_rx)),
            dispatch_tx,
            dispatch_rx: Mutex::new(Some(dispatch_rx)),
            watch_tx,
            watch_rx: Mutex::new(Some(watch_rx)),
            wake: Notify::new(),
            replay: Mutex::new(replay),
            retries: Mutex::new(retries),
        }
    }

    /// The number the next recoverable message to `receiver` takes.
    pub(crate) fn next(&self, receiver: &NodeId) -> u64 {
        lock(&self.outbox).next(receiver)
    }

    /// Recoverable messages this node holds, sent and not acknowledged.
    pub(crate) fn held(&self) -> usize {
        lock(&self.outbox).held()
    }
}

fn mark(marks: &[Mark], kind: MarkKind, node: &str) -> u64 {
    marks
        .iter()
        .find(|m| m.kind == kind && m.node == node)
        .map_or(0, |m| m.value)
}

impl Runtime {
    /// Queues `body` for `receiver`'s `service` as a recoverable message
    /// (see the module docs): returns once it is numbered and queued for
    /// the store, with a handle to await its outcome; it is sent once it
    /// is on disk. Dropping the handle changes nothing: the node watches
    /// the message until it is acknowledged.
    pub(crate) async fn submit_recoverable(
        &self,
        target: Target,
        service: &str,
        body: Bytes,
        stamp: Stamp,
        retry: Option<RetryPolicy>,
        timeout: Duration,
    ) -> Result<Pending, SendError> {
        let (priority, expires_ms) = (stamp.priority, stamp.expires_ms);
        let Some(rec) = self.recovery.as_ref() else {
            return Err(SendError::NotRecoverable {
                reason: "this node has no store: set node.data_dir".into(),
            });
        };
        let Target::Node(receiver) = target else {
            return Err(SendError::NotRecoverable {
                reason: format!("{target} is not one node: recoverable messages go to one node"),
            });
        };
        if !transports::protocol::valid_name(service) {
            return Err(SendError::InvalidName(service.to_owned()));
        }
        let priority = priority.unwrap_or_else(|| self.config.service_priority(service));
        let service: Arc<str> = Arc::from(service);
        let (tx, rx) = oneshot::channel();
        let started = tokio::time::Instant::now();
        let receiver_for_handle = receiver.clone();
        // Numbered and queued for the store under the order lock, and
        // handed to the dispatch task in the same order: the store commits,
        // and the wire carries, each stream's numbers in order.
        let pseq = {
            let _order = rec.order.lock().await;
            let numbered = lock(&rec.outbox).number(&receiver);
            let record = Outgoing {
                receiver: receiver.to_string(),
                pseq: numbered.pseq,
                service: service.to_string(),
                priority: priority.index() as u8,
                created_ms: now_ms(),
                expires_ms,
                retry: retry.as_ref().map(RetryPolicy::stored),
                body: body.to_vec(),
            };
            if let Some(policy) = retry {
                let retrying = Retrying {
                    policy,
                    failed: 0,
                    last: None,
                };
                lock(&rec.retries).insert((receiver.clone(), numbered.pseq), retrying);
            }
            let next = Mark {
                kind: MarkKind::NextSeq,
                node: receiver.to_string(),
                epoch: 0,
                value: numbered.pseq + 1,
            };
            let changes = vec![
                Change::Put(Record::Outgoing(record)),
                Change::Put(Record::Mark(next)),
            ];
            let durable = rec.store.queue(changes).await;
            let dispatch = Dispatch {
                receiver,
                pseq: numbered.pseq,
                floor: numbered.floor,
                service,
                priority,
                expires_ms,
                body,
                durable,
                tx,
                deadline: started + timeout,
                timeout,
            };
            if rec.dispatch_tx.send(dispatch).await.is_err() {
                return Err(self.core.closed_error());
            }
            numbered.pseq
        };
        // A little later than the node's own handle, which answers first.
        let deadline = started + timeout + WATCH_SLACK;
        Ok(Pending::detached(
            self.core.clone(),
            receiver_for_handle,
            pseq,
            deadline,
            timeout,
            rx,
        ))
    }

    /// The dispatch task: sends each recoverable message once it is on
    /// disk, in the order they were numbered, and hands it to the watch
    /// task. Waiting for the disk here, not in `submit`, lets one task
    /// submit many messages that share one fsync.
    pub(crate) async fn dispatch_recoverable(self) {
        let Some(rec) = self.recovery.as_ref() else {
            return;
        };
        let Some(mut rx) = lock(&rec.dispatch_rx).take() else {
            return;
        };
        loop {
            let next = tokio::select! {
                () = self.cancel.cancelled() => return,
                next = rx.recv() => next,
            };
            let Some(d) = next else { return };
            if let Err(e) = d.durable.durable().await {
                // Not stored: never sent.
                lock(&rec.outbox).lost(&d.receiver, d.pseq);
                let _ = d.tx.send(Completion::Failed(SendError::NotRecoverable {
                    reason: e.to_string(),
                }));
                continue;
            }
            if is_expired(d.expires_ms) {
                let given_up = GivenUp {
                    sender: &self.id,
                    target: &Target::Node(d.receiver.clone()),
                    service: &d.service,
                    priority: d.priority,
                    reason: DeadReason::Expired,
                    body: d.body,
                };
                self.recoverable_expired(&d.receiver, d.pseq, Some(given_up));
                let target = Target::Node(d.receiver);
                let _ = d.tx.send(Completion::Failed(SendError::Expired { target }));
                continue;
            }
            let kind = MessageKind::Recoverable {
                epoch: rec.epoch,
                pseq: d.pseq,
                floor: d.floor,
            };
            // What is left of its timeout (a little, if the disk took it
            // all: it is stored, and sent again if this attempt fails).
            let left = d
                .deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_millis(1));
            let target = Target::Node(d.receiver.clone());
            match self
                .submit(
                    target,
                    &d.service,
                    d.body,
                    kind,
                    Stamp {
                        priority: Some(d.priority),
                        expires_ms: d.expires_ms,
                    },
                    left,
                )
                .await
            {
                Ok(pending) => {
                    let watched = Watched {
                        receiver: d.receiver,
                        pseq: d.pseq,
                        pending,
                        tx: d.tx,
                        timeout: d.timeout,
                    };
                    if rec.watch_tx.send(watched).await.is_err() {
                        return;
                    }
                }
                Err(cause) => {
                    self.recovery_outcome(&d.receiver, d.pseq, Err(&cause));
                    let _ = d.tx.send(Completion::Failed(SendError::StillQueued {
                        node: d.receiver,
                        pseq: d.pseq,
                        cause: Box::new(Runtime::with_timeout(cause, d.timeout)),
                    }));
                }
            }
        }
    }

    /// The watch task: learns what became of each recoverable message sent
    /// for the first time (see [`Runtime::recovery_outcome`]) and tells its
    /// sender's handle.
    pub(crate) async fn watch_recoverable(self) {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let Some(rec) = self.recovery.as_ref() else {
            return;
        };
        let Some(mut rx) = lock(&rec.watch_rx).take() else {
            return;
        };
        let mut watching = FuturesUnordered::new();
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                watched = rx.recv() => {
                    let Some(Watched { receiver, pseq, pending, tx, timeout }) = watched else {
                        return;
                    };
                    watching.push(async move {
                        let completion = pending.completion().await;
                        (receiver, pseq, completion, tx, timeout)
                    });
                }
                Some((receiver, pseq, completion, tx, timeout)) = watching.next(), if !watching.is_empty() => {
                    let forwarded = match completion {
                        Ok(Completion::Delivered(report)) => {
                            self.recovery_outcome(&receiver, pseq, Ok(()));
                            Completion::Delivered(report)
                        }
                        // Found expired on its way, and dead-lettered there.
                        Ok(Completion::Failed(e @ SendError::Expired { .. })) | Err(e @ SendError::Expired { .. }) => {
                            self.recoverable_expired(&receiver, pseq, None);
                            Completion::Failed(e)
                        }
                        other => {
                            let cause = match other {
                                Ok(Completion::Failed(e)) | Err(e) => e,
                                _ => SendError::Disconnected,
                            };
                            self.recovery_outcome(&receiver, pseq, Err(&cause));
                            Completion::Failed(SendError::StillQueued {
                                node: receiver,
                                pseq,
                                cause: Box::new(Runtime::with_timeout(cause, timeout)),
                            })
                        }
                    };
                    let _ = tx.send(forwarded);
                }
            }
        }
    }

    /// What became of recoverable message `pseq` to `receiver`: once
    /// acknowledged it (and every number before it) leaves the store; a
    /// failure is sent again later.
    fn recovery_outcome(&self, receiver: &NodeId, pseq: u64, outcome: Result<(), &SendError>) {
        let Some(rec) = self.recovery.as_ref() else {
            return;
        };
        match outcome {
            Ok(()) => {
                let done = lock(&rec.outbox).delivered(receiver, pseq);
                if done.is_empty() {
                    return;
                }
                {
                    let mut retries = lock(&rec.retries);
                    if !retries.is_empty() {
                        for &n in &done {
                            retries.remove(&(receiver.clone(), n));
                        }
                    }
                }
                let mut changes: Vec<Change> = done
                    .iter()
                    .map(|&n| Change::Remove(RecordKey::Outgoing(receiver.to_string(), n)))
                    .collect();
                changes.push(Change::Put(Record::Mark(Mark {
                    kind: MarkKind::Acked,
                    node: receiver.to_string(),
                    epoch: 0,
                    value: pseq,
                })));
                // Lost in a crash, they are sent again and acknowledged
                // again as duplicates: no need to wait.
                if let Err(e) = rec.store.commit_later(changes) {
                    tracing::warn!(error = %e, "could not queue the removal of acknowledged recoverable messages");
                }
            }
            Err(cause) => {
                // Its policy's wait, if it has one; once its attempts ran
                // out it is due at once, to be dead-lettered by `resend`.
                let delay = {
                    let mut retries = lock(&rec.retries);
                    match retries.get_mut(&(receiver.clone(), pseq)) {
                        None => RETRY_DELAY,
                        Some(r) => {
                            r.failed += 1;
                            r.last = Some(crate::dead_letters::failure_of(cause));
                            r.policy
                                .delay_before(r.failed + 1)
                                .unwrap_or(Duration::ZERO)
                        }
                    }
                };
                lock(&rec.outbox).failed(receiver, pseq, std::time::Instant::now(), delay);
                rec.wake.notify_one();
            }
        }
    }

    /// Recoverable message `pseq` to `receiver` expired: it is never sent
    /// again, and leaves the store (the floor lets its receiver pass it).
    /// Filed as a dead letter here if this node found it expired
    /// (`given_up`).
    fn recoverable_expired(&self, receiver: &NodeId, pseq: u64, given_up: Option<GivenUp<'_>>) {
        if let Some(given_up) = given_up {
            self.counters
                .expired
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.file_dead_letter(given_up);
        }
        self.recoverable_dropped(receiver, pseq);
    }

    /// Recoverable message `pseq` to `receiver` is given up (expired, or
    /// its retries ran out): never sent again, and it leaves the store
    /// (the floor lets its receiver pass it).
    fn recoverable_dropped(&self, receiver: &NodeId, pseq: u64) {
        let Some(rec) = self.recovery.as_ref() else {
            return;
        };
        lock(&rec.retries).remove(&(receiver.clone(), pseq));
        lock(&rec.outbox).lost(receiver, pseq);
        let remove = vec![Change::Remove(RecordKey::Outgoing(
            receiver.to_string(),
            pseq,
        ))];
        if let Err(e) = rec.store.commit_later(remove) {
            tracing::warn!(error = %e, "could not queue the removal of a given-up recoverable message; it is given up again at the next start");
        }
    }

    /// The redelivery task: sends failed recoverable messages again when
    /// they are due, in order per receiver, until the node stops.
    pub(crate) async fn redeliver(self) {
        let Some(rec) = self.recovery.as_ref() else {
            return;
        };
        loop {
            let next = lock(&rec.outbox).poll_timeout();
            let wake = rec.wake.notified();
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = wake => continue,
                () = sleep_until(next) => {}
            }
            let due = lock(&rec.outbox).due(std::time::Instant::now());
            for resend in due {
                for batch in resend.pseqs.chunks(RESEND_BATCH) {
                    self.resend(rec, &resend.receiver, batch, resend.floor)
                        .await;
                }
            }
        }
    }

    /// Sends `pseqs` to `receiver` again, their bodies read from the store,
    /// and waits for their outcomes.
    async fn resend(&self, rec: &Recovery, receiver: &NodeId, pseqs: &[u64], floor: u64) {
        let keys: Vec<RecordKey> = pseqs
            .iter()
            .map(|&n| RecordKey::Outgoing(receiver.to_string(), n))
            .collect();
        let store = rec.store.clone();
        let read = tokio::task::spawn_blocking(move || store.read(&keys)).await;
        let records = match read {
            Ok(Ok(records)) => records,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read recoverable messages to send them again");
                vec![None; pseqs.len()]
            }
            Err(e) => {
                tracing::error!(error = %e, "the store read failed");
                vec![None; pseqs.len()]
            }
        };
        let mut pendings = Vec::new();
        for (&pseq, record) in pseqs.iter().zip(records) {
            let Some(Record::Outgoing(o)) = record else {
                // Gone (acknowledged meanwhile), or unreadable (logged):
                // the floor lets the receiver pass it.
                tracing::debug!(%receiver, pseq, "a recoverable message to send again is not in the store");
                lock(&rec.outbox).lost(receiver, pseq);
                continue;
            };
            let kind = MessageKind::Recoverable {
                epoch: rec.epoch,
                pseq,
                floor,
            };
            let priority = Priority::ALL
                .get(o.priority as usize)
                .copied()
                .unwrap_or(Priority::Normal);
            let exhausted = {
                let retries = lock(&rec.retries);
                retries
                    .get(&(receiver.clone(), pseq))
                    .filter(|r| r.exhausted())
                    .map(|r| (r.failed, r.last.clone()))
            };
            if let Some((attempts, last)) = exhausted {
                let reason = DeadReason::RetriesExhausted {
                    attempts,
                    last: last.unwrap_or(DeliveryFailure::UnknownTarget),
                };
                tracing::info!(%receiver, pseq, attempts, "a recoverable message's retries ran out");
                self.file_dead_letter(GivenUp {
                    sender: &self.id,
                    target: &Target::Node(receiver.clone()),
                    service: &o.service,
                    priority,
                    reason,
                    body: Bytes::from(o.body),
                });
                self.recoverable_dropped(receiver, pseq);
                continue;
            }
            if is_expired(o.expires_ms) {
                let given_up = GivenUp {
                    sender: &self.id,
                    target: &Target::Node(receiver.clone()),
                    service: &o.service,
                    priority,
                    reason: DeadReason::Expired,
                    body: Bytes::from(o.body),
                };
                self.recoverable_expired(receiver, pseq, Some(given_up));
                continue;
            }
            let stamp = Stamp {
                priority: Some(priority),
                expires_ms: o.expires_ms,
            };
            let submitted = self
                .submit(
                    Target::Node(receiver.clone()),
                    &o.service,
                    Bytes::from(o.body),
                    kind,
                    stamp,
                    self.config.send_timeout(),
                )
                .await;
            match submitted {
                Ok(pending) => pendings.push((pseq, pending)),
                Err(e) => self.recovery_outcome(receiver, pseq, Err(&e)),
            }
        }
        for (pseq, pending) in pendings {
            match pending.outcome().await {
                Ok(_) => self.recovery_outcome(receiver, pseq, Ok(())),
                Err(SendError::Expired { .. }) => self.recoverable_expired(receiver, pseq, None),
                Err(e) => self.recovery_outcome(receiver, pseq, Err(&e)),
            }
        }
    }

    /// Takes a received recoverable message: answers a duplicate or a gap
    /// at once, and gives a new one to the receipt task.
    pub(crate) async fn receive_recoverable(&self, receipt: Receipt, floor: u64) {
        use cluster_manager::recovery::Verdict;
        let Some(rec) = self.recovery.as_ref() else {
            {
                let (answer, acks) = receipt.answer;
                let failed = AckStatus::Failed(DeliveryFailure::Rejected(
                    "the receiver has no store (node.data_dir): it takes no recoverable messages"
                        .into(),
                ));
                answer.send(&self.id, &self.core, &acks, failed).await;
            }
            return;
        };
        let verdict =
            lock(&rec.receipts).receive(&receipt.origin, receipt.epoch, receipt.pseq, floor);
        let status = match verdict {
            Verdict::Store => {
                // Waits for room: the connection slows down with the store.
                let _ = rec.receipt_tx.send(receipt).await;
                return;
            }
            Verdict::Storing => return,
            Verdict::StoredBefore => AckStatus::Accepted,
            Verdict::Gap { expected } => AckStatus::Failed(DeliveryFailure::Rejected(format!(
                "out of order: recoverable message {} came before {expected}",
                receipt.pseq
            ))),
            Verdict::Refused => {
                tracing::warn!(origin = %receipt.origin, epoch = receipt.epoch, pseq = receipt.pseq, "refused a recoverable message: too many streams from its sender, or its numbers ran out");
                AckStatus::Failed(DeliveryFailure::Rejected(format!(
                    "recoverable stream refused: at most {} streams per sender, numbers below 2^64",
                    cluster_manager::recovery::MAX_EPOCHS_PER_SENDER
                )))
            }
        };
        let (answer, acks) = receipt.answer;
        answer.send(&self.id, &self.core, &acks, status).await;
    }

    /// Whether messages stored before a restart are still being handed to
    /// `service`: new ones wait (they are refused, and sent again).
    pub(crate) fn replaying(&self, service: &str) -> bool {
        self.recovery
            .as_ref()
            .is_some_and(|rec| lock(&rec.replay).contains_key(service))
    }

    /// Hands the messages stored and not handed over before a restart to
    /// `service`'s backlog `tx`, in order; until they are all in it, new
    /// recoverable messages for the service are refused (see
    /// [`Runtime::replaying`]).
    pub(crate) async fn replay(
        self,
        service: String,
        tx: mpsc::Sender<Delivery>,
        backlog: Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let Some(rec) = self.recovery.as_ref() else {
            return;
        };
        let stored = lock(&rec.replay).get(&service).cloned().unwrap_or_default();
        tracing::info!(%service, messages = stored.len(), "handing over recoverable messages stored before a restart");
        for i in stored {
            let origin = NodeId::new(&i.origin);
            let mut message = Message::recovered(&i, origin.clone());
            message.hand_over_recovered(rec.store.clone(), origin.clone(), i.epoch, i.pseq);
            // Nobody to answer: an answer to incarnation 0 is dropped as
            // stale by its sender.
            let answer = Answer {
                to: origin,
                to_incarnation: 0,
                seq: 0,
                kind: MessageKind::Recoverable {
                    epoch: i.epoch,
                    pseq: i.pseq,
                    floor: 0,
                },
            };
            backlog.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            let delivery = Delivery {
                answer,
                message,
                acks: self.server.queue.clone(),
            };
            if tx.send(delivery).await.is_err() {
                backlog.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                tracing::warn!(%service, "the service was unsubscribed while stored messages were handed over; they are handed over at the next start");
                return;
            }
        }
        lock(&rec.replay).remove(&service);
    }

    /// The receipt task: stores what it is given (many in one commit),
    /// acknowledges it, and queues it for its service, in order.
    pub(crate) async fn store_receipts(self) {
        let Some(rec) = self.recovery.as_ref() else {
            return;
        };
        let Some(mut rx) = lock(&rec.receipt_rx).take() else {
            return;
        };
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                n = rx.recv_many(&mut batch, 256) => if n == 0 { return },
            }
            let mut changes = Vec::new();
            let now = crate::options::unix_ms();
            for r in &batch {
                let m = &r.message;
                // An expired one takes its number, and is not kept.
                if m.expires_ms != 0 && m.expires_ms <= now {
                    changes.push(Change::Put(Record::Mark(Mark {
                        kind: MarkKind::Received,
                        node: r.origin.to_string(),
                        epoch: r.epoch,
                        value: r.pseq,
                    })));
                    continue;
                }
                changes.push(Change::Put(Record::Incoming(Incoming {
                    origin: r.origin.to_string(),
                    epoch: r.epoch,
                    pseq: r.pseq,
                    service: m.service().to_owned(),
                    priority: m.priority().index() as u8,
                    expires_ms: (m.expires_ms != 0).then_some(m.expires_ms),
                    body: m.body().to_vec(),
                })));
                changes.push(Change::Put(Record::Mark(Mark {
                    kind: MarkKind::Received,
                    node: r.origin.to_string(),
                    epoch: r.epoch,
                    value: r.pseq,
                })));
            }
            let stored = rec.store.commit(changes).await;
            // Acknowledgements gathered per connection and sender, a frame
            // for many (as the pump does).
            let mut acked: Option<AckBatch> = None;
            for mut r in batch.drain(..) {
                let (answer, acks) = r.answer;
                if let Err(e) = &stored {
                    lock(&rec.receipts).not_stored(&r.origin, r.epoch, r.pseq);
                    let failed = AckStatus::Failed(DeliveryFailure::Rejected(format!(
                        "the receiver's store failed: {e}"
                    )));
                    answer.send(&self.id, &self.core, &acks, failed).await;
                    continue;
                }
                lock(&rec.receipts).stored(&r.origin, r.epoch, r.pseq);
                if r.message.expires_ms != 0 && r.message.expires_ms <= now {
                    self.counters
                        .expired
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let body = std::mem::take(&mut r.message.body);
                    self.file_dead_letter(GivenUp {
                        sender: &r.origin,
                        target: &Target::Node(self.id.clone()),
                        service: r.message.service(),
                        priority: r.message.priority(),
                        reason: DeadReason::Expired,
                        body,
                    });
                    let status = AckStatus::Failed(DeliveryFailure::Expired);
                    answer.send(&self.id, &self.core, &acks, status).await;
                    continue;
                }
                r.message
                    .hand_over_recovered(rec.store.clone(), r.origin.clone(), r.epoch, r.pseq);
                if !acked.as_ref().is_some_and(|b| b.goes_to(&acks)) {
                    if let Some(mut previous) = acked.take() {
                        previous.flush().await;
                    }
                    acked = Some(AckBatch::new(
                        self.id.clone(),
                        self.core.clone(),
                        acks.clone(),
                    ));
                }
                if let Some(gathered) = acked.as_mut() {
                    gathered
                        .add(answer.to.clone(), answer.to_incarnation, answer.seq)
                        .await;
                }
                // Into the service's backlog: its pump moves it into the
                // inbox, in order, as room is made; the acknowledgement
                // went already (it is in the store), and the pump sends
                // none for a recoverable message.
                r.queue
                    .backlog
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                let delivery = Delivery {
                    answer,
                    message: r.message,
                    acks,
                };
                let delivery = match r.queue.tx.try_send(delivery) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Full(delivery)) => delivery,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        r.queue
                            .backlog
                            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                        tracing::warn!(origin = %r.origin, pseq = r.pseq, "a stored recoverable message's service was unsubscribed; it is handed over at the next start");
                        continue;
                    }
                };
                // The backlog is full: what is acknowledged goes out before
                // this waits for room.
                if let Some(gathered) = acked.as_mut() {
                    gathered.flush().await;
                }
                if r.queue.tx.send(delivery).await.is_err() {
                    r.queue
                        .backlog
                        .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    tracing::warn!(origin = %r.origin, pseq = r.pseq, "a stored recoverable message's service was unsubscribed; it is handed over at the next start");
                }
            }
            if let Some(mut gathered) = acked {
                gathered.flush().await;
            }
        }
    }
}

/// Whether a message that expires at `expires_ms` (Unix milliseconds) has
/// expired.
fn is_expired(expires_ms: Option<u64>) -> bool {
    expires_ms.is_some_and(|at| at <= crate::options::unix_ms())
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}
