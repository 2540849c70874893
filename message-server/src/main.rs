//! `message-server`: runs the clustercomm message server and its monitor.
//!
//! With no arguments it listens on the default port with the embedded
//! defaults; `--config` reads the cluster's TOML file, `--listen` overrides
//! the listen address, `--monitor` the monitor's.
//!
//! Its first line on stdout is `message-server listening on ADDR` once it
//! accepts connections (scripts and tests wait for it); a banner follows
//! (version, cluster, config file, addresses, monitor URL, credentials).
//! A bad configuration is one message on stderr naming the key, and exit
//! code 2; a failure to start is exit code 1.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use cluster_config::{Config, ConfigError, MonitorConfig};
use message_server::monitor::{Monitor, MonitorError};
use message_server::MessageServer;
use tokio_util::sync::CancellationToken;

/// The clustercomm message server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The cluster's TOML config file (every key optional).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on, overriding `message_server.listen` and
    /// `message_server.interface` (default 0.0.0.0:7400).
    #[arg(long, short)]
    listen: Option<SocketAddr>,
    /// Address of the monitor page, JSON and metrics, overriding
    /// `monitor.listen` (default 127.0.0.1:7480); "" turns it off.
    #[arg(long, value_name = "ADDR")]
    monitor: Option<String>,
}

/// Exit code of a bad configuration (as of a bad command line).
const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let config = match configure(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("message-server: {}", report(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match run(&args, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("message-server: {}", report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// The configuration: the file (or the defaults), the environment, the
/// command line.
fn configure(args: &Args) -> Result<Config, ConfigError> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.apply_env(|k| std::env::var(k).ok())?;
    if let Some(listen) = args.listen {
        config.message_server.listen = listen;
        // The command line's address wins over an interface in the file.
        config.message_server.interface = None;
    }
    if let Some(monitor) = &args.monitor {
        let monitor = monitor.trim();
        config.monitor.listen = if monitor.is_empty() {
            None
        } else {
            Some(monitor.parse().map_err(|_| ConfigError::Invalid {
                key: "--monitor (monitor.listen)".to_owned(),
                reason: format!("{monitor:?} is not an address (ip:port), nor \"\" for none"),
            })?)
        };
    }
    Ok(config)
}

/// Binds the server and the monitor, prints where they are, and serves
/// until SIGINT or SIGTERM.
async fn run(args: &Args, config: Config) -> anyhow::Result<()> {
    if config.cluster.credentials.is_none() && !config.tls.enabled() {
        tracing::warn!(
            "no cluster.credentials and no [tls]: any client that reaches this port can register as a node"
        );
    } else if !config.tls.enabled() {
        tracing::warn!("no [tls]: bodies and handshakes travel in clear text");
    }
    let server = MessageServer::bind(config.clone())
        .await
        .context("starting the message server")?;
    let monitor = match config.monitor.listen {
        None => MonitorStart::Off,
        Some(addr) => match Monitor::bind(addr, server.handle()).await {
            Ok(monitor) => MonitorStart::On(monitor),
            // The default address taken (another server on this host, say)
            // leaves the server without its monitor; an address asked for
            // is an error.
            Err(e) if args.monitor.is_none() && config.monitor == MonitorConfig::default() => {
                tracing::warn!(error = %report(&e), "running without the monitor");
                MonitorStart::Failed(e)
            }
            Err(e) => return Err(e).context("starting the monitor"),
        },
    };
    print_banner(args, &config, &server, &monitor);

    let stop = CancellationToken::new();
    let monitor_task = match monitor {
        MonitorStart::On(monitor) => {
            let stopped = stop.clone().cancelled_owned();
            Some(tokio::spawn(async move {
                if let Err(e) = monitor.run(stopped).await {
                    tracing::error!(error = %report(&e), "the monitor stopped");
                }
            }))
        }
        _ => None,
    };
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal.cancel();
    });
    let served = server.run(stop.clone().cancelled_owned()).await;
    stop.cancel();
    if let Some(task) = monitor_task {
        let _ = task.await;
    }
    served.context("serving")
}

/// The monitor as it started, or not.
enum MonitorStart {
    On(Monitor),
    Off,
    Failed(MonitorError),
}

/// The ready line, then the banner, on stdout. Nothing here stops the
/// server: a closed stdout only loses the banner.
fn print_banner(args: &Args, config: &Config, server: &MessageServer, monitor: &MonitorStart) {
    let handle = server.handle();
    let yes_no = |on: bool| if on { "on" } else { "off" };
    let mut heartbeats = handle
        .heartbeat_addr()
        .map_or_else(|| "none".to_owned(), |a| format!("{a} (udp)"));
    if let Some(told) = config.message_server.heartbeat_advertise {
        heartbeats.push_str(&format!(", told to nodes as {told}"));
    }
    let monitor = match monitor {
        MonitorStart::On(m) => m.url(),
        MonitorStart::Off => "off (monitor.listen = \"\")".to_owned(),
        MonitorStart::Failed(e) => format!("off: {}", report(e)),
    };
    let config_file = args.config.as_ref().map_or_else(
        || "embedded defaults".to_owned(),
        |p| p.display().to_string(),
    );
    let secret = config.cluster.credentials.is_some();
    let tls = config.tls.enabled();
    let open = if secret || tls {
        ""
    } else {
        " (any client that reaches the port can register)"
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "message-server listening on {}", server.local_addr());
    let _ = writeln!(out, "  version      {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "  cluster      {}", config.cluster.name);
    let _ = writeln!(out, "  config       {config_file}");
    let _ = writeln!(out, "  listen       {} (tcp)", server.local_addr());
    let _ = writeln!(out, "  heartbeats   {heartbeats}");
    let _ = writeln!(out, "  monitor      {monitor}");
    let _ = writeln!(
        out,
        "  credentials  cluster secret {}, TLS {}{open}",
        yes_no(secret),
        yes_no(tls)
    );
    let _ = out.flush();
}

/// An error and its causes on one line, each said once (a message that
/// already quotes its cause, as a parse error does, is not followed by it
/// again). No backtrace.
fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    text
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
