//! The dead-letter queue, TTL and retry policies (issue 19): every reason
//! reaches the message server's queue with its original sender, target,
//! service and time; another node browses, takes and replays entries; a
//! message expires at each place it can wait and is never delivered after;
//! a retry policy waits as it says, then dead-letters; and the queue
//! survives a restart of the message server with `message_server.data_dir`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clustercomm_tests::{
    bounded, init_logging, next_message, test_config, wait_until, ConfigFile, DataDir, TestServer,
};
use node_runtime::{
    AckMode, Config, DeadLetter, DeadReason, NodeId, RetryPolicy, SendError, SendOptions,
    SubscribeOptions, Target,
};

/// `limited` may send to node `b` only.
const FILE: &str = r#"
[nodes.limited.permissions]
send = ["node:b"]
"#;

/// The test timings, with `FILE`'s permissions.
fn config() -> anyhow::Result<(Config, ConfigFile)> {
    let file = ConfigFile::new("dead-letters", FILE)?;
    let loaded = Config::load(&file.path)?;
    let mut config = test_config();
    config.permissions = loaded.permissions;
    config.nodes = loaded.nodes;
    Ok((config, file))
}

fn node(id: &str) -> Target {
    Target::Node(NodeId::new(id))
}

/// Waits until the wall clock passes `at` (a message's expiry): the TTL is
/// a time, so waiting for it is the test's subject, not a guess.
async fn wait_past(at: std::time::SystemTime) {
    while std::time::SystemTime::now() <= at {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The server's dead letters, oldest first, once there are `n`.
async fn letters(server: &TestServer, n: u64) -> anyhow::Result<Vec<DeadLetter>> {
    let handle = server.handle.clone();
    wait_until(&format!("{n} dead letters"), || {
        handle.dead_letter_stats().entries >= n
    })
    .await?;
    let mut all = server.handle.dead_letters(1000);
    all.reverse();
    Ok(all)
}

fn find<'a>(all: &'a [DeadLetter], service: &str) -> anyhow::Result<&'a DeadLetter> {
    all.iter()
        .find(|l| l.service == service)
        .with_context(|| format!("a dead letter for service {service:?} in {all:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_reason_reaches_the_queue_and_another_node_browses_takes_and_replays(
) -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let (config, _file) = config()?;
        let server = TestServer::start(config.clone()).await?;
        let a = server.node("a", &config).await?;
        let limited = server.node("limited", &config).await?;
        let b = server.node("b", &config).await?;
        let mut inbox = b.subscribe("svc").await?;
        let before = std::time::SystemTime::now();

        // A one-way message to a node that is not there: the server files
        // it, the target gone.
        a.notify(node("ghost"), "oneway", "to nobody").await?;
        // An acknowledged send to a node that is not there: its sender
        // files it once the send failed.
        let gone = a.send(node("ghost"), "acked", "to nobody either").await;
        ensure!(matches!(gone, Err(SendError::UnknownTarget(_))), "{gone:?}");
        // Refused by permissions, at the server.
        let refused = limited.send(node("a"), "forbidden", "no").await;
        ensure!(
            matches!(refused, Err(SendError::NotPermitted { .. })),
            "{refused:?}"
        );
        // Expired before the server routed it (a one-way message with no
        // time left).
        let gone_now = SendOptions::new().ttl(Duration::ZERO);
        a.notify_with(node("b"), "late", "too late", &gone_now)
            .await?;
        // Retries ran out.
        let retry = SendOptions::new().retry(RetryPolicy {
            attempts: 2,
            delay: Duration::from_millis(20),
            backoff: 1.0,
        });
        let exhausted = a.send_with(node("ghost"), "retried", "twice", &retry).await;
        ensure!(
            matches!(exhausted, Err(SendError::UnknownTarget(_))),
            "{exhausted:?}"
        );

        let all = letters(&server, 5).await?;
        ensure!(all.len() == 5, "exactly five dead letters: {all:#?}");
        let check =
            |service: &str, sender: &str, target: &str, reason: &DeadReason, filed_by: &str| {
                let l = find(&all, service)?;
                ensure!(
                    l.sender.as_str() == sender,
                    "{service}: sender {}",
                    l.sender
                );
                ensure!(l.target == node(target), "{service}: target {}", l.target);
                ensure!(&l.reason == reason, "{service}: reason {:?}", l.reason);
                ensure!(
                    l.filed_by == filed_by,
                    "{service}: filed by {:?}",
                    l.filed_by
                );
                let at = std::time::UNIX_EPOCH + Duration::from_millis(l.at_unix_ms);
                ensure!(
                    at >= before - Duration::from_secs(1),
                    "{service}: time {}",
                    l.at_unix_ms
                );
                Ok(())
            };
        check("oneway", "a", "ghost", &DeadReason::TargetGone, "")?;
        check("acked", "a", "ghost", &DeadReason::TargetGone, "a")?;
        check("forbidden", "limited", "a", &DeadReason::NotPermitted, "")?;
        check("late", "a", "b", &DeadReason::Expired, "")?;
        check(
            "retried",
            "a",
            "ghost",
            &DeadReason::RetriesExhausted {
                attempts: 2,
                last: node_runtime::DeliveryFailure::UnknownTarget,
            },
            "a",
        )?;
        ensure!(
            inbox.try_recv().is_none(),
            "the expired message never reached b"
        );

        // Another node browses them, bodies and all.
        let reader = server.node("reader", &config).await?;
        let dead = reader.dead_letters();
        let page = dead.browse(0, 100).await?;
        ensure!(
            page.entries.len() == 5 && page.stats.entries == 5,
            "{page:#?}"
        );
        let forbidden = page
            .entries
            .iter()
            .find(|e| e.letter.service == "forbidden")
            .context("the refused send")?;
        ensure!(forbidden.body.as_ref() == b"no", "its body is kept");
        // Paging: after the first entry, the other four.
        let first = page.entries[0].letter.id;
        ensure!(dead.browse(first, 100).await?.entries.len() == 4, "paged");

        // Replayed to b (which now offers the service): delivered from the
        // replaying node, and gone from the queue.
        let mut late_inbox = b.subscribe("late").await?;
        let late = page
            .entries
            .iter()
            .find(|e| e.letter.service == "late")
            .context("the expired one")?;
        dead.replay(late.letter.id, &SendOptions::new()).await?;
        let m = next_message(&mut late_inbox).await?;
        ensure!(m.body().as_ref() == b"too late", "replayed body");
        ensure!(m.sender().as_str() == "reader", "replayed from the reader");
        // A replay that fails leaves its entry in the queue.
        let oneway = page
            .entries
            .iter()
            .find(|e| e.letter.service == "oneway")
            .context("the one to nobody")?;
        let failed = dead.replay(oneway.letter.id, &SendOptions::new()).await;
        ensure!(
            matches!(failed, Err(node_runtime::DeadLetterError::Replay { .. })),
            "{failed:?}"
        );
        // Taken out: returned once, then gone.
        let taken = dead.take(&[oneway.letter.id]).await?;
        ensure!(
            taken.len() == 1 && taken[0].body.as_ref() == b"to nobody",
            "{taken:?}"
        );
        ensure!(
            dead.take(&[oneway.letter.id]).await?.is_empty(),
            "taken once"
        );
        let stats = dead.stats().await?;
        // Five, one replayed, one taken; the failed replay was not filed
        // again (its entry stayed until it was taken).
        ensure!(stats.entries == 3, "{stats:?}");
        ensure!(stats.added == 5 && stats.overflowed == 0, "{stats:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_expires_wherever_it_waits_and_its_sender_learns_it() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let dir_a = DataDir::new("ttl-a");
        let mut with_store = config.clone();
        with_store.node.data_dir = Some(dir_a.path().to_owned());
        let a = server.node("a", &with_store).await?;
        let dir_b = DataDir::new("ttl-b");
        let mut b_config = config.clone();
        b_config.node.data_dir = Some(dir_b.path().to_owned());
        let b = server.node("b", &b_config).await?;
        let ttl = Duration::from_millis(300);

        // In the receiver's inbox, acknowledged on processing: never
        // handed over, and its sender hears `Expired`.
        let mut processed = b
            .subscribe_with(
                "processed",
                &SubscribeOptions::new().ack(AckMode::OnProcessed),
            )
            .await?;
        let expires = std::time::SystemTime::now() + ttl;
        let send = {
            let a = a.clone();
            tokio::spawn(async move {
                let options = SendOptions::new().ttl(ttl);
                a.send_with(node("b"), "processed", "waits", &options).await
            })
        };
        wait_until("the message in b's inbox", || processed.len() == 1).await?;
        wait_past(expires).await;
        ensure!(processed.try_recv().is_none(), "expired in the inbox");
        let outcome = send.await?;
        ensure!(
            matches!(outcome, Err(SendError::Expired { .. })),
            "{outcome:?}"
        );

        // One-way, in the inbox: dropped at hand-over, dead-lettered.
        let mut oneway = b.subscribe("oneway").await?;
        let expires = std::time::SystemTime::now() + ttl;
        a.notify_with(
            node("b"),
            "oneway",
            "waits too",
            &SendOptions::new().ttl(ttl),
        )
        .await?;
        wait_until("the one-way message in b's inbox", || oneway.len() == 1).await?;
        wait_past(expires).await;
        ensure!(oneway.try_recv().is_none(), "expired in the inbox");

        // In the sender's delay queue: the retry waits past the expiry,
        // and the send answers `Expired` instead of trying again.
        let options = SendOptions::new()
            .ttl(Duration::from_millis(100))
            .retry(RetryPolicy {
                attempts: 5,
                delay: Duration::from_millis(400),
                backoff: 1.0,
            });
        let waited = a.send_with(node("ghost"), "delayed", "x", &options).await;
        ensure!(
            matches!(waited, Err(SendError::Expired { .. })),
            "{waited:?}"
        );

        // In the sender's store: a recoverable message to a receiver that
        // is not there is sent again until it expires, then dead-lettered.
        let options = SendOptions::new()
            .recoverable()
            .ttl(ttl)
            .timeout(Duration::from_millis(100));
        let queued = a
            .send_with(node("absent"), "stored", "kept", &options)
            .await;
        ensure!(
            matches!(queued, Err(SendError::StillQueued { .. })),
            "{queued:?}"
        );
        wait_until("the stored message expired", || {
            a.recoverable_unacknowledged() == 0
        })
        .await?;

        let all = letters(&server, 4).await?;
        ensure!(all.len() == 4, "{all:#?}");
        for (service, filed_by) in [
            ("processed", "b"),
            ("oneway", "b"),
            ("delayed", "a"),
            ("stored", "a"),
        ] {
            let l = find(&all, service)?;
            ensure!(l.reason == DeadReason::Expired, "{service}: {:?}", l.reason);
            ensure!(l.filed_by == filed_by, "{service}: filed by {}", l.filed_by);
            ensure!(l.sender.as_str() == "a", "{service}: sender {}", l.sender);
        }
        ensure!(a.counters().expired >= 2 && b.counters().expired == 2);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recoverable_message_that_expires_in_the_receivers_hands_is_never_delivered(
) -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let (dir_a, dir_b) = (DataDir::new("rttl-a"), DataDir::new("rttl-b"));
        let mut ca = config.clone();
        ca.node.data_dir = Some(dir_a.path().to_owned());
        let mut cb = config.clone();
        cb.node.data_dir = Some(dir_b.path().to_owned());
        let a = server.node("a", &ca).await?;
        let b = server.node("b", &cb).await?;
        let mut inbox = b.subscribe("svc").await?;
        let ttl = Duration::from_millis(300);
        let expires = std::time::SystemTime::now() + ttl;
        let options = SendOptions::new().recoverable().ttl(ttl);
        // Stored by b, so acknowledged.
        a.send_with(node("b"), "svc", "stored at b", &options)
            .await?;
        // Then one that lives.
        a.send_with(node("b"), "svc", "lives", &SendOptions::new().recoverable())
            .await?;
        wait_past(expires).await;
        let m = next_message(&mut inbox).await?;
        ensure!(m.body().as_ref() == b"lives", "the expired one was skipped");
        let all = letters(&server, 1).await?;
        ensure!(
            all.len() == 1 && all[0].reason == DeadReason::Expired,
            "{all:#?}"
        );
        ensure!(all[0].filed_by == "b", "{all:#?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_waits_its_delays_then_dead_letters() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let a = server.node("a", &config).await?;
        let policy = RetryPolicy {
            attempts: 4,
            delay: Duration::from_millis(50),
            backoff: 2.0,
        };
        let started = Instant::now();
        let failed = a
            .send_with(node("ghost"), "svc", "x", &SendOptions::new().retry(policy))
            .await;
        let took = started.elapsed();
        ensure!(
            matches!(failed, Err(SendError::UnknownTarget(_))),
            "{failed:?}"
        );
        // 50 + 100 + 200 ms of waits, at least (an upper bound would only
        // measure the machine).
        ensure!(took >= Duration::from_millis(350), "took {took:?}");
        ensure!(
            server.handle.counters().route_failures == 4,
            "four attempts: {:?}",
            server.handle.counters()
        );
        let all = letters(&server, 1).await?;
        ensure!(
            all[0].reason
                == DeadReason::RetriesExhausted {
                    attempts: 4,
                    last: node_runtime::DeliveryFailure::UnknownTarget,
                },
            "{all:#?}"
        );

        // A target that joins between attempts gets the message.
        let late = {
            let a = a.clone();
            let policy = RetryPolicy {
                attempts: 50,
                delay: Duration::from_millis(20),
                backoff: 1.0,
            };
            tokio::spawn(async move {
                a.send_with(
                    node("late"),
                    "svc",
                    "at last",
                    &SendOptions::new().retry(policy),
                )
                .await
            })
        };
        let handle = server.handle.clone();
        wait_until("a first failed attempt", || {
            handle.counters().route_failures >= 5
        })
        .await?;
        let b = server.node("late", &config).await?;
        let mut inbox = b.subscribe("svc").await?;
        let m = next_message(&mut inbox).await?;
        ensure!(m.body().as_ref() == b"at last");
        late.await??;
        ensure!(
            server.handle.dead_letter_stats().entries == 1,
            "no new dead letter"
        );
        Ok(())
    })
    .await
}

/// Starts a server whose dead letters live in `dir`, waiting for the
/// store of a server stopped just before to close.
async fn server_with_store(config: &Config, dir: &Path) -> anyhow::Result<TestServer> {
    let mut config = config.clone();
    config.message_server.data_dir = Some(dir.to_owned());
    for _ in 0..500 {
        match TestServer::start(config.clone()).await {
            Ok(server) => return Ok(server),
            Err(e) if format!("{e:?}").contains("in use") => {}
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("the dead-letter store in {} stayed in use", dir.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_survive_a_restart_of_the_message_server() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let dir = DataDir::new("dlq");
        let server = server_with_store(&config, dir.path()).await?;
        let a = server.node("a", &config).await?;
        for i in 0..3u32 {
            a.notify(node("ghost"), "svc", format!("lost {i}")).await?;
        }
        letters(&server, 3).await?;
        a.shutdown().await;
        server.stop().await;

        let server = server_with_store(&config, dir.path()).await?;
        let stats = server.handle.dead_letter_stats();
        ensure!(stats.entries == 3, "{stats:?}");
        let reader = server.node("reader", &config).await?;
        let page = reader.dead_letters().browse(0, 10).await?;
        let bodies: Vec<_> = page.entries.iter().map(|e| e.body.clone()).collect();
        ensure!(
            bodies == ["lost 0", "lost 1", "lost 2"],
            "bodies in order: {bodies:?}"
        );
        // New entries are numbered after the stored ones.
        reader.notify(node("ghost"), "svc", "lost 3").await?;
        let all = letters(&server, 4).await?;
        let ids: Vec<u64> = all.iter().map(|l| l.id).collect();
        ensure!(ids == [1, 2, 3, 4], "{ids:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_counts_what_it_cannot_hold() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let mut config = test_config();
        config.message_server.dead_letter_entries = 2;
        let server = TestServer::start(config.clone()).await?;
        let a = server.node("a", &config).await?;
        for i in 0..5u32 {
            a.notify(node("ghost"), "svc", format!("{i}")).await?;
        }
        let handle = server.handle.clone();
        wait_until("five counted", || {
            let s = handle.dead_letter_stats();
            s.entries + s.overflowed == 5
        })
        .await?;
        let stats = server.handle.dead_letter_stats();
        ensure!(stats.entries == 2 && stats.overflowed == 3, "{stats:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recoverable_message_is_dead_lettered_when_its_retry_policy_runs_out(
) -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let dir = DataDir::new("rretry");
        let mut with_store = config.clone();
        with_store.node.data_dir = Some(dir.path().to_owned());
        let a = server.node("a", &with_store).await?;
        let policy = RetryPolicy {
            attempts: 3,
            delay: Duration::from_millis(30),
            backoff: 2.0,
        };
        let quick = Duration::from_millis(100);
        let with_policy = SendOptions::new()
            .recoverable()
            .retry(policy)
            .timeout(quick);
        let first = a
            .send_with(node("absent"), "svc", "gives up", &with_policy)
            .await;
        ensure!(
            matches!(first, Err(SendError::StillQueued { .. })),
            "{first:?}"
        );
        // One without a policy waits in the store for as long as it takes.
        let plain = SendOptions::new().recoverable().timeout(quick);
        let second = a.send_with(node("absent"), "svc", "waits", &plain).await;
        ensure!(
            matches!(second, Err(SendError::StillQueued { .. })),
            "{second:?}"
        );
        let all = letters(&server, 1).await?;
        ensure!(all.len() == 1, "{all:#?}");
        ensure!(
            all[0].reason
                == DeadReason::RetriesExhausted {
                    attempts: 3,
                    last: node_runtime::DeliveryFailure::UnknownTarget,
                },
            "{all:#?}"
        );
        ensure!(all[0].filed_by == "a" && all[0].sender.as_str() == "a");
        wait_until("the exhausted one left the store", || {
            a.recoverable_unacknowledged() == 1
        })
        .await?;

        // The receiver comes: the one without a policy is delivered, the
        // given-up one never.
        let dir_b = DataDir::new("rretry-b");
        let mut cb = config.clone();
        cb.node.data_dir = Some(dir_b.path().to_owned());
        let b = server.node("absent", &cb).await?;
        let mut inbox = b.subscribe("svc").await?;
        let m = next_message(&mut inbox).await?;
        ensure!(m.body().as_ref() == b"waits", "{:?}", m.body());
        wait_until("acknowledged", || a.recoverable_unacknowledged() == 0).await?;
        ensure!(inbox.try_recv().is_none(), "the given-up one never arrives");
        Ok(())
    })
    .await
}

/// The real binary, killed with SIGKILL a moment after it filed dead
/// letters: they are on disk (each is fsynced as it is filed), and the
/// server started again on the same directory holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_filed_before_a_kill_9_are_kept() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let dir = DataDir::new("dlq-kill");
        let toml = format!(
            "[message_server]\ndata_dir = {:?}\n\n[monitor]\nlisten = \"\"\n",
            dir.path().display().to_string()
        );
        let file = ConfigFile::new("dlq-kill", &toml)?;
        let config = test_config();
        let (mut server, addr) =
            clustercomm_tests::spawn_message_server(&["--config", &file.path]).await?;
        let start = |id: &'static str, addr| {
            node_runtime::Node::builder(id)
                .config(config.clone())
                .message_server(addr)
                .ignore_environment()
                .start()
        };
        let a = start("a", addr).await?;
        for i in 0..3u32 {
            a.notify(node("ghost"), "svc", format!("kept {i}")).await?;
        }
        // On disk once the server says so (an fsync after filing).
        let dead = a.dead_letters();
        bounded(async {
            while dead.stats().await?.durable < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(())
        })
        .await?;
        server.kill().await?;
        drop(dead);
        a.shutdown().await;

        let (_server, addr) =
            clustercomm_tests::spawn_message_server(&["--config", &file.path]).await?;
        let reader = start("reader", addr).await?;
        let page = reader.dead_letters().browse(0, 10).await?;
        let bodies: Vec<_> = page.entries.iter().map(|e| e.body.clone()).collect();
        ensure!(bodies == ["kept 0", "kept 1", "kept 2"], "{bodies:?}");
        Ok(())
    })
    .await
}
