//! The clustercomm side of the suite: every [`Case`] run against a fresh
//! message server and fresh nodes, and the path sweep that compares the
//! lazy channel with the message server across body sizes.
//!
//! Each [`run`] starts the message server as its own process
//! (`bench-message-server`, see [`server_binary`]) so that its peak
//! resident memory (`VmHWM` from `/proc/<pid>/status`) can be reported
//! apart from the nodes'. There is no fallback: without the binary the
//! case fails, naming it. The nodes run in this process, on the caller's
//! runtime, each with its own connection to the server, like separate
//! application servers. At the end of a case the nodes are shut down and
//! the server process killed and reaped.
//!
//! | case | clustercomm pattern | result |
//! | --- | --- | --- |
//! | `Notify` | `notify(Target::Node)` from one node to another, as fast as it returns | messages/s received |
//! | `FixedRate` | the same `notify`, paced at the case's rate, bodies stamped with their due time ([`crate::latency`]) | µs percentiles of arrival minus due time |
//! | `SendPipelined` | `submit` + `Pending::outcome` in an ordered window of `outstanding` | messages/s acknowledged |
//! | `FanOutAll` | `notify(Target::All)` from a sender to `receivers` nodes | deliveries/s (all receivers) |
//! | `FanOutGroup` | `notify(Target::Group)` to `receivers` nodes of one group | deliveries/s (all receivers) |
//! | `AnyOf` | `notify(Target::AnyOf)` over a group of `members` nodes | messages/s received in all |
//! | `RequestLatency` | `request` to a node that replies with the body, one at a time | µs percentiles |
//! | `RequestRate` | the same responder, `outstanding` requester tasks on one node | requests/s |
//! | `Session` | `session` from a dispatcher to a server node of its group | messages/s received |
//! | `Bulk` | acknowledged sends, [`BULK_IN_FLIGHT`] in flight, 64 KiB threshold; `Server` with an empty lazy allow-list | MB/s |
//! | `NotifyTls`, `LazyTls` | `Notify` and a lazy `Bulk`, in a cluster with `[tls]` ([`TlsCluster`]) | as theirs |
//! | `Stream` | `send_stream` over a lazy channel, one after the other | MB/s |
//! | `HeadOfLine` | `request` over a lazy channel that carries 64 MiB bodies back to back | µs percentiles |
//! | `Priority` | `send_with` at `Express`, one at a time, through the message server, while the sender pours `Low` 4 KiB `notify`s to the same node | µs percentiles |
//! | `RecoverableSend` | `submit_with(.., SendOptions::recoverable())` + `Pending::outcome` in an ordered window of `outstanding`, both nodes with a store; the receiver reads with `Inbox::recv_many` (256) | messages/s acknowledged |
//! | `RecoverableLatency` | `send_with(.., SendOptions::recoverable())`, one at a time, the same pair | µs percentiles |
//!
//! Nodes run on the default configuration (inboxes of
//! `node.inbox_capacity` = 1024 messages included), except that
//! small-message cases turn lazy auto-activation off
//! (`lazy.auto_activate_messages = 0`), so they measure the message-server
//! path (the session channel for `Session`). Every case checks the nodes'
//! [`PathCounters`] and fails if any message took another path.
//!
//! The recoverable cases give the sender and the receiver each a store
//! (`node.data_dir`) in a fresh directory of its own under the temporary
//! directory ([`StoreDir`]), removed when the case ends. A recoverable
//! message that its node answers `SendError::StillQueued` for (stored,
//! not delivered in time, to be sent again) fails the case: a healthy run
//! has none. The receiver takes messages in batches (`Inbox::recv_many`),
//! each batch marked handed over in its store with one fsync (`recv` would
//! take one fsync per message), and a receiver that falls behind holds
//! up the acknowledgements once its inbox is full, so its reading is part
//! of the rate.
//!
//! One-way cases have no flow control past the sender's outgoing queue: a
//! message the server or a receiver could not take is dropped (counted by
//! the sender's `late_failures`). The rate counts only what arrived, up to
//! the moment the last of it arrived; what did not arrive is the
//! measurement's loss, reported as the sender's late failures when they
//! account for it, and unexplained when they do not.
//!
//! The TLS cases run in a cluster configured as an operator would: one
//! TOML file with `[tls]` (the message server's certificate) and a
//! `[nodes.<id>.tls]` section per node, its certificates from
//! clustercomm's own generator ([`TlsCluster`] with [`TLS_NODES`], made
//! once per run). The
//! server loads the file (`bench-message-server --config`) and each node
//! takes its sections into its case's configuration, so every
//! connection, to the message server and over a lazy channel, is mutual
//! TLS.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use node_runtime::{
    Config, Node, NodeId, PathCounters, Pending, Priority, Role, SendOptions, Target,
};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::child::ListeningChild;
use crate::latency::{self, PacedSender, Recorder};
use crate::memory;
use crate::options::{Options, WAIT_TIMEOUT};
use crate::raw_cases::{bulk_plans, BULK_IN_FLIGHT};
use crate::report::per_second;
use crate::suite::{BulkPath, Case, Latency, Measurement, Outcome};
use crate::tls::TlsCluster;
use crate::transfer::{Plan, Transfer};
use crate::wait::{delivered_once, settle, wait_for_count, wait_until, Counter};

/// The message-server binary of this package (`src/bin/`).
pub const SERVER_BINARY: &str = "bench-message-server";

/// The service every receiver offers.
pub const SERVICE: &str = "bench";

/// The group of the fan-out, any-of and session cases.
pub const GROUP: &str = "web";

/// `lazy.threshold_bytes` of the bulk cases (the default).
pub const BULK_THRESHOLD_BYTES: u64 = 64 * 1024;

/// `limits.max_message_bytes` of the nodes and the server in the bulk
/// cases and the sweep.
pub const BULK_MAX_MESSAGE_BYTES: u64 = 128 * 1024 * 1024;

/// One-way sends issued between two looks at the clock.
pub const SENDS_PER_CLOCK_CHECK: u64 = 16;

/// How long a count may stand still before it is taken as final.
pub use crate::wait::STALL;

/// The node ids of the TLS cases, to be given certificates by
/// [`TlsCluster::generate`]: the sender and receiver of `notify`, and the
/// lazy bulk pair.
pub const TLS_NODES: [&str; 4] = ["sender", "receiver", "bulk-lazy-a", "bulk-lazy-b"];

/// Bytes the sweep keeps in flight: `SWEEP_WINDOW_BYTES / body` bodies,
/// at least [`BULK_IN_FLIGHT`], at most [`SWEEP_MAX_IN_FLIGHT`].
pub const SWEEP_WINDOW_BYTES: usize = 8 * 1024 * 1024;

/// Most bodies the sweep keeps in flight (small bodies).
pub const SWEEP_MAX_IN_FLIGHT: usize = 256;

/// Least number of measured bodies per sweep point and path.
pub const SWEEP_MIN_BODIES: u64 = 3;

