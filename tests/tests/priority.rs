//! Priorities (issue 18): a message keeps the priority it was sent with
//! (`SendOptions::priority`, or its service's `[services.<name>]` default)
//! on every path, and its receiver sees it.

use anyhow::{ensure, Context};
use clustercomm_tests::{bounded, init_logging, next_message, test_config, TestServer};
use node_runtime::{Node, NodeId, Priority, SendOptions, ServiceConfig, Target};

/// The receiver.
const RECEIVER: &str = "receiver";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_keeps_its_priority_on_every_path() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let mut config = test_config();
        // Bodies above 1 KiB take a lazy channel.
        config.lazy.threshold_bytes = 1024;
        config.services.insert(
            "audit".into(),
            ServiceConfig {
                priority: Some(Priority::Low),
                ..ServiceConfig::default()
            },
        );
        let server = TestServer::start(config.clone()).await?;
        let sender = server.node("sender", &config).await?;
        let receiver = server.node(RECEIVER, &config).await?;
        let mut svc = receiver.subscribe("svc").await?;
        let mut audit = receiver.subscribe("audit").await?;
        let to = || Target::Node(NodeId::new(RECEIVER));
        let with = |p| SendOptions::new().priority(p);

        // Through the message server.
        sender.send(to(), "svc", "plain").await?;
        let m = next_message(&mut svc).await?;
        ensure!(
            m.priority() == Priority::Normal,
            "default: {:?}",
            m.priority()
        );
        for p in Priority::ALL {
            sender.send_with(to(), "svc", "given", &with(p)).await?;
            let m = next_message(&mut svc).await?;
            ensure!(m.priority() == p, "sent {p}, received {}", m.priority());
        }
        sender.notify(to(), "audit", "by config").await?;
        let m = next_message(&mut audit).await?;
        ensure!(
            m.priority() == Priority::Low,
            "the service's default: {}",
            m.priority()
        );
        sender
            .notify_with(to(), "audit", "overridden", &with(Priority::High))
            .await?;
        ensure!(next_message(&mut audit).await?.priority() == Priority::High);

        // A request, and its reply.
        let answering = {
            let sender = sender.clone();
            async move {
                sender
                    .request_with(to(), "svc", "question", &with(Priority::Express))
                    .await
            }
        };
        let (reply, asked) = tokio::join!(answering, async {
            let m = next_message(&mut svc).await?;
            let priority = m.priority();
            m.reply("answer").await?;
            anyhow::Ok(priority)
        });
        ensure!(reply?.body == "answer");
        ensure!(asked? == Priority::Express, "the request's priority");

        // Over a lazy channel.
        let lazy_before = sender.counters().lazy_messages;
        let large = vec![7u8; 4096];
        sender
            .send_with(to(), "svc", large.clone(), &with(Priority::High))
            .await?;
        let m = next_message(&mut svc).await?;
        ensure!(m.body().len() == large.len());
        ensure!(
            m.priority() == Priority::High,
            "over the lazy channel: {}",
            m.priority()
        );
        ensure!(
            sender.counters().lazy_messages > lazy_before,
            "the large body did not take the lazy channel"
        );
        Ok(())
    })
    .await
}

/// Low messages poured behind the measured ones.
const BACKLOG: usize = 100_000;
/// Their body: large enough that the sender pours them faster than the
/// message server passes them on, so that they queue (128 B ones pass as
/// fast as one task pours them).
const BACKLOG_BYTES: usize = 4096;
/// Express sends measured in each window.
const MEASURED: usize = 400;

/// One-at-a-time Express sends to the receiver, [`MEASURED`] of them or
/// until `done`: their latencies, sorted.
async fn express_latencies(
    sender: &Node,
    done: impl Fn() -> bool,
) -> anyhow::Result<Vec<std::time::Duration>> {
    let options = SendOptions::new().priority(Priority::Express);
    let mut latencies = Vec::with_capacity(MEASURED);
    while latencies.len() < MEASURED && !done() {
        let started = std::time::Instant::now();
        sender
            .send_with(
                Target::Node(NodeId::new(RECEIVER)),
                "svc",
                vec![1u8; 128],
                &options,
            )
            .await?;
        latencies.push(started.elapsed());
    }
    latencies.sort_unstable();
    Ok(latencies)
}

