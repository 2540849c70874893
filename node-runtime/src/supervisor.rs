//! The node's link to the message server, kept up for the node's life.
//!
//! One task runs the link: it writes the node's outgoing queue and reads
//! what the server sends. When the link breaks it reconnects, every
//! `message_server.reconnect_delay_ms` with a back-off capped at
//! `reconnect_max_delay_ms`, walking the configured addresses in order
//! (primary first, then standbys), and registers again with the same
//! incarnation and its current services. Then it resends, before anything
//! newer, every acknowledged message still waiting for its outcome
//! (receivers drop the duplicates). While connected to a standby it probes
//! the primary and moves back as soon as it answers.
//!
//! Sends made while disconnected wait in the bounded outgoing queue, each
//! bounded by its send timeout; they do not fail at once.

use std::time::{Duration, Instant};

use cluster_config::Config;
use cluster_manager::link::LinkAction;
use transports::frame::FrameCodec;
use transports::handshake::{self, HandshakeError};
use transports::io::{ReadHalf, WriteHalf};
use transports::protocol::{Header, Hello, Interests, NodeReport, RefusalReason, Welcome};
use transports::{write_queue, FrameReader, Lane, OutFrame, OutReceiver, WriteEnd};

use crate::connection::{read_frames, LinkEnd, LinkLost};
use crate::identity::Credentials;
use crate::membership::MembershipEvent;
use crate::runtime::{resend_frames, Runtime};
use crate::server::Heartbeat;
use crate::NodeError;

/// A connected, registered link to one message server.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) address: String,
    /// Where the server takes heartbeats, with this session's secret.
    pub(crate) heartbeat: Option<Heartbeat>,
    pub(crate) index: usize,
    pub(crate) reader: FrameReader<ReadHalf>,
    pub(crate) writer: WriteHalf,
    pub(crate) max_frame: usize,
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    #[error(transparent)]
    Connect(#[from] std::io::Error),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Identity(#[from] transports::auth::AuthError),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
}

/// Connects to `message_server.addresses[index]` and registers.
pub(crate) async fn connect(
    config: &Config,
    credentials: &Credentials,
    hello: &Hello,
    interests: &Interests,
    index: usize,
) -> Result<(Link, Welcome), AttemptError> {
    let hello = credentials.fresh(hello)?;
    let address = config
        .message_server
        .addresses
        .get(index)
        .cloned()
        .unwrap_or_default();
    let stream =
        transports::tcp::connect(&address, &config.tcp.options(), config.connect_timeout()).await?;
    let peer = stream.peer_addr()?;
    let (rd, mut wr) = credentials
        .open(stream, &config.tls.server_name)
        .await
        .map_err(AttemptError::Tls)?;
    let mut reader =
        FrameReader::with_read_chunk(rd, FrameCodec::handshake(), config.node.read_chunk_bytes);
    let welcome = handshake::connect_handshake(
        &mut reader,
        &mut wr,
        &hello,
        Some(interests),
        credentials.opener(None),
        config.connect_timeout(),
    )
    .await?;
    let max_message = welcome
        .max_message_bytes
        .min(config.limits.max_message_bytes);
    let codec = FrameCodec::for_messages(max_message);
    // Message bodies are copied out as they are delivered.
    *reader.codec_mut() = codec.in_place();
    // Heartbeats need the session secret they are signed with.
    let heartbeat = match (welcome.heartbeat_addr, welcome.session_secret) {
        (Some(mut addr), Some(secret)) => {
            if addr.ip().is_unspecified() {
                addr.set_ip(peer.ip());
            }
            Some(Heartbeat {
                addr,
                mac: transports::auth::SessionMac::new(&secret),
            })
        }
        _ => None,
    };
    Ok((
        Link {
            heartbeat,
            address,
            index,
            reader,
            writer: wr,
            max_frame: codec.max_frame(),
        },
        welcome,
    ))
}

