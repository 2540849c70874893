//! The cluster manager's driver: for each message, gather the facts, let
//! [`cluster_manager::path::choose`] pick the path, and carry it out:
//! through the message server, over a lazy channel, or fanned out over one
//! lazy channel per member. Falls back to the message server when a channel
//! cannot be opened and the body fits there; otherwise fails clearly.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cluster_manager::core::{self, Outgoing};
use cluster_manager::path::{self, Fallback};
use cluster_manager::{Awaiting, Completion, SendError};
use tokio::sync::oneshot;
use tokio::time::Instant;
use transports::protocol::{Header, MessageKind, NodeId, Priority, Target, TargetRef};
use transports::{Lane, OutFrame, PushError, Wait};

use crate::channels::DirectConn;
use crate::counters::Counters;
use crate::direct::get_or_open;
use crate::fair::ShareTimeout;
use crate::options::Stamp;
use crate::pending::{byte_units, Pending, Places};
use crate::runtime::Runtime;
use cluster_manager::channels::ChannelKind;
use cluster_manager::tracker::Resend;

/// Where one message goes.
enum Route {
    Server,
    Direct(Arc<DirectConn>),
    /// The members, and the deadline the send keeps to.
    FanOut(Vec<NodeId>, Instant),
}

/// A route, and the number (of the incarnation) the message takes on it;
/// none yet for an acknowledged send through the message server.
struct Numbered {
    route: Route,
    seq: Option<u64>,
    incarnation: u64,
}

/// The busy member that holds back a message from `me` to `target`'s
/// `service`, if any (looked for only while some member is busy).
fn busy_blocker(
    members: &cluster_manager::members::Members,
    me: &NodeId,
    target: &Target,
    service: &str,
) -> Option<NodeId> {
    if members.busy_count() > 0 {
        members.busy_blocker(me, target, service)
    } else {
        None
    }
}

/// What a send does when its receiver is busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IfBusy {
    /// Waits for it to drain (see `Runtime::wait_not_busy`).
    Wait,
    /// Fails `Busy` at once (the waiting itself asks).
    Fail,
    /// Goes on as if it were not (an Express message).
    Pass,
}

/// A message waiting for its target's share of the queue to the message
/// server.
struct Turn<'a> {
    /// Its target, as the queue's shares know it.
    key: TargetRef<'a>,
    /// Its priority: each has a queue, and so shares, of its own.
    priority: Priority,
    /// Its body's length.
    len: usize,
    target: &'a Target,
    service: &'a str,
}

/// A message addressed to one receiver at a time.
struct OneByOne<'a> {
    seq: u64,
    incarnation: u64,
    service: &'a str,
    kind: MessageKind,
    priority: Priority,
    expires_ms: Option<u64>,
    body: Bytes,
}

