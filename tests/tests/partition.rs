//! A node cut off from the message server by a network partition: `nft`
//! drop rules in a private network namespace per test (`unshare -rn`: a
//! user namespace in which the test is root, so it needs no privileges).
//!
//! Each test re-runs itself inside a new network namespace, where only the
//! loopback interface exists. The cut-off node reaches the message server
//! through 127.0.0.2 and everyone else through 127.0.0.1, so dropping
//! everything to and from 127.0.0.2 partitions exactly that node from the
//! server (its direct channels to other nodes are untouched).
//!
//! - Shorter than the failure timeout: no error, nothing lost or
//!   duplicated.
//! - Longer: errors at the sender within the failure timeout and a second,
//!   and a re-registration (as a new incarnation) after the partition heals.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clustercomm_tests::fault::{body, Ledger, Told};
use clustercomm_tests::{init_logging, test_config, TestServer};
use node_runtime::{LeaveReason, MembershipEvent, Node, NodeId, Target};

const INSIDE: &str = "CLUSTERCOMM_IN_PRIVATE_NETNS";

/// Runs `name` again inside a private network namespace; true if this is
/// already the inside run.
fn in_private_netns(name: &str) -> anyhow::Result<bool> {
    if std::env::var_os(INSIDE).is_some() {
        return Ok(true);
    }
    // What the inside run needs, said in one line before it starts.
    for (cmd, package) in [("nft", "nftables"), ("ip", "iproute2")] {
        if Command::new(cmd).arg("--version").output().is_err() {
            bail!("the partition tests need `{cmd}` on the PATH: install {package}");
        }
    }
    let exe = std::env::current_exe()?;
    let out = Command::new("unshare")
        .arg("-rn")
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .output()
        .context("running unshare -rn (util-linux, with unprivileged user namespaces)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    ensure!(
        out.status.success(),
        "the test failed inside its network namespace"
    );
    ensure!(
        stdout.contains("1 passed"),
        "the inside run did not run the test"
    );
    Ok(false)
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(cmd).args(args).status().with_context(|| {
        format!(
            "running {cmd} (the partition tests need it: install {})",
            package_of(cmd)
        )
    })?;
    ensure!(status.success(), "{cmd} {args:?} failed");
    Ok(())
}

/// The Debian package that brings `cmd`.
fn package_of(cmd: &str) -> &'static str {
    match cmd {
        "nft" => "nftables",
        "ip" => "iproute2",
        _ => "it",
    }
}

/// Cuts 127.0.0.2 off until dropped.
struct Partition;

impl Partition {
    fn start() -> anyhow::Result<Partition> {
        run("nft", &["add", "table", "inet", "ccpart"])?;
        run(
            "nft",
            &[
                "add",
                "chain",
                "inet",
                "ccpart",
                "out",
                "{ type filter hook output priority 0 ; }",
            ],
        )?;
        run(
            "nft",
            &[
                "add",
                "rule",
                "inet",
                "ccpart",
                "out",
                "ip",
                "daddr",
                "127.0.0.2",
                "drop",
            ],
        )?;
        run(
            "nft",
            &[
                "add",
                "rule",
                "inet",
                "ccpart",
                "out",
                "ip",
                "saddr",
                "127.0.0.2",
                "drop",
            ],
        )?;
        Ok(Partition)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "ccpart"])
            .status();
    }
}

struct Setup {
    server: TestServer,
    sender: Node,
    cut: Node,
    ledger: Ledger,
}

async fn setup() -> anyhow::Result<Setup> {
    run("ip", &["link", "set", "lo", "up"])?;
    let mut config = test_config();
    config.message_server.listen = "0.0.0.0:0".parse()?;
    config.lazy.auto_activate_messages = 0;
    config.node.send_timeout_ms = 10_000;
    let server = TestServer::start(config.clone()).await?;
    let port = server.addr.port();
    let sender = Node::builder("sender")
        .config(config.clone())
        .message_server(format!("127.0.0.1:{port}"))
        .start()
        .await?;
    let mut cut_config = config.clone();
    cut_config.node.direct_listen = "127.0.0.1:0".parse()?;
    let cut = Node::builder("cut")
        .config(cut_config)
        .message_server(format!("127.0.0.2:{port}"))
        .start()
        .await?;
    let ledger = Ledger::default();
    let mut inbox = cut.subscribe("ft").await?;
    let sink = ledger.clone();
    tokio::spawn(async move {
        while let Some(m) = inbox.recv().await {
            sink.delivered(1, m.body());
        }
    });
    Ok(Setup {
        server,
        sender,
        cut,
        ledger,
    })
}

