//! The cluster manager's driver: for each message, gather the facts, let
//! [`cluster_manager::path::choose`] pick the path, and carry it out:
//! through the message server, over a lazy channel, or fanned out over one
//! lazy channel per member. Falls back to the message server when a channel
//! cannot be opened and the body fits there; otherwise fails clearly.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cluster_manager::path::{self, Path, PathFacts, TargetKind};
use cluster_manager::{Awaiting, SendError};
use tokio::sync::oneshot;
use tokio::time::Instant;
use transports::protocol::{valid_name, Header, MessageKind, NodeId, Role, Target, TargetRef};
use transports::{Lane, OutFrame, PushError, Wait};

use crate::connection::complete;
use crate::counters::Counters;
use crate::direct::{get_or_open, ChannelKind, DirectConn};
use crate::node::{Inner, Pending, Waiter};
use crate::reliable::Resend;

/// Where one message goes.
enum Route {
    Server,
    Direct(Arc<DirectConn>),
    /// The members, and the deadline the send keeps to.
    FanOut(Vec<NodeId>, Instant),
}

/// A message addressed to one receiver at a time.
struct Outgoing<'a> {
    seq: u64,
    service: &'a str,
    kind: MessageKind,
    body: Bytes,
}

impl Inner {
    /// Picks the route of a message (opening a lazy channel if that is the
    /// path). `deadline` is the send's, if it took one already; a fan-out
    /// that has to ask the message server for its members takes one then.
    async fn route(
        self: &Arc<Self>,
        target: &Target,
        service: &str,
        body_len: u64,
        deadline: Option<Instant>,
    ) -> Result<Route, SendError> {
        let target_name = match target {
            Target::Node(id) => id.as_str(),
            Target::Group(g) | Target::AnyOf(g) => g,
            Target::All => "all",
        };
        for name in [service, target_name] {
            if !valid_name(name) {
                return Err(SendError::InvalidName(name.chars().take(64).collect()));
            }
        }
        let allowed = path::service_allowed(&self.config.lazy, service);
        let (kind, peer) = match target {
            Target::Node(id) => (TargetKind::Node, Some(id)),
            Target::AnyOf(_) => (TargetKind::AnyOf, None),
            Target::Group(_) | Target::All => (TargetKind::FanOut, None),
        };
        let mut facts = PathFacts {
            body_len,
            target: kind,
            service_allowed: allowed,
            lazy_open: false,
            hot_pair: false,
            target_reachable: false,
        };
        if let (Some(peer), true) = (peer, allowed) {
            facts.lazy_open = self.direct.get(peer, ChannelKind::Lazy).is_some();
            // Auto-activation off: no pair is ever hot, nothing to count.
            facts.hot_pair = self.config.lazy.auto_activate_messages > 0
                && self
                    .activation()
                    .handle_message(peer, std::time::Instant::now());
            // Only a message that could go direct needs the address.
            let could_go_direct = path::could_go_direct(
                self.config.lazy.threshold_bytes,
                body_len,
                facts.lazy_open,
                facts.hot_pair,
            );
            facts.target_reachable =
                could_go_direct && *peer != self.id && self.members.direct_addr(peer).is_some();
        }
        let small = body_len <= self.config.lazy.threshold_bytes;
        match (path::choose(self.config.lazy.threshold_bytes, facts), peer) {
            // A small message moves to the direct channel only once nothing
            // sent to that node through the message server is unsettled,
            // so the switch never overtakes earlier messages.
            (Path::Lazy, Some(peer)) if small && self.tracker().server_in_flight(peer) > 0 => {
                Ok(Route::Server)
            }
            (Path::Lazy, Some(peer)) => {
                match Box::pin(get_or_open(self, peer, ChannelKind::Lazy)).await {
                    Ok(conn) => Ok(Route::Direct(conn)),
                    Err(reason) if body_len <= self.server_max => {
                        tracing::debug!(%peer, %reason, "no lazy channel; falling back to the message server");
                        Ok(Route::Server)
                    }
                    Err(reason) => Err(SendError::DirectUnavailable {
                        node: peer.clone(),
                        reason,
                    }),
                }
            }
            (Path::LazyFanOut, _) => {
                let deadline = deadline.unwrap_or_else(|| self.deadline());
                let members = Box::pin(self.resolve(target, service, deadline)).await?;
                Ok(Route::FanOut(members, deadline))
            }
            _ => Ok(Route::Server),
        }
    }

