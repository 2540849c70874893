//! The node's read task on its message-server connection: delivers
//! messages into inboxes (acknowledging them once accepted), and feeds
//! routing results, acknowledgements, replies and membership changes to
//! the delivery tracker.

use std::sync::Arc;

use bytes::Bytes;
use cluster_manager::core::Receipt;
use smol_str::SmolStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use transports::frame::{peek_cached, BodyArena, NameCache, Peeked};
use transports::protocol::{
    same_name, Ack, AckRef, AckStatus, Acks, DeliveryFailure, Header, MemberEvent, MessageKind,
    MessageRef, NodeId, Routed,
};
use transports::{Frame, FrameReader, Lane, OutFrame, OutQueue, PushError, Wait};

use crate::counters::Counters;

use crate::core::CoreCell;
use crate::inbox::{Closed, InboxSender, Message};
use crate::runtime::Runtime;
use crate::services::{AckToken, Answer, Delivery, ServiceQueue, WhenFull};

/// How a link to the message server ended.
#[derive(Debug)]
pub(crate) enum LinkEnd {
    /// The node is shutting down.
    Shutdown,
    /// The connection broke, or the server misbehaved.
    Lost(LinkLost),
    /// The primary answers again (while this link is to a standby).
    PrimaryBack,
}

/// Why a link to the message server was lost.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkLost {
    /// The server closed the connection without a goodbye.
    #[error("the message server closed the connection")]
    Closed,
    /// The server said goodbye.
    #[error("the message server is stopping")]
    Stopping,
    /// A frame could not be read.
    #[error("reading a frame: {0}")]
    Read(#[source] transports::FrameError),
    /// A frame could not be written.
    #[error("writing: {0}")]
    Write(#[source] transports::FrameError),
    /// The server sent a frame it never sends to a node.
    #[error("unexpected {kind} frame from the message server")]
    Unexpected {
        /// The frame's kind.
        kind: &'static str,
    },
    /// The server stopped answering heartbeats.
    #[error("the message server did not answer heartbeats within the failure timeout")]
    Silent,
    /// Nothing arrived on the connection for the failure timeout (the
    /// server answers every report, sent each heartbeat interval): the
    /// data network is down, whatever the heartbeats say.
    #[error("nothing arrived from the message server on the connection within the failure timeout (its data network is down?)")]
    Quiet,
}

/// Reads frames from the message server until the link ends.
pub(crate) async fn read_frames(
    rt: &Runtime,
    reader: &mut FrameReader<transports::io::ReadHalf>,
) -> LinkEnd {
    // Delivered bodies are copied out of the read buffer into this.
    let mut bodies = BodyArena::new();
    // Senders' and services' names are validated once, not per message.
    let mut names = NameCache::new();
    let mut inboxes = InboxCache::default();
    let mut acks = AckBatch::new(rt.id.clone(), rt.core.clone(), rt.server.queue.clone());
    // The server answers each report (one per heartbeat interval): a
    // connection silent for the failure timeout is dead even while the
    // heartbeats, on their own network, are answered.
    let mut silence = transports::io::Silence::new(rt.config.failure_timeout());
    // Membership events read and not yet applied: those one read brings
    // are applied together, before any other frame and before the next
    // wait for the socket (see `Runtime::handle_member_events`).
    let mut members: Vec<MemberEvent> = Vec::new();
    loop {
        if !members.is_empty()
            && (!reader.has_buffered_frame() || members.len() >= MEMBER_EVENTS_AT_ONCE)
        {
            rt.handle_member_events(&mut members).await;
        }
        if !reader.has_buffered_frame() {
            // About to wait for the socket: what was accepted meanwhile is
            // acknowledged now.
            acks.flush().await;
        }
        // What the last read brought first, without awaiting; small
        // frames are read in place.
        let raw = if reader.has_buffered_frame() {
            reader.try_next_frame()
        } else {
            tokio::select! {
                biased;
                _ = rt.cancel.cancelled() => return LinkEnd::Shutdown,
                f = reader.next_frame() => {
                    silence.heard();
                    f
                }
                // Last: a frame that is ready wins over the timer.
                () = silence.elapsed() => return LinkEnd::Lost(LinkLost::Quiet),
            }
        };
        let raw = match raw {
            Ok(Some(raw)) => raw,
            Ok(None) => return LinkEnd::Lost(LinkLost::Closed),
            Err(e) => return LinkEnd::Lost(LinkLost::Read(e)),
        };
        let (header, header_len) = match peek_cached(&raw, &mut names) {
            Ok(peeked) => peeked,
            Err(e) => return LinkEnd::Lost(LinkLost::Read(e)),
        };
        if matches!(&header, Peeked::Other(h) if matches!(**h, Header::Member(_))) {
            if let Peeked::Other(h) = header {
                if let Header::Member(event) = *h {
                    members.push(event);
                }
            }
            continue;
        }
        if !members.is_empty() {
            rt.handle_member_events(&mut members).await;
        }
        let header = match header {
            Peeked::Message(h) => {
                Counters::add(&rt.counters.received_server, 1);
                let body = bodies.owned_body(&raw, header_len);
                let later = deliver_now(rt, &h, body, &mut acks, &mut inboxes, Received::Server);
                if let Some(later) = later {
                    let queue = &rt.server.queue;
                    let delivered =
                        deliver_later(rt, &h, later, queue, &mut acks, &mut inboxes).await;
                    if delivered.is_err() {
                        return LinkEnd::Shutdown;
                    }
                }
                // Each delivery takes from tokio's cooperative budget, as a
                // channel send does: a reader with a socket that never runs
                // dry still lets the applications it woke take their
                // messages (a woken task waits for the waker to yield).
                // Before it yields, what it accepted is acknowledged.
                if !tokio::task::coop::has_budget_remaining() {
                    acks.flush().await;
                }
                tokio::task::consume_budget().await;
                continue;
            }
            Peeked::Ack(ack) => {
                handle_ack_ref(rt, &ack);
                continue;
            }
            Peeked::Acks(_) => {
                match Frame::decode(raw.to_bytes()) {
                    Ok(frame) => {
                        if let (Header::Acks(batch), _) = frame.into_parts() {
                            handle_acks(rt, &batch);
                        }
                    }
                    Err(e) => return LinkEnd::Lost(LinkLost::Read(e)),
                }
                continue;
            }
            Peeked::Other(header) => *header,
        };
        match header {
            Header::Resolved { token, result } => {
                let waiter = rt
                    .server
                    .resolves
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&token);
                if let Some(w) = waiter {
                    let _ = w.send(result);
                }
            }
            Header::Routed(routed) => handle_routed(rt, routed),
            // Taken above.
            Header::Member(_) => {}
            Header::Subscribed { token } => {
                let waiter = rt
                    .server
                    .subscriptions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&token);
                if let Some(w) = waiter {
                    let _ = w.send(Ok(()));
                }
            }
            Header::SubscribeRefused { token, reason } => {
                let waiter = rt
                    .server
                    .subscriptions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&token);
                if let Some(w) = waiter {
                    let _ = w.send(Err(reason));
                }
            }
            Header::DeadLetterEntry { token, entry } => {
                let body = bodies.owned_body(&raw, header_len);
                rt.server.dead_letters.entry(token, *entry, body);
            }
            Header::DeadLettersEnd { token, result } => {
                rt.server.dead_letters.end(token, result);
            }
            Header::TraceStarted => {
                let sink = rt.server.trace.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(sink) = sink.as_ref() {
                    sink.offer(crate::trace::TraceEvent::Started);
                }
            }
            Header::Traced(traced) => {
                let body = bodies.owned_body(&raw, header_len);
                let sink = rt.server.trace.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(sink) = sink.as_ref() {
                    sink.offer(crate::trace::TraceEvent::Message {
                        traced: *traced,
                        body,
                    });
                }
            }
            Header::TraceEnd {
                captured,
                dropped,
                reason,
            } => {
                let sink = rt
                    .server
                    .trace
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if let Some(sink) = sink {
                    sink.offer(crate::trace::TraceEvent::End {
                        captured,
                        dropped,
                        reason,
                    });
                }
            }
            Header::LowMark { mark } => {
                // Everything before it is taken in: the server may send
                // more `Low` messages.
                let credit = OutFrame::control(Header::LowCredit { mark });
                let queue = &rt.server.queue;
                if let Err(PushError::Full(credit)) = queue.try_push(credit, Lane::Control) {
                    let _ = queue.push(*credit, Lane::Control, Wait::Forever).await;
                }
            }
            Header::LowCredit { mark } => {
                if rt.server.queue.grant_low(mark).is_err() {
                    return LinkEnd::Lost(LinkLost::Unexpected {
                        kind: "low credit for a mark never written",
                    });
                }
            }
            // The answer to a report: its arrival is all it says.
            Header::Pong { .. } => {}
            Header::Goodbye => return LinkEnd::Lost(LinkLost::Stopping),
            other => return LinkEnd::Lost(LinkLost::Unexpected { kind: other.kind() }),
        }
    }
}

