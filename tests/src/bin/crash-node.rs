//! `crash-node`: a node with a store (`node.data_dir`) in its own process,
//! for the recoverable-message crash tests, killed and restarted at random.
//!
//! - `--role receiver`: subscribes `ledger`, prints `ready <id>`, then
//!   `got SENDER NUMBER` for each message `Inbox::recv` hands over.
//! - `--role sender`: sends `--count` recoverable messages to each of the
//!   `--to` receivers (fault-ledger bodies numbered per receiver from 0,
//!   256 in flight), going on after a restart from what its store took
//!   (`Node::recoverable_sent`); prints `ready <id>`, and `done` once every
//!   message was acknowledged.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use node_runtime::{Node, NodeId, SendError, SendOptions, Target};

/// A node of the crash tests.
#[derive(Debug, Parser)]
struct Args {
    /// Message server address.
    #[arg(long)]
    server: String,
    /// Node id.
    #[arg(long)]
    id: String,
    /// The node's store directory.
    #[arg(long)]
    data: std::path::PathBuf,
    /// `sender` or `receiver`.
    #[arg(long)]
    role: String,
    /// A sender's index in the ledger.
    #[arg(long, default_value_t = 0)]
    index: u32,
    /// A sender's receivers, comma-separated.
    #[arg(long, default_value = "")]
    to: String,
    /// Messages a sender sends to each receiver.
    #[arg(long, default_value_t = 0)]
    count: u64,
}

/// Recoverable messages a sender has in flight, at most.
const WINDOW: usize = 256;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = clustercomm_tests::test_config();
    config.node.data_dir = Some(args.data.clone());
    config.node.send_timeout_ms = 2_000;
    let node = Node::builder(args.id.as_str())
        .config(config)
        .message_server(&args.server)
        .start()
        .await?;
    match args.role.as_str() {
        "receiver" => receive(&node, &args.id).await,
        "sender" => send(&node, &args).await,
        other => anyhow::bail!("unknown role {other:?}"),
    }
}

async fn receive(node: &Node, id: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut inbox = node.subscribe("ledger").await?;
    println!("ready {id}");
    while let Some(message) = inbox.recv().await {
        let (sender, number) =
            clustercomm_tests::fault::parse(message.body()).context("a ledger body")?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "got {sender} {number}")?;
        out.flush()?;
    }
    Ok(())
}

async fn send(node: &Node, args: &Args) -> anyhow::Result<()> {
    let receivers: Vec<NodeId> = args
        .to
        .split(',')
        .filter(|r| !r.is_empty())
        .map(NodeId::new)
        .collect();
    // Where each stream stands after a restart: what the store took.
    let mut next: Vec<u64> = receivers.iter().map(|r| node.recoverable_sent(r)).collect();
    println!("ready {} from {next:?}", args.id);
    let options = SendOptions::new().recoverable();
    let mut window = VecDeque::with_capacity(WINDOW);
    loop {
        let mut progress = false;
        for (r, receiver) in receivers.iter().enumerate() {
            if next[r] >= args.count {
                continue;
            }
            let body = clustercomm_tests::fault::body(args.index, next[r]);
            let target = Target::Node(receiver.clone());
            match node.submit_with(target, "ledger", body, &options).await {
                Ok(pending) => window.push_back(pending),
                // Stored: it will be delivered.
                Err(SendError::StillQueued { .. }) => {}
                Err(e) => anyhow::bail!("recoverable submit failed: {e}"),
            }
            next[r] += 1;
            progress = true;
            if window.len() >= WINDOW {
                if let Some(oldest) = window.pop_front() {
                    settle(oldest.outcome().await)?;
                }
            }
        }
        if !progress {
            break;
        }
    }
    for pending in window {
        settle(pending.outcome().await)?;
    }
    while node.recoverable_unacknowledged() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("done");
    std::future::pending::<()>().await;
    Ok(())
}

/// A recoverable message either arrived or is still queued; nothing else
/// is expected.
fn settle(outcome: Result<node_runtime::DeliveryReport, SendError>) -> anyhow::Result<()> {
    match outcome {
        Ok(_) | Err(SendError::StillQueued { .. }) => Ok(()),
        Err(e) => anyhow::bail!("recoverable message failed: {e}"),
    }
}
