//! A node cut off by a network partition, made with the in-repo fault
//! proxies ([`clustercomm_tests::proxy`]): no privileges, no firewall, no
//! network namespace.
//!
//! The cut-off node reaches the message server's TCP port through a
//! [`TcpProxy`] and its heartbeat port through a [`UdpProxy`]; cutting both
//! partitions exactly that node from the server, while the sender reaches
//! the server directly.
//!
//! How its heartbeats find the UDP proxy: the server takes heartbeats on
//! `127.0.0.1` and tells nodes to send them to `0.0.0.0:<port>`
//! (`message_server.heartbeat_advertise`), a port the test holds on two
//! loopback addresses; a node puts in the IP it reached the server on. The
//! sender reaches the server on `127.0.0.1`, so its heartbeats go to
//! `127.0.0.1:<port>`, a proxy that always passes them; the cut-off node
//! reaches it through the TCP proxy on `127.0.0.2`, so its heartbeats go to
//! `127.0.0.2:<port>`, the UDP proxy that the tests cut. Both proxies send
//! upstream from `127.0.0.1`, where the server sees both nodes' connections
//! come from, so the heartbeats pass its check of their source address.
//!
//! - Shorter than the failure timeout: no error, nothing lost or
//!   duplicated.
//! - Longer: errors at the sender within the failure timeout and a second,
//!   and a re-registration (as a new incarnation) after the partition heals.
//! - A cut lazy channel (through a proxy in front of the receiver's direct
//!   port) is closed by the channel monitor and opened again after.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clustercomm_tests::fault::{body, Ledger, Told};
use clustercomm_tests::proxy::{TcpProxy, UdpProxy};
use clustercomm_tests::{init_logging, test_config, TestServer, TEST_WAIT};
use node_runtime::{LeaveReason, MembershipEvent, Node, NodeId, Target};
use tokio::net::UdpSocket;

/// The loopback address the cut-off node reaches the message server on
/// (through the proxies); every other node reaches it on `127.0.0.1`.
const CUT_OFF_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// The cut-off node's paths to the message server: its connection and its
/// heartbeats; and the path of the other nodes' heartbeats, never cut.
struct ServerPaths {
    tcp: TcpProxy,
    udp: UdpProxy,
    others_udp: UdpProxy,
}

impl ServerPaths {
    /// One UDP port held on `127.0.0.1` (for the other nodes' heartbeats)
    /// and on [`CUT_OFF_IP`] (for the cut-off node's).
    async fn heartbeat_sockets() -> anyhow::Result<(UdpSocket, UdpSocket)> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let others = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            let port = others.local_addr()?.port();
            match UdpSocket::bind((CUT_OFF_IP, port)).await {
                Ok(cut) => return Ok((others, cut)),
                // That port is taken there: try another.
                Err(_) if attempts < 16 => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("binding one UDP port on 127.0.0.1 and {CUT_OFF_IP}")
                    })
                }
            }
        }
    }

    /// Puts proxies on the paths to `server`, whose heartbeats are
    /// advertised at the port of `sockets` (from [`Self::heartbeat_sockets`]).
    async fn start(
        server: &TestServer,
        sockets: (UdpSocket, UdpSocket),
    ) -> anyhow::Result<ServerPaths> {
        let heartbeats = server
            .handle
            .heartbeat_addr()
            .context("the server takes no heartbeats")?;
        let (others, cut) = sockets;
        let tcp = TcpProxy::bind(SocketAddr::from((CUT_OFF_IP, 0)), server.addr).await?;
        Ok(ServerPaths {
            tcp,
            udp: UdpProxy::with_socket(cut, heartbeats)?,
            others_udp: UdpProxy::with_socket(others, heartbeats)?,
        })
    }

    fn cut(&self) {
        self.tcp.handle().cut();
        self.udp.handle().cut();
    }

    fn heal(&self) {
        self.tcp.handle().pass();
        self.udp.handle().pass();
    }

    /// Waits until heartbeats have gone through the proxy both ways,
    /// `beyond` the given count of answers.
    async fn heartbeats_pass(&self, beyond: u64) -> anyhow::Result<u64> {
        let c = self
            .udp
            .handle()
            .wait_for("heartbeats through the proxy", |c| {
                c.datagrams_to_upstream > 0 && c.datagrams_to_clients > beyond
            })
            .await?;
        Ok(c.datagrams_to_clients)
    }
}

/// Waits (at most [`TEST_WAIT`]) until `ready` holds, looking every 10 ms.
async fn until(what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + TEST_WAIT;
    while !ready() {
        if Instant::now() > deadline {
            bail!("waited {TEST_WAIT:?} for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

struct Setup {
    server: TestServer,
    sender: Node,
    cut: Node,
    paths: ServerPaths,
    ledger: Ledger,
}

async fn setup() -> anyhow::Result<Setup> {
    let mut config = test_config();
    // Heartbeats are taken on 127.0.0.1 and advertised at a port of the
    // proxies' (see the module's docs).
    let sockets = ServerPaths::heartbeat_sockets().await?;
    let port = sockets.0.local_addr()?.port();
    config.cluster.heartbeat_listen = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    config.message_server.heartbeat_advertise =
        Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)));
    config.lazy.auto_activate_messages = 0;
    config.node.send_timeout_ms = 10_000;
    let server = TestServer::start(config.clone()).await?;
    let paths = ServerPaths::start(&server, sockets).await?;
    let sender = Node::builder("sender")
        .config(config.clone())
        .message_server(server.addr)
        .start()
        .await?;
    let mut cut_config = config.clone();
    cut_config.node.direct_listen = "127.0.0.1:0".parse()?;
    let cut = Node::builder("cut")
        .config(cut_config)
        .message_server(paths.tcp.addr())
        .start()
        .await?;
    // Both of its paths go through the proxies, and only its heartbeats
    // through the one the tests cut; the server accepts them all.
    paths.heartbeats_pass(0).await?;
    paths
        .others_udp
        .handle()
        .wait_for("the sender's heartbeats through their proxy", |c| {
            c.datagrams_to_clients > 0
        })
        .await?;
    ensure!(paths.tcp.handle().counters().connected == 1);
    ensure!(paths.udp.handle().counters().clients == 1);
    ensure!(server.handle.counters().heartbeats_refused == 0);
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
        paths,
        ledger,
    })
}