/// A receiver's acknowledgement, from any connection.
pub(crate) fn handle_ack(rt: &Runtime, ack: &Ack) {
    let ((), out) = rt.core.run(|core| core.handle_ack(ack));
    rt.dispatch(out.events);
}

/// [`handle_ack`] for an acknowledgement read in place.
fn handle_ack_ref(rt: &Runtime, ack: &AckRef<'_>) {
    let ((), out) = rt.core.run(|core| {
        let ack = Ack {
            to: rt.id.clone(),
            to_incarnation: ack.to_incarnation,
            seq: ack.seq,
            from: core.members().id_of(ack.from),
            from_incarnation: ack.from_incarnation,
            status: ack.status.clone(),
        };
        core.handle_ack(&ack)
    });
    rt.dispatch(out.events);
}

/// Several acknowledgements of accepted messages, from any connection.
pub(crate) fn handle_acks(rt: &Runtime, acks: &Acks) {
    let ((), out) = rt.core.run(|core| core.handle_acks(acks));
    rt.dispatch(out.events);
}

/// Acknowledgements of accepted messages gathered while frames keep
/// arriving: sent as one [`Acks`] frame per sender when the reader is about
/// to wait for the socket, when the sender changes, when the batch is full,
/// or before the reader may wait on a full inbox. A batch of one goes as a
/// plain [`Ack`].
#[derive(Debug)]
pub(crate) struct AckBatch {
    /// This node: who acknowledges.
    from: NodeId,
    /// Its core, for the incarnation, read when a frame is made (it may
    /// change while a direct channel stays open).
    core: Arc<CoreCell>,
    /// Where the acknowledgements go.
    queue: OutQueue,
    to: Option<(NodeId, u64)>,
    seqs: Vec<u64>,
}

/// Most acknowledgements in one [`Acks`] frame.
const MAX_BATCHED_ACKS: usize = 1024;

/// Most membership events applied together (see `read_frames`): a read
/// of a join burst brings hundreds; the core is locked for this many at
/// most.
const MEMBER_EVENTS_AT_ONCE: usize = 256;

impl AckBatch {
    /// An empty batch of acknowledgements from `node` (of the incarnation
    /// its core has when they go out), to be queued on `queue`.
    pub(crate) fn new(node: NodeId, core: Arc<CoreCell>, queue: OutQueue) -> Self {
        AckBatch {
            from: node,
            core,
            queue,
            to: None,
            seqs: Vec::new(),
        }
    }