/// Sends numbered acknowledged messages to "cut", one every few ms, until
/// `stop` resolves; records every outcome.
async fn stream(
    sender: Node,
    ledger: Ledger,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let mut pending = tokio::task::JoinSet::new();
    let mut n = 0u64;
    while !*stop.borrow() {
        let p = sender
            .submit(Target::Node("cut".into()), "ft", body(0, n))
            .await;
        let ledger = ledger.clone();
        let number = n;
        match p {
            Ok(p) => {
                pending.spawn(async move {
                    let told = match p.outcome().await {
                        Ok(_) => Told::Delivered,
                        Err(e) => Told::Error(e.to_string()),
                    };
                    ledger.told(0, 1, number, told);
                });
            }
            Err(e) => ledger.told(0, 1, number, Told::Error(e.to_string())),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while pending.join_next().await.is_some() {}
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_shorter_than_the_failure_timeout_loses_nothing() -> anyhow::Result<()> {
    if !in_private_netns("partition_shorter_than_the_failure_timeout_loses_nothing")? {
        return Ok(());
    }
    init_logging();
    let run = async {
        let s = setup().await?;
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let traffic = tokio::spawn(stream(s.sender.clone(), s.ledger.clone(), stop));
        tokio::time::sleep(Duration::from_millis(300)).await;
        {
            let _cut = Partition::start()?;
            // 40% of the failure timeout.
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        stop_tx.send(true)?;
        let sent = traffic.await??;
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.ledger.delivered_count() < s.ledger.acknowledged_count()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let tally = s.ledger.tally();
        eprintln!("short partition: {sent} sent: {tally}");
        ensure!(tally.errors == 0, "{tally}");
        ensure!(
            tally.lost == 0 && tally.duplicated == 0 && tally.reordered == 0,
            "{tally}"
        );
        ensure!(s.server.handle.counters().failed_nodes == 0);
        ensure!(s.cut.members().iter().any(|m| m.id == "sender"));
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), run).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_longer_than_the_failure_timeout_errors_then_rejoins() -> anyhow::Result<()> {
    if !in_private_netns("partition_longer_than_the_failure_timeout_errors_then_rejoins")? {
        return Ok(());
    }
    init_logging();
    let run = async {
        let s = setup().await?;
        let failure_timeout = test_config().failure_timeout();
        let old = s.cut.incarnation();
        let mut events = s.sender.membership_events();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let traffic = tokio::spawn(stream(s.sender.clone(), s.ledger.clone(), stop));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let partition = Partition::start()?;
        let cut_at = Instant::now();
        // The sender learns the node failed within the bound.
        let failed_after = loop {
            match events.recv().await? {
                MembershipEvent::Left { id, reason, .. } if id == "cut" => {
                    ensure!(reason == LeaveReason::Failed, "{reason:?}");
                    break cut_at.elapsed();
                }
                _ => continue,
            }
        };
        ensure!(
            failed_after <= failure_timeout + Duration::from_secs(1),
            "declared failed after {failed_after:?}"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(partition);
        let healed_at = Instant::now();
        // It registers again, as a new incarnation.
        let rejoined_after = loop {
            match events.recv().await? {
                MembershipEvent::Joined(info) if info.id == "cut" => {
                    ensure!(
                        info.incarnation != old,
                        "rejoined with the failed incarnation"
                    );
                    break healed_at.elapsed();
                }
                _ => continue,
            }
        };
        stop_tx.send(true)?;
        let sent = traffic.await??;
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.ledger.delivered_count() < s.ledger.acknowledged_count()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let tally = s.ledger.tally();
        eprintln!(
            "long partition: declared failed {failed_after:?} after the cut, re-registered \
             {rejoined_after:?} after it healed; {sent} sent: {tally}"
        );
        ensure!(
            tally.errors > 0,
            "a long partition must give errors: {tally}"
        );
        ensure!(tally.lost == 0 && tally.duplicated == 0, "{tally}");
        let delivered_after = s.cut.counters().received_server;
        ensure!(delivered_after > 0);
        let cut_id: NodeId = "cut".into();
        if !s.sender.members().iter().any(|m| m.id == cut_id) {
            bail!("the sender does not see the rejoined node");
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), run).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_monitor_closes_a_cut_lazy_channel_and_reopens_it() -> anyhow::Result<()> {
    if !in_private_netns("channel_monitor_closes_a_cut_lazy_channel_and_reopens_it")? {
        return Ok(());
    }
    init_logging();
    let run = async {
        run("ip", &["link", "set", "lo", "up"])?;
        let mut config = test_config();
        config.lazy.threshold_bytes = 1024;
        config.lazy.auto_activate_messages = 0;
        let failure_timeout = config.failure_timeout();
        let server = TestServer::start(config.clone()).await?;
        let sender = Node::builder("sender")
            .config(config.clone())
            .message_server(server.addr)
            .start()
            .await?;
        // The receiver's direct channels go through 127.0.0.2; its link to
        // the message server does not.
        let mut receiver_config = config.clone();
        receiver_config.node.direct_listen = "127.0.0.2:0".parse()?;
        let receiver = Node::builder("receiver")
            .config(receiver_config)
            .message_server(server.addr)
            .start()
            .await?;
        let mut inbox = receiver.subscribe("bulk").await?;
        tokio::spawn(async move { while inbox.recv().await.is_some() {} });
        let big = bytes::Bytes::from(vec![1u8; 64 * 1024]);
        sender
            .send(Target::Node("receiver".into()), "bulk", big.clone())
            .await?;
        ensure!(sender.counters().lazy_opened == 1);

        let partition = Partition::start()?;
        let cut_at = Instant::now();
        let result = sender
            .send(Target::Node("receiver".into()), "bulk", big.clone())
            .await;
        let after = cut_at.elapsed();
        eprintln!("send over the cut channel ended after {after:?}: {result:?}");
        match result {
            Err(node_runtime::SendError::Disconnected) => {}
            other => bail!("expected the cut channel to fail the send, got {other:?}"),
        }
        ensure!(
            after <= failure_timeout + Duration::from_secs(1),
            "the broken channel was noticed after {after:?}"
        );
        ensure!(sender.counters().lazy_closed >= 1);
        // The receiver never left the cluster.
        ensure!(sender.members().iter().any(|m| m.id == "receiver"));
        drop(partition);
        sender
            .send(Target::Node("receiver".into()), "bulk", big)
            .await?;
        ensure!(
            sender.counters().lazy_opened == 2,
            "{:?}",
            sender.counters()
        );
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), run).await?
}
