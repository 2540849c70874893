//! Bulk throughput: 1, 16 and 64 MiB bodies from one node to another as
//! acknowledged sends, over a lazy channel and forced through the message
//! server, against a raw-TCP bulk copy measured in the same run on the same
//! two-worker runtime.
//!
//! `cargo bench -p clustercomm-benches --bench bulk [-- --quick] [filter]`
//!
//! Two node pairs share one in-process message server:
//!
//! - `bulk-lazy-a` -> `bulk-lazy-b` with the default allow-list (`"*"`) and
//!   a 64 KiB threshold: every body here goes over a lazy channel.
//! - `bulk-server-a` -> `bulk-server-b` with an empty allow-list: every body
//!   goes through the message server.
//!
//! Both have auto-activation off and a 128 MiB message limit, as has the
//! server. Each case checks the nodes' path counters, so a body that took
//! the other path fails the case instead of skewing its rate. Case names
//! (for filters) are `lazy 16 MiB`, `server 16 MiB`, `raw 16 MiB`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use bytes::Bytes;
use clustercomm_benches::bulk_report::{BulkRow, BulkTable};
use clustercomm_benches::memory;
use clustercomm_benches::options::WAIT_TIMEOUT;
use clustercomm_benches::transfer::{size_label, Plan, Transfer, MIB};
use clustercomm_benches::wait::delivered_once;
use clustercomm_benches::{bulk_tcp, wait_for_count, wait_until, Counter, Options};
use message_server::{MessageServer, ServerHandle};
use node_runtime::{Node, PathCounters, Pending, Target};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Runtime worker threads: the machines this runs on have two cores.
const WORKERS: usize = 2;
/// Body sizes, one table row each.
const SIZES: [usize; 3] = [MIB, 16 * MIB, 64 * MIB];
/// `limits.max_message_bytes` of the server and every node.
const MAX_MESSAGE_BYTES: u64 = 128 * MIB as u64;
/// `lazy.threshold_bytes` of the lazy pair (the default).
const LAZY_THRESHOLD_BYTES: u64 = 64 * 1024;
/// Acknowledged bodies kept outstanding, on every path.
const IN_FLIGHT: usize = 2;
/// Least number of measured bodies per case with `--quick`...
const QUICK_MIN_BODIES: u64 = 3;
/// ...and in a full run.
const FULL_MIN_BODIES: u64 = 8;
/// The body size whose cases get memory readings.
const MEMORY_WATCH: usize = 64 * MIB;
/// The service the receivers offer.
const SERVICE: &str = "bulk";

fn main() -> anyhow::Result<()> {
    let options = Options::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .context("building the runtime")?;
    // Run everything on the workers, not on this thread, so the benchmark
    // has exactly `WORKERS` threads like the peer it is compared with.
    let result = runtime.block_on(async move { tokio::spawn(run(options)).await });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result.context("benchmark task panicked")?
}

/// The path a pair of nodes is configured to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Lazy channels allowed for every service.
    Lazy,
    /// No service allowed on lazy channels.
    Server,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Lazy => "lazy",
            Via::Server => "server",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Via::Lazy => "over a lazy channel",
            Via::Server => "through the message server",
        }
    }

    fn config(self) -> node_runtime::Config {
        let mut config = node_runtime::Config::default();
        config.limits.max_message_bytes = MAX_MESSAGE_BYTES;
        config.lazy.auto_activate_messages = 0;
        config.node.direct_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        match self {
            Via::Lazy => {
                config.lazy.threshold_bytes = LAZY_THRESHOLD_BYTES;
                config.lazy.services = vec!["*".to_owned()];
            }
            Via::Server => config.lazy.services = vec![],
        }
        config
    }
}