/// Runs `case` against a fresh message-server process (`server`, the
/// `bench-message-server` binary) and fresh nodes: the measurement, and
/// the server process's peak resident memory during the case in KiB
/// (`VmHWM`, read as the case ends; `None` if it could not be read). A
/// TLS case runs in the cluster `tls` configures.
///
/// A case that ran but went wrong (a node did not start, a send failed, a
/// message took the wrong path, a wait timed out) is
/// [`Outcome::Failed`].
///
/// # Errors
///
/// If the message server process could not be started, or a TLS case
/// has no `tls`.
pub async fn run(
    case: Case,
    options: &Options,
    server: &Path,
    tls: Option<&TlsCluster>,
) -> anyhow::Result<(Measurement, Option<u64>)> {
    let max_message_bytes = match case {
        Case::Bulk { .. }
        | Case::LazyTls { .. }
        | Case::Stream { .. }
        | Case::HeadOfLine { .. } => Some(BULK_MAX_MESSAGE_BYTES),
        _ => None,
    };
    let tls = match (case.tls(), tls) {
        (true, None) => bail!("{case} needs a TLS cluster"),
        (true, tls) => tls,
        (false, _) => None,
    };
    let mut cluster = Cluster::start(server, max_message_bytes, tls).await?;
    let budget = options.warmup + options.measure + 4 * WAIT_TIMEOUT;
    let measured = match tokio::time::timeout(budget, measure(case, options, &mut cluster)).await {
        Ok(Ok(measured)) => measured,
        Ok(Err(e)) => Measurement::failed(format!("{e:#}")),
        Err(_) => Measurement::failed(format!("the case took longer than {budget:?}")),
    };
    let peak = cluster.peak_kib();
    cluster.stop().await;
    Ok((measured, peak))
}

/// One size of the path sweep: acknowledged-send throughput over a lazy
/// channel and through the message server. A path whose measurement
/// failed is `NaN` (the reason went to stderr).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepPoint {
    /// Body size in bytes.
    pub body: usize,
    /// MB/s (10^6 bytes) over a lazy channel.
    pub lazy_mb_s: f64,
    /// MB/s through the message server.
    pub server_mb_s: f64,
}

/// Measures both paths at each of `sizes` (against `server`, the
/// `bench-message-server` binary), one short phase each (half the
/// options' warm-up, a third of their measured phase, at least
/// [`SWEEP_MIN_BODIES`] bodies), on one message-server process and two
/// node pairs: one with a lazy threshold of 0 (every body goes over a lazy
/// channel), one with an empty lazy allow-list (every body goes through
/// the server). Small bodies are kept many in flight (see
/// [`sweep_in_flight`]) so the rate shows the per-message cost of each
/// path, not round trips.
///
/// # Errors
///
/// If the server or the nodes could not be started; a failed point is
/// `NaN` instead.
pub async fn sweep(
    sizes: &[usize],
    options: &Options,
    server: &Path,
) -> anyhow::Result<Vec<SweepPoint>> {
    let mut cluster = Cluster::start(server, Some(BULK_MAX_MESSAGE_BYTES), None).await?;
    let result = sweep_on(&mut cluster, sizes, options).await;
    cluster.stop().await;
    result
}

/// Bodies the sweep keeps in flight at `body` bytes.
pub fn sweep_in_flight(body: usize) -> usize {
    (SWEEP_WINDOW_BYTES / body.max(1)).clamp(BULK_IN_FLIGHT, SWEEP_MAX_IN_FLIGHT)
}

/// The `lazy.threshold_bytes` the sweep suggests: the crossover, the last
/// size at which the message server was at least as fast as the lazy
/// channel, provided the lazy channel was faster at every larger size.
/// Bodies up to the threshold then take the server, larger ones the lazy
/// channel. Points with a `NaN` are ignored; order does not matter.
///
/// `None` when there is no crossover in the range: the lazy channel was
/// faster at every size, or the server was still at least as fast at the
/// largest.
pub fn recommend_threshold(points: &[SweepPoint]) -> Option<usize> {
    let mut points: Vec<&SweepPoint> = points
        .iter()
        .filter(|p| p.lazy_mb_s.is_finite() && p.server_mb_s.is_finite())
        .collect();
    points.sort_by_key(|p| p.body);
    let last_server = points.iter().rposition(|p| p.server_mb_s >= p.lazy_mb_s)?;
    if last_server + 1 == points.len() {
        return None;
    }
    Some(points[last_server].body)
}

/// Where the suite looks for [`SERVER_BINARY`] first (see
/// [`crate::child::beside_exe`]); `None` if it is not there, and the suite
/// then takes the path cargo built it at.
pub fn server_binary() -> Option<PathBuf> {
    crate::child::beside_exe(SERVER_BINARY)
}

// ---------------------------------------------------------------------------
// The message server of one case
// ---------------------------------------------------------------------------

/// Starts a `bench-message-server` process (`binary`) on a free loopback
/// port, with `limits.max_message_bytes` at `max_message_bytes` if given,
/// and the cluster file of `tls` if given.
async fn start_server(
    binary: &Path,
    max_message_bytes: Option<u64>,
    tls: Option<&TlsCluster>,
) -> anyhow::Result<ListeningChild> {
    let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    if let Some(tls) = tls {
        args.extend(["--config".to_owned(), tls.file().display().to_string()]);
    }
    if let Some(max) = max_message_bytes {
        args.extend(["--max-message-bytes".to_owned(), max.to_string()]);
    }
    ListeningChild::start(binary, args, Stdio::inherit()).await
}

/// `VmHWM` of process `pid`, in KiB.
fn peak_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    memory::parse_status(&status).map(|m| m.hwm_kib)
}

// ---------------------------------------------------------------------------
// The nodes of one case
// ---------------------------------------------------------------------------

/// A server and the nodes and tasks of one case, all stopped by
/// [`Cluster::stop`] (or, failing that, on drop).
struct Cluster<'a> {
    server: ListeningChild,
    addr: SocketAddr,
    /// The TLS cluster the nodes join, if any.
    tls: Option<&'a TlsCluster>,
    nodes: Vec<Node>,
    tasks: Vec<JoinHandle<()>>,
    /// The nodes' stores, removed after the nodes are stopped.
    stores: Vec<StoreDir>,
}

