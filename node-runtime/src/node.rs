//! The node handle the application holds, and the state its tasks share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use cluster_manager::{
    AutoActivation, Awaiting, Completion, DeliveryReport, DeliveryTracker, SendError,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transports::protocol::{
    DeliveryFailure, Header, Hello, MemberInfo, MessageHeader, MessageKind, MessageRef, NodeId,
    Target, TargetRef,
};
use transports::{Config, Lane, OutFrame, OutQueue, PushError, Wait};

use crate::builder::NodeBuilder;
use crate::connection::complete;
use crate::connection::{pump, ServiceQueue};
use crate::counters::{Counters, PathCounters};
use crate::direct::DirectPool;
use crate::inbox::Inbox;
use crate::membership::{Change, MemberView, MembershipEvents};
use crate::reliable::{node_of, resend_frames, Dedup, Resend};
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

/// Who waits on a tracked message, and what to send again after a
/// reconnect: a message sent through the message server keeps its body
/// and kind here until its outcome is known (the rest of its frame is in
/// its tracker entry), so settling, cancelling or failing it drops what
/// would be resent with it, under the one tracker lock.
#[derive(Debug)]
pub(crate) struct Waiter {
    pub(crate) tx: oneshot::Sender<Completion>,
    pub(crate) resend: Option<Resend>,
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
    /// The current incarnation; a new one when this node was declared
    /// failed and rejoins.
    pub(crate) incarnation: Arc<AtomicU64>,
    /// What this node says when it opens a connection.
    hello: Mutex<Hello>,
    pub(crate) config: Config,
    /// The body limit of the message-server path (negotiated).
    pub(crate) server_max: u64,
    seq: AtomicU64,
    tokens: AtomicU64,
    /// The connection to the message server.
    pub(crate) queue: OutQueue,
    pub(crate) tracker: Mutex<DeliveryTracker<Waiter>>,
    /// Each subscribed service's delivery queue, drained by its pump.
    pub(crate) inboxes: RwLock<HashMap<Arc<str>, ServiceQueue>>,
    /// Changed (under `inboxes`' write lock) whenever `inboxes` changes:
    /// readers keep the inbox they delivered to last while it stays the
    /// same (see [`crate::connection::InboxCache`]).
    pub(crate) inboxes_generation: AtomicU64,
    pub(crate) subscriptions: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    pub(crate) resolves: Mutex<HashMap<u64, oneshot::Sender<ResolveResult>>>,
    pub(crate) members: MemberView,
    pub(crate) direct: DirectPool,
    /// Which message numbers of each sender were delivered here.
    pub(crate) dedup: Mutex<Dedup>,
    /// Orders message-server sends: the sequence number is taken and the
    /// frame queued under it, so the wire order is the number order.
    pub(crate) send_lock: OrderLock,
    /// Bounds the acknowledged messages awaiting an outcome
    /// (`node.max_in_flight`).
    pub(crate) in_flight: InFlight,
    /// Whether the link to the message server is up: members are declared
    /// gone only while it is (while it is down, nothing is known).
    pub(crate) link_up: std::sync::atomic::AtomicBool,
    /// Where the message server takes heartbeats, for the current link.
    pub(crate) server_heartbeat: Mutex<Option<std::net::SocketAddr>>,
    /// When the server last answered a heartbeat (ms since start).
    pub(crate) last_pong_ms: AtomicU64,
    /// Woken when the server stopped answering heartbeats: the link is
    /// dead even if TCP has not noticed.
    pub(crate) link_dead: tokio::sync::Notify,
    /// The index in `message_server.addresses` connected to now.
    pub(crate) server_index: std::sync::atomic::AtomicUsize,
    activation: Mutex<AutoActivation>,
    /// Service names sent to, shared instead of allocated per message.
    service_names: RwLock<
        std::collections::HashSet<
            Arc<str>,
            std::hash::BuildHasherDefault<cluster_manager::tracker::NameHasher>,
        >,
    >,
    pub(crate) counters: Counters,
    /// Routing failures reported for messages nobody waits on.
    pub(crate) late_failures: AtomicU64,
    epoch: std::time::Instant,
    pub(crate) cancel: CancellationToken,
    /// Set just before `cancel` is: read on every send, without the
    /// token's lock.
    stopping: std::sync::atomic::AtomicBool,
    pub(crate) tasks: TaskTracker,
}

/// Most service names a node keeps shared (see `Inner::service_name`).
const MAX_SERVICE_NAMES: usize = 1024;

/// The members a target resolves to, or why not.
pub(crate) type ResolveResult = Result<Vec<(NodeId, u64)>, DeliveryFailure>;

