//! Flow control: busy hysteresis. A node whose inbox reaches
//! `node.busy_upper` says so at once (heartbeats are 30 s apart here, so
//! only the immediate report can explain what the others see); `AnyOf`
//! passes it over; sends to it wait and fail `Busy` at their timeout, never
//! dropped; once it drains to `node.busy_lower` it is back in rotation and
//! the waiting send goes through. An Express send is never held back. The
//! monitor's JSON shows the state.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clustercomm_tests::{bounded, init_logging, monitor_json, test_config, TestServer};
use node_runtime::{
    Config, MembershipEvent, MembershipEvents, Node, NodeId, Priority, SendError, SendOptions,
    Target,
};
use serde_json::Value;

const UPPER: usize = 64;
const LOWER: usize = 16;

fn config() -> Config {
    let mut config = test_config();
    // Only an immediate report can tell the others in time.
    config.cluster.heartbeat_interval_ms = 30_000;
    config.cluster.failure_timeout_ms = 90_000;
    config.node.busy_upper = UPPER;
    config.node.busy_lower = LOWER;
    config.node.inbox_capacity = 128;
    config.node.send_timeout_ms = 1_000;
    config
}

async fn node(server: SocketAddr, id: &str, groups: &[&str]) -> anyhow::Result<Node> {
    Ok(Node::builder(id)
        .config(config())
        .message_server(server)
        .groups(groups.iter().copied())
        .ignore_environment()
        .start()
        .await?)
}

/// Waits for `id` to be seen busy (or not), returning when.
async fn busy_seen(events: &mut MembershipEvents, id: &str, busy: bool) -> anyhow::Result<Instant> {
    loop {
        match events.recv().await? {
            MembershipEvent::Updated(m) if m.id == *id && m.busy == busy => {
                return Ok(Instant::now())
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_node_is_spared_until_it_drains() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(config()).await?;
        let monitor =
            message_server::monitor::Monitor::bind("127.0.0.1:0".parse()?, server.handle.clone())
                .await?;
        let monitor_addr = monitor.local_addr();
        tokio::spawn(monitor.run(std::future::pending()));

        let slow = node(server.addr, "slow", &["workers", "solo"]).await?;
        let fast = node(server.addr, "fast", &["workers"]).await?;
        let client = node(server.addr, "client", &[]).await?;
        let mut slow_inbox = slow.subscribe("jobs").await?;
        let mut fast_inbox = fast.subscribe("jobs").await?;
        let fast_reader = tokio::spawn(async move {
            let mut n = 0u64;
            while fast_inbox.recv().await.is_some() {
                n += 1;
            }
            n
        });
        // The client knows both offer the service.
        let mut events = client.membership_events();
        loop {
            let offering = client
                .members()
                .iter()
                .filter(|m| m.services.iter().any(|s| s == "jobs"))
                .count();
            if offering == 2 {
                break;
            }
            events.recv().await?;
        }

        // Fill slow's inbox to the upper limit; each send is acknowledged
        // once the inbox took it.
        let to_slow = Target::Node(NodeId::new("slow"));
        for i in 0..UPPER {
            client.send(to_slow.clone(), "jobs", i.to_string()).await?;
        }
        let filled = Instant::now();
        let seen = tokio::time::timeout(Duration::from_secs(5), busy_seen(&mut events, "slow", true))
            .await
            .context("slow was not seen busy within 5 s (heartbeats are 30 s apart)")??;
        println!(
            "slow seen busy by the client {:.1} ms after its inbox reached busy_upper (target: within 50 ms)",
            seen.duration_since(filled).as_secs_f64() * 1e3
        );
        ensure!(slow.is_busy());
        ensure!(client.members().iter().any(|m| m.id == "slow" && m.busy));
        let members = monitor_json(monitor_addr, "/api/v1/members").await?;
        let shown = members
            .as_array()
            .and_then(|a| a.iter().find(|m| m["id"] == "slow"))
            .context("slow not in the monitor")?;
        ensure!(shown["busy"] == Value::Bool(true), "{shown}");
        ensure!(shown["backlog"].as_u64() == Some(UPPER as u64), "{shown}");
        let events_json = monitor_json(monitor_addr, "/api/v1/events").await?;
        ensure!(
            events_json["membership"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["kind"] == "busy" && e["node"] == "slow")),
            "{events_json}"
        );

        // AnyOf passes slow over.
        const SPARED: usize = 50;
        for i in 0..SPARED {
            let report = client
                .send(Target::AnyOf("workers".into()), "jobs", format!("any {i}"))
                .await?;
            ensure!(
                report.delivered == [NodeId::new("fast")],
                "AnyOf went to {:?} while slow was busy",
                report.delivered
            );
        }
        // A send to slow alone waits for its timeout and fails Busy; so does
        // AnyOf over a group whose only member is busy. Nothing reaches it.
        for target in [to_slow.clone(), Target::AnyOf("solo".into())] {
            let started = Instant::now();
            match client.send(target.clone(), "jobs", "held").await {
                Err(SendError::Busy { node }) => println!(
                    "{target}: Busy ({node}) after {:.0} ms (send timeout 1000 ms)",
                    started.elapsed().as_secs_f64() * 1e3
                ),
                other => bail!("{target}: {other:?}, not Busy"),
            }
        }
        ensure!(slow_inbox.len() == UPPER, "{} in slow's inbox", slow_inbox.len());
        // An Express message is not held back: busy is a backlog of data,
        // and Express passes it on every hop.
        let express = SendOptions::new().priority(Priority::Express);
        let report = client
            .send_with(to_slow.clone(), "jobs", "urgent", &express)
            .await
            .context("an Express send to a busy node")?;
        ensure!(report.delivered == [NodeId::new("slow")], "{report:?}");
        ensure!(slow.is_busy(), "slow stopped being busy meanwhile");
        ensure!(
            slow_inbox.len() == UPPER + 1,
            "{} in slow's inbox",
            slow_inbox.len()
        );

        // A send that waits while slow drains goes through.
        let waiting = {
            let client = client.clone();
            let to_slow = to_slow.clone();
            tokio::spawn(async move { client.send(to_slow, "jobs", "after").await })
        };
        let mut drained = 0;
        while slow_inbox.len() > LOWER {
            slow_inbox.recv().await.context("slow's inbox closed")?;
            drained += 1;
        }
        // The drain is seen when the receiver hands out messages.
        while slow.is_busy() {
            slow_inbox.recv().await.context("slow's inbox closed")?;
            drained += 1;
        }
        tokio::time::timeout(Duration::from_secs(5), busy_seen(&mut events, "slow", false))
            .await
            .context("slow not seen drained")??;
        let report = waiting.await??;
        ensure!(report.delivered == [NodeId::new("slow")]);
        println!("slow no longer busy after taking {drained} messages; the waiting send went through");

        // Back in rotation: with fast gone, AnyOf goes to slow (while it
        // was busy, this waited for the send timeout and failed `Busy`).
        fast.shutdown().await;
        let fast_got = fast_reader.await?;
        ensure!(fast_got >= SPARED as u64, "fast got {fast_got}");
        loop {
            if let MembershipEvent::Left { id, .. } = events.recv().await? {
                if id == "fast" {
                    break;
                }
            }
        }
        for i in 0..5 {
            let report = client
                .send(Target::AnyOf("workers".into()), "jobs", format!("again {i}"))
                .await?;
            ensure!(report.delivered == [NodeId::new("slow")], "{report:?}");
        }
        slow.shutdown().await;
        client.shutdown().await;
        server.stop().await;
        Ok(())
    })
    .await
}

