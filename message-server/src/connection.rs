//! One node's connection: handshake and registration, then a read loop that
//! routes each frame straight into the receivers' queues, beside a writer
//! task that drains this node's own queue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use transports::frame::FrameCodec;
use transports::handshake::{self, HandshakeError};
use transports::protocol::{
    valid_name, DeliveryFailure, Header, LeaveReason, MemberEvent, MemberInfo, MessageHeader,
    MessageKind, NodeId, RefusalReason, Routed, Target, MAX_NAMES_PER_NODE,
};
use transports::{out_queue, FrameError, FrameReader, OutFrame, OutQueue, PushError};

use crate::counters::Counters;
use crate::registry::{broadcast_locked, hold, register, unregister, warming_up, Held, Refused};
use crate::server::Shared;
use crate::table::Resolution;

/// Why a connection ended.
enum End {
    Goodbye,
    Eof,
    Cancelled,
    WriterStopped,
    Frame(FrameError),
    Violation(String),
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let span = tracing::debug_span!("conn", %peer, node = tracing::field::Empty);
    async move {
        if let Err(e) = transports::tcp::tune(&stream, &shared.config.tcp) {
            tracing::debug!(error = %e, "could not tune socket");
        }
        let (rd, mut wr) = stream.into_split();
        let mut reader = FrameReader::new(rd, FrameCodec::default());
        let timeout = shared.config.connect_timeout();
        let hello = tokio::select! {
            _ = cancel.cancelled() => return,
            h = handshake::read_hello(&mut reader, &mut wr, timeout) => h,
        };
        let hello = match hello {
            Ok(h) => h,
            Err(e) => {
                if matches!(
                    e,
                    HandshakeError::Frame(_) | HandshakeError::Unexpected { .. }
                ) {
                    Counters::add(&shared.counters.protocol_errors, 1);
                }
                tracing::info!(error = %e, "closing connection before registration");
                return;
            }
        };
        tracing::Span::current().record("node", tracing::field::display(&hello.node));
        let cluster = &shared.config.cluster;
        if let Err(refusal) =
            handshake::check_hello(&hello, &cluster.name, cluster.credentials.as_deref())
        {
            tracing::warn!(reason = %refusal.reason, detail = %refusal.detail, "refusing node");
            Counters::add(&shared.counters.connections_refused, 1);
            handshake::refuse(&mut wr, refusal.reason, refusal.detail).await;
            return;
        }

        let names_ok = valid_name(hello.node.as_str())
            && hello.groups.len() <= MAX_NAMES_PER_NODE
            && hello.services.len() <= MAX_NAMES_PER_NODE
            && hello
                .groups
                .iter()
                .chain(&hello.services)
                .all(|n| valid_name(n));
        if !names_ok {
            tracing::warn!("refusing node: invalid names in its hello");
            Counters::add(&shared.counters.connections_refused, 1);
            handshake::refuse(
                &mut wr,
                RefusalReason::ProtocolViolation,
                "node ids, groups and services are 1 to 255 bytes, at most 1024 of each".into(),
            )
            .await;
            return;
        }
        let max_message = hello
            .max_message_bytes
            .min(shared.config.limits.max_message_bytes);
        let codec = FrameCodec::for_messages(max_message);
        *reader.codec_mut() = codec;
        let (queue, rx) = out_queue(
            shared.config.message_server.queue_frames,
            shared.config.message_server.queue_bytes,
        );
        let me = MemberInfo {
            id: hello.node.clone(),
            incarnation: hello.incarnation,
            role: hello.role,
            groups: hello.groups.clone(),
            services: hello.services.clone(),
            direct_addr: hello.direct_addr,
        };
        let conn_id = match register(&shared, &me, &queue, codec.max_frame(), max_message) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "refusing node");
                Counters::add(&shared.counters.connections_refused, 1);
                let reason = match e {
                    Refused::IncarnationFailed => RefusalReason::IncarnationFailed,
                    Refused::Duplicate(_) => RefusalReason::DuplicateNode,
                };
                handshake::refuse(&mut wr, reason, e.to_string()).await;
                return;
            }
        };
        Counters::add(&shared.counters.connections_accepted, 1);
        tracing::info!(incarnation = me.incarnation, groups = ?me.groups, "member joined");
        let max_frame = codec.max_frame();
        tasks.spawn(
            async move {
                if let Err(e) = transports::run_writer(wr, rx, max_frame).await {
                    tracing::debug!(error = %e, "writer stopped");
                }
            }
            .in_current_span(),
        );

        let mut conn = Connection {
            shared: shared.clone(),
            me: me.id.clone(),
            incarnation: me.incarnation,
            queue: queue.clone(),
        };
        let end = conn.read_loop(&mut reader, &cancel).await;
        let reason = match &end {
            End::Goodbye => LeaveReason::Stopped,
            _ => LeaveReason::Disconnected,
        };
        match &end {
            End::Goodbye => tracing::info!("member left (planned stop)"),
            End::Eof => tracing::info!("member disconnected"),
            End::Cancelled => tracing::debug!("connection closed by shutdown"),
            End::WriterStopped => tracing::warn!("member disconnected: its writer stopped"),
            End::Frame(e) => tracing::warn!(error = %e, "member disconnected on a frame error"),
            End::Violation(why) => {
                Counters::add(&shared.counters.protocol_errors, 1);
                tracing::warn!(reason = %why, "closing connection: protocol violation")
            }
        }
        unregister(&shared, &me.id, me.incarnation, conn_id, reason);
        match end {
            // Let the writer drain what is queued (a planned stop).
            End::Goodbye | End::Eof => drop(queue),
            _ => queue.close(),
        }
    }
    .instrument(span)
    .await
}

