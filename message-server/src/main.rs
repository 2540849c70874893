//! `message-server`: runs the clustercomm message server.
//!
//! With no arguments it listens on the default port with the embedded
//! defaults; `--config` reads the cluster's TOML file, `--listen` overrides
//! the listen address.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use cluster_config::Config;
use message_server::MessageServer;

/// The clustercomm message server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The cluster's TOML config file (every key optional).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on, overriding `message_server.listen`
    /// (default 0.0.0.0:7400).
    #[arg(long, short)]
    listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.apply_env(|k| std::env::var(k).ok())?;
    if let Some(listen) = args.listen {
        config.message_server.listen = listen;
    }
    if config.cluster.credentials.is_none() && !config.tls.enabled() {
        tracing::warn!(
            "no cluster.credentials and no [tls]: any client that reaches this port can register as a node"
        );
    } else if !config.tls.enabled() {
        tracing::warn!("no [tls]: bodies and handshakes travel in clear text");
    }
    let server = MessageServer::bind(config)
        .await
        .context("starting the message server")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "message-server listening on {}", server.local_addr())?;
        out.flush()?;
    }
    server.run(shutdown_signal()).await?;
    Ok(())
}

/// Resolves on ctrl-c (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