impl<'a> Cluster<'a> {
    async fn start(
        binary: &Path,
        max_message_bytes: Option<u64>,
        tls: Option<&'a TlsCluster>,
    ) -> anyhow::Result<Cluster<'a>> {
        let server = start_server(binary, max_message_bytes, tls)
            .await
            .with_context(|| format!("starting the message server {}", binary.display()))?;
        let addr = server.addr();
        Ok(Cluster {
            server,
            addr,
            tls,
            nodes: Vec::new(),
            tasks: Vec::new(),
            stores: Vec::new(),
        })
    }

    /// A fresh directory for node `id`'s store, removed when the case
    /// ends.
    fn store_dir(&mut self, id: &str) -> PathBuf {
        let dir = StoreDir::new(id);
        let path = dir.path().to_owned();
        self.stores.push(dir);
        path
    }

    /// Starts a node in `groups` with `role` (with its TLS sections in a
    /// TLS cluster).
    async fn node(
        &mut self,
        id: &str,
        config: &Config,
        groups: &[&str],
        role: Role,
    ) -> anyhow::Result<Node> {
        let config = match self.tls {
            Some(tls) => tls.apply(id, config)?,
            None => config.clone(),
        };
        let builder = Node::builder(id)
            .config(config)
            .message_server(self.addr)
            .groups(groups.iter().copied())
            .role(role);
        let node = tokio::time::timeout(WAIT_TIMEOUT, builder.start())
            .await
            .with_context(|| format!("starting {id} timed out"))?
            .with_context(|| format!("starting {id}"))?;
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// Subscribes `node` to [`SERVICE`] and counts what arrives into
    /// `received`.
    async fn drain_into(&mut self, node: &Node, received: &Counter) -> anyhow::Result<()> {
        let mut inbox = subscribe(node).await?;
        let counter = received.clone();
        self.tasks.push(tokio::spawn(async move {
            while let Some(mut message) = inbox.recv().await {
                // A stream is read to its end, as it arrives.
                if let Some(mut stream) = message.body_stream() {
                    while let Ok(Some(chunk)) = stream.chunk().await {
                        drop(chunk);
                    }
                }
                drop(message);
                counter.add(1);
            }
        }));
        Ok(())
    }

    /// Subscribes `node` to [`SERVICE`] and counts every message into
    /// `received`, taking them in batches with `Inbox::recv_many` (one
    /// fsync marks a batch of recoverable messages handed over).
    async fn drain_batches_into(&mut self, node: &Node, received: &Counter) -> anyhow::Result<()> {
        let mut inbox = subscribe(node).await?;
        let counter = received.clone();
        self.tasks.push(tokio::spawn(async move {
            let mut batch = Vec::with_capacity(256);
            while inbox.recv_many(&mut batch, 256).await > 0 {
                counter.add(batch.len() as u64);
                batch.clear();
            }
        }));
        Ok(())
    }

    /// Subscribes `node` to [`SERVICE`] and answers every request with its
    /// own body.
    async fn respond(&mut self, node: &Node) -> anyhow::Result<()> {
        let mut inbox = subscribe(node).await?;
        self.tasks.push(tokio::spawn(async move {
            while let Some(message) = inbox.recv().await {
                if message.is_request() {
                    let body = message.body().clone();
                    // A failed reply fails that request at the requester
                    // (by its timeout); keep answering the others.
                    let _ = message.reply(body).await;
                }
            }
        }));
        Ok(())
    }

    fn peak_kib(&self) -> Option<u64> {
        peak_kib(self.server.id())
    }

    /// Shuts the nodes down together (each waits at most its grace
    /// period), stops the tasks, then kills and reaps the server.
    async fn stop(mut self) {
        let nodes = std::mem::take(&mut self.nodes);
        let all = futures_util::future::join_all(nodes.into_iter().map(Node::shutdown));
        let _ = tokio::time::timeout(WAIT_TIMEOUT, all).await;
        for task in self.tasks.drain(..) {
            task.abort();
        }
        // Dropping `self` kills the server and removes the stores.
    }
}

/// A directory of its own under [`std::env::temp_dir`] for one node's
/// store (the store creates it), removed with what is in it when dropped.
struct StoreDir(PathBuf);

impl StoreDir {
    /// A name no other store of this or another process takes: the node's
    /// id, the process id, a counter and the time.
    fn new(id: &str) -> StoreDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        StoreDir(std::env::temp_dir().join(format!(
            "clustercomm-bench-store-{id}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("clustercomm: could not remove {}: {e}", self.0.display());
            }
        }
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn subscribe(node: &Node) -> anyhow::Result<node_runtime::Inbox> {
    tokio::time::timeout(WAIT_TIMEOUT, node.subscribe(SERVICE))
        .await
        .with_context(|| format!("{} subscribing timed out", node.id()))?
        .with_context(|| format!("{} subscribing", node.id()))
}

/// The configuration of the small-message cases: auto-activation off, so
/// that everything goes through the message server.
fn small_config() -> Config {
    let mut config = Config::default();
    config.lazy.auto_activate_messages = 0;
    config.node.direct_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config
}

/// The configuration of a bulk pair forced onto `via` (lazy bodies above
/// `threshold`).
fn bulk_config(via: Via, threshold: u64) -> Config {
    let mut config = small_config();
    config.limits.max_message_bytes = BULK_MAX_MESSAGE_BYTES;
    config.lazy.threshold_bytes = threshold;
    config.lazy.services = match via {
        Via::Server => vec![],
        Via::Lazy | Via::Session => vec!["*".to_owned()],
    };
    config
}

// ---------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------

/// The path a case's messages must take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Server,
    Lazy,
    Session,
}

impl Via {
    fn describe(self) -> &'static str {
        match self {
            Via::Server => "through the message server",
            Via::Lazy => "over a lazy channel",
            Via::Session => "over the session channel",
        }
    }
}

/// The sender's and the receivers' counters at the start of a phase.
struct PathCheck {
    via: Via,
    sender: PathCounters,
    receivers: Vec<PathCounters>,
}

impl PathCheck {
    fn begin(via: Via, sender: &Node, receivers: &[Node]) -> PathCheck {
        PathCheck {
            via,
            sender: sender.counters(),
            receivers: receivers.iter().map(Node::counters).collect(),
        }
    }