struct Connection {
    shared: Arc<Shared>,
    me: NodeId,
    incarnation: u64,
    queue: OutQueue,
}

impl Connection {
    async fn read_loop(
        &mut self,
        reader: &mut FrameReader<tokio::net::tcp::OwnedReadHalf>,
        cancel: &CancellationToken,
    ) -> End {
        loop {
            let frame = tokio::select! {
                _ = cancel.cancelled() => return End::Cancelled,
                _ = self.queue.closed() => return End::WriterStopped,
                f = reader.next() => f,
            };
            let frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => return End::Eof,
                Err(e) => return End::Frame(e),
            };
            tracing::trace!(
                kind = frame.header().kind(),
                len = frame.raw().len(),
                "frame"
            );
            let end = match frame.header() {
                Header::Message(h) if h.sender == self.me && h.incarnation < self.incarnation => {
                    // Queued by an earlier incarnation (declared failed)
                    // before it rejoined: refused.
                    Counters::add(&self.shared.counters.stale_frames, 1);
                    None
                }
                Header::Ack(a) if a.from == self.me && a.from_incarnation < self.incarnation => {
                    Counters::add(&self.shared.counters.stale_frames, 1);
                    None
                }
                Header::Message(h) => {
                    if h.sender != self.me || h.incarnation != self.incarnation {
                        Some(End::Violation(format!(
                            "message claims sender {} incarnation {}",
                            h.sender, h.incarnation
                        )))
                    } else {
                        self.route(h, frame.raw(), frame.body_len()).await;
                        None
                    }
                }
                Header::Ack(ack) => {
                    if ack.from != self.me || ack.from_incarnation != self.incarnation {
                        Some(End::Violation(format!(
                            "ack claims to be from {}",
                            ack.from
                        )))
                    } else {
                        self.forward_ack(&ack.to, ack.to_incarnation, frame.raw())
                            .await;
                        None
                    }
                }
                Header::Subscribe { service, .. }
                    if !valid_name(service) || self.service_count() >= MAX_NAMES_PER_NODE =>
                {
                    Some(End::Violation(
                        "service name of bad length, or too many services".into(),
                    ))
                }
                Header::Subscribe { token, service } => {
                    self.update_services(service, true);
                    let reply = OutFrame::control(Header::Subscribed { token: *token });
                    self.reply(reply).await;
                    None
                }
                Header::Unsubscribe { service } => {
                    self.update_services(service, false);
                    None
                }
                Header::Resolve {
                    token,
                    target,
                    service,
                } => {
                    let result = self.resolve_members(target, service);
                    let reply = OutFrame::control(Header::Resolved {
                        token: *token,
                        result,
                    });
                    self.reply(reply).await;
                    None
                }
                Header::Goodbye => Some(End::Goodbye),
                other => Some(End::Violation(format!(
                    "unexpected {} frame from a node",
                    other.kind()
                ))),
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// The members `target` resolves to now, with their incarnations.
    fn resolve_members(
        &self,
        target: &Target,
        service: &str,
    ) -> Result<Vec<(NodeId, u64)>, DeliveryFailure> {
        let state = self.shared.read();
        let load = |id: &NodeId| {
            state
                .conns
                .get(id)
                .map_or(usize::MAX, |c| c.queue.queued_frames())
        };
        let ids = match state.table.resolve(&self.me, target, service, load)? {
            Resolution::One(id) => vec![id],
            Resolution::Many(ids) => ids,
        };
        Ok(ids
            .into_iter()
            .filter_map(|id| {
                let incarnation = state.table.member(&id)?.incarnation;
                Some((id, incarnation))
            })
            .collect())
    }

    fn service_count(&self) -> usize {
        self.shared
            .read()
            .table
            .member(&self.me)
            .map_or(0, |m| m.services.len())
    }

    fn update_services(&self, service: &str, add: bool) {
        let mut state = self.shared.write();
        let updated = if add {
            state.table.subscribe(&self.me, service)
        } else {
            state.table.unsubscribe(&self.me, service)
        };
        if let Some(info) = updated {
            let event = Header::Member(MemberEvent::Updated(info));
            broadcast_locked(&self.shared, &state.conns, &event);
        }
    }

    /// Queues a control frame to this node, waiting for room up to the
    /// slow-consumer limit.
    async fn reply(&self, frame: OutFrame) {
        push_control_bounded(&self.shared, &self.me, &self.queue, frame).await;
    }

    async fn forward_ack(&self, to: &NodeId, to_incarnation: u64, raw: &Bytes) {
        let queue = {
            let state = self.shared.read();
            match state.conns.get(to) {
                Some(c) if c.incarnation == to_incarnation => Some(c.queue.clone()),
                _ => None,
            }
        };
        match queue {
            Some(q) => push_control_bounded(&self.shared, to, &q, OutFrame::Raw(raw.clone())).await,
            None => tracing::trace!(%to, "dropping ack for a sender that is gone"),
        }
    }

    /// Routes one message into its receivers' queues and tells the sender
    /// where it went when the sender cannot know (fan-out, `AnyOf`) or when
    /// it failed.
    async fn route(&self, h: &MessageHeader, raw: &Bytes, body_len: usize) {
        let counters = &self.shared.counters;
        Counters::add(&counters.messages, 1);
        Counters::add(&counters.message_bytes, body_len as u64);
        // Replies go to the requesting runtime, not to a service, and
        // nobody waits for their routing result.
        let is_reply = matches!(h.kind, MessageKind::Reply { .. });
        let acked = matches!(h.kind, MessageKind::Send | MessageKind::Request);
        let resolved = {
            let state = self.shared.read();
            let load = |id: &NodeId| {
                state
                    .conns
                    .get(id)
                    .map_or(usize::MAX, |c| c.queue.queued_frames())
            };
            let resolution = if is_reply {
                state.table.resolve_node(&h.target)
            } else {
                state.table.resolve(&self.me, &h.target, &h.service, load)
            };
            match resolution {
                Ok(Resolution::One(id)) => Ok(vec![(state.conns.get(&id).cloned(), id)]),
                Ok(Resolution::Many(ids)) => Ok(ids
                    .into_iter()
                    .map(|id| (state.conns.get(&id).cloned(), id))
                    .collect::<Vec<_>>()),
                Err(f) => Err(f),
            }
        };
        let receivers = match resolved {
            Ok(r) => r,
            Err(DeliveryFailure::UnknownTarget) if warming_up(&self.shared) => {
                // Just restarted: the node may not have re-registered yet.
                let Target::Node(target) = &h.target else {
                    self.reply(routed(
                        h.seq,
                        vec![],
                        vec![],
                        Some(DeliveryFailure::UnknownTarget),
                    ))
                    .await;
                    return;
                };
                let held = Held {
                    raw: raw.clone(),
                    sender: self.me.clone(),
                    seq: h.seq,
                };
                if hold(&self.shared, target, held).is_err() {
                    Counters::add(&counters.route_failures, 1);
                    let failed = vec![(target.clone(), DeliveryFailure::UnknownTarget)];
                    self.reply(routed(
                        h.seq,
                        vec![],
                        failed,
                        Some(DeliveryFailure::UnknownTarget),
                    ))
                    .await;
                }
                return;
            }
            Err(failure) => {
                Counters::add(&counters.route_failures, 1);
                // Also for one-way messages: the sender hears of every
                // message that went nowhere.
                // Name the node of a `Node` target, so that a sender
                // reaching several nodes one by one knows which one failed.
                let failed = match &h.target {
                    Target::Node(id) => vec![(id.clone(), failure.clone())],
                    _ => vec![],
                };
                self.reply(routed(h.seq, vec![], failed, Some(failure)))
                    .await;
                return;
            }
        };
        let single = receivers.len() == 1;
        let mut ok = Vec::with_capacity(receivers.len());
        let mut failed = Vec::new();
        // First every receiver with room; then the full ones, all against
        // one deadline, so a fan-out holds its sender back at most one
        // slow-consumer period however many receivers are slow.
        let mut waiting = Vec::new();
        for (conn, id) in receivers {
            match conn {
                None => failed.push((id, DeliveryFailure::TargetStopped)),
                Some(c) if raw.len() > c.max_frame => failed.push((
                    id,
                    DeliveryFailure::PayloadTooLarge {
                        size: body_len as u64,
                        max: c.max_frame as u64,
                    },
                )),
                Some(c) => match c.queue.try_push_data(OutFrame::Raw(raw.clone())) {
                    Ok(()) => ok.push((id, c.incarnation)),
                    Err(PushError::Full(_) | PushError::Congested) => waiting.push((c, id)),
                    Err(PushError::Closed(_)) => failed.push((id, DeliveryFailure::TargetStopped)),
                },
            }
        }
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.shared.config.message_server.slow_consumer_ms);
        for (c, id) in waiting {
            // A full queue slows the sender down (this read loop waits, so
            // the sender's socket fills); a receiver that makes no room in
            // time is answered for.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match c
                .queue
                .push_data_within(OutFrame::Raw(raw.clone()), left)
                .await
            {
                Ok(()) => ok.push((id, c.incarnation)),
                Err(PushError::Full(_) | PushError::Congested) => {
                    Counters::add(&counters.overloaded, 1);
                    failed.push((id, DeliveryFailure::ReceiverOverloaded));
                }
                Err(PushError::Closed(_)) => failed.push((id, DeliveryFailure::TargetStopped)),
            }
        }
        Counters::add(&counters.deliveries, ok.len() as u64);
        Counters::add(&counters.delivery_bytes, (ok.len() * body_len) as u64);
        Counters::add(&counters.route_failures, failed.len() as u64);
        if failed.is_empty() && (!acked || matches!(h.target, Target::Node(_))) {
            // Nobody waits (one-way), or the sender knows its only receiver
            // and its ack will say the rest.
            return;
        }
        let error = if single && ok.is_empty() {
            failed.first().map(|(_, f)| f.clone())
        } else {
            None
        };
        self.reply(routed(h.seq, ok, failed, error)).await;
    }
}

fn routed(
    seq: u64,
    receivers: Vec<(NodeId, u64)>,
    failed: Vec<(NodeId, DeliveryFailure)>,
    error: Option<DeliveryFailure>,
) -> OutFrame {
    OutFrame::control(Header::Routed(Routed {
        seq,
        receivers,
        failed,
        error,
    }))
}

/// Queues a control frame, waiting up to `message_server.slow_consumer_ms`;
/// a consumer that does not make room by then is cut off.
async fn push_control_bounded(shared: &Shared, to: &NodeId, queue: &OutQueue, frame: OutFrame) {
    let frame = match queue.try_push_control(frame) {
        Err(PushError::Full(frame)) => *frame,
        Ok(()) | Err(_) => return,
    };
    let limit = Duration::from_millis(shared.config.message_server.slow_consumer_ms);
    if tokio::time::timeout(limit, queue.push_control(frame))
        .await
        .is_err()
    {
        tracing::warn!(node = %to, "cutting off slow consumer: control frame waited too long");
        Counters::add(&shared.counters.slow_consumers, 1);
        queue.close();
    }
}
