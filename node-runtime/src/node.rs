//! The node handle the application holds, and the state its tasks share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use cluster_manager::{Awaiting, Completion, DeliveryReport, DeliveryTracker, SendError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transports::protocol::{Header, MemberInfo, MessageHeader, MessageKind, NodeId, Target};
use transports::{Config, OutFrame, OutQueue};

use crate::builder::NodeBuilder;
use crate::inbox::{Inbox, Message};
use crate::membership::{MemberView, MembershipEvents};
use crate::NodeError;

/// Time [`Node::shutdown`] waits for the node's tasks to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The reply to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The node that answered.
    pub from: NodeId,
    /// The reply's body.
    pub body: Bytes,
}

type Waiter = oneshot::Sender<Completion>;

/// State shared by the node handles and the node's tasks.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) id: NodeId,
    pub(crate) incarnation: u64,
    pub(crate) config: Config,
    /// The negotiated body limit.
    pub(crate) max_message: u64,
    seq: AtomicU64,
    tokens: AtomicU64,
    pub(crate) queue: OutQueue,
    pub(crate) tracker: Mutex<DeliveryTracker<Waiter>>,
    pub(crate) inboxes: RwLock<HashMap<Arc<str>, mpsc::Sender<Message>>>,
    pub(crate) subscriptions: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    pub(crate) members: MemberView,
    /// Routing failures reported for messages nobody waits on.
    pub(crate) late_failures: AtomicU64,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

impl Inner {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: NodeId,
        incarnation: u64,
        config: Config,
        max_message: u64,
        queue: OutQueue,
        members: Vec<MemberInfo>,
    ) -> Inner {
        Inner {
            id,
            incarnation,
            config,
            max_message,
            seq: AtomicU64::new(1),
            tokens: AtomicU64::new(1),
            queue,
            tracker: Mutex::new(DeliveryTracker::new()),
            inboxes: RwLock::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            members: MemberView::new(members),
            late_failures: AtomicU64::new(0),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    pub(crate) fn tracker(&self) -> std::sync::MutexGuard<'_, DeliveryTracker<Waiter>> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn check_size(&self, body: &Bytes) -> Result<(), SendError> {
        if body.len() as u64 > self.max_message {
            return Err(SendError::PayloadTooLarge {
                size: body.len() as u64,
                max: self.max_message,
            });
        }
        Ok(())
    }

    fn message(
        &self,
        seq: u64,
        target: Target,
        service: Arc<str>,
        kind: MessageKind,
        body: Bytes,
    ) -> OutFrame {
        OutFrame::Parts {
            header: Header::Message(MessageHeader {
                sender: self.id.clone(),
                incarnation: self.incarnation,
                seq,
                target,
                service,
                kind,
            }),
            body,
        }
    }

    /// Queues a frame by `deadline`.
    async fn enqueue(&self, frame: OutFrame, deadline: Instant) -> Result<(), SendError> {
        match tokio::time::timeout_at(deadline, self.queue.push_data(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => Err(SendError::Timeout {
                after: self.config.send_timeout(),
                waiting_for: vec![],
            }),
        }
    }

    fn closed_error(&self) -> SendError {
        if self.cancel.is_cancelled() {
            SendError::Shutdown
        } else {
            SendError::Disconnected
        }
    }

    /// Queues a tracked message; the returned handle awaits its outcome.
    /// Messages submitted one after another from one task go out in that
    /// order.
    async fn submit(
        self: &Arc<Self>,
        target: Target,
        service: &str,
        body: Bytes,
        kind: MessageKind,
        awaiting: Awaiting,
    ) -> Result<Pending, SendError> {
        self.check_size(&body)?;
        if self.cancel.is_cancelled() {
            return Err(SendError::Shutdown);
        }
        let deadline = Instant::now() + self.config.send_timeout();
        let seq = self.next_seq();
        let service: Arc<str> = Arc::from(service);
        let (tx, rx) = oneshot::channel();
        self.tracker()
            .track(seq, target.clone(), service.clone(), awaiting, tx);
        let pending = Pending {
            inner: self.clone(),
            seq,
            deadline,
            rx: Some(rx),
        };
        self.enqueue(self.message(seq, target, service, kind, body), deadline)
            .await?;
        Ok(pending)
    }

    pub(crate) async fn send_reply(
        &self,
        requester: &NodeId,
        requester_incarnation: u64,
        request_seq: u64,
        service: &Arc<str>,
        body: Bytes,
    ) -> Result<(), SendError> {
        self.check_size(&body)?;
        let deadline = Instant::now() + self.config.send_timeout();
        let kind = MessageKind::Reply {
            request_seq,
            requester_incarnation,
        };
        let frame = self.message(
            self.next_seq(),
            Target::Node(requester.clone()),
            service.clone(),
            kind,
            body,
        );
        self.enqueue(frame, deadline).await
    }

    /// Fails everything pending and closes inboxes; idempotent.
    pub(crate) fn close(&self, error: &SendError) {
        let done = self.tracker().fail_all(error);
        for (w, c) in done {
            let _ = w.send(c);
        }
        self.inboxes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// A message on its way: queued for the wire, its outcome not yet known.
///
/// Returned by [`Node::submit`]; [`Pending::outcome`] waits for the
/// receivers' acknowledgements. Dropping it stops tracking the message (it
/// may still be delivered).
#[derive(Debug)]
#[must_use = "a pending send does nothing unless its outcome is awaited"]
pub struct Pending {
    inner: Arc<Inner>,
    seq: u64,
    deadline: Instant,
    rx: Option<oneshot::Receiver<Completion>>,
}

impl Pending {
    /// The message's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    async fn completion(mut self) -> Result<Completion, SendError> {
        let Some(rx) = self.rx.take() else {
            return Err(SendError::Shutdown);
        };
        match tokio::time::timeout_at(self.deadline, rx).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(_)) => Err(self.inner.closed_error()),
            Err(_) => {
                let waiting_for = self
                    .inner
                    .tracker()
                    .cancel(self.seq)
                    .map(|(_, m)| m)
                    .unwrap_or_default();
                Err(SendError::Timeout {
                    after: self.inner.config.send_timeout(),
                    waiting_for,
                })
            }
        }
    }

    /// Waits until every receiver has accepted the message, or it failed.
    ///
    /// # Errors
    ///
    /// As [`Node::send`].
    pub async fn outcome(self) -> Result<DeliveryReport, SendError> {
        match self.completion().await? {
            Completion::Delivered(report) => Ok(report),
            Completion::Failed(e) => Err(e),
            Completion::Replied { .. } => Err(SendError::Disconnected),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // A settled message is no longer tracked; cancel is a no-op then.
        self.inner.tracker().cancel(self.seq);
    }
}

/// Shuts the node down when the last [`Node`] handle is dropped.
#[derive(Debug)]
struct DropGuard {
    inner: Arc<Inner>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        begin_shutdown(&self.inner);
    }
}

