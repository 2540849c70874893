//! One node's connection: handshake and registration, then a read loop that
//! routes each frame straight into the receivers' queues, beside a writer
//! task that drains this node's own queue.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cluster_config::PermissionsConfig;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use transports::frame::{peek_cached, FrameCodec, NameCache, Peeked, RawFrame};
use transports::handshake::{self, HandshakeError};
use transports::io::{out_queue_within, Wakes};
use transports::protocol::{
    same_name, valid_name, AckRef, AcksRef, DeliveryFailure, Header, Hello, Interests, LeaveReason,
    MemberEvent, MemberInfo, MessageKind, MessageRef, NodeId, Refusal, RefusalReason, Routed,
    Target, TargetRef, MAX_NAMES_PER_NODE,
};
use transports::{
    FrameError, FrameReader, Lane, OutFrame, OutQueue, PushError, Wait, WeakOutQueue,
};

use crate::counters::{Counters, NodeCounters};
use crate::parked::{Parked, Progress};
use crate::registry::{
    broadcast_locked, hold, register, unregister, warming_up, Held, Refused, Registration,
};
use crate::server::{Session, Shared};
use crate::table::Resolution;

/// Why a connection ended.
enum End {
    Goodbye,
    Eof,
    Cancelled,
    WriterStopped,
    Frame(FrameError),
    Violation(String),
    /// Nothing arrived on the connection for the failure timeout (every
    /// node reports at each heartbeat interval): its data network is down,
    /// whatever its heartbeats say. The member was declared failed.
    Silent,
}

