//! The subcommands that join the cluster as a short-lived node: `members`,
//! `watch` (which also reads rates from the monitor), `send`, `notify` and
//! `request`. The node's id is
//! `clustercomm-<pid>`; it leaves with a goodbye when the command ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use node_runtime::{
    Config, EventsError, LeaveReason, MemberInfo, MembershipEvent, Node, NodeId, Role, Target,
};
use serde_json::Value;

/// How to reach the cluster: its config file and the message server.
#[derive(Debug, Clone, Args)]
pub struct Join {
    /// The cluster's TOML config file (credentials, TLS, addresses).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// The message server's address, overriding the config and
    /// `CLUSTERCOMM_MESSAGE_SERVER`.
    #[arg(long, short, global = true)]
    pub server: Option<String>,
}

impl Join {
    /// Joins the cluster as `clustercomm-<pid>`.
    pub async fn start(&self) -> anyhow::Result<Node> {
        let config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let id = format!("clustercomm-{}", std::process::id());
        let mut builder = Node::builder(id.as_str()).config(config);
        if let Some(server) = &self.server {
            builder = builder.message_server(server);
        }
        builder.start().await.context("joining the cluster")
    }
}

/// What a test message carries and where it goes.
#[derive(Debug, Clone, Args)]
pub struct Message {
    /// Where to: `node:ID`, `group:NAME`, `any:GROUP` (one member) or `all`.
    #[arg(long, value_parser = parse_target)]
    pub to: Target,
    /// The service it is for.
    #[arg(long)]
    pub service: String,
    /// The body, as text.
    #[arg(long, conflicts_with = "body_file")]
    pub body: Option<String>,
    /// The body, read from this file.
    #[arg(long)]
    pub body_file: Option<PathBuf>,
}

impl Message {
    fn body(&self) -> anyhow::Result<Bytes> {
        Ok(match (&self.body, &self.body_file) {
            (Some(text), _) => Bytes::from(text.clone()),
            (None, Some(path)) => Bytes::from(
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            ),
            (None, None) => Bytes::new(),
        })
    }
}

/// Parses `node:ID`, `group:NAME`, `any:GROUP` or `all`.
pub fn parse_target(text: &str) -> Result<Target, String> {
    let bad = || format!("{text:?} is not a target: use node:ID, group:NAME, any:GROUP or all");
    if text == "all" {
        return Ok(Target::All);
    }
    let (kind, name) = text.split_once(':').ok_or_else(bad)?;
    if name.is_empty() {
        return Err(bad());
    }
    match kind {
        "node" => Ok(Target::Node(NodeId::new(name))),
        "group" => Ok(Target::Group(name.to_owned())),
        "any" => Ok(Target::AnyOf(name.to_owned())),
        _ => Err(bad()),
    }
}

/// `members`: one line per member (this command's own node left out).
pub async fn members(join: &Join, group: Option<&str>) -> anyhow::Result<()> {
    let node = join.start().await?;
    let mut members: Vec<MemberInfo> = node
        .members()
        .into_iter()
        .filter(|m| &m.id != node.id())
        .filter(|m| group.is_none_or(|g| m.groups.iter().any(|mg| mg == g)))
        .collect();
    members.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    println!(
        "{:<24} {:<20} {:<10} {:<20} {:<24} DIRECT",
        "ID", "INCARNATION", "ROLE", "GROUPS", "SERVICES"
    );
    for m in &members {
        println!("{}", member_line(m));
    }
    println!("{} members", members.len());
    node.shutdown().await;
    Ok(())
}

fn member_line(m: &MemberInfo) -> String {
    let role = match m.role {
        Role::Server => "server",
        Role::Dispatcher => "dispatcher",
    };
    fn or_dash<S: AsRef<str>>(v: &[S]) -> String {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(",")
        }
    }
    format!(
        "{:<24} {:<20} {:<10} {:<20} {:<24} {}",
        m.id.as_str(),
        m.incarnation,
        role,
        or_dash(&m.groups),
        or_dash(&m.services),
        m.direct_addr.map_or("-".to_owned(), |a| a.to_string())
    )
}

