//! Attacks on live sessions against the real `message-server` binary: an
//! attacker who holds the cluster secret and knows what every member is
//! told (a node's id, incarnation and public session key) cannot take a
//! live node's registration over, and spoofed or replayed heartbeats keep
//! no dead node registered. The good nodes keep exchanging messages
//! throughout.

use std::time::Duration;

use anyhow::{ensure, Context};
use clustercomm_tests::raw::{self, refused_for, RawNode};
use clustercomm_tests::{bounded, init_logging, monitor_addr, monitor_json, ConfigFile};
use node_runtime::{Config, LeaveReason, MembershipEvent, Node, NodeId, Target};
use transports::auth::SessionKey;
use transports::heartbeat::Beat;
use transports::protocol::{Interests, RefusalReason};

const SECRET: &str = "s3cret-only-members-know";

/// A server with the cluster secret and quick failure detection, and the
/// configuration its nodes use.
async fn guarded_server(
    name: &str,
) -> anyhow::Result<(
    clustercomm_tests::ChildProcess,
    std::net::SocketAddr,
    Config,
    ConfigFile,
)> {
    let toml = format!(
        "[cluster]\ncredentials = \"{SECRET}\"\nheartbeat_interval_ms = 100\nfailure_timeout_ms = 1000\n"
    );
    let file = ConfigFile::new(name, &toml)?;
    let (server, addr) = clustercomm_tests::spawn_message_server(&["--config", &file.path]).await?;
    let mut config = clustercomm_tests::test_config();
    config.cluster.credentials = Some(SECRET.into());
    config.cluster.heartbeat_interval_ms = 100;
    config.cluster.failure_timeout_ms = 1000;
    Ok((server, addr, config, file))
}

async fn node(id: &str, config: &Config, addr: std::net::SocketAddr) -> anyhow::Result<Node> {
    Ok(Node::builder(id)
        .config(config.clone())
        .message_server(addr)
        .start()
        .await?)
}

/// `from` sends one message to `to`'s inbox and it arrives.
async fn exchange(
    from: &Node,
    to: &str,
    inbox: &mut node_runtime::Inbox,
    body: &str,
) -> anyhow::Result<()> {
    from.send(Target::Node(NodeId::new(to)), "svc", body.to_owned())
        .await?;
    let got = bounded(async { inbox.recv().await.context("inbox closed") }).await?;
    ensure!(got.body() == body, "got {:?}", got.body());
    Ok(())
}

/// Someone with the cluster secret registers as a live node, with its id
/// and incarnation: with a session key of its own it is refused as a
/// duplicate; naming the node's own public key it cannot sign the
/// handshake and is refused for its credentials. The node stays
/// registered as it was and keeps exchanging messages both ways; nobody
/// saw it leave.
#[tokio::test]
async fn a_live_session_cannot_be_hijacked() -> anyhow::Result<()> {
    init_logging();
    let (_server, addr, config, _file) = guarded_server("hijack").await?;
    let victim = node("victim", &config, addr).await?;
    let mut victim_inbox = victim.subscribe("svc").await?;
    let other = node("other", &config, addr).await?;
    let mut other_inbox = other.subscribe("svc").await?;
    let mut events = other.membership_events();
    exchange(&victim, "other", &mut other_inbox, "before").await?;
    let seen = other
        .members()
        .into_iter()
        .find(|m| m.id == "victim")
        .context("other does not know victim")?;

    let attempts = [
        ("a key of its own", None, RefusalReason::DuplicateNode),
        (
            "the victim's key, unsigned",
            Some(seen.session_key),
            RefusalReason::BadCredentials,
        ),
    ];
    for (case, claimed, expected) in attempts {
        let key = SessionKey::generate()?;
        let mut hello = raw::hello("victim", &config.cluster.name, &key);
        hello.incarnation = victim.incarnation();
        if let Some(claimed) = claimed {
            hello.session_key = claimed;
        }
        match RawNode::register(addr, hello, &Interests::default(), key, Some(SECRET)).await {
            Ok(_) => anyhow::bail!("{case}: the hijacker was welcomed"),
            Err(e) => ensure!(refused_for(&e, &expected), "{case}: {e:#}"),
        }
    }

    // Still the same registration, both ways.
    exchange(&victim, "other", &mut other_inbox, "after").await?;
    exchange(&other, "victim", &mut victim_inbox, "back").await?;
    let now = other
        .members()
        .into_iter()
        .find(|m| m.id == "victim")
        .context("victim is gone")?;
    ensure!(now == seen, "the victim's registration changed: {now:?}");
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(1), events.recv())
        .await
        .map(Result::ok)
    {
        ensure!(
            !matches!(&event, MembershipEvent::Left { id, .. } | MembershipEvent::Joined(node_runtime::MemberInfo { id, .. }) if id == "victim"),
            "the others saw the victim change: {event:?}"
        );
    }
    victim.shutdown().await;
    other.shutdown().await;
    Ok(())
}

