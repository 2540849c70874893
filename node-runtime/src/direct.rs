//! Direct channels between nodes, both ends: lazy channels (opened on first
//! need, reused, closed when idle) and session channels (a dispatcher's
//! standing connections to the server nodes of its group).
//!
//! A channel carries the same frames as the message-server path, after the
//! same handshake and credentials. Data flows from the opener to the peer;
//! acknowledgements come back on the same connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_manager::channels::{ChannelKind, ChannelPolicy, ChannelState, Verdict};
use cluster_manager::SendError;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use transports::frame::FrameCodec;
use transports::frame::{peek_cached, BodyArena, NameCache, Peeked};
use transports::handshake::{self, HandshakeError};
use transports::protocol::{
    same_name, AckStatus, DeliveryFailure, Header, NodeId, PublicKey, RefusalReason, TargetRef,
    Welcome, PROTOCOL_VERSION,
};
use transports::{out_queue, FrameReader, Lane, OutFrame};

use crate::channels::DirectConn;
use crate::connection::{
    deliver_later, deliver_now, deliver_stream, handle_ack, handle_acks, AckBatch, InboxCache,
    Received,
};
use crate::counters::Counters;
use crate::inbox::Message;
use crate::runtime::Runtime;
use crate::services::Answer;
use crate::stream::Started;
use smol_str::SmolStr;

/// Parts of large bodies a channel's writer sends ahead of what its peer
/// has read ([`transports::OutReceiver::window_parts`]), in chunks.
pub(crate) const PART_WINDOW_CHUNKS: usize = 2;

/// The channel of `kind` to `peer`, opening it if needed (one opener at a
/// time per peer).
///
/// # Errors
///
/// [`ChannelError`]: why the channel could not be opened.
pub(crate) async fn get_or_open(
    rt: &Runtime,
    peer: &NodeId,
    kind: ChannelKind,
) -> Result<Arc<DirectConn>, ChannelError> {
    loop {
        // Listening before looking: an opener done in between still wakes
        // this sender.
        let done = rt.direct.opener_done();
        tokio::pin!(done);
        done.as_mut().enable();
        if let Some(c) = rt.direct.get(peer, kind) {
            return Ok(c);
        }
        if rt.direct.begin_open(peer, kind) {
            break;
        }
        done.await;
    }
    // Done however this ends, a dropped send included.
    let _opener = OpenerDone {
        pool: &rt.direct,
        peer,
        kind,
    };
    let (opened, failed) = match kind {
        ChannelKind::Lazy => (&rt.counters.lazy_opened, &rt.counters.lazy_failed),
        ChannelKind::Session => (&rt.counters.session_opened, &rt.counters.session_failed),
    };
    let found = {
        let core = rt.core.lock();
        let members = core.members();
        members
            .direct_addr(peer)
            .zip(members.get(peer.as_str()).map(|m| m.session_key))
    };
    let Some((addr, key)) = found else {
        Counters::add(failed, 1);
        return Err(ChannelError::NoAddress { peer: peer.clone() });
    };
    match open(rt, peer, addr, &key, kind).await {
        Ok(conn) => {
            Counters::add(opened, 1);
            tracing::info!(%peer, %addr, kind = kind.name(), "channel started");
            rt.direct.insert(conn.clone());
            Ok(conn)
        }
        Err(e) => {
            Counters::add(failed, 1);
            tracing::warn!(%peer, %addr, kind = kind.name(), error = %e, "channel could not be opened");
            Err(ChannelError::Open { addr, source: e })
        }
    }
}

/// Tells the pool that this sender's opening is over, when dropped.
struct OpenerDone<'a> {
    pool: &'a crate::channels::DirectPool,
    peer: &'a NodeId,
    kind: ChannelKind,
}

impl Drop for OpenerDone<'_> {
    fn drop(&mut self) {
        self.pool.open_done(self.peer, self.kind);
    }
}