/// The first connection of a node: each address in order, once.
///
/// # Errors
///
/// [`NodeError::Connect`] if no server answered, [`NodeError::Handshake`]
/// if the last one that answered refused.
pub(crate) async fn connect_first(
    config: &Config,
    credentials: &Credentials,
    hello: &Hello,
    interests: &Interests,
) -> Result<(Link, Welcome), NodeError> {
    let mut last_io = None;
    let mut last_refusal = None;
    let mut last_tls = None;
    for index in 0..config.message_server.addresses.len() {
        match connect(config, credentials, hello, interests, index).await {
            Ok(ok) => return Ok(ok),
            Err(AttemptError::Identity(e)) => return Err(NodeError::Identity(e)),
            Err(AttemptError::Tls(source)) => {
                last_tls = Some((config.message_server.addresses[index].clone(), source))
            }
            Err(AttemptError::Connect(e)) => last_io = Some(e),
            Err(AttemptError::Handshake(e)) => {
                last_refusal = Some((config.message_server.addresses[index].clone(), e))
            }
        }
    }
    if let Some((address, source)) = last_refusal {
        return Err(NodeError::Handshake { address, source });
    }
    if let Some((address, source)) = last_tls {
        return Err(NodeError::TlsHandshake { address, source });
    }
    Err(NodeError::Connect {
        addresses: config.message_server.addresses.clone(),
        source: last_io.unwrap_or_else(|| std::io::Error::other("no message server address")),
    })
}

/// Runs the link until the node shuts down.
pub(crate) async fn supervise(rt: Runtime, mut rx: OutReceiver, mut link: Link) {
    let mut prelude = Vec::new();
    loop {
        rt.link_started(link.heartbeat.clone());
        let end = run_link(&rt, &mut rx, &mut link, std::mem::take(&mut prelude)).await;
        match end {
            LinkEnd::Shutdown => return,
            LinkEnd::Lost(reason) => {
                tracing::error!(address = %link.address, %reason, "channel stopped: lost the connection to the message server");
            }
            LinkEnd::PrimaryBack => {
                tracing::info!(address = %link.address, "channel stopped: the primary message server is back, moving to it");
            }
        }
        let ((), out) = rt.core.run(|core| core.handle_link_lost(Instant::now()));
        rt.dispatch(out.events);
        let Some((new_link, welcome)) = reconnect(&rt).await else {
            return;
        };
        link = new_link;
        tracing::info!(address = %link.address, "channel started: registered with the message server again");
        // Members the new server does not know yet get the failure timeout
        // to register; everything awaiting an outcome goes out again first.
        let index = link.index;
        let ((), out) = rt
            .core
            .run(|core| core.handle_link_up(Instant::now(), index, welcome.members));
        rt.core.timers.notify_one();
        prelude = resend_frames(out.transmits);
        rt.dispatch(out.events);
        rt.members.emit(MembershipEvent::Reconnected {
            address: link.address.clone(),
        });
    }
}

async fn run_link(
    rt: &Runtime,
    rx: &mut OutReceiver,
    link: &mut Link,
    prelude: Vec<OutFrame>,
) -> LinkEnd {
    if !prelude.is_empty() {
        tracing::info!(messages = prelude.len(), "resending what awaits an outcome");
    }
    let reading = read_frames(rt, &mut link.reader);
    let writing = write_queue(&mut link.writer, rx, link.max_frame, prelude);
    let watching = watch_link(rt);
    tokio::pin!(reading, writing, watching);
    // `None`: the writer is still running and may flush a goodbye.
    let (end, writer_done) = tokio::select! {
        r = &mut reading => (r, false),
        w = &mut writing => (match w {
            Ok(WriteEnd::Finished | WriteEnd::Closed) => LinkEnd::Shutdown,
            Err(e) => LinkEnd::Lost(LinkLost::Write(e)),
        }, true),
        end = &mut watching => (end, false),
        _ = rt.cancel.cancelled() => (LinkEnd::Shutdown, false),
    };
    if matches!(end, LinkEnd::Shutdown) && !writer_done {
        // Shutting down: let the goodbye out.
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut writing).await;
    }
    end
}