async fn run(options: Options) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let min_bodies = if options.quick {
        QUICK_MIN_BODIES
    } else {
        FULL_MIN_BODIES
    };
    let warmup = Plan {
        duration: options.warmup,
        min_bodies: 1,
    };
    let measure = Plan {
        duration: options.measure,
        min_bodies,
    };
    println!(
        "# bulk throughput, acknowledged sends, {IN_FLIGHT} in flight{}",
        if options.quick { " (--quick)" } else { "" }
    );
    println!(
        "nproc {cores}, tokio multi-thread runtime with {WORKERS} workers; per case warm-up \
         {:?} (at least 1 body), measured {:?} (at least {min_bodies} bodies)",
        options.warmup, options.measure
    );
    println!();

    let cluster = Cluster::start().await?;
    let server_before = cluster.server.counters();
    let mut table = BulkTable::new();
    let mut failures = Vec::new();
    let mut memory_log = Vec::new();

    for size in SIZES {
        let label = size_label(size);
        let cases: Vec<_> = ["lazy", "server", "raw"]
            .into_iter()
            .map(|via| format!("{via} {label}"))
            .collect();
        if !cases.iter().any(|c| options.selects(c)) {
            continue;
        }
        let body = Bytes::from(vec![0xB5; size]);
        let watch = size == MEMORY_WATCH;
        if watch {
            memory_log.push(format!(
                "before the {label} cases, the {label} body allocated: {}",
                reading(|m| format!(
                    "VmHWM {} MiB (peak since the process started), VmRSS {} MiB",
                    m.hwm_kib / 1024,
                    m.rss_kib / 1024
                ))
            ));
        }
        let mut rates = [None; 3];
        for (i, case) in cases.iter().enumerate() {
            if !options.selects(case) {
                continue;
            }
            let reset = watch && memory::reset_peak();
            let start = memory::current();
            let outcome = match i {
                0 => node_case(&cluster.lazy, &body, &warmup, &measure).await,
                1 => node_case(&cluster.server_path, &body, &warmup, &measure).await,
                _ => bulk_tcp::bulk_ack(&body, IN_FLIGHT, &warmup, &measure)
                    .await
                    .map(|t| (t, "one loopback connection".to_owned())),
            };
            if watch {
                let end = memory::current();
                memory_log.push(format!(
                    "{case}: {}",
                    memory::describe_case(start, end, reset)
                ));
            }
            rates[i] = report(case, outcome, &mut failures);
        }
        drop(body);
        if watch {
            memory_log.push(format!(
                "after the {label} cases, body dropped: {}",
                reading(|m| format!("VmRSS {} MiB", m.rss_kib / 1024))
            ));
        }
        let [lazy, server, raw] = rates;
        table.push(BulkRow {
            size: label,
            lazy,
            server,
            raw,
        });
    }

    let server_after = cluster.server.counters();
    let lazy_counters = cluster.lazy.sender.counters();
    let server_path_counters = cluster.server_path.sender.counters();
    cluster.stop().await;

    println!();
    print!("{table}");
    println!();
    println!(
        "MB/s = 10^6 body bytes acknowledged per second, from the first body of the measured \
         phase to the last ack; {IN_FLIGHT} bodies in flight on every path."
    );
    println!(
        "lazy: bulk-lazy-a -> bulk-lazy-b, threshold {} KiB, allow-list [\"*\"]; via server: \
         bulk-server-a -> bulk-server-b, allow-list [] (two hops: node -> message server -> \
         node); auto-activation off, limits.max_message_bytes {} MiB everywhere.",
        LAZY_THRESHOLD_BYTES / 1024,
        MAX_MESSAGE_BYTES / MIB as u64
    );
    println!(
        "raw TCP: one tokio loopback connection, 4-byte length prefix, body written from one \
         buffer, one fresh buffer per body on the reader, 1-byte ack per body."
    );
    print_path_counters("bulk-lazy-a", &lazy_counters);
    print_path_counters("bulk-server-a", &server_path_counters);
    println!(
        "message server: {} messages in ({} MiB of bodies), {} deliveries out, {} route \
         failures, {} slow consumers",
        server_after.messages - server_before.messages,
        (server_after.message_bytes - server_before.message_bytes) / MIB as u64,
        server_after.deliveries - server_before.deliveries,
        server_after.route_failures - server_before.route_failures,
        server_after.slow_consumers - server_before.slow_consumers,
    );
    if !memory_log.is_empty() {
        println!();
        println!("memory (one process: sender, message server, receiver and raw peer):");
        for reading in &memory_log {
            println!("- {reading}");
        }
    }
    println!();
    println!(
        "nproc {cores}. Numbers are from one run on a shared machine: compare ratios, not \
         absolutes."
    );

    if lazy_counters.lazy_failed > 0 {
        failures.push(format!(
            "bulk-lazy-a failed to open {} lazy channels",
            lazy_counters.lazy_failed
        ));
    }
    if server_path_counters.lazy_opened > 0 || server_path_counters.lazy_messages > 0 {
        failures.push("bulk-server-a opened a lazy channel".to_owned());
    }
    ensure!(
        failures.is_empty(),
        "{} case(s) failed: {}",
        failures.len(),
        failures.join("; ")
    );
    Ok(())
}

