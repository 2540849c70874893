//! `clustercomm`: the admin command of a clustercomm cluster.
//!
//! - `clustercomm certs --out DIR NAME...` makes the cluster's CA and a
//!   certificate for the message server and for each node, for `[tls]`.
//! - `members`, `watch`, `send`, `notify` and `request` join the cluster
//!   as a short-lived node (`--config FILE`, `--server ADDR`) to list its
//!   members, follow membership events (with rates read from the monitor),
//!   or send a test message.
//! - `status` reads the message server's monitor (`/api/v1/...`).
//! - `trace` prints the messages passing the message server that match a
//!   filter (sender, target, service), for a bounded count or time.
//! - `tune` times requests of growing bodies to one node over both paths
//!   and recommends `lazy.threshold_bytes`.
//! - `dead-letters list`, `take` and `replay` join the cluster as a
//!   short-lived node to browse the message server's dead-letter queue,
//!   take entries out of it, or send them again to their targets.

mod dead_letters;
mod join;
mod status;
mod trace;
mod tune;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// The clustercomm admin command.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    join: join::Join,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Makes a CA, the message server's certificate and one per node.
    Certs {
        /// Where to write them (created if missing).
        #[arg(long, short)]
        out: PathBuf,
        /// The cluster's name, in the CA's name.
        #[arg(long, default_value = "clustercomm")]
        cluster: String,
        /// The name the message server's certificate carries
        /// (`tls.server_name`).
        #[arg(long, default_value = "message-server")]
        server_name: String,
        /// The node ids to make certificates for.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Shows the message server's state and its nodes' traffic, from its
    /// monitor (`monitor.listen`).
    Status {
        /// The monitor's address, if not the config's `monitor.listen`.
        #[arg(long)]
        monitor: Option<std::net::SocketAddr>,
    },
    /// Prints the messages passing the message server that match a
    /// filter, for a bounded count or time.
    Trace(trace::Filter),
    /// Times requests of growing bodies to a node over the message server
    /// and over a lazy channel, and recommends `lazy.threshold_bytes`.
    Tune(tune::Tune),
    /// Lists the cluster's members.
    Members {
        /// Only the members of this group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Prints the members, then membership events as they happen, and
    /// every few seconds the cluster's message rates from the monitor.
    Watch(join::Watch),
    /// Sends an acknowledged test message and prints who accepted it.
    Send(join::Message),
    /// Sends a one-way test message.
    Notify(join::Message),
    /// Sends a test request and prints the reply.
    Request(join::Message),
    /// Lists, takes out or replays the message server's dead letters:
    /// messages that were not delivered.
    DeadLetters {
        #[command(subcommand)]
        command: dead_letters::Command,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Once, with its causes, and no backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let joined = |f: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>>>>| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(f)
    };
    let join = &args.join;
    match args.command {
        Command::Certs {
            out,
            cluster,
            server_name,
            nodes,
        } => certs(&out, &cluster, &server_name, nodes),
        Command::Status { monitor } => {
            let addr = status::monitor_addr(monitor, join.config.as_deref())?;
            joined(Box::pin(status::status(addr)))
        }
        Command::Trace(filter) => {
            joined(Box::pin(async move { trace::trace(join, &filter).await }))
        }
        Command::Tune(t) => joined(Box::pin(async move { tune::tune(join, &t).await })),
        Command::Members { group } => joined(Box::pin(join::members(join, group.as_deref()))),
        Command::Watch(w) => joined(Box::pin(async move { join::watch(join, &w).await })),
        Command::Send(m) => joined(Box::pin(async move {
            join::message(join, join::Kind::Send, &m).await
        })),
        Command::Notify(m) => joined(Box::pin(async move {
            join::message(join, join::Kind::Notify, &m).await
        })),
        Command::Request(m) => joined(Box::pin(async move {
            join::message(join, join::Kind::Request, &m).await
        })),
        Command::DeadLetters { command } => {
            joined(Box::pin(
                async move { dead_letters::run(join, &command).await },
            ))
        }
    }
}

fn certs(
    out: &std::path::Path,
    cluster: &str,
    server_name: &str,
    nodes: Vec<String>,
) -> anyhow::Result<()> {
    {
        {
            let mut names = vec![server_name.to_owned()];
            names.extend(nodes);
            let written = clustercomm::certs::generate(out, cluster, &names)
                .with_context(|| format!("making certificates in {}", out.display()))?;
            println!(
                "CA certificate: {} (its key ca.key: keep it offline)",
                written.ca.display()
            );
            for (name, cert, key) in &written.issued {
                println!("{name}: {} {}", cert.display(), key.display());
            }
            println!();
            println!("[tls]");
            println!("ca_file = {:?}", written.ca.display().to_string());
            if let Some((_, cert, key)) = written.issued.first() {
                println!("cert_file = {:?}", cert.display().to_string());
                println!("key_file = {:?}", key.display().to_string());
            }
            println!("server_name = {server_name:?}");
            for (name, cert, key) in written.issued.iter().skip(1) {
                println!();
                println!("[nodes.{name}.tls]");
                println!("cert_file = {:?}", cert.display().to_string());
                println!("key_file = {:?}", key.display().to_string());
            }
            Ok(())
        }
    }
}