impl Runtime {
    /// Picks the route of a message (opening a lazy channel if that is the
    /// path), and numbers it, unless it is `ordered` and goes through the
    /// message server (an acknowledged send takes its number there under
    /// the send order). `deadline` is the send's, if it took one already;
    /// a fan-out that has to ask the message server for its members takes
    /// one then.
    async fn route(
        &self,
        target: &Target,
        service: &str,
        body_len: u64,
        deadline: Option<Instant>,
        ordered: bool,
        busy: IfBusy,
    ) -> Result<Numbered, SendError> {
        let msg = Outgoing {
            target,
            service,
            body_len,
        };
        // Looked up before the core is locked: the channel pool is never
        // locked inside the core's lock.
        let lazy_open = match target {
            Target::Node(peer) => self.direct.get(peer, ChannelKind::Lazy).is_some(),
            _ => false,
        };
        // The clock is read only when auto-activation counts messages (the
        // only use the core has for the time of a send).
        let now = if self.config.lazy.auto_activate_messages > 0 {
            std::time::Instant::now()
        } else {
            self.started
        };
        let routed = {
            let mut core = self.core.lock();
            // Held back while its receiver is busy (see `wait_not_busy`).
            let blocker = match busy {
                IfBusy::Pass => None,
                IfBusy::Wait | IfBusy::Fail => {
                    busy_blocker(core.members(), &self.id, target, service)
                }
            };
            match blocker {
                Some(node) => Err(node),
                None => {
                    let route = core.handle_send(now, &msg, lazy_open)?;
                    let numbered_later = ordered && route == core::Route::Server;
                    let seq = (!numbered_later).then(|| core.next_seq());
                    Ok((route, seq, core.incarnation()))
                }
            }
        };
        let (route, seq, incarnation) = match routed {
            Ok(routed) => routed,
            Err(node) if busy == IfBusy::Fail => return Err(SendError::Busy { node }),
            // Boxed: the waiting is rare, and must not make every send's
            // future larger.
            Err(_) => {
                return Box::pin(self.wait_not_busy(target, service, body_len, deadline, ordered))
                    .await
            }
        };
        let route = match route {
            core::Route::Server => Route::Server,
            core::Route::Lazy(peer) => {
                match Box::pin(get_or_open(self, &peer, ChannelKind::Lazy)).await {
                    Ok(conn) => Route::Direct(conn),
                    Err(reason) => {
                        self.core
                            .lock()
                            .handle_open_failed(&peer, body_len, reason.to_string())?;
                        Route::Server
                    }
                }
            }
            core::Route::LazyFanOut => {
                let deadline = deadline.unwrap_or_else(|| self.deadline());
                let members = Box::pin(self.resolve(target, service, deadline)).await?;
                Route::FanOut(members, deadline)
            }
        };
        Ok(Numbered {
            route,
            seq,
            incarnation,
        })
    }

    /// What every send does first: check the body and the node, choose
    /// the route (keeping to `deadline` if the send took one already).
    async fn start_send(
        &self,
        target: &Target,
        service: &str,
        priority: Priority,
        body: &Bytes,
        deadline: Option<Instant>,
        ordered: bool,
    ) -> Result<Numbered, SendError> {
        // The size and the names are the core's to check (in `route`).
        if self.is_stopping() {
            return Err(SendError::Shutdown);
        }
        // Busy is a backlog of data: an Express message passes it, as it
        // passes data on every hop.
        let busy = if priority == Priority::Express {
            IfBusy::Pass
        } else {
            IfBusy::Wait
        };
        self.route(target, service, body.len() as u64, deadline, ordered, busy)
            .await
    }

    /// A busy receiver slows its senders: the send waits for it to drain
    /// (a membership event says so), up to its deadline, and is never
    /// dropped; at the deadline it fails `Busy`.
    async fn wait_not_busy(
        &self,
        target: &Target,
        service: &str,
        body_len: u64,
        deadline: Option<Instant>,
        ordered: bool,
    ) -> Result<Numbered, SendError> {
        let deadline = deadline.unwrap_or_else(|| self.deadline());
        loop {
            let changed = self.members.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self
                .route(
                    target,
                    service,
                    body_len,
                    Some(deadline),
                    ordered,
                    IfBusy::Fail,
                )
                .await
            {
                Err(SendError::Busy { node }) => {
                    let woken = tokio::select! {
                        () = changed => true,
                        () = self.cancel.cancelled() => return Err(SendError::Shutdown),
                        () = tokio::time::sleep_until(deadline) => false,
                    };
                    if !woken {
                        return Err(SendError::Busy { node });
                    }
                    self.still_member(target, node)?;
                }
                other => return other,
            }
        }
    }

    /// The number `numbered` took, or a new one (for the rare route that
    /// fell back from a channel to the message server after it was
    /// numbered, or was not numbered; never on the usual paths).
    fn number(&self, numbered: Option<u64>) -> u64 {
        numbered.unwrap_or_else(|| self.core.lock().next_seq())
    }