/// A connection's places under the listener's caps
/// (`message_server.max_connections`, `max_unauthenticated`), held while
/// it lives and until it registers.
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) _place: tokio::sync::OwnedSemaphorePermit,
    pub(crate) unregistered: tokio::sync::OwnedSemaphorePermit,
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
    tasks: TaskTracker,
    admission: Admission,
) {
    // The place is held for the connection's life (dropped with this
    // future); the unregistered one until it registers.
    let Admission {
        _place: _kept,
        unregistered,
    } = admission;
    let span = tracing::debug_span!("conn", %peer, node = tracing::field::Empty);
    async move {
        if let Err(e) = transports::tcp::tune(&stream, &shared.config.tcp.options()) {
            tracing::debug!(error = %e, "could not tune socket");
        }
        let timeout = shared
            .config
            .connect_timeout()
            .min(handshake::HELLO_DEADLINE);
        // The whole handshake, TLS and proof included, within the hello
        // deadline.
        let deadline = tokio::time::Instant::now() + timeout;
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = tokio::time::timeout(timeout, transports::io::accept(stream, shared.tls.as_ref())) => a,
        };
        let (rd, mut wr, certificates) = match accepted {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(e)) => {
                refused(&shared, peer, None, "TLS handshake failed");
                if shared.refusals.admit() {
                    tracing::info!(error = %e, "closing connection: TLS handshake failed");
                }
                return;
            }
            Err(_) => {
                if shared.refusals.admit() {
                    tracing::info!("closing connection: no TLS handshake within the hello deadline");
                }
                return;
            }
        };
        let mut reader = FrameReader::new(rd, FrameCodec::default());
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let hello = tokio::select! {
            _ = cancel.cancelled() => return,
            h = handshake::read_hello(&mut reader, &mut wr, remaining) => h,
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
                let why = format!("closed before its hello was accepted: {e}");
                shared.events.refused(peer, None, &why);
                if shared.refusals.admit() {
                    tracing::info!(error = %e, "closing connection before registration");
                }
                return;
            }
        };
        // The peer's strings are checked before any of them is logged.
        if !valid_name(hello.node.as_str()) {
            if shared.refusals.admit() {
                tracing::warn!(
                    node = %handshake::for_log(hello.node.as_str()),
                    "refusing node: invalid names in its hello"
                );
            }
            refused(&shared, peer, Some(hello.node.as_str()), "invalid node id");
            handshake::refuse(
                &mut wr,
                RefusalReason::ProtocolViolation,
                "node ids are 1 to 255 bytes".into(),
            )
            .await;
            return;
        }
        tracing::Span::current().record("node", tracing::field::display(&hello.node));
        let cluster = &shared.config.cluster;
        if let Err(refusal) = handshake::check_hello(&hello, &cluster.name) {
            if shared.refusals.admit() {
                tracing::warn!(reason = %refusal.reason, "refusing node");
            }
            refused(&shared, peer, Some(hello.node.as_str()), &refusal.reason);
            handshake::refuse(&mut wr, refusal.reason, refusal.detail).await;
            return;
        }
        // With TLS, the node's certificate must name the id it claims.
        if let (Some(tls), Some(certificates)) = (&shared.tls, &certificates) {
            if !tls.names(certificates, hello.node.as_str()) {
                if shared.refusals.admit() {
                    tracing::warn!("refusing node: its certificate does not name it");
                }
                let why = "its certificate does not name it";
                refused(&shared, peer, Some(hello.node.as_str()), why);
                let detail = "the certificate does not name this node id".to_owned();
                handshake::refuse(&mut wr, RefusalReason::BadCredentials, detail).await;
                return;
            }
        }
        if let Err(refusal) = check_claims(&shared, &hello, peer) {
            if shared.refusals.admit() {
                tracing::warn!(reason = %refusal.reason, detail = %refusal.detail, "refusing node");
            }
            let why = format!("{}: {}", refusal.reason, refusal.detail);
            refused(&shared, peer, Some(hello.node.as_str()), why);
            handshake::refuse(&mut wr, refusal.reason, refusal.detail).await;
            return;
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let proven = tokio::select! {
            _ = cancel.cancelled() => return,
            p = handshake::challenge(&mut reader, &mut wr, &hello, shared.secret.as_ref(), None, remaining) => p,
        };
        let acceptor_nonce = match proven {
            Ok(nonce) => nonce,
            Err(e) => {
                if shared.refusals.admit() {
                    tracing::warn!(error = %e, "refusing node: its proof failed");
                }
                refused(&shared, peer, Some(hello.node.as_str()), "its proof failed");
                return;
            }
        };
        // Proven: its groups and services may take more than the few KiB
        // of a frame before the proof.
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let interests = tokio::select! {
            _ = cancel.cancelled() => return,
            i = handshake::read_interests(&mut reader, &mut wr, remaining) => i,
        };
        let interests = match interests {
            Ok(i) => i,
            Err(e) => {
                if shared.refusals.admit() {
                    tracing::info!(error = %e, "closing connection before registration");
                }
                return;
            }
        };
        let names_ok = interests.groups.len() <= MAX_NAMES_PER_NODE
            && interests.services.len() <= MAX_NAMES_PER_NODE
            && interests
                .groups
                .iter()
                .chain(&interests.services)
                .all(|n| valid_name(n));
        if !names_ok {
            if shared.refusals.admit() {
                tracing::warn!("refusing node: invalid group or service names");
            }
            let why = "invalid group or service names";
            refused(&shared, peer, Some(hello.node.as_str()), why);
            handshake::refuse(
                &mut wr,
                RefusalReason::ProtocolViolation,
                "groups and services are 1 to 255 bytes, at most 1024 of each".into(),
            )
            .await;
            return;
        }
        let permissions = match permitted(&shared, &hello, &interests) {
            Ok(p) => p,
            Err(refusal) => {
                if shared.refusals.admit() {
                    tracing::warn!(reason = %refusal.reason, detail = %refusal.detail, "refusing node");
                }
                let why = format!("{}: {}", refusal.reason, refusal.detail);
                refused(&shared, peer, Some(hello.node.as_str()), why);
                handshake::refuse(&mut wr, refusal.reason, refusal.detail).await;
                return;
            }
        };
        let Ok(session_secret) = transports::auth::random::<{ transports::auth::SESSION_SECRET_BYTES }>()
        else {
            tracing::error!("refusing node: the system random number generator failed");
            return;
        };
        let session = Arc::new(Session {
            mac: transports::auth::SessionMac::new(&session_secret),
            heartbeat_ip: hello.heartbeat_ip.unwrap_or(peer.ip()).to_canonical(),
            last_nonce: std::sync::atomic::AtomicU64::new(0),
            wrong_address_told: std::sync::atomic::AtomicBool::new(false),
            peer,
            since_ms: shared.now_ms(),
            counters: NodeCounters::default(),
            report: std::sync::Mutex::new(None),
            busy: std::sync::atomic::AtomicBool::new(false),
            parked_lines: std::sync::atomic::AtomicUsize::new(0),
            backlog: std::sync::atomic::AtomicU64::new(0),
        });
        let masked_secret = handshake::mask_session_secret(
            &session_secret,
            shared.secret.as_ref(),
            &hello.nonce,
            &acceptor_nonce,
        );
        let max_message = hello
            .max_message_bytes
            .min(shared.config.limits.max_message_bytes);
        let codec = FrameCodec::for_messages(max_message);
        // Small frames are read in place: routing copies them into the
        // receivers' queues (which stage them), and what is kept longer is
        // copied (see `route_failed`).
        *reader.codec_mut() = codec.in_place();
        // A registered node that starts a frame and stalls in it is cut
        // off after the failure timeout, heartbeats or not.
        reader.set_stall_limit(shared.config.failure_timeout());
        // Frames larger than the read buffer, and frames in parts, hold
        // memory from their first byte: the server's budget pays for it,
        // so that a node declaring frames it never finishes cannot take
        // more than the budget has.
        reader.charge_to(shared.budget.clone());
        let (queue, mut rx) = out_queue_within(
            shared.config.message_server.queue_frames,
            shared.config.message_server.queue_bytes,
            shared.budget.clone(),
        );
        rx.chunk_above(shared.config.limits.chunk_bytes);
        // `Low` messages fill the socket to the node no deeper than a
        // window ahead of the more urgent ones.
        rx.window_low(transports::io::LOW_WINDOW_MARKS);
        let me = MemberInfo {
            id: hello.node.clone(),
            incarnation: hello.incarnation,
            role: hello.role,
            groups: interests.groups.into_iter().map(Into::into).collect(),
            services: interests.services.into_iter().map(Into::into).collect(),
            direct_addr: hello.direct_addr,
            session_key: hello.session_key,
            busy: false,
        };
        // The same runtime again, before its old connection was seen to
        // break (a takeover), for the monitor's events.
        let takeover = shared
            .read()
            .table
            .member(&me.id)
            .is_some_and(|m| m.incarnation == me.incarnation);
        let registration = Registration {
            me: &me,
            queue: &queue,
            max_frame: codec.max_frame(),
            max_message,
            session: session.clone(),
            masked_secret,
            rejoining: hello.rejoining,
        };
        let conn_id = match register(&shared, registration) {
            Ok(id) => id,
            Err(e) => {
                if shared.refusals.admit() {
                    tracing::warn!(error = %e, "refusing node");
                }
                refused(&shared, peer, Some(me.id.as_str()), &e);
                let reason = match e {
                    Refused::IncarnationFailed => RefusalReason::IncarnationFailed,
                    Refused::Duplicate(_) | Refused::NotTheSession => RefusalReason::DuplicateNode,
                };
                handshake::refuse(&mut wr, reason, e.to_string()).await;
                return;
            }
        };
        // Registered: the place among the unregistered is free again.
        drop(unregistered);
        Counters::add(&shared.counters.connections_accepted, 1);
        shared.events.joined(&me, peer, takeover);
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
            routes: RouteCache::default(),
            permissions,
            session,
            member_changes: (0, 0),
            parked: Parked::new(crate::parked::Limits {
                line_bytes: shared.config.message_server.park_bytes,
                sender_bytes: shared.config.message_server.park_sender_bytes,
                budget: shared.budget.clone(),
                parked: shared.parked.clone(),
                wait: Duration::from_millis(shared.config.message_server.slow_consumer_ms),
            }),
        };
        let end = conn.read_loop(&mut reader, &cancel).await;
        conn.finish_parked();
        let reason = match &end {
            End::Goodbye => LeaveReason::Stopped,
            _ => LeaveReason::Disconnected,
        };
        match &end {
            End::Goodbye => tracing::info!("member left (planned stop)"),
            End::Eof => tracing::info!("member disconnected"),
            End::Cancelled => tracing::debug!("connection closed by shutdown"),
            End::WriterStopped => tracing::warn!("member disconnected: its writer stopped"),
            End::Silent => {}
            End::Frame(e) => tracing::warn!(error = %e, "member disconnected on a frame error"),
            End::Violation(why) => {
                Counters::add(&shared.counters.protocol_errors, 1);
                tracing::warn!(reason = %why, "closing connection: protocol violation")
            }
        }
        // Still this connection's registration (not taken over, not
        // declared failed): its end is a departure.
        let departs = shared
            .read()
            .conns
            .get(&me.id)
            .is_some_and(|c| c.conn_id == conn_id);
        unregister(&shared, &me.id, me.incarnation, conn_id, reason);
        if departs {
            shared.events.left(&me.id, me.incarnation, reason);
        }
        match end {
            // Let the writer drain what is queued (a planned stop).
            End::Goodbye | End::Eof => drop(queue),
            _ => queue.close(),
        }
    }
    .instrument(span)
    .await
}

