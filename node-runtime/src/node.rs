//! The node handle the application holds, and the handle of a message on
//! its way.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cluster_config::Config;
use cluster_manager::{Completion, DeliveryReport, SendError};
use tokio::sync::{mpsc, oneshot};
use transports::protocol::{DeadReason, Header, MemberInfo, MessageKind, NodeId, Target};
use transports::{Lane, OutFrame, Wait};

use crate::connection::pump;
use crate::counters::PathCounters;
use crate::inbox::Inbox;
use crate::inbox::Message;
use crate::membership::MembershipEvents;
use crate::options::{AckMode, SendOptions, Stamp, SubscribeOptions};
use crate::processors::{HandlerResult, ServeOptions, Serving};
use crate::runtime::Runtime;
use crate::services::{ServiceQueue, WhenFull};

pub use crate::pending::Pending;
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

/// Shuts the node down when the last [`Node`] handle is dropped.
#[derive(Debug)]
struct DropGuard {
    rt: Runtime,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        begin_shutdown(&self.rt);
    }
}

fn begin_shutdown(rt: &Runtime) {
    if rt.core.begin_stopping() {
        return;
    }
    rt.cancel.cancel();
    // The writer stops after writing the goodbye; if it cannot be queued,
    // stop the writer at once.
    if rt
        .server
        .queue
        .try_push(OutFrame::control(Header::Goodbye), Lane::Control)
        .is_err()
    {
        rt.server.queue.close();
    }
    rt.close(&SendError::Shutdown);
    rt.tasks.close();
}

/// A service name an application may subscribe: a valid name
/// ([`NodeError::InvalidName`]) outside the runtime's own
/// ([`NodeError::Reserved`]).
pub(crate) fn check_service_name(service: &str) -> Result<(), NodeError> {
    if !transports::protocol::valid_name(service) {
        return Err(NodeError::invalid_name("service", service));
    }
    if service.starts_with(crate::tune::RESERVED_SERVICE_PREFIX) {
        return Err(NodeError::Reserved(service.to_owned()));
    }
    Ok(())
}

/// Opens `service`'s inbox on this node: `capacity` messages in it and as
/// many waiting in its backlog, drained by its pump. The caller tells the
/// message server (a subscription, or the registration's services).
///
/// # Errors
///
/// [`NodeError::AlreadySubscribed`] if the service has a live inbox here.
pub(crate) fn open_inbox(
    rt: &Runtime,
    service: &str,
    capacity: usize,
    when_full: WhenFull,
    ack: AckMode,
) -> Result<Inbox, NodeError> {
    // The application's services make the node busy; the built-in ones
    // (refused at once when full) never do.
    let busy = (when_full == WhenFull::Wait).then(|| rt.busy.clone());
    let (tx, rx) = crate::inbox::inbox(service, capacity, busy, Some(rt.filer()));
    let (delivery_tx, delivery_rx) = mpsc::channel(capacity);
    let delivery_tx_for_replay = delivery_tx.clone();
    let backlog: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
    let name: Arc<str> = Arc::from(service);
    {
        let mut inboxes = rt
            .services
            .inboxes
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if inboxes.get(service).is_some_and(|s| !s.is_closed()) {
            return Err(NodeError::AlreadySubscribed(service.to_owned()));
        }
        inboxes.insert(
            name.clone(),
            ServiceQueue {
                tx: delivery_tx.clone(),
                inbox: tx.clone(),
                backlog: backlog.clone(),
                congested: Arc::default(),
                when_full,
                on_processed: ack == AckMode::OnProcessed,
            },
        );
        rt.services.generation.fetch_add(1, Ordering::AcqRel);
    }
    if rt.replaying(service) {
        rt.tasks.spawn(rt.clone().replay(
            service.to_owned(),
            delivery_tx_for_replay,
            backlog.clone(),
        ));
    }
    rt.tasks
        .spawn(pump(rt.clone(), name, delivery_rx, tx, backlog));
    Ok(rx)
}