    /// Adds the acknowledgement of message `seq` from `to`'s incarnation
    /// `to_incarnation`.
    pub(crate) async fn add(&mut self, to: NodeId, to_incarnation: u64, seq: u64) {
        let same = matches!(&self.to, Some((t, i)) if *i == to_incarnation && *t == to);
        if !same {
            self.flush().await;
            self.to = Some((to, to_incarnation));
        }
        self.seqs.push(seq);
        if self.seqs.len() >= MAX_BATCHED_ACKS {
            self.flush().await;
        }
    }

    /// [`AckBatch::add`] when that needs no flush (the batch is empty or
    /// for the same sender, and stays under its limit); gives `to` back
    /// otherwise.
    pub(crate) fn try_add(
        &mut self,
        to: NodeId,
        to_incarnation: u64,
        seq: u64,
    ) -> Result<(), NodeId> {
        if self.seqs.len() + 1 >= MAX_BATCHED_ACKS {
            return Err(to);
        }
        if self.seqs.is_empty() {
            self.to = Some((to, to_incarnation));
        } else if !matches!(&self.to, Some((t, i)) if *i == to_incarnation && *t == to) {
            return Err(to);
        }
        self.seqs.push(seq);
        Ok(())
    }

    /// Whether the acknowledgements go out on `queue`.
    pub(crate) fn goes_to(&self, queue: &OutQueue) -> bool {
        self.queue.same_queue(queue)
    }

    /// Sends what was gathered.
    pub(crate) async fn flush(&mut self) {
        // Waiting here waits only for this node's own outgoing socket.
        if let Some(frame) = self.take_frame() {
            let _ = self.queue.push(frame, Lane::Control, Wait::Forever).await;
        }
    }

    /// Queues what was gathered if there is room right now: the last word
    /// of a reader that stops, or whose future is dropped (see `Drop`).
    pub(crate) fn flush_now(&mut self) {
        if let Some(frame) = self.take_frame() {
            if self.queue.try_push(frame, Lane::Control).is_err() {
                tracing::warn!(
                    to = ?self.to,
                    "acknowledgements lost: the outgoing queue is full or closed"
                );
            }
        }
    }

    /// The frame acknowledging what was gathered, if anything was.
    fn take_frame(&mut self) -> Option<OutFrame> {
        let (to, to_incarnation) = self.to.clone()?;
        let from_incarnation = self.core.lock().incarnation();
        let header = match self.seqs.len() {
            0 => return None,
            1 => Header::Ack(Ack {
                to,
                to_incarnation,
                seq: self.seqs[0],
                from: self.from.clone(),
                from_incarnation,
                status: AckStatus::Accepted,
            }),
            _ => Header::Acks(Acks {
                to,
                to_incarnation,
                from: self.from.clone(),
                from_incarnation,
                seqs: self.seqs.clone(),
            }),
        };
        self.seqs.clear();
        Some(OutFrame::control(header))
    }
}

impl Drop for AckBatch {
    /// A reader whose future is dropped (its link replaced, say) still
    /// queues what it accepted: the node's queue to the message server
    /// outlives the link, so the acknowledgements go out on the next one.
    fn drop(&mut self) {
        self.flush_now();
    }
}

/// The message server's word on where a message went (the core parks a
/// message to a member that is only reconnecting).
fn handle_routed(rt: &Runtime, routed: Routed) {
    let ((), out) = rt.core.run(|core| core.handle_routed(routed));
    rt.dispatch(out.events);
}

/// The path a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Received {
    /// Through the message server.
    Server,
    /// Over a lazy or session channel.
    Direct,
}

/// The node is shutting down; stop reading.
pub(crate) struct Stopping;

/// What [`deliver_now`] left to [`deliver_later`]: whatever may wait.
pub(crate) enum Later {
    /// From an incarnation declared failed: refused.
    Failed,
    /// Seen before, from `sender`: acknowledged again, not delivered again.
    Duplicate(NodeId),
    /// Older than the duplicate window of `sender`: refused, not
    /// delivered, never acknowledged as accepted.
    Stale(NodeId),
    /// Accepted from `sender` (recorded as seen, unless one-way), not
    /// delivered yet.
    New { sender: NodeId, body: Bytes },
    /// Delivered; its acknowledgement to `sender` waits for the batch.
    Ack(NodeId),
    /// Its time to live ran out before it arrived: not delivered,
    /// dead-lettered, and (if acknowledged) answered `Expired`.
    Expired { sender: NodeId, body: Bytes },
}

