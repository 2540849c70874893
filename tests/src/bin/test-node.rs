//! `test-node`: a node in its own process for fault tests. It subscribes
//! one service, prints `ready <id>`, and accepts (and answers requests on)
//! everything it receives until it is killed or its stdin closes.

use clap::Parser;
use node_runtime::Node;

/// A node for fault tests.
#[derive(Debug, Parser)]
struct Args {
    /// Message server address.
    #[arg(long)]
    server: String,
    /// Node id.
    #[arg(long)]
    id: String,
    /// Service to subscribe.
    #[arg(long)]
    service: String,
    /// Groups, comma-separated.
    #[arg(long, default_value = "")]
    groups: String,
    /// Largest body accepted (`limits.max_message_bytes`).
    #[arg(long)]
    max_message_bytes: Option<u64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let groups: Vec<String> = args
        .groups
        .split(',')
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect();
    let mut config = node_runtime::Config::default();
    if let Some(max) = args.max_message_bytes {
        config.limits.max_message_bytes = max;
    }
    let node = Node::builder(args.id.as_str())
        .config(config)
        .message_server(&args.server)
        .groups(groups)
        .start()
        .await?;
    let mut inbox = node.subscribe(&args.service).await?;
    println!("ready {}", args.id);
    while let Some(message) = inbox.recv().await {
        if message.is_request() {
            let _ = message.reply(message.body().clone()).await;
        }
    }
    Ok(())
}