impl Inner {
    pub(crate) fn new(parts: Parts) -> Inner {
        let failure_timeout = parts.config.failure_timeout();
        let max_in_flight = parts.config.node.max_in_flight;
        let lazy = &parts.config.lazy;
        let activation = AutoActivation::new(
            lazy.auto_activate_messages,
            Duration::from_millis(lazy.auto_activate_window_ms),
        );
        Inner {
            id: parts.hello.node.clone(),
            incarnation: Arc::new(AtomicU64::new(parts.hello.incarnation)),
            hello: Mutex::new(parts.hello),
            config: parts.config,
            server_max: parts.server_max,
            seq: AtomicU64::new(1),
            tokens: AtomicU64::new(1),
            inboxes_generation: AtomicU64::new(0),
            queue: parts.queue,
            tracker: Mutex::new(DeliveryTracker::new()),
            inboxes: RwLock::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            resolves: Mutex::new(HashMap::new()),
            members: MemberView::new(parts.members, failure_timeout),
            direct: DirectPool::default(),
            dedup: Mutex::new(Dedup::default()),
            send_lock: OrderLock::default(),
            in_flight: InFlight::new(max_in_flight),
            server_index: std::sync::atomic::AtomicUsize::new(parts.server_index),
            link_up: std::sync::atomic::AtomicBool::new(true),
            server_heartbeat: Mutex::new(None),
            last_pong_ms: AtomicU64::new(0),
            link_dead: tokio::sync::Notify::new(),
            activation: Mutex::new(activation),
            service_names: RwLock::default(),
            counters: Counters::default(),
            late_failures: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            cancel: CancellationToken::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            tasks: TaskTracker::new(),
        }
    }

    /// Milliseconds since the node started (for idle tracking).
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A new link is up: heartbeats go to its server, and its silence is
    /// measured from now.
    pub(crate) fn link_started(&self, heartbeat: Option<std::net::SocketAddr>) {
        *self
            .server_heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = heartbeat;
        self.last_pong_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    /// The current incarnation.
    pub(crate) fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::SeqCst)
    }

    /// Takes a new incarnation (this node was declared failed): what the
    /// old one was waiting for fails, and with it what would be resent.
    pub(crate) fn new_incarnation(&self, incarnation: u64) {
        self.incarnation.store(incarnation, Ordering::SeqCst);
        self.hello
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .incarnation = incarnation;
        let done = self.tracker().fail_all(&SendError::Disconnected);
        complete(done);
    }

    /// Looks at this node's `Hello` without copying it (the per-message
    /// checks of the session path).
    pub(crate) fn with_hello<T>(&self, f: impl FnOnce(&Hello) -> T) -> T {
        f(&self.hello.lock().unwrap_or_else(|p| p.into_inner()))
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

    /// Acts on membership changes: fails what waited on members gone for
    /// good, resends to members that are back.
    pub(crate) async fn handle_changes(&self, changes: Vec<Change>) {
        for change in changes {
            match change {
                Change::Left(id) => {
                    tracing::info!(node = %id, "member left");
                    self.dedup().forget(&id);
                    self.direct.close_peer(&id);
                    complete(self.tracker().handle_member_left(&id));
                }
                Change::Present(id) => self.resync(&id).await,
            }
        }
    }

    /// Sends again, in order, what `node` has not acknowledged: it was
    /// disconnected, so acknowledgements (or the messages) may be lost.
    async fn resync(&self, node: &NodeId) {
        let _order = self.send_lock.lock().await;
        let frames = resend_frames(&self.tracker(), &self.id, self.incarnation(), |target| {
            node_of(target) == Some(node)
        });
        if !frames.is_empty() {
            tracing::debug!(%node, messages = frames.len(), "member back: resending what it has not acknowledged");
        }
        for frame in frames {
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

    pub(crate) fn dedup(&self) -> std::sync::MutexGuard<'_, Dedup> {
        self.dedup.lock().unwrap_or_else(|p| p.into_inner())
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

    pub(crate) fn activation(&self) -> std::sync::MutexGuard<'_, AutoActivation> {
        self.activation.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn next_token(&self) -> u64 {
        self.tokens.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn tracker(&self) -> std::sync::MutexGuard<'_, DeliveryTracker<Waiter>> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
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
        target: TargetRef<'a>,
        service: &'a str,
        kind: MessageKind,
    ) -> MessageRef<'a> {
        MessageRef {
            sender: self.id.as_str(),
            incarnation: self.incarnation(),
            seq,
            target,
            service,
            kind,
        }
    }

    pub(crate) fn header(
        &self,
        seq: u64,
        target: Target,
        service: Arc<str>,
        kind: MessageKind,
    ) -> MessageHeader {
        MessageHeader {
            sender: self.id.clone(),
            incarnation: self.incarnation(),
            seq,
            target,
            service,
            kind,
        }
    }

    pub(crate) fn message(
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
                incarnation: self.incarnation(),
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
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) fn closed_error(&self) -> SendError {
        if self.is_stopping() {
            SendError::Shutdown
        } else {
            SendError::Disconnected
        }
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
        let frame = self.message(
            self.next_seq(),
            Target::Node(requester.clone()),
            self.service_name(service),
            kind,
            body,
        );
        self.enqueue(frame, deadline).await
    }

    /// Fails everything pending and closes inboxes; idempotent.
    pub(crate) fn close(&self, error: &SendError) {
        let done = self.tracker().fail_all(error);
        for (w, c) in done {
            let _ = w.tx.send(c);
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
    /// Set once the outcome arrived: the tracker let go of the message
    /// then, so dropping this handle has nothing to cancel.
    settled: bool,
}

impl Pending {
    pub(crate) fn new(
        inner: Arc<Inner>,
        seq: u64,
        deadline: Instant,
        rx: oneshot::Receiver<Completion>,
        slot: Slot<'_>,
    ) -> Pending {
        // Given back when this handle drops.
        slot.keep();
        Pending {
            inner,
            seq,
            deadline,
            rx: Some(rx),
            settled: false,
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
        // An unsettled message stops being tracked (and resent); what it
        // held is freed after the lock is let go.
        if !self.settled {
            let cancelled = self.inner.tracker().cancel(self.seq);
            drop(cancelled);
        }
        self.inner.in_flight.give_back();
    }
}

/// Bounds the acknowledged messages awaiting an outcome
/// (`node.max_in_flight`): a count, and a wait for room. A semaphore takes
/// its lock on every release; here a release is one atomic operation
/// unless someone waits.
#[derive(Debug)]
pub(crate) struct InFlight {
    used: AtomicUsize,
    max: usize,
    /// Senders waiting for room.
    waiting: AtomicUsize,
    room: Notify,
}

impl InFlight {
    fn new(max: usize) -> Self {
        InFlight {
            used: AtomicUsize::new(0),
            max: max.max(1),
            waiting: AtomicUsize::new(0),
            room: Notify::new(),
        }
    }

    /// A place if one is free now.
    pub(crate) fn try_take(&self) -> Option<Slot<'_>> {
        // Sequentially consistent throughout: a waiter counts itself, then
        // looks here; a place given back is counted, then the waiters
        // looked at (see `InFlight::take`).
        let mut used = self.used.load(Ordering::SeqCst);
        loop {
            if used >= self.max {
                return None;
            }
            match self.used.compare_exchange_weak(
                used,
                used + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Some(Slot(self)),
                Err(now) => used = now,
            }
        }
    }

    /// A place, waiting for one.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled wait takes no place and is no longer
    /// counted as waiting.
    pub(crate) async fn take(&self) -> Slot<'_> {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Counted before looking, so a place given back after the
            // look finds this waiter (both sequentially consistent); and
            // uncounted however the wait ends, cancelled included.
            let _counted = Waiting::count(&self.waiting);
            if let Some(slot) = self.try_take() {
                return slot;
            }
            notified.await;
        }
    }

    /// Gives a place back.
    fn give_back(&self) {
        self.used.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_one();
        }
    }
}

