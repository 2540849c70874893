//! Every way a send can fail ends in the right error at the sender, in
//! bounded time: unknown targets, missing services, oversized bodies, a
//! receiver killed mid-stream, a slow receiver, a refused handshake, and no
//! message server at all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clustercomm_tests::{bounded, init_logging, spawn_test_node, test_config, TestServer};
use node_runtime::{Config, Node, NodeError, SendError, Target};
use transports::handshake::HandshakeError;
use transports::protocol::RefusalReason;

async fn node(server: &TestServer, id: &str, config: Config) -> anyhow::Result<Node> {
    Ok(Node::builder(id)
        .config(config)
        .message_server(server.addr)
        .groups(["g"])
        .start()
        .await?)
}

/// A fresh server (no node has rejoined it) answers an unknown target at
/// once, however long the failure timeout: only a server that nodes come
/// back to after a restart or failover holds messages for members not
/// back yet (the failover tests cover that side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_server_answers_unknown_targets_at_once() -> anyhow::Result<()> {
    init_logging();
    let mut config = test_config();
    // A hold would last this long, and the send wait as long.
    config.cluster.failure_timeout_ms = 120_000;
    config.cluster.heartbeat_interval_ms = 1_000;
    config.node.send_timeout_ms = 120_000;
    let server = TestServer::start(config.clone()).await?;
    let a = node(&server, "a", config.clone()).await?;
    // Well within the hold: answered, not held.
    let answered = tokio::time::timeout(
        Duration::from_secs(20),
        a.send(Target::Node("misspelled".into()), "svc", "x"),
    )
    .await
    .context("a fresh server held a message to an unknown node")?;
    assert_eq!(
        answered.expect_err("no such node"),
        SendError::UnknownTarget(Target::Node("misspelled".into()))
    );
    a.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_targets_and_missing_services_are_definite_errors() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let a = node(&server, "a", test_config()).await?;
        let b = node(&server, "b", test_config()).await?;
        let mut inbox = b.subscribe("svc").await?;

        let cases: Vec<(Target, &str, SendError)> = vec![
            (
                Target::Node("ghost".into()),
                "svc",
                SendError::UnknownTarget(Target::Node("ghost".into())),
            ),
            (
                Target::Group("nogroup".into()),
                "svc",
                SendError::UnknownTarget(Target::Group("nogroup".into())),
            ),
            (
                Target::AnyOf("nogroup".into()),
                "svc",
                SendError::UnknownTarget(Target::AnyOf("nogroup".into())),
            ),
            (
                Target::Node("b".into()),
                "nobody-subscribed",
                SendError::NoSuchService {
                    target: Target::Node("b".into()),
                    service: "nobody-subscribed".into(),
                },
            ),
            (
                Target::Group("g".into()),
                "nobody-subscribed",
                SendError::NoSuchService {
                    target: Target::Group("g".into()),
                    service: "nobody-subscribed".into(),
                },
            ),
        ];
        for (target, service, expected) in cases {
            let err = a
                .send(target.clone(), service, "x")
                .await
                .expect_err("must fail");
            assert_eq!(err, expected, "{target} {service}");
            assert!(err.is_definite(), "{err}");
            let err = a
                .request(target.clone(), service, "x")
                .await
                .expect_err("must fail");
            if !matches!(target, Target::Group(_)) {
                assert_eq!(err, expected, "request to {target} {service}");
            }
        }
        assert_eq!(
            a.request(Target::All, "svc", "x").await,
            Err(SendError::InvalidTarget(Target::All))
        );
        // Delivered once, so b's reader knows the inbox...
        a.send(Target::Node("b".into()), "svc", "first").await?;
        let first = inbox.recv().await.context("the first message")?;
        assert_eq!(&first.body()[..], b"first");
        // ...and a dropped inbox unsubscribes all the same: the next send
        // says so.
        drop(inbox);
        let err = a.send(Target::Node("b".into()), "svc", "x").await;
        assert!(
            matches!(err, Err(SendError::NoSuchService { .. })),
            "{err:?}"
        );
        // Subscribed again: the new inbox gets what comes next.
        let mut again = b.subscribe("svc").await?;
        a.send(Target::Node("b".into()), "svc", "again").await?;
        let next = again
            .recv()
            .await
            .context("the message after resubscribing")?;
        assert_eq!(&next.body()[..], b"again");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_fail_before_anything_is_sent() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        const MIB: u64 = 1 << 20;
        let server = TestServer::start(test_config()).await?;
        let mut config = test_config();
        config.limits.max_message_bytes = MIB;
        config.lazy.threshold_bytes = 64 * 1024;
        let a = node(&server, "a", config.clone()).await?;
        let b = node(&server, "b", config).await?;
        let mut inbox = b.subscribe("svc").await?;
        assert_eq!(a.max_message_bytes(), MIB);

        // Over `limits.max_message_bytes`: refused before anything is sent,
        // on every path.
        let before = (server.handle.counters(), a.counters());
        let too_big = Bytes::from(vec![0u8; MIB as usize + 1]);
        let expected = Err(SendError::PayloadTooLarge {
            size: MIB + 1,
            max: MIB,
        });
        let b_id = Target::Node("b".into());
        assert_eq!(
            a.send(b_id.clone(), "svc", too_big.clone())
                .await
                .map(|_| ()),
            expected
        );
        assert_eq!(
            a.notify(b_id.clone(), "svc", too_big.clone()).await,
            expected
        );
        assert_eq!(
            a.request(b_id.clone(), "svc", too_big.clone())
                .await
                .map(|_| ()),
            expected
        );
        assert_eq!(
            a.send(Target::All, "svc", too_big.clone())
                .await
                .map(|_| ()),
            expected
        );
        assert_eq!(
            server.handle.counters().messages,
            before.0.messages,
            "nothing reached the server"
        );
        assert_eq!(a.counters(), before.1, "nothing left on any path");

        // Exactly the limit goes through.
        let at_limit = Bytes::from(vec![7u8; MIB as usize]);
        a.send(b_id, "svc", at_limit.clone()).await?;
        let got = inbox.recv().await.context("inbox")?;
        assert_eq!(got.body(), &at_limit);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_server_limit_need_a_lazy_channel() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        const MIB: u64 = 1 << 20;
        let mut server_config = test_config();
        server_config.limits.max_message_bytes = MIB;
        let server = TestServer::start(server_config).await?;
        // The nodes allow more than the server, but their service is not on
        // the lazy allow-list: the server's limit applies.
        let mut config = test_config();
        config.lazy.services = vec!["bulk".into()];
        let a = node(&server, "a", config.clone()).await?;
        let b = node(&server, "b", config).await?;
        let _inbox = b.subscribe("svc").await?;
        assert_eq!(a.server_max_message_bytes(), MIB);
        let body = Bytes::from(vec![0u8; MIB as usize + 1]);
        assert_eq!(
            a.send(Target::Node("b".into()), "svc", body.clone())
                .await
                .map(|_| ()),
            Err(SendError::PayloadTooLarge {
                size: MIB + 1,
                max: MIB
            })
        );
        // Nothing reached the server.
        assert_eq!(server.handle.counters().messages, 0);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_killed_mid_stream_fails_the_sender_within_the_failure_timeout(
) -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let failure_timeout = config.failure_timeout();
        let server = TestServer::start(config.clone()).await?;
        let mut receiver = spawn_test_node(server.addr, "victim", "svc").await?;
        let sender = node(&server, "sender", config).await?;

        // Stream acknowledged messages with many in flight.
        let target = Target::Node("victim".into());
        let mut window = std::collections::VecDeque::new();
        let mut acked = 0u64;
        let mut killed_at: Option<Instant> = None;
        let mut first_error: Option<(SendError, Duration)> = None;
        let body = Bytes::from(vec![1u8; 512]);
        while first_error.is_none() {
            if acked >= 2_000 && killed_at.is_none() {
                receiver.signal("KILL").await?;
                killed_at = Some(Instant::now());
            }
            match sender.submit(target.clone(), "svc", body.clone()).await {
                Ok(p) => window.push_back(p),
                Err(e) => {
                    let since = killed_at.context("error before the kill")?.elapsed();
                    first_error = Some((e, since));
                    break;
                }
            }
            if window.len() >= 256 {
                let p = window.pop_front().context("window")?;
                match p.outcome().await {
                    Ok(_) => acked += 1,
                    Err(e) => {
                        let since = killed_at
                            .with_context(|| format!("error before the kill: {e}"))?
                            .elapsed();
                        first_error = Some((e, since));
                    }
                }
            }
        }
        let (error, after) = first_error.context("an error")?;
        eprintln!("after {acked} acknowledged messages and the kill, the sender got: {error} ({after:?} after the kill)");
        // The receiver may have been reconnecting: it gets the failure
        // timeout to come back, and the sender hears within a second more.
        let bound = failure_timeout + Duration::from_secs(1);
        ensure!(
            after <= bound,
            "the sender learnt of the kill after {after:?}, over {bound:?}"
        );
        assert!(
            matches!(
                error,
                SendError::TargetStopped { in_flight: true, .. } | SendError::UnknownTarget(_)
            ),
            "{error}"
        );
        // Everything still in flight ends in an error too, none hangs.
        for p in window {
            match p.outcome().await {
                Ok(_) => {}
                Err(SendError::TargetStopped { .. }) | Err(SendError::UnknownTarget(_)) => {}
                Err(e) => bail!("unexpected error for an in-flight message: {e}"),
            }
        }
        assert_eq!(sender.pending(), 0);
        receiver.kill().await.ok();
        Ok(())
    })
    .await
}