/// Polls `ready` (a look at a node's state), every millisecond, for at
/// most 5 s.
async fn until(what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ready() {
        ensure!(Instant::now() < deadline, "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// With nobody watching membership events, a node makes none (see
/// `Members::set_reporting`), yet a send held back by a busy receiver
/// still wakes when the receiver drains. The receiver offers its service
/// from the start (`NodeBuilder::subscribe`): the client knows it from its
/// welcome, and its inbox, taken after the first messages came, holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_send_wakes_when_nobody_watches_membership() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(config()).await?;
        let slow = Node::builder("slow")
            .config(config())
            .message_server(server.addr)
            .ignore_environment()
            .subscribe("jobs")
            .start()
            .await?;
        let client = node(server.addr, "client", &[]).await?;
        ensure!(
            client
                .members()
                .iter()
                .any(|m| m.id == "slow" && m.services.iter().any(|s| s == "jobs")),
            "the client's welcome did not show slow offering jobs"
        );
        let to_slow = Target::Node(NodeId::new("slow"));
        for i in 0..UPPER {
            client.send(to_slow.clone(), "jobs", i.to_string()).await?;
        }
        let mut inbox = slow.take_inbox("jobs").context("slow's inbox")?;
        ensure!(slow.take_inbox("jobs").is_none(), "an inbox taken twice");
        ensure!(inbox.len() == UPPER, "{} in slow's inbox", inbox.len());
        until("slow seen busy", || {
            client.members().iter().any(|m| m.id == "slow" && m.busy)
        })
        .await?;

        let waiting = {
            let client = client.clone();
            let to_slow = to_slow.clone();
            tokio::spawn(async move { client.send(to_slow, "jobs", "after").await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        ensure!(
            !waiting.is_finished(),
            "the send to a busy node was not held"
        );
        while slow.is_busy() {
            inbox.recv().await.context("slow's inbox closed")?;
        }
        let report = waiting
            .await?
            .context("the held send, after slow drained (send timeout 1 s)")?;
        ensure!(report.delivered == [NodeId::new("slow")], "{report:?}");
        let mut got = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(1), inbox.recv()).await {
            let last = m.body() == "after";
            got.push(m);
            if last {
                break;
            }
        }
        ensure!(
            got.last().is_some_and(|m| m.body() == "after"),
            "the held message did not arrive"
        );
        slow.shutdown().await;
        client.shutdown().await;
        server.stop().await;
        Ok(())
    })
    .await
}

/// A service offered from the start is checked before anything connects.
#[tokio::test]
async fn a_bad_service_offered_from_the_start_fails_the_start() -> anyhow::Result<()> {
    let unreachable = "127.0.0.1:1";
    for (builder, expected) in [
        (Node::builder("n").subscribe(""), "InvalidName"),
        (Node::builder("n").subscribe("clustercomm.mine"), "Reserved"),
        (
            Node::builder("n").subscribe("jobs").subscribe("jobs"),
            "AlreadySubscribed",
        ),
    ] {
        let err = builder
            .config(config())
            .message_server(unreachable)
            .ignore_environment()
            .start()
            .await
            .err()
            .context("started")?;
        ensure!(
            format!("{err:?}").starts_with(expected),
            "{err:?}, not {expected}"
        );
    }
    Ok(())
}
