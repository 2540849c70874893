//! Point-to-point throughput: node `bench-a` to node `bench-b` through an
//! in-process message server, against raw-TCP peers measured in the same
//! run on the same two-worker runtime.
//!
//! `cargo bench -p clustercomm-benches --bench p2p [-- --quick]`

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clustercomm_benches::options::WAIT_TIMEOUT;
use clustercomm_benches::report::per_second;
use clustercomm_benches::{raw_tcp, wait_until, Counter, Options, Table};
use message_server::{MessageServer, ServerHandle};
use node_runtime::{Node, Target};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Runtime worker threads: the machines this runs on have two cores.
const WORKERS: usize = 2;
/// Body size of every case.
const BODY_LEN: usize = 128;
/// Acknowledged sends kept outstanding in the pipelined case: this many
/// tasks, each looping `send().await`.
const IN_FLIGHT: usize = 256;
/// Notifies issued between two looks at the clock.
const NOTIFIES_PER_CLOCK_CHECK: u64 = 16;
/// The service `bench-b` offers.
const SERVICE: &str = "bench";
const SENDER: &str = "bench-a";
const RECEIVER: &str = "bench-b";

fn main() -> anyhow::Result<()> {
    let options = Options::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .context("building the runtime")?;
    // Run everything on the workers, not on this thread, so the benchmark
    // has exactly `WORKERS` threads like the peers it is compared with.
    let result = runtime.block_on(async move { tokio::spawn(run(options)).await });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result.context("benchmark task panicked")?
}

async fn run(options: Options) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "# p2p throughput, {BODY_LEN} B bodies{}",
        if options.quick { " (--quick)" } else { "" }
    );
    println!(
        "nproc {cores}, tokio multi-thread runtime with {WORKERS} workers; \
         warm-up {:?}, measured {:?} per case",
        options.warmup, options.measure
    );
    println!();

    let body = Bytes::from(vec![0x5A; BODY_LEN]);
    let cluster = Cluster::start().await?;
    let mut table = Table::new();

    let case = format!("notify {BODY_LEN} B");
    if options.selects(&case) {
        let ours = report(
            "clustercomm notify",
            notify_case(&cluster, &options, &body).await,
        );
        let raw = report("raw TCP sink", raw_tcp::sink(&options, BODY_LEN).await);
        table.push(case, ours, raw);
    }

    let case = format!("send {BODY_LEN} B, pipelined ({IN_FLIGHT} in flight)");
    if options.selects(&case) {
        let ours = report(
            "clustercomm send",
            send_case(&cluster, &options, &body).await,
        );
        let raw = report(
            "raw TCP pipelined ack",
            raw_tcp::pipelined_ack(&options, BODY_LEN, IN_FLIGHT).await,
        );
        table.push(case, ours, raw);
    }

    let counters = cluster.server.counters();
    let received = cluster.received.get();
    cluster.stop().await;

    println!();
    print!("{table}");
    println!();
    println!(
        "message server: {} messages in, {} deliveries out, {} route failures \
         ({} overloaded); {} received by {RECEIVER}",
        counters.messages,
        counters.deliveries,
        counters.route_failures,
        counters.overloaded,
        received
    );
    println!(
        "raw TCP: one loopback connection, 4-byte length prefix, BufWriter batching; \
         the ack variant keeps {IN_FLIGHT} frames unacknowledged."
    );
    println!("clustercomm crosses two hops (node -> message server -> node), raw TCP one.");
    println!("Numbers are from one run on a shared machine: compare ratios, not absolutes.");
    ensure!(
        table
            .rows()
            .iter()
            .all(|r| r.ours.is_some() && r.raw.is_some()),
        "some cases failed (see above)"
    );
    Ok(())
}

/// Prints a case's outcome as it finishes and keeps its rate.
fn report(case: &str, outcome: anyhow::Result<f64>) -> Option<f64> {
    match outcome {
        Ok(rate) => {
            println!("{case}: {} msgs/s", rate.round());
            Some(rate)
        }
        Err(e) => {
            eprintln!("{case} failed: {e:#}");
            None
        }
    }
}

/// A message server and two nodes; `bench-b` drains its `bench` inbox into
/// a counter.
struct Cluster {
    server: ServerHandle,
    server_task: JoinHandle<Result<(), message_server::ServerError>>,
    a: Node,
    b: Node,
    received: Counter,
    drain: JoinHandle<()>,
}