    /// A send's deadline, `send_timeout` from now. An acknowledged send
    /// takes it at once (its handle keeps it); a one-way send only when it
    /// has to wait, or fan out (most never do, and skip the clock).
    fn deadline(&self) -> Instant {
        Instant::now() + self.config.send_timeout()
    }

    /// The error a wait inside a send reports, with the send's own
    /// `timeout` (the waits inside report the config's).
    pub(crate) fn with_timeout(error: SendError, timeout: Duration) -> SendError {
        match error {
            SendError::Timeout { waiting_for, .. } => SendError::Timeout {
                after: timeout,
                waiting_for,
            },
            other => other,
        }
    }

    /// Queues an acknowledged message (or request) on its path; the handle
    /// awaits its outcome. Messages submitted one after another from one
    /// task go out in that order on each path.
    pub(crate) async fn submit(
        &self,
        target: Target,
        service: &str,
        body: Bytes,
        kind: MessageKind,
        stamp: Stamp,
        timeout: Duration,
    ) -> Result<Pending, SendError> {
        let deadline = Instant::now() + timeout;
        // A request awaits its reply, every other message its
        // acknowledgements.
        let awaiting = if kind == MessageKind::Request {
            Awaiting::Reply
        } else {
            Awaiting::Acks
        };
        let priority = stamp
            .priority
            .unwrap_or_else(|| self.config.service_priority(service));
        let expires_ms = stamp.expires_ms;
        let numbered = self
            .start_send(&target, service, priority, &body, Some(deadline), true)
            .await?;
        let body_len = body.len() as u64;
        let service: Arc<str> = self.service_name(service);
        let permit = self.take_places(body.len(), deadline).await?;
        let (tx, rx) = oneshot::channel();
        let Numbered {
            route,
            seq,
            incarnation,
        } = numbered;
        match route {
            Route::Server => {
                // Its target's share of the queue first, outside the send
                // order: a send held back by its own target holds back
                // nobody else's.
                let key = TargetRef::from(&target);
                let turn = Turn {
                    key,
                    priority,
                    len: body.len(),
                    target: &target,
                    service: &service,
                };
                self.fair_turn(turn, Some(deadline)).await?;
                // The number is taken and the frame queued in send order,
                // so the wire order is the number order (receivers
                // deduplicate by number; resends go out in number order).
                let _order = match self.server.send_lock.try_lock() {
                    Ok(order) => order,
                    Err(_) => {
                        let waited = Box::pin(tokio::time::timeout_at(
                            deadline,
                            self.server.send_lock.lock(),
                        ))
                        .await;
                        let Ok(order) = waited else {
                            return Err(SendError::Timeout {
                                after: self.config.send_timeout(),
                                waiting_for: vec![],
                            });
                        };
                        order
                    }
                };
                // Tracked (with what a reconnect resends) before it is
                // queued: its acknowledgement may come back at once.
                let resend = Resend {
                    kind,
                    priority,
                    expires_ms,
                    body: body.clone(),
                };
                let (seq, incarnation) = {
                    let mut core = self.core.lock();
                    let seq = core.next_seq();
                    let resend = Some(resend);
                    core.track(seq, target.clone(), service.clone(), awaiting, tx, resend);
                    (seq, core.incarnation())
                };
                let pending = self.pending(seq, deadline, timeout, rx, permit);
                // Usually queued at once, its header encoded from the names
                // in place; otherwise as a frame, waiting for room.
                let mut header = self.message_ref(
                    seq,
                    incarnation,
                    TargetRef::from(&target),
                    &service,
                    kind,
                    priority,
                );
                header.expires_ms = expires_ms;
                if !self.server.queue.try_push_message(&header, &body) {
                    // (A clone: the share is noted by the target below.)
                    let mut header =
                        self.header(seq, incarnation, target.clone(), service, kind, priority);
                    header.expires_ms = expires_ms;
                    let frame = OutFrame::Parts {
                        header: Header::Message(header),
                        body,
                    };
                    self.enqueue(frame, deadline).await?;
                }
                self.server.fair.queued(&self.server.queue, key, priority);
                self.count_server(body_len);
                Ok(pending)
            }
            Route::Direct(conn) => {
                let seq = self.number(seq);
                self.core
                    .lock()
                    .track(seq, target.clone(), service.clone(), awaiting, tx, None);
                let pending = self.pending(seq, deadline, timeout, rx, permit);
                let msg = OneByOne {
                    seq,
                    incarnation,
                    service: &service,
                    kind,
                    priority,
                    expires_ms,
                    body,
                };
                Box::pin(self.push_direct(conn, &msg, true, Some(deadline))).await?;
                Ok(pending)
            }
            Route::FanOut(members, _) => {
                let seq = self.number(seq);
                let ((), out) = self.core.run(|core| {
                    core.track_fan_out(seq, target, service.clone(), awaiting, members.clone(), tx)
                });
                let pending = self.pending(seq, deadline, timeout, rx, permit);
                self.dispatch(out.events);
                let msg = OneByOne {
                    seq,
                    incarnation,
                    service: &service,
                    kind,
                    priority,
                    expires_ms,
                    body,
                };
                for member in &members {
                    if let Err(e) =
                        Box::pin(self.send_to_member(member, &msg, true, deadline)).await
                    {
                        let ((), out) = self.core.run(|core| core.handle_failure(seq, member, e));
                        self.dispatch(out.events);
                    }
                }
                Ok(pending)
            }
        }
    }

