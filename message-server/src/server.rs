//! The listener: binds, accepts, runs one connection task per node, and
//! shuts down on the future it is given.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use cluster_config::Config;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use transports::heartbeat::Beat;
use transports::protocol::{MemberInfo, NodeId};
use transports::OutQueue;

use crate::connection;
use crate::counters::{Counters, CountersSnapshot, NodeCounters};
use crate::monitor::EventLog;
use crate::registry::{self, HeldMessages};
use crate::table::RoutingTable;

/// Time the server waits for its connection tasks after shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Errors that stop the message server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Accepting connections failed for good.
    #[error("accepting connections failed")]
    Accept(#[source] std::io::Error),
    /// The `[tls]` files could not be used.
    #[error("cannot set up TLS")]
    Tls(#[from] transports::tls::TlsError),
    /// A node's section of the configuration could not be read.
    #[error("invalid configuration")]
    Config(#[from] cluster_config::ConfigError),
    /// The dead-letter store (`message_server.data_dir`) could not be
    /// opened: it is damaged, or its directory cannot be used.
    #[error("cannot open the dead-letter store (message_server.data_dir)")]
    Store(#[from] clustercomm_store::StoreError),
}

/// A connected node as the server sees it.
#[derive(Debug, Clone)]
pub(crate) struct ConnHandle {
    /// Tells this connection from a later one of the same node.
    pub(crate) conn_id: u64,
    pub(crate) incarnation: u64,
    pub(crate) queue: OutQueue,
    /// Largest frame this node accepts (negotiated at the handshake).
    pub(crate) max_frame: usize,
    /// When the last heartbeat (or the registration) came, in ms since the
    /// server started.
    pub(crate) last_seen: Arc<AtomicU64>,
    /// What its heartbeats must show.
    pub(crate) session: Arc<Session>,
}

/// A registered node's session, as its heartbeats are checked against it.
#[derive(Debug)]
pub(crate) struct Session {
    /// The session secret's key: every ping carries a MAC under it.
    pub(crate) mac: transports::auth::SessionMac,
    /// Where its heartbeats must come from: the address it declared for
    /// them, or its connection's.
    pub(crate) heartbeat_ip: std::net::IpAddr,
    /// The highest ping nonce accepted: a ping must go beyond it, so a
    /// recorded one cannot be played again.
    pub(crate) last_nonce: AtomicU64,
    /// Whether a signed heartbeat from another address was logged.
    pub(crate) wrong_address_told: std::sync::atomic::AtomicBool,
    /// Where its connection comes from (for the monitor).
    pub(crate) peer: SocketAddr,
    /// When it registered, in ms since the server started.
    pub(crate) since_ms: u64,
    /// What it sent through the server (for the monitor).
    pub(crate) counters: NodeCounters,
    /// Its latest report of what went past the server (for the monitor).
    pub(crate) report: std::sync::Mutex<Option<transports::protocol::NodeReport>>,
    /// Whether it reported itself busy: `AnyOf` passes it over.
    pub(crate) busy: std::sync::atomic::AtomicBool,
    /// Senders' lines of messages parked for it (its queue was full; see
    /// `parked`): while there are any, `AnyOf` counts it as busy.
    pub(crate) parked_lines: std::sync::atomic::AtomicUsize,
    /// The backlog in its inboxes it reported last: `AnyOf` sends to the
    /// least loaded.
    pub(crate) backlog: AtomicU64,
}

impl Session {
    /// Whether it counts as busy for `AnyOf`: its own report, or a queue
    /// here that its senders filled.
    pub(crate) fn is_busy(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::Relaxed)
            || self.parked_lines.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// The node's latest report, if it sent one.
    pub(crate) fn report(&self) -> Option<transports::protocol::NodeReport> {
        *self.report.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The table and the connections, under one read-mostly lock.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) table: RoutingTable,
    pub(crate) conns: HashMap<NodeId, ConnHandle>,
    pub(crate) next_conn_id: u64,
    /// Messages held for nodes not re-registered yet (warm-up).
    pub(crate) held: HeldMessages,
    /// Incarnations declared failed (refused if they come back).
    pub(crate) failed: HashSet<(NodeId, u64)>,
    pub(crate) failed_order: VecDeque<(NodeId, u64)>,
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    state: RwLock<State>,
    pub(crate) counters: Counters,
    /// Every connection's reader and writer task.
    pub(crate) tasks: TaskTracker,
    /// When the server started.
    pub(crate) started: std::time::Instant,
    /// Until when (milliseconds since start) messages to members not back
    /// yet are held: set when a rejoining node finds the server empty.
    pub(crate) warm_until_ms: AtomicU64,
    /// Where heartbeats are received.
    pub(crate) heartbeat_addr: Option<SocketAddr>,
    /// `cluster.credentials`, as the handshake's key.
    pub(crate) secret: Option<transports::auth::ClusterSecret>,
    /// With `[tls]`: every connection is TLS, and a node's certificate
    /// must name its node id.
    pub(crate) tls: Option<transports::tls::Tls>,
    /// `message_server.memory_budget_bytes`, which every connection's
    /// queue draws on.
    pub(crate) budget: Arc<transports::io::Budget>,
    /// Half of the memory budget: what the messages parked for full
    /// receivers may take of it, all senders together (see `parked`).
    pub(crate) parked: Arc<transports::io::Budget>,
    /// Which refusals are logged.
    pub(crate) refusals: transports::handshake::RefusalLog,
    /// Every node's permissions.
    pub(crate) permissions: cluster_config::PermissionsTable,
    /// Recent membership events and refusals, for the monitor.
    pub(crate) events: EventLog,
    /// The message traces running.
    pub(crate) traces: crate::trace::Traces,
    /// The dead-letter queue.
    pub(crate) dead: crate::dead::DeadLetters,
    /// Membership events, kept once for every member's writer (see
    /// `registry::broadcast_locked`); bounded by
    /// `message_server.queue_bytes`.
    pub(crate) membership: Arc<transports::io::Feed>,
    /// Bumped whenever the state is locked for writing: a connection's
    /// cached routes are good while it stays the same.
    generation: AtomicU64,
}

impl Shared {
    /// Milliseconds since the server started.
    pub(crate) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock would poison it; the state is still
        // consistent at every await-free step, so keep serving.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, State> {
        let guard = self.state.write().unwrap_or_else(|p| p.into_inner());
        // Before any change: a route cached under the old number is never
        // used after the change it missed.
        self.generation.fetch_add(1, Ordering::AcqRel);
        guard
    }

    /// The state's generation: it changes with every write lock.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// A cheap handle to read a running server's state.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The counters now.
    pub fn counters(&self) -> CountersSnapshot {
        let mut counters = self.shared.counters.snapshot();
        // Members cut off for falling too far behind membership events.
        counters.slow_consumers += self.shared.membership.lagged();
        counters
    }

    /// Connection tasks (one reader and one writer per connection) still
    /// running: zero once every node has gone and its socket is closed.
    pub fn connection_tasks(&self) -> usize {
        self.shared.tasks.len()
    }

    /// Where heartbeats are received (UDP).
    pub fn heartbeat_addr(&self) -> Option<SocketAddr> {
        self.shared.heartbeat_addr
    }

    /// The members now.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.shared.read().table.members()
    }

    /// The dead-letter queue's state.
    pub fn dead_letter_stats(&self) -> transports::protocol::DeadLetterStats {
        self.shared.dead.stats()
    }

    /// The newest `limit` dead letters (without their bodies), newest
    /// first.
    pub fn dead_letters(&self, limit: usize) -> Vec<transports::protocol::DeadLetter> {
        self.shared.dead.newest(limit)
    }

    /// What every connection shares (for the monitor).
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// A bound message server, ready to run.
#[derive(Debug)]
pub struct MessageServer {
    listener: TcpListener,
    heartbeat: tokio::net::UdpSocket,
    handle: ServerHandle,
}

impl MessageServer {
    /// Binds `config.message_server.listen` (on `message_server.interface`'s
    /// address when set).
    ///
    /// # Errors
    ///
    /// [`ServerError::Config`] if an interface the config names is missing,
    /// [`ServerError::Bind`] if the address cannot be bound,
    /// [`ServerError::Tls`] if the `[tls]` files cannot be used.
    pub async fn bind(config: Config) -> Result<MessageServer, ServerError> {
        // `message_server.interface` and `cluster.heartbeat_interface`
        // become addresses here, once: a missing interface fails the start.
        let config = config.resolve_interfaces()?;
        let tls = match config.tls.files() {
            Some((ca, cert, key)) => Some(transports::tls::Tls::load(ca, cert, key)?),
            None => None,
        };
        let addr = config.message_server.listen;
        let listener = transports::tcp::listen(addr, &config.tcp.options())
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let heartbeat_at = config.cluster.heartbeat_listen.unwrap_or(local_addr);
        let heartbeat = tokio::net::UdpSocket::bind(heartbeat_at)
            .await
            .map_err(|source| ServerError::Bind {
                addr: heartbeat_at,
                source,
            })?;
        let heartbeat_addr = heartbeat.local_addr().ok();
        let secret = config
            .cluster
            .credentials
            .as_deref()
            .map(transports::auth::ClusterSecret::new);
        let budget = transports::io::Budget::new(config.message_server.memory_budget_bytes);
        let parked = transports::io::Budget::new(config.message_server.memory_budget_bytes / 2);
        let permissions = config.permissions_table()?;
        let ms = &config.message_server;
        let (entries, bytes) = (ms.dead_letter_entries, ms.dead_letter_bytes);
        let dead = match ms.data_dir.clone() {
            Some(dir) => tokio::task::spawn_blocking(move || {
                crate::dead::DeadLetters::open(&dir, entries, bytes)
            })
            .await
            .map_err(|_| clustercomm_store::StoreError::Closed)??,
            None => crate::dead::DeadLetters::in_memory(entries, bytes),
        };
        let membership = transports::io::Feed::new(config.message_server.queue_bytes);
        let shared = Arc::new(Shared {
            membership,
            dead,
            events: EventLog::default(),
            permissions,
            refusals: transports::handshake::RefusalLog::default(),
            budget,
            parked,
            tls,
            secret,
            config,
            state: RwLock::new(State::default()),
            counters: Counters::default(),
            tasks: TaskTracker::new(),
            started: std::time::Instant::now(),
            traces: crate::trace::Traces::default(),
            warm_until_ms: AtomicU64::new(0),
            heartbeat_addr,
            generation: AtomicU64::new(0),
        });
        Ok(MessageServer {
            listener,
            heartbeat,
            handle: ServerHandle { shared, local_addr },
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr
    }

    /// A handle to read counters and members while the server runs.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves until `shutdown` resolves, then closes every connection and
    /// waits up to [`SHUTDOWN_GRACE`] for the connection tasks.
    ///
    /// # Errors
    ///
    /// [`ServerError::Accept`] if the listener fails for good; a failing
    /// connection never stops the server.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let cancel = CancellationToken::new();
        let shared = self.handle.shared.clone();
        let tracker = shared.tasks.clone();
        tracing::info!(addr = %self.handle.local_addr, "message server listening");
        let expiry = shared.clone();
        let expiry_cancel = cancel.clone();
        // Housekeeping is tracked apart from the connection tasks.
        let housekeeping = TaskTracker::new();
        housekeeping.spawn(heartbeats(shared.clone(), self.heartbeat, cancel.clone()));
        housekeeping.spawn(failure_detector(shared.clone(), cancel.clone()));
        {
            let shared = shared.clone();
            let cancel = cancel.clone();
            housekeeping.spawn(async move { shared.dead.flusher(cancel).await });
        }
        {
            // Membership events in a burst reach each member once per
            // linger, not once per event (see `transports::io::Feed`).
            let feed = shared.membership.clone();
            let cancel = cancel.clone();
            housekeeping.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    () = feed.run_linger() => {}
                }
            });
        }
        housekeeping.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = expiry_cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                expiry.traces.expire(expiry.now_ms());
                let n = registry::expire_held(&expiry);
                if n > 0 {
                    tracing::info!(
                        messages = n,
                        "warm-up over: held messages answered as unknown targets"
                    );
                }
            }
        });
        tokio::pin!(shutdown);
        let ms = &shared.config.message_server;
        let places = Arc::new(tokio::sync::Semaphore::new(ms.max_connections));
        let unregistered = Arc::new(tokio::sync::Semaphore::new(ms.max_unauthenticated));
        let mut turned_away = 0u64;
        let result = loop {
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Over a cap: refused at once, before anything is
                        // read or spawned.
                        let admitted = places.clone().try_acquire_owned().ok().zip(
                            unregistered.clone().try_acquire_owned().ok(),
                        );
                        let Some((place, unregistered)) = admitted else {
                            drop(stream);
                            Counters::add(&shared.counters.connections_refused, 1);
                            turned_away += 1;
                            shared.events.refused(peer, None, "over message_server.max_connections or max_unauthenticated");
                            if turned_away.is_power_of_two() {
                                tracing::warn!(%peer, total = turned_away, "connection refused: over max_connections or max_unauthenticated");
                            }
                            continue;
                        };
                        let admission = connection::Admission {
                            _place: place,
                            unregistered,
                        };
                        let shared = shared.clone();
                        let cancel = cancel.child_token();
                        let tasks = tracker.clone();
                        tracker.spawn(connection::serve(shared, stream, peer, cancel, tasks, admission));
                    }
                    Err(e) if is_transient(&e) => {
                        tracing::warn!(error = %e, "accept failed; continuing");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => break Err(ServerError::Accept(e)),
                },
            }
        };
        tracing::info!("message server shutting down");
        cancel.cancel();
        tracker.close();
        housekeeping.close();
        housekeeping.wait().await;
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("connection tasks did not finish within the grace period");
        }
        shared.dead.flush().await;
        result
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error().is_some_and(|c| c == 23 || c == 24) // ENFILE, EMFILE
}