impl Cluster {
    async fn start() -> anyhow::Result<Cluster> {
        let mut config = cluster_config::Config::default();
        config.message_server.listen = "127.0.0.1:0".parse()?;
        let server = MessageServer::bind(config)
            .await
            .context("binding the message server")?;
        let addr = server.local_addr();
        let handle = server.handle();
        let server_task = tokio::spawn(server.run(std::future::pending()));

        let start = |id: &'static str| async move {
            tokio::time::timeout(WAIT_TIMEOUT, Node::builder(id).message_server(addr).start())
                .await
                .with_context(|| format!("starting {id} timed out"))?
                .with_context(|| format!("starting {id}"))
        };
        let a = start(SENDER).await?;
        let b = start(RECEIVER).await?;
        let mut inbox = tokio::time::timeout(WAIT_TIMEOUT, b.subscribe(SERVICE))
            .await
            .context("subscribing timed out")?
            .context("subscribing")?;
        let received = Counter::new();
        let counter = received.clone();
        let drain = tokio::spawn(async move {
            while let Some(message) = inbox.recv().await {
                drop(message);
                counter.add(1);
            }
        });
        Ok(Cluster {
            server: handle,
            server_task,
            a,
            b,
            received,
            drain,
        })
    }

    async fn stop(self) {
        // Each shutdown waits at most the node's own grace period.
        self.a.shutdown().await;
        self.b.shutdown().await;
        self.drain.abort();
        self.server_task.abort();
    }
}

fn target() -> Target {
    Target::Node(RECEIVER.into())
}

/// What one notify phase did.
#[derive(Debug, Clone, Copy)]
struct NotifyPhase {
    /// Notifies that returned `Ok`.
    sent: u64,
    /// Of those, received by `bench-b`.
    received: u64,
    /// Of those, dropped by the message server (its route failures).
    dropped: u64,
    /// From the first notify until every one was received or dropped.
    elapsed: Duration,
    /// How long the sender took to hand them all over.
    sending: Duration,
}

/// One sender task notifying in a loop: messages per second received by
/// `bench-b`, from the first notify until every notify was either counted
/// by `bench-b` or counted as dropped by the message server. Notify has no
/// flow control, so drops are printed rather than treated as a failure.
async fn notify_case(cluster: &Cluster, options: &Options, body: &Bytes) -> anyhow::Result<f64> {
    notify_phase(cluster, body, options.warmup)
        .await
        .context("warm-up")?;
    let phase = notify_phase(cluster, body, options.measure).await?;
    println!(
        "clustercomm notify: {} sent ({} msgs/s offered), {} received, {} dropped by the \
         message server ({:.1}%)",
        phase.sent,
        per_second(phase.sent, phase.sending).round(),
        phase.received,
        phase.dropped,
        100.0 * phase.dropped as f64 / phase.sent.max(1) as f64,
    );
    Ok(per_second(phase.received, phase.elapsed))
}

async fn notify_phase(
    cluster: &Cluster,
    body: &Bytes,
    duration: Duration,
) -> anyhow::Result<NotifyPhase> {
    let received = || cluster.received.get();
    let dropped = || cluster.server.counters().route_failures;
    let (received_base, dropped_base) = (received(), dropped());
    let start = Instant::now();
    let sent = notify_for(&cluster.a, body, duration).await?;
    let sending = start.elapsed();
    let settled = || received() - received_base + dropped() - dropped_base >= sent;
    let Some(done) = wait_until(WAIT_TIMEOUT, settled).await else {
        bail!(
            "of {sent} notifies, {} received and {} dropped within {WAIT_TIMEOUT:?}",
            received() - received_base,
            dropped() - dropped_base
        );
    };
    Ok(NotifyPhase {
        sent,
        received: received() - received_base,
        dropped: dropped() - dropped_base,
        elapsed: done - start,
        sending,
    })
}

async fn notify_for(node: &Node, body: &Bytes, duration: Duration) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        for _ in 0..NOTIFIES_PER_CLOCK_CHECK {
            node.notify(target(), SERVICE, body.clone())
                .await
                .context("notify")?;
            sent += 1;
        }
    }
    Ok(sent)
}

/// [`IN_FLIGHT`] tasks each looping an acknowledged send: successful
/// reports per second, from the start until the last outstanding send
/// resolved.
async fn send_case(cluster: &Cluster, options: &Options, body: &Bytes) -> anyhow::Result<f64> {
    send_for(&cluster.a, body, options.warmup)
        .await
        .context("warm-up")?;
    let start = Instant::now();
    let ok = send_for(&cluster.a, body, options.measure).await?;
    Ok(per_second(ok, start.elapsed()))
}

/// Runs the senders for `duration` and returns the number of `Ok` reports.
///
/// # Errors
///
/// If any send failed, or the senders did not finish in time.
async fn send_for(node: &Node, body: &Bytes, duration: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + duration;
    let mut senders = JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let node = node.clone();
        let body = body.clone();
        senders.spawn(async move {
            let mut ok = 0u64;
            while Instant::now() < deadline {
                node.send(target(), SERVICE, body.clone()).await?;
                ok += 1;
            }
            Ok::<u64, node_runtime::SendError>(ok)
        });
    }
    let joined = tokio::time::timeout(duration + WAIT_TIMEOUT, async {
        let mut ok = 0u64;
        while let Some(joined) = senders.join_next().await {
            ok += joined.context("sender task panicked")?.context("send")?;
        }
        anyhow::Ok(ok)
    })
    .await;
    match joined {
        Ok(ok) => ok,
        Err(_) => {
            senders.abort_all();
            bail!("senders still running {WAIT_TIMEOUT:?} after the deadline")
        }
    }
}
