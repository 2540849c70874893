//! `bench-message-server`: the clustercomm message server as its own
//! process, for the benchmark suite ([`clustercomm_benches::ours`]), which
//! reads the process's peak resident memory from `/proc/<pid>/status`.
//!
//! ```text
//! bench-message-server [--config FILE] [--listen ADDR] [--max-message-bytes N]
//! ```
//!
//! Listens on `ADDR` (default `127.0.0.1:0`, a free loopback port) with the
//! cluster's TOML file if given (its `[tls]` for the TLS cases), else the
//! embedded defaults, `limits.max_message_bytes` set to `N` if given, and
//! prints `listening on ADDR` (the bound address) on stdout once it accepts
//! connections. It runs until its stdin reaches end of file (the suite
//! holds the write end, so the server ends with the suite) or until ctrl-c
//! (SIGINT's default action). With `RUST_LOG` set, it logs to stderr as
//! `message-server` does (quiet otherwise: the suite's figures are taken
//! without logging).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use message_server::MessageServer;

/// What the command line asked for.
#[derive(Debug)]
struct Args {
    config: Option<PathBuf>,
    listen: SocketAddr,
    max_message_bytes: Option<u64>,
}

const USAGE: &str =
    "usage: bench-message-server [--config FILE] [--listen ADDR] [--max-message-bytes N]";

fn parse_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let mut parsed = Args {
        config: None,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_message_bytes: None,
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let mut value = |flag: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--config" => parsed.config = Some(PathBuf::from(value("--config")?)),
            "--listen" => {
                let v = value("--listen")?;
                parsed.listen = v
                    .parse()
                    .with_context(|| format!("--listen {v:?} is not an address"))?;
            }
            "--max-message-bytes" => {
                let v = value("--max-message-bytes")?;
                parsed.max_message_bytes = Some(
                    v.parse()
                        .with_context(|| format!("--max-message-bytes {v:?} is not a number"))?,
                );
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(parsed)
}

fn main() -> anyhow::Result<()> {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let args = parse_args(std::env::args().skip(1))?;
    let mut config = match &args.config {
        Some(path) => cluster_config::Config::load(path)
            .with_context(|| format!("loading {}", path.display()))?,
        None => cluster_config::Config::default(),
    };
    config.message_server.listen = args.listen;
    if let Some(max) = args.max_message_bytes {
        config.limits.max_message_bytes = max;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    runtime.block_on(async move {
        let server = MessageServer::bind(config)
            .await
            .context("starting the message server")?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {}", server.local_addr())?;
            out.flush()?;
        }
        // Stdin is read on a plain thread: the benches' tokio has no
        // `io-std`. End of file (or a read error) stops the server.
        let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = [0u8; 4096];
            let mut stdin = std::io::stdin().lock();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            let _ = eof_tx.send(());
        });
        server
            .run(async move {
                let _ = eof_rx.await;
            })
            .await
            .context("running the message server")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Args> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn arguments() {
        let a = parse(&[]).expect("defaults");
        assert_eq!(a.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!((a.max_message_bytes, a.config), (None, None));
        let a = parse(&["--config", "cluster.toml"]).expect("a config file");
        assert_eq!(a.config, Some(PathBuf::from("cluster.toml")));
        assert!(parse(&["--config"]).is_err());
        let a =
            parse(&["--listen", "127.0.0.1:7400", "--max-message-bytes=1024"]).expect("both flags");
        assert_eq!(a.listen.port(), 7400);
        assert_eq!(a.max_message_bytes, Some(1024));
        assert!(parse(&["--listen"]).is_err());
        assert!(parse(&["--listen", "nowhere"]).is_err());
        assert!(parse(&["--frobnicate"]).is_err());
    }
}
