//! `host-node`: a node in its own process for the multi-host tests
//! (`clustercomm_tests::hosts`), driven by the cluster's TOML file and by
//! commands on its standard input.
//!
//! It loads `--config` as node `--id` sees it (its `[nodes.<id>]` section
//! merged in; the environment's `CLUSTERCOMM_*` overrides left out, so the
//! file alone decides), joins `--groups`, subscribes `--service` (accepting
//! and acknowledging everything, answering requests with the same body),
//! and prints `ready <id> direct=<addr> server=<addr>`: the direct address
//! it announced and the message server it registered with.
//!
//! Each line on standard input is one command, answered with exactly one
//! line:
//!
//! | command | answer |
//! | --- | --- |
//! | `send <node> <bytes>` | `ok <ms>` or `err <Variant> <ms> <error>`: one acknowledged send of that many bytes to `Target::Node(node)` on the service |
//! | `members` | `members <id,id,...>`, sorted, this node included |
//! | `paths` | `paths server=N direct=N <counter>=N ...`: `direct` is lazy plus session messages sent, then every `PathCounters` field |
//! | `received` | `received <count>`: messages taken from the service inbox |
//!
//! Membership events are printed as they come: `joined <id>`,
//! `left <id> <reason>`, `disconnected` (the link to the message server
//! broke), `server <addr>` (registered again, with that server), and
//! `lagged <n>` if events were skipped. Each line is written whole, so
//! lines never interleave. The node stops (a planned stop) and the process
//! exits when standard input closes, so a test that dies never leaves it
//! behind. Logs go to standard error (`RUST_LOG`, `warn` by default).

use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use node_runtime::{EventsError, MembershipEvent, Node, SendError, Target};

/// A node for multi-host tests, driven by its standard input.
#[derive(Debug, Parser)]
struct Args {
    /// The cluster's TOML config file.
    #[arg(long)]
    config: PathBuf,
    /// Node id.
    #[arg(long)]
    id: String,
    /// Service to subscribe, and to send to.
    #[arg(long)]
    service: String,
    /// Groups, comma-separated.
    #[arg(long, default_value = "")]
    groups: String,
}

/// Commands waiting to be read; the reader blocks beyond this.
const COMMAND_QUEUE: usize = 16;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let config = cluster_config::Config::load(&args.config)
        .and_then(|c| c.for_node(&args.id))
        .with_context(|| format!("loading {}", args.config.display()))?;
    let groups = args.groups.split(',').filter(|g| !g.is_empty());
    let node = Node::builder(args.id.as_str())
        .config(config)
        .groups(groups)
        .ignore_environment()
        .start()
        .await
        .context("joining the cluster")?;
    let events = node.membership_events();
    let inbox = node
        .subscribe(&args.service)
        .await
        .with_context(|| format!("subscribing {}", args.service))?;
    let received = Arc::new(AtomicU64::new(0));
    tokio::spawn(serve(inbox, Arc::clone(&received)));
    tokio::spawn(print_events(events));
    let direct = node
        .direct_addr()
        .map_or_else(|| "none".to_owned(), |a| a.to_string());
    let server = node.message_server().unwrap_or_else(|| "none".to_owned());
    say(format_args!(
        "ready {} direct={direct} server={server}",
        args.id
    ))?;

    let mut commands = read_commands();
    while let Some(command) = commands.recv().await {
        let answer = answer(&node, &args.service, &received, &command).await;
        say(answer)?;
    }
    node.shutdown().await;
    Ok(())
}

/// Standard input, line by line, from a thread of its own (the channel
/// closes with it).
fn read_commands() -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(COMMAND_QUEUE);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The one-line answer to `command`.
async fn answer(node: &Node, service: &str, received: &AtomicU64, command: &str) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        ["send", to, bytes] => {
            let Ok(bytes) = bytes.parse::<usize>() else {
                return format!("error not a byte count: {bytes:?}");
            };
            let start = Instant::now();
            let outcome = node
                .send(Target::Node((*to).into()), service, vec![b'x'; bytes])
                .await;
            let ms = start.elapsed().as_millis();
            match outcome {
                Ok(_) => format!("ok {ms}"),
                Err(e) => format!("err {} {ms} {e}", variant(&e)),
            }
        }
        ["members"] => {
            let mut ids: Vec<String> = node
                .members()
                .into_iter()
                .map(|m| m.id.to_string())
                .collect();
            ids.sort();
            format!("members {}", ids.join(","))
        }
        ["paths"] => {
            let c = node.counters();
            let all = format!("{c:?}");
            let fields = all
                .trim_start_matches("PathCounters {")
                .trim_end_matches('}')
                .trim()
                .replace(": ", "=")
                .replace(", ", " ");
            format!(
                "paths server={} direct={} {fields}",
                c.server_messages,
                c.lazy_messages + c.session_messages
            )
        }
        ["received"] => format!("received {}", received.load(Ordering::Relaxed)),
        _ => format!("error unknown command {command:?}"),
    }
}

/// The name of `e`'s variant (`Timeout`, `TargetStopped`, ...).
fn variant(e: &SendError) -> String {
    format!("{e:?}")
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect()
}

/// Takes every message from the inbox (which acknowledges it) and answers
/// requests with their own body.
async fn serve(mut inbox: node_runtime::Inbox, received: Arc<AtomicU64>) {
    while let Some(message) = inbox.recv().await {
        received.fetch_add(1, Ordering::Relaxed);
        if message.is_request() {
            let _ = message.reply(message.body().clone()).await;
        }
    }
}

/// Prints membership events until the node stops or stdout is gone.
async fn print_events(mut events: node_runtime::MembershipEvents) {
    loop {
        let printed = match events.recv().await {
            Ok(MembershipEvent::Joined(info)) => say(format_args!("joined {}", info.id)),
            Ok(MembershipEvent::Left { id, reason, .. }) => {
                say(format_args!("left {id} {reason:?}"))
            }
            Ok(MembershipEvent::Disconnected) => say("disconnected"),
            Ok(MembershipEvent::Reconnected { address }) => say(format_args!("server {address}")),
            Ok(_) => Ok(()),
            Err(EventsError::Lagged(n)) => say(format_args!("lagged {n}")),
            Err(_) => return,
        };
        if printed.is_err() {
            return;
        }
    }
}

/// Writes one whole line to stdout and flushes it.
fn say(line: impl Display) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}