fn quantile(sorted: &[std::time::Duration], q: f64) -> std::time::Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// While the sender pours 100,000 Low messages of 4 KiB to the receiver,
/// faster than the message server passes them on, its Express messages
/// to the receiver overtake them in every queue. Their p50 and p99 are
/// printed against the idle ones, with how many Low messages waited; the
/// issue asks for a p99 within 2x, which is not met yet: between the
/// queues, the sockets' buffers hold megabytes of the backlog in order
/// (printed as `NOT MET`). Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn express_overtakes_a_low_backlog() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    init_logging();
    bounded(async {
        let mut config = test_config();
        // Everything through the message server: no lazy channel.
        config.lazy.auto_activate_messages = 0;
        config.node.send_timeout_ms = 60_000;
        let server = TestServer::start(config.clone()).await?;
        let sender = server.node("sender", &config).await?;
        let receiver = server.node(RECEIVER, &config).await?;
        let mut inbox = receiver.subscribe("svc").await?;
        let low_got = Arc::new(AtomicU64::new(0));
        let reading = {
            let low_got = low_got.clone();
            tokio::spawn(async move {
                while let Some(m) = inbox.recv().await {
                    if m.priority() == Priority::Low {
                        low_got.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let idle = express_latencies(&sender, || false).await?;
        // The backlog: one-way Low messages poured into the sender's queue
        // as fast as it takes them.
        let poured = Arc::new(AtomicU64::new(0));
        let pouring = std::time::Instant::now();
        let backlog = {
            let (sender, poured) = (sender.clone(), poured.clone());
            tokio::spawn(async move {
                let options = SendOptions::new().priority(Priority::Low);
                let body = bytes::Bytes::from(vec![0u8; BACKLOG_BYTES]);
                for _ in 0..BACKLOG {
                    let to = Target::Node(NodeId::new(RECEIVER));
                    sender.notify_with(to, "svc", body.clone(), &options).await?;
                    poured.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        };
        // Measured once a tenth of it is poured, while the rest waits.
        while poured.load(Ordering::Relaxed) < (BACKLOG / 10) as u64 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let before = low_got.load(Ordering::Relaxed);
        // Until the backlog is delivered: every one measured waited with it.
        let loaded = express_latencies(&sender, || {
            low_got.load(Ordering::Relaxed) >= BACKLOG as u64
        })
        .await?;
        let during = low_got.load(Ordering::Relaxed) - before;
        let poured_after = poured.load(Ordering::Relaxed);
        let behind = poured_after - low_got.load(Ordering::Relaxed);
        backlog.await??;
        // Every low message arrives, or its sender counts it failed.
        while low_got.load(Ordering::Relaxed) + sender.late_failures() < BACKLOG as u64 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let drained = pouring.elapsed();
        let failed = sender.late_failures();
        println!(
            "low messages: {} delivered, {failed} failed, in {:.0} ms ({:.0} MB/s, Express sends beside them)",
            low_got.load(Ordering::Relaxed),
            drained.as_secs_f64() * 1e3,
            (BACKLOG * BACKLOG_BYTES) as f64 / drained.as_secs_f64() / 1e6
        );
        ensure!(failed == 0, "{failed} low messages failed");
        reading.abort();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let (p50, p99) = (quantile(&idle, 0.5), quantile(&idle, 0.99));
        let (l50, l99) = (quantile(&loaded, 0.5), quantile(&loaded, 0.99));
        println!(
            "express 128 B, one at a time: idle p50 {:.2} ms p99 {:.2} ms; with a low backlog ({} sends) p50 {:.2} ms p99 {:.2} ms ({:.1}x); \
             {during} low messages delivered meanwhile, {poured_after} of {BACKLOG} poured and {behind} of them not yet delivered when it ended",
            ms(p50),
            ms(p99),
            loaded.len(),
            ms(l50),
            ms(l99),
            l99.as_secs_f64() / p99.as_secs_f64()
        );
        // How many fit while the backlog drains depends on the machine's
        // load (each waits 0.5-30 ms): a few are enough to show they got
        // through meanwhile; the ratio below says how fast.
        ensure!(
            loaded.len() >= 5,
            "only {} express messages were measured while the backlog waited",
            loaded.len()
        );
        let ratio = l99.as_secs_f64() / p99.as_secs_f64();
        if ratio > 2.0 {
            println!("NOT MET on this machine (issue 18): express p99 {ratio:.1}x its idle p99 (at most 2x)");
        }
        Ok(())
    })
    .await
}

/// A task that sends in a loop and never waits for room still lets the
/// other tasks of its thread run (each send takes from tokio's
/// cooperative budget, as a channel send does): the writer it woke, and
/// here a task that only records that it ran.
#[tokio::test(flavor = "current_thread")]
async fn a_sender_in_a_tight_loop_lets_other_tasks_run() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let sender = server.node("sender", &config).await?;
        let receiver = server.node(RECEIVER, &config).await?;
        let _inbox = receiver.subscribe("svc").await?;
        let ran = Arc::new(AtomicBool::new(false));
        let other = tokio::spawn({
            let ran = ran.clone();
            async move { ran.store(true, Ordering::Relaxed) }
        });
        // Far fewer than the queue holds: no send waits for room.
        let mut sent_before_it_ran = None;
        for i in 0..1_000u32 {
            sender
                .notify(Target::Node(NodeId::new(RECEIVER)), "svc", "x")
                .await?;
            if sent_before_it_ran.is_none() && ran.load(Ordering::Relaxed) {
                sent_before_it_ran = Some(i);
            }
        }
        other.await?;
        let sent =
            sent_before_it_ran.context("the other task ran only once the sending loop ended")?;
        println!("the other task ran after {sent} sends");
        Ok(())
    })
    .await
}