/// Hands a message to its service's inbox, or completes a request with
/// its reply, as far as that goes without waiting: the usual message is
/// done here (`None`), and no future is made for it (the reader's is
/// large: making and moving one for each message showed in profiles).
/// What may wait is left to [`deliver_later`].
pub(crate) fn deliver_now(
    rt: &Runtime,
    h: &MessageRef<'_>,
    body: Bytes,
    batch: &mut AckBatch,
    cache: &mut InboxCache,
    path: Received,
) -> Option<Later> {
    tracing::trace!(sender = h.sender, seq = h.seq, ?path, "message");
    if let MessageKind::Reply {
        request_seq,
        requester_incarnation,
    } = h.kind
    {
        let ((), out) = rt
            .core
            .run(|core| core.handle_reply(h.sender, requester_incarnation, request_seq, body));
        rt.dispatch(out.events);
        return None;
    }
    if let MessageKind::ReplyError {
        request_seq,
        requester_incarnation,
        code,
    } = h.kind
    {
        let ((), out) = rt.core.run(|core| {
            core.handle_reply_error(h.sender, requester_incarnation, request_seq, code, &body)
        });
        rt.dispatch(out.events);
        return None;
    }
    // Nothing is accepted from an incarnation declared failed. At most
    // once per runtime: a resent message is acknowledged again, not
    // delivered again. Only acknowledged messages are ever resent (they
    // alone are kept for it), so a one-way message, sent once, skips the
    // duplicate window and the core's lock (unless an incarnation was
    // declared failed).
    let sender = if h.kind == MessageKind::Notify {
        let failed =
            rt.core.any_failed() && rt.core.lock().members().is_failed(h.sender, h.incarnation);
        if failed {
            return Some(Later::Failed);
        }
        cache.sender(h.sender)
    } else {
        let receipt = rt
            .core
            .lock()
            .handle_message(h.sender, h.incarnation, h.seq, h.kind);
        match receipt {
            Receipt::Deliver(sender) => sender,
            // A recoverable message's stream number says whether a copy
            // was stored (see `deliver_recoverable`).
            Receipt::Duplicate(sender) if matches!(h.kind, MessageKind::Recoverable { .. }) => {
                sender
            }
            Receipt::Duplicate(sender) => return Some(Later::Duplicate(sender)),
            Receipt::Refused => return Some(Later::Failed),
            Receipt::Stale(sender) => return Some(Later::Stale(sender)),
        }
    };
    // A recoverable message is stored before it is delivered (and an
    // expired one taken in its stream's order: see `recovery`).
    if matches!(h.kind, MessageKind::Recoverable { .. }) {
        return Some(Later::New { sender, body });
    }
    // The clock is read only for a message that expires.
    if h.expires_ms.is_some() && h.expired(crate::options::unix_ms()) {
        return Some(Later::Expired { sender, body });
    }
    // The inbox of the last message's service, while no backlog waits
    // before it: no lookup.
    let cached = match cache.get(rt, h.service) {
        Some(cached)
            if cached.backlog.load(Ordering::Acquire) == 0
                && !(cached.on_processed && h.kind == MessageKind::Send) =>
        {
            cached
        }
        _ => return Some(Later::New { sender, body }),
    };
    // Only a `Send` is acknowledged when all goes well.
    let ack_to = (h.kind == MessageKind::Send).then(|| sender.clone());
    match cached
        .inbox
        .try_send(new_message(rt, h, sender, cached.name.clone(), body))
    {
        Ok(()) => ack_to.and_then(|to| {
            batch
                .try_add(to, h.incarnation, h.seq)
                .err()
                .map(Later::Ack)
        }),
        // Full, or its receiver gone: the usual way.
        Err(mut message) => Some(Later::New {
            sender: message.sender.clone(),
            body: std::mem::take(&mut message.body),
        }),
    }
}

/// The message `h` from `sender` to `service`, with `body`.
fn new_message(
    rt: &Runtime,
    h: &MessageRef<'_>,
    sender: NodeId,
    service: SmolStr,
    body: Bytes,
) -> Message {
    Message {
        sender,
        sender_incarnation: h.incarnation,
        seq: h.seq,
        service,
        body,
        one_way: h.kind == MessageKind::Notify,
        priority: h.priority,
        stream: None,
        expires_ms: h.expires_ms.unwrap_or(0),
        answering: (h.kind == MessageKind::Request).then(|| {
            Box::new(crate::inbox::Answering {
                replier: Some(rt.replier.clone()),
                ..Default::default()
            })
        }),
    }
}

/// Delivers a message that came as a stream (see [`crate::stream`]) to
/// `service`, as [`deliver_later`] delivers a one-way message: straight
/// into the inbox when no backlog waits, else behind the backlog, waiting
/// for room for at most `node.inbox_wait_ms`.
///
/// # Errors
///
/// Why it was not delivered, with the message handed back if it still
/// is (one given up waiting was dropped, and its stream with it).
pub(crate) async fn deliver_stream(
    rt: &Runtime,
    message: Message,
    acks: &OutQueue,
) -> Result<(), (DeliveryFailure, Option<Message>)> {
    let q = {
        let inboxes = rt
            .services
            .inboxes
            .read()
            .unwrap_or_else(|p| p.into_inner());
        inboxes.get(message.service.as_str()).cloned()
    };
    let Some(q) = q else {
        return Err((DeliveryFailure::NoSuchService, Some(message)));
    };
    let message = if q.backlog.load(Ordering::Acquire) == 0 {
        match q.inbox.try_send(message) {
            Ok(()) => return Ok(()),
            Err(message) => message,
        }
    } else {
        message
    };
    q.backlog.fetch_add(1, Ordering::AcqRel);
    let delivery = Delivery {
        answer: Answer {
            to: message.sender.clone(),
            to_incarnation: message.sender_incarnation,
            seq: message.seq,
            kind: MessageKind::Notify,
        },
        message,
        acks: acks.clone(),
    };
    let wait = std::time::Duration::from_millis(rt.config.node.inbox_wait_ms);
    match tokio::time::timeout(wait, q.tx.send(delivery)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(refused)) => {
            q.backlog.fetch_sub(1, Ordering::AcqRel);
            Err((DeliveryFailure::NoSuchService, Some(refused.0.message)))
        }
        Err(_) => {
            // Dropped with the send, and its stream with it.
            q.backlog.fetch_sub(1, Ordering::AcqRel);
            Err((DeliveryFailure::ReceiverOverloaded, None))
        }
    }
}