/// `watch`'s options.
#[derive(Debug, Clone, Args)]
pub struct Watch {
    /// The monitor to read rates from, if not the config's
    /// `monitor.listen`.
    #[arg(long)]
    pub monitor: Option<SocketAddr>,
    /// Seconds between two rate lines; 0 prints events only.
    #[arg(long, default_value_t = 5)]
    pub rates_every: u64,
}

/// `watch`: the members now, then every membership event as it comes and
/// a line of rates every `--rates-every` seconds, until ctrl-c.
pub async fn watch(join: &Join, options: &Watch) -> anyhow::Result<()> {
    let node = join.start().await?;
    let mut events = node.membership_events();
    for m in node.members().iter().filter(|m| &m.id != node.id()) {
        println!("member  {}", member_line(m));
    }
    let mut rates = if options.rates_every == 0 {
        None
    } else {
        let mut rates = RateWatch::new(options.monitor, join.config.as_deref());
        // The first read is the baseline; it says at once if there is no
        // monitor to read.
        rates.tick().await;
        Some(rates)
    };
    let every = Duration::from_secs(options.rates_every.max(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    println!("watching (ctrl-c to stop)");
    loop {
        let event = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = ticks.tick(), if rates.is_some() => {
                if let Some(rates) = rates.as_mut() {
                    rates.tick().await;
                }
                continue;
            }
            e = events.recv() => e,
        };
        match event {
            Ok(MembershipEvent::Joined(m)) => println!("joined  {}", member_line(&m)),
            Ok(MembershipEvent::Updated(m)) => println!("updated {}", member_line(&m)),
            Ok(MembershipEvent::Left {
                id,
                incarnation,
                reason,
            }) => {
                let why = match reason {
                    LeaveReason::Stopped => "stopped",
                    LeaveReason::Disconnected => "disconnected",
                    LeaveReason::Failed => "failed (silent past the failure timeout)",
                };
                println!("left    {id} {incarnation}: {why}");
            }
            Ok(MembershipEvent::Disconnected) => {
                println!("lost the message server; reconnecting")
            }
            Ok(MembershipEvent::Reconnected { address }) => {
                println!("connected again to {address}")
            }
            Ok(_) => {}
            Err(EventsError::Lagged(n)) => println!("({n} events missed: printing too slowly)"),
            Err(EventsError::Closed) => bail!("the node stopped"),
            Err(e) => bail!("{e}"),
        }
    }
    node.shutdown().await;
    Ok(())
}

/// How many of the busiest nodes a rate line names.
const BUSIEST_SHOWN: usize = 3;

/// The rates `watch` prints, from two reads of the monitor: the server's
/// counters and what nodes report about their direct channels.
struct RateWatch {
    /// The monitor, or why there is none to read.
    monitor: Result<SocketAddr, String>,
    /// The last good read.
    last: Option<RateRead>,
    /// Whether the last read failed (its error is printed once, until a
    /// read succeeds again).
    failing: bool,
}

/// One read of the monitor.
struct RateRead {
    at: Instant,
    messages: u64,
    message_bytes: u64,
    deliveries: u64,
    route_failures: u64,
    /// Per node (id and incarnation): messages it sent on direct channels.
    direct_sent: HashMap<(String, String), u64>,
    /// Per node: messages per second in and out through the server, as
    /// the server computed them over its own window.
    node_rates: Vec<(String, f64, f64)>,
}

impl RateWatch {
    fn new(given: Option<SocketAddr>, config: Option<&std::path::Path>) -> Self {
        let monitor = crate::status::monitor_addr(given, config).map_err(|e| format!("{e:#}"));
        if let Err(why) = &monitor {
            println!("rates   none: {why}");
        }
        Self {
            monitor,
            last: None,
            failing: false,
        }
    }

    /// Reads the monitor and prints the rates since the last read (or,
    /// on the first failure in a row, why there are none).
    async fn tick(&mut self) {
        let Ok(addr) = self.monitor else { return };
        match read_rates(addr).await {
            Ok(now) => {
                if self.failing {
                    println!("rates   the monitor at {addr} answers again");
                    self.failing = false;
                }
                if let Some(then) = &self.last {
                    println!("rates   {}", rate_line(then, &now));
                }
                self.last = Some(now);
            }
            Err(e) => {
                if !self.failing {
                    println!("rates   none for now: {e:#}");
                    self.failing = true;
                }
                // Rates over a gap would mix two windows: start again.
                self.last = None;
            }
        }
    }
}

async fn read_rates(addr: SocketAddr) -> anyhow::Result<RateRead> {
    let status = crate::status::get_json(addr, "/api/v1/status").await?;
    let nodes = crate::status::get_json(addr, "/api/v1/nodes").await?;
    let at = Instant::now();
    let counter = |name: &str| status["counters"][name].as_u64().unwrap_or(0);
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let mut direct_sent = HashMap::new();
    let mut node_rates = Vec::new();
    for n in nodes.as_array().map(Vec::as_slice).unwrap_or_default() {
        let id = text(&n["id"]);
        let p = &n["paths"];
        let sent = |path: &Value| path["messages_sent"].as_u64().unwrap_or(0);
        direct_sent.insert(
            (id.clone(), text(&n["incarnation"])),
            sent(&p["lazy"]) + sent(&p["session"]),
        );
        let r = &n["rates"];
        let per_s = |name: &str| r[name].as_f64().unwrap_or(0.0);
        node_rates.push((id, per_s("messages_in_per_s"), per_s("messages_out_per_s")));
    }
    Ok(RateRead {
        at,
        messages: counter("messages"),
        message_bytes: counter("message_bytes"),
        deliveries: counter("deliveries"),
        route_failures: counter("route_failures"),
        direct_sent,
        node_rates,
    })
}

/// `routed N msg/s (B/s), delivered N/s, route failures N/s, direct N
/// msg/s; busiest: ID in N/s out N/s, ...`.
fn rate_line(then: &RateRead, now: &RateRead) -> String {
    let secs = now.at.duration_since(then.at).as_secs_f64().max(1e-3);
    // A restarted server's counters start again from 0: read that as 0.
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    // Only nodes in both reads count: one that joined or left between
    // them has no window.
    let direct: u64 = now
        .direct_sent
        .iter()
        .filter_map(|(key, sent)| {
            then.direct_sent
                .get(key)
                .map(|was| sent.saturating_sub(*was))
        })
        .sum();
    let mut line = format!(
        "routed {} msg/s ({}/s), delivered {}/s, route failures {}/s, direct {} msg/s",
        round(per_s(then.messages, now.messages)),
        bytes(per_s(then.message_bytes, now.message_bytes)),
        round(per_s(then.deliveries, now.deliveries)),
        round(per_s(then.route_failures, now.route_failures)),
        round(direct as f64 / secs),
    );
    let mut busiest: Vec<&(String, f64, f64)> = now
        .node_rates
        .iter()
        .filter(|(_, i, o)| i + o > 0.0)
        .collect();
    busiest.sort_by(|a, b| (b.1 + b.2).total_cmp(&(a.1 + a.2)));
    if !busiest.is_empty() {
        line.push_str("; busiest:");
        for (i, (id, msgs_in, msgs_out)) in busiest.iter().take(BUSIEST_SHOWN).enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            line.push_str(&format!(
                "{sep}{id} in {}/s out {}/s",
                round(*msgs_in),
                round(*msgs_out)
            ));
        }
    }
    line
}

