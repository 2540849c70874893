//! Recoverable messages (issue 19): stored by the sender before they count
//! as sent, stored by the receiver before they are acknowledged, sent again
//! until they are, and handed to the receiving application once, across
//! restarts of sender and receiver.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use clustercomm_tests::{bounded, init_logging, next_message, test_config, DataDir, TestServer};
use node_runtime::{Config, Node, NodeId, SendError, SendOptions, Target};

/// Starts node `id` with its store in `dir`; a store still closing after
/// the node's last stop is waited for (its file is locked until then).
async fn start(server: &TestServer, id: &str, config: &Config, dir: &Path) -> anyhow::Result<Node> {
    let mut config = config.clone();
    config.node.data_dir = Some(dir.to_owned());
    for _ in 0..500 {
        match server.node(id, &config).await {
            Ok(node) => return Ok(node),
            Err(e) if format!("{e:?}").contains("in use") => tokio::task::yield_now().await,
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("the store in {} stayed in use", dir.display())
}

fn recoverable() -> SendOptions {
    SendOptions::new().recoverable()
}

const RECEIVER: &str = "receiver";

fn to() -> Target {
    Target::Node(NodeId::new(RECEIVER))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoverable_messages_wait_for_a_receiver_that_restarts_and_arrive_once_in_order(
) -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let (dir_s, dir_r) = (DataDir::new("s"), DataDir::new("r"));
        let sender = start(&server, "sender", &config, dir_s.path()).await?;
        let receiver = start(&server, RECEIVER, &config, dir_r.path()).await?;
        let mut inbox = receiver.subscribe("svc").await?;
        for i in 0..20u32 {
            sender
                .send_with(to(), "svc", i.to_string(), &recoverable())
                .await?;
            let m = next_message(&mut inbox).await?;
            ensure!(m.is_recoverable(), "message {i} is recoverable");
            ensure!(m.body() == i.to_string().as_bytes(), "message {i} in order");
        }
        ensure!(sender.recoverable_unacknowledged() == 0);

        // The receiver stops; ten more wait in the sender's store.
        drop(inbox);
        receiver.shutdown().await;
        let quick = recoverable().timeout(Duration::from_millis(200));
        for i in 20..30u32 {
            match sender.send_with(to(), "svc", i.to_string(), &quick).await {
                Err(SendError::StillQueued { pseq, .. }) => {
                    ensure!(pseq == u64::from(i) + 1, "numbered {pseq}")
                }
                other => anyhow::bail!("message {i} to a stopped receiver: {other:?}"),
            }
        }
        ensure!(sender.recoverable_unacknowledged() == 10);

        // Back, with its store: the ten arrive once, in order.
        let receiver = start(&server, RECEIVER, &config, dir_r.path()).await?;
        let mut inbox = receiver.subscribe("svc").await?;
        for i in 20..30u32 {
            let m = next_message(&mut inbox).await?;
            ensure!(
                m.body() == i.to_string().as_bytes(),
                "got {:?} for {i}",
                m.body()
            );
        }
        // Nothing more comes: no duplicate.
        sender
            .send_with(to(), "svc", "last", &recoverable())
            .await?;
        let m = next_message(&mut inbox).await?;
        ensure!(
            m.body() == "last".as_bytes(),
            "then the next: {:?}",
            m.body()
        );
        while sender.recoverable_unacknowledged() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_message_not_yet_handed_over_is_handed_over_after_a_restart() -> anyhow::Result<()>
{
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let (dir_s, dir_r) = (DataDir::new("s2"), DataDir::new("r2"));
        let sender = start(&server, "sender", &config, dir_s.path()).await?;
        let receiver = start(&server, RECEIVER, &config, dir_r.path()).await?;
        let mut inbox = receiver.subscribe("svc").await?;
        // Acknowledged: in the receiver's store.
        for i in 0..5u32 {
            sender
                .send_with(to(), "svc", i.to_string(), &recoverable())
                .await?;
        }
        // The application takes two, and stops before the rest.
        for i in 0..2u32 {
            let m = next_message(&mut inbox).await?;
            ensure!(m.body() == i.to_string().as_bytes());
        }
        drop(inbox);
        receiver.shutdown().await;
        let receiver = start(&server, RECEIVER, &config, dir_r.path()).await?;
        let mut inbox = receiver.subscribe("svc").await?;
        for i in 2..5u32 {
            let m = next_message(&mut inbox).await?;
            ensure!(
                m.body() == i.to_string().as_bytes(),
                "got {:?} for {i}",
                m.body()
            );
            ensure!(m.is_recoverable());
        }
        sender
            .send_with(to(), "svc", "next", &recoverable())
            .await?;
        let m = next_message(&mut inbox).await?;
        ensure!(
            m.body() == "next".as_bytes(),
            "then the next: {:?}",
            m.body()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_that_restarts_sends_what_its_store_holds() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let (dir_s, dir_r) = (DataDir::new("s3"), DataDir::new("r3"));
        let sender = start(&server, "sender", &config, dir_s.path()).await?;
        let quick = recoverable().timeout(Duration::from_millis(100));
        for i in 0..3u32 {
            let sent = sender.send_with(to(), "svc", i.to_string(), &quick).await;
            ensure!(
                matches!(sent, Err(SendError::StillQueued { .. })),
                "to nobody: {sent:?}"
            );
        }
        sender.shutdown().await;
        let receiver = start(&server, RECEIVER, &config, dir_r.path()).await?;
        let mut inbox = receiver.subscribe("svc").await?;
        let sender = start(&server, "sender", &config, dir_s.path()).await?;
        for i in 0..3u32 {
            let m = next_message(&mut inbox).await?;
            ensure!(m.body() == i.to_string().as_bytes(), "got {:?}", m.body());
        }
        while sender.recoverable_unacknowledged() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn recoverable_sends_need_a_store_and_one_node() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let plain = server.node("plain", &config).await?;
        let sent = plain.send_with(to(), "svc", "x", &recoverable()).await;
        let err = sent.err().context("no store, no recoverable send")?;
        ensure!(err.to_string().contains("node.data_dir"), "{err}");
        let dir = DataDir::new("one");
        let stored = start(&server, "stored", &config, dir.path()).await?;
        let sent = stored
            .send_with(Target::All, "svc", "x", &recoverable())
            .await;
        ensure!(
            matches!(sent, Err(SendError::NotRecoverable { .. })),
            "{sent:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_recoverable_messages_pipeline_and_arrive_once_in_order_even_when_dropped(
) -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let (dir_s, dir_r) = (DataDir::new("s5"), DataDir::new("r5"));
        let sender = start(&server, "sender", &config, dir_s.path()).await?;
        let receiver = start(&server, RECEIVER, &config, dir_r.path()).await?;
        let mut inbox = receiver.subscribe("svc").await?;
        let reader = tokio::spawn(async move {
            for i in 0..2_000u32 {
                let m = next_message(&mut inbox).await?;
                ensure!(
                    m.body() == i.to_string().as_bytes(),
                    "got {:?} for {i}",
                    m.body()
                );
            }
            Ok::<_, anyhow::Error>(inbox)
        });
        let mut handles = Vec::new();
        for i in 0..2_000u32 {
            let pending = sender
                .submit_with(to(), "svc", i.to_string(), &recoverable())
                .await?;
            // Every other handle is dropped: the node watches anyway.
            if i % 2 == 0 {
                handles.push(pending);
            }
        }
        for pending in handles {
            pending.outcome().await?;
        }
        let mut inbox = reader.await??;
        ensure!(inbox.try_recv().is_none(), "nothing more");
        while sender.recoverable_unacknowledged() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_refused_or_salvaged_and_every_intact_message_is_delivered(
) -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let (dir_s, dir_r) = (DataDir::new("s6"), DataDir::new("r6"));
        let sender = start(&server, "sender", &config, dir_s.path()).await?;
        // Twenty wait in the sender's store for a receiver not yet there.
        let body = |i: u32| format!("message {i:04} {}", "x".repeat(300));
        let quick = recoverable().timeout(Duration::from_millis(50));
        for i in 0..20u32 {
            let sent = sender.send_with(to(), "svc", body(i), &quick).await;
            ensure!(
                matches!(sent, Err(SendError::StillQueued { .. })),
                "{sent:?}"
            );
        }
        sender.shutdown().await;
        // Every copy of message 7 in the file is damaged.
        let file = dir_s.path().join("store.redb");
        let mut bytes = std::fs::read(&file)?;
        let victim = body(7).into_bytes();
        let copies: Vec<usize> = bytes
            .windows(victim.len())
            .enumerate()
            .filter(|(_, w)| *w == victim.as_slice())
            .map(|(i, _)| i)
            .collect();
        ensure!(!copies.is_empty(), "message 7 is in the file");
        for at in copies {
            bytes[at + 100] ^= 0x20;
        }
        std::fs::write(&file, &bytes)?;

        // Refused by default, naming the file.
        let mut refusing = config.clone();
        refusing.node.data_dir = Some(dir_s.path().to_owned());
        let mut text = String::new();
        for _ in 0..500 {
            let refused = server
                .node("sender", &refusing)
                .await
                .err()
                .context("a damaged store is refused")?;
            text = format!("{refused:#}");
            if !text.contains("in use") {
                break;
            }
            // The stopped node's store is still closing.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ensure!(
            text.contains("damaged") && text.contains(&file.display().to_string()),
            "{text}"
        );

        // Salvaged: the other nineteen arrive, in order.
        let mut salvaging = config.clone();
        salvaging.node.store_on_damage = node_runtime::StoreOnDamage::Salvage;
        let _sender = start(&server, "sender", &salvaging, dir_s.path()).await?;
        let receiver = start(&server, RECEIVER, &config, dir_r.path()).await?;
        let mut inbox = receiver.subscribe("svc").await?;
        for i in (0..20u32).filter(|&i| i != 7) {
            let m = next_message(&mut inbox).await?;
            ensure!(
                m.body() == body(i).as_bytes(),
                "got {:?} for {i}",
                String::from_utf8_lossy(&m.body()[..12])
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoverable_messages_on_two_paths_arrive_once_in_order() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let config = test_config();
        let server = TestServer::start(config.clone()).await?;
        let (dir_s, dir_r) = (DataDir::new("s7"), DataDir::new("r7"));
        let sender = start(&server, "sender", &config, dir_s.path()).await?;
        let receiver = start(&server, RECEIVER, &config, dir_r.path()).await?;
        let mut inbox = receiver.subscribe("svc").await?;
        // Small bodies go through the message server, large ones over a
        // lazy channel: pipelined, they may arrive out of order, and the
        // receiver takes them in order all the same.
        let body = |i: u32| {
            let len = if i.is_multiple_of(2) { 64 } else { 200 * 1024 };
            let mut b = format!("{i:04}").into_bytes();
            b.resize(len, b'.');
            b
        };
        let mut pendings = Vec::new();
        for i in 0..40u32 {
            pendings.push(
                sender
                    .submit_with(to(), "svc", body(i), &recoverable())
                    .await?,
            );
        }
        for i in 0..40u32 {
            let m = next_message(&mut inbox).await?;
            ensure!(
                m.body().as_ref() == body(i).as_slice(),
                "got {:?} for {i}",
                String::from_utf8_lossy(&m.body()[..4])
            );
        }
        // A message that overtook one on the other path was refused as
        // past a gap and sent again: its handle says it is still queued.
        for p in pendings {
            match p.outcome().await {
                Ok(_) | Err(SendError::StillQueued { .. }) => {}
                Err(e) => anyhow::bail!("{e}"),
            }
        }
        ensure!(inbox.try_recv().is_none(), "nothing more");
        let paths = sender.counters();
        ensure!(
            paths.server_messages >= 1 && paths.lazy_messages >= 1,
            "both paths taken: {paths:?}"
        );
        Ok(())
    })
    .await
}