    /// Checks that the sender sent its `sends` messages on the path and no
    /// other, and that the receivers got nothing on another path; with
    /// `arrived`, also that exactly that many arrived on the path.
    fn verify(
        &self,
        sender: &Node,
        receivers: &[Node],
        sends: u64,
        arrived: Option<u64>,
    ) -> anyhow::Result<()> {
        let now = sender.counters();
        let server = now.server_messages - self.sender.server_messages;
        let lazy = now.lazy_messages - self.sender.lazy_messages;
        let session = now.session_messages - self.sender.session_messages;
        let (mut server_in, mut direct_in) = (0, 0);
        for (node, before) in receivers.iter().zip(&self.receivers) {
            let c = node.counters();
            server_in += c.received_server - before.received_server;
            direct_in += c.received_direct - before.received_direct;
        }
        let counts = format!(
            "sender counted {server} via server + {lazy} lazy + {session} session, receivers \
             {server_in} via server + {direct_in} direct"
        );
        let (on, off, arrived_on, arrived_off) = match self.via {
            Via::Server => (server, lazy + session, server_in, direct_in),
            Via::Lazy => (lazy, server + session, direct_in, server_in),
            Via::Session => (session, server + lazy, direct_in, server_in),
        };
        ensure!(
            on == sends && off == 0 && arrived_off == 0,
            "expected all {sends} messages {}: {counts}",
            self.via.describe()
        );
        if let Some(arrived) = arrived {
            ensure!(
                arrived_on == arrived,
                "expected {arrived} arrivals {}: {counts}",
                self.via.describe()
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------

async fn measure(
    case: Case,
    options: &Options,
    cluster: &mut Cluster<'_>,
) -> anyhow::Result<Measurement> {
    let rate = |outcome: anyhow::Result<Outcome>| outcome.map(Measurement::from);
    match case {
        // Over TLS or not, as the cluster was started.
        Case::Notify { body } | Case::NotifyTls { body } => {
            let config = small_config();
            let received = Counter::new();
            let receiver = cluster.node("receiver", &config, &[], Role::Server).await?;
            cluster.drain_into(&receiver, &received).await?;
            let sender = cluster.node("sender", &config, &[], Role::Server).await?;
            let how = OneWay::Notify(Target::Node(receiver.id().clone()));
            let setup = OneWaySetup {
                sender,
                how,
                receivers: vec![receiver],
                received,
                per_send: 1,
                via: Via::Server,
            };
            setup.run(body, options).await
        }
        Case::FixedRate { body, rate } => fixed_rate(cluster, body, rate, options).await,
        Case::SendPipelined {
            body, outstanding, ..
        } => rate(send_pipelined(cluster, body, outstanding, options).await),
        Case::FanOutAll { receivers, body } => {
            fan_out(cluster, receivers, body, Target::All, options).await
        }
        Case::FanOutGroup { receivers, body } => {
            let target = Target::Group(GROUP.to_owned());
            fan_out(cluster, receivers, body, target, options).await
        }
        Case::AnyOf { members, body } => {
            let target = Target::AnyOf(GROUP.to_owned());
            fan_out(cluster, members, body, target, options).await
        }
        Case::RequestLatency { body } => rate(request_latency(cluster, body, options).await),
        Case::RequestRate { body, outstanding } => {
            rate(request_rate(cluster, body, outstanding, options).await)
        }
        Case::Session { body } => session(cluster, body, options).await,
        Case::Bulk { body, path } => {
            let via = match path {
                BulkPath::Lazy => Via::Lazy,
                BulkPath::Server => Via::Server,
            };
            rate(bulk(cluster, via, body, options).await)
        }
        Case::LazyTls { body } => rate(bulk(cluster, Via::Lazy, body, options).await),
        Case::Stream { body } => rate(streams(cluster, body, options).await),
        Case::HeadOfLine { body } => rate(head_of_line(cluster, body, options).await),
        Case::Priority { body } => rate(express_behind_low(cluster, body, options).await),
        Case::RecoverableSend { body, outstanding } => {
            rate(recoverable_send(cluster, body, outstanding, options).await)
        }
        Case::RecoverableLatency { body } => {
            rate(recoverable_latency(cluster, body, options).await)
        }
    }
}

/// Acknowledged bulk bodies on `via`, [`BULK_IN_FLIGHT`] in flight: MB/s.
async fn bulk(
    cluster: &mut Cluster<'_>,
    via: Via,
    body: usize,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let pair = Pair::start(cluster, via, BULK_THRESHOLD_BYTES, "bulk").await?;
    let (warmup, measure) = bulk_plans(options);
    let payload = Bytes::from(vec![0xB5; body]);
    let transfer = pair
        .transfer(&payload, BULK_IN_FLIGHT, &warmup, &measure)
        .await?;
    Ok(Outcome::Rate(transfer.mb_per_second()))
}

/// Requests of `body` bytes, one at a time, while the requester sends
/// [`crate::suite::HOL_BULK_BYTES`] bodies to the responder back to back
/// over their lazy channel (which the requests take too): per-request
/// round-trip percentiles.
async fn head_of_line(
    cluster: &mut Cluster<'_>,
    body: usize,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let config = bulk_config(Via::Lazy, BULK_THRESHOLD_BYTES);
    let responder = cluster.node("hol-b", &config, &[], Role::Server).await?;
    // Answers the requests; the bulk bodies, one-way, are dropped.
    cluster.respond(&responder).await?;
    let requester = cluster.node("hol-a", &config, &[], Role::Server).await?;
    knows_direct(&requester, &responder).await?;
    let target = Target::Node(responder.id().clone());
    let bulk = Bytes::from(vec![0xB5; crate::suite::HOL_BULK_BYTES]);
    // The first body opens the channel the requests then take.
    requester
        .send(target.clone(), SERVICE, bulk.clone())
        .await
        .context("the first bulk body")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flowing = {
        let (requester, target, stop) = (requester.clone(), target.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                requester
                    .send(target.clone(), SERVICE, bulk.clone())
                    .await
                    .context("a bulk body")?;
            }
            anyhow::Ok(())
        })
    };
    let payload = Bytes::from(vec![0x5A; body]);
    let mut samples = crate::latency::histogram();
    let start = Instant::now();
    let measured = async {
        while start.elapsed() < options.warmup + options.measure {
            let sent = Instant::now();
            request(&requester, &target, &payload).await?;
            if start.elapsed() > options.warmup {
                crate::latency::record(&mut samples, sent.elapsed().as_nanos() as u64);
            }
        }
        anyhow::Ok(())
    }
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flowing.await??;
    measured?;
    let counters = requester.counters();
    ensure!(
        counters.lazy_opened == 1 && counters.lazy_closed == 0 && counters.server_messages == 0,
        "the requests and the bulk did not share one lazy channel: {counters:?}"
    );
    Latency::from_histogram(&samples)
        .map(Outcome::Latency)
        .context("no request completed")
}

/// Acknowledged `Express` sends of `body` bytes, one at a time, through
/// the message server, while the sender pours one-way `Low` messages of
/// [`crate::suite::PRIORITY_BACKLOG_BYTES`] to the same receiver as fast
/// as its queue takes them: per-send percentiles.
async fn express_behind_low(
    cluster: &mut Cluster<'_>,
    body: usize,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let config = small_config();
    let receiver = cluster.node("prio-b", &config, &[], Role::Server).await?;
    // Acknowledges what enters its inbox, and drops it.
    cluster.respond(&receiver).await?;
    let sender = cluster.node("prio-a", &config, &[], Role::Server).await?;
    let target = Target::Node(receiver.id().clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let backlog = {
        let (sender, target, stop) = (sender.clone(), target.clone(), stop.clone());
        let low = SendOptions::new().priority(Priority::Low);
        let body = Bytes::from(vec![0u8; crate::suite::PRIORITY_BACKLOG_BYTES]);
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sender
                    .notify_with(target.clone(), SERVICE, body.clone(), &low)
                    .await
                    .context("a Low message")?;
            }
            anyhow::Ok(())
        })
    };
    let express = SendOptions::new()
        .priority(Priority::Express)
        .timeout(WAIT_TIMEOUT);
    let payload = Bytes::from(vec![0x5A; body]);
    let mut samples = crate::latency::histogram();
    let start = Instant::now();
    let measured = async {
        while start.elapsed() < options.warmup + options.measure {
            let sent = Instant::now();
            sender
                .send_with(target.clone(), SERVICE, payload.clone(), &express)
                .await
                .context("an Express send")?;
            if start.elapsed() > options.warmup {
                crate::latency::record(&mut samples, sent.elapsed().as_nanos() as u64);
            }
        }
        anyhow::Ok(())
    }
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    backlog.await??;
    measured?;
    let counters = sender.counters();
    ensure!(
        counters.lazy_messages == 0,
        "messages took a lazy channel: {counters:?}"
    );
    Latency::from_histogram(&samples)
        .map(Outcome::Latency)
        .context("no Express send completed")
}

/// Bodies of `body` bytes sent as streams, one after the other, over a
/// lazy channel, each read by the receiver as it arrives: MB/s of the
/// measured phase.
async fn streams(
    cluster: &mut Cluster<'_>,
    body: usize,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let pair = Pair::start(cluster, Via::Lazy, BULK_THRESHOLD_BYTES, "stream").await?;
    let (warmup, measure) = bulk_plans(options);
    let payload = Bytes::from(vec![0xB5; body]);
    let target = Target::Node(pair.receivers[0].id().clone());
    let base = pair.received.get();
    let send = |plan: &Plan| {
        let (sender, target, payload, plan) = (&pair.sender, &target, &payload, *plan);
        async move {
            let start = Instant::now();
            let mut sent = 0u64;
            while plan.more(sent, start.elapsed()) {
                let source = std::io::Cursor::new(payload.clone());
                sender
                    .send_stream(target.clone(), SERVICE, source, payload.len() as u64)
                    .await
                    .context("send_stream")?;
                sent += 1;
            }
            anyhow::Ok((sent, start.elapsed()))
        }
    };
    let (warm, _) = send(&warmup).await.context("warm-up")?;
    let (sent, took) = send(&measure).await?;
    wait_for_count(&pair.received, base + warm + sent, WAIT_TIMEOUT)
        .await
        .context("draining the receiver's inbox")?;
    let lazy = pair.sender.counters().lazy_messages;
    ensure!(
        lazy >= warm + sent,
        "{} of {} streams went over the lazy channel",
        lazy,
        warm + sent
    );
    Ok(Outcome::Rate(
        Transfer::new(sent, body, took).mb_per_second(),
    ))
}