/// Counts a refused connection and records it for the monitor; `node` is
/// the id its hello claimed, if it got that far.
fn refused(shared: &Shared, peer: SocketAddr, node: Option<&str>, why: impl std::fmt::Display) {
    Counters::add(&shared.counters.connections_refused, 1);
    shared.events.refused(peer, node, &why.to_string());
}

/// What a hello claims that this server checks before it challenges the
/// node: the direct-channel address must be on the host the node connects
/// from (unless `message_server.allow_foreign_direct_addr`). (A takeover
/// of a live registration is checked at registration, under the lock.)
fn check_claims(shared: &Shared, hello: &Hello, peer: SocketAddr) -> Result<(), Refusal> {
    if let Some(addr) = hello.direct_addr {
        // Every loopback address is this host, as the peer's is.
        let (ip, from) = (addr.ip().to_canonical(), peer.ip().to_canonical());
        let same_host =
            ip == from || ip.is_unspecified() || (ip.is_loopback() && from.is_loopback());
        let foreign = !same_host;
        if foreign && !shared.config.message_server.allow_foreign_direct_addr {
            return Err(Refusal {
                reason: RefusalReason::ProtocolViolation,
                detail: format!(
                    "the direct-channel address {addr} is not on the host this connection comes from ({}); see message_server.allow_foreign_direct_addr",
                    peer.ip()
                ),
            });
        }
    }
    Ok(())
}

/// The node's permissions (`None` when it may do anything), after checking
/// the groups and services it names against them.
fn permitted(
    shared: &Shared,
    hello: &Hello,
    interests: &Interests,
) -> Result<Option<Arc<PermissionsConfig>>, Refusal> {
    let permissions = shared.permissions.of(hello.node.as_str());
    if permissions.allows_everything() {
        return Ok(None);
    }
    if let Some(g) = interests.groups.iter().find(|g| !permissions.may_join(g)) {
        return Err(Refusal {
            reason: RefusalReason::NotPermitted,
            detail: format!(
                "may not join group {} (permissions.join)",
                handshake::for_log(g)
            ),
        });
    }
    if let Some(s) = interests
        .services
        .iter()
        .find(|s| !permissions.may_subscribe(s))
    {
        return Err(Refusal {
            reason: RefusalReason::NotPermitted,
            detail: format!(
                "may not offer service {} (permissions.subscribe)",
                handshake::for_log(s)
            ),
        });
    }
    Ok(Some(permissions))
}

struct Connection {
    shared: Arc<Shared>,
    /// This node's session: its counters are counted here.
    session: Arc<Session>,
    /// What this node may do; `None`: anything.
    permissions: Option<Arc<PermissionsConfig>>,
    me: NodeId,
    incarnation: u64,
    queue: OutQueue,
    routes: RouteCache,
    /// Changes of this node's membership (busy state, services) in the
    /// current second: (when the second began, in ms since start; count).
    member_changes: (u64, u32),
    /// This node's messages for receivers whose queues were full.
    parked: Parked,
}

/// Most changes of its own membership (busy state, services) a node may
/// make in a second: each one is sent to every member, so more is an
/// amplification, refused as a protocol violation. An honest node reports
/// becoming busy at most 100 times a second.
pub const MAX_MEMBER_CHANGES_PER_S: u32 = 400;

/// Most frames a read loop routes before it wakes the receivers' writers
/// it found asleep (it wakes them sooner when it runs out of frames).
const WAKE_EVERY_FRAMES: usize = 128;

/// Most routes a connection keeps resolved; past it the cache starts over.
const MAX_CACHED_ROUTES: usize = 64;
/// Most receivers a connection's cached routes hold in all; past it the
/// cache starts over.
const MAX_CACHED_RECEIVERS: usize = 1024;

/// The targets this connection's node sent to lately, resolved: a message
/// to one of them is routed without locking the shared state or hashing a
/// name. Good while the state's generation stays the same (every
/// registration, departure or subscription changes it).
#[derive(Default)]
struct RouteCache {
    generation: u64,
    entries: Vec<CachedRoute>,
    /// Receivers held by all entries: the cache's size.
    receivers: usize,
    /// Rotates `AnyOf` ties among equally loaded members.
    turn: usize,
}

struct CachedRoute {
    reply: bool,
    target: Target,
    service: Box<str>,
    resolved: Resolved,
}

/// One receiver of a route: the connection is `None` when the table knows
/// the node but its connection is already gone.
#[derive(Clone)]
struct Receiver {
    id: NodeId,
    conn: Option<CachedConn>,
}

/// What a route needs of a receiver's connection. The queue is held weakly:
/// a cached route must not keep a departed node's connection open.
#[derive(Clone)]
struct CachedConn {
    queue: WeakOutQueue,
    incarnation: u64,
    max_frame: usize,
    /// Its busy state and backlog (no queue: holding it keeps nothing
    /// open).
    session: Arc<crate::server::Session>,
}

/// Added to a busy receiver's load: `AnyOf` takes any member that is not
/// busy first.
const BUSY_LOAD: usize = usize::MAX / 2;

impl Receiver {
    /// The receiver's queue and connection details, while it is open.
    fn open(&self) -> Option<(OutQueue, &CachedConn)> {
        let conn = self.conn.as_ref()?;
        Some((conn.queue.upgrade()?, conn))
    }

    /// How loaded the receiver is, for `AnyOf`: the frames queued to it
    /// here and the backlog it reported; a busy one after every one that
    /// is not, a closed one last.
    fn load(&self) -> usize {
        let Some((queue, conn)) = self.open() else {
            return usize::MAX;
        };
        let backlog = conn.session.backlog.load(Ordering::Relaxed) as usize;
        let load = queue.queued_frames().saturating_add(backlog);
        if conn.session.is_busy() {
            load.saturating_add(BUSY_LOAD).min(usize::MAX - 1)
        } else {
            load.min(BUSY_LOAD - 1)
        }
    }
}