/// Orders acknowledged sends through the message server: held while a
/// message takes its number and is queued (and while a reconnect resends),
/// so that the wire order is the number order. A tokio mutex takes its
/// semaphore's lock on every release; here taking and giving back are one
/// atomic operation each unless someone waits. A task that only tries
/// ([`OrderLock::try_lock`]) never goes before one that waits, so a task
/// sending in a loop cannot keep a waiter out.
#[derive(Debug, Default)]
pub(crate) struct OrderLock {
    locked: std::sync::atomic::AtomicBool,
    /// Tasks waiting for the lock.
    waiting: AtomicUsize,
    free: Notify,
}

impl OrderLock {
    /// The lock if it is free now and nobody waits for it.
    pub(crate) fn try_lock(&self) -> Option<Order<'_>> {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return None;
        }
        self.grab()
    }

    fn grab(&self) -> Option<Order<'_>> {
        self.locked
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Order(self))
    }

    /// The lock, waiting for it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled wait holds nothing and is no longer
    /// counted as waiting.
    pub(crate) async fn lock(&self) -> Order<'_> {
        loop {
            let notified = self.free.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Counted before looking, so a release after the look finds
            // this waiter (both sequentially consistent); uncounted however
            // the wait ends.
            let _counted = Waiting::count(&self.waiting);
            if let Some(order) = self.grab() {
                return order;
            }
            notified.await;
        }
    }
}

/// [`OrderLock`] held; given back when dropped.
#[derive(Debug)]
pub(crate) struct Order<'a>(&'a OrderLock);