/// Whether `node`'s `incarnation` is a member now, or becomes one within
/// the hello deadline (its join may reach this node after the channel it
/// opens).
async fn is_member_soon(rt: &Runtime, node: &NodeId, incarnation: u64) -> Option<PublicKey> {
    let mut events = rt.members.subscribe();
    let live = || {
        let core = rt.core.lock();
        let members = core.members();
        if !members.is_live(node, incarnation) {
            return None;
        }
        members.get(node.as_str()).map(|m| m.session_key)
    };
    if let Some(key) = live() {
        return Some(key);
    }
    let wait = rt.config.connect_timeout().min(handshake::HELLO_DEADLINE);
    let joined = tokio::time::timeout(wait, async {
        loop {
            match events.recv().await {
                Err(crate::membership::EventsError::Closed) => return,
                // A change, or changes missed: look again.
                _ if live().is_some() => return,
                _ => {}
            }
        }
    });
    let _ = joined.await;
    live()
}

/// Why a direct channel could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChannelError {
    /// The peer is not a member, or announced no address.
    #[error("{peer} announced no direct-channel address")]
    NoAddress {
        /// The peer.
        peer: NodeId,
    },
    /// Connecting or the handshake failed.
    #[error("connecting to {addr}: {source}")]
    Open {
        /// The peer's announced address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: OpenError,
    },
}

/// Why opening a channel failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error(transparent)]
    Connect(#[from] std::io::Error),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Identity(#[from] transports::auth::AuthError),
}

async fn open(
    rt: &Runtime,
    peer: &NodeId,
    addr: SocketAddr,
    key: &PublicKey,
    kind: ChannelKind,
) -> Result<Arc<DirectConn>, OpenError> {
    let hello = rt.credentials.fresh(&rt.server.hello())?;
    let config = &rt.config;
    let stream = transports::tcp::connect(
        &addr.to_string(),
        &config.tcp.options(),
        config.connect_timeout(),
    )
    .await?;
    // With TLS, the peer's certificate must name it.
    let (rd, mut wr) = rt.credentials.open(stream, peer.as_str()).await?;
    let mut reader =
        FrameReader::with_read_chunk(rd, FrameCodec::default(), config.node.read_chunk_bytes);
    // The peer must sign with the session key the membership names.
    let welcome = handshake::connect_handshake(
        &mut reader,
        &mut wr,
        &hello,
        None,
        rt.credentials.opener(Some(key)),
        config.connect_timeout(),
    )
    .await?;
    let max_message = welcome
        .max_message_bytes
        .min(config.limits.max_message_bytes);
    // Only acknowledgements come back: small frames.
    *reader.codec_mut() = FrameCodec::default().in_place();
    let (queue, mut rx) = out_queue(config.node.queue_frames, config.node.queue_bytes);
    // The application's sends come in bursts: let them share writes.
    rx.coalesce_small_batches();
    rx.chunk_above(config.limits.chunk_bytes);
    // Large bodies go in parts, a few ahead of what the peer has read:
    // the sockets hold little of them, so a small message written after
    // waits for little (the peer grants each part as it reads it).
    rx.window_parts(PART_WINDOW_CHUNKS * config.limits.chunk_bytes);
    let conn = Arc::new(DirectConn {
        peer: peer.clone(),
        kind,
        queue,
        max_message,
        state: Mutex::new(ChannelState::new(kind, Instant::now())),
    });
    let span = tracing::debug_span!("peer", %peer, kind = kind.name());
    let max_frame = FrameCodec::for_messages(max_message).max_frame();
    rt.tasks.spawn(
        async move {
            // The writer holds no sender of its own queue: it ends when the
            // channel is dropped, says goodbye, or is closed.
            if let Err(e) = transports::run_writer(wr, rx, max_frame).await {
                tracing::debug!(error = %e, "direct channel writer stopped");
            }
        }
        .instrument(span.clone()),
    );
    rt.tasks
        .spawn(outgoing_reader(rt.clone(), conn.clone(), reader).instrument(span));
    Ok(conn)
}