/// `notify` from one node to another at `rate` messages per second: the
/// latency from each message's due time to its arrival in the receiver's
/// task, and what did not arrive (see [`latency::fixed_rate`]).
async fn fixed_rate(
    cluster: &mut Cluster<'_>,
    body: usize,
    rate: u64,
    options: &Options,
) -> anyhow::Result<Measurement> {
    ensure!(rate > 0, "no rate to send at");
    let config = small_config();
    let recorder = Recorder::new();
    let receiver = cluster.node("receiver", &config, &[], Role::Server).await?;
    let mut inbox = subscribe(&receiver).await?;
    let recording = recorder.clone();
    cluster.tasks.push(tokio::spawn(async move {
        while let Some(message) = inbox.recv().await {
            recording.record(message.body());
        }
    }));
    let sender = cluster.node("sender", &config, &[], Role::Server).await?;
    let receivers = [receiver];
    let check = PathCheck::begin(Via::Server, &sender, &receivers);
    let late = sender.late_failures();
    let mut paced = PacedNotify {
        node: sender.clone(),
        target: Target::Node(receivers[0].id().clone()),
        sent: 0,
    };
    let measured = latency::fixed_rate(&mut paced, &recorder, body, rate as f64, options).await?;
    check.verify(&sender, &receivers, paced.sent, None)?;
    let late = sender.late_failures() - late;
    Ok(explain_loss(measured, late))
}

/// A node's `notify` as a fixed-rate sender.
struct PacedNotify {
    node: Node,
    target: Target,
    sent: u64,
}

impl PacedSender for PacedNotify {
    async fn send(&mut self, body: Bytes) -> anyhow::Result<()> {
        self.node
            .notify(self.target.clone(), SERVICE, body)
            .await
            .context("one-way send")?;
        self.sent += 1;
        Ok(())
    }
}

/// `measured` with its loss put down to the sender's `late` failures
/// when they account for all of it; otherwise the loss stays
/// unexplained (and stderr says what the sender counted).
fn explain_loss(measured: Measurement, late: u64) -> Measurement {
    let lost = measured.lost;
    if lost == 0 {
        return measured;
    }
    if late >= lost {
        let why = format!("the sender reported {late} late failures");
        return measured.with_loss(lost, Some(why));
    }
    eprintln!(
        "clustercomm: {lost} messages lost, but the sender reported only {late} late failures"
    );
    measured.with_loss(lost, None)
}

/// How a one-way case sends.
enum OneWay {
    Notify(Target),
    Session(NodeId),
}

/// A one-way case: who sends how, who receives, and what that yields.
struct OneWaySetup {
    sender: Node,
    how: OneWay,
    receivers: Vec<Node>,
    received: Counter,
    /// Deliveries each send makes.
    per_send: u64,
    via: Via,
}

impl OneWaySetup {
    /// Warm-up, then the measured phase: deliveries per second from the
    /// first send of the phase to the last arrival, and what did not
    /// arrive.
    async fn run(&self, body: usize, options: &Options) -> anyhow::Result<Measurement> {
        let payload = Bytes::from(vec![0x5A; body]);
        let check = PathCheck::begin(self.via, &self.sender, &self.receivers);

        let warm = self.send_for(&payload, options.warmup).await?;
        settle(&self.received, warm * self.per_send)
            .await
            .context("warm-up")?;

        let base = self.received.get();
        let late = self.sender.late_failures();
        let start = Instant::now();
        let sent = self.send_for(&payload, options.measure).await?;
        let expected = sent * self.per_send;
        let (count, done) = settle(&self.received, base + expected).await?;
        let got = count - base;
        ensure!(got > 0, "no message arrived");
        check.verify(&self.sender, &self.receivers, warm + sent, None)?;
        let measured = Measurement::from(Outcome::Rate(per_second(got, done - start)))
            .with_loss(expected.saturating_sub(got), None);
        Ok(explain_loss(measured, self.sender.late_failures() - late))
    }

    /// Sends for `duration`; how many sends returned `Ok`.
    async fn send_for(&self, payload: &Bytes, duration: Duration) -> anyhow::Result<u64> {
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < duration {
            for _ in 0..SENDS_PER_CLOCK_CHECK {
                let result = match &self.how {
                    OneWay::Notify(target) => {
                        self.sender
                            .notify(target.clone(), SERVICE, payload.clone())
                            .await
                    }
                    OneWay::Session(node) => {
                        self.sender.session(node, SERVICE, payload.clone()).await
                    }
                };
                result.context("one-way send")?;
                sent += 1;
            }
        }
        Ok(sent)
    }
}

/// `receivers` nodes in [`GROUP`] and a sender outside it; one-way to
/// `target`. `AnyOf` counts one delivery per send, the others one per
/// receiver.
async fn fan_out(
    cluster: &mut Cluster<'_>,
    receivers: usize,
    body: usize,
    target: Target,
    options: &Options,
) -> anyhow::Result<Measurement> {
    ensure!(receivers > 0, "no receivers");
    let config = small_config();
    let received = Counter::new();
    let mut nodes = Vec::with_capacity(receivers);
    for i in 0..receivers {
        let node = cluster
            .node(&format!("receiver-{i}"), &config, &[GROUP], Role::Server)
            .await?;
        cluster.drain_into(&node, &received).await?;
        nodes.push(node);
    }
    let sender = cluster.node("sender", &config, &[], Role::Server).await?;
    let per_send = match target {
        Target::AnyOf(_) => 1,
        _ => receivers as u64,
    };
    let setup = OneWaySetup {
        sender,
        how: OneWay::Notify(target),
        receivers: nodes,
        received,
        per_send,
        via: Via::Server,
    };
    setup.run(body, options).await
}

/// A dispatcher and a server node in [`GROUP`]; one-way over the session
/// channel once it is open.
async fn session(
    cluster: &mut Cluster<'_>,
    body: usize,
    options: &Options,
) -> anyhow::Result<Measurement> {
    let config = small_config();
    let received = Counter::new();
    let server = cluster
        .node("session-server", &config, &[GROUP], Role::Server)
        .await?;
    cluster.drain_into(&server, &received).await?;
    let dispatcher = cluster
        .node("dispatcher", &config, &[GROUP], Role::Dispatcher)
        .await?;
    if wait_until(WAIT_TIMEOUT, || dispatcher.counters().session_opened >= 1)
        .await
        .is_none()
    {
        let c = dispatcher.counters();
        bail!(
            "the session channel did not open within {WAIT_TIMEOUT:?} ({} opened, {} failed)",
            c.session_opened,
            c.session_failed
        );
    }
    let setup = OneWaySetup {
        how: OneWay::Session(server.id().clone()),
        sender: dispatcher,
        receivers: vec![server],
        received,
        per_send: 1,
        via: Via::Session,
    };
    setup.run(body, options).await
}

