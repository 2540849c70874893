//! The node handle the application holds, and the state its tasks share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use cluster_config::Config;
use cluster_manager::core::{CoreConfig, Event, NodeCore, Transmit};
use cluster_manager::link::LinkPolicy;
use cluster_manager::{Awaiting, Completion, DeliveryReport, SendError};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transports::protocol::{
    DeliveryFailure, Header, Hello, MemberEvent, MemberInfo, MessageHeader, MessageKind,
    MessageRef, NodeId, Target, TargetRef,
};
use transports::{Lane, OutFrame, OutQueue, PushError, Wait};

use crate::builder::NodeBuilder;
use crate::connection::{late_failure, pump, ServiceQueue};
use crate::core::{complete, CoreCell, Waiter};
use crate::counters::{Counters, PathCounters};
use crate::direct::DirectPool;
use crate::inbox::Inbox;
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

/// Messages the core gives to send again, as frames.
pub(crate) fn resend_frames(transmits: Vec<Transmit>) -> Vec<OutFrame> {
    transmits
        .into_iter()
        .map(|(header, body)| OutFrame::Parts {
            header: Header::Message(header),
            body,
        })
        .collect()
}

/// What a node learnt while connecting, to build its shared state from.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) hello: Hello,
    pub(crate) config: Config,
    pub(crate) server_max: u64,
    pub(crate) queue: OutQueue,
    pub(crate) members: Vec<MemberInfo>,
    pub(crate) server_index: usize,
}

/// State shared by the node handles and the node's tasks.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) id: NodeId,
    /// Every decision: paths, outcomes, duplicates, members, the link.
    pub(crate) core: Arc<CoreCell>,
    /// What this node says when it opens a connection.
    hello: Mutex<Hello>,
    pub(crate) config: Config,
    /// The body limit of the message-server path (negotiated).
    pub(crate) server_max: u64,
    tokens: AtomicU64,
    /// The connection to the message server.
    pub(crate) queue: OutQueue,
    /// Each subscribed service's delivery queue, drained by its pump.
    pub(crate) inboxes: RwLock<HashMap<Arc<str>, ServiceQueue>>,
    /// Changed (under `inboxes`' write lock) whenever `inboxes` changes:
    /// readers keep the inbox they delivered to last while it stays the
    /// same (see [`crate::connection::InboxCache`]).
    pub(crate) inboxes_generation: AtomicU64,
    pub(crate) subscriptions: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    pub(crate) resolves: Mutex<HashMap<u64, oneshot::Sender<ResolveResult>>>,
    /// The application's stream of membership events.
    pub(crate) members: MemberView,
    pub(crate) direct: DirectPool,
    /// Orders message-server sends: the sequence number is taken and the
    /// frame queued under it, so the wire order is the number order (also
    /// for what a member that is back gets again).
    pub(crate) send_lock: tokio::sync::Mutex<()>,
    /// Bounds the acknowledged messages awaiting an outcome
    /// (`node.max_in_flight`); a [`Pending`] holds a place.
    pub(crate) in_flight: Arc<Semaphore>,
    /// Where the message server takes heartbeats, for the current link.
    pub(crate) server_heartbeat: Mutex<Option<std::net::SocketAddr>>,
    /// Service names sent to, shared instead of allocated per message.
    service_names: RwLock<rustc_hash::FxHashSet<Arc<str>>>,
    pub(crate) counters: Counters,
    /// Routing failures reported for messages nobody waits on.
    pub(crate) late_failures: AtomicU64,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// When the node started: the time given to the core where it does not
    /// need the clock.
    pub(crate) started: std::time::Instant,
}

/// Most service names a node keeps shared (see `Inner::service_name`).
const MAX_SERVICE_NAMES: usize = 1024;

/// The members a target resolves to, or why not.
pub(crate) type ResolveResult = Result<Vec<(NodeId, u64)>, DeliveryFailure>;

