//! Acknowledged delivery to each kind of target, over real loopback
//! sockets: who gets a message, and what the sender's report says.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use bytes::Bytes;
use clustercomm_tests::{bounded, init_logging, test_config, TestServer};
use node_runtime::{MembershipEvent, Node, NodeId, Target};
use tokio::task::JoinHandle;

const SERVICE: &str = "svc";

/// Every body each node received, in order.
type Received = Arc<Mutex<Vec<(NodeId, Bytes)>>>;

struct Member {
    node: Node,
    received: Received,
    _drain: JoinHandle<()>,
}

async fn member(server: &TestServer, id: &str, groups: &[&str]) -> anyhow::Result<Member> {
    let node = Node::builder(id)
        .config(test_config())
        .message_server(server.addr)
        .groups(groups.iter().copied())
        .start()
        .await?;
    let mut inbox = node.subscribe(SERVICE).await?;
    let received: Received = Arc::default();
    let sink = received.clone();
    let drain = tokio::spawn(async move {
        while let Some(m) = inbox.recv().await {
            sink.lock()
                .expect("lock")
                .push((m.sender().clone(), m.body().clone()));
        }
    });
    Ok(Member {
        node,
        received,
        _drain: drain,
    })
}

fn ids(list: &[&str]) -> Vec<NodeId> {
    list.iter().map(NodeId::new).collect()
}