/// Acknowledged sends from one node to another, `outstanding` in an
/// ordered window: acknowledgements per second.
async fn send_pipelined(
    cluster: &mut Cluster<'_>,
    body: usize,
    outstanding: usize,
    options: &Options,
) -> anyhow::Result<Outcome> {
    ensure!(outstanding > 0, "nothing in flight");
    let config = small_config();
    let received = Counter::new();
    let receiver = cluster.node("receiver", &config, &[], Role::Server).await?;
    cluster.drain_into(&receiver, &received).await?;
    let sender = cluster.node("sender", &config, &[], Role::Server).await?;
    let rate = windowed_rate(
        &sender,
        receiver,
        &received,
        body,
        outstanding,
        &SendOptions::default(),
        options,
    )
    .await?;
    Ok(Outcome::Rate(rate))
}

/// Sends `body`-byte messages from `sender` to `receiver` (whose inbox
/// counts into `received`) with `send_options`, `outstanding` in an
/// ordered window, for the warm-up and then the measured time; waits
/// until the receiver has them all and checks their path. Acknowledged
/// messages per second.
async fn windowed_rate(
    sender: &Node,
    receiver: Node,
    received: &Counter,
    body: usize,
    outstanding: usize,
    send_options: &SendOptions,
    options: &Options,
) -> anyhow::Result<f64> {
    let target = Target::Node(receiver.id().clone());
    let payload = Bytes::from(vec![0x5A; body]);
    let receivers = [receiver];
    let check = PathCheck::begin(Via::Server, sender, &receivers);
    let plan = |duration| Plan {
        duration,
        min_bodies: 1,
    };
    let (warm, _) = send_window(
        sender,
        &target,
        &payload,
        send_options,
        outstanding,
        &plan(options.warmup),
    )
    .await
    .context("warm-up")?;
    let start = Instant::now();
    let (acked, done) = send_window(
        sender,
        &target,
        &payload,
        send_options,
        outstanding,
        &plan(options.measure),
    )
    .await?;
    wait_for_count(received, warm + acked, WAIT_TIMEOUT)
        .await
        .context("draining the receiver's inbox")?;
    check.verify(sender, &receivers, warm + acked, Some(warm + acked))?;
    Ok(per_second(acked, done - start))
}

/// Sends `payload` to `target` with `options` for `plan`, at most
/// `window` unacknowledged, each awaited in order; returns how many, and
/// when the last outcome arrived.
///
/// # Errors
///
/// If any send failed (a recoverable one still queued included), or a
/// submit or an outcome took longer than [`WAIT_TIMEOUT`].
async fn send_window(
    sender: &Node,
    target: &Target,
    payload: &Bytes,
    options: &SendOptions,
    window: usize,
    plan: &Plan,
) -> anyhow::Result<(u64, Instant)> {
    let start = Instant::now();
    let mut pending: VecDeque<Pending> = VecDeque::with_capacity(window);
    let mut sent = 0u64;
    // No per-message timeouts or clock reads (the NATS publisher has none
    // either): a submit and an outcome are bounded by the node's send
    // timeout, and the whole case by its budget.
    while plan.more(sent, start.elapsed()) {
        for _ in 0..SENDS_PER_CLOCK_CHECK {
            if pending.len() >= window {
                if let Some(oldest) = pending.pop_front() {
                    delivered_once(oldest).await?;
                }
            }
            let next = sender
                .submit_with(target.clone(), SERVICE, payload.clone(), options)
                .await
                .context("submit")?;
            pending.push_back(next);
            sent += 1;
        }
    }
    while let Some(oldest) = pending.pop_front() {
        delivered_once(oldest).await?;
    }
    Ok((sent, Instant::now()))
}

/// A receiver and a sender (returned in that order), each with a store
/// of its own ([`Cluster::store_dir`]); the receiver reads every message
/// of [`SERVICE`] with `Inbox::recv_many` and counts it into `received`.
async fn recoverable_pair(
    cluster: &mut Cluster<'_>,
    received: &Counter,
) -> anyhow::Result<(Node, Node)> {
    let mut config = small_config();
    config.node.data_dir = Some(cluster.store_dir("receiver"));
    let receiver = cluster.node("receiver", &config, &[], Role::Server).await?;
    cluster.drain_batches_into(&receiver, received).await?;
    config.node.data_dir = Some(cluster.store_dir("sender"));
    let sender = cluster.node("sender", &config, &[], Role::Server).await?;
    Ok((receiver, sender))
}

/// Checks that `sender` holds no recoverable message its receiver has
/// not acknowledged (each outcome was `Ok`, so none should be).
fn none_held(sender: &Node) -> anyhow::Result<()> {
    let held = sender.recoverable_unacknowledged();
    ensure!(
        held == 0,
        "{held} recoverable messages still unacknowledged after every outcome was Ok"
    );
    Ok(())
}

/// Recoverable sends from one node with a store to another, `outstanding`
/// in an ordered window, through the message server: acknowledgements
/// per second (each one stored by both nodes).
async fn recoverable_send(
    cluster: &mut Cluster<'_>,
    body: usize,
    outstanding: usize,
    options: &Options,
) -> anyhow::Result<Outcome> {
    ensure!(outstanding > 0, "nothing in flight");
    let received = Counter::new();
    let (receiver, sender) = recoverable_pair(cluster, &received).await?;
    let recoverable = SendOptions::new().recoverable();
    let rate = windowed_rate(
        &sender,
        receiver,
        &received,
        body,
        outstanding,
        &recoverable,
        options,
    )
    .await?;
    none_held(&sender)?;
    Ok(Outcome::Rate(rate))
}

/// One recoverable send, awaited: it must reach its one receiver.
async fn recoverable_once(
    sender: &Node,
    target: &Target,
    payload: &Bytes,
    options: &SendOptions,
) -> anyhow::Result<()> {
    let report = sender
        .send_with(target.clone(), SERVICE, payload.clone(), options)
        .await
        .context("a recoverable send")?;
    ensure!(
        report.is_complete() && report.delivered.len() == 1,
        "a recoverable send not delivered: {report:?}"
    );
    Ok(())
}

/// Recoverable sends one at a time, through the message server:
/// per-send percentiles (from the call until the receiver stored and
/// acknowledged it).
async fn recoverable_latency(
    cluster: &mut Cluster<'_>,
    body: usize,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let received = Counter::new();
    let (receiver, sender) = recoverable_pair(cluster, &received).await?;
    let target = Target::Node(receiver.id().clone());
    let payload = Bytes::from(vec![0x5A; body]);
    let receivers = [receiver];
    let check = PathCheck::begin(Via::Server, &sender, &receivers);
    let recoverable = SendOptions::new().recoverable();
    let mut sends = 0u64;
    let start = Instant::now();
    while start.elapsed() < options.warmup {
        recoverable_once(&sender, &target, &payload, &recoverable)
            .await
            .context("warm-up")?;
        sends += 1;
    }
    let mut samples = crate::latency::histogram();
    let start = Instant::now();
    while start.elapsed() < options.measure {
        let sent = Instant::now();
        recoverable_once(&sender, &target, &payload, &recoverable).await?;
        crate::latency::record(&mut samples, sent.elapsed().as_nanos() as u64);
    }
    sends += samples.len();
    wait_for_count(&received, sends, WAIT_TIMEOUT)
        .await
        .context("draining the receiver's inbox")?;
    check.verify(&sender, &receivers, sends, Some(sends))?;
    none_held(&sender)?;
    Latency::from_histogram(&samples)
        .map(Outcome::Latency)
        .context("no recoverable send completed")
}

