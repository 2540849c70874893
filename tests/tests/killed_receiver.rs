//! A receiver process killed (SIGKILL) in the middle of four senders'
//! streams: every sender gets an error within the failure timeout and a
//! second, and every message acknowledged to a sender had been accepted by
//! the receiver; with acknowledgement on processing, every message
//! acknowledged had been processed, strictly.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clustercomm_tests::fault::{body, Ledger, Told};
use clustercomm_tests::{bounded, init_logging, spawn_test_node_with, test_config, TestServer};
use node_runtime::{Node, Target};

const SENDERS: u32 = 4;
const INBOX: usize = 1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sender_learns_of_a_killed_receiver_and_acknowledged_means_delivered(
) -> anyhow::Result<()> {
    init_logging();
    let inbox = INBOX.to_string();
    let tally = bounded(kill_mid_stream(&[
        "--fast",
        "--print",
        "--inbox-capacity",
        &inbox,
    ]))
    .await?;
    // Acknowledged means accepted into the receiver's inbox. The
    // application prints what it takes from the inbox, so at the kill at
    // most the inbox and the message entering it can be unprinted.
    ensure!(tally.lost <= 2 * INBOX as u64, "{tally}");
    Ok(())
}

/// Acknowledged on processing (`AckMode::OnProcessed`, the handler prints
/// each message, and printing is the processing): every message its
/// sender saw acknowledged was processed, with no allowance for what sat
/// in the inbox, although the inbox holds 64 and processing (1 ms each)
/// lags behind the senders, so that a backlog waits at the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_on_processing_means_processed_under_sigkill() -> anyhow::Result<()> {
    init_logging();
    let tally = bounded(kill_mid_stream(&[
        "--fast",
        "--print",
        "--on-processed",
        "--inbox-capacity",
        "64",
        "--process-ms",
        "1",
    ]))
    .await?;
    ensure!(tally.lost == 0, "{tally}");
    Ok(())
}

/// Four senders stream acknowledged messages to a `test-node` started with
/// `victim_args`, which prints what it processes; after 2,000
/// acknowledgements it is killed. Checks that every sender learns of it in
/// time and nothing is duplicated, reordered or unexpected; returns the
/// tally for the caller's check of what was lost.
async fn kill_mid_stream(victim_args: &[&str]) -> anyhow::Result<clustercomm_tests::fault::Tally> {
    {
        let config = test_config();
        let bound = config.failure_timeout() + Duration::from_secs(1);
        let server = TestServer::start(config.clone()).await?;
        let mut victim = spawn_test_node_with(server.addr, "victim", "ft", victim_args).await?;
        let ledger = Ledger::default();
        // The victim prints every message its application takes.
        let mut lines = victim.take_stdout()?;
        let printed = ledger.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut parts = line.split_whitespace().skip(1);
                if let (Some(s), Some(n)) = (parts.next(), parts.next()) {
                    if let (Ok(s), Ok(n)) = (s.parse::<u32>(), n.parse::<u64>()) {
                        printed.delivered(0, &body(s, n));
                    }
                }
            }
        });

        let mut senders = Vec::new();
        for s in 0..SENDERS {
            senders.push(
                Node::builder(format!("s{s}"))
                    .config(config.clone())
                    .message_server(server.addr)
                    .start()
                    .await?,
            );
        }
        let (kill_tx, kill_rx) = tokio::sync::watch::channel(None::<Instant>);
        let mut tasks = tokio::task::JoinSet::new();
        for (s, node) in senders.iter().enumerate() {
            let node = node.clone();
            let ledger = ledger.clone();
            let kill_rx = kill_rx.clone();
            tasks.spawn(async move {
                let s = s as u32;
                let mut n = 0u64;
                let mut window = std::collections::VecDeque::new();
                // Send until an error arrives; note how long after the kill.
                loop {
                    let p = node
                        .submit(Target::Node("victim".into()), "ft", body(s, n))
                        .await;
                    match p {
                        Ok(p) => window.push_back((n, p)),
                        Err(e) => {
                            ledger.told(s, 0, n, Told::Error(e.to_string()));
                            break;
                        }
                    }
                    n += 1;
                    if window.len() >= 16 {
                        let Some((m, p)) = window.pop_front() else {
                            break;
                        };
                        match p.outcome().await {
                            Ok(_) => ledger.told(s, 0, m, Told::Delivered),
                            Err(e) => {
                                ledger.told(s, 0, m, Told::Error(e.to_string()));
                                break;
                            }
                        }
                    }
                }
                for (m, p) in window {
                    let told = match p.outcome().await {
                        Ok(_) => Told::Delivered,
                        Err(e) => Told::Error(e.to_string()),
                    };
                    ledger.told(s, 0, m, told);
                }
                let killed = *kill_rx.borrow();
                killed.map(|k| k.elapsed())
            });
        }
        // Let the streams run, then kill the receiver.
        while ledger.acknowledged_count() < 2_000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        victim.signal("KILL").await?;
        kill_tx.send(Some(Instant::now()))?;
        let mut worst = Duration::ZERO;
        while let Some(r) = tasks.join_next().await {
            let after = r?.context("a sender stopped before the kill")?;
            worst = worst.max(after);
        }
        let _ = victim.kill().await;
        reader.await?;
        let tally = ledger.tally();
        eprintln!("the last sender learnt of the kill within {worst:?}; {tally}");
        ensure!(
            worst <= bound,
            "a sender learnt of the kill after {worst:?}"
        );
        ensure!(tally.errors >= u64::from(SENDERS), "{tally}");
        ensure!(
            tally.duplicated == 0 && tally.reordered == 0 && tally.unexpected == 0,
            "{tally}"
        );
        for e in &tally.error_samples {
            ensure!(
                e.contains("stopped") || e.contains("unknown target") || e.contains("broke"),
                "unexpected kind of error: {e}"
            );
        }
        Ok(tally)
    }
}