/// Watches the link's deadlines ([`cluster_manager::link::LinkState`]): resolves when the server
/// stopped answering heartbeats, or when the primary answers a probe while
/// this link is to a standby.
async fn watch_link(rt: &Runtime) -> LinkEnd {
    let config = &rt.config;
    loop {
        let due = rt.core.lock().poll_timeout();
        tokio::select! {
            _ = sleep_until(due) => {}
            // A deadline moved earlier (a member disconnected).
            _ = rt.core.timers.notified() => continue,
        }
        let (action, out) = rt.core.run(|core| core.handle_timeout(Instant::now()));
        rt.dispatch(out.events);
        match action {
            Some(LinkAction::Dead) => return LinkEnd::Lost(LinkLost::Silent),
            Some(LinkAction::ProbePrimary) => {
                let Some(primary) = config.message_server.addresses.first() else {
                    continue;
                };
                if transports::tcp::connect(
                    primary,
                    &config.tcp.options(),
                    config.connect_timeout(),
                )
                .await
                .is_ok()
                {
                    return LinkEnd::PrimaryBack;
                }
            }
            Some(LinkAction::Reconnect) | None => {}
        }
    }
}

/// Sleeps until `due`, or for ever if nothing is due.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

/// Reconnects when [`cluster_manager::link::LinkState`] says (a capped back-off, the addresses in
/// order); `None` if the node shuts down.
async fn reconnect(rt: &Runtime) -> Option<(Link, Welcome)> {
    let ms = &rt.config.message_server;
    loop {
        let due = rt.core.lock().poll_timeout();
        tokio::select! {
            _ = rt.cancel.cancelled() => return None,
            _ = sleep_until(due) => {}
        }
        let (action, out) = rt.core.run(|core| core.handle_timeout(Instant::now()));
        rt.dispatch(out.events);
        if action != Some(LinkAction::Reconnect) {
            continue;
        }
        let hello = rt.current_hello();
        let interests = rt.current_interests();
        let order = rt.core.lock().link().attempt_order();
        let mut rejoin = false;
        for index in order {
            let attempt = tokio::select! {
                _ = rt.cancel.cancelled() => return None,
                a = connect(&rt.config, &rt.credentials, &hello, &interests, index) => a,
            };
            match attempt {
                Ok(ok) => return Some(ok),
                Err(AttemptError::Handshake(HandshakeError::Refused { refusal }))
                    if refusal.reason == RefusalReason::IncarnationFailed =>
                {
                    let fresh = crate::runtime::fresh_incarnation();
                    tracing::warn!(
                        old = rt.incarnation(),
                        new = fresh,
                        "this node was declared failed; rejoining as a new incarnation"
                    );
                    rt.new_incarnation(fresh);
                    rejoin = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(address = %ms.addresses[index], error = %e, "reconnect attempt failed")
                }
            }
        }
        // A rejoin tries again at once (the core saw the new incarnation).
        if !rejoin {
            rt.core.lock().handle_attempts_failed(Instant::now());
        }
    }
}

/// Least time between two reports of a change of busy state.
const BUSY_REPORT_GAP: Duration = Duration::from_millis(10);

