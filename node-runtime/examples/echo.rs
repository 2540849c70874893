//! An echo server: joins the cluster as node `echo-1` in group `echo`,
//! offers the service `echo`, answers every request with its body and
//! prints every message it gets. Stops on ctrl-c.
//!
//! Start a message server first (`cargo run --release -p message-server`),
//! then:
//!
//! ```text
//! cargo run -p node-runtime --example echo
//! ```
//!
//! It connects to `127.0.0.1:7400`; `CLUSTERCOMM_MESSAGE_SERVER` points it
//! elsewhere, `CLUSTERCOMM_CLUSTER` names another cluster.

use node_runtime::Node;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let id = std::env::args().nth(1).unwrap_or_else(|| "echo-1".into());
    let node = Node::builder(id.as_str()).groups(["echo"]).start().await?;
    let mut inbox = node.subscribe("echo").await?;
    println!(
        "{id} ready: offering service `echo` in group `echo` (message server {})",
        node.message_server().unwrap_or_default()
    );
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            message = inbox.recv() => {
                let Some(message) = message else { break };
                let text = String::from_utf8_lossy(message.body());
                let kind = if message.is_request() { "request" } else { "message" };
                println!("{kind} from {}: {text}", message.sender());
                if message.is_request() {
                    message.reply(message.body().clone()).await?;
                }
            }
        }
    }
    node.shutdown().await;
    Ok(())
}