/// Hands a recoverable message (or a copy of one) to
/// [`crate::recovery`]: stored, then acknowledged, if it is the next of
/// its stream; answered at once otherwise.
async fn deliver_recoverable(
    rt: &Runtime,
    h: &MessageRef<'_>,
    sender: NodeId,
    body: Bytes,
    (epoch, pseq, floor): (u64, u64, u64),
    acks: &OutQueue,
) -> Result<(), Stopping> {
    let answer = Answer {
        to: sender.clone(),
        to_incarnation: h.incarnation,
        seq: h.seq,
        kind: h.kind,
    };
    let queue = {
        let inboxes = rt
            .services
            .inboxes
            .read()
            .unwrap_or_else(|p| p.into_inner());
        inboxes.get(h.service).cloned()
    };
    let Some(queue) = queue else {
        let failed = AckStatus::Failed(DeliveryFailure::NoSuchService);
        answer.send(&rt.id, &rt.core, acks, failed).await;
        return Ok(());
    };
    if rt.replaying(h.service) {
        let failed = AckStatus::Failed(DeliveryFailure::Rejected(
            "the receiver is still handing over messages stored before its restart".into(),
        ));
        answer.send(&rt.id, &rt.core, acks, failed).await;
        return Ok(());
    }
    let message = new_message(rt, h, sender.clone(), SmolStr::new(h.service), body);
    let receipt = crate::recovery::Receipt {
        origin: sender,
        epoch,
        pseq,
        message,
        answer: (answer, acks.clone()),
        queue,
    };
    rt.receive_recoverable(receipt, floor).await;
    Ok(())
}

/// Does what [`deliver_now`] left: refusals and acknowledgements that may
/// wait for room in this node's outgoing queue (`acks`, the connection the
/// message came on), and deliveries that may wait for the service's inbox.
///
/// # Errors
///
/// [`Stopping`] if the node is shutting down.
pub(crate) async fn deliver_later(
    rt: &Runtime,
    h: &MessageRef<'_>,
    later: Later,
    acks: &OutQueue,
    batch: &mut AckBatch,
    cache: &mut InboxCache,
) -> Result<(), Stopping> {
    let answer = |to: NodeId| Answer {
        to,
        to_incarnation: h.incarnation,
        seq: h.seq,
        kind: h.kind,
    };
    if let MessageKind::Recoverable { epoch, pseq, floor } = h.kind {
        if let Later::New { sender, body } = later {
            return deliver_recoverable(rt, h, sender, body, (epoch, pseq, floor), acks).await;
        }
    }
    let (sender, body) = match later {
        Later::Failed => {
            tracing::debug!(
                sender = h.sender,
                incarnation = h.incarnation,
                "refused a message from a failed incarnation"
            );
            Counters::add(&rt.counters.refused_failed, 1);
            let status = AckStatus::Failed(DeliveryFailure::Rejected(
                "the sender's incarnation was declared failed".into(),
            ));
            answer(NodeId::new(h.sender))
                .send(&rt.id, &rt.core, acks, status)
                .await;
            return Ok(());
        }
        Later::Duplicate(sender) => {
            tracing::trace!(sender = h.sender, seq = h.seq, "duplicate dropped");
            // A copy of a message still being processed: its own
            // acknowledgement comes once it is.
            if rt.unacked.contains(&sender, h.incarnation, h.seq) {
                return Ok(());
            }
            answer(sender)
                .send(&rt.id, &rt.core, acks, AckStatus::Accepted)
                .await;
            return Ok(());
        }
        Later::Stale(sender) => {
            let status = AckStatus::Failed(DeliveryFailure::Rejected(
                "older than the receiver's duplicate window: it may have been delivered before"
                    .into(),
            ));
            answer(sender).send(&rt.id, &rt.core, acks, status).await;
            return Ok(());
        }
        Later::Ack(to) => {
            batch.add(to, h.incarnation, h.seq).await;
            return Ok(());
        }
        Later::Expired { sender, body } => {
            tracing::debug!(sender = h.sender, seq = h.seq, "an expired message arrived");
            Counters::add(&rt.counters.expired, 1);
            rt.file_dead_letter(crate::dead_letters::GivenUp {
                sender: &sender,
                target: &transports::protocol::Target::Node(rt.id.clone()),
                service: h.service,
                priority: h.priority,
                reason: transports::protocol::DeadReason::Expired,
                body,
            });
            if h.kind == MessageKind::Send {
                let status = AckStatus::Failed(DeliveryFailure::Expired);
                answer(sender).send(&rt.id, &rt.core, acks, status).await;
            }
            return Ok(());
        }
        Later::New { sender, body } => (sender, body),
    };
    let mut ack_to = (h.kind == MessageKind::Send).then(|| sender.clone());
    /// How the attempt to hand the message over without waiting went.
    enum Straight {
        /// In the inbox.
        Delivered,
        /// In the pump's backlog (it acknowledges once the inbox takes it).
        Queued,
        NoService(NodeId, Bytes),
        /// The backlog is full, or its pump is gone (boxed: the rare case
        /// keeps the others small).
        Refused(Box<ServiceQueue>, mpsc::error::TrySendError<Delivery>),
    }
    let straight = {
        // Read before the table: a change after it makes the entry kept
        // below stale at once.
        let generation = rt.services.generation.load(Ordering::Acquire);
        let inboxes = rt
            .services
            .inboxes
            .read()
            .unwrap_or_else(|p| p.into_inner());
        match inboxes.get_key_value(h.service) {
            None => Straight::NoService(sender, body),
            Some((service, q)) => {
                cache.keep(generation, service, q);
                let mut message = new_message(rt, h, sender, SmolStr::new(&**service), body);
                // Acknowledged once processed: the message carries its
                // acknowledgement, and none goes now.
                if q.on_processed && h.kind == MessageKind::Send {
                    ack_to = None;
                    let token = AckToken::new(
                        answer(message.sender.clone()),
                        &rt.id,
                        &rt.core,
                        acks,
                        &rt.unacked,
                    );
                    message.answering.get_or_insert_with(Default::default).ack = Some(token);
                }
                // Straight into the inbox when nothing waits before it: the
                // pump is only for a backlog (which keeps order: nothing
                // overtakes it).
                let message = if q.backlog.load(Ordering::Acquire) == 0 {
                    // Full, or its receiver gone: the pump sorts it out.
                    q.inbox.try_send(message).err()
                } else {
                    Some(message)
                };
                match message {
                    None => Straight::Delivered,
                    Some(message) => {
                        q.backlog.fetch_add(1, Ordering::AcqRel);
                        let delivery = Delivery {
                            answer: answer(message.sender.clone()),
                            message,
                            acks: acks.clone(),
                        };
                        // Into the backlog while the lock is held: the
                        // queue is cloned only when this has to wait.
                        match q.tx.try_send(delivery) {
                            Ok(()) => Straight::Queued,
                            Err(refused) => Straight::Refused(Box::new(q.clone()), refused),
                        }
                    }
                }
            }
        }
    };
    let (q, refused) = match straight {
        Straight::Delivered => {
            if let Some(to) = ack_to {
                batch.add(to, h.incarnation, h.seq).await;
            }
            return Ok(());
        }
        Straight::Queued => return Ok(()),
        Straight::NoService(sender, body) => {
            undeliverable(rt, h, &sender, &DeliveryFailure::NoSuchService, body);
            let failed = AckStatus::Failed(DeliveryFailure::NoSuchService);
            answer(sender).send(&rt.id, &rt.core, acks, failed).await;
            return Ok(());
        }
        Straight::Refused(q, refused) => (q, refused),
    };
    // A full backlog holds this connection back (so the sender slows
    // down) for at most `node.inbox_wait_ms`; a service that stays full
    // that long is congested, and is answered `Overloaded` at once until
    // its backlog drains, so the connection's other traffic flows. A
    // built-in service's message is refused at once (`WhenFull::Refuse`).
    // A busy node says so: its sender waits for it to drain before it
    // sends again.
    let full = if q.when_full == WhenFull::Wait && rt.busy.is_busy() {
        DeliveryFailure::ReceiverBusy
    } else {
        DeliveryFailure::ReceiverOverloaded
    };
    let refused = match refused {
        mpsc::error::TrySendError::Full(mut d) => {
            let congested = q.congested.load(Ordering::Relaxed) && !q.is_drained();
            if congested || q.when_full == WhenFull::Refuse {
                disarm(&mut d.message);
                Some((d.answer, full, std::mem::take(&mut d.message.body)))
            } else {
                q.congested.store(false, Ordering::Relaxed);
                // This may wait: what was accepted before goes out first.
                batch.flush().await;
                let wait = std::time::Duration::from_millis(rt.config.node.inbox_wait_ms);
                let sent = tokio::select! {
                    _ = rt.cancel.cancelled() => return Err(Stopping),
                    r = tokio::time::timeout(wait, q.tx.reserve()) => r,
                };
                match sent {
                    Ok(Ok(slot)) => {
                        slot.send(d);
                        None
                    }
                    Ok(Err(mpsc::error::SendError(_))) => {
                        disarm(&mut d.message);
                        let body = std::mem::take(&mut d.message.body);
                        Some((d.answer, DeliveryFailure::NoSuchService, body))
                    }
                    Err(_) => {
                        q.congested.store(true, Ordering::Relaxed);
                        disarm(&mut d.message);
                        Some((d.answer, full, std::mem::take(&mut d.message.body)))
                    }
                }
            }
        }
        mpsc::error::TrySendError::Closed(mut d) => {
            unsubscribe(rt, &d.message.service).await;
            disarm(&mut d.message);
            let body = std::mem::take(&mut d.message.body);
            Some((d.answer, DeliveryFailure::NoSuchService, body))
        }
    };
    if let Some((answer, failure, body)) = refused {
        undeliverable(rt, h, &answer.to, &failure, body);
        q.backlog.fetch_sub(1, Ordering::AcqRel);
        answer
            .send(&rt.id, &rt.core, acks, AckStatus::Failed(failure))
            .await;
    }
    Ok(())
}