/// How many times `member` received `body`, once a marker sent after it by
/// `from` has arrived (order per sender and receiver makes the count final).
async fn count_after_marker(from: &Node, member: &Member, body: &[u8]) -> anyhow::Result<usize> {
    let marker = format!("marker-{}", from.pending() + rand_suffix());
    from.send(
        Target::Node(member.node.id().clone()),
        SERVICE,
        marker.clone(),
    )
    .await?;
    loop {
        {
            let got = member.received.lock().expect("lock");
            if got.iter().any(|(_, b)| b == marker.as_bytes()) {
                return Ok(got.iter().filter(|(_, b)| b == body).count());
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn rand_suffix() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_two_groups() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let n1 = member(&server, "n1", &["web"]).await?;
        let n2 = member(&server, "n2", &["web"]).await?;
        let n3 = member(&server, "n3", &["batch"]).await?;
        let n4 = member(&server, "n4", &["batch"]).await?;
        let all = [&n1, &n2, &n3, &n4];

        // Node: exactly the one receiver.
        let report = n1
            .node
            .send(Target::Node("n3".into()), SERVICE, "to-n3")
            .await?;
        assert_eq!(report.delivered, ids(&["n3"]));
        assert!(report.failed.is_empty());
        for m in all {
            let expected = usize::from(m.node.id() == "n3");
            assert_eq!(
                count_after_marker(&n2.node, m, b"to-n3").await?,
                expected,
                "{}",
                m.node.id()
            );
        }

        // Group: every member of the group, nobody else.
        let report = n1
            .node
            .send(Target::Group("batch".into()), SERVICE, "to-batch")
            .await?;
        assert_eq!(report.delivered, ids(&["n3", "n4"]));
        for m in all {
            let expected = usize::from(m.node.id() == "n3" || m.node.id() == "n4");
            assert_eq!(
                count_after_marker(&n2.node, m, b"to-batch").await?,
                expected,
                "{}",
                m.node.id()
            );
        }

        // AnyOf: one member each time, spread over the members.
        let mut picked: BTreeMap<NodeId, usize> = BTreeMap::new();
        for _ in 0..100 {
            let report = n1
                .node
                .send(Target::AnyOf("batch".into()), SERVICE, "to-any")
                .await?;
            ensure!(
                report.delivered.len() == 1,
                "any-of reached {:?}",
                report.delivered
            );
            *picked.entry(report.delivered[0].clone()).or_default() += 1;
        }
        assert_eq!(
            picked.keys().cloned().collect::<Vec<_>>(),
            ids(&["n3", "n4"])
        );
        assert!(picked.values().all(|&c| c > 0 && c < 100), "{picked:?}");
        for m in all {
            let got = count_after_marker(&n2.node, m, b"to-any").await?;
            assert_eq!(
                got,
                picked.get(m.node.id()).copied().unwrap_or(0),
                "{}",
                m.node.id()
            );
        }

        // All: every other node exactly once, never the sender.
        let report = n1.node.send(Target::All, SERVICE, "to-all").await?;
        assert_eq!(report.delivered, ids(&["n2", "n3", "n4"]));
        for m in all {
            let expected = usize::from(m.node.id() != "n1");
            assert_eq!(
                count_after_marker(&n2.node, m, b"to-all").await?,
                expected,
                "{}",
                m.node.id()
            );
        }

        // The server carried every one of these (no other path exists yet).
        let counters = server.handle.counters();
        assert!(counters.deliveries >= 1 + 2 + 100 + 3, "{counters:?}");
        assert_eq!(counters.route_failures, 0, "{counters:?}");
        Ok(())
    })
    .await
}

/// The message server keeps what each sender's targets resolved to; a
/// join, a new service or a departure shows in the very next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_membership_changes() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let s = member(&server, "s", &[]).await?;
        let a = member(&server, "a", &["g"]).await?;
        let group = || Target::Group("g".into());
        for _ in 0..3 {
            assert_eq!(
                s.node.send(group(), SERVICE, "1").await?.delivered,
                ids(&["a"])
            );
            assert_eq!(
                s.node.send(Target::All, SERVICE, "1").await?.delivered,
                ids(&["a"])
            );
            let any = s.node.send(Target::AnyOf("g".into()), SERVICE, "1").await?;
            assert_eq!(any.delivered, ids(&["a"]));
        }

        // b joins (registered and subscribed once `member` returns).
        let b = member(&server, "b", &["g"]).await?;
        assert_eq!(
            s.node.send(group(), SERVICE, "2").await?.delivered,
            ids(&["a", "b"])
        );
        assert_eq!(
            s.node.send(Target::All, SERVICE, "2").await?.delivered,
            ids(&["a", "b"])
        );

        // a new service on b: reachable at once, and only on b.
        let mut other = b.node.subscribe("other").await?;
        let report = s.node.send(group(), "other", "3").await?;
        assert_eq!(report.delivered, ids(&["b"]));
        let got = other.recv().await.context("b's second inbox closed")?;
        assert_eq!(&got.body()[..], b"3");

        // a stops: once its departure is known, routes leave it out.
        let mut events = s.node.membership_events();
        a.node.clone().shutdown().await;
        loop {
            if let MembershipEvent::Left { id, .. } = events.recv().await? {
                if id == "a" {
                    break;
                }
            }
        }
        assert_eq!(
            s.node.send(group(), SERVICE, "4").await?.delivered,
            ids(&["b"])
        );
        assert_eq!(
            s.node.send(Target::All, SERVICE, "4").await?.delivered,
            ids(&["b"])
        );
        let any = s.node.send(Target::AnyOf("g".into()), SERVICE, "4").await?;
        assert_eq!(any.delivered, ids(&["b"]));
        let gone = s.node.send(Target::Node("a".into()), SERVICE, "5").await;
        ensure!(
            gone.is_err(),
            "a message to a stopped node was accepted: {gone:?}"
        );

        // What reached b: every message to the group or to all since it
        // joined, once each.
        assert_eq!(count_after_marker(&s.node, &b, b"2").await?, 2);
        assert_eq!(count_after_marker(&s.node, &b, b"4").await?, 3);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_membership_events_reach_every_node() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let a = member(&server, "a", &["web"]).await?;
        let mut events = a.node.membership_events();
        let b = member(&server, "b", &["web"]).await?;
        match events.recv().await? {
            node_runtime::MembershipEvent::Joined(info) => assert_eq!(info.id, "b"),
            other => anyhow::bail!("expected b to join, got {other:?}"),
        }
        let members: Vec<NodeId> = a.node.members().into_iter().map(|m| m.id).collect();
        assert_eq!(members, ids(&["a", "b"]));
        b.node.shutdown().await;
        loop {
            match events.recv().await? {
                node_runtime::MembershipEvent::Left { id, reason, .. } => {
                    assert_eq!(id, "b");
                    assert_eq!(reason, node_runtime::LeaveReason::Stopped);
                    break;
                }
                _ => continue,
            }
        }
        let members: Vec<NodeId> = a.node.members().into_iter().map(|m| m.id).collect();
        assert_eq!(members, ids(&["a"]));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_acknowledged_in_order_each_once() -> anyhow::Result<()> {
    init_logging();
    const COUNT: u64 = 100_000;
    const WINDOW: usize = 512;
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let sender = Node::builder("sender")
            .config(test_config())
            .message_server(server.addr)
            .start()
            .await?;
        let receiver = Node::builder("receiver")
            .config(test_config())
            .message_server(server.addr)
            .start()
            .await?;
        let mut inbox = receiver.subscribe("seq").await?;
        let check = tokio::spawn(async move {
            let mut next = 0u64;
            while next < COUNT {
                let m = inbox.recv().await.context("inbox closed early")?;
                let body: [u8; 8] = m.body()[..].try_into().context("body is 8 bytes")?;
                let n = u64::from_be_bytes(body);
                ensure!(
                    n == next,
                    "expected message {next}, got {n}: out of order, lost or duplicated"
                );
                next += 1;
            }
            // Nothing more may arrive: a duplicate would show up here.
            let extra = tokio::time::timeout(Duration::from_millis(200), inbox.recv()).await;
            ensure!(extra.is_err(), "a message arrived after all {COUNT}");
            anyhow::Ok(next)
        });

        let target = Target::Node("receiver".into());
        let mut window = std::collections::VecDeque::with_capacity(WINDOW);
        let mut delivered = 0u64;
        for i in 0..COUNT {
            let pending = sender
                .submit(
                    target.clone(),
                    "seq",
                    Bytes::copy_from_slice(&i.to_be_bytes()),
                )
                .await?;
            window.push_back(pending);
            if window.len() >= WINDOW {
                let report = window.pop_front().context("window")?.outcome().await?;
                ensure!(report.delivered == ids(&["receiver"]));
                delivered += 1;
            }
        }
        for pending in window {
            pending.outcome().await?;
            delivered += 1;
        }
        assert_eq!(delivered, COUNT);
        assert_eq!(check.await??, COUNT);
        assert_eq!(sender.pending(), 0);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_releases_every_connection_when_nodes_go() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        // The server's own housekeeping tasks.
        let base = server.handle.connection_tasks();
        let mut nodes = Vec::new();
        for i in 0..6 {
            nodes.push(member(&server, &format!("n{i}"), &["g"]).await?);
        }
        nodes[0]
            .node
            .send(Target::Group("g".into()), SERVICE, "hello")
            .await?;
        assert_eq!(
            server.handle.connection_tasks(),
            base + 12,
            "a reader and a writer per node"
        );
        // Planned stops and plain drops alike, while the sender stays: the
        // routes it used must not keep the receivers' connections open.
        let sender = nodes.remove(0);
        for m in &nodes[..3] {
            m.node.clone().shutdown().await;
        }
        drop(nodes);
        while server.handle.connection_tasks() > base + 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(server.handle.members().len(), 1);
        drop(sender);
        while server.handle.connection_tasks() > base {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(server.handle.members().is_empty());
        Ok(())
    })
    .await
}