fn begin_shutdown(inner: &Inner) {
    if inner.cancel.is_cancelled() {
        return;
    }
    inner.cancel.cancel();
    // The writer stops after writing the goodbye; if it cannot be queued,
    // stop the writer at once.
    if inner
        .queue
        .try_push_control(OutFrame::control(Header::Goodbye))
        .is_err()
    {
        inner.queue.close();
    }
    inner.close(&SendError::Shutdown);
    inner.tasks.close();
}

/// A running cluster node: the handle an application server embeds.
///
/// Cheap to clone; the node shuts down cleanly (telling the message server
/// it is a planned stop) when [`Node::shutdown`] is called or the last
/// handle is dropped.
#[derive(Debug, Clone)]
pub struct Node {
    inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
}

impl Node {
    /// Starts building a node with the given id.
    pub fn builder(id: impl Into<NodeId>) -> NodeBuilder {
        NodeBuilder::new(id.into())
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Node {
        Node {
            _guard: Arc::new(DropGuard {
                inner: inner.clone(),
            }),
            inner,
        }
    }

    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.inner.id
    }

    /// This node's incarnation: a fresh number each start.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// The configuration in force for this node (its `[nodes.<id>]` section
    /// merged in).
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The largest body this node may send, as negotiated with the message
    /// server.
    pub fn max_message_bytes(&self) -> u64 {
        self.inner.max_message
    }

    /// Starts offering `service` and returns its inbox. Resolves once the
    /// message server knows, so a send made afterwards by any node finds it.
    ///
    /// # Errors
    ///
    /// [`NodeError::AlreadySubscribed`] if the service has a live inbox here;
    /// [`NodeError::Timeout`] or [`NodeError::Disconnected`] if the message
    /// server did not confirm.
    pub async fn subscribe(&self, service: &str) -> Result<Inbox, NodeError> {
        let inner = &self.inner;
        let (tx, rx) = mpsc::channel(inner.config.node.inbox_capacity);
        {
            let mut inboxes = inner.inboxes.write().unwrap_or_else(|p| p.into_inner());
            if inboxes.get(service).is_some_and(|s| !s.is_closed()) {
                return Err(NodeError::AlreadySubscribed(service.to_owned()));
            }
            inboxes.insert(Arc::from(service), tx);
        }
        let token = inner.tokens.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        inner
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, done_tx);
        let frame = OutFrame::control(Header::Subscribe {
            token,
            service: service.to_owned(),
        });
        let timeout = inner.config.send_timeout();
        let confirmed = tokio::time::timeout(timeout, async {
            inner
                .queue
                .push_control(frame)
                .await
                .map_err(|_| NodeError::Disconnected)?;
            done_rx.await.map_err(|_| NodeError::Disconnected)
        })
        .await;
        match confirmed {
            Ok(Ok(())) => Ok(Inbox {
                service: service.to_owned(),
                rx,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NodeError::Timeout(timeout)),
        }
    }