/// A one-way message `h` from `sender` that this node could not take
/// (`failure`): its sender has nobody to tell, so it is dead-lettered.
fn undeliverable(
    rt: &Runtime,
    h: &MessageRef<'_>,
    sender: &NodeId,
    failure: &DeliveryFailure,
    body: Bytes,
) {
    if h.kind != MessageKind::Notify {
        return;
    }
    rt.file_dead_letter(crate::dead_letters::GivenUp {
        sender,
        target: &transports::protocol::Target::Node(rt.id.clone()),
        service: h.service,
        priority: h.priority,
        reason: transports::protocol::DeadReason::Undeliverable(failure.clone()),
        body,
    });
}

/// The inbox a reader delivered to last, kept while the node's services
/// stay the same (checked against [`crate::runtime::Services::generation`] for each
/// message), so that a run of messages to one service is delivered without
/// locking and searching the table of inboxes for each. Holds no pump open:
/// it keeps the inbox, not the pump's queue.
#[derive(Debug, Default)]
pub(crate) struct InboxCache {
    entry: Option<CachedInbox>,
    /// The sender of the last one-way message, as its messages carry it.
    sender: Option<NodeId>,
}

#[derive(Debug)]
struct CachedInbox {
    generation: u64,
    /// The service's name, as its messages carry it (made once, not per
    /// message).
    name: SmolStr,
    inbox: InboxSender,
    backlog: Arc<std::sync::atomic::AtomicUsize>,
    /// Acknowledged on processing: its `Send`s take the slow path.
    on_processed: bool,
}