    /// What every send does first: check the body and the node, choose
    /// the route (keeping to `deadline` if the send took one already).
    async fn start_send(
        self: &Arc<Self>,
        target: &Target,
        service: &str,
        body: &Bytes,
        deadline: Option<Instant>,
    ) -> Result<Route, SendError> {
        self.check_size(body)?;
        if self.is_stopping() {
            return Err(SendError::Shutdown);
        }
        self.route(target, service, body.len() as u64, deadline)
            .await
    }

    /// A send's deadline, `send_timeout` from now. An acknowledged send
    /// takes it at once (its handle keeps it); a one-way send only when it
    /// has to wait, or fan out (most never do, and skip the clock).
    fn deadline(&self) -> Instant {
        Instant::now() + self.config.send_timeout()
    }

    /// The error for a body the message-server path cannot carry.
    fn server_size_error(
        &self,
        target: &Target,
        service: &str,
        body_len: u64,
    ) -> Result<(), SendError> {
        if body_len <= self.server_max {
            return Ok(());
        }
        if let Target::Node(peer) = target {
            let lazy_would_do = body_len > self.config.lazy.threshold_bytes
                && path::service_allowed(&self.config.lazy, service);
            if lazy_would_do && self.members.is_member(peer) && *peer != self.id {
                return Err(SendError::DirectUnavailable {
                    node: peer.clone(),
                    reason: "it announced no direct-channel address".into(),
                });
            }
        }
        Err(SendError::PayloadTooLarge {
            size: body_len,
            max: self.server_max,
        })
    }