impl Inner {
    pub(crate) fn new(parts: Parts) -> Inner {
        let config = &parts.config;
        let ms = &config.message_server;
        let lazy = &config.lazy;
        let core = CoreConfig {
            id: parts.hello.node.clone(),
            incarnation: parts.hello.incarnation,
            role: parts.hello.role,
            groups: parts.hello.groups.clone(),
            lazy_threshold_bytes: lazy.threshold_bytes,
            lazy_services: lazy.services.clone(),
            auto_activate_messages: lazy.auto_activate_messages,
            auto_activate_window: Duration::from_millis(lazy.auto_activate_window_ms),
            max_message_bytes: config.limits.max_message_bytes,
            server_max_message_bytes: parts.server_max,
            link: LinkPolicy {
                addresses: ms.addresses.len(),
                reconnect_delay: Duration::from_millis(ms.reconnect_delay_ms),
                reconnect_max_delay: Duration::from_millis(ms.reconnect_max_delay_ms),
                failure_timeout: config.failure_timeout(),
            },
        };
        let core = NodeCore::new(
            core,
            parts.members,
            parts.server_index,
            std::time::Instant::now(),
        );
        let max_in_flight = parts.config.node.max_in_flight;
        Inner {
            id: parts.hello.node.clone(),
            core: Arc::new(CoreCell::new(core)),
            hello: Mutex::new(parts.hello),
            config: parts.config,
            server_max: parts.server_max,
            tokens: AtomicU64::new(1),
            inboxes_generation: AtomicU64::new(0),
            queue: parts.queue,
            inboxes: RwLock::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            resolves: Mutex::new(HashMap::new()),
            members: MemberView::new(),
            direct: DirectPool::default(),
            send_lock: tokio::sync::Mutex::new(()),
            in_flight: Arc::new(Semaphore::new(
                max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
            )),
            server_heartbeat: Mutex::new(None),
            service_names: RwLock::default(),
            counters: Counters::default(),
            late_failures: AtomicU64::new(0),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            started: std::time::Instant::now(),
        }
    }

    /// A new link to address `index` is up: heartbeats go to its server,
    /// and its silence is measured from now.
    pub(crate) fn link_started(&self, heartbeat: Option<std::net::SocketAddr>, index: usize) {
        *self
            .server_heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = heartbeat;
        let _ = index;
    }

    /// The current incarnation.
    pub(crate) fn incarnation(&self) -> u64 {
        self.core.lock().incarnation()
    }

    /// Takes a new incarnation (this node was declared failed): what the
    /// old one was waiting for fails, and with it what would be resent.
    pub(crate) fn new_incarnation(&self, incarnation: u64) {
        self.hello
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .incarnation = incarnation;
        let ((), out) = self
            .core
            .run(|core| core.handle_new_incarnation(std::time::Instant::now(), incarnation));
        self.dispatch(out.events);
    }

    /// Acts on what the core decided: wakes the waiting senders, tells the
    /// application, closes the channels of members gone, counts what
    /// nobody waits on.
    pub(crate) fn dispatch(&self, events: Vec<Event<Waiter>>) {
        for event in events {
            match event {
                Event::Completed(waiter, completion) => complete(waiter, completion),
                Event::Membership(event) => self.members.emit(event),
                Event::PeerGone(id) => self.direct.close_peer(&id),
                Event::LateFailure(routed) => late_failure(self, &routed),
            }
        }
    }