impl Drop for Order<'_> {
    fn drop(&mut self) {
        self.0.locked.store(false, Ordering::SeqCst);
        if self.0.waiting.load(Ordering::SeqCst) > 0 {
            self.0.free.notify_one();
        }
    }
}

/// One sender counted in [`InFlight::waiting`] (or [`OrderLock`]'s) while
/// it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A place taken in [`InFlight`]; given back when dropped, unless a
/// [`Pending`] keeps it.
#[derive(Debug)]
pub(crate) struct Slot<'a>(&'a InFlight);

impl Slot<'_> {
    /// Keeps the place taken: its [`Pending`] gives it back.
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.give_back();
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
    if inner.stopping.swap(true, Ordering::SeqCst) {
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
        if !self.inner.link_up.load(Ordering::SeqCst) {
            return None;
        }
        let index = self.inner.server_index.load(Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls once: whether it is still pending.
    fn pending<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker))
            .is_pending()
    }

    #[tokio::test]
    async fn in_flight_places_are_bounded_waited_for_and_given_back() {
        let places = InFlight::new(2);
        let a = places.try_take().expect("first");
        let b = places.try_take().expect("second");
        assert!(places.try_take().is_none(), "two at most");
        // A waiter that gives up is no longer counted.
        {
            let gave_up = places.take();
            tokio::pin!(gave_up);
            assert!(pending(gave_up.as_mut()));
            assert_eq!(places.waiting.load(Ordering::SeqCst), 1);
        }
        assert_eq!(places.waiting.load(Ordering::SeqCst), 0);
        let waiter = places.take();
        tokio::pin!(waiter);
        assert!(pending(waiter.as_mut()));
        drop(a);
        let c = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("woken when a place is given back");
        assert!(places.try_take().is_none(), "b and c hold both");
        // A kept place is given back by hand (as a `Pending` does).
        c.keep();
        assert_eq!(places.used.load(Ordering::SeqCst), 2);
        places.give_back();
        drop(b);
        assert_eq!(places.used.load(Ordering::SeqCst), 0);
        assert_eq!(places.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_order_lock_excludes_and_lets_waiters_go_first() {
        let lock = OrderLock::default();
        let held = lock.try_lock().expect("free");
        assert!(lock.try_lock().is_none(), "held");
        // A waiter that gives up is no longer counted.
        {
            let gave_up = lock.lock();
            tokio::pin!(gave_up);
            assert!(pending(gave_up.as_mut()));
            assert_eq!(lock.waiting.load(Ordering::SeqCst), 1);
        }
        assert_eq!(lock.waiting.load(Ordering::SeqCst), 0);
        let waiter = lock.lock();
        tokio::pin!(waiter);
        assert!(pending(waiter.as_mut()));
        drop(held);
        // Free, but a waiter goes first: trying does not take it.
        assert!(lock.try_lock().is_none(), "the waiter goes first");
        let order = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("woken when the lock is given back");
        assert!(lock.try_lock().is_none(), "the waiter holds it");
        drop(order);
        assert!(lock.try_lock().is_some(), "free again");
        assert_eq!(lock.waiting.load(Ordering::SeqCst), 0);
    }

    /// Many tasks on two threads, taking the lock by trying, by waiting,
    /// and by waits that time out: never two inside at once, and every
    /// task gets through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_order_lock_holds_under_contention() {
        use std::sync::atomic::AtomicBool;
        const TASKS: usize = 8;
        const ROUNDS: usize = 2_000;
        let lock = Arc::new(OrderLock::default());
        let inside = Arc::new(AtomicBool::new(false));
        let entered = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (lock, inside, entered) = (lock.clone(), inside.clone(), entered.clone());
            tasks.push(tokio::spawn(async move {
                for round in 0..ROUNDS {
                    let order = match (t + round) % 3 {
                        0 => match lock.try_lock() {
                            Some(order) => order,
                            None => lock.lock().await,
                        },
                        1 => {
                            let short = std::time::Duration::from_micros(50);
                            match tokio::time::timeout(short, lock.lock()).await {
                                Ok(order) => order,
                                Err(_) => lock.lock().await,
                            }
                        }
                        _ => lock.lock().await,
                    };
                    assert!(!inside.swap(true, Ordering::SeqCst), "two inside");
                    entered.fetch_add(1, Ordering::SeqCst);
                    if round % 5 == 0 {
                        tokio::task::yield_now().await;
                    }
                    inside.store(false, Ordering::SeqCst);
                    drop(order);
                }
            }));
        }
        for task in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(60), task)
                .await
                .expect("no task stuck")
                .expect("no panic");
        }
        assert_eq!(entered.load(Ordering::SeqCst), TASKS * ROUNDS);
        assert_eq!(lock.waiting.load(Ordering::SeqCst), 0);
    }
}