/// Outcomes of acknowledged sends, counted as they resolve.
#[derive(Default)]
struct Outcomes {
    delivered: AtomicUsize,
    overloaded: AtomicUsize,
    /// `Busy`: the receiver was busy (its inbox reached `busy_upper`) and
    /// full, or stayed busy for the send's whole timeout.
    busy: AtomicUsize,
    /// `TargetStopped` (or `UnknownTarget`, for a send that reached the
    /// server after it cut the receiver off): the receiver was cut off
    /// (or stopped) meanwhile.
    stopped: AtomicUsize,
    other: std::sync::Mutex<Vec<String>>,
}

impl Outcomes {
    fn settled(&self) -> usize {
        self.delivered.load(Ordering::SeqCst)
            + self.overloaded.load(Ordering::SeqCst)
            + self.busy.load(Ordering::SeqCst)
            + self.stopped.load(Ordering::SeqCst)
            + self.other.lock().expect("lock").len()
    }
}

/// Submits `count` acknowledged sends and resolves each in its own task,
/// so that a send held back by a slow receiver does not hide later ones.
async fn flood(
    sender: &Node,
    to: &str,
    count: usize,
    body: Bytes,
) -> anyhow::Result<(Arc<Outcomes>, tokio::task::JoinSet<()>)> {
    let outcomes = Arc::new(Outcomes::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        // A busy receiver holds the send back, up to its timeout; one that
        // is cut off meanwhile fails it as stopped (it never left).
        let pending = match sender
            .submit(Target::Node(to.into()), "svc", body.clone())
            .await
        {
            Ok(pending) => pending,
            Err(SendError::Busy { .. }) => {
                outcomes.busy.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            Err(SendError::TargetStopped {
                in_flight: false, ..
            }) => {
                outcomes.stopped.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let outcomes = outcomes.clone();
        tasks.spawn(async move {
            match pending.outcome().await {
                Ok(_) => outcomes.delivered.fetch_add(1, Ordering::SeqCst),
                Err(SendError::Overloaded { .. }) => {
                    outcomes.overloaded.fetch_add(1, Ordering::SeqCst)
                }
                Err(SendError::Busy { .. }) => outcomes.busy.fetch_add(1, Ordering::SeqCst),
                // Stopped, or (sent after the server cut it off, while the
                // sender still counted it a member) no longer known there:
                // either way, answered, not dropped.
                Err(SendError::TargetStopped { .. } | SendError::UnknownTarget(_)) => {
                    outcomes.stopped.fetch_add(1, Ordering::SeqCst)
                }
                Err(e) => {
                    outcomes.other.lock().expect("lock").push(e.to_string());
                    0
                }
            };
        });
    }
    Ok((outcomes, tasks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_inbox_answers_busy_or_overloaded_and_never_blocks_the_node() -> anyhow::Result<()> {
    init_logging();
    const COUNT: usize = 300;
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let mut config = test_config();
        config.node.inbox_capacity = 4;
        config.node.inbox_wait_ms = 200;
        let sender = node(&server, "sender", config.clone()).await?;
        let mut replies = sender.subscribe("back").await?;
        let slow = node(&server, "slow", config).await?;
        let mut inbox = slow.subscribe("svc").await?;

        // The application on `slow` does not read: its inbox fills, the
        // node turns busy (busy_upper is at most the inbox's 4) and answers
        // what still comes `Busy`; the sender holds the rest back.
        let flooding = {
            let sender = sender.clone();
            tokio::spawn(async move { flood(&sender, "slow", COUNT, Bytes::from_static(b"x")).await })
        };
        while !slow.is_busy() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Its own sends still complete: a full inbox never blocks the node.
        slow.send(Target::Node("sender".into()), "back", "still here")
            .await?;
        assert_eq!(
            &replies.recv().await.context("reply")?.body()[..],
            b"still here"
        );

        // Now the application reads; every message is accounted for.
        let drain = tokio::spawn(async move {
            let mut n = 0usize;
            while tokio::time::timeout(Duration::from_secs(1), inbox.recv())
                .await
                .ok()
                .flatten()
                .is_some()
            {
                n += 1;
            }
            n
        });
        let (outcomes, mut tasks) = flooding.await??;
        while tasks.join_next().await.is_some() {}
        let received = drain.await?;
        let other = outcomes.other.lock().expect("lock").clone();
        assert!(other.is_empty(), "unexpected errors: {other:?}");
        // A slow inbox is not a cut-off: nothing stopped.
        assert_eq!(outcomes.stopped.load(Ordering::SeqCst), 0);
        let delivered = outcomes.delivered.load(Ordering::SeqCst);
        assert_eq!(outcomes.settled(), COUNT);
        eprintln!(
            "{COUNT} sends to a node that did not read at first: {delivered} delivered, {} refused busy, {} overloaded",
            outcomes.busy.load(Ordering::SeqCst),
            outcomes.overloaded.load(Ordering::SeqCst)
        );
        assert_eq!(
            received, delivered,
            "every acknowledged message, and only those, arrived"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_receiver_is_answered_for_by_the_server() -> anyhow::Result<()> {
    init_logging();
    const COUNT: usize = 400;
    bounded(async {
        let mut server_config = test_config();
        server_config.message_server.queue_frames = 64;
        server_config.message_server.queue_bytes = 256 * 1024;
        // How long the server holds a sender back before answering for a
        // receiver that makes no room.
        server_config.message_server.slow_consumer_ms = 300;
        let server = TestServer::start(server_config).await?;
        let receiver = spawn_test_node(server.addr, "frozen", "svc").await?;
        let mut config = test_config();
        config.node.send_timeout_ms = 20_000;
        let sender = node(&server, "sender", config).await?;

        // SIGSTOP: the receiver's socket fills, then its queue at the
        // server; the server answers the sender instead of dropping (and,
        // as the receiver reads nothing for slow_consumer_ms, cuts it off:
        // what it held is answered as stopped).
        receiver.signal("STOP").await?;
        let (outcomes, mut tasks) =
            flood(&sender, "frozen", COUNT, Bytes::from(vec![9u8; 32 * 1024])).await?;
        while server.handle.counters().overloaded == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        receiver.signal("CONT").await?;
        while tasks.join_next().await.is_some() {}
        let other = outcomes.other.lock().expect("lock").clone();
        assert!(other.is_empty(), "unexpected errors: {other:?}");
        let overloaded = outcomes.overloaded.load(Ordering::SeqCst);
        let (delivered, busy, stopped) = (
            outcomes.delivered.load(Ordering::SeqCst),
            outcomes.busy.load(Ordering::SeqCst),
            outcomes.stopped.load(Ordering::SeqCst),
        );
        let counters = server.handle.counters();
        assert!(
            overloaded > 0,
            "no send was answered overloaded: {delivered} delivered, {busy} busy, \
             {stopped} stopped; the server counted {} overloaded, {} slow consumers",
            counters.overloaded,
            counters.slow_consumers
        );
        assert_eq!(outcomes.settled(), COUNT, "every send got an outcome");
        assert!(counters.overloaded as usize >= overloaded);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_server_is_a_clear_error_without_hanging() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        // A port nobody listens on.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?
        };
        let config = test_config();
        let started = Instant::now();
        let result = Node::builder("lonely")
            .config(config.clone())
            .message_server(addr)
            .start()
            .await;
        let took = started.elapsed();
        match result {
            Err(e @ NodeError::Connect { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains(&addr.to_string()) && text.contains("is it running"),
                    "{text}"
                );
            }
            Err(e) => bail!("expected a connect error, got {e}"),
            Ok(_) => bail!("started without a message server"),
        }
        assert!(
            took <= config.connect_timeout() + Duration::from_secs(1),
            "{took:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusals_name_the_cause_on_both_ends() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let _a = node(&server, "a", test_config()).await?;

        // The same id while the first is live.
        match node(&server, "a", test_config()).await {
            Err(e) => match e.downcast_ref::<NodeError>() {
                Some(NodeError::Handshake {
                    source: HandshakeError::Refused { refusal },
                    ..
                }) => assert_eq!(refusal.reason, RefusalReason::DuplicateNode),
                _ => bail!("expected a duplicate refusal, got {e:#}"),
            },
            Ok(_) => bail!("a second live registration of the same id was accepted"),
        }

        // Another cluster.
        let mut other = test_config();
        other.cluster.name = "other-cluster".into();
        match node(&server, "c", other).await {
            Err(e) => match e.downcast_ref::<NodeError>() {
                Some(NodeError::Handshake {
                    source: HandshakeError::Refused { refusal },
                    ..
                }) => {
                    assert!(matches!(refusal.reason, RefusalReason::ClusterMismatch { .. }));
                    assert!(format!("{e:#}").contains("other-cluster"), "{e:#}");
                }
                _ => bail!("expected a cluster refusal, got {e:#}"),
            },
            Ok(_) => bail!("a node of another cluster was accepted"),
        }

        // Wrong credentials.
        let mut secret = test_config();
        secret.cluster.credentials = Some("s3cret".into());
        let guarded = TestServer::start(secret.clone()).await?;
        let mut wrong = secret.clone();
        wrong.cluster.credentials = Some("guess".into());
        let refused = Node::builder("d")
            .config(wrong)
            .message_server(guarded.addr)
            .start()
            .await;
        // Each end proves the secret to the other: the node finds first
        // that the server's proof is not under its secret, and says so.
        assert!(
            matches!(&refused, Err(NodeError::Handshake { source: HandshakeError::Unauthenticated(why), .. }) if why.contains("cluster.credentials")),
            "{refused:?}"
        );
        // A node without the secret is refused by the server.
        let mut none = secret.clone();
        none.cluster.credentials = None;
        let refused = Node::builder("d")
            .config(none)
            .message_server(guarded.addr)
            .start()
            .await;
        assert!(
            matches!(&refused, Err(NodeError::Handshake { source: HandshakeError::Refused { refusal }, .. }) if refusal.reason == RefusalReason::BadCredentials),
            "{refused:?}"
        );
        assert_eq!(guarded.handle.counters().connections_refused, 2);
        Node::builder("d")
            .config(secret)
            .message_server(guarded.addr)
            .start()
            .await?;

        let counters = server.handle.counters();
        assert_eq!(counters.connections_refused, 2);
        assert_eq!(counters.connections_accepted, 1);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_messages_are_slowed_down_or_reported_never_silently_lost() -> anyhow::Result<()> {
    init_logging();
    const COUNT: u64 = 400;
    bounded(async {
        let mut server_config = test_config();
        server_config.message_server.queue_frames = 64;
        server_config.message_server.queue_bytes = 256 * 1024;
        server_config.message_server.slow_consumer_ms = 300;
        let server = TestServer::start(server_config).await?;
        let mut config = test_config();
        config.node.inbox_capacity = 1;
        let sender = node(&server, "sender", config.clone()).await?;
        let slow = node(&server, "slow", config).await?;
        let mut inbox = slow.subscribe("svc").await?;

        // Unroutable one-way messages are reported back and counted.
        sender
            .notify(Target::Node("ghost".into()), "svc", "x")
            .await?;
        sender
            .notify(Target::Node("slow".into()), "unknown-service", "x")
            .await?;
        // A fast reader first: one-way messages are held back, not dropped.
        let reader = tokio::spawn(async move {
            let mut n = 0u64;
            while tokio::time::timeout(Duration::from_secs(2), inbox.recv())
                .await
                .ok()
                .flatten()
                .is_some()
            {
                n += 1;
            }
            n
        });
        let body = Bytes::from(vec![5u8; 32 * 1024]);
        for _ in 0..COUNT {
            sender
                .notify(Target::Node("slow".into()), "svc", body.clone())
                .await?;
        }
        let received = reader.await?;
        // Every one-way message either arrived or was reported.
        let reported = sender.late_failures();
        assert!(
            reported >= 2,
            "the two unroutable notifies were reported: {reported}"
        );
        assert_eq!(
            received + (reported - 2),
            COUNT,
            "received {received}, reported {reported}"
        );
        Ok(())
    })
    .await
}

/// The resend buffer is bounded in bytes as well as in messages: with
/// `node.max_in_flight_bytes` of 1 MiB, four unsettled 256 KiB messages
/// take it all; a fifth send waits for room and, with none made, fails
/// with a timeout (nothing silently dropped or grown). Letting one go
/// makes room for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resend_buffer_is_bounded_in_bytes() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let mut config = test_config();
        config.node.max_in_flight_bytes = 1 << 20;
        config.node.send_timeout_ms = 500;
        config.limits.max_message_bytes = 1 << 20;
        let b = node(&server, "b", test_config()).await?;
        let _inbox = b.subscribe("svc").await?;
        let a = node(&server, "a", config).await?;
        let body = Bytes::from(vec![7u8; 256 << 10]);
        let to_b = || Target::Node(node_runtime::NodeId::new("b"));
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(a.submit(to_b(), "svc", body.clone()).await?);
        }
        match a.submit(to_b(), "svc", body.clone()).await {
            Err(SendError::Timeout { .. }) => {}
            other => bail!("a fifth 256 KiB message past 1 MiB in flight: {other:?}"),
        }
        // A 2 KiB message needs only its own share: still no room.
        match a.submit(to_b(), "svc", Bytes::from(vec![1u8; 2048])).await {
            Err(SendError::Timeout { .. }) => {}
            other => bail!("a message past the byte bound: {other:?}"),
        }
        // A body of at most 1 KiB is bounded by the count alone.
        let small = a.submit(to_b(), "svc", Bytes::from_static(b"x")).await?;
        small.outcome().await?;
        let first = held.remove(0);
        first.outcome().await?;
        let fifth = a.submit(to_b(), "svc", body.clone()).await?;
        fifth.outcome().await?;
        for pending in held {
            pending.outcome().await?;
        }
        a.shutdown().await;
        b.shutdown().await;
        Ok(())
    })
    .await
}