/// A node registers and then falls silent. Someone keeps sending pings
/// for it: a recorded one played again, fresh ones with a made-up MAC, and
/// correctly signed ones from another address. None of them answers or
/// counts: the node is declared failed within the failure timeout, as if
/// nobody had pinged, and its connection closed.
#[tokio::test]
async fn spoofed_and_replayed_heartbeats_keep_no_dead_node_alive() -> anyhow::Result<()> {
    init_logging();
    let (_server, addr, config, _file) = guarded_server("spoofed-beats").await?;
    let watcher = node("watcher", &config, addr).await?;
    let mut events = watcher.membership_events();
    let key = SessionKey::generate()?;
    let hello = raw::hello("silent", &config.cluster.name, &key);
    let mut silent =
        RawNode::register(addr, hello, &Interests::default(), key, Some(SECRET)).await?;
    let beat_to = silent.beat_to;

    // Its genuine pings are answered: the checks let a real node through.
    let own = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut recorded = Vec::new();
    for nonce in 1..=3 {
        let ping = silent.ping(nonce).encode();
        own.send_to(&ping, beat_to).await?;
        let mut buf = [0u8; 600];
        let (n, _) = bounded(async { Ok(own.recv_from(&mut buf).await?) }).await?;
        ensure!(
            matches!(Beat::decode(&buf[..n]), Some(Beat::Pong { nonce: answered, .. }) if answered == nonce),
            "no pong to a genuine ping"
        );
        recorded.push(ping);
    }

    // Then only spoofs, every 50 ms, until the node is declared failed.
    let elsewhere = tokio::net::UdpSocket::bind("127.0.0.2:0").await?;
    let made_up = |nonce: u64| Beat::Ping {
        node: silent.id.clone(),
        incarnation: silent.incarnation,
        nonce,
        mac: [0xAB; 16],
    };
    let spoofing = async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        for nonce in 100u64.. {
            tick.tick().await;
            for old in &recorded {
                own.send_to(old, beat_to).await?;
            }
            own.send_to(&made_up(nonce).encode(), beat_to).await?;
            elsewhere
                .send_to(&silent.ping(nonce).encode(), beat_to)
                .await?;
        }
        Ok::<(), anyhow::Error>(())
    };
    let failed = async {
        loop {
            match events.recv().await? {
                MembershipEvent::Left { id, reason, .. } if id == "silent" => return Ok(reason),
                _ => continue,
            }
        }
    };
    let reason = tokio::select! {
        r = spoofing => { r?; anyhow::bail!("spoofing stopped") }
        r = bounded(failed) => r?,
    };
    ensure!(reason == LeaveReason::Failed, "left for {reason:?}");

    // No pong went to any spoof, and the silent node's connection is closed.
    let mut buf = [0u8; 600];
    for socket in [&own, &elsewhere] {
        ensure!(
            socket.try_recv_from(&mut buf).is_err(),
            "a spoofed ping was answered"
        );
    }
    let closed = bounded(async {
        loop {
            if silent.reader.next().await.ok().flatten().is_none() {
                return Ok(());
            }
        }
    })
    .await;
    ensure!(closed.is_ok(), "the failed node's connection stayed open");
    watcher.shutdown().await;
    Ok(())
}

