//! A client: joins the cluster as a short-lived node, waits for a member
//! of group `echo` (run the `echo` example), then sends it one message of
//! each kind and prints what came back:
//!
//! - a request to any one member of `echo`, answered with the same body;
//! - an acknowledged send to the whole group, with its delivery report;
//! - a one-way notification.
//!
//! ```text
//! cargo run -p node-runtime --example hello
//! ```
//!
//! It connects to `127.0.0.1:7400`; `CLUSTERCOMM_MESSAGE_SERVER` points it
//! elsewhere.

use std::time::Duration;

use anyhow::Context;
use node_runtime::{EventsError, Node, Target};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let id = format!("hello-{}", std::process::id());
    let node = Node::builder(id.as_str()).start().await?;

    // Wait (up to 10 s) until a member of group `echo` offers `echo`.
    let mut events = node.membership_events();
    let wait =
        async {
            while !node.members().iter().any(|m| {
                m.groups.iter().any(|g| g == "echo") && m.services.iter().any(|s| s == "echo")
            }) {
                if let Err(EventsError::Closed) = events.recv().await {
                    anyhow::bail!("the node stopped");
                }
            }
            Ok(())
        };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .context("no member of group `echo` within 10 s: start the echo example first")??;

    let echo = Target::AnyOf("echo".into());
    let reply = node.request(echo, "echo", "hello").await?;
    println!(
        "reply from {}: {}",
        reply.from,
        String::from_utf8_lossy(&reply.body)
    );
    let report = node
        .send(Target::Group("echo".into()), "echo", "hello, group")
        .await?;
    let delivered: Vec<&str> = report.delivered.iter().map(|n| n.as_str()).collect();
    println!("delivered to {}", delivered.join(", "));
    node.notify(Target::Group("echo".into()), "echo", "goodbye")
        .await?;
    println!("notified");
    node.shutdown().await;
    Ok(())
}