/// Reads the acknowledgements on an outgoing channel; when it ends, every
/// message still waiting on it fails for that receiver.
async fn outgoing_reader(
    rt: Runtime,
    conn: Arc<DirectConn>,
    mut reader: FrameReader<transports::io::ReadHalf>,
) {
    let unexpected = loop {
        let frame = tokio::select! {
            _ = rt.cancel.cancelled() => break None,
            _ = conn.queue.closed() => break (!conn.is_closing()).then(|| "the writer stopped".to_owned()),
            f = reader.next() => f,
        };
        if let Ok(Some(_)) = &frame {
            // Anything from the peer shows it is alive.
            conn.lock().handle_frame(Instant::now());
        }
        match frame {
            Ok(Some(frame)) => match frame.into_parts().0 {
                Header::Pong { .. } => {}
                Header::Credit { read } => conn.queue.grant(read),
                Header::StreamAck {
                    seq,
                    received,
                    consumed,
                } => rt.streams_out.acked(&conn.peer, seq, received, consumed),
                Header::StreamFailed { seq, reason } => {
                    rt.streams_out.failed(&conn.peer, seq, reason);
                }
                Header::Ack(ack) if ack.from == conn.peer => {
                    if ack.to_incarnation == rt.incarnation() {
                        conn.settled(ack.seq);
                        handle_ack(&rt, &ack);
                    }
                }
                Header::Acks(acks) if acks.from == conn.peer => {
                    if acks.to_incarnation == rt.incarnation() {
                        for &seq in &acks.seqs {
                            conn.settled(seq);
                        }
                        handle_acks(&rt, &acks);
                    }
                }
                // The peer stopped as planned: not an error (what was in
                // flight still fails below).
                Header::Goodbye => break None,
                other => break Some(format!("unexpected {} frame", other.kind())),
            },
            Ok(None) => {
                break (!conn.is_closing()).then(|| "the peer closed the connection".to_owned())
            }
            Err(e) => break Some(e.to_string()),
        }
    };
    rt.direct.remove(&conn);
    let lost = conn.lock().take_in_flight();
    conn.queue.close();
    if conn.kind == ChannelKind::Lazy {
        Counters::add(&rt.counters.lazy_closed, 1);
    }
    match unexpected {
        None => tracing::info!(kind = conn.kind.name(), "channel stopped"),
        Some(reason) => {
            tracing::error!(kind = conn.kind.name(), %reason, in_flight = lost.len(), "channel stopped unexpectedly")
        }
    }
    let ((), out) = rt.core.run(|core| {
        for seq in lost {
            core.handle_failure(seq, &conn.peer, SendError::Disconnected);
        }
    });
    rt.dispatch(out.events);
}

/// Closes lazy channels idle for `lazy.idle_close_ms` with nothing in
/// flight, forgets stale auto-activation windows, and declares gone the
/// members that disconnected and did not return within the failure
/// timeout. Runs for the node's life.
pub(crate) async fn idle_sweeper(rt: Runtime) {
    let policy = ChannelPolicy {
        idle_close: Duration::from_millis(rt.config.lazy.idle_close_ms),
        failure_timeout: rt.config.failure_timeout(),
    };
    let tick = (policy.idle_close.min(policy.failure_timeout) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let probe_every = Duration::from_millis(rt.config.cluster.heartbeat_interval_ms);
    let mut last_probe: Option<Instant> = None;
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            _ = rt.cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = Instant::now();
        let probe = last_probe.is_none_or(|at| now.saturating_duration_since(at) >= probe_every);
        if probe {
            last_probe = Some(now);
            nonce += 1;
        }
        for conn in rt.direct.all() {
            // The channel monitor: one whose peer has not answered probes
            // within the failure timeout is broken and closed (what was in
            // flight on it fails); the next need reopens it.
            let queued = conn.queue.queued_frames();
            // The channel's lock, then the core's: never the other way.
            let verdict = conn.lock().check(now, &policy, queued, |seq| {
                rt.core.lock().tracker().is_tracked(seq)
            });
            match verdict {
                Verdict::Broken => {
                    tracing::error!(peer = %conn.peer, kind = conn.kind.name(), "channel stopped unexpectedly: no answer to probes within the failure timeout");
                    rt.direct.remove(&conn);
                    conn.queue.close();
                }
                Verdict::CloseIdle => {
                    tracing::debug!(peer = %conn.peer, "closing idle lazy channel");
                    rt.direct.remove(&conn);
                    rt.core.lock().handle_channel_idle(&conn.peer);
                    if conn
                        .queue
                        .try_push(OutFrame::control(Header::Goodbye), Lane::Control)
                        .is_err()
                    {
                        conn.queue.close();
                    }
                }
                Verdict::Keep if probe => {
                    let _ = conn
                        .queue
                        .try_push(OutFrame::control(Header::Ping { nonce }), Lane::Control);
                }
                Verdict::Keep => {}
            }
        }
    }
}