/// A requester and a responder that echoes the body.
async fn request_pair(cluster: &mut Cluster<'_>) -> anyhow::Result<(Node, Node)> {
    let config = small_config();
    let responder = cluster
        .node("responder", &config, &[], Role::Server)
        .await?;
    cluster.respond(&responder).await?;
    let requester = cluster
        .node("requester", &config, &[], Role::Server)
        .await?;
    Ok((requester, responder))
}

/// One request, bounded; checks the echo.
async fn request(node: &Node, target: &Target, payload: &Bytes) -> anyhow::Result<()> {
    let reply = tokio::time::timeout(
        WAIT_TIMEOUT,
        node.request(target.clone(), SERVICE, payload.clone()),
    )
    .await
    .context("request timed out")?
    .context("request")?;
    ensure!(
        reply.body.len() == payload.len(),
        "a {}-byte reply to a {}-byte request",
        reply.body.len(),
        payload.len()
    );
    Ok(())
}

/// Sequential requests: per-request round-trip percentiles.
async fn request_latency(
    cluster: &mut Cluster<'_>,
    body: usize,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let (requester, responder) = request_pair(cluster).await?;
    let target = Target::Node(responder.id().clone());
    let payload = Bytes::from(vec![0x5A; body]);
    let responders = [responder];
    let check = PathCheck::begin(Via::Server, &requester, &responders);
    let mut requests = 0u64;
    let start = Instant::now();
    while start.elapsed() < options.warmup {
        request(&requester, &target, &payload)
            .await
            .context("warm-up")?;
        requests += 1;
    }
    let mut samples = crate::latency::histogram();
    let start = Instant::now();
    while start.elapsed() < options.measure {
        let sent = Instant::now();
        request(&requester, &target, &payload).await?;
        crate::latency::record(&mut samples, sent.elapsed().as_nanos() as u64);
    }
    requests += samples.len();
    check.verify(&requester, &responders, requests, Some(requests))?;
    Latency::from_histogram(&samples)
        .map(Outcome::Latency)
        .context("no request completed")
}

/// `outstanding` requester tasks on one node: requests per second.
async fn request_rate(
    cluster: &mut Cluster<'_>,
    body: usize,
    outstanding: usize,
    options: &Options,
) -> anyhow::Result<Outcome> {
    ensure!(outstanding > 0, "no requests in flight");
    let (requester, responder) = request_pair(cluster).await?;
    let target = Target::Node(responder.id().clone());
    let payload = Bytes::from(vec![0x5A; body]);
    let responders = [responder];
    let check = PathCheck::begin(Via::Server, &requester, &responders);
    let (warm, _) = requests_for(&requester, &target, &payload, outstanding, options.warmup)
        .await
        .context("warm-up")?;
    let (done, elapsed) =
        requests_for(&requester, &target, &payload, outstanding, options.measure).await?;
    check.verify(&requester, &responders, warm + done, Some(warm + done))?;
    Ok(Outcome::Rate(per_second(done, elapsed)))
}

/// `tasks` requesters looping requests until `duration` has passed: how
/// many completed, and the time from the start until the last did.
async fn requests_for(
    node: &Node,
    target: &Target,
    payload: &Bytes,
    tasks: usize,
    duration: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let start = Instant::now();
    let mut running = JoinSet::new();
    for _ in 0..tasks {
        let (node, target, payload) = (node.clone(), target.clone(), payload.clone());
        running.spawn(async move {
            let mut done = 0u64;
            while start.elapsed() < duration {
                request(&node, &target, &payload).await?;
                done += 1;
            }
            anyhow::Ok(done)
        });
    }
    let joined = tokio::time::timeout(duration + WAIT_TIMEOUT, async {
        let mut done = 0u64;
        while let Some(joined) = running.join_next().await {
            done += joined.context("requester task panicked")??;
        }
        anyhow::Ok(done)
    })
    .await;
    match joined {
        Ok(done) => Ok((done?, start.elapsed())),
        Err(_) => {
            running.abort_all();
            bail!("requesters still running {WAIT_TIMEOUT:?} after the deadline")
        }
    }
}

// ---------------------------------------------------------------------------
// Bulk and the sweep
// ---------------------------------------------------------------------------

/// Waits until `sender` knows `receiver`'s direct-channel address and its
/// [`SERVICE`] (without them a send would fall back to the message
/// server).
async fn knows_direct(sender: &Node, receiver: &Node) -> anyhow::Result<()> {
    let id = receiver.id();
    let known = || {
        sender.members().iter().any(|m| {
            &m.id == id && m.direct_addr.is_some() && m.services.iter().any(|s| s == SERVICE)
        })
    };
    if wait_until(WAIT_TIMEOUT, known).await.is_none() {
        bail!(
            "{} did not learn of {id}'s direct address and {SERVICE} service",
            sender.id()
        );
    }
    Ok(())
}

/// A sender and a receiver draining [`SERVICE`], configured for one path.
struct Pair {
    via: Via,
    sender: Node,
    receivers: [Node; 1],
    received: Counter,
}

impl Pair {
    /// Starts `{prefix}-{via}-b` (the receiver) and `{prefix}-{via}-a`;
    /// for a lazy pair, waits until the sender knows the receiver's
    /// direct-channel address and service (without it the send would
    /// fall back to the message server).
    async fn start(
        cluster: &mut Cluster<'_>,
        via: Via,
        threshold: u64,
        prefix: &str,
    ) -> anyhow::Result<Pair> {
        let config = bulk_config(via, threshold);
        let name = match via {
            Via::Server => "server",
            Via::Lazy | Via::Session => "lazy",
        };
        let received = Counter::new();
        let receiver = cluster
            .node(&format!("{prefix}-{name}-b"), &config, &[], Role::Server)
            .await?;
        cluster.drain_into(&receiver, &received).await?;
        let sender = cluster
            .node(&format!("{prefix}-{name}-a"), &config, &[], Role::Server)
            .await?;
        if via == Via::Lazy {
            knows_direct(&sender, &receiver).await?;
        }
        Ok(Pair {
            via,
            sender,
            receivers: [receiver],
            received,
        })
    }

    /// Warm-up and measured phase of acknowledged sends, `window` in
    /// flight: what the measured phase moved. Waits until the receiver
    /// drained every body, and checks their path.
    async fn transfer(
        &self,
        payload: &Bytes,
        window: usize,
        warmup: &Plan,
        measure: &Plan,
    ) -> anyhow::Result<Transfer> {
        let target = Target::Node(self.receivers[0].id().clone());
        let check = PathCheck::begin(self.via, &self.sender, &self.receivers);
        let base = self.received.get();
        let plain = SendOptions::default();
        let (warm, _) = send_window(&self.sender, &target, payload, &plain, window, warmup)
            .await
            .context("warm-up")?;
        let start = Instant::now();
        let (sent, done) =
            send_window(&self.sender, &target, payload, &plain, window, measure).await?;
        let transfer = Transfer::new(sent, payload.len(), done - start);
        wait_for_count(&self.received, base + warm + sent, WAIT_TIMEOUT)
            .await
            .context("draining the receiver's inbox")?;
        check.verify(
            &self.sender,
            &self.receivers,
            warm + sent,
            Some(warm + sent),
        )?;
        Ok(transfer)
    }
}

