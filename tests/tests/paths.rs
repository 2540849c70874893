//! Which path a message takes (message server, lazy channel, session
//! channel), proven with the counters on both ends: the sender's
//! [`PathCounters`] say where it sent, the message server's counters say
//! what passed through it.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clustercomm_tests::{bounded, init_logging, spawn_test_node, test_config, TestServer};
use node_runtime::{Config, Inbox, Message, Node, NodeId, PathCounters, Role, SendError, Target};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The lazy threshold of most tests here.
const THRESHOLD: u64 = 16 * KIB;

/// A test config with `lazy.threshold_bytes = threshold` and
/// auto-activation off, so that only size and the allow-list decide.
fn lazy_config(threshold: u64) -> Config {
    let mut config = test_config();
    config.lazy.threshold_bytes = threshold;
    config.lazy.auto_activate_messages = 0;
    config
}

async fn start(
    server: &TestServer,
    id: &str,
    config: Config,
    groups: &[&str],
    role: Role,
) -> anyhow::Result<Node> {
    Node::builder(id)
        .config(config)
        .message_server(server.addr)
        .groups(groups.iter().copied())
        .role(role)
        .start()
        .await
        .with_context(|| format!("starting {id}"))
}

/// A body of `len` bytes with a pattern that depends on `seed`, so that a
/// truncated, shifted or swapped body does not compare equal.
fn body(len: u64, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn ids(list: &[&str]) -> Vec<NodeId> {
    list.iter().map(NodeId::new).collect()
}

async fn recv(inbox: &mut Inbox) -> anyhow::Result<Message> {
    inbox.recv().await.context("inbox closed")
}

/// Polls `condition` every few milliseconds; the caller's `bounded` caps
/// the wait.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let started = Instant::now();
    while !condition() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eprintln!("{what}: after {:?}", started.elapsed());
    Ok(())
}

