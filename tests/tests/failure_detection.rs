//! Failure detection by heartbeats, with real processes: a node paused with
//! SIGSTOP for longer than the failure timeout is declared failed like a
//! dead one; after SIGCONT its late messages from the old incarnation are
//! refused and it rejoins as a new incarnation.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clustercomm_tests::{bounded, init_logging, spawn_test_node_with, test_config, TestServer};
use node_runtime::{LeaveReason, MembershipEvent, Node, SendError, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_node_is_declared_failed_and_rejoins_as_a_new_incarnation() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let mut config = test_config();
        config.lazy.threshold_bytes = 1024;
        let failure_timeout = config.failure_timeout();
        let server = TestServer::start(config.clone()).await?;
        let a = Node::builder("watcher")
            .config(config.clone())
            .message_server(server.addr)
            .start()
            .await?;
        let mut pings = a.subscribe("pings").await?;
        let mut events = a.membership_events();
        // The paused node pings the watcher over a lazy channel (2 KiB
        // bodies) and offers "svc".
        let b = spawn_test_node_with(
            server.addr,
            "sleeper",
            "svc",
            &["--fast", "--ping", "watcher", "--ping-bytes", "2048"],
        )
        .await?;
        let first = pings.recv().await.context("a first ping")?;
        let old = first.sender_incarnation();

        // A request is waiting on the sleeper when it is paused.
        b.signal("STOP").await?;
        let stopped = Instant::now();
        let waiting = {
            let a = a.clone();
            tokio::spawn(async move {
                a.request(Target::Node("sleeper".into()), "svc", "are you there")
                    .await
            })
        };
        // Declared failed within the failure timeout (+ detection tick).
        let failed_after = loop {
            match events.recv().await? {
                MembershipEvent::Left {
                    id,
                    incarnation,
                    reason,
                } if id == "sleeper" => {
                    ensure!(incarnation == old);
                    ensure!(reason == LeaveReason::Failed, "{reason:?}");
                    break stopped.elapsed();
                }
                _ => continue,
            }
        };
        ensure!(
            failed_after <= failure_timeout + Duration::from_secs(1),
            "declared failed after {failed_after:?}"
        );
        match waiting.await? {
            Err(SendError::TargetStopped { .. }) => {}
            other => bail!("the waiting request should fail with TargetStopped, got {other:?}"),
        }
        // Drain what arrived before the failure was known.
        while pings.try_recv().is_some() {}

        // Awake again: it rejoins as a new incarnation.
        b.signal("CONT").await?;
        let new = loop {
            match events.recv().await? {
                MembershipEvent::Joined(info) if info.id == "sleeper" => break info.incarnation,
                _ => continue,
            }
        };
        ensure!(new != old, "rejoined with the old incarnation");
        // From now on pings come from the new incarnation only.
        let mut from_new = 0;
        while from_new < 5 {
            let m = pings.recv().await.context("pings after the rejoin")?;
            ensure!(
                m.sender_incarnation() != old,
                "a message from the failed incarnation was delivered"
            );
            from_new += 1;
        }
        let refused = a.counters().refused_failed + server.handle.counters().stale_frames;
        eprintln!(
            "declared failed {failed_after:?} after SIGSTOP; rejoined as {new} (was {old}); \
             late messages of the old incarnation refused: {refused} \
             (watcher {}, server {})",
            a.counters().refused_failed,
            server.handle.counters().stale_frames
        );
        ensure!(
            refused > 0,
            "no late message of the old incarnation was seen refused"
        );
        ensure!(server.handle.counters().failed_nodes == 1);
        Ok(())
    })
    .await
}