async fn sweep_on(
    cluster: &mut Cluster<'_>,
    sizes: &[usize],
    options: &Options,
) -> anyhow::Result<Vec<SweepPoint>> {
    // Threshold 0: every body of the lazy pair goes over its channel.
    let lazy = Pair::start(cluster, Via::Lazy, 0, "sweep").await?;
    let server = Pair::start(cluster, Via::Server, BULK_THRESHOLD_BYTES, "sweep").await?;
    let warmup = Plan {
        duration: options.warmup / 2,
        min_bodies: 1,
    };
    let measure = Plan {
        duration: options.measure / 3,
        min_bodies: SWEEP_MIN_BODIES,
    };
    let mut points = Vec::with_capacity(sizes.len());
    for &body in sizes {
        let mut rates = [f64::NAN; 2];
        if body as u64 > BULK_MAX_MESSAGE_BYTES {
            eprintln!("clustercomm sweep: {body} B is over the {BULK_MAX_MESSAGE_BYTES} B limit");
        } else {
            let payload = Bytes::from(vec![0xB5; body]);
            let window = sweep_in_flight(body);
            for (rate, pair) in rates.iter_mut().zip([&lazy, &server]) {
                let budget = options.warmup + options.measure + 2 * WAIT_TIMEOUT;
                let outcome = tokio::time::timeout(
                    budget,
                    pair.transfer(&payload, window, &warmup, &measure),
                )
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("took longer than {budget:?}")));
                match outcome {
                    Ok(transfer) => *rate = transfer.mb_per_second(),
                    Err(e) => eprintln!(
                        "clustercomm sweep: {body} B {} failed: {e:#}",
                        pair.via.describe()
                    ),
                }
            }
        }
        points.push(SweepPoint {
            body,
            lazy_mb_s: rates[0],
            server_mb_s: rates[1],
        });
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(body: usize, lazy_mb_s: f64, server_mb_s: f64) -> SweepPoint {
        SweepPoint {
            body,
            lazy_mb_s,
            server_mb_s,
        }
    }

    #[test]
    fn threshold_is_the_crossover() {
        // Server ahead up to 16 KiB, lazy from 64 KiB on.
        let points = [
            point(1 << 10, 10.0, 20.0),
            point(4 << 10, 40.0, 60.0),
            point(16 << 10, 100.0, 100.0),
            point(64 << 10, 300.0, 200.0),
            point(1 << 20, 900.0, 400.0),
        ];
        assert_eq!(recommend_threshold(&points), Some(16 << 10));
        // Order does not matter.
        let mut reversed = points;
        reversed.reverse();
        assert_eq!(recommend_threshold(&reversed), Some(16 << 10));
        // An early lazy win followed by a server win: the later crossover.
        let noisy = [
            point(1 << 10, 30.0, 20.0),
            point(4 << 10, 40.0, 60.0),
            point(16 << 10, 200.0, 100.0),
        ];
        assert_eq!(recommend_threshold(&noisy), Some(4 << 10));
        // A failed point is ignored.
        let failed = [
            point(1 << 10, 10.0, 20.0),
            point(4 << 10, f64::NAN, 60.0),
            point(16 << 10, 200.0, 100.0),
        ];
        assert_eq!(recommend_threshold(&failed), Some(1 << 10));
    }

    #[test]
    fn no_crossover_no_threshold() {
        assert_eq!(recommend_threshold(&[]), None);
        let lazy_always = [point(1 << 10, 30.0, 20.0), point(4 << 10, 90.0, 60.0)];
        assert_eq!(recommend_threshold(&lazy_always), None);
        let server_at_the_end = [point(1 << 10, 30.0, 20.0), point(4 << 10, 50.0, 60.0)];
        assert_eq!(recommend_threshold(&server_at_the_end), None);
    }

    #[test]
    fn sweep_window() {
        assert_eq!(sweep_in_flight(1 << 10), SWEEP_MAX_IN_FLIGHT);
        assert_eq!(sweep_in_flight(1 << 20), 8);
        assert_eq!(sweep_in_flight(16 << 20), BULK_IN_FLIGHT);
        assert_eq!(sweep_in_flight(0), SWEEP_MAX_IN_FLIGHT);
    }

    /// Runs a few cases for real, against the server binary if it was
    /// built (`cargo build --release -p clustercomm-benches --bins`):
    /// `cargo test --release -p clustercomm-benches --lib ours -- --ignored
    /// --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a benchmark: slow, and meaningful only in release builds"]
    async fn cases_run_for_real() {
        let options = Options::from_args(["--quick"]);
        println!("server binary: {:?}", server_binary());
        let cases = [
            Case::Notify { body: 128 },
            Case::SendPipelined {
                body: 128,
                outstanding: 256,
                peer: crate::suite::SendPeer::Publish,
            },
            Case::FanOutAll {
                receivers: 8,
                body: 128,
            },
            Case::FanOutGroup {
                receivers: 8,
                body: 128,
            },
            Case::AnyOf {
                members: 4,
                body: 128,
            },
            Case::RequestLatency { body: 128 },
            Case::RequestRate {
                body: 128,
                outstanding: 32,
            },
            Case::Session { body: 128 },
            Case::Bulk {
                body: 1 << 20,
                path: BulkPath::Lazy,
            },
            Case::Bulk {
                body: 16 << 20,
                path: BulkPath::Server,
            },
            Case::NotifyTls { body: 128 },
            Case::LazyTls { body: 1 << 20 },
        ];
        let tls = TlsCluster::generate(&TLS_NODES).expect("a TLS cluster");
        let mut failed = Vec::new();
        for case in cases {
            let started = Instant::now();
            let binary =
                server_binary().expect("cargo build --release -p clustercomm-benches --bins");
            let (outcome, peak) = run(case, &options, &binary, Some(&tls))
                .await
                .expect("a message server");
            println!(
                "clustercomm {case}: {outcome} {} (server VmHWM {}; {:.1} s)",
                case.unit(),
                peak.map_or("unknown".to_owned(), |k| format!("{} MiB", k / 1024)),
                started.elapsed().as_secs_f64()
            );
            if outcome.outcome.value().is_none_or(|v| v <= 0.0) {
                failed.push(format!("{case}: {outcome}"));
            }
        }
        let started = Instant::now();
        let binary = server_binary().expect("the server binary");
        let points = sweep(&[1 << 10, 64 << 10, 1 << 20], &options, &binary)
            .await
            .expect("sweep");
        for p in &points {
            println!(
                "sweep {} B: lazy {:.1} MB/s, server {:.1} MB/s",
                p.body, p.lazy_mb_s, p.server_mb_s
            );
        }
        println!(
            "sweep took {:.1} s; recommended threshold {:?}",
            started.elapsed().as_secs_f64(),
            recommend_threshold(&points)
        );
        assert!(failed.is_empty(), "{failed:#?}");
        assert!(points
            .iter()
            .all(|p| p.lazy_mb_s > 0.0 && p.server_mb_s > 0.0));
    }
}
