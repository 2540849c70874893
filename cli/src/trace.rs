//! `trace`: the message server captures the headers (and optionally the
//! first bytes of the bodies) of the messages matching a filter, for a
//! bounded time or count, and this command prints them as they come.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use node_runtime::{MessageKind, NodeId, Target, TraceEvent, TraceRequest};

use crate::join::{parse_target, Join};

/// What to trace.
#[derive(Debug, Clone, Args)]
pub struct Filter {
    /// Only messages from this node.
    #[arg(long)]
    pub sender: Option<String>,
    /// Only messages to this target: `node:ID`, `group:NAME`, `any:GROUP`
    /// or `all`.
    #[arg(long, value_parser = parse_target)]
    pub to: Option<Target>,
    /// Only messages for this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Print the bodies too (their first 4 KiB, as text where printable).
    #[arg(long)]
    pub bodies: bool,
    /// Stop after this many messages.
    #[arg(long, default_value_t = 100)]
    pub count: u64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
}

/// Runs a trace and prints what it captures, one line per message.
pub async fn trace(join: &Join, filter: &Filter) -> anyhow::Result<()> {
    let node = join.start().await?;
    let request = TraceRequest {
        sender: filter.sender.as_deref().map(NodeId::new),
        target: filter.to.clone(),
        service: filter.service.clone(),
        bodies: filter.bodies,
        max_messages: filter.count,
        duration_ms: filter.seconds.saturating_mul(1000),
    };
    let mut trace = node.trace(request).await?;
    // The server ends the trace; this is only a bound in case it is gone.
    let bound = Duration::from_secs(filter.seconds.saturating_add(10));
    let result = tokio::time::timeout(bound, async {
        loop {
            let event = tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(()),
                e = trace.recv() => e,
            };
            match event {
                Some(TraceEvent::Started) => {
                    println!(
                        "tracing (up to {} messages or {} s)",
                        filter.count, filter.seconds
                    );
                }
                Some(TraceEvent::Message { traced, body }) => {
                    let kind = match traced.kind {
                        MessageKind::Notify => "notify",
                        MessageKind::Send => "send",
                        MessageKind::Request => "request",
                        MessageKind::Reply { .. } => "reply",
                        MessageKind::ReplyError { code: Some(_), .. } => "error reply",
                        MessageKind::ReplyError { code: None, .. } => "no reply",
                        MessageKind::Recoverable { .. } => "recoverable send",
                    };
                    let mut line = format!(
                        "{} {} {}#{} -> {} service {} {} bytes",
                        traced.at_unix_ms,
                        kind,
                        traced.sender,
                        traced.seq,
                        traced.target,
                        traced.service,
                        traced.body_bytes
                    );
                    if filter.bodies {
                        line.push_str(&format!(": {:?}", String::from_utf8_lossy(&body)));
                    }
                    println!("{line}");
                }
                Some(TraceEvent::End {
                    captured,
                    dropped,
                    reason,
                }) => {
                    let here = trace.dropped_here();
                    println!(
                        "trace ended ({reason}): {captured} captured, {} dropped",
                        dropped + here
                    );
                    if reason.starts_with("refused") {
                        bail!("the message server {reason}");
                    }
                    return Ok(());
                }
                Some(_) => {}
                None => bail!("lost the message server during the trace"),
            }
        }
    })
    .await
    .context("the trace did not end in time")?;
    node.shutdown().await;
    result
}