    /// Queues an acknowledged message (or request) on its path; the handle
    /// awaits its outcome. Messages submitted one after another from one
    /// task go out in that order on each path.
    pub(crate) async fn submit(
        self: &Arc<Self>,
        target: Target,
        service: &str,
        body: Bytes,
        kind: MessageKind,
        awaiting: Awaiting,
    ) -> Result<Pending, SendError> {
        let deadline = self.deadline();
        let route = self
            .start_send(&target, service, &body, Some(deadline))
            .await?;
        let body_len = body.len() as u64;
        let service: Arc<str> = self.service_name(service);
        let slot = match self.in_flight.try_take() {
            Some(slot) => slot,
            None => {
                let waited =
                    Box::pin(tokio::time::timeout_at(deadline, self.in_flight.take())).await;
                match waited {
                    Ok(slot) => slot,
                    Err(_) => {
                        return Err(SendError::Timeout {
                            after: self.config.send_timeout(),
                            waiting_for: vec![],
                        })
                    }
                }
            }
        };
        let (tx, rx) = oneshot::channel();
        let seq;
        match route {
            Route::Server => {
                self.server_size_error(&target, &service, body_len)?;
                // The number is taken and the frame queued under the lock,
                // so the wire order is the number order (receivers
                // deduplicate by number; resends go out in number order).
                let _order = match self.send_lock.try_lock() {
                    Some(order) => order,
                    None => {
                        let waited =
                            Box::pin(tokio::time::timeout_at(deadline, self.send_lock.lock()))
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
                seq = self.next_seq();
                // Tracked (with what a reconnect resends) before it is
                // queued: its acknowledgement may come back at once.
                let resend = Resend {
                    kind,
                    body: body.clone(),
                };
                {
                    let mut tracker = self.tracker();
                    let waiter = Waiter {
                        tx,
                        resend: Some(resend),
                    };
                    tracker.track(seq, target.clone(), service.clone(), awaiting, waiter);
                    tracker.mark_via_server(seq);
                }
                let pending = Pending::new(self.clone(), seq, deadline, rx, slot);
                // Usually queued at once, its header encoded from the names
                // in place; otherwise as a frame, waiting for room.
                let header = self.message_ref(seq, TargetRef::from(&target), &service, kind);
                if !self.queue.try_push_message(&header, &body) {
                    let header = self.header(seq, target, service, kind);
                    let frame = OutFrame::Parts {
                        header: Header::Message(header),
                        body,
                    };
                    self.enqueue(frame, deadline).await?;
                }
                self.count_server(body_len);
                Ok(pending)
            }
            Route::Direct(conn) => {
                seq = self.next_seq();
                let waiter = Waiter { tx, resend: None };
                self.tracker()
                    .track(seq, target.clone(), service.clone(), awaiting, waiter);
                let pending = Pending::new(self.clone(), seq, deadline, rx, slot);
                let msg = Outgoing {
                    seq,
                    service: &service,
                    kind,
                    body,
                };
                Box::pin(self.push_direct(conn, &msg, true, Some(deadline))).await?;
                Ok(pending)
            }
            Route::FanOut(members, _) => {
                seq = self.next_seq();
                let done = self.tracker().track_expecting(
                    seq,
                    target,
                    service.clone(),
                    awaiting,
                    members.clone(),
                    Waiter { tx, resend: None },
                );
                let pending = Pending::new(self.clone(), seq, deadline, rx, slot);
                complete(done);
                let msg = Outgoing {
                    seq,
                    service: &service,
                    kind,
                    body,
                };
                for member in &members {
                    if let Err(e) =
                        Box::pin(self.send_to_member(member, &msg, true, deadline)).await
                    {
                        complete(self.tracker().handle_failure(seq, member, e));
                    }
                }
                Ok(pending)
            }
        }
    }

    /// Sends a one-way message on its path.
    pub(crate) async fn notify(
        self: &Arc<Self>,
        target: Target,
        service: &str,
        body: Bytes,
    ) -> Result<(), SendError> {
        let route = self.start_send(&target, service, &body, None).await?;
        let body_len = body.len() as u64;
        let one_way = |body| Outgoing {
            seq: self.next_seq(),
            service,
            kind: MessageKind::Notify,
            body,
        };
        match route {
            Route::Server => {
                self.server_size_error(&target, service, body_len)?;
                let seq = self.next_seq();
                // Usually queued at once, its header encoded from the names
                // in place; otherwise as a frame, waiting for room.
                let target_ref = TargetRef::from(&target);
                let header = self.message_ref(seq, target_ref, service, MessageKind::Notify);
                if !self.queue.try_push_message(&header, &body) {
                    let service = self.service_name(service);
                    let frame = self.message(seq, target, service, MessageKind::Notify, body);
                    self.enqueue(frame, self.deadline()).await?;
                }
                self.count_server(body_len);
            }
            Route::Direct(conn) => {
                let msg = one_way(body);
                Box::pin(self.push_direct(conn, &msg, false, None)).await?
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
        self: &Arc<Self>,
        target: &NodeId,
        service: &str,
        body: Bytes,
    ) -> Result<(), SendError> {
        self.check_size(&body)?;
        if !valid_name(service) {
            return Err(SendError::InvalidName(service.chars().take(64).collect()));
        }
        if self.with_hello(|h| h.role) != Role::Dispatcher {
            return Err(SendError::NotADispatcher);
        }
        if !self.is_session_peer(target) {
            return Err(SendError::NotInSessionGroup {
                node: target.clone(),
            });
        }
        // Open already, usually: the opening path is boxed (a large future).
        let conn = match self.direct.get(target, ChannelKind::Session) {
            Some(conn) => conn,
            None => Box::pin(get_or_open(self, target, ChannelKind::Session))
                .await
                .map_err(|reason| SendError::DirectUnavailable {
                    node: target.clone(),
                    reason,
                })?,
        };
        let msg = Outgoing {
            seq: self.next_seq(),
            service,
            kind: MessageKind::Notify,
            body,
        };
        self.push_direct(conn, &msg, false, None).await
    }

    /// Whether `peer` is a server node sharing a group with this node.
    pub(crate) fn is_session_peer(&self, peer: &NodeId) -> bool {
        // The membership lock, then this node's hello: never the other way
        // round anywhere.
        *peer != self.id
            && self.members.member_is(peer, |m| {
                m.role == Role::Server
                    && self.with_hello(|h| m.groups.iter().any(|g| h.groups.contains(g)))
            })
    }

    /// `msg` as a frame of its own, addressed to `node`.
    fn frame_to(&self, node: &NodeId, msg: &Outgoing<'_>) -> OutFrame {
        self.message(
            msg.seq,
            Target::Node(node.clone()),
            self.service_name(msg.service),
            msg.kind,
            msg.body.clone(),
        )
    }

    /// Sends one fan-out copy to `member`: over its lazy channel, or through
    /// the message server when the channel cannot be opened and the body
    /// fits there.
    async fn send_to_member(
        self: &Arc<Self>,
        member: &NodeId,
        msg: &Outgoing<'_>,
        tracked: bool,
        deadline: Instant,
    ) -> Result<(), SendError> {
        match get_or_open(self, member, ChannelKind::Lazy).await {
            Ok(conn) => self.push_direct(conn, msg, tracked, Some(deadline)).await,
            Err(reason) => {
                let body_len = msg.body.len() as u64;
                if body_len > self.server_max {
                    return Err(SendError::DirectUnavailable {
                        node: member.clone(),
                        reason,
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
        self: &Arc<Self>,
        mut conn: Arc<DirectConn>,
        msg: &Outgoing<'_>,
        tracked: bool,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        let peer = conn.peer.clone();
        let body_len = msg.body.len() as u64;
        for attempt in 0..2 {
            let usage = conn.begin_use(self, tracked.then_some(msg.seq));
            let Some(_usage) = usage else {
                if attempt == 1 {
                    break;
                }
                conn = Box::pin(get_or_open(self, &peer, conn.kind))
                    .await
                    .map_err(|reason| SendError::DirectUnavailable {
                        node: peer.clone(),
                        reason,
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
            let header = self.message_ref(msg.seq, target, msg.service, msg.kind);
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
        self.late_failures
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
        let token = self.next_token();
        let (tx, rx) = oneshot::channel();
        self.resolves
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, tx);
        let frame = OutFrame::control(Header::Resolve {
            token,
            target: target.clone(),
            service: service.to_owned(),
        });
        let answer = tokio::time::timeout_at(deadline, async {
            self.queue
                .push(frame, Lane::Control, Wait::Forever)
                .await
                .map_err(|_| self.closed_error())?;
            rx.await.map_err(|_| self.closed_error())
        })
        .await;
        let result = match answer {
            Ok(r) => r,
            Err(_) => {
                self.resolves
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
pub(crate) async fn session_keeper(inner: Arc<Inner>) {
    let mut events = inner.members.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(
        inner.config.message_server.reconnect_delay_ms,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let peers: Vec<NodeId> = inner
            .members
            .snapshot()
            .into_iter()
            .map(|m| m.id)
            .filter(|id| inner.is_session_peer(id))
            .collect();
        for peer in peers {
            if inner.direct.get(&peer, ChannelKind::Session).is_none() {
                if let Err(reason) = get_or_open(&inner, &peer, ChannelKind::Session).await {
                    tracing::debug!(%peer, %reason, "session channel not open yet");
                }
            }
        }
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = events.recv() => {}
            _ = tick.tick() => {}
        }
    }
}
