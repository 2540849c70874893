//! The subcommands that join the cluster as a short-lived node: `members`,
//! `watch`, `send`, `notify` and `request`. The node's id is
//! `clustercomm-<pid>`; it leaves with a goodbye when the command ends.

use std::path::PathBuf;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use node_runtime::{
    Config, EventsError, LeaveReason, MemberInfo, MembershipEvent, Node, NodeId, Role, Target,
};

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
    let or_dash = |v: &[String]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(",")
        }
    };
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

/// `watch`: the members now, then every membership event as it comes,
/// until ctrl-c.
pub async fn watch(join: &Join) -> anyhow::Result<()> {
    let node = join.start().await?;
    let mut events = node.membership_events();
    for m in node.members().iter().filter(|m| &m.id != node.id()) {
        println!("member  {}", member_line(m));
    }
    println!("watching (ctrl-c to stop)");
    loop {
        let event = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
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