    /// Waits until the message's target is within its share of the
    /// queue to the message server (see [`crate::fair`]), at most until
    /// `deadline` (`None`: the config's timeout, the clock read only if it
    /// must wait). A send that waited looks again whether its receiver
    /// became busy meanwhile, and waits for that too: a send held back by
    /// its own target's traffic must not pour into a receiver that said
    /// stop.
    async fn fair_turn(&self, turn: Turn<'_>, deadline: Option<Instant>) -> Result<(), SendError> {
        let server = &self.server;
        let timeout = self.config.send_timeout();
        match server
            .fair
            .wait_turn(
                &server.queue,
                turn.key,
                turn.priority,
                turn.len,
                deadline,
                timeout,
            )
            .await
        {
            Ok(false) => Ok(()),
            Ok(true) => {
                let deadline = deadline.unwrap_or_else(|| self.deadline());
                Box::pin(self.hold_while_busy(turn.target, turn.service, deadline)).await
            }
            Err(ShareTimeout) => Err(SendError::Timeout {
                after: timeout,
                waiting_for: vec![],
            }),
        }
    }

    /// Waits while a receiver of a message to `target` is busy, until
    /// `deadline`, when it fails `Busy`.
    async fn hold_while_busy(
        &self,
        target: &Target,
        service: &str,
        deadline: Instant,
    ) -> Result<(), SendError> {
        loop {
            let changed = self.members.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let blocker = busy_blocker(self.core.lock().members(), &self.id, target, service);
            let Some(node) = blocker else {
                return Ok(());
            };
            tokio::select! {
                () = changed => {}
                () = self.cancel.cancelled() => return Err(SendError::Shutdown),
                () = tokio::time::sleep_until(deadline) => return Err(SendError::Busy { node }),
            }
            self.still_member(target, node)?;
        }
    }

    /// A message to `node` held back while it was busy goes on only if
    /// `node` is still a member: one that left meanwhile (a receiver the
    /// server cut off for not reading, say) stopped before the message
    /// left. (A group's message goes on to the members left.)
    fn still_member(&self, target: &Target, node: NodeId) -> Result<(), SendError> {
        let to_it = matches!(target, Target::Node(id) if *id == node);
        if !to_it || self.core.lock().members().is_member(&node) {
            Ok(())
        } else {
            Err(SendError::TargetStopped {
                node,
                in_flight: false,
            })
        }
    }