/// Prints a case's outcome as it finishes and keeps its rate.
fn report(
    case: &str,
    outcome: anyhow::Result<(Transfer, String)>,
    failures: &mut Vec<String>,
) -> Option<f64> {
    match outcome {
        Ok((t, path)) => {
            let rate = t.mb_per_second();
            println!(
                "{case}: {rate:.0} MB/s ({} bodies, {} MiB in {:.3} s, {:.1} ms per body; {path})",
                t.bodies,
                t.bytes / MIB as u64,
                t.elapsed.as_secs_f64(),
                t.per_body().as_secs_f64() * 1e3,
            );
            Some(rate)
        }
        Err(e) => {
            eprintln!("{case} failed: {e:#}");
            failures.push(case.to_owned());
            None
        }
    }
}

fn print_path_counters(node: &str, c: &PathCounters) {
    println!(
        "{node}: {} lazy messages ({} MiB), {} via the message server ({} MiB); lazy channels \
         {} opened, {} failed, {} closed",
        c.lazy_messages,
        c.lazy_bytes / MIB as u64,
        c.server_messages,
        c.server_bytes / MIB as u64,
        c.lazy_opened,
        c.lazy_failed,
        c.lazy_closed,
    );
}

/// The memory use now, in words.
fn reading(describe: impl FnOnce(memory::Memory) -> String) -> String {
    memory::current().map_or_else(|| "/proc/self/status unavailable".to_owned(), describe)
}

/// A message server and the two node pairs.
struct Cluster {
    server: ServerHandle,
    server_task: JoinHandle<Result<(), message_server::ServerError>>,
    lazy: Pair,
    server_path: Pair,
}

impl Cluster {
    async fn start() -> anyhow::Result<Cluster> {
        let mut config = cluster_config::Config::default();
        config.message_server.listen = "127.0.0.1:0".parse()?;
        config.limits.max_message_bytes = MAX_MESSAGE_BYTES;
        let server = MessageServer::bind(config)
            .await
            .context("binding the message server")?;
        let addr = server.local_addr();
        let handle = server.handle();
        let server_task = tokio::spawn(server.run(std::future::pending()));
        let lazy = Pair::start(Via::Lazy, addr).await?;
        let server_path = Pair::start(Via::Server, addr).await?;
        Ok(Cluster {
            server: handle,
            server_task,
            lazy,
            server_path,
        })
    }

    async fn stop(self) {
        // Each shutdown waits at most the node's own grace period.
        self.lazy.stop().await;
        self.server_path.stop().await;
        self.server_task.abort();
    }
}

/// A sender and a receiver that drains its `bulk` inbox into counters.
struct Pair {
    via: Via,
    sender: Node,
    receiver: Node,
    received: Counter,
    drain: JoinHandle<()>,
}

impl Pair {
    async fn start(via: Via, server: SocketAddr) -> anyhow::Result<Pair> {
        let config = via.config();
        let start = |id: String| {
            let config = config.clone();
            async move {
                let builder = Node::builder(id.as_str())
                    .config(config)
                    .message_server(server);
                tokio::time::timeout(WAIT_TIMEOUT, builder.start())
                    .await
                    .with_context(|| format!("starting {id} timed out"))?
                    .with_context(|| format!("starting {id}"))
            }
        };
        let receiver = start(format!("bulk-{}-b", via.name())).await?;
        let mut inbox = tokio::time::timeout(WAIT_TIMEOUT, receiver.subscribe(SERVICE))
            .await
            .context("subscribing timed out")?
            .context("subscribing")?;
        let sender = start(format!("bulk-{}-a", via.name())).await?;
        let received = Counter::new();
        let counter = received.clone();
        let drain = tokio::spawn(async move {
            while let Some(message) = inbox.recv().await {
                drop(message);
                counter.add(1);
            }
        });
        // A lazy send needs the receiver's direct-channel address in the
        // sender's view of the members; without it the send would fall
        // back to the message server.
        let id = receiver.id().clone();
        let known = || {
            sender.members().iter().any(|m| {
                m.id == id && m.direct_addr.is_some() && m.services.iter().any(|s| s == SERVICE)
            })
        };
        if wait_until(WAIT_TIMEOUT, known).await.is_none() {
            anyhow::bail!(
                "{} did not learn of {id} and its {SERVICE} service",
                sender.id()
            );
        }
        Ok(Pair {
            via,
            sender,
            receiver,
            received,
            drain,
        })
    }