    /// Sends `body` to `service` on `target` and resolves when every
    /// receiver has accepted it into the service's inbox.
    ///
    /// # Errors
    ///
    /// [`SendError`]: definite (`UnknownTarget`, `NoSuchService`,
    /// `PayloadTooLarge`, `Rejected`, `TargetStopped` before the message
    /// left) or uncertain (`Timeout`, `TargetStopped` in flight,
    /// `Disconnected`); `Incomplete` with a report when a fan-out reached
    /// only some receivers. Nothing fails silently.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops waiting; the message may still be
    /// delivered.
    pub async fn send(
        &self,
        target: Target,
        service: &str,
        body: impl Into<Bytes>,
    ) -> Result<DeliveryReport, SendError> {
        self.submit(target, service, body).await?.outcome().await
    }

    /// Queues an acknowledged message and returns as soon as it is queued,
    /// with a handle to await its outcome: pipelining without giving up
    /// order. Messages submitted one after another go out in that order.
    ///
    /// # Errors
    ///
    /// `PayloadTooLarge`, `Shutdown`, `Disconnected`, or `Timeout` if the
    /// outgoing queue stayed full for the send timeout.
    pub async fn submit(
        &self,
        target: Target,
        service: &str,
        body: impl Into<Bytes>,
    ) -> Result<Pending, SendError> {
        self.inner
            .submit(
                target,
                service,
                body.into(),
                MessageKind::Send,
                Awaiting::Acks,
            )
            .await
    }

    /// Sends `body` one-way: resolves once the message is queued for the
    /// wire. No acknowledgement, the fastest path.
    ///
    /// # Errors
    ///
    /// `PayloadTooLarge`; `Timeout` if the outgoing queue stayed full for the
    /// send timeout; `Shutdown` or `Disconnected`.
    pub async fn notify(
        &self,
        target: Target,
        service: &str,
        body: impl Into<Bytes>,
    ) -> Result<(), SendError> {
        let inner = &self.inner;
        let body = body.into();
        inner.check_size(&body)?;
        if inner.cancel.is_cancelled() {
            return Err(SendError::Shutdown);
        }
        let deadline = Instant::now() + inner.config.send_timeout();
        let frame = inner.message(
            inner.next_seq(),
            target,
            Arc::from(service),
            MessageKind::Notify,
            body,
        );
        inner.enqueue(frame, deadline).await
    }

    /// Sends a request to one node (`Node` or `AnyOf`) and awaits its reply.
    ///
    /// # Errors
    ///
    /// `InvalidTarget` for `Group` and `All`; otherwise as [`Node::send`].
    pub async fn request(
        &self,
        target: Target,
        service: &str,
        body: impl Into<Bytes>,
    ) -> Result<Reply, SendError> {
        if matches!(target, Target::Group(_) | Target::All) {
            return Err(SendError::InvalidTarget(target));
        }
        let pending = self
            .inner
            .submit(
                target,
                service,
                body.into(),
                MessageKind::Request,
                Awaiting::Reply,
            )
            .await?;
        match pending.completion().await? {
            Completion::Replied { from, body } => Ok(Reply { from, body }),
            Completion::Failed(e) => Err(e),
            Completion::Delivered(_) => Err(SendError::Disconnected),
        }
    }

    /// The current members of the cluster, this node included.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.inner.members.snapshot()
    }

    /// A stream of membership changes from now on.
    pub fn membership_events(&self) -> MembershipEvents {
        self.inner.members.subscribe()
    }

    /// How many receivers missed a message that nobody was waiting on: a
    /// `notify` that could not be routed or queued (unknown target, no such
    /// service, receiver overloaded), or a send whose caller stopped
    /// waiting. Each is also logged at `warn`.
    pub fn late_failures(&self) -> u64 {
        self.inner.late_failures.load(Ordering::Relaxed)
    }

    /// Acknowledged messages and requests still waiting for an outcome.
    pub fn pending(&self) -> usize {
        self.inner.tracker().len()
    }

    /// Stops the node: tells the message server it is a planned stop, fails
    /// what is still pending with `Shutdown`, closes the inboxes, and waits
    /// up to [`SHUTDOWN_GRACE`] for the node's tasks.
    pub async fn shutdown(self) {
        begin_shutdown(&self.inner);
        if tokio::time::timeout(SHUTDOWN_GRACE, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(node = %self.inner.id, "node tasks did not stop within the grace period");
        }
    }
}