impl InboxCache {
    /// `name` as a node id: the one kept if it is the last sender's.
    fn sender(&mut self, name: &str) -> NodeId {
        match &self.sender {
            Some(id) if same_name(id.as_str(), name) => id.clone(),
            _ => self.sender.insert(NodeId::new(name)).clone(),
        }
    }

    /// The inbox kept, if it is `service`'s and still current.
    fn get(&self, rt: &Runtime, service: &str) -> Option<&CachedInbox> {
        let entry = self.entry.as_ref()?;
        let current = entry.generation == rt.services.generation.load(Ordering::Acquire);
        (current && same_name(&entry.name, service)).then_some(entry)
    }

    /// Keeps `service`'s queue `q`, as found in the table of inboxes of
    /// `generation`.
    fn keep(&mut self, generation: u64, service: &str, q: &ServiceQueue) {
        let kept = self
            .entry
            .as_ref()
            .is_some_and(|e| e.generation == generation && same_name(&e.name, service));
        if !kept {
            self.entry = Some(CachedInbox {
                generation,
                name: SmolStr::new(service),
                inbox: q.inbox.clone(),
                backlog: q.backlog.clone(),
                on_processed: q.on_processed,
            });
        }
    }
}

/// Deliveries a pump takes from its backlog at a time. Taking them frees
/// their places, so a full backlog holds up to this many more than its
/// capacity (`node.inbox_capacity`) while the pump works through them.
const PUMP_BATCH: usize = 128;
/// Inbox slots a pump waits for at once when the inbox is full...
const PUMP_RESERVE: usize = 32;
/// ...for at most this long; then it takes what room there is.
const PUMP_RESERVE_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

/// Moves one service's deliveries into its inbox as the application makes
/// room, acknowledging each once accepted. One task per subscribed service.
pub(crate) async fn pump(
    rt: Runtime,
    service: Arc<str>,
    mut deliveries: mpsc::Receiver<Delivery>,
    inbox: InboxSender,
    backlog: Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut batch = Vec::with_capacity(PUMP_BATCH);
    // Acknowledgements of accepted `Send`s, gathered per connection and
    // sent as one `Acks` frame before the pump waits.
    let mut accepted: Vec<(Answer, OutQueue)> = Vec::with_capacity(PUMP_RESERVE);
    let mut acks: Option<AckBatch> = None;
    loop {
        // Sent, and let go of: an idle pump holds no connection open.
        if let Some(mut gathered) = acks.take() {
            gathered.flush().await;
        }
        let n = tokio::select! {
            _ = rt.cancel.cancelled() => return,
            n = deliveries.recv_many(&mut batch, PUMP_BATCH) => n,
        };
        if n == 0 {
            return;
        }
        let mut pending = batch.drain(..).peekable();
        while pending.peek().is_some() {
            // Room for several at once when the inbox is full: the
            // application then wakes this pump once per few messages it
            // takes, not once per message.
            let want = pending.len().clamp(1, PUMP_RESERVE.min(inbox.capacity()));
            let closed = match into_inbox(&inbox, &mut pending, &backlog, &mut accepted) {
                Ok(0) => {
                    if let Some(gathered) = acks.as_mut() {
                        gathered.flush().await;
                    }
                    // Not for long, though: an application that takes a
                    // few and stops gets those few.
                    let room = async {
                        match tokio::time::timeout(PUMP_RESERVE_WAIT, inbox.room(want)).await {
                            Ok(room) => room,
                            Err(_) => inbox.room(1).await,
                        }
                    };
                    tokio::select! {
                        _ = rt.cancel.cancelled() => return,
                        r = room => r.is_err(),
                    }
                }
                Ok(_) => false,
                Err(Closed) => true,
            };
            if closed {
                // The inbox was dropped: unsubscribe, and refuse what is left.
                deliveries.close();
                unsubscribe_now(&rt, &service).await;
                for Delivery {
                    answer,
                    acks,
                    mut message,
                } in pending.by_ref()
                {
                    disarm(&mut message);
                    backlog.fetch_sub(1, Ordering::AcqRel);
                    let refused = AckStatus::Failed(DeliveryFailure::NoSuchService);
                    answer.send(&rt.id, &rt.core, &acks, refused).await;
                }
                break;
            }
            for (answer, queue) in accepted.drain(..) {
                let same = matches!(&acks, Some(gathered) if gathered.goes_to(&queue));
                if !same {
                    if let Some(mut previous) = acks.take() {
                        previous.flush().await;
                    }
                    acks = Some(AckBatch::new(rt.id.clone(), rt.core.clone(), queue));
                }
                if let Some(gathered) = acks.as_mut() {
                    gathered
                        .add(answer.to, answer.to_incarnation, answer.seq)
                        .await;
                }
            }
        }
        drop(pending);
    }
}

/// Moves as many of `pending` into `inbox` as fit, under one lock of it
/// (the receiver is woken once): how many. Those that are `Send`s join
/// `accepted`, to be acknowledged.
///
/// # Errors
///
/// [`Closed`] if the inbox was dropped; nothing was moved.
fn into_inbox(
    inbox: &InboxSender,
    pending: &mut impl Iterator<Item = Delivery>,
    backlog: &AtomicUsize,
    accepted: &mut Vec<(Answer, OutQueue)>,
) -> Result<usize, Closed> {
    let mut slots = inbox.slots()?;
    let mut moved = 0;
    while slots.has_room() {
        let Some(Delivery {
            message,
            answer,
            acks,
        }) = pending.next()
        else {
            break;
        };
        // Acknowledged later, once processed.
        let deferred = message.awaits_ack();
        slots.push(message);
        moved += 1;
        // In the inbox before the count drops: a delivery that then goes
        // straight in comes after it.
        backlog.fetch_sub(1, Ordering::AcqRel);
        // Only a `Send` is acknowledged when all goes well.
        if answer.kind == MessageKind::Send && !deferred {
            accepted.push((answer, acks));
        }
    }
    Ok(moved)
}