    async fn stop(self) {
        self.sender.shutdown().await;
        self.receiver.shutdown().await;
        self.drain.abort();
    }

    /// Checks that the `bodies` sent since `before` (the sender's counters)
    /// and `received_before` (the receiver's) all took this pair's path;
    /// describes the counts.
    fn check_path(
        &self,
        before: &PathCounters,
        received_before: &PathCounters,
        bodies: u64,
    ) -> anyhow::Result<String> {
        let after = self.sender.counters();
        let received_after = self.receiver.counters();
        let lazy = after.lazy_messages - before.lazy_messages;
        let server = after.server_messages - before.server_messages;
        let direct_in = received_after.received_direct - received_before.received_direct;
        let server_in = received_after.received_server - received_before.received_server;
        let counts = format!(
            "sender counted {lazy} lazy + {server} via server, receiver {direct_in} direct + \
             {server_in} via server"
        );
        let (on_path, off_path, arrived) = match self.via {
            Via::Lazy => (lazy, server, direct_in),
            Via::Server => (server, lazy, server_in),
        };
        ensure!(
            on_path == bodies && off_path == 0 && arrived == bodies,
            "expected all {bodies} bodies {}: {counts}",
            self.via.describe()
        );
        Ok(format!("all {bodies} {}: {counts}", self.via.describe()))
    }
}

/// Warm-up and measured phase of acknowledged sends from `pair.sender` to
/// `pair.receiver`: what the measured phase moved, and the path check.
async fn node_case(
    pair: &Pair,
    body: &Bytes,
    warmup: &Plan,
    measure: &Plan,
) -> anyhow::Result<(Transfer, String)> {
    let before = pair.sender.counters();
    let received_before = pair.receiver.counters();
    let base = pair.received.get();
    let (warm, _) = send_bodies(pair, body, warmup).await.context("warm-up")?;
    let start = Instant::now();
    let (sent, done) = send_bodies(pair, body, measure).await?;
    let transfer = Transfer::new(sent, body.len(), done - start);
    // Every body was accepted into the inbox; let the drain drop them all
    // before the next case so they do not count against its memory.
    wait_for_count(&pair.received, base + warm + sent, WAIT_TIMEOUT)
        .await
        .context("draining the receiver's inbox")?;
    let path = pair.check_path(&before, &received_before, warm + sent)?;
    Ok((transfer, path))
}

/// Sends bodies for `plan`, at most [`IN_FLIGHT`] unacknowledged; returns
/// how many, and when the last outcome arrived.
///
/// # Errors
///
/// If any send failed, or a submit or an outcome took longer than
/// [`WAIT_TIMEOUT`].
async fn send_bodies(pair: &Pair, body: &Bytes, plan: &Plan) -> anyhow::Result<(u64, Instant)> {
    let target = Target::Node(pair.receiver.id().clone());
    let start = Instant::now();
    let mut window: VecDeque<Pending> = VecDeque::with_capacity(IN_FLIGHT);
    let mut sent = 0u64;
    while plan.more(sent, start.elapsed()) {
        if window.len() == IN_FLIGHT {
            if let Some(oldest) = window.pop_front() {
                delivered_once(oldest).await?;
            }
        }
        let pending = tokio::time::timeout(
            WAIT_TIMEOUT,
            pair.sender.submit(target.clone(), SERVICE, body.clone()),
        )
        .await
        .context("submit timed out")?
        .context("submit")?;
        window.push_back(pending);
        sent += 1;
    }
    while let Some(oldest) = window.pop_front() {
        delivered_once(oldest).await?;
    }
    Ok((sent, Instant::now()))
}