/// A running cluster node: the handle an application server embeds.
///
/// Cheap to clone; the node shuts down cleanly (telling the message server
/// it is a planned stop) when [`Node::shutdown`] is called or the last
/// handle is dropped.
#[derive(Debug, Clone)]
pub struct Node {
    rt: Runtime,
    _guard: Arc<DropGuard>,
    pub(crate) monitor_addr: Option<std::net::SocketAddr>,
    /// The inboxes of the services offered from the start
    /// ([`crate::NodeBuilder::subscribe`]), until taken.
    pub(crate) offered: Arc<std::sync::Mutex<std::collections::HashMap<String, Inbox>>>,
}

impl Node {
    pub(crate) fn from_runtime(rt: Runtime) -> Node {
        Node {
            _guard: Arc::new(DropGuard { rt: rt.clone() }),
            rt,
            monitor_addr: None,
            offered: Arc::default(),
        }
    }

    /// The inbox of `service`, offered from the start with
    /// [`crate::NodeBuilder::subscribe`]: once (`None` after, and for a
    /// service not offered that way). Its messages are delivered from the
    /// start, and wait in it until it is taken.
    pub fn take_inbox(&self, service: &str) -> Option<Inbox> {
        self.offered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(service)
    }

    /// This node's id.
    pub fn id(&self) -> &NodeId {
        &self.rt.id
    }

    /// This node's incarnation: a fresh number each start.
    pub fn incarnation(&self) -> u64 {
        self.rt.incarnation()
    }

    /// The configuration in force for this node (its `[nodes.<id>]` section
    /// merged in).
    pub fn config(&self) -> &Config {
        &self.rt.config
    }

    /// The largest body this node may send (`limits.max_message_bytes`);
    /// larger ones fail with `PayloadTooLarge` before anything is sent.
    pub fn max_message_bytes(&self) -> u64 {
        self.rt.config.limits.max_message_bytes
    }

    /// The largest body the message-server path carries (the smaller of the
    /// server's and this node's limits); larger bodies need a lazy channel.
    pub fn server_max_message_bytes(&self) -> u64 {
        self.rt.server.max_message
    }

    /// The message server this node is registered with now (an entry of
    /// `message_server.addresses`), or `None` while it is reconnecting.
    pub fn message_server(&self) -> Option<String> {
        let index = self.rt.core.lock().link().index()?;
        self.rt.config.message_server.addresses.get(index).cloned()
    }

    /// The address this node announced for direct channels.
    pub fn direct_addr(&self) -> Option<std::net::SocketAddr> {
        self.rt.server.hello().direct_addr
    }

    /// Whether this node is busy: one of its service inboxes reached
    /// `node.busy_upper` messages and not all have fallen to
    /// `node.busy_lower` since. The other members see it in
    /// [`MemberInfo::busy`](crate::MemberInfo).
    pub fn is_busy(&self) -> bool {
        self.rt.busy.is_busy()
    }

    /// Where this node serves its own metrics (`http://ADDR/metrics`), as
    /// bound from `node.monitor_listen`; `None` when it is not set.
    pub fn monitor_addr(&self) -> Option<std::net::SocketAddr> {
        self.monitor_addr
    }

    /// What this node sent on each path, and what became of its direct
    /// channels.
    pub fn counters(&self) -> PathCounters {
        self.rt.counters.snapshot()
    }

    /// Starts offering `service` and returns its inbox. Resolves once the
    /// message server knows, so a send made afterwards by any node finds it.
    ///
    /// # Errors
    ///
    /// [`NodeError::InvalidName`] for an empty or overlong name;
    /// [`NodeError::Reserved`] for a name starting with `clustercomm.`
    /// (the built-in services', see [`crate::tune`]);
    /// [`NodeError::AlreadySubscribed`] if the service has a live inbox here;
    /// [`NodeError::NotPermitted`] if this node's `permissions.subscribe`
    /// does not include it; [`NodeError::Timeout`] or
    /// [`NodeError::Disconnected`] if the message server did not confirm.
    pub async fn subscribe(&self, service: &str) -> Result<Inbox, NodeError> {
        self.subscribe_with(service, &SubscribeOptions::default())
            .await
    }