    /// Applies a membership event from the message server, under the
    /// send order: a member that is back gets what it missed before
    /// anything newer.
    pub(crate) async fn handle_member_event(&self, event: MemberEvent) {
        let _order = self.send_lock.lock().await;
        let ((), out) = self
            .core
            .run(|core| core.handle_member_event(std::time::Instant::now(), event));
        self.core.timers.notify_one();
        self.dispatch(out.events);
        for frame in resend_frames(out.transmits) {
            if self
                .queue
                .push(frame, Lane::Data, Wait::Forever)
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// This node's `Hello` as it stands (role, groups, direct address).
    pub(crate) fn hello(&self) -> Hello {
        self.hello.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// This node's `Hello` as of now: its current services included.
    pub(crate) fn current_hello(&self) -> Hello {
        let mut hello = self.hello();
        hello.services = self
            .inboxes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .map(|s| s.to_string())
            .collect();
        hello
    }

    /// `service` as a shared name: the same allocation for every message
    /// to it, for up to [`MAX_SERVICE_NAMES`] names (beyond that, each
    /// message gets its own, so that the table stays bounded).
    pub(crate) fn service_name(&self, service: &str) -> Arc<str> {
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
        let name = self.interned_service_name(service);
        LAST.set(Some(name.clone()));
        name
    }

    /// [`Inner::service_name`] from the node's table of names.
    fn interned_service_name(&self, service: &str) -> Arc<str> {
        if let Some(name) = self
            .service_names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
        {
            return name.clone();
        }
        let mut names = self
            .service_names
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(name) = names.get(service) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(service);
        if names.len() < MAX_SERVICE_NAMES {
            names.insert(name.clone());
        }
        name
    }

    pub(crate) fn next_token(&self) -> u64 {
        self.tokens.fetch_add(1, Ordering::Relaxed)
    }

    /// Bodies above `limits.max_message_bytes` fail before anything is
    /// sent, whatever the path.
    pub(crate) fn check_size(&self, body: &Bytes) -> Result<(), SendError> {
        let max = self.config.limits.max_message_bytes;
        if body.len() as u64 > max {
            return Err(SendError::PayloadTooLarge {
                size: body.len() as u64,
                max,
            });
        }
        Ok(())
    }

    /// The header of this node's message `seq`, by reference: what the
    /// queues encode in place when a message is queued without a frame.
    pub(crate) fn message_ref<'a>(
        &'a self,
        seq: u64,
        incarnation: u64,
        target: TargetRef<'a>,
        service: &'a str,
        kind: MessageKind,
    ) -> MessageRef<'a> {
        MessageRef {
            sender: self.id.as_str(),
            incarnation,
            seq,
            target,
            service,
            kind,
        }
    }

    pub(crate) fn header(
        &self,
        seq: u64,
        incarnation: u64,
        target: Target,
        service: Arc<str>,
        kind: MessageKind,
    ) -> MessageHeader {
        MessageHeader {
            sender: self.id.clone(),
            incarnation,
            seq,
            target,
            service,
            kind,
        }
    }

    pub(crate) fn message(
        &self,
        seq: u64,
        incarnation: u64,
        target: Target,
        service: Arc<str>,
        kind: MessageKind,
        body: Bytes,
    ) -> OutFrame {
        OutFrame::Parts {
            header: Header::Message(MessageHeader {
                sender: self.id.clone(),
                incarnation,
                seq,
                target,
                service,
                kind,
            }),
            body,
        }
    }

    /// Queues a frame to the message server by `deadline`.
    pub(crate) async fn enqueue(
        &self,
        frame: OutFrame,
        deadline: Instant,
    ) -> Result<(), SendError> {
        // Room at once, usually: no timer, no waiting future.
        match self
            .queue
            .push(frame, Lane::Data, Wait::Until(deadline))
            .await
        {
            Ok(()) => Ok(()),
            Err(PushError::Closed(_)) => Err(self.closed_error()),
            Err(PushError::Full(_) | PushError::Congested) => Err(SendError::Timeout {
                after: self.config.send_timeout(),
                waiting_for: vec![],
            }),
        }
    }

    /// Whether the node is shutting down.
    pub(crate) fn is_stopping(&self) -> bool {
        self.core.is_stopping()
    }

    pub(crate) fn closed_error(&self) -> SendError {
        self.core.closed_error()
    }

    pub(crate) async fn send_reply(
        &self,
        requester: &NodeId,
        requester_incarnation: u64,
        request_seq: u64,
        service: &str,
        body: Bytes,
    ) -> Result<(), SendError> {
        self.check_size(&body)?;
        let deadline = Instant::now() + self.config.send_timeout();
        let kind = MessageKind::Reply {
            request_seq,
            requester_incarnation,
        };
        let (seq, incarnation) = {
            let mut core = self.core.lock();
            (core.next_seq(), core.incarnation())
        };
        let frame = self.message(
            seq,
            incarnation,
            Target::Node(requester.clone()),
            self.service_name(service),
            kind,
            body,
        );
        self.enqueue(frame, deadline).await
    }

    /// Fails everything pending and closes inboxes; idempotent.
    pub(crate) fn close(&self, error: &SendError) {
        let ((), out) = self.core.run(|core| core.handle_shutdown(error));
        self.dispatch(out.events);
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
/// may still be delivered). It holds the node's core and its place among
/// the messages in flight (`node.max_in_flight`), not the node.
#[derive(Debug)]
#[must_use = "a pending send does nothing unless its outcome is awaited"]
pub struct Pending {
    core: Arc<CoreCell>,
    seq: u64,
    deadline: Instant,
    /// The send timeout, for the error that says how long it waited.
    after: Duration,
    rx: Option<oneshot::Receiver<Completion>>,
    /// Set once the outcome arrived: the tracker let go of the message
    /// then, so dropping this handle has nothing to cancel.
    settled: bool,
    /// Its place among the messages in flight; given back on drop.
    _place: OwnedSemaphorePermit,
}

impl Pending {
    pub(crate) fn new(
        core: Arc<CoreCell>,
        seq: u64,
        deadline: Instant,
        after: Duration,
        rx: oneshot::Receiver<Completion>,
        place: OwnedSemaphorePermit,
    ) -> Pending {
        Pending {
            core,
            seq,
            deadline,
            after,
            rx: Some(rx),
            settled: false,
            _place: place,
        }
    }

    /// The message's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    async fn completion(mut self) -> Result<Completion, SendError> {
        let Some(mut rx) = self.rx.take() else {
            return Err(SendError::Shutdown);
        };
        // Often there already (many in flight): one poll, no timer armed.
        // A poll, not a `try_recv`, so that it takes from tokio's
        // cooperative budget and a sender that never waits still yields.
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(std::pin::Pin::new(&mut rx), cx))
        })
        .await;
        let outcome = match first {
            std::task::Poll::Ready(received) => Ok(received),
            std::task::Poll::Pending => tokio::time::timeout_at(self.deadline, rx).await,
        };
        match outcome {
            Ok(Ok(c)) => {
                self.settled = true;
                Ok(c)
            }
            Ok(Err(_)) => Err(self.core.closed_error()),
            Err(_) => {
                let waiting_for = self
                    .core
                    .lock()
                    .handle_cancel(self.seq)
                    .map(|(_, m)| m)
                    .unwrap_or_default();
                Err(SendError::Timeout {
                    after: self.after,
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
        // An unsettled message stops being tracked (and resent); what it
        // held is freed after the lock is let go.
        if !self.settled {
            let cancelled = self.core.lock().handle_cancel(self.seq);
            drop(cancelled);
        }
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
    if inner.core.begin_stopping() {
        return;
    }
    inner.cancel.cancel();
    // The writer stops after writing the goodbye; if it cannot be queued,
    // stop the writer at once.
    if inner
        .queue
        .try_push(OutFrame::control(Header::Goodbye), Lane::Control)
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
        self.inner.incarnation()
    }

    /// The configuration in force for this node (its `[nodes.<id>]` section
    /// merged in).
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The largest body this node may send (`limits.max_message_bytes`);
    /// larger ones fail with `PayloadTooLarge` before anything is sent.
    pub fn max_message_bytes(&self) -> u64 {
        self.inner.config.limits.max_message_bytes
    }

    /// The largest body the message-server path carries (the smaller of the
    /// server's and this node's limits); larger bodies need a lazy channel.
    pub fn server_max_message_bytes(&self) -> u64 {
        self.inner.server_max
    }

    /// The message server this node is registered with now (an entry of
    /// `message_server.addresses`), or `None` while it is reconnecting.
    pub fn message_server(&self) -> Option<String> {
        let index = self.inner.core.lock().link().index()?;
        self.inner
            .config
            .message_server
            .addresses
            .get(index)
            .cloned()
    }

    /// The address this node announced for direct channels.
    pub fn direct_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.hello().direct_addr
    }

    /// What this node sent on each path, and what became of its direct
    /// channels.
    pub fn counters(&self) -> PathCounters {
        self.inner.counters.snapshot()
    }

    /// Starts offering `service` and returns its inbox. Resolves once the
    /// message server knows, so a send made afterwards by any node finds it.
    ///
    /// # Errors
    ///
    /// [`NodeError::InvalidName`] for an empty or overlong name;
    /// [`NodeError::AlreadySubscribed`] if the service has a live inbox here;
    /// [`NodeError::Timeout`] or [`NodeError::Disconnected`] if the message
    /// server did not confirm.
    pub async fn subscribe(&self, service: &str) -> Result<Inbox, NodeError> {
        if !transports::protocol::valid_name(service) {
            return Err(NodeError::invalid_name("service", service));
        }
        let inner = &self.inner;
        let capacity = inner.config.node.inbox_capacity;
        let (tx, rx) = crate::inbox::inbox(service, capacity);
        let (delivery_tx, delivery_rx) = mpsc::channel(capacity);
        let backlog: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let name: Arc<str> = Arc::from(service);
        {
            let mut inboxes = inner.inboxes.write().unwrap_or_else(|p| p.into_inner());
            if inboxes.get(service).is_some_and(|s| !s.is_closed()) {
                return Err(NodeError::AlreadySubscribed(service.to_owned()));
            }
            inboxes.insert(
                name.clone(),
                ServiceQueue {
                    tx: delivery_tx,
                    inbox: tx.clone(),
                    backlog: backlog.clone(),
                    congested: Arc::default(),
                },
            );
            inner.inboxes_generation.fetch_add(1, Ordering::AcqRel);
        }
        inner
            .tasks
            .spawn(pump(inner.clone(), name, delivery_rx, tx, backlog));
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
                .push(frame, Lane::Control, Wait::Forever)
                .await
                .map_err(|_| NodeError::Disconnected)?;
            done_rx.await.map_err(|_| NodeError::Disconnected)
        })
        .await;
        match confirmed {
            Ok(Ok(())) => Ok(rx),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                inner
                    .subscriptions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&token);
                Err(NodeError::Timeout(timeout))
            }
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
        self.inner.notify(target, service, body.into()).await
    }

    /// Sends `body` one-way to `target` over this dispatcher's session
    /// channel: no message server hop, no acknowledgement round trip.
    ///
    /// # Errors
    ///
    /// `NotADispatcher` unless this node has the dispatcher role;
    /// `NotInSessionGroup` unless `target` is a server node of this node's
    /// group; `DirectUnavailable` if the channel cannot be opened;
    /// `PayloadTooLarge`, `Timeout`, `Disconnected`.
    pub async fn session(
        &self,
        target: &NodeId,
        service: &str,
        body: impl Into<Bytes>,
    ) -> Result<(), SendError> {
        self.inner.session(target, service, body.into()).await
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
        self.inner.core.lock().members().snapshot()
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
        self.inner.core.lock().tracker().len()
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