/// Waits until `node` sees `peer` as a member (and so knows its role,
/// groups and direct address).
async fn wait_for_member(node: &Node, peer: &str) -> anyhow::Result<()> {
    wait_until(&format!("{} sees {peer}", node.id()), || {
        node.members().iter().any(|m| m.id == peer)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_decides_between_server_and_lazy_channel() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let a = start(&server, "a", lazy_config(THRESHOLD), &[], Role::Server).await?;
        let b = start(&server, "b", lazy_config(THRESHOLD), &[], Role::Server).await?;
        let mut inbox = b.subscribe("svc").await?;
        let to_b = Target::Node("b".into());

        // Exactly the threshold: through the message server.
        let at = body(THRESHOLD, 1);
        let before = server.handle.counters();
        let report = a.send(to_b.clone(), "svc", at.clone()).await?;
        assert_eq!(report.delivered, ids(&["b"]));
        let after = server.handle.counters();
        assert_eq!(after.messages - before.messages, 1, "{after:?}");
        assert_eq!(after.message_bytes - before.message_bytes, THRESHOLD);
        assert_eq!(
            a.counters(),
            PathCounters {
                server_messages: 1,
                server_bytes: THRESHOLD,
                ..PathCounters::default()
            }
        );

        // One byte more: over a lazy channel, not through the server.
        let over = body(THRESHOLD + 1, 2);
        let before = server.handle.counters();
        let report = a.send(to_b.clone(), "svc", over.clone()).await?;
        assert_eq!(report.delivered, ids(&["b"]));
        let after = server.handle.counters();
        assert_eq!(after.messages, before.messages, "{after:?}");
        assert_eq!(
            after.message_bytes, before.message_bytes,
            "the message server carried the large body"
        );
        assert_eq!(
            a.counters(),
            PathCounters {
                server_messages: 1,
                server_bytes: THRESHOLD,
                lazy_messages: 1,
                lazy_bytes: THRESHOLD + 1,
                lazy_opened: 1,
                ..PathCounters::default()
            }
        );

        // Both arrived intact, each on the path the sender counted.
        let first = recv(&mut inbox).await?;
        assert_eq!(first.sender(), "a");
        assert_eq!(first.body(), &at);
        let second = recv(&mut inbox).await?;
        assert_eq!(second.body(), &over);
        let received = b.counters();
        assert_eq!(received.received_server, 1, "{received:?}");
        assert_eq!(received.received_direct, 1, "{received:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_off_the_allow_list_stay_on_the_server_path() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let mut config = lazy_config(THRESHOLD);
        config.lazy.services = vec!["bulk".into()];
        let a = start(&server, "a", config.clone(), &[], Role::Server).await?;
        let b = start(&server, "b", config, &[], Role::Server).await?;
        let mut svc = b.subscribe("svc").await?;
        let mut bulk = b.subscribe("bulk").await?;
        let to_b = Target::Node("b".into());
        let large = body(4 * THRESHOLD, 3);

        // A large body for a service not on the list: the server carries it.
        let before = server.handle.counters();
        a.send(to_b.clone(), "svc", large.clone()).await?;
        let after = server.handle.counters();
        assert_eq!(after.messages - before.messages, 1);
        assert_eq!(after.message_bytes - before.message_bytes, 4 * THRESHOLD);
        assert_eq!(
            a.counters(),
            PathCounters {
                server_messages: 1,
                server_bytes: 4 * THRESHOLD,
                ..PathCounters::default()
            }
        );
        assert_eq!(recv(&mut svc).await?.body(), &large);

        // The same body for a listed service goes direct...
        let before = server.handle.counters();
        a.send(to_b.clone(), "bulk", large.clone()).await?;
        assert_eq!(server.handle.counters().messages, before.messages);
        let c = a.counters();
        assert_eq!((c.lazy_opened, c.lazy_messages), (1, 1), "{c:?}");
        assert_eq!(recv(&mut bulk).await?.body(), &large);

        // ...and an open channel to the node does not pull the unlisted
        // service onto it.
        let before = server.handle.counters();
        a.send(to_b.clone(), "svc", large.clone()).await?;
        a.send(to_b, "svc", "small").await?;
        let after = server.handle.counters();
        assert_eq!(after.messages - before.messages, 2);
        let c = a.counters();
        assert_eq!((c.server_messages, c.lazy_messages), (3, 1), "{c:?}");
        assert_eq!(recv(&mut svc).await?.body(), &large);
        assert_eq!(recv(&mut svc).await?.body(), "small");
        Ok(())
    })
    .await
}

/// Auto-activation after this many messages within the window.
const HOT_LIMIT: u64 = 20;
/// Small messages sent over the auto-activated channel.
const HOT_AFTER: u64 = 10;

/// Two nodes whose pair went hot and whose lazy channel then closed as
/// idle.
struct CooledPair {
    server: TestServer,
    a: Node,
    _b: Node,
    inbox: Inbox,
}

fn numbered(n: u64) -> Bytes {
    Bytes::copy_from_slice(&n.to_be_bytes())
}

/// Sends small acknowledged messages from a to b one after another until
/// the pair is hot, checking the path of each, then waits for the lazy
/// channel to close as idle.
async fn heat_up_and_cool_down() -> anyhow::Result<CooledPair> {
    let server = TestServer::start(test_config()).await?;
    let mut config = test_config();
    config.lazy.auto_activate_messages = HOT_LIMIT;
    config.lazy.auto_activate_window_ms = 10_000;
    config.lazy.idle_close_ms = 300;
    let a = start(&server, "a", config.clone(), &[], Role::Server).await?;
    let b = start(&server, "b", config, &[], Role::Server).await?;
    let mut inbox = b.subscribe("svc").await?;
    let to_b = Target::Node("b".into());

    // Up to the limit: through the message server.
    for n in 0..HOT_LIMIT {
        a.send(to_b.clone(), "svc", numbered(n)).await?;
        let c = a.counters();
        assert_eq!(
            (c.server_messages, c.lazy_opened, c.lazy_messages),
            (n + 1, 0, 0),
            "message {n}: {c:?}"
        );
    }
    // Past it: the pair is hot, a lazy channel opens and carries the small
    // messages too.
    let server_before = server.handle.counters().messages;
    for n in HOT_LIMIT..HOT_LIMIT + HOT_AFTER {
        a.send(to_b.clone(), "svc", numbered(n)).await?;
        let c = a.counters();
        assert_eq!(
            (c.server_messages, c.lazy_opened, c.lazy_messages),
            (HOT_LIMIT, 1, n + 1 - HOT_LIMIT),
            "message {n}: {c:?}"
        );
    }
    assert_eq!(server.handle.counters().messages, server_before);
    // In order, each once, across the switch.
    for n in 0..HOT_LIMIT + HOT_AFTER {
        assert_eq!(recv(&mut inbox).await?.body(), &numbered(n));
    }
    let received = b.counters();
    assert_eq!(
        (received.received_server, received.received_direct),
        (HOT_LIMIT, HOT_AFTER)
    );

    // Nothing more to send: the channel closes as idle.
    wait_until("lazy channel closed as idle", || {
        a.counters().lazy_closed == 1
    })
    .await?;
    Ok(CooledPair {
        server,
        a,
        _b: b,
        inbox,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_pair_gets_a_lazy_channel_which_closes_when_idle() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let pair = heat_up_and_cool_down().await?;
        let c = pair.a.counters();
        assert_eq!(
            (c.lazy_opened, c.lazy_closed, c.lazy_failed),
            (1, 1, 0),
            "{c:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_idle_close_small_messages_go_through_the_server_again() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let mut pair = heat_up_and_cool_down().await?;
        let server_before = pair.server.handle.counters().messages;
        pair.a
            .send(Target::Node("b".into()), "svc", numbered(99))
            .await?;
        let c = pair.a.counters();
        assert_eq!(
            (c.server_messages, c.lazy_messages, c.lazy_opened),
            (HOT_LIMIT + 1, HOT_AFTER, 1),
            "after the idle close: {c:?}"
        );
        assert_eq!(pair.server.handle.counters().messages, server_before + 1);
        assert_eq!(recv(&mut pair.inbox).await?.body(), &numbered(99));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_sends_open_one_channel() -> anyhow::Result<()> {
    init_logging();
    const TASKS: usize = 16;
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let a = start(&server, "a", lazy_config(THRESHOLD), &[], Role::Server).await?;
        let b = start(&server, "b", lazy_config(THRESHOLD), &[], Role::Server).await?;
        let mut inbox = b.subscribe("svc").await?;
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for i in 0..TASKS {
            let (a, barrier) = (a.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                a.send(
                    Target::Node("b".into()),
                    "svc",
                    body(8 * THRESHOLD, i as u8),
                )
                .await
            }));
        }
        for task in tasks {
            let report = task.await??;
            assert_eq!(report.delivered, ids(&["b"]));
        }
        let c = a.counters();
        assert_eq!(c.lazy_opened, 1, "{c:?}");
        assert_eq!(c.lazy_failed, 0, "{c:?}");
        assert_eq!(c.lazy_messages, TASKS as u64, "{c:?}");
        assert_eq!(c.server_messages, 0, "{c:?}");
        assert_eq!(server.handle.counters().messages, 0);
        let mut seeds: Vec<u8> = Vec::new();
        for _ in 0..TASKS {
            let m = recv(&mut inbox).await?;
            let seed = m.body()[0];
            assert_eq!(m.body(), &body(8 * THRESHOLD, seed));
            seeds.push(seed);
        }
        seeds.sort_unstable();
        assert_eq!(seeds, (0..TASKS as u8).collect::<Vec<_>>());
        Ok(())
    })
    .await
}

/// An address nobody listens on: a port bound, then released.
fn closed_port() -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_direct_address_falls_back_to_the_server() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let a = start(&server, "a", lazy_config(THRESHOLD), &[], Role::Server).await?;
        let mut config = lazy_config(THRESHOLD);
        config.node.direct_advertise = Some(closed_port()?);
        let b = start(&server, "b", config, &[], Role::Server).await?;
        let mut inbox = b.subscribe("svc").await?;
        wait_for_member(&a, "b").await?;

        let large = body(8 * THRESHOLD, 4);
        assert!(large.len() as u64 <= a.server_max_message_bytes());
        let before = server.handle.counters();
        let report = a
            .send(Target::Node("b".into()), "svc", large.clone())
            .await?;
        assert_eq!(report.delivered, ids(&["b"]));
        let c = a.counters();
        assert_eq!(
            c,
            PathCounters {
                server_messages: 1,
                server_bytes: 8 * THRESHOLD,
                lazy_failed: 1,
                ..PathCounters::default()
            }
        );
        let after = server.handle.counters();
        assert_eq!(after.messages - before.messages, 1);
        assert_eq!(after.message_bytes - before.message_bytes, 8 * THRESHOLD);
        assert_eq!(recv(&mut inbox).await?.body(), &large);
        assert_eq!(b.counters().received_server, 1);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_direct_address_and_body_over_server_limit_fails_fast() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        const SERVER_MAX: u64 = 64 * KIB;
        let mut server_config = test_config();
        server_config.limits.max_message_bytes = SERVER_MAX;
        let server = TestServer::start(server_config).await?;
        // Nodes keep the default 64 MiB limit.
        let a = start(&server, "a", lazy_config(THRESHOLD), &[], Role::Server).await?;
        assert_eq!(a.server_max_message_bytes(), SERVER_MAX);
        let mut config = lazy_config(THRESHOLD);
        config.node.direct_advertise = Some(closed_port()?);
        let b = start(&server, "b", config, &[], Role::Server).await?;
        let _b_inbox = b.subscribe("svc").await?;
        let c = start(&server, "c", lazy_config(THRESHOLD), &[], Role::Server).await?;
        let mut c_inbox = c.subscribe("svc").await?;
        wait_for_member(&a, "b").await?;
        wait_for_member(&a, "c").await?;

        let large = body(2 * SERVER_MAX, 5);
        let started = Instant::now();
        let result = a.send(Target::Node("b".into()), "svc", large.clone()).await;
        let took = started.elapsed();
        match result {
            Err(SendError::DirectUnavailable { node, reason }) => {
                assert_eq!(node, "b");
                eprintln!("DirectUnavailable after {took:?}: {reason}");
            }
            other => bail!("expected DirectUnavailable, got {other:?}"),
        }
        ensure!(
            took < a.config().connect_timeout(),
            "the failure took {took:?}"
        );
        let counters = a.counters();
        assert_eq!(
            counters,
            PathCounters {
                lazy_failed: 1,
                ..PathCounters::default()
            }
        );
        assert_eq!(
            server.handle.counters().messages,
            0,
            "nothing reached the server"
        );

        // A reachable node gets the same body over its lazy channel.
        a.send(Target::Node("c".into()), "svc", large.clone())
            .await?;
        assert_eq!(recv(&mut c_inbox).await?.body(), &large);
        let counters = a.counters();
        assert_eq!((counters.lazy_opened, counters.lazy_messages), (1, 1));
        assert_eq!(server.handle.counters().messages, 0);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_killed_during_a_large_transfer_fails_the_send() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let mut receiver = spawn_test_node(server.addr, "victim", "bulk").await?;
        let mut sender_config = config.clone();
        sender_config.limits.max_message_bytes = 128 * MIB;
        let sender = start(&server, "sender", sender_config, &[], Role::Server).await?;
        wait_for_member(&sender, "victim").await?;

        let huge = Bytes::from(vec![0x5a_u8; (64 * MIB) as usize]);
        let send = tokio::spawn({
            let sender = sender.clone();
            async move {
                let result = sender
                    .send(Target::Node("victim".into()), "bulk", huge)
                    .await;
                (result, Instant::now())
            }
        });
        wait_until("lazy channel to the victim opened", || {
            sender.counters().lazy_opened == 1
        })
        .await?;
        receiver.child.start_kill()?;
        let killed_at = Instant::now();
        let (result, ended_at) = send.await?;
        let after = ended_at.saturating_duration_since(killed_at);
        eprintln!("the send ended {after:?} after the kill: {result:?}");
        match result {
            Ok(report) => bail!("the send succeeded although the receiver was killed: {report:?}"),
            Err(SendError::Disconnected) | Err(SendError::TargetStopped { .. }) => {}
            Err(e) => bail!("unexpected error: {e}"),
        }
        ensure!(
            after <= config.failure_timeout(),
            "the sender learnt of the kill after {after:?}"
        );
        let c = sender.counters();
        assert_eq!(
            (c.lazy_opened, c.lazy_messages, c.server_messages),
            (1, 1, 0)
        );
        assert_eq!(server.handle.counters().messages, 0);
        assert_eq!(sender.pending(), 0);
        receiver.kill().await.ok();
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_sends_over_session_channels_to_its_group() -> anyhow::Result<()> {
    init_logging();
    const COUNT: u32 = 1_000;
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let config = test_config();
        // One server before the dispatcher starts, the others after.
        let s1 = start(&server, "s1", config.clone(), &["web"], Role::Server).await?;
        let mut inbox = s1.subscribe("svc").await?;
        let d = start(&server, "d", config.clone(), &["web"], Role::Dispatcher).await?;
        let _s2 = start(&server, "s2", config.clone(), &["web"], Role::Server).await?;
        let _s3 = start(&server, "s3", config, &["other"], Role::Server).await?;
        wait_until("two session channels open", || {
            d.counters().session_opened == 2
        })
        .await?;
        wait_for_member(&d, "s3").await?;

        let before = server.handle.counters();
        let s1_id = NodeId::new("s1");
        for n in 0..COUNT {
            d.session(&s1_id, "svc", Bytes::copy_from_slice(&n.to_be_bytes()))
                .await?;
        }
        for n in 0..COUNT {
            let m = recv(&mut inbox).await?;
            let got = u32::from_be_bytes(m.body()[..].try_into().context("4-byte body")?);
            ensure!(got == n, "expected message {n}, got {got}");
            assert_eq!(m.sender(), "d");
        }
        let c = d.counters();
        assert_eq!(c.session_messages, u64::from(COUNT), "{c:?}");
        assert_eq!(c.session_bytes, 4 * u64::from(COUNT), "{c:?}");
        assert_eq!((c.session_opened, c.session_failed), (2, 0), "{c:?}");
        assert_eq!((c.server_messages, c.lazy_messages), (0, 0), "{c:?}");
        let after = server.handle.counters();
        assert_eq!(after.messages, before.messages, "{after:?}");
        assert_eq!(s1.counters().received_direct, u64::from(COUNT));
        // Nothing duplicated: the next message on the channel is the next
        // one sent.
        d.session(&s1_id, "svc", "end").await?;
        assert_eq!(recv(&mut inbox).await?.body(), "end");

        // Not across groups, and not from a server.
        assert_eq!(
            d.session(&NodeId::new("s3"), "svc", "x").await,
            Err(SendError::NotInSessionGroup {
                node: NodeId::new("s3")
            })
        );
        assert_eq!(
            s1.session(&NodeId::new("s2"), "svc", "x").await,
            Err(SendError::NotADispatcher)
        );
        assert_eq!(d.counters().session_opened, 2);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_group_fan_out_goes_over_one_lazy_channel_per_member() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let a = start(&server, "a", lazy_config(THRESHOLD), &[], Role::Server).await?;
        let mut members = Vec::new();
        for id in ["m1", "m2", "m3"] {
            let node = start(&server, id, lazy_config(THRESHOLD), &["bulk"], Role::Server).await?;
            let inbox = node.subscribe("svc").await?;
            members.push((node, inbox));
        }

        let large = body(8 * THRESHOLD, 6);
        let before = server.handle.counters();
        let report = a
            .send(Target::Group("bulk".into()), "svc", large.clone())
            .await?;
        assert_eq!(report.delivered, ids(&["m1", "m2", "m3"]));
        assert!(report.failed.is_empty(), "{report:?}");
        let c = a.counters();
        assert_eq!(
            c,
            PathCounters {
                lazy_messages: 3,
                lazy_bytes: 3 * 8 * THRESHOLD,
                lazy_opened: 3,
                ..PathCounters::default()
            }
        );
        let after = server.handle.counters();
        assert_eq!(after.messages, before.messages, "{after:?}");
        assert_eq!(after.message_bytes, before.message_bytes, "{after:?}");

        // Each member got it once: the next message on each channel is the
        // next one sent.
        let marker = body(8 * THRESHOLD, 7);
        a.send(Target::Group("bulk".into()), "svc", marker.clone())
            .await?;
        for (node, inbox) in &mut members {
            assert_eq!(recv(inbox).await?.body(), &large, "{}", node.id());
            assert_eq!(recv(inbox).await?.body(), &marker, "{}", node.id());
            assert_eq!(node.counters().received_direct, 2, "{}", node.id());
        }
        assert_eq!(a.counters().lazy_opened, 3, "channels are reused");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_channel_is_reopened_when_its_server_comes_back() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let mut config = test_config();
        config.message_server.reconnect_delay_ms = 50;
        let server = TestServer::start(config.clone()).await?;
        let d = start(&server, "d", config, &["web"], Role::Dispatcher).await?;
        let mut s1 =
            clustercomm_tests::spawn_test_node_with(server.addr, "s1", "svc", &["--groups", "web"])
                .await?;
        wait_until("session to s1 open", || d.counters().session_opened == 1).await?;
        d.session(&"s1".into(), "svc", "first").await?;

        // The server node dies: the channel breaks. A new s1 process joins
        // (a new incarnation) and the dispatcher opens a new session to it.
        s1.kill().await?;
        wait_until("s1 gone", || !d.members().iter().any(|m| m.id == "s1")).await?;
        let _s1 =
            clustercomm_tests::spawn_test_node_with(server.addr, "s1", "svc", &["--groups", "web"])
                .await?;
        wait_until("session to the new s1 open", || {
            d.counters().session_opened == 2
        })
        .await?;
        d.session(&"s1".into(), "svc", "second").await?;
        let c = d.counters();
        assert_eq!((c.session_messages, c.server_messages), (2, 0));
        Ok(())
    })
    .await
}
