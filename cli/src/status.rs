//! `status`: what the message server's monitor says (`/api/v1/status` and
//! `/api/v1/nodes`), over a plain HTTP/1.0 GET: the monitor is on the
//! server's host (`monitor.listen`), so no HTTP client library is needed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest answer read from a monitor.
const MAX_ANSWER_BYTES: u64 = 16 << 20;

/// The monitor's address: given, or the config's `monitor.listen`.
pub fn monitor_addr(
    given: Option<SocketAddr>,
    config: Option<&std::path::Path>,
) -> anyhow::Result<SocketAddr> {
    if let Some(addr) = given {
        return Ok(addr);
    }
    let config = match config {
        Some(path) => cluster_config::Config::load(path)?,
        None => cluster_config::Config::default(),
    };
    let Some(mut addr) = config.monitor.listen else {
        bail!("the config turns the monitor off (monitor.listen = \"\"): pass --monitor ADDR");
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(addr)
}

/// `GET path` from the monitor at `addr`, as JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("no monitor answers at {addr} (is the message server running, and is monitor.listen that address?)"))?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(MAX_ANSWER_BYTES)
            .read_to_end(&mut answer)
            .await?;
        Ok::<_, anyhow::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("the monitor at {addr} did not answer within 10 s"))??;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the monitor's answer has no header end")?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    ensure!(
        status == "200",
        "the monitor answered {path} with status {status}"
    );
    serde_json::from_slice(&answer[split + 4..])
        .with_context(|| format!("the monitor's {path} is not JSON"))
}

/// `status`: the server and its nodes, from the monitor.
pub async fn status(addr: SocketAddr) -> anyhow::Result<()> {
    let s = get_json(addr, "/api/v1/status").await?;
    let nodes = get_json(addr, "/api/v1/nodes").await?;
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    println!(
        "message server {} (version {}), cluster {}",
        text(&s["listen"]),
        text(&s["version"]),
        text(&s["cluster"])
    );
    println!(
        "role {}, up {} s, members {}{}",
        text(&s["failover"]["kind"]),
        s["uptime_ms"].as_u64().unwrap_or(0) / 1000,
        text(&s["members"]),
        if s["warming_up"] == Value::Bool(true) {
            ", holding messages for members not back yet"
        } else {
            ""
        }
    );
    println!(
        "credentials: cluster secret {}, TLS {}",
        on_off(&s["credentials"]["cluster_secret"]),
        on_off(&s["credentials"]["tls"])
    );
    let c = &s["counters"];
    println!(
        "messages {}, deliveries {}, route failures {}, refused connections {}",
        text(&c["messages"]),
        text(&c["deliveries"]),
        text(&c["route_failures"]),
        text(&c["connections_refused"])
    );
    println!();
    println!(
        "{:<24} {:>12} {:>14} {:>14} {:>12} {:>12}",
        "NODE", "QUEUED", "SERVER IN", "SERVER OUT", "LAZY SENT", "SESSION SENT"
    );
    for n in nodes.as_array().map(Vec::as_slice).unwrap_or_default() {
        let p = &n["paths"];
        let sent = |path: &Value| match path["messages_sent"].as_u64() {
            Some(v) => v.to_string(),
            None => "-".to_owned(),
        };
        println!(
            "{:<24} {:>12} {:>14} {:>14} {:>12} {:>12}",
            text(&n["id"]),
            text(&n["queue"]["messages"]),
            text(&p["server"]["messages_in"]),
            text(&p["server"]["messages_out"]),
            sent(&p["lazy"]),
            sent(&p["session"])
        );
    }
    Ok(())
}

fn on_off(v: &Value) -> &'static str {
    if v == &Value::Bool(true) {
        "on"
    } else {
        "off"
    }
}