/// A message refused here is answered by the refusal: its acknowledgement
/// on processing (if it has one) must not answer it again.
fn disarm(message: &mut Message) {
    if let Some(token) = message.take_ack() {
        token.disarm();
    }
}

/// Unsubscribes `service` if its inbox is gone.
async fn unsubscribe(rt: &Runtime, service: &str) {
    let closed = rt
        .services
        .inboxes
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(service)
        .is_some_and(|q| q.is_closed());
    if closed {
        unsubscribe_now(rt, service).await;
    }
}

/// Removes `service`'s delivery queue and tells the message server.
async fn unsubscribe_now(rt: &Runtime, service: &str) {
    let removed = {
        let mut inboxes = rt
            .services
            .inboxes
            .write()
            .unwrap_or_else(|p| p.into_inner());
        rt.services.generation.fetch_add(1, Ordering::AcqRel);
        inboxes.remove(service).is_some()
    };
    if removed {
        tracing::debug!(%service, "inbox dropped; unsubscribing");
        let frame = OutFrame::control(Header::Unsubscribe {
            service: service.to_string(),
        });
        let _ = rt
            .server
            .queue
            .push(frame, Lane::Control, Wait::Forever)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use transports::{out_queue, FrameCodec};

    /// Acknowledgements gathered per sender go out as one frame each: a
    /// change of sender (or of its incarnation) flushes, a lone one is a
    /// plain `Ack`, and nothing is sent twice.
    /// One-way messages skip duplicate suppression (nothing resends them);
    /// their sender's id is kept by the reader instead, and replaced when
    /// another sender's message comes.
    #[test]
    fn the_inbox_cache_keeps_the_last_one_way_sender() {
        let mut cache = InboxCache::default();
        let a = cache.sender("sender-a");
        assert_eq!(a, "sender-a");
        assert_eq!(cache.sender("sender-a"), a);
        let long = "a-sender-whose-name-is-not-kept-inline";
        assert_eq!(cache.sender(long), long);
        assert_eq!(cache.sender(long), long);
        assert_eq!(cache.sender("sender-a"), a);
    }

    /// `try_add` takes an acknowledgement only where `add` would not
    /// flush first or after: the readers' path without a future.
    #[tokio::test]
    async fn try_add_takes_only_what_needs_no_flush() {
        let (queue, _rx) = out_queue(64, 1 << 20);
        let (a, b) = (NodeId::new("a"), NodeId::new("b"));
        let mut batch = AckBatch::new(NodeId::new("me"), CoreCell::for_tests("me", 7), queue);
        assert!(batch.try_add(a.clone(), 1, 1).is_ok(), "an empty batch");
        assert!(batch.try_add(a.clone(), 1, 2).is_ok(), "the same sender");
        assert_eq!(
            batch.try_add(b.clone(), 1, 3).err(),
            Some(b),
            "another sender"
        );
        assert_eq!(
            batch.try_add(a.clone(), 2, 3).err(),
            Some(a.clone()),
            "another incarnation"
        );
        for seq in 3..MAX_BATCHED_ACKS as u64 {
            assert!(batch.try_add(a.clone(), 1, seq).is_ok(), "{seq}");
        }
        assert_eq!(
            batch.try_add(a.clone(), 1, 9999).err(),
            Some(a),
            "the limit"
        );
        assert_eq!(batch.seqs.len(), MAX_BATCHED_ACKS - 1);
        batch.flush().await;
        assert!(batch.seqs.is_empty());
    }

    #[tokio::test]
    async fn acks_are_batched_per_sender() {
        let (queue, rx) = out_queue(64, 1 << 20);
        let (client, server) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(transports::run_writer(client, rx, 1 << 20));
        let me = NodeId::new("me");
        let (a, b) = (NodeId::new("a"), NodeId::new("b"));
        let mut batch = AckBatch::new(me.clone(), CoreCell::for_tests("me", 7), queue.clone());
        for seq in 1..=3 {
            batch.add(a.clone(), 1, seq).await;
        }
        batch.add(b.clone(), 1, 10).await;
        batch.add(a.clone(), 2, 20).await;
        batch.add(a.clone(), 2, 21).await;
        batch.flush().await;
        batch.flush().await;
        // What is gathered when the batch is dropped still goes out.
        batch.add(b.clone(), 3, 30).await;
        drop(batch);
        drop(queue);
        let mut reader = FrameReader::new(server, FrameCodec::new(1 << 20));
        let mut got = Vec::new();
        while let Some(frame) = reader.next().await.expect("frame") {
            got.push(frame.into_parts().0);
        }
        writer.await.expect("join").expect("writer");
        let acks = |to: &NodeId, to_incarnation, seqs: Vec<u64>| {
            Header::Acks(Acks {
                to: to.clone(),
                to_incarnation,
                from: me.clone(),
                from_incarnation: 7,
                seqs,
            })
        };
        let single = Header::Ack(Ack {
            to: b.clone(),
            to_incarnation: 1,
            seq: 10,
            from: me.clone(),
            from_incarnation: 7,
            status: AckStatus::Accepted,
        });
        assert_eq!(
            got,
            vec![
                acks(&a, 1, vec![1, 2, 3]),
                single,
                acks(&a, 2, vec![20, 21]),
                Header::Ack(Ack {
                    to: b.clone(),
                    to_incarnation: 3,
                    seq: 30,
                    from: me.clone(),
                    from_incarnation: 7,
                    status: AckStatus::Accepted,
                }),
            ]
        );
    }
}