fn round(per_s: f64) -> String {
    format!("{:.0}", per_s)
}

fn bytes(per_s: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = per_s;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// How a test message is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Acknowledged: prints the delivery report.
    Send,
    /// One way: prints that it was handed over.
    Notify,
    /// A request: prints the reply.
    Request,
}

/// `send`, `notify` or `request`: one test message. A failed delivery is
/// this command's error.
pub async fn message(join: &Join, kind: Kind, message: &Message) -> anyhow::Result<()> {
    let body = message.body()?;
    let node = join.start().await?;
    // Fresh from registration, the node already knows every member.
    let result = send(&node, kind, message, body).await;
    node.shutdown().await;
    result
}

async fn send(node: &Node, kind: Kind, message: &Message, body: Bytes) -> anyhow::Result<()> {
    let (to, service) = (message.to.clone(), message.service.as_str());
    match kind {
        Kind::Send => {
            let report = node
                .send(to.clone(), service, body)
                .await
                .with_context(|| format!("sending to {to}"))?;
            for id in &report.delivered {
                println!("delivered to {id}");
            }
            for (id, why) in &report.failed {
                println!("not delivered to {id}: {why}");
            }
            if !report.is_complete() {
                bail!(
                    "{} of {} receivers did not accept it",
                    report.failed.len(),
                    report.failed.len() + report.delivered.len()
                );
            }
        }
        Kind::Notify => {
            node.notify(to.clone(), service, body)
                .await
                .with_context(|| format!("notifying {to}"))?;
            println!("notified {to}");
        }
        Kind::Request => {
            let reply = node
                .request(to.clone(), service, body)
                .await
                .with_context(|| format!("requesting from {to}"))?;
            println!(
                "reply from {}: {}",
                reply.from,
                String::from_utf8_lossy(&reply.body)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(
        at: Instant,
        messages: u64,
        direct: &[(&str, u64)],
        nodes: &[(&str, f64, f64)],
    ) -> RateRead {
        RateRead {
            at,
            messages,
            message_bytes: messages * 2048,
            deliveries: messages * 2,
            route_failures: 0,
            direct_sent: direct
                .iter()
                .map(|(id, n)| ((id.to_string(), "1".to_owned()), *n))
                .collect(),
            node_rates: nodes
                .iter()
                .map(|(id, i, o)| (id.to_string(), *i, *o))
                .collect(),
        }
    }

    #[test]
    fn rate_lines_are_changes_per_second_with_the_busiest_nodes() {
        let at = Instant::now();
        let then = read(at, 1000, &[("a", 10), ("gone", 5)], &[]);
        let now = read(
            at + Duration::from_secs(2),
            3000,
            &[("a", 410), ("new", 999)],
            &[
                ("a", 10.0, 0.0),
                ("b", 500.0, 400.0),
                ("c", 0.0, 0.0),
                ("d", 1.0, 1.0),
                ("e", 3.0, 0.0),
            ],
        );
        assert_eq!(
            rate_line(&then, &now),
            "routed 1000 msg/s (2.0 MiB/s), delivered 2000/s, route failures 0/s, \
             direct 200 msg/s; busiest: b in 500/s out 400/s, a in 10/s out 0/s, e in 3/s out 0/s"
        );
        // A server restarted between reads: its counters went back.
        let restarted = read(at + Duration::from_secs(3), 10, &[], &[]);
        assert_eq!(
            rate_line(&now, &restarted),
            "routed 0 msg/s (0 B/s), delivered 0/s, route failures 0/s, direct 0 msg/s"
        );
    }

    #[test]
    fn targets_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_target("all"), Ok(Target::All));
        assert_eq!(parse_target("node:a"), Ok(Target::Node(NodeId::new("a"))));
        assert_eq!(parse_target("group:web"), Ok(Target::Group("web".into())));
        assert_eq!(parse_target("any:web"), Ok(Target::AnyOf("web".into())));
        for bad in ["", "node:", "web", "host:a"] {
            let err = parse_target(bad).expect_err(bad);
            assert!(
                err.contains("node:ID, group:NAME, any:GROUP or all"),
                "{err}"
            );
        }
    }
}
