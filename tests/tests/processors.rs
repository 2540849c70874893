//! `Node::serve`: processors handle a service's messages concurrently,
//! each sender's in order, at most `max_in_a_row` of one sender in a row
//! while others wait, and what they hold counts toward busy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use clustercomm_tests::{bounded, init_logging, test_config, TestServer};
use node_runtime::{Message, Node, NodeId, ServeOptions, Target};
use tokio::sync::Semaphore;

/// The body of message `n`: its number.
fn number(m: &Message) -> u64 {
    std::str::from_utf8(m.body())
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Each sender sends `count` numbered messages, pipelined, and waits for
/// every acknowledgement.
async fn send_numbered(senders: &[Node], count: u64) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for s in senders {
        let s = s.clone();
        all.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            for n in 0..count {
                pending.push(
                    s.submit(Target::Node(NodeId::new("worker")), "jobs", n.to_string())
                        .await?,
                );
            }
            for p in pending {
                p.outcome().await?;
            }
            anyhow::Ok(())
        }));
    }
    for a in all {
        a.await??;
    }
    Ok(())
}

/// 4 processors, 3 senders: every message handled once, each sender's in
/// order, several at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_keep_each_senders_order() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        const EACH: u64 = 300;
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let worker = server.node("worker", &config).await?;
        let seen: Arc<Mutex<Vec<(NodeId, u64)>>> = Arc::default();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let serving = {
            let (seen, running, most) = (seen.clone(), running.clone(), most.clone());
            worker
                .serve_with(
                    "jobs",
                    &ServeOptions::new().processors(4),
                    move |m: Message| {
                        let (seen, running, most) = (seen.clone(), running.clone(), most.clone());
                        async move {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            if let Ok(mut seen) = seen.lock() {
                                seen.push((m.sender().clone(), number(&m)));
                            }
                            // Work that waits: other processors run meanwhile.
                            tokio::time::sleep(Duration::from_micros(200)).await;
                            running.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        }
                    },
                )
                .await?
        };
        let senders = vec![
            server.node("s1", &config).await?,
            server.node("s2", &config).await?,
            server.node("s3", &config).await?,
        ];
        send_numbered(&senders, EACH).await?;
        while serving.stats().handled < 3 * EACH {
            tokio::task::yield_now().await;
        }
        let seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
        let mut per_sender: HashMap<NodeId, Vec<u64>> = HashMap::new();
        for (s, n) in &seen {
            per_sender.entry(s.clone()).or_default().push(*n);
        }
        ensure!(seen.len() as u64 == 3 * EACH, "{} handled", seen.len());
        for (s, numbers) in &per_sender {
            let expected: Vec<u64> = (0..EACH).collect();
            ensure!(numbers == &expected, "{s}: out of order, lost or twice");
        }
        let most = most.load(Ordering::SeqCst);
        ensure!((2..=4).contains(&most), "{most} handlers ran at once");
        let stats = serving.stats();
        println!(
            "4 processors, 3 senders x {EACH}: {} handled, in order per sender, up to {most} at once; longest run of one sender while others waited: {}",
            stats.handled, stats.longest_run_while_others_waited
        );
        ensure!(stats.longest_run_while_others_waited <= 10);
        ensure!(stats.held == 0 && stats.failed == 0, "{stats:?}");
        Ok(())
    })
    .await
}

/// One processor, three senders whose messages all wait: it takes at most
/// `max_in_a_row` of one sender in a row while the others have some.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_a_row_holds() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        const EACH: u64 = 60;
        const IN_A_ROW: usize = 7;
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let worker = server.node("worker", &config).await?;
        let seen: Arc<Mutex<Vec<NodeId>>> = Arc::default();
        // Closed until every message has arrived.
        let gate = Arc::new(Semaphore::new(0));
        let serving = {
            let (seen, gate) = (seen.clone(), gate.clone());
            worker
                .serve_with(
                    "jobs",
                    &ServeOptions::new().processors(1).max_in_a_row(IN_A_ROW),
                    move |m: Message| {
                        let (seen, gate) = (seen.clone(), gate.clone());
                        async move {
                            let _pass = gate.acquire().await?;
                            if let Ok(mut seen) = seen.lock() {
                                seen.push(m.sender().clone());
                            }
                            Ok(())
                        }
                    },
                )
                .await?
        };
        let senders = vec![
            server.node("s1", &config).await?,
            server.node("s2", &config).await?,
            server.node("s3", &config).await?,
        ];
        send_numbered(&senders, EACH).await?;
        // Acknowledged means in the inbox; the pool takes them from there.
        // Only once it holds them all do the senders all wait.
        while serving.stats().held < 3 * EACH as usize {
            tokio::task::yield_now().await;
        }
        gate.add_permits(Semaphore::MAX_PERMITS);
        while serving.stats().handled < 3 * EACH {
            tokio::task::yield_now().await;
        }
        let seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
        ensure!(seen.len() as u64 == 3 * EACH);
        // Runs of one sender, and whether another still had messages when
        // each run ended.
        let mut longest_contended = 0;
        let mut i = 0;
        while i < seen.len() {
            let mut j = i;
            while j < seen.len() && seen[j] == seen[i] {
                j += 1;
            }
            let others_left = seen[j..].iter().any(|s| s != &seen[i]);
            if others_left {
                longest_contended = longest_contended.max(j - i);
            }
            i = j;
        }
        let stats = serving.stats();
        println!(
            "max_in_a_row {IN_A_ROW}, one processor, 3 senders x {EACH}: longest run while others waited {longest_contended} (the pool's count: {})",
            stats.longest_run_while_others_waited
        );
        ensure!(longest_contended <= IN_A_ROW, "{longest_contended}");
        ensure!(longest_contended == IN_A_ROW, "the senders did not take turns as expected: {longest_contended}");
        ensure!(stats.longest_run_while_others_waited as usize <= IN_A_ROW);
        Ok(())
    })
    .await
}