/// Accepts direct channels from other nodes for the node's life.
pub(crate) async fn accept_loop(rt: Runtime, listener: TcpListener) {
    let places = Arc::new(Semaphore::new(rt.config.node.max_channels));
    let unproven = Arc::new(Semaphore::new(rt.config.node.max_unauthenticated));
    let mut turned_away = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = rt.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, addr)) => {
                // Over a cap: refused at once, before anything is read or
                // spawned.
                let admitted = places
                    .clone()
                    .try_acquire_owned()
                    .ok()
                    .zip(unproven.clone().try_acquire_owned().ok());
                let Some((place, unproven)) = admitted else {
                    drop(stream);
                    turned_away += 1;
                    Counters::add(&rt.counters.channels_refused, 1);
                    if turned_away.is_power_of_two() {
                        tracing::warn!(%addr, total = turned_away, "direct channel refused: over node.max_channels or node.max_unauthenticated");
                    }
                    continue;
                };
                let span = tracing::debug_span!("inbound", %addr, peer = tracing::field::Empty);
                rt.tasks
                    .spawn(serve_inbound(rt.clone(), stream, place, unproven).instrument(span));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a direct channel failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One inbound direct channel: handshake, then deliver each message and
/// acknowledge it on the same connection.
async fn serve_inbound(
    rt: Runtime,
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
    unproven: OwnedSemaphorePermit,
) {
    let config = &rt.config;
    if let Err(e) = transports::tcp::tune(&stream, &config.tcp.options()) {
        tracing::debug!(error = %e, "could not tune socket");
    }
    let deadline =
        tokio::time::Instant::now() + config.connect_timeout().min(handshake::HELLO_DEADLINE);
    let accepted = tokio::time::timeout_at(
        deadline,
        transports::io::accept(stream, rt.credentials.tls.as_ref()),
    )
    .await;
    let (rd, mut wr, certificates) = match accepted {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            if rt.direct.refusals.admit() {
                tracing::warn!(error = %e, "refused a direct channel: TLS handshake failed");
            }
            return;
        }
        Err(_) => {
            if rt.direct.refusals.admit() {
                tracing::info!(
                    "closing a direct channel: no TLS handshake within the hello deadline"
                );
            }
            return;
        }
    };
    let mut reader =
        FrameReader::with_read_chunk(rd, FrameCodec::default(), config.node.read_chunk_bytes);
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let hello = match handshake::accept_hello(&mut reader, &mut wr, &config.cluster.name, remaining)
        .await
    {
        Ok(h) => h,
        Err(e) => {
            if rt.direct.refusals.admit() {
                tracing::warn!(error = %e, "refused a direct channel");
            }
            return;
        }
    };
    // The peer's id is checked before it is logged.
    if !transports::protocol::valid_name(hello.node.as_str()) {
        if rt.direct.refusals.admit() {
            tracing::warn!(
                peer = %handshake::for_log(hello.node.as_str()),
                "refused a direct channel: invalid node id"
            );
        }
        let detail = "a node id is 1 to 255 bytes".to_owned();
        handshake::refuse(&mut wr, RefusalReason::ProtocolViolation, detail).await;
        return;
    }
    tracing::Span::current().record("peer", tracing::field::display(&hello.node));
    // With TLS, the opener's certificate must name the id it claims.
    if let (Some(tls), Some(certificates)) = (&rt.credentials.tls, &certificates) {
        if !tls.names(certificates, hello.node.as_str()) {
            if rt.direct.refusals.admit() {
                tracing::warn!(
                    "refused a direct channel: the certificate does not name the opener"
                );
            }
            let detail = "the certificate does not name this node id".to_owned();
            handshake::refuse(&mut wr, RefusalReason::BadCredentials, detail).await;
            return;
        }
    }
    // Only a current member may open a channel: a made-up id gets nothing
    // here (no duplicate window, no inbox delivery). A member that joined
    // a moment ago may be known here a moment later: its join is waited
    // for, within the hello deadline.
    let Some(key) = is_member_soon(&rt, &hello.node, hello.incarnation).await else {
        if rt.direct.refusals.admit() {
            tracing::warn!(
                incarnation = hello.incarnation,
                "refused a direct channel: not a member"
            );
        }
        let detail = "not a current member of the cluster".to_owned();
        handshake::refuse(&mut wr, RefusalReason::ProtocolViolation, detail).await;
        return;
    };
    // It must be that member's session (its key, proven next by its
    // signature), not another holder of the cluster secret.
    if key != hello.session_key {
        if rt.direct.refusals.admit() {
            tracing::warn!(
                incarnation = hello.incarnation,
                "refused a direct channel: not the member's session key"
            );
        }
        let detail = "wrong or no credentials".to_owned();
        handshake::refuse(&mut wr, RefusalReason::BadCredentials, detail).await;
        return;
    }
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    if let Err(e) = handshake::challenge(
        &mut reader,
        &mut wr,
        &hello,
        rt.credentials.secret.as_ref(),
        Some(&rt.credentials.key),
        remaining,
    )
    .await
    {
        if rt.direct.refusals.admit() {
            tracing::warn!(error = %e, "refused a direct channel");
        }
        return;
    }
    // What the opener may send to (from this node's copy of the cluster's
    // file); `None`: anything. Messages to this node itself, nearly all of
    // them, are judged once here.
    let permissions =
        Some(rt.permissions.of(hello.node.as_str())).filter(|p| !p.allows_everything());
    let to_me_permitted = permissions
        .as_ref()
        .is_none_or(|p| p.may_send(TargetRef::Node(rt.id.as_str())));
    // Proven: the place among the unproven is free again (the channel's
    // own place is held until it ends).
    drop(unproven);
    let max_message = hello.max_message_bytes.min(config.limits.max_message_bytes);
    let welcome = Header::Welcome(Box::new(Welcome {
        version: PROTOCOL_VERSION,
        cluster: config.cluster.name.clone(),
        max_message_bytes: config.limits.max_message_bytes,
        members: Vec::new(),
        heartbeat_addr: None,
        session_secret: None,
    }));
    if let Err(e) = handshake::write_frame(&mut wr, OutFrame::control(welcome)).await {
        tracing::debug!(error = %e, "could not answer a direct channel");
        return;
    }
    let codec = FrameCodec::for_messages(max_message);
    // Message bodies are copied out as they are delivered.
    *reader.codec_mut() = codec.in_place();
    // A peer that starts a frame and stalls in it is cut off after the
    // failure timeout.
    reader.set_stall_limit(config.failure_timeout());
    let (queue, rx) = out_queue(config.node.queue_frames, config.node.queue_bytes);
    // The opener writes large bodies in parts as this grants them.
    reader.grant_to(queue.clone());
    rt.tasks.spawn(
        async move {
            if let Err(e) = transports::run_writer(wr, rx, codec.max_frame()).await {
                tracing::debug!(error = %e, "inbound channel writer stopped");
            }
        }
        .in_current_span(),
    );
    tracing::debug!("inbound channel started");
    // Delivered bodies are copied out of the read buffer into this.
    let mut bodies = BodyArena::new();
    // The sender's and its services' names are validated once, not per
    // message.
    let mut names = NameCache::new();
    let mut inboxes = InboxCache::default();
    let mut acks = AckBatch::new(rt.id.clone(), rt.core.clone(), queue.clone());
    loop {
        if !reader.has_buffered_frame() {
            acks.flush().await;
        }
        // What the last read brought first, without awaiting; small
        // frames are read in place.
        let raw = if reader.has_buffered_frame() {
            reader.try_next_frame()
        } else {
            tokio::select! {
                _ = rt.cancel.cancelled() => break,
                _ = queue.closed() => break,
                f = reader.next_frame() => f,
            }
        };
        let raw = match raw {
            Ok(Some(raw)) => raw,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "closing inbound channel on a frame error");
                break;
            }
        };
        let (header, header_len) = match peek_cached(&raw, &mut names) {
            Ok(peeked) => peeked,
            Err(e) => {
                tracing::warn!(error = %e, "closing inbound channel on a frame error");
                break;
            }
        };
        let header = match header {
            Peeked::Message(h) => {
                if h.sender != hello.node.as_str() || h.incarnation != hello.incarnation {
                    tracing::warn!(
                        sender = h.sender,
                        "closing inbound channel: message from another sender"
                    );
                    break;
                }
                let is_reply = h.kind.is_reply();
                let permitted = match (&permissions, h.target) {
                    (None, _) => true,
                    _ if is_reply => true,
                    (Some(_), TargetRef::Node(to)) if same_name(to, rt.id.as_str()) => {
                        to_me_permitted
                    }
                    (Some(p), target) => p.may_send(target),
                };
                if !permitted {
                    if rt.direct.refusals.admit() {
                        tracing::warn!(target = %h.target, service = h.service, "refused a message: its sender may not send to that target");
                    }
                    Counters::add(&rt.counters.refused_not_permitted, 1);
                    let answer = Answer {
                        to: hello.node.clone(),
                        to_incarnation: h.incarnation,
                        seq: h.seq,
                        kind: h.kind,
                    };
                    let status = AckStatus::Failed(DeliveryFailure::NotPermitted);
                    answer.send(&rt.id, &rt.core, &queue, status).await;
                    continue;
                }
                Counters::add(&rt.counters.received_direct, 1);
                let body = bodies.owned_body(&raw, header_len);
                let later = deliver_now(&rt, &h, body, &mut acks, &mut inboxes, Received::Direct);
                if let Some(later) = later {
                    let delivered =
                        deliver_later(&rt, &h, later, &queue, &mut acks, &mut inboxes).await;
                    if delivered.is_err() {
                        break;
                    }
                }
                // As the message-server reader: the applications it woke
                // get their turn, after what it accepted is acknowledged.
                if !tokio::task::coop::has_budget_remaining() {
                    acks.flush().await;
                }
                tokio::task::consume_budget().await;
                continue;
            }
            Peeked::Ack(_) | Peeked::Acks(_) => {
                tracing::warn!(kind = "ack", "closing inbound channel: unexpected frame");
                break;
            }
            Peeked::Other(header) => *header,
        };
        match header {
            Header::Ping { nonce } => {
                let _ = queue.try_push(OutFrame::control(Header::Pong { nonce }), Lane::Control);
            }
            Header::StreamStart(start) => {
                let msg = &start.msg;
                if msg.sender != hello.node
                    || msg.incarnation != hello.incarnation
                    || !transports::protocol::valid_name(&msg.service)
                {
                    tracing::warn!(sender = %msg.sender, "closing inbound channel: a stream from another sender, or to a bad service name");
                    break;
                }
                if permissions.is_some() && !to_me_permitted {
                    Counters::add(&rt.counters.refused_not_permitted, 1);
                    let refused = Header::StreamFailed {
                        seq: msg.seq,
                        reason: DeliveryFailure::NotPermitted.to_string(),
                    };
                    let _ = queue.try_push(OutFrame::control(refused), Lane::Control);
                    continue;
                }
                if let Started::New(stream) = rt.streams_in.start(&start, &queue) {
                    Counters::add(&rt.counters.received_direct, 1);
                    let message = Message {
                        sender: hello.node.clone(),
                        sender_incarnation: msg.incarnation,
                        seq: msg.seq,
                        service: SmolStr::new(&*msg.service),
                        body: bytes::Bytes::new(),
                        one_way: true,
                        priority: msg.priority,
                        answering: None,
                        stream: Some(Box::new(stream)),
                        expires_ms: msg.expires_ms.unwrap_or(0),
                    };
                    if let Err((failure, message)) = deliver_stream(&rt, message, &queue).await {
                        if let Some(stream) = message.and_then(|mut m| m.body_stream()) {
                            stream.give_up(failure.to_string());
                        }
                    }
                }
            }
            Header::StreamChunk { seq, offset } => {
                let body = bodies.owned_body(&raw, header_len);
                let chunk = rt
                    .streams_in
                    .chunk(&hello.node, hello.incarnation, seq, offset, body);
                if let Err(why) = chunk {
                    tracing::warn!(
                        seq,
                        offset,
                        why,
                        "closing inbound channel: a bad stream chunk"
                    );
                    break;
                }
            }
            Header::StreamFailed { seq, reason } => {
                rt.streams_in
                    .sender_failed(&hello.node, hello.incarnation, seq, reason);
            }
            Header::Goodbye => break,
            other => {
                tracing::warn!(
                    kind = other.kind(),
                    "closing inbound channel: unexpected frame"
                );
                break;
            }
        }
    }
    // What was accepted is acknowledged before the goodbye.
    acks.flush_now();
    tracing::debug!("inbound channel stopped");
    // A goodbye back lets the opener tell a planned stop from a break.
    let _ = queue.try_push(OutFrame::control(Header::Goodbye), Lane::Control);
}