/// With the cluster secret set everywhere, every path works as without
/// it: the message server, a lazy channel (which proves both ends to each
/// other) and a request with its reply.
#[tokio::test]
async fn a_cluster_with_a_secret_works_on_every_path() -> anyhow::Result<()> {
    init_logging();
    let (_server, addr, config, _file) = guarded_server("secret-paths").await?;
    let a = node("a", &config, addr).await?;
    let b = node("b", &config, addr).await?;
    let mut inbox = b.subscribe("svc").await?;
    exchange(&a, "b", &mut inbox, "small").await?;
    let big = "x".repeat(256 << 10);
    exchange(&a, "b", &mut inbox, &big).await?;
    ensure!(a.counters().lazy_opened == 1, "{:?}", a.counters());
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

/// A registered node keeps heartbeating but never reads its connection.
/// Once its queue and socket are full and a message has waited
/// `message_server.slow_consumer_ms` without the node reading anything,
/// the server cuts it off (it leaves, disconnected: it was never declared
/// failed, as it heartbeats), and the sender learns of the message that
/// did not get through. (Members report a disconnected node as left once
/// it has not come back within the failure timeout.)
#[tokio::test]
async fn a_node_that_never_reads_its_data_is_cut_off_while_it_heartbeats() -> anyhow::Result<()> {
    init_logging();
    let toml = "[cluster]\nheartbeat_interval_ms = 100\nfailure_timeout_ms = 2000\n\
                [message_server]\nslow_consumer_ms = 300\nqueue_bytes = 1048576\n";
    let file = ConfigFile::new("non-reader", toml)?;
    let (_server, addr) =
        clustercomm_tests::spawn_message_server(&["--config", &file.path]).await?;
    let mut config = clustercomm_tests::test_config();
    config.cluster.heartbeat_interval_ms = 100;
    config.cluster.failure_timeout_ms = 2_000;
    config.lazy.threshold_bytes = 1 << 20;
    let watcher = node("watcher", &config, addr).await?;
    let mut events = watcher.membership_events();
    let key = SessionKey::generate()?;
    let hello = raw::hello("deaf", &config.cluster.name, &key);
    let interests = Interests {
        groups: vec![],
        services: vec!["svc".into()],
    };
    let mut deaf = RawNode::register(addr, hello, &interests, key, None).await?;
    let beats = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let heartbeating = async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for nonce in 1u64.. {
            tick.tick().await;
            beats
                .send_to(&deaf.ping(nonce).encode(), deaf.beat_to)
                .await?;
        }
        Ok::<(), anyhow::Error>(())
    };
    let sender = node("sender", &config, addr).await?;
    let body = bytes::Bytes::from(vec![7u8; 16 << 10]);
    let flooding = async {
        loop {
            let sent = sender
                .notify(Target::Node(NodeId::new("deaf")), "svc", body.clone())
                .await;
            // A notify held back while the server said `deaf` was busy
            // fails as stopped once the server cut it off: the cut-off
            // below says the rest.
            let gone = matches!(sent, Err(node_runtime::SendError::TargetStopped { .. }));
            if !gone {
                sent?;
            }
            if gone || sender.late_failures() > 0 {
                // Keep heartbeating; wait for the cut-off below.
                std::future::pending::<()>().await;
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), anyhow::Error>(())
    };
    let cut_off = async {
        loop {
            match events.recv().await? {
                MembershipEvent::Left { id, .. } if id == "deaf" => return Ok(()),
                _ => continue,
            }
        }
    };
    // Without the cut-off it would stay a member for ever: it heartbeats.
    tokio::select! {
        r = heartbeating => { r?; anyhow::bail!("heartbeats stopped") }
        r = flooding => { r?; anyhow::bail!("the flood stopped") }
        r = bounded(cut_off) => r.context("a node that never read was never cut off")?,
    };
    // Its connection was closed by the server: what it had not read ends.
    let closed = bounded(async {
        while let Ok(Some(_)) = deaf.reader.next().await {}
        Ok(())
    })
    .await;
    ensure!(closed.is_ok(), "the cut-off node's connection stayed open");
    ensure!(
        sender.late_failures() >= 1,
        "the sender never learnt of the message that did not get through"
    );
    drop(deaf);
    watcher.shutdown().await;
    sender.shutdown().await;
    Ok(())
}

/// A registered node that flips its busy state as fast as it can would
/// have the server send every member an event per flip. Past
/// `MAX_MEMBER_CHANGES_PER_S` in a second its connection is closed as a
/// protocol violation, and the other members saw no more than that many
/// of its changes; they keep working.
#[tokio::test]
async fn a_node_flapping_its_membership_is_cut_off() -> anyhow::Result<()> {
    use message_server::MAX_MEMBER_CHANGES_PER_S;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use transports::frame::FrameCodec;
    use transports::protocol::{Header, NodeReport};
    use transports::OutFrame;
    init_logging();
    bounded(async {
        let (_server, addr, config, _file) = guarded_server("flap").await?;
        let watcher = node("watcher", &config, addr).await?;
        let mut events = watcher.membership_events();
        let key = SessionKey::generate()?;
        let hello = raw::hello("flapper", &config.cluster.name, &key);
        let RawNode {
            reader, mut writer, ..
        } = RawNode::register(addr, hello, &Interests::default(), key, Some(SECRET)).await?;
        // Every report flips busy: 4 seconds' worth of the cap, in one go.
        let flips = 4 * MAX_MEMBER_CHANGES_PER_S as usize;
        let mut bytes = bytes::BytesMut::new();
        for i in 0..flips {
            let report = Header::Report(NodeReport {
                busy: Some(i % 2 == 0),
                ..NodeReport::default()
            });
            tokio_util::codec::Encoder::encode(
                &mut FrameCodec::new(1 << 20),
                OutFrame::control(report),
                &mut bytes,
            )?;
        }
        // The server may close while this is still being written.
        let _ = writer.write_all(&bytes).await;
        let mut rd = reader.into_inner();
        let mut sink = Vec::new();
        loop {
            match rd.read_buf(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => sink.clear(),
            }
        }
        // What the watcher saw of it, until it left.
        let mut changes = 0u32;
        loop {
            match events.recv().await? {
                MembershipEvent::Updated(m) if m.id == "flapper" => changes += 1,
                MembershipEvent::Left { id, .. } if id == "flapper" => break,
                _ => {}
            }
        }
        println!(
            "{flips} busy flips sent; the watcher saw {changes} before the flapper was cut off"
        );
        ensure!(
            changes <= MAX_MEMBER_CHANGES_PER_S,
            "{changes} changes reached the watcher"
        );
        ensure!(changes > 0, "the first flips are legitimate and pass");
        // The watcher works on.
        let mut inbox = watcher.subscribe("svc").await?;
        exchange(&watcher, "watcher", &mut inbox, "still here").await?;
        Ok(())
    })
    .await
}

/// A sender that ignores "busy" and keeps sending to three receivers that
/// never read would have the server park a full line for each (three
/// times `message_server.park_bytes`), and with enough receivers take the
/// whole memory budget from every other connection's queue. Its parked
/// messages together stay within `message_server.park_sender_bytes`: past
/// it, each message is answered `Overloaded` at once, for its receiver
/// only, and the other nodes keep exchanging messages.
#[tokio::test]
async fn a_sender_ignoring_busy_parks_no_more_than_its_bound() -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    use tokio::io::AsyncWriteExt;
    use transports::frame::FrameCodec;
    use transports::protocol::{DeliveryFailure, Header, MessageHeader, MessageKind};
    use transports::OutFrame;

    const LINE: usize = 1 << 20;
    const SENDER: usize = 2 << 20;
    const BODY: usize = 64 * 1024;
    /// Per receiver: far more than its queue, its socket and a line hold.
    const PER_RECEIVER: usize = 96;
    init_logging();
    bounded(async {
        // Receivers that never read and never heartbeat stay members for
        // the whole test; nothing waits long enough to be cut off.
        let toml = format!(
            "[cluster]\nheartbeat_interval_ms = 100\nfailure_timeout_ms = 60000\n\
             [message_server]\nqueue_frames = 64\nqueue_bytes = 65536\npark_bytes = {LINE}\n\
             park_sender_bytes = {SENDER}\nslow_consumer_ms = 60000\n\
             [tcp]\nsend_buffer_bytes = 65536\n"
        );
        let file = ConfigFile::new("park-bound", &toml)?;
        let (mut server, addr) = clustercomm_tests::spawn_message_server(&[
            "--config",
            &file.path,
            "--monitor",
            "127.0.0.1:0",
        ])
        .await?;
        let monitor = monitor_addr(&mut server).await?;
        let interests = Interests {
            groups: Vec::new(),
            services: vec!["svc".into()],
        };
        let mut receivers = Vec::new();
        for id in ["full-1", "full-2", "full-3"] {
            let key = SessionKey::generate()?;
            let hello = raw::hello(id, "clustercomm", &key);
            receivers.push(RawNode::register(addr, hello, &interests, key, None).await?);
        }
        let key = SessionKey::generate()?;
        let hello = raw::hello("hog", "clustercomm", &key);
        let hog = RawNode::register(addr, hello, &Interests::default(), key, None).await?;
        let (incarnation, mut reader, mut writer) = (hog.incarnation, hog.reader, hog.writer);

        // What the server answers the hog, by receiver and failure.
        let answers = tokio::spawn(async move {
            let mut refused: BTreeMap<String, u64> = BTreeMap::new();
            while let Ok(Some(frame)) = reader.next().await {
                if let Header::Routed(routed) = frame.header() {
                    for (receiver, failure) in &routed.failed {
                        if *failure == DeliveryFailure::ReceiverOverloaded {
                            *refused.entry(receiver.to_string()).or_default() += 1;
                        }
                    }
                }
            }
            refused
        });
        let body = bytes::Bytes::from(vec![0x5au8; BODY]);
        let mut codec = FrameCodec::new(1 << 20);
        let mut seq = 0;
        for _ in 0..PER_RECEIVER {
            for receiver in ["full-1", "full-2", "full-3"] {
                seq += 1;
                let mut frame = bytes::BytesMut::new();
                tokio_util::codec::Encoder::encode(
                    &mut codec,
                    OutFrame::Parts {
                        header: Header::Message(MessageHeader {
                            sender: "hog".into(),
                            incarnation,
                            seq,
                            target: Target::Node(receiver.into()),
                            service: "svc".into(),
                            kind: MessageKind::Send,
                            priority: transports::protocol::Priority::Normal,
                            expires_ms: None,
                        }),
                        body: body.clone(),
                    },
                    &mut frame,
                )?;
                writer.write_all(&frame).await?;
            }
        }
        // Every message read and routed, parked or refused.
        let status = loop {
            let status = monitor_json(monitor, "/api/v1/status").await?;
            if status["counters"]["messages"].as_u64() == Some(seq) {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let parked = status["memory"]["parked_bytes"]
            .as_u64()
            .context("no parked_bytes in the status")? as usize;
        let overloaded = status["counters"]["overloaded"].as_u64().unwrap_or(0);
        println!(
            "{seq} messages of {BODY} B to 3 receivers that never read: {parked} bytes parked \
             (line {LINE}, sender {SENDER}), {overloaded} answered overloaded"
        );
        ensure!(
            parked > LINE,
            "the hog parked {parked} bytes: more than one line's worth was expected, or the test proves nothing"
        );
        ensure!(
            parked <= SENDER,
            "the hog parked {parked} bytes, past park_sender_bytes ({SENDER})"
        );
        ensure!(overloaded > 0, "nothing was refused");

        // The others are not held back.
        let mut config = clustercomm_tests::test_config();
        config.cluster.failure_timeout_ms = 60_000;
        let a = node("honest-a", &config, addr).await?;
        let b = node("honest-b", &config, addr).await?;
        let mut inbox = b.subscribe("svc").await?;
        exchange(&a, "honest-b", &mut inbox, "still here").await?;

        // The hog hears of every refusal, for the receiver it was for.
        drop(writer);
        drop(receivers);
        server.kill().await?;
        let refused = answers.await?;
        println!("refusals the hog heard, by receiver: {refused:?}");
        let heard: u64 = refused.values().sum();
        ensure!(
            heard >= overloaded,
            "the server refused {overloaded}, the hog heard of {heard}"
        );
        Ok(())
    })
    .await
}

/// A registered node sends the message server chunks of frames that break
/// the rules: each time the server closes that node's connection (and
/// nothing else), and a part that declares a frame over the limit is
/// refused before anything is reserved. Two good nodes keep exchanging
/// messages, large ones in parts among them.
#[tokio::test]
async fn broken_parts_cost_the_sender_its_connection_and_nobody_else_anything() -> anyhow::Result<()>
{
    use tokio::io::AsyncWriteExt;
    use transports::frame::{PART_FIRST, PART_LAST};
    init_logging();
    let (_server, addr, mut config, _file) = guarded_server("broken-parts").await?;
    // Bodies of 1 MiB go through the message server, in parts.
    config.lazy.threshold_bytes = 2 << 20;
    config.lazy.auto_activate_messages = 0;
    let a = node("a", &config, addr).await?;
    let b = node("b", &config, addr).await?;
    let mut inbox = b.subscribe("svc").await?;
    fn part(flags: u8, total: Option<u32>, piece: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        transports::frame::put_part_head(&mut v, flags, total, piece.len());
        v.extend_from_slice(piece);
        v
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an unknown lane", part(PART_FIRST | 6, Some(10), b"x")),
        ("a part of nothing", part(2, None, b"x")),
        (
            "over the limit",
            part(PART_FIRST | 2, Some(u32::MAX >> 1), b"x"),
        ),
        (
            "more than declared",
            [
                part(PART_FIRST | 2, Some(3), b"ab"),
                part(PART_LAST | 2, None, b"cd"),
            ]
            .concat(),
        ),
        (
            "not a frame once whole",
            part(PART_FIRST | PART_LAST | 2, Some(4), &[0xff; 4]),
        ),
    ];
    for (i, (case, bytes)) in cases.into_iter().enumerate() {
        let key = SessionKey::generate()?;
        let hello = raw::hello(&format!("mallory-{i}"), &config.cluster.name, &key);
        let interests = Interests {
            groups: vec![],
            services: vec![],
        };
        let mut mallory = RawNode::register(addr, hello, &interests, key, Some(SECRET)).await?;
        mallory.writer.write_all(&bytes).await?;
        let closed = bounded(async {
            loop {
                match mallory.reader.next_raw().await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return Ok(()),
                }
            }
        })
        .await;
        closed.with_context(|| format!("{case}: the server kept the connection"))?;
        exchange(&a, "b", &mut inbox, case).await?;
        let large = "L".repeat(1 << 20);
        exchange(&a, "b", &mut inbox, &large).await?;
    }
    let counters = a.counters();
    ensure!(
        counters.server_bytes >= 5 << 20 && counters.lazy_messages == 0,
        "the large bodies did not go through the message server: {counters:?}"
    );
    Ok(())
}

/// A registered node that marks its `Low` messages is answered with
/// credit for each mark; one that claims credit for a mark the server
/// never wrote to it loses its connection, and nobody else notices.
#[tokio::test]
async fn credit_for_a_mark_never_written_costs_the_node_its_connection() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    use transports::protocol::Header;
    init_logging();
    let (_server, addr, config, _file) = guarded_server("low-credit").await?;
    let a = node("a", &config, addr).await?;
    let b = node("b", &config, addr).await?;
    let mut inbox = b.subscribe("svc").await?;
    let key = SessionKey::generate()?;
    let hello = raw::hello("mallory", &config.cluster.name, &key);
    let interests = Interests {
        groups: vec![],
        services: vec![],
    };
    let mut mallory = RawNode::register(addr, hello, &interests, key, Some(SECRET)).await?;
    let frame = |header: Header| -> anyhow::Result<bytes::BytesMut> {
        let mut buf = bytes::BytesMut::new();
        transports::frame::encode_header(&header, 0, 1 << 20, &mut buf)?;
        Ok(buf)
    };
    // A mark is answered with credit for it.
    mallory
        .writer
        .write_all(&frame(Header::LowMark { mark: 7 })?)
        .await?;
    bounded(async {
        loop {
            let frame = mallory
                .reader
                .next()
                .await?
                .context("the server closed the connection after a mark")?;
            if let Header::LowCredit { mark } = frame.header() {
                ensure!(*mark == 7, "credit for mark {mark}");
                return anyhow::Ok(());
            }
        }
    })
    .await?;
    // Credit for a mark the server never wrote: the connection ends.
    mallory
        .writer
        .write_all(&frame(Header::LowCredit { mark: 1 })?)
        .await?;
    bounded(async {
        loop {
            match mallory.reader.next_raw().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return anyhow::Ok(()),
            }
        }
    })
    .await
    .context("the server kept the connection")?;
    exchange(&a, "b", &mut inbox, "after").await?;
    Ok(())
}