/// Answers heartbeats and notes when each registered node was last heard.
async fn heartbeats(shared: Arc<Shared>, socket: tokio::net::UdpSocket, cancel: CancellationToken) {
    let mut buf = [0u8; transports::heartbeat::MAX_DATAGRAM_BYTES + 1];
    loop {
        let (n, from) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat receive failed");
                    continue;
                }
            },
        };
        let Some(Beat::Ping {
            node,
            incarnation,
            nonce,
            mac,
        }) = Beat::decode(&buf[..n])
        else {
            Counters::add(&shared.counters.heartbeats_refused, 1);
            continue;
        };
        let session = {
            let state = shared.read();
            match state.conns.get(&node) {
                Some(c) if c.incarnation == incarnation => {
                    Some((c.session.clone(), c.last_seen.clone()))
                }
                _ => None,
            }
        };
        // A ping counts only from the node's address, signed with its
        // session's secret, and with a nonce beyond the last one.
        let accepted = session.filter(|(session, _)| {
            let from_ip = from.ip().to_canonical();
            if from_ip != session.heartbeat_ip {
                // Signed by the node itself, from another address: a
                // node that sends from the wrong interface, not an
                // attacker (who cannot sign). Said once per session.
                if session.mac.verify_ping(&node, incarnation, nonce, &mac)
                    && !session.wrong_address_told.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(
                        node = %node, %from, expected = %session.heartbeat_ip,
                        "heartbeats refused: they come from another address than the node declared or connected from (set node.heartbeat_bind or node.heartbeat_interface on it); it will be failed"
                    );
                }
                return false;
            }
            session.mac.verify_ping(&node, incarnation, nonce, &mac)
                && session.last_nonce.fetch_max(nonce, Ordering::AcqRel) < nonce
        });
        let Some((session, last_seen)) = accepted else {
            Counters::add(&shared.counters.heartbeats_refused, 1);
            tracing::trace!(%from, "heartbeat refused: unknown, unsigned, replayed or from another address");
            continue;
        };
        last_seen.store(shared.now_ms(), Ordering::Relaxed);
        let pong = Beat::Pong {
            nonce,
            mac: session.mac.pong_mac(nonce),
        };
        let _ = socket.send_to(&pong.encode(), from).await;
    }
}

/// Declares failed every node silent for the failure timeout.
async fn failure_detector(shared: Arc<Shared>, cancel: CancellationToken) {
    let cluster = &shared.config.cluster;
    let timeout = cluster.failure_timeout_ms;
    let mut tick = tokio::time::interval(Duration::from_millis(
        (cluster.heartbeat_interval_ms / 2).max(10),
    ));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = shared.now_ms();
        let silent: Vec<(NodeId, u64)> = shared
            .read()
            .conns
            .iter()
            .filter(|(_, c)| now.saturating_sub(c.last_seen.load(Ordering::Relaxed)) > timeout)
            .map(|(id, c)| (id.clone(), c.incarnation))
            .collect();
        for (id, incarnation) in silent {
            registry::declare_failed(
                &shared,
                &id,
                incarnation,
                "no heartbeat within the failure timeout",
            );
        }
    }
}