    /// [`Node::subscribe`] with `options`: with
    /// `AckMode::OnProcessed`, a `send` to the service is acknowledged
    /// only when the application calls [`Message::ack`] (or refused with
    /// [`Message::reject`], or by dropping the message unacknowledged).
    ///
    /// # Errors
    ///
    /// As [`Node::subscribe`].
    pub async fn subscribe_with(
        &self,
        service: &str,
        options: &SubscribeOptions,
    ) -> Result<Inbox, NodeError> {
        check_service_name(service)?;
        let rt = &self.rt;
        let capacity = rt.config.node.inbox_capacity;
        let rx = open_inbox(rt, service, capacity, WhenFull::Wait, options.ack)?;
        let token = rt.server.next_token();
        let (done_tx, done_rx) = oneshot::channel();
        rt.server
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, done_tx);
        let frame = OutFrame::control(Header::Subscribe {
            token,
            service: service.to_owned(),
        });
        let timeout = rt.config.send_timeout();
        let confirmed = tokio::time::timeout(timeout, async {
            rt.server
                .queue
                .push(frame, Lane::Control, Wait::Forever)
                .await
                .map_err(|_| NodeError::Disconnected)?;
            done_rx.await.map_err(|_| NodeError::Disconnected)
        })
        .await;
        match confirmed {
            Ok(Ok(Ok(()))) => Ok(rx),
            Ok(Ok(Err(reason))) => {
                // Refused: the inbox is not kept.
                let mut inboxes = rt
                    .services
                    .inboxes
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                inboxes.remove(service);
                rt.services.generation.fetch_add(1, Ordering::AcqRel);
                Err(NodeError::NotPermitted(reason))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                rt.server
                    .subscriptions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&token);
                Err(NodeError::Timeout(timeout))
            }
        }
    }

    /// Offers `service` and handles its messages with `handler` on
    /// `node.processor_concurrency` processors: messages of one sender in
    /// order, at most `node.max_in_a_row` of one sender in a row while
    /// others wait (see [`crate::processors`]). The handler answers
    /// requests itself (`reply`, `reply_err`); one it lets go of unanswered
    /// is answered `NoReply`. Serving ends when the returned handle is
    /// dropped or the node stops.
    ///
    /// ```no_run
    /// # async fn f(node: node_runtime::Node) -> Result<(), node_runtime::NodeError> {
    /// let serving = node
    ///     .serve("orders", |m: node_runtime::Message| async move {
    ///         if m.is_request() {
    ///             m.reply("done").await?;
    ///         }
    ///         Ok(())
    ///     })
    ///     .await?;
    /// # drop(serving); Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Node::subscribe`].
    pub async fn serve<F, Fut>(&self, service: &str, handler: F) -> Result<Serving, NodeError>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = HandlerResult> + Send + 'static,
    {
        self.serve_with(service, &ServeOptions::default(), handler)
            .await
    }

    /// [`Node::serve`] with `options`: this service's own number of
    /// processors and `max_in_a_row`.
    ///
    /// # Errors
    ///
    /// As [`Node::subscribe`].
    pub async fn serve_with<F, Fut>(
        &self,
        service: &str,
        options: &ServeOptions,
        handler: F,
    ) -> Result<Serving, NodeError>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = HandlerResult> + Send + 'static,
    {
        let subscribe = SubscribeOptions::new().ack(options.ack_mode());
        let inbox = self.subscribe_with(service, &subscribe).await?;
        let (processors, max_in_a_row) = options.resolve(&self.rt.config);
        Ok(crate::processors::start(
            &self.rt,
            inbox,
            processors,
            max_in_a_row,
            handler,
        ))
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
        self.send_with(target, service, body, &SendOptions::default())
            .await
    }

    /// [`Node::send`] with `options`: its own timeout, priority, time to
    /// live ([`SendOptions::ttl`]), retry policy ([`SendOptions::retry`]),
    /// or recoverable.
    ///
    /// A message whose target is gone (`UnknownTarget`, or
    /// `TargetStopped` before it left), whose retries ran out, or that
    /// expired here, goes to the message server's dead-letter queue
    /// ([`Node::dead_letters`]) as well as failing the send.
    ///
    /// # Errors
    ///
    /// As [`Node::send`]; [`SendError::Expired`] when its time to live ran
    /// out first.
    pub async fn send_with(
        &self,
        target: Target,
        service: &str,
        body: impl Into<Bytes>,
        options: &SendOptions,
    ) -> Result<DeliveryReport, SendError> {
        self.send_filing(target, service, body.into(), options, true)
            .await
    }

    /// [`Node::send_with`]; a message given up is dead-lettered only if
    /// `file` (a replay of a dead letter leaves its entry instead).
    pub(crate) async fn send_filing(
        &self,
        target: Target,
        service: &str,
        body: Bytes,
        options: &SendOptions,
        file: bool,
    ) -> Result<DeliveryReport, SendError> {
        if options.is_recoverable() || self.rt.config.service_recoverable(service) {
            // `submit_with` takes it; its store sends it again.
            return self
                .submit_with(target, service, body, options)
                .await?
                .outcome()
                .await;
        }
        let timeout = options.timeout_or(self.rt.config.send_timeout());
        // One expiry for every attempt.
        let stamp = options.stamp(&self.rt.config, service);
        let policy = options.retry_policy();
        let mut attempt = 1u32;
        loop {
            if stamp
                .expires_ms
                .is_some_and(|at| at <= crate::options::unix_ms())
            {
                if file {
                    self.give_up(&target, service, &stamp, DeadReason::Expired, body);
                }
                self.rt.counters.expired.fetch_add(1, Ordering::Relaxed);
                return Err(SendError::Expired { target });
            }
            let outcome = match self
                .rt
                .submit(
                    target.clone(),
                    service,
                    body.clone(),
                    MessageKind::Send,
                    stamp,
                    timeout,
                )
                .await
            {
                Ok(pending) => pending.outcome().await,
                Err(e) => Err(Runtime::with_timeout(e, timeout)),
            };
            let error = match outcome {
                Ok(report) => return Ok(report),
                Err(e) => e,
            };
            if let Some(policy) = policy.filter(|_| retryable(&error)) {
                if let Some(delay) = policy.delay_before(attempt + 1) {
                    tracing::debug!(attempt, ?delay, error = %error, "send failed; retrying after the policy's delay");
                    attempt += 1;
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = self.rt.cancel.cancelled() => return Err(SendError::Shutdown),
                    }
                }
                let reason = DeadReason::RetriesExhausted {
                    attempts: attempt,
                    last: crate::dead_letters::failure_of(&error),
                };
                if file {
                    self.give_up(&target, service, &stamp, reason, body);
                }
                return Err(error);
            }
            if let Some(reason) =
                crate::dead_letters::sender_files(MessageKind::Send, &error).filter(|_| file)
            {
                self.give_up(&target, service, &stamp, reason, body);
            }
            return Err(error);
        }
    }

    /// Files a message this node gave up on as a dead letter.
    fn give_up(
        &self,
        target: &Target,
        service: &str,
        stamp: &crate::options::Stamp,
        reason: DeadReason,
        body: Bytes,
    ) {
        let priority = stamp
            .priority
            .unwrap_or_else(|| self.rt.config.service_priority(service));
        self.rt.file_dead_letter(crate::dead_letters::GivenUp {
            sender: &self.rt.id,
            target,
            service,
            priority,
            reason,
            body,
        });
    }

    /// Recoverable messages this node sent that its receivers have not
    /// acknowledged yet (they are in its store, and sent again until they
    /// are).
    pub fn recoverable_unacknowledged(&self) -> usize {
        self.rt.recovery.as_ref().map_or(0, |r| r.held())
    }

    /// How many recoverable messages to `receiver` this node's store has
    /// taken, ever (the position of its stream to `receiver`; it survives
    /// restarts). An application that numbers its messages to a receiver
    /// goes on from here after a crash: a message whose `send` or `submit`
    /// did not return before the crash is counted if and only if it was
    /// stored, and then it is delivered.
    pub fn recoverable_sent(&self, receiver: &NodeId) -> u64 {
        self.rt
            .recovery
            .as_ref()
            .map_or(0, |r| r.next(receiver).saturating_sub(1))
    }

    /// Sends a body of `len` bytes read from `source` to one node's
    /// `service` as a stream: it travels over the lazy channel to the node
    /// in chunks (`limits.chunk_bytes`) as the receiving application reads
    /// it ([`crate::Message::body_stream`]), so that memory on either end
    /// stays within the stream's window (`limits.stream_window_bytes`)
    /// whatever `len` is. Not bound by `limits.max_message_bytes`; by
    /// `limits.max_stream_bytes` if set.
    ///
    /// If the channel breaks midway while the receiver is still a member,
    /// the stream resumes on a new channel from what the receiver holds.
    /// Resolves once the receiving application has read the whole body;
    /// the receiver sees the whole body, in order and once, or an error.
    ///
    /// # Errors
    ///
    /// [`SendError::InvalidTarget`] for a target other than `Node`;
    /// `UnknownTarget` if it is not a member; `PayloadTooLarge` past
    /// `limits.max_stream_bytes`; [`SendError::StreamFailed`] if the
    /// receiver refused or gave it up, `source` failed or ended before
    /// `len` bytes, or no channel could be opened; `TargetStopped` if the
    /// receiver left midway; `Timeout` if the stream made no progress for
    /// the send timeout; `Shutdown`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the stream: its receiver's read ends
    /// in an error once it stalls.
    pub async fn send_stream<R: tokio::io::AsyncRead + Unpin>(
        &self,
        target: Target,
        service: &str,
        source: R,
        len: u64,
    ) -> Result<(), SendError> {
        self.send_stream_with(target, service, source, len, &SendOptions::default())
            .await
    }

    /// [`Node::send_stream`] with `options`: its priority, and its timeout
    /// (how long the stream may go without progress).
    ///
    /// # Errors
    ///
    /// As [`Node::send_stream`].
    pub async fn send_stream_with<R: tokio::io::AsyncRead + Unpin>(
        &self,
        target: Target,
        service: &str,
        source: R,
        len: u64,
        options: &SendOptions,
    ) -> Result<(), SendError> {
        let Target::Node(peer) = target else {
            return Err(SendError::InvalidTarget(target));
        };
        if !transports::protocol::valid_name(service) {
            return Err(SendError::InvalidName(service.to_owned()));
        }
        let priority = options
            .given_priority()
            .unwrap_or_else(|| self.rt.config.service_priority(service));
        let idle = options.timeout_or(self.rt.config.send_timeout());
        let out = crate::stream::Outgoing {
            peer,
            service,
            source,
            len,
            priority,
            idle,
        };
        crate::stream::send(&self.rt, out).await
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
        self.submit_with(target, service, body, &SendOptions::default())
            .await
    }

    /// [`Node::submit`] with `options`.
    ///
    /// # Errors
    ///
    /// As [`Node::submit`].
    pub async fn submit_with(
        &self,
        target: Target,
        service: &str,
        body: impl Into<Bytes>,
        options: &SendOptions,
    ) -> Result<Pending, SendError> {
        let timeout = options.timeout_or(self.rt.config.send_timeout());
        if options.is_recoverable() || self.rt.config.service_recoverable(service) {
            return self
                .rt
                .submit_recoverable(
                    target,
                    service,
                    body.into(),
                    options.stamp(&self.rt.config, service),
                    options.retry_policy(),
                    timeout,
                )
                .await;
        }
        self.rt
            .submit(
                target,
                service,
                body.into(),
                MessageKind::Send,
                options.stamp(&self.rt.config, service),
                timeout,
            )
            .await
            .map_err(|e| Runtime::with_timeout(e, timeout))
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
        // The service's retention, if it has one.
        let stamp = SendOptions::default().stamp(&self.rt.config, service);
        self.rt
            .notify(target, service, body.into(), None, stamp)
            .await
    }

    /// [`Node::notify`] with `options`.
    ///
    /// # Errors
    ///
    /// As [`Node::notify`].
    pub async fn notify_with(
        &self,
        target: Target,
        service: &str,
        body: impl Into<Bytes>,
        options: &SendOptions,
    ) -> Result<(), SendError> {
        if options.is_recoverable() {
            return Err(SendError::NotRecoverable {
                reason: "a one-way message is never recoverable: use send_with".into(),
            });
        }
        let stamp = options.stamp(&self.rt.config, service);
        match options.given_timeout() {
            None => {
                self.rt
                    .notify(target, service, body.into(), None, stamp)
                    .await
            }
            Some(t) => self
                .rt
                .notify(
                    target,
                    service,
                    body.into(),
                    Some(tokio::time::Instant::now() + t),
                    stamp,
                )
                .await
                .map_err(|e| Runtime::with_timeout(e, t)),
        }
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
        self.rt.session(target, service, body.into()).await
    }

    /// Sends a request to one node (`Node` or `AnyOf`) and awaits its reply.
    ///
    /// # Errors
    ///
    /// `InvalidTarget` for `Group` and `All`; [`SendError::Remote`] when
    /// the receiver answered with `reply_err`; [`SendError::NoReply`] at
    /// once when it dropped the request without replying;
    /// `TargetStopped` when it stopped or failed first (within the
    /// failure timeout); `Timeout` when no answer came in time; otherwise
    /// as [`Node::send`].
    pub async fn request(
        &self,
        target: Target,
        service: &str,
        body: impl Into<Bytes>,
    ) -> Result<Reply, SendError> {
        self.request_with(target, service, body, &SendOptions::default())
            .await
    }

    /// [`Node::request`] with `options` (its own timeout, for one).
    ///
    /// # Errors
    ///
    /// As [`Node::request`].
    pub async fn request_with(
        &self,
        target: Target,
        service: &str,
        body: impl Into<Bytes>,
        options: &SendOptions,
    ) -> Result<Reply, SendError> {
        if matches!(target, Target::Group(_) | Target::All) {
            return Err(SendError::InvalidTarget(target));
        }
        if options.is_recoverable() {
            return Err(SendError::NotRecoverable {
                reason: "a request is never recoverable: use send_with".into(),
            });
        }
        let timeout = options.timeout_or(self.rt.config.send_timeout());
        let pending = self
            .rt
            .submit(
                target,
                service,
                body.into(),
                MessageKind::Request,
                Stamp::priority(options.given_priority()),
                timeout,
            )
            .await
            .map_err(|e| Runtime::with_timeout(e, timeout))?;
        match pending.completion().await? {
            Completion::Replied { from, body } => Ok(Reply { from, body }),
            Completion::Failed(e) => Err(e),
            Completion::Delivered(_) => Err(SendError::Disconnected),
        }
    }

    /// The current members of the cluster, this node included.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.rt.core.lock().members().snapshot()
    }

    /// How many members the cluster has, this node included, without
    /// copying them (as [`Node::members`] does).
    pub fn member_count(&self) -> usize {
        self.rt.core.lock().members().len()
    }

    /// Whether `id` is a member, as this node knows.
    pub fn is_member(&self, id: &str) -> bool {
        self.rt.core.lock().members().get(id).is_some()
    }

    /// A stream of membership changes from now on.
    pub fn membership_events(&self) -> MembershipEvents {
        // Subscribed under the core's lock, so that no change falls
        // between the subscription and the core's reporting it.
        let mut core = self.rt.core.lock();
        let events = self.rt.members.subscribe();
        core.set_membership_reporting(true);
        events
    }

    /// How many receivers missed a message that nobody was waiting on: a
    /// `notify` that could not be routed or queued (unknown target, no such
    /// service, receiver overloaded), or a send whose caller stopped
    /// waiting. Each is also logged at `warn`.
    pub fn late_failures(&self) -> u64 {
        self.rt.counters.late_failures.load(Ordering::Relaxed)
    }

    /// Asks the message server for a trace: the headers (and, with
    /// `request.bodies`, the first bytes of the bodies) of the messages it
    /// routes that match `request`'s filter, until `request.max_messages`
    /// were captured or `request.duration_ms` passed. A trace asked for
    /// before replaces this node's earlier one. It ends with
    /// [`TraceEvent::End`]; the server refuses it (an `End` saying why)
    /// when this node's `permissions.trace` is false. Messages over
    /// direct channels never pass the server and are not traced.
    ///
    /// # Errors
    ///
    /// [`NodeError::Disconnected`] if the request could not be queued.
    pub async fn trace(
        &self,
        request: transports::protocol::TraceRequest,
    ) -> Result<crate::Trace, NodeError> {
        let (sink, trace) = crate::trace::trace();
        *self
            .rt
            .server
            .trace
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(sink);
        let frame = OutFrame::control(Header::Trace(Box::new(request)));
        self.rt
            .server
            .queue
            .push(frame, Lane::Control, Wait::Forever)
            .await
            .map_err(|_| NodeError::Disconnected)?;
        Ok(trace)
    }

    /// The message server's dead-letter queue: browse it, take entries out
    /// and replay them (see [`crate::dead_letters`]).
    pub fn dead_letters(&self) -> crate::DeadLetters {
        crate::DeadLetters::new(self.clone())
    }

    /// The runtime behind this handle.
    pub(crate) fn runtime(&self) -> &Runtime {
        &self.rt
    }

    /// A Prometheus registry holding this node's metrics (see
    /// [`Node::register_metrics`]), to encode with
    /// `prometheus_client::encoding::text::encode`.
    pub fn metrics(&self) -> prometheus_client::registry::Registry {
        let mut registry = prometheus_client::registry::Registry::default();
        self.register_metrics(&mut registry);
        registry
    }

    /// Adds this node's metrics to an application's own registry:
    /// `clustercomm_node_*` counters of what it sent and received on each
    /// path, its direct channels and refusals, and gauges of members,
    /// pending messages and open channels, each sample labelled with the
    /// node's id. They are read live when the registry is encoded, and
    /// hold no reference that keeps the node running.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(crate::metrics::NodeCollector::new(
            self.rt.clone(),
        )));
    }

    /// Acknowledged messages and requests still waiting for an outcome.
    pub fn pending(&self) -> usize {
        self.rt.core.lock().tracker().len()
    }

    /// Stops the node: tells the message server it is a planned stop, fails
    /// what is still pending with `Shutdown`, closes the inboxes, and waits
    /// up to [`SHUTDOWN_GRACE`] for the node's tasks.
    pub async fn shutdown(self) {
        begin_shutdown(&self.rt);
        if tokio::time::timeout(SHUTDOWN_GRACE, self.rt.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(node = %self.rt.id, "node tasks did not stop within the grace period");
        }
    }
}

/// Whether a failed send may be tried again by a retry policy: only a
/// definite failure that may pass (a busy, overloaded, absent or stopped
/// receiver), never one that may have been delivered.
fn retryable(error: &SendError) -> bool {
    matches!(
        error,
        SendError::Busy { .. }
            | SendError::Overloaded { .. }
            | SendError::UnknownTarget(_)
            | SendError::TargetStopped {
                in_flight: false,
                ..
            }
    )
}