    /// Places among the messages in flight for a body of `len` bytes: one
    /// in their count and its share of their bytes, waiting for them until
    /// `deadline`.
    async fn take_places(&self, len: usize, deadline: Instant) -> Result<Places, SendError> {
        let units = byte_units(len, self.in_flight_bytes_capacity);
        let bytes = || {
            (units > 0).then(|| {
                self.in_flight_bytes
                    .clone()
                    .try_acquire_many_owned(units)
                    .ok()
            })
        };
        if let Ok(message) = self.in_flight.clone().try_acquire_owned() {
            match bytes() {
                None => {
                    return Ok(Places {
                        _message: message,
                        _bytes: None,
                    })
                }
                Some(Some(bytes)) => {
                    return Ok(Places {
                        _message: message,
                        _bytes: Some(bytes),
                    })
                }
                // No room for its bytes: waits below, its place given back.
                Some(None) => drop(message),
            }
        }
        let waited = Box::pin(tokio::time::timeout_at(deadline, async {
            let message = self.in_flight.clone().acquire_owned().await?;
            let bytes = match units {
                0 => None,
                n => Some(self.in_flight_bytes.clone().acquire_many_owned(n).await?),
            };
            Ok::<_, tokio::sync::AcquireError>(Places {
                _message: message,
                _bytes: bytes,
            })
        }))
        .await;
        match waited {
            Ok(Ok(places)) => Ok(places),
            Ok(Err(_)) => Err(SendError::Shutdown),
            Err(_) => Err(SendError::Timeout {
                after: self.config.send_timeout(),
                waiting_for: vec![],
            }),
        }
    }

    /// The handle of acknowledged message `seq`.
    fn pending(
        &self,
        seq: u64,
        deadline: Instant,
        timeout: Duration,
        rx: oneshot::Receiver<Completion>,
        permit: Places,
    ) -> Pending {
        Pending::new(self.core.clone(), seq, deadline, timeout, rx, permit)
    }