/// What a (target, service) resolved to.
enum Resolved {
    /// `Node` targets and replies.
    One(Receiver),
    /// `AnyOf`: the candidates; each message goes to the least loaded.
    AnyOf(Vec<Receiver>),
    /// `Group` and `All`: every one of them.
    Many(Vec<Receiver>),
}

impl Resolved {
    /// How many receivers it holds.
    fn len(&self) -> usize {
        match self {
            Resolved::One(_) => 1,
            Resolved::AnyOf(all) | Resolved::Many(all) => all.len(),
        }
    }
}

impl RouteCache {
    /// The cached route of (`reply`, `target`, `service`), if still good.
    fn find(
        &mut self,
        generation: u64,
        reply: bool,
        target: TargetRef<'_>,
        service: &str,
    ) -> Option<usize> {
        if self.generation != generation {
            self.clear();
            self.generation = generation;
            return None;
        }
        self.entries.iter().position(|e| {
            e.reply == reply && &*e.service == service && TargetRef::from(&e.target) == target
        })
    }

    fn insert(&mut self, generation: u64, route: CachedRoute) -> usize {
        let receivers = route.resolved.len();
        if self.generation != generation
            || self.entries.len() >= MAX_CACHED_ROUTES
            || self.receivers + receivers > MAX_CACHED_RECEIVERS
        {
            // Starting over keeps the cache bounded (one fan-out larger
            // than the bound is still kept, alone).
            self.clear();
            self.generation = generation;
        }
        self.receivers += receivers;
        self.entries.push(route);
        self.entries.len() - 1
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.receivers = 0;
    }
}