/// Sends numbered acknowledged messages to "cut", one every few ms, until
/// `stop` resolves; records every outcome, and counts the messages sent
/// in `sent`.
async fn stream(
    sender: Node,
    ledger: Ledger,
    sent: Arc<AtomicU64>,
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
        sent.store(n, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while pending.join_next().await.is_some() {}
    Ok(n)
}

/// Waits until every acknowledged message has been delivered (or the
/// bound passes; the tally then shows what is missing).
async fn settle(ledger: &Ledger) {
    let _ = until("every acknowledged message delivered", || {
        ledger.delivered_count() >= ledger.acknowledged_count()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_shorter_than_the_failure_timeout_loses_nothing() -> anyhow::Result<()> {
    init_logging();
    let run = async {
        let s = setup().await?;
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let submitted = Arc::new(AtomicU64::new(0));
        let traffic = tokio::spawn(stream(
            s.sender.clone(),
            s.ledger.clone(),
            submitted.clone(),
            stop,
        ));
        until("traffic flowing", || s.ledger.delivered_count() >= 20).await?;
        s.paths.cut();
        // 40% of the failure timeout.
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.paths.heal();
        let dropped = s.paths.udp.handle().counters();
        ensure!(
            dropped.dropped_to_upstream > 0,
            "no heartbeat met the cut: {dropped:?}"
        );
        // Traffic goes on after the partition, held messages first (bodies
        // are numbered from 0, so this many deliveries include 40 messages
        // sent after it healed).
        let by_heal = submitted.load(Ordering::Relaxed);
        until("traffic flowing again", || {
            s.ledger.delivered_count() >= by_heal + 40
        })
        .await?;
        stop_tx.send(true)?;
        let sent = traffic.await??;
        settle(&s.ledger).await;
        let tally = s.ledger.tally();
        eprintln!("short partition: {sent} sent: {tally}");
        ensure!(tally.errors == 0, "{tally}");
        ensure!(
            tally.lost == 0 && tally.duplicated == 0 && tally.reordered == 0,
            "{tally}"
        );
        ensure!(s.server.handle.counters().failed_nodes == 0);
        ensure!(s.cut.members().iter().any(|m| m.id == "sender"));
        // Still the one connection through the proxy.
        ensure!(s.paths.tcp.handle().counters().connected == 1);
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), run).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_longer_than_the_failure_timeout_errors_then_rejoins() -> anyhow::Result<()> {
    init_logging();
    let run = async {
        let s = setup().await?;
        let failure_timeout = test_config().failure_timeout();
        let old = s.cut.incarnation();
        let mut events = s.sender.membership_events();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let submitted = Arc::new(AtomicU64::new(0));
        let traffic = tokio::spawn(stream(s.sender.clone(), s.ledger.clone(), submitted, stop));
        until("traffic flowing", || s.ledger.delivered_count() >= 20).await?;
        s.paths.cut();
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
        // The partition lasts until the cut-off node has noticed it too,
        // and the sender has been told of failed messages.
        until("the cut-off node to lose its server", || {
            s.cut.message_server().is_none()
        })
        .await?;
        until("an error at the sender", || s.ledger.tally().errors > 0).await?;
        let answered = s.paths.udp.handle().counters().datagrams_to_clients;
        s.paths.heal();
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
        // Its heartbeats pass the proxy again.
        s.paths.heartbeats_pass(answered).await?;
        stop_tx.send(true)?;
        let sent = traffic.await??;
        settle(&s.ledger).await;
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
        // It came back through the proxy, on a new connection.
        ensure!(s.paths.tcp.handle().counters().connected >= 2);
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), run).await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_monitor_closes_a_cut_lazy_channel_and_reopens_it() -> anyhow::Result<()> {
    init_logging();
    let run = async {
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
        // The receiver's direct channels go through a proxy; its link to
        // the message server does not. The proxy holds its port on
        // 127.0.0.1, so the receiver can listen on that port on
        // 127.0.0.3, known before it starts, and announce the proxy.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let announced = listener.local_addr()?;
        let behind = SocketAddr::from(([127, 0, 0, 3], announced.port()));
        let direct = TcpProxy::with_listener(listener, behind)?;
        let mut receiver_config = config.clone();
        receiver_config.node.direct_listen = behind;
        receiver_config.node.direct_advertise = Some(announced);
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
        let through = direct.handle().counters();
        ensure!(
            through.connected == 1 && through.bytes_to_upstream >= big.len() as u64,
            "the lazy channel did not go through the proxy: {through:?}"
        );

        direct.handle().cut();
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
        direct.handle().pass();
        sender
            .send(Target::Node("receiver".into()), "bulk", big)
            .await?;
        ensure!(
            sender.counters().lazy_opened == 2,
            "{:?}",
            sender.counters()
        );
        ensure!(direct.handle().counters().connected == 2);
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), run).await?
}