/// Queues this node's report to the message server (see [`NodeReport`]);
/// `reported_busy` is the busy state it carried, if it was queued.
fn send_report(rt: &Runtime, reported_busy: &mut bool) {
    let c = rt.counters.snapshot();
    let busy = rt.busy.is_busy();
    let backlog = rt
        .services
        .inboxes
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|q| q.inbox.backlog() + q.backlog.load(std::sync::atomic::Ordering::Relaxed))
        .sum::<usize>();
    let report = NodeReport {
        lazy_messages: c.lazy_messages,
        lazy_bytes: c.lazy_bytes,
        session_messages: c.session_messages,
        session_bytes: c.session_bytes,
        received_direct: c.received_direct,
        channels_open: rt.direct.open_count() as u64,
        busy: Some(busy),
        backlog: backlog as u64,
    };
    let frame = OutFrame::control(Header::Report(report));
    if rt.server.queue.try_push(frame, Lane::Control).is_err() {
        tracing::debug!("report to the message server skipped: its queue is full");
    } else {
        if busy != *reported_busy {
            tracing::info!(
                busy,
                backlog,
                "this node is {}",
                if busy { "busy" } else { "no longer busy" }
            );
        }
        *reported_busy = busy;
    }
}

/// Sends heartbeats to the current message server and notices when it
/// stops answering (a stopped or cut-off server that TCP has not noticed).
pub(crate) async fn heartbeats(rt: Runtime, socket: tokio::net::UdpSocket) {
    let cluster = &rt.config.cluster;
    let mut tick = tokio::time::interval(Duration::from_millis(cluster.heartbeat_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; transports::heartbeat::MAX_DATAGRAM_BYTES + 1];
    // Nonces grow (the server refuses one that does not) from a start
    // nobody can guess, so that a forged pong cannot answer a ping it
    // never saw; from the lower half, so that they never wrap.
    let mut nonce = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            >> 1
    };
    let mut reported_busy = false;
    let mut last_busy_report = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = rt.cancel.cancelled() => return,
            _ = tick.tick() => {
                if !rt.core.lock().link().is_up() {
                    continue;
                }
                // What went past the server, for its monitor, and whether
                // this node is busy; skipped when the link's queue is full.
                // Also what keeps the connection from falling silent: the
                // server answers it, and each side counts a connection
                // silent for the failure timeout as dead.
                send_report(&rt, &mut reported_busy);
                let target = rt.server.heartbeat.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let Some(target) = target else { continue };
                nonce += 1;
                rt.core.lock().handle_ping(nonce);
                let incarnation = rt.incarnation();
                let ping = transports::heartbeat::Beat::Ping {
                    node: rt.id.clone(),
                    incarnation,
                    nonce,
                    mac: target.mac.ping_mac(&rt.id, incarnation, nonce),
                };
                if let Err(e) = socket.send_to(&ping.encode(), target.addr).await {
                    tracing::debug!(error = %e, "heartbeat not sent");
                }
            }
            // Busy or no longer busy: the server hears it at once, not at
            // the next heartbeat. Becoming busy is said at most once every
            // BUSY_REPORT_GAP, so that a node flapping about its limits
            // does not flood every member with membership events (what it
            // is at the end of the gap is what is reported); the end of
            // busy is said at once, as its senders wait for it.
            () = rt.busy.changed.notified() => {
                if !reported_busy {
                    tokio::time::sleep_until(last_busy_report + BUSY_REPORT_GAP).await;
                }
                if rt.busy.is_busy() != reported_busy && rt.core.lock().link().is_up() {
                    send_report(&rt, &mut reported_busy);
                    if reported_busy {
                        last_busy_report = tokio::time::Instant::now();
                    }
                }
            }
            r = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                // Only a pong to one of our latest pings, signed with this
                // session's secret, counts. (Its source address is not
                // checked: a server bound to every interface answers from
                // whichever one the kernel picks.)
                let Some(transports::heartbeat::Beat::Pong { nonce: answered, mac }) =
                    transports::heartbeat::Beat::decode(&buf[..n])
                else {
                    continue;
                };
                let signed = rt
                    .server
                    .heartbeat
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .is_some_and(|hb| hb.mac.verify_pong(answered, &mac));
                if !signed {
                    tracing::debug!(%from, "a pong not signed with this session's secret: ignored");
                    continue;
                }
                if !rt.core.lock().handle_pong(Instant::now(), answered) {
                    tracing::debug!(%from, "a pong to no recent ping: ignored");
                }
            }
        }
    }
}