impl Connection {
    async fn read_loop(
        &mut self,
        reader: &mut FrameReader<transports::io::ReadHalf>,
        cancel: &CancellationToken,
    ) -> End {
        // This node's name, and the targets and services it names, are
        // validated once, not per message.
        let mut names = NameCache::new();
        // Receivers' writers found asleep are woken once per run of frames
        // routed from one read, not once per frame: before this loop waits
        // for anything, and at least every `WAKE_EVERY_FRAMES` frames.
        let mut wakes = Wakes::new();
        let mut since_wake = 0usize;
        // A member's connection must carry something every failure
        // timeout (its node reports at every heartbeat interval).
        let mut silence = transports::io::Silence::new(self.shared.config.failure_timeout());
        loop {
            since_wake += 1;
            if since_wake >= WAKE_EVERY_FRAMES {
                wakes.wake_all();
                since_wake = 0;
                // Parked messages move on between reads too, not only
                // when the sender pauses.
                if let Some(progress) = self.parked.poll_progress() {
                    self.parked_progress(progress).await;
                }
            }
            // What the last read brought first, without awaiting.
            // Small frames are read in place.
            let raw = if reader.has_buffered_frame() {
                reader.try_next_frame()
            } else {
                wakes.wake_all();
                let parked = self.parked.is_empty();
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return End::Cancelled,
                    _ = self.queue.closed() => return End::WriterStopped,
                    progress = self.parked.progress(), if !parked => {
                        self.parked_progress(progress).await;
                        continue;
                    }
                    f = reader.next_frame() => {
                        silence.heard();
                        f
                    }
                    // Last: a frame that is ready wins over the timer.
                    () = silence.elapsed() => {
                        crate::registry::declare_failed(
                            &self.shared,
                            &self.me,
                            self.incarnation,
                            "nothing arrived on its connection within the failure timeout (its data network is down, or it stalled), whatever its heartbeats say",
                        );
                        return End::Silent;
                    }
                }
            };
            let raw = match raw {
                Ok(Some(raw)) => raw,
                Ok(None) => return End::Eof,
                Err(e) => return End::Frame(e),
            };
            let (header, header_len) = match peek_cached(&raw, &mut names) {
                Ok(peeked) => peeked,
                Err(e) => return End::Frame(e),
            };
            if !matches!(header, Peeked::Message(_)) {
                // Acknowledgements and control frames may wait for room:
                // the writers held back are woken first.
                wakes.wake_all();
            }
            let end = match header {
                Peeked::Message(h)
                    if same_name(h.sender, self.me.as_str())
                        && h.incarnation < self.incarnation =>
                {
                    // Queued by an earlier incarnation (declared failed)
                    // before it rejoined: refused.
                    Counters::add(&self.shared.counters.stale_frames, 1);
                    None
                }
                Peeked::Message(h) => {
                    if !same_name(h.sender, self.me.as_str()) || h.incarnation != self.incarnation {
                        Some(End::Violation(format!(
                            "message claims sender {} incarnation {}",
                            h.sender, h.incarnation
                        )))
                    } else {
                        self.route(&h, &raw, raw.len() - header_len, &mut wakes)
                            .await;
                        None
                    }
                }
                Peeked::Ack(AckRef {
                    to,
                    to_incarnation,
                    from,
                    from_incarnation,
                    ..
                })
                | Peeked::Acks(AcksRef {
                    to,
                    to_incarnation,
                    from,
                    from_incarnation,
                    ..
                }) => {
                    self.acknowledgement(from, from_incarnation, to, to_incarnation, &raw)
                        .await
                }
                Peeked::Other(header) => self.control(*header, &raw[header_len..]).await,
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// An `Ack` or `Acks` frame: forwarded to the original sender if it
    /// really comes from this connection's node; a late one from an earlier
    /// incarnation is dropped.
    async fn acknowledgement(
        &self,
        from: &str,
        from_incarnation: u64,
        to: &str,
        to_incarnation: u64,
        raw: &RawFrame<'_>,
    ) -> Option<End> {
        if from != self.me.as_str() || from_incarnation > self.incarnation {
            return Some(End::Violation(format!(
                "acknowledgement claims to be from {from} incarnation {from_incarnation}"
            )));
        }
        if from_incarnation < self.incarnation {
            Counters::add(&self.shared.counters.stale_frames, 1);
            return None;
        }
        self.forward_ack(to, to_incarnation, raw).await;
        None
    }

    /// Handles a frame other than a message or an ack; `body` is the
    /// frame's body.
    async fn control(&mut self, header: Header, body: &[u8]) -> Option<End> {
        match header {
            Header::DeadLetter(mut entry) => {
                if !valid_name(&entry.service) || !valid_target(&entry.target) {
                    return Some(End::Violation(
                        "dead letter with a name of bad length".into(),
                    ));
                }
                // What the server knows, not what the node claims.
                entry.filed_by = self.me.to_string();
                self.shared.dead.file(*entry, Bytes::copy_from_slice(body));
                None
            }
            Header::DeadLetters(query) => {
                let token = query.token;
                if self.permissions.as_ref().is_some_and(|p| !p.dead_letters) {
                    tracing::warn!("dead-letter query refused: not permitted");
                    let end = Header::DeadLettersEnd {
                        token,
                        result: Err("not permitted (permissions.dead_letters)".into()),
                    };
                    self.reply(OutFrame::control(end)).await;
                    return None;
                }
                let (entries, stats) = self.shared.dead.query(&query);
                if query.take && !entries.is_empty() {
                    tracing::info!(taken = entries.len(), "dead letters taken");
                }
                for (entry, body) in entries {
                    let header = Header::DeadLetterEntry {
                        token,
                        entry: Box::new(entry),
                    };
                    self.reply(OutFrame::Parts { header, body }).await;
                }
                let end = Header::DeadLettersEnd {
                    token,
                    result: Ok(stats),
                };
                self.reply(OutFrame::control(end)).await;
                None
            }
            Header::Subscribe { service, .. }
                if !valid_name(&service) || self.service_count() >= MAX_NAMES_PER_NODE =>
            {
                Some(End::Violation(
                    "service name of bad length, or too many services".into(),
                ))
            }
            Header::Subscribe { token, service }
                if self
                    .permissions
                    .as_ref()
                    .is_some_and(|p| !p.may_subscribe(&service)) =>
            {
                tracing::warn!(service = %service, "refused a subscription: not permitted");
                let reason = format!("may not offer service {service:?} (permissions.subscribe)");
                let reply = OutFrame::control(Header::SubscribeRefused { token, reason });
                self.reply(reply).await;
                None
            }
            Header::Subscribe { token, service } => {
                if let Some(end) = self.update_services(&service, true) {
                    return Some(end);
                }
                let reply = OutFrame::control(Header::Subscribed { token });
                self.reply(reply).await;
                None
            }
            Header::Unsubscribe { service } => self.update_services(&service, false),
            Header::Resolve {
                token,
                target,
                service,
            } => {
                let result = if self
                    .permissions
                    .as_ref()
                    .is_some_and(|p| !p.may_send(TargetRef::from(&target)))
                {
                    Err(DeliveryFailure::NotPermitted)
                } else {
                    self.resolve_members(&target, &service)
                };
                let reply = OutFrame::control(Header::Resolved { token, result });
                self.reply(reply).await;
                None
            }
            Header::Report(report) => {
                // Answered on the connection itself, so that the node sees
                // its data path live (its heartbeats prove only theirs). A
                // full control class means the node reads nothing: no
                // answer then, which is what it should see.
                let _ = self
                    .queue
                    .try_push(OutFrame::control(Header::Pong { nonce: 0 }), Lane::Control);
                self.session
                    .backlog
                    .store(report.backlog, Ordering::Relaxed);
                if let Some(end) = report.busy.and_then(|busy| self.set_busy(busy)) {
                    return Some(end);
                }
                *self
                    .session
                    .report
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(report);
                None
            }
            Header::Trace(request) => {
                let started = if self.permissions.as_ref().is_some_and(|p| !p.trace) {
                    Err("not permitted (permissions.trace)".to_owned())
                } else {
                    self.shared
                        .traces
                        .start(&self.me, &self.queue, *request, self.shared.now_ms())
                };
                match started {
                    Ok(()) => {
                        tracing::info!("trace started");
                        self.reply(OutFrame::control(Header::TraceStarted)).await;
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "trace refused");
                        let end = Header::TraceEnd {
                            captured: 0,
                            dropped: 0,
                            reason: format!("refused: {reason}"),
                        };
                        self.reply(OutFrame::control(end)).await;
                    }
                }
                None
            }
            Header::LowMark { mark } => {
                self.reply(OutFrame::control(Header::LowCredit { mark }))
                    .await;
                None
            }
            Header::LowCredit { mark } => match self.queue.grant_low(mark) {
                Ok(()) => None,
                Err(e) => Some(End::Violation(e.to_string())),
            },
            Header::Goodbye => Some(End::Goodbye),
            other => Some(End::Violation(format!(
                "unexpected {} frame from a node",
                other.kind()
            ))),
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
        let ids = match state
            .table
            .resolve(self.me.as_str(), target, service, load)?
        {
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

    /// Counts a change of this node's membership; too many in a second
    /// end the connection (see [`MAX_MEMBER_CHANGES_PER_S`]).
    fn member_changed(&mut self) -> Option<End> {
        let now = self.shared.now_ms();
        let (since, count) = &mut self.member_changes;
        if now.saturating_sub(*since) >= 1000 {
            *since = now;
            *count = 0;
        }
        *count += 1;
        (*count > MAX_MEMBER_CHANGES_PER_S).then(|| {
            End::Violation(format!(
                "more than {MAX_MEMBER_CHANGES_PER_S} changes of its membership (busy state, services) in a second: each is sent to every member"
            ))
        })
    }

    /// Whether this node offers `service` now.
    fn offers(&self, service: &str) -> bool {
        self.shared
            .read()
            .table
            .member(&self.me)
            .is_some_and(|m| m.services.iter().any(|s| s == service))
    }

    /// Adds or removes one of this node's services (every member is told
    /// of a change).
    /// A change is counted before anyone is told (see
    /// [`Connection::member_changed`]); too many end the connection.
    fn update_services(&mut self, service: &str, add: bool) -> Option<End> {
        // Nothing to change: no write lock, which would make every
        // connection resolve its routes again.
        if self.offers(service) == add {
            return None;
        }
        if let Some(end) = self.member_changed() {
            return Some(end);
        }
        let mut state = self.shared.write();
        let updated = if add {
            state.table.subscribe(&self.me, service)
        } else {
            state.table.unsubscribe(&self.me, service)
        };
        if let Some(info) = updated {
            let event = Header::Member(MemberEvent::Updated(info));
            broadcast_locked(&self.shared, &state, &event);
        }
        None
    }

    /// The node reported itself busy, or no longer busy: every member is
    /// told (with the member's information, as for a change of services).
    /// A change is counted before anyone is told; too many end the
    /// connection.
    fn set_busy(&mut self, busy: bool) -> Option<End> {
        if self.session.busy.swap(busy, Ordering::Relaxed) == busy {
            return None;
        }
        if let Some(end) = self.member_changed() {
            return Some(end);
        }
        publish_busy(&self.shared, &self.me, &self.session);
        None
    }

    /// Counts what came of this node's parked messages, and answers it
    /// for those that did not get there.
    async fn parked_progress(&self, progress: Progress) {
        answer_parked(&self.shared, &self.me, &self.queue, progress).await;
    }

    /// The connection ended: its parked messages go into their receivers'
    /// queues if there is room now; the rest are dropped, counted (their
    /// sender is gone; it resends what was not acknowledged when it
    /// reconnects).
    fn finish_parked(&mut self) {
        let (delivered, dropped) = self.parked.finish();
        let counters = &self.shared.counters;
        Counters::add(&counters.deliveries, delivered as u64);
        if dropped > 0 {
            Counters::add(&counters.route_failures, dropped as u64);
            tracing::warn!(
                dropped,
                "the connection ended with messages parked for full receivers: dropped"
            );
        }
    }

    /// Queues a control frame to this node, waiting for room up to the
    /// slow-consumer limit.
    async fn reply(&self, frame: OutFrame) {
        push_control_bounded(&self.shared, &self.me, &self.queue, frame).await;
    }

    async fn forward_ack(&self, to: &str, to_incarnation: u64, raw: &RawFrame<'_>) {
        let queue = {
            let state = self.shared.read();
            match state.conns.get(to) {
                Some(c) if c.incarnation == to_incarnation => Some(c.queue.clone()),
                _ => None,
            }
        };
        match queue {
            Some(q) => {
                push_control_bounded(
                    &self.shared,
                    &NodeId::new(to),
                    &q,
                    OutFrame::Raw(raw.to_bytes()),
                )
                .await
            }
            None => tracing::trace!(%to, "dropping ack for a sender that is gone"),
        }
    }

    /// Routes one message into its receivers' queues and tells the sender
    /// where it went when the sender cannot know (fan-out, `AnyOf`) or when
    /// it failed.
    ///
    /// Writers found asleep are left in `wakes` for the caller to wake,
    /// unless this has to wait, when it wakes them first.
    async fn route(
        &mut self,
        h: &MessageRef<'_>,
        raw: &RawFrame<'_>,
        body_len: usize,
        wakes: &mut Wakes,
    ) {
        let counters = &self.shared.counters;
        Counters::add(&counters.messages, 1);
        Counters::add(&counters.message_bytes, body_len as u64);
        self.session.counters.add_in(raw.len());
        // Read the clock only for a message that expires.
        if h.expires_ms.is_some() && h.expired(unix_ms()) {
            Counters::add(&counters.expired, 1);
            wakes.wake_all();
            return self
                .route_failed(h, raw, body_len, DeliveryFailure::Expired)
                .await;
        }
        if self.shared.traces.any() {
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let body = &raw[raw.len() - body_len..];
            self.shared
                .traces
                .capture(h, body, self.shared.now_ms(), unix_ms);
        }
        // Replies go to the requesting runtime, not to a service, and
        // nobody waits for their routing result.
        let is_reply = h.kind.is_reply();
        let acked = h.kind.is_acknowledged() || h.kind == MessageKind::Request;
        let to_node = matches!(h.target, TargetRef::Node(_));
        let generation = self.shared.generation();
        let index = match self.routes.find(generation, is_reply, h.target, h.service) {
            Some(i) => i,
            None => match resolve_route(
                &self.shared,
                &self.me,
                self.permissions.as_deref(),
                &mut self.routes,
                is_reply,
                h.target,
                h.service,
            ) {
                Ok(i) => i,
                Err(failure) => {
                    wakes.wake_all();
                    return self.route_failed(h, raw, body_len, failure).await;
                }
            },
        };
        let routes = &mut self.routes;
        let entry = &routes.entries[index];
        let receivers: &[Receiver] = match &entry.resolved {
            Resolved::One(r) => std::slice::from_ref(r),
            Resolved::AnyOf(candidates) => {
                let turn = routes.turn;
                routes.turn = turn.wrapping_add(1);
                let load = |i: usize| candidates[i].load();
                match crate::table::least_loaded(candidates.len(), turn, load) {
                    Some(i) => std::slice::from_ref(&candidates[i]),
                    None => &[],
                }
            }
            Resolved::Many(all) => all,
        };
        let single = !matches!(entry.resolved, Resolved::Many(_));
        // Who got it is only reported for fan-outs and `AnyOf`.
        let name_receivers = !single || (acked && !to_node);
        let mut delivered = 0usize;
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        // `raw` as a buffer of its own, once one is needed.
        let mut owned: Option<Bytes> = None;
        // Until when a full receiver is waited for before it is parked for.
        let mut park_after = None;
        for r in receivers {
            match r.open() {
                None => failed.push((r.id.clone(), DeliveryFailure::TargetStopped)),
                Some((_, c)) if raw.len() > c.max_frame => failed.push((
                    r.id.clone(),
                    DeliveryFailure::PayloadTooLarge {
                        size: body_len as u64,
                        max: c.max_frame as u64,
                    },
                )),
                Some((queue, c)) => {
                    // Behind this sender's messages parked for the same
                    // receiver, if there are any: its order holds.
                    let behind = !self.parked.is_empty()
                        && self.parked.holds(&r.id, c.incarnation, h.priority);
                    // A small frame is copied straight in; otherwise (a
                    // large frame, or no room) it goes as a buffer of its
                    // own, made once for all receivers.
                    let pushed = if behind {
                        Err(None)
                    } else if queue.try_push_raw(raw, h.priority, Some(&mut *wakes)) {
                        Ok(())
                    } else {
                        let own = owned.get_or_insert_with(|| raw.to_bytes()).clone();
                        queue
                            .try_push_at(OutFrame::Raw(own), h.priority)
                            .map_err(Some)
                    };
                    // A queue full for a moment (its writer about to take
                    // the next batch) has room again within
                    // `message_server.park_after_ms`: waiting that long
                    // keeps a sender's stream to a slower receiver
                    // flowing, as before parking. One that stays full is
                    // parked for. One deadline for all the receivers of
                    // the message.
                    let pushed = match pushed {
                        Err(Some(PushError::Full(_) | PushError::Congested))
                            if self.shared.budget.has_room(raw.len()) =>
                        {
                            wakes.wake_all();
                            let until = *park_after.get_or_insert_with(|| {
                                let wait = self.shared.config.message_server.park_after_ms;
                                tokio::time::Instant::now() + Duration::from_millis(wait)
                            });
                            let own = owned.get_or_insert_with(|| raw.to_bytes()).clone();
                            queue
                                .push_at(OutFrame::Raw(own), h.priority, Wait::Until(until))
                                .await
                                .map_err(Some)
                        }
                        other => other,
                    };
                    let parked = match pushed {
                        Ok(()) => {
                            delivered += 1;
                            Ok(())
                        }
                        // Over the server's memory budget: answered at once
                        // (waiting for this queue's room would not help).
                        Err(Some(PushError::Full(_)))
                            if !self.shared.budget.has_room(raw.len()) =>
                        {
                            Err(DeliveryFailure::ReceiverOverloaded)
                        }
                        // A full queue: parked, so that this sender's
                        // messages to everyone else go on meanwhile.
                        Err(None | Some(PushError::Full(_) | PushError::Congested)) => {
                            let own = owned.get_or_insert_with(|| raw.to_bytes()).clone();
                            // Past the line's bound it is answered for
                            // that receiver only (a one-way message as a
                            // failure its sender counts): this sender's
                            // messages to others never wait for it.
                            let parked = self.parked.park(
                                &r.id,
                                c.incarnation,
                                &queue,
                                &c.session,
                                own,
                                (h.seq, h.priority),
                            );
                            if parked == Ok(true) {
                                // A new line: busy now for this sender,
                                // which holds back.
                                tell_busy(&self.shared, &self.me, &self.queue, &r.id, true).await;
                            }
                            parked.map(|_| ())
                        }
                        Err(Some(PushError::Closed(_))) => Err(DeliveryFailure::TargetStopped),
                    };
                    match parked {
                        Ok(()) => {
                            if name_receivers {
                                ok.push((r.id.clone(), c.incarnation));
                            }
                        }
                        Err(failure) => {
                            if failure == DeliveryFailure::ReceiverOverloaded {
                                Counters::add(&counters.overloaded, 1);
                            }
                            failed.push((r.id.clone(), failure));
                        }
                    }
                }
            }
        }
        Counters::add(&counters.deliveries, delivered as u64);
        Counters::add(&counters.delivery_bytes, (delivered * body_len) as u64);
        if !failed.is_empty() {
            Counters::add(&counters.route_failures, failed.len() as u64);
            if h.kind == MessageKind::Notify {
                // Nobody to tell: each receiver's copy is a dead letter.
                for (receiver, failure) in &failed {
                    let mut copy = *h;
                    copy.target = TargetRef::Node(receiver.as_str());
                    dead_letter(&self.shared, &copy, raw, body_len, failure);
                }
            }
        }
        if failed.is_empty() && (!acked || to_node) {
            // Nobody waits (one-way), or the sender knows its only receiver
            // and its ack will say the rest.
            return;
        }
        let error = if single && failed.len() == receivers.len() {
            failed.first().map(|(_, f)| f.clone())
        } else {
            None
        };
        wakes.wake_all();
        self.reply(routed(h.seq, ok, failed, error)).await;
    }

    /// A message the table could not route: held during the warm-up after
    /// a restart (its target may not have re-registered yet), answered with
    /// the failure otherwise.
    async fn route_failed(
        &self,
        h: &MessageRef<'_>,
        raw: &RawFrame<'_>,
        body_len: usize,
        failure: DeliveryFailure,
    ) {
        let counters = &self.shared.counters;
        if failure == DeliveryFailure::UnknownTarget && warming_up(&self.shared) {
            let TargetRef::Node(target) = h.target else {
                self.reply(routed(
                    h.seq,
                    vec![],
                    vec![],
                    Some(DeliveryFailure::UnknownTarget),
                ))
                .await;
                return;
            };
            let target = NodeId::new(target);
            let held = Held {
                // Its own copy: held frames must not pin the read buffer.
                raw: Bytes::copy_from_slice(raw),
                sender: self.me.clone(),
                seq: h.seq,
                priority: h.priority,
            };
            if hold(&self.shared, &target, held).is_err() {
                Counters::add(&counters.route_failures, 1);
                dead_letter(
                    &self.shared,
                    h,
                    raw,
                    body_len,
                    &DeliveryFailure::UnknownTarget,
                );
                let failed = vec![(target, DeliveryFailure::UnknownTarget)];
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
        Counters::add(&counters.route_failures, 1);
        dead_letter(&self.shared, h, raw, body_len, &failure);
        // Also for one-way messages: the sender hears of every message that
        // went nowhere. Name the node of a `Node` target, so that a sender
        // reaching several nodes one by one knows which one failed.
        let failed = match h.target {
            TargetRef::Node(id) => vec![(NodeId::new(id), failure.clone())],
            _ => vec![],
        };
        self.reply(routed(h.seq, vec![], failed, Some(failure)))
            .await;
    }
}

/// Files message `h` (whose frame is `raw`, ending in its body of
/// `body_len` bytes) in the dead-letter queue, if a message of its kind
/// that failed so goes there (see [`crate::dead::server_files`]).
fn dead_letter(
    shared: &Shared,
    h: &MessageRef<'_>,
    raw: &RawFrame<'_>,
    body_len: usize,
    failure: &DeliveryFailure,
) {
    let Some(reason) = crate::dead::server_files(h.kind, failure) else {
        return;
    };
    let entry = crate::dead::from_message(h, reason, unix_ms());
    let body = Bytes::copy_from_slice(&raw[raw.len() - body_len..]);
    shared.dead.file(entry, body);
}

/// Now, in milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether the names of a target a node claims are of valid length.
fn valid_target(target: &Target) -> bool {
    match target {
        Target::Node(n) => valid_name(n.as_str()),
        Target::Group(g) | Target::AnyOf(g) => valid_name(g),
        Target::All => true,
    }
}

/// Resolves a route under the state's read lock and caches it; returns
/// its index in the cache.
fn resolve_route(
    shared: &Shared,
    me: &NodeId,
    permissions: Option<&PermissionsConfig>,
    routes: &mut RouteCache,
    is_reply: bool,
    target: TargetRef<'_>,
    service: &str,
) -> Result<usize, DeliveryFailure> {
    // Checked once per route: a permitted route is cached, and only
    // permitted routes are. (A reply answers a request the node was
    // given: not a send of its own.)
    if !is_reply && permissions.is_some_and(|p| !p.may_send(target)) {
        return Err(DeliveryFailure::NotPermitted);
    }
    let (generation, resolved) = {
        let state = shared.read();
        // Stable while the read lock is held: writers change it under
        // the write lock.
        let generation = shared.generation();
        let receiver = |id: NodeId| Receiver {
            conn: state.conns.get(&id).map(|c| CachedConn {
                queue: c.queue.downgrade(),
                incarnation: c.incarnation,
                max_frame: c.max_frame,
                session: c.session.clone(),
            }),
            id,
        };
        let me = me.as_str();
        let resolved = match target {
            _ if is_reply => match state.table.resolve_node(target)? {
                Resolution::One(id) => Resolved::One(receiver(id)),
                Resolution::Many(ids) => Resolved::Many(ids.into_iter().map(receiver).collect()),
            },
            TargetRef::AnyOf(group) => Resolved::AnyOf(
                state
                    .table
                    .any_of_candidates(me, group, service)?
                    .into_iter()
                    .map(receiver)
                    .collect(),
            ),
            _ => match state.table.resolve(me, target, service, |_| 0)? {
                Resolution::One(id) => Resolved::One(receiver(id)),
                Resolution::Many(ids) => Resolved::Many(ids.into_iter().map(receiver).collect()),
            },
        };
        (generation, resolved)
    };
    let route = CachedRoute {
        reply: is_reply,
        target: target.to_target(),
        service: service.into(),
        resolved,
    };
    Ok(routes.insert(generation, route))
}

/// Counts what came of the parked messages of sender `me` (whose queue is
/// `queue`), and answers it for those that did not get there.
async fn answer_parked(shared: &Shared, me: &NodeId, queue: &OutQueue, progress: Progress) {
    let counters = &shared.counters;
    Counters::add(&counters.deliveries, progress.delivered as u64);
    Counters::add(&counters.delivery_bytes, progress.delivered_bytes as u64);
    for node in &progress.relieved {
        tell_busy(shared, me, queue, node, false).await;
    }
    for refusal in progress.refused {
        Counters::add(&counters.route_failures, 1);
        if refusal.failure == DeliveryFailure::ReceiverOverloaded {
            Counters::add(&counters.overloaded, 1);
        }
        let failure = refusal.failure;
        let answer = routed(
            refusal.seq,
            vec![],
            vec![(refusal.receiver, failure.clone())],
            Some(failure),
        );
        push_control_bounded(shared, me, queue, answer).await;
    }
    // After the answers: the sender hears why its message failed before it
    // hears the receiver left.
    for (node, cut) in &progress.cut_off {
        tracing::warn!(%node, "cutting off slow consumer: it read none of its data for message_server.slow_consumer_ms");
        Counters::add(&counters.slow_consumers, 1);
        cut.close();
    }
}

/// Tells sender `me` alone (its queue is `queue`) whether `receiver` is
/// busy for it: busy while it has messages parked for it (`parked`),
/// otherwise as the receiver itself reported. A membership update, as for
/// a reported change, but to this sender only: the others are not held
/// back by its traffic, and a receiver's overload costs no broadcast.
async fn tell_busy(
    shared: &Shared,
    me: &NodeId,
    queue: &OutQueue,
    receiver: &NodeId,
    parked: bool,
) {
    let info = shared.read().table.member(receiver).cloned();
    let Some(mut info) = info else {
        return;
    };
    info.busy |= parked;
    tracing::debug!(%receiver, busy = info.busy, "telling the sender");
    let update = OutFrame::control(Header::Member(MemberEvent::Updated(info)));
    push_control_bounded(shared, me, queue, update).await;
}

/// Tells every member whether `id` is busy now (as it reported), if that
/// changed. Looked at under the table's lock, so that of two changes
/// at once the last to publish says how things stand.
fn publish_busy(shared: &Shared, id: &NodeId, session: &Session) {
    let mut state = shared.write();
    let busy = session.busy.load(Ordering::Relaxed);
    if let Some(info) = state.table.set_busy(id, busy) {
        tracing::info!(
            node = %id,
            busy,
            "node {}",
            if busy { "busy" } else { "no longer busy" }
        );
        shared.events.busy(id, info.incarnation, busy);
        let event = Header::Member(MemberEvent::Updated(info));
        broadcast_locked(shared, &state, &event);
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
    let limit = Duration::from_millis(shared.config.message_server.slow_consumer_ms);
    if let Err(PushError::Full(_)) = queue.push(frame, Lane::Control, Wait::For(limit)).await {
        tracing::warn!(node = %to, "cutting off slow consumer: control frame waited too long");
        Counters::add(&shared.counters.slow_consumers, 1);
        queue.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fan_out(to: &str, receivers: usize) -> CachedRoute {
        CachedRoute {
            reply: false,
            target: Target::Group(to.into()),
            service: "svc".into(),
            resolved: Resolved::Many(
                (0..receivers)
                    .map(|i| Receiver {
                        id: NodeId::new(format!("n{i}")),
                        conn: None,
                    })
                    .collect(),
            ),
        }
    }

    /// The cache is bounded in routes and in receivers held, and forgets
    /// everything when the state's generation moves.
    #[test]
    fn route_cache_stays_bounded() {
        let mut cache = RouteCache::default();
        let g = |name| TargetRef::Group(name);
        cache.insert(1, fan_out("a", 600));
        assert_eq!(cache.find(1, false, g("a"), "svc"), Some(0));
        // A second large fan-out would pass the receiver bound: start over.
        cache.insert(1, fan_out("b", 600));
        assert_eq!(cache.find(1, false, g("a"), "svc"), None);
        assert_eq!(cache.find(1, false, g("b"), "svc"), Some(0));
        assert_eq!(cache.receivers, 600);
        // One larger than the bound is still kept, alone.
        cache.insert(1, fan_out("c", 5000));
        assert_eq!((cache.entries.len(), cache.receivers), (1, 5000));
        // Many small ones: at most MAX_CACHED_ROUTES.
        for i in 0..200 {
            cache.insert(1, fan_out(&format!("s{i}"), 1));
            assert!(cache.entries.len() <= MAX_CACHED_ROUTES);
            assert!(cache.receivers <= MAX_CACHED_RECEIVERS);
        }
        // Another generation: nothing is found any more.
        assert_eq!(cache.find(2, false, g("s199"), "svc"), None);
        assert_eq!((cache.entries.len(), cache.receivers), (0, 0));
    }
}