    /// Sends a one-way message on its path, by `deadline` (`None`: the
    /// config's timeout, the clock read only if it must wait).
    pub(crate) async fn notify(
        &self,
        target: Target,
        service: &str,
        body: Bytes,
        deadline: Option<Instant>,
        stamp: Stamp,
    ) -> Result<(), SendError> {
        // A send takes from tokio's cooperative budget, as a channel's
        // does: a task that sends in a loop and never waits still lets the
        // writer it woke (and the others on its thread) run.
        tokio::task::consume_budget().await;
        let priority = stamp
            .priority
            .unwrap_or_else(|| self.config.service_priority(service));
        let expires_ms = stamp.expires_ms;
        let Numbered {
            route,
            seq,
            incarnation,
        } = self
            .start_send(&target, service, priority, &body, deadline, false)
            .await?;
        let seq = self.number(seq);
        let body_len = body.len() as u64;
        let one_way = |body| OneByOne {
            seq,
            incarnation,
            service,
            kind: MessageKind::Notify,
            priority,
            expires_ms,
            body,
        };
        match route {
            Route::Server => {
                // Usually queued at once, its header encoded from the names
                // in place; otherwise as a frame, waiting for room.
                let target_ref = TargetRef::from(&target);
                let key = target_ref;
                let turn = Turn {
                    key,
                    priority,
                    len: body.len(),
                    target: &target,
                    service,
                };
                self.fair_turn(turn, deadline).await?;
                let mut header = self.message_ref(
                    seq,
                    incarnation,
                    target_ref,
                    service,
                    MessageKind::Notify,
                    priority,
                );
                header.expires_ms = expires_ms;
                if !self.server.queue.try_push_message(&header, &body) {
                    let service = self.service_name(service);
                    let mut header = self.header(
                        seq,
                        incarnation,
                        target.clone(),
                        service,
                        MessageKind::Notify,
                        priority,
                    );
                    header.expires_ms = expires_ms;
                    let frame = OutFrame::Parts {
                        header: Header::Message(header),
                        body,
                    };
                    let deadline = deadline.unwrap_or_else(|| self.deadline());
                    self.enqueue(frame, deadline).await?;
                }
                self.server.fair.queued(&self.server.queue, key, priority);
                self.count_server(body_len);
            }
            Route::Direct(conn) => {
                let msg = one_way(body);
                Box::pin(self.push_direct(conn, &msg, false, deadline)).await?
            }
            Route::FanOut(members, deadline) => {
                let msg = one_way(body);
                for member in &members {
                    if let Err(e) =
                        Box::pin(self.send_to_member(member, &msg, false, deadline)).await
                    {
                        self.late_failure(member, &e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends one-way over the session channel to a server of this
    /// dispatcher's group.
    pub(crate) async fn session(
        &self,
        target: &NodeId,
        service: &str,
        body: Bytes,
    ) -> Result<(), SendError> {
        let (seq, incarnation) =
            self.core
                .lock()
                .handle_session_send(target, service, body.len() as u64)?;
        // Open already, usually: the opening path is boxed (a large future).
        let conn = match self.direct.get(target, ChannelKind::Session) {
            Some(conn) => conn,
            None => Box::pin(get_or_open(self, target, ChannelKind::Session))
                .await
                .map_err(|e| SendError::DirectUnavailable {
                    node: target.clone(),
                    reason: e.to_string(),
                })?,
        };
        let msg = OneByOne {
            seq,
            incarnation,
            service,
            kind: MessageKind::Notify,
            priority: self.config.service_priority(service),
            expires_ms: None,
            body,
        };
        self.push_direct(conn, &msg, false, None).await
    }

    /// `msg` as a frame of its own, addressed to `node`.
    fn frame_to(&self, node: &NodeId, msg: &OneByOne<'_>) -> OutFrame {
        let mut header = self.header(
            msg.seq,
            msg.incarnation,
            Target::Node(node.clone()),
            self.service_name(msg.service),
            msg.kind,
            msg.priority,
        );
        header.expires_ms = msg.expires_ms;
        OutFrame::Parts {
            header: Header::Message(header),
            body: msg.body.clone(),
        }
    }

    /// Sends one fan-out copy to `member`: over its lazy channel, or through
    /// the message server when the channel cannot be opened and the body
    /// fits there.
    async fn send_to_member(
        &self,
        member: &NodeId,
        msg: &OneByOne<'_>,
        tracked: bool,
        deadline: Instant,
    ) -> Result<(), SendError> {
        match get_or_open(self, member, ChannelKind::Lazy).await {
            Ok(conn) => self.push_direct(conn, msg, tracked, Some(deadline)).await,
            Err(reason) => {
                let body_len = msg.body.len() as u64;
                if path::fallback(body_len, self.server.max_message) == Fallback::Fail {
                    return Err(SendError::DirectUnavailable {
                        node: member.clone(),
                        reason: reason.to_string(),
                    });
                }
                let frame = self.frame_to(member, msg);
                self.enqueue(frame, deadline).await?;
                self.count_server(body_len);
                Ok(())
            }
        }
    }

    /// Queues a message on a direct channel; a channel found closing is
    /// replaced once. `deadline` is the send's, if it took one; a one-way
    /// send takes one only if it has to wait for room.
    async fn push_direct(
        &self,
        mut conn: Arc<DirectConn>,
        msg: &OneByOne<'_>,
        tracked: bool,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        let peer = conn.peer.clone();
        let body_len = msg.body.len() as u64;
        for attempt in 0..2 {
            let usage = conn.begin_use(tracked.then_some(msg.seq));
            let Some(_usage) = usage else {
                if attempt == 1 {
                    break;
                }
                conn = Box::pin(get_or_open(self, &peer, conn.kind))
                    .await
                    .map_err(|e| SendError::DirectUnavailable {
                        node: peer.clone(),
                        reason: e.to_string(),
                    })?;
                continue;
            };
            if body_len > conn.max_message {
                return Err(SendError::PayloadTooLarge {
                    size: body_len,
                    max: conn.max_message,
                });
            }
            // Room at once, usually: the header encoded from the names in
            // place, no frame built, no timer, no waiting future.
            let target = TargetRef::Node(peer.as_str());
            let mut header = self.message_ref(
                msg.seq,
                msg.incarnation,
                target,
                msg.service,
                msg.kind,
                msg.priority,
            );
            header.expires_ms = msg.expires_ms;
            let queued = if conn.queue.try_push_message(&header, &msg.body) {
                Ok(())
            } else {
                let frame = self.frame_to(&peer, msg);
                let wait = deadline.map_or(Wait::For(self.config.send_timeout()), Wait::Until);
                conn.queue.push(frame, Lane::Data, wait).await
            };
            return match queued {
                Ok(()) => {
                    let (messages, bytes) = match conn.kind {
                        ChannelKind::Lazy => {
                            (&self.counters.lazy_messages, &self.counters.lazy_bytes)
                        }
                        ChannelKind::Session => (
                            &self.counters.session_messages,
                            &self.counters.session_bytes,
                        ),
                    };
                    Counters::add(messages, 1);
                    Counters::add(bytes, body_len);
                    Ok(())
                }
                Err(PushError::Closed(_)) => Err(SendError::Disconnected),
                Err(PushError::Full(_) | PushError::Congested) => Err(SendError::Timeout {
                    after: self.config.send_timeout(),
                    waiting_for: vec![peer.clone()],
                }),
            };
        }
        Err(SendError::DirectUnavailable {
            node: peer,
            reason: "the channel kept closing".into(),
        })
    }

    fn count_server(&self, body_len: u64) {
        Counters::add(&self.counters.server_messages, 1);
        Counters::add(&self.counters.server_bytes, body_len);
    }

    fn late_failure(&self, member: &NodeId, error: &SendError) {
        self.counters
            .late_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(%member, %error, "a one-way message was not delivered");
    }

    /// Asks the message server which members `target` resolves to.
    async fn resolve(
        &self,
        target: &Target,
        service: &str,
        deadline: Instant,
    ) -> Result<Vec<NodeId>, SendError> {
        let token = self.server.next_token();
        let (tx, rx) = oneshot::channel();
        self.server
            .resolves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, tx);
        let frame = OutFrame::control(Header::Resolve {
            token,
            target: target.clone(),
            service: service.to_owned(),
        });
        let answer = tokio::time::timeout_at(deadline, async {
            self.server
                .queue
                .push(frame, Lane::Control, Wait::Forever)
                .await
                .map_err(|_| self.closed_error())?;
            rx.await.map_err(|_| self.closed_error())
        })
        .await;
        let result = match answer {
            Ok(r) => r,
            Err(_) => {
                self.server
                    .resolves
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&token);
                Err(SendError::Timeout {
                    after: self.config.send_timeout(),
                    waiting_for: vec![],
                })
            }
        }?;
        result
            .map(|members| members.into_iter().map(|(id, _)| id).collect())
            .map_err(|f| SendError::from_failure(&f, target, None, service))
    }
}

/// Keeps a dispatcher's session channels open: to every server node of its
/// group, opened when either joins and reopened when broken.
pub(crate) async fn session_keeper(rt: Runtime) {
    let mut events = rt.members.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(
        rt.config.message_server.reconnect_delay_ms,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let peers: Vec<NodeId> = {
            let core = rt.core.lock();
            core.members()
                .snapshot()
                .into_iter()
                .map(|m| m.id)
                .filter(|id| core.is_session_peer(id))
                .collect()
        };
        for peer in peers {
            if rt.direct.get(&peer, ChannelKind::Session).is_none() {
                if let Err(reason) = get_or_open(&rt, &peer, ChannelKind::Session).await {
                    tracing::debug!(%peer, %reason, "session channel not open yet");
                }
            }
        }
        tokio::select! {
            _ = rt.cancel.cancelled() => return,
            _ = events.recv() => {}
            _ = tick.tick() => {}
        }
    }
}