/// Messages the processors hold count toward busy: a node whose one
/// processor is held up becomes busy, and is no longer once it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_make_a_node_busy() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let mut config = test_config();
        config.node.busy_upper = 32;
        config.node.busy_lower = 4;
        let server = TestServer::start(config.clone()).await?;
        let worker = server.node("worker", &config).await?;
        let gate = Arc::new(Semaphore::new(0));
        let serving = {
            let gate = gate.clone();
            worker
                .serve_with(
                    "jobs",
                    &ServeOptions::new().processors(1),
                    move |_m: Message| {
                        let gate = gate.clone();
                        async move {
                            let _pass = gate.acquire().await?;
                            Ok(())
                        }
                    },
                )
                .await?
        };
        let sender = server.node("s1", &config).await?;
        let mut events = sender.membership_events();
        // Exactly busy_upper: every one was sent before the node could
        // turn busy (a busy node would hold the sender back).
        send_numbered(std::slice::from_ref(&sender), 32).await?;
        ensure!(
            worker.is_busy(),
            "32 held messages, busy_upper 32: not busy"
        );
        loop {
            if let node_runtime::MembershipEvent::Updated(m) = events.recv().await? {
                if m.id == "worker" && m.busy {
                    break;
                }
            }
        }
        gate.add_permits(Semaphore::MAX_PERMITS);
        loop {
            if let node_runtime::MembershipEvent::Updated(m) = events.recv().await? {
                if m.id == "worker" && !m.busy {
                    break;
                }
            }
        }
        ensure!(!worker.is_busy());
        println!(
            "processors holding 32 messages made the node busy; no longer busy with {} handled",
            serving.stats().handled
        );
        Ok(())
    })
    .await
}

/// Acknowledgement on processing, with an inbox: a `send` resolves only
/// when the application acks; `reject` and dropping the message refuse
/// it; a served handler's error refuses it with the error's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_on_processing() -> anyhow::Result<()> {
    use node_runtime::{AckMode, SendError, SubscribeOptions};
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let worker = server.node("worker", &config).await?;
        let sender = server.node("sender", &config).await?;
        let mut pings = sender.subscribe("pings").await?;
        let mut inbox = worker
            .subscribe_with("jobs", &SubscribeOptions::new().ack(AckMode::OnProcessed))
            .await?;
        let to = || Target::Node(NodeId::new("worker"));

        let pending = sender.submit(to(), "jobs", "a").await?;
        let mut m = inbox.recv().await.context("inbox closed")?;
        ensure!(m.awaits_ack());
        // An acknowledgement queued on receipt would reach the sender
        // before this (control frames go first on each link): none did.
        worker
            .send(Target::Node(NodeId::new("sender")), "pings", "")
            .await?;
        pings.recv().await.context("pings closed")?;
        ensure!(sender.pending() == 1, "acknowledged before processing");
        m.ack().await;
        ensure!(!m.awaits_ack());
        let report = pending.outcome().await?;
        ensure!(report.delivered == [NodeId::new("worker")]);

        let pending = sender.submit(to(), "jobs", "b").await?;
        let mut m = inbox.recv().await.context("inbox closed")?;
        m.reject("no stock").await;
        match pending.outcome().await {
            Err(SendError::Rejected { reason, .. }) => ensure!(reason == "no stock"),
            other => anyhow::bail!("rejected: {other:?}"),
        }

        let pending = sender.submit(to(), "jobs", "c").await?;
        drop(inbox.recv().await.context("inbox closed")?);
        match pending.outcome().await {
            Err(SendError::Rejected { reason, .. }) => {
                ensure!(reason.contains("without an acknowledgement"), "{reason}")
            }
            other => anyhow::bail!("dropped: {other:?}"),
        }
        drop(inbox);

        // Served: the handler's result decides.
        let _serving = worker
            .serve_with(
                "orders",
                &ServeOptions::new().ack(AckMode::OnProcessed),
                |m: Message| async move {
                    if m.body().as_ref() == b"bad" {
                        return Err("malformed order".into());
                    }
                    Ok(())
                },
            )
            .await?;
        let to = || Target::Node(NodeId::new("worker"));
        sender.send(to(), "orders", "good").await?;
        match sender.send(to(), "orders", "bad").await {
            Err(SendError::Rejected { reason, .. }) => ensure!(reason == "malformed order"),
            other => anyhow::bail!("handler error: {other:?}"),
        }
        Ok(())
    })
    .await
}