/// A registered node that declares frames in parts and never finishes
/// them holds no more of the message server's memory than its budget
/// has: the frame that does not fit ends its connection before anything
/// is allocated, and what it held is given back, so that good nodes then
/// move bodies that need that memory.
#[tokio::test]
async fn frames_declared_and_never_finished_hold_no_more_than_the_budget() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    use transports::frame::PART_FIRST;
    init_logging();
    const BUDGET: usize = 32 << 20;
    // A failure timeout longer than the test's bound: a stall in a frame
    // is not what ends the connection.
    let toml = format!(
        "[cluster]\ncredentials = \"{SECRET}\"\nheartbeat_interval_ms = 1000\nfailure_timeout_ms = 120000\n\
         [message_server]\nmemory_budget_bytes = {BUDGET}\nmax_connections = 64\n"
    );
    let file = ConfigFile::new("over-budget", &toml)?;
    let (_server, addr) =
        clustercomm_tests::spawn_message_server(&["--config", &file.path]).await?;
    let mut config = clustercomm_tests::test_config();
    config.cluster.credentials = Some(SECRET.into());
    config.cluster.heartbeat_interval_ms = 1000;
    config.cluster.failure_timeout_ms = 120_000;
    // Bodies of 12 MiB go through the message server.
    config.lazy.threshold_bytes = 32 << 20;
    config.lazy.auto_activate_messages = 0;
    let a = node("a", &config, addr).await?;
    let b = node("b", &config, addr).await?;
    let mut inbox = b.subscribe("svc").await?;
    let key = SessionKey::generate()?;
    let mut hello = raw::hello("mallory", &config.cluster.name, &key);
    // Frames of 24 MiB are within its limit.
    hello.max_message_bytes = 64 << 20;
    let interests = Interests {
        groups: vec![],
        services: vec![],
    };
    let mut mallory = RawNode::register(addr, hello, &interests, key, Some(SECRET)).await?;
    // Two frames of 24 MiB begun on two lanes, one byte of each sent:
    // the first fits the budget, the second does not.
    let mut begun = Vec::new();
    for lane in [2u8, 3] {
        transports::frame::put_part_head(&mut begun, PART_FIRST | lane, Some(24 << 20), 1);
        begun.push(b'x');
    }
    mallory.writer.write_all(&begun).await?;
    bounded(async {
        loop {
            match mallory.reader.next_raw().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return anyhow::Ok(()),
            }
        }
    })
    .await
    .context("the server kept the connection of a node over its budget")?;
    // Its 24 MiB were given back: a 12 MiB body (put together at the
    // server, then queued to b) needs 24 MiB of the 32.
    let large = "L".repeat(12 << 20);
    exchange(&a, "b", &mut inbox, &large).await?;
    ensure!(
        a.counters().lazy_messages == 0,
        "the body did not go through the message server"
    );
    Ok(())
}
