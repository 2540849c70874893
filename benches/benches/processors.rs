//! Processors: messages handled per second by a service served with 4
//! processors against the same service with 1, on a handler that spends
//! 20 µs of CPU per message, three senders keeping 256 acknowledged sends
//! each in flight, through an in-process message server. The two
//! configurations take turns, round by round; the table gives each one's
//! median and range and the ratio of the medians.
//!
//! `cargo bench -p clustercomm-benches --bench processors [-- --quick]`
//!
//! Per-sender order holds, so three senders keep at most three processors
//! busy; on a two-core machine the runtime's two workers bound the gain
//! further (the handler's work is CPU).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use message_server::MessageServer;
use node_runtime::{Config, Message, Node, NodeId, ServeOptions, Target};
use tokio::sync::Notify;

/// Runtime worker threads: the machines this runs on have two cores.
const WORKERS: usize = 2;
/// CPU time the handler spends on each message.
const WORK: Duration = Duration::from_micros(20);
/// Senders, each with this many acknowledged sends in flight.
const SENDERS: usize = 3;
const IN_FLIGHT: usize = 256;
/// Processor counts compared.
const CONFIGS: [usize; 2] = [1, 4];

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .context("building the runtime")?;
    let result = runtime.block_on(async move { tokio::spawn(run(quick)).await });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result.context("benchmark task panicked")?
}

async fn run(quick: bool) -> anyhow::Result<()> {
    let (rounds, per_sender) = if quick { (3, 4_000) } else { (5, 10_000) };
    println!(
        "# processors: {SENDERS} senders x {per_sender} messages, handler {} µs of CPU each, \
         {WORKERS} runtime workers, {rounds} interleaved rounds",
        WORK.as_micros()
    );
    let mut config = Config::default();
    config.message_server.listen = "127.0.0.1:0".parse()?;
    let server = MessageServer::bind(config.clone()).await?;
    let addr = server.local_addr();
    tokio::spawn(async move {
        let _ = server.run(std::future::pending()).await;
    });
    let start = |id: String| {
        Node::builder(id.as_str())
            .config(config.clone())
            .message_server(addr)
            .ignore_environment()
            .start()
    };
    let worker = start("worker".into()).await?;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(start(format!("sender-{i}")).await?);
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    for round in 0..rounds {
        for (c, &processors) in CONFIGS.iter().enumerate() {
            let service = format!("jobs-{processors}-{round}");
            let rate = once(&worker, &senders, &service, processors, per_sender).await?;
            rates[c].push(rate);
        }
    }
    println!();
    println!("| processors | handled/s, median (min–max) |");
    println!("| ---: | ---: |");
    let mut medians = Vec::new();
    for (c, &processors) in CONFIGS.iter().enumerate() {
        let mut r = rates[c].clone();
        r.sort_by(f64::total_cmp);
        let median = r[r.len() / 2];
        medians.push(median);
        println!(
            "| {processors} | {:.0} ({:.0}–{:.0}) |",
            median,
            r[0],
            r[r.len() - 1]
        );
    }
    println!();
    println!(
        "4 processors against 1: {:.2}x (ratio of the medians)",
        medians[1] / medians[0]
    );
    Ok(())
}

/// One round: `service` served with `processors`, every sender sending
/// `per_sender` messages; handled messages per second.
async fn once(
    worker: &Node,
    senders: &[Node],
    service: &str,
    processors: usize,
    per_sender: u64,
) -> anyhow::Result<f64> {
    let total = per_sender * senders.len() as u64;
    let handled = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let serving = {
        let (handled, done) = (handled.clone(), done.clone());
        worker
            .serve_with(
                service,
                &ServeOptions::new().processors(processors),
                move |m: Message| {
                    let (handled, done) = (handled.clone(), done.clone());
                    async move {
                        let until = Instant::now() + WORK;
                        while Instant::now() < until {
                            std::hint::spin_loop();
                        }
                        drop(m);
                        if handled.fetch_add(1, Ordering::Relaxed) + 1 == total {
                            done.notify_one();
                        }
                        Ok(())
                    }
                },
            )
            .await?
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in senders {
        let s = s.clone();
        let service = service.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut in_flight: VecDeque<node_runtime::Pending> = VecDeque::new();
            for n in 0..per_sender {
                if in_flight.len() >= IN_FLIGHT {
                    if let Some(p) = in_flight.pop_front() {
                        p.outcome().await?;
                    }
                }
                in_flight.push_back(
                    s.submit(
                        Target::Node(NodeId::new("worker")),
                        &service,
                        n.to_le_bytes().to_vec(),
                    )
                    .await?,
                );
            }
            for p in in_flight {
                p.outcome().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    tokio::time::timeout(Duration::from_secs(120), async {
        while handled.load(Ordering::Relaxed) < total {
            done.notified().await;
        }
    })
    .await
    .context("the handler did not finish in 2 minutes")?;
    let elapsed = started.elapsed();
    let stats = serving.stats();
    ensure!(stats.handled == total, "{stats:?}");
    drop(serving);
    Ok(total as f64 / elapsed.as_secs_f64())
}
