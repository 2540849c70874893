//! `test-node`: a node in its own process for fault tests. It subscribes
//! one service, prints `ready <id>`, and accepts (and answers requests on)
//! everything it receives until it is killed or its stdin closes; with
//! `--no-read` it takes nothing from its inbox at all.

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
    /// Send a one-way "pings" message to this node every 20 ms.
    #[arg(long)]
    ping: Option<String>,
    /// Body size of those pings.
    #[arg(long, default_value_t = 16)]
    ping_bytes: usize,
    /// Lazy channels from 1 KiB (the timings are always the tests'
    /// `test_config`: heartbeat 200 ms, failure timeout 1 s, reconnect 50 ms).
    #[arg(long)]
    fast: bool,
    /// Print `got SENDER NUMBER` for each fault-ledger message received.
    #[arg(long)]
    print: bool,
    /// Inbox capacity (`node.inbox_capacity`).
    #[arg(long)]
    inbox_capacity: Option<usize>,
    /// Serve the service with one processor, acknowledging each message
    /// once processed (`AckMode::OnProcessed`); with `--print`, printing
    /// it is the processing.
    #[arg(long)]
    on_processed: bool,
    /// Milliseconds each message takes to process (after it is printed),
    /// so that a backlog builds up.
    #[arg(long, default_value_t = 0)]
    process_ms: u64,
    /// Subscribe the service but never take a message from its inbox: a
    /// receiver whose application has stopped reading while its process
    /// (and its node runtime) runs on. The inbox fills and the node stays
    /// busy until it is killed.
    #[arg(long)]
    no_read: bool,
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
    // The timings of the in-test servers (`test_config`): a node that
    // heartbeats at the default 1 s to a server that fails nodes after 1 s
    // of silence is failed whenever it is a little late.
    let mut config = clustercomm_tests::test_config();
    if let Some(max) = args.max_message_bytes {
        config.limits.max_message_bytes = max;
    }
    if let Some(n) = args.inbox_capacity {
        config.node.inbox_capacity = n;
    }
    if args.fast {
        config.lazy.threshold_bytes = 1024;
    }
    let node = Node::builder(args.id.as_str())
        .config(config)
        .message_server(&args.server)
        .groups(groups)
        .start()
        .await?;
    if args.on_processed {
        let print = args.print;
        let pause = std::time::Duration::from_millis(args.process_ms);
        let options = node_runtime::ServeOptions::new()
            .processors(1)
            .ack(node_runtime::AckMode::OnProcessed);
        let _serving = node
            .serve_with(
                &args.service,
                &options,
                move |message: node_runtime::Message| async move {
                    if print {
                        print_ledger(&message)?;
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                    if message.is_request() {
                        message.reply(message.body().clone()).await?;
                    }
                    Ok(())
                },
            )
            .await?;
        println!("ready {}", args.id);
        // Served until killed.
        std::future::pending::<()>().await;
        return Ok(());
    }
    let mut inbox = node.subscribe(&args.service).await?;
    if let Some(target) = args.ping {
        let node = node.clone();
        let body = bytes::Bytes::from(vec![0x70u8; args.ping_bytes]);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
            loop {
                tick.tick().await;
                let _ = node
                    .notify(
                        node_runtime::Target::Node(target.as_str().into()),
                        "pings",
                        body.clone(),
                    )
                    .await;
            }
        });
    }
    println!("ready {}", args.id);
    if args.no_read {
        // The inbox stays subscribed (and full) until the process is killed.
        std::future::pending::<()>().await;
    }
    while let Some(message) = inbox.recv().await {
        if args.print {
            print_ledger(&message)?;
        }
        if args.process_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(args.process_ms)).await;
        }
        if message.is_request() {
            let _ = message.reply(message.body().clone()).await;
        }
    }
    Ok(())
}

/// Prints `got SENDER NUMBER` for a fault-ledger message, at once.
fn print_ledger(message: &node_runtime::Message) -> std::io::Result<()> {
    use std::io::Write;
    if let Some((sender, number)) = clustercomm_tests::fault::parse(message.body()) {
        let mut out = std::io::stdout().lock();
        writeln!(out, "got {sender} {number}")?;
        out.flush()?;
    }
    Ok(())
}
