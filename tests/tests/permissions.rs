//! Per-node permissions from the cluster's one file, enforced by the real
//! `message-server` binary and by every node's direct listener: a denied
//! join refuses the registration, a denied subscription is an error, and a
//! denied send is refused on every path (message server, lazy channel,
//! lazy fan-out, session channel). What is permitted keeps working.

use anyhow::{ensure, Context};
use clustercomm_tests::{bounded, init_logging, ConfigFile};
use node_runtime::{Config, Node, NodeError, NodeId, Role, SendError, Target};
use transports::handshake::HandshakeError;
use transports::protocol::RefusalReason;

/// `limited` may offer `cache-*`, join `web`, and send to the group `web`
/// and to `open-*` nodes; `d`, a dispatcher of `web`, may send only to
/// `open-*` nodes. Everyone else may do anything.
const FILE: &str = r#"
[cluster]
heartbeat_interval_ms = 200
failure_timeout_ms = 1000

[nodes.limited.permissions]
subscribe = ["cache-*"]
join = ["web"]
send = ["group:web", "node:open-*"]

[nodes.d.permissions]
send = ["node:open-*"]
"#;

async fn setup(
    name: &str,
) -> anyhow::Result<(
    clustercomm_tests::ChildProcess,
    std::net::SocketAddr,
    Config,
    ConfigFile,
)> {
    let file = ConfigFile::new(name, FILE)?;
    let (server, addr) = clustercomm_tests::spawn_message_server(&["--config", &file.path]).await?;
    let mut config = Config::load(&file.path)?;
    config.message_server.connect_timeout_ms = 2_000;
    config.message_server.reconnect_delay_ms = 50;
    config.node.send_timeout_ms = 5_000;
    Ok((server, addr, config, file))
}

async fn start(
    id: &str,
    config: &Config,
    addr: std::net::SocketAddr,
    groups: &[&str],
    role: Role,
) -> Result<Node, NodeError> {
    Node::builder(id)
        .config(config.clone())
        .message_server(addr)
        .groups(groups.iter().copied())
        .role(role)
        .start()
        .await
}

/// Waits (bounded) until `condition` holds, looking every 2 ms.
async fn wait_until(what: &str, condition: impl Fn() -> bool) -> anyhow::Result<()> {
    bounded(async {
        while !condition() {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        Ok(())
    })
    .await
    .context(what.to_owned())
}

fn not_permitted(r: &Result<node_runtime::DeliveryReport, SendError>) -> bool {
    matches!(r, Err(SendError::NotPermitted { .. }))
}

#[tokio::test]
async fn joins_and_subscriptions_outside_a_nodes_permissions_are_refused() -> anyhow::Result<()> {
    init_logging();
    let (_server, addr, config, _file) = setup("perm-join").await?;
    match start("limited", &config, addr, &["web", "admin"], Role::Server).await {
        Err(NodeError::Handshake {
            source: HandshakeError::Refused { refusal },
            ..
        }) => {
            ensure!(refusal.reason == RefusalReason::NotPermitted, "{refusal:?}");
            ensure!(refusal.detail.contains("admin"), "{}", refusal.detail);
        }
        Err(e) => anyhow::bail!("expected a refusal for the group, got {e:#}"),
        Ok(_) => anyhow::bail!("a node joined a group it may not join"),
    }
    let limited = start("limited", &config, addr, &["web"], Role::Server).await?;
    match limited.subscribe("orders").await {
        Err(NodeError::NotPermitted(reason)) => {
            ensure!(reason.contains("orders"), "{reason}")
        }
        other => anyhow::bail!("expected a refused subscription, got {other:?}"),
    }
    let mut cache = limited.subscribe("cache-users").await?;
    // The refused service is not offered; the permitted one is.
    let other = start("open-1", &config, addr, &[], Role::Server).await?;
    let r = other
        .send(Target::Node(NodeId::new("limited")), "orders", "x")
        .await;
    ensure!(
        matches!(r, Err(SendError::NoSuchService { .. })),
        "a refused subscription still took messages: {r:?}"
    );
    other
        .send(Target::Node(NodeId::new("limited")), "cache-users", "y")
        .await?;
    let got = bounded(async { cache.recv().await.context("inbox closed") }).await?;
    ensure!(got.body() == "y");
    limited.shutdown().await;
    other.shutdown().await;
    Ok(())
}

/// A service offered from the start (`NodeBuilder::subscribe`) is checked
/// with the registration: one outside the node's permissions refuses it,
/// naming the service; a permitted one is offered from the first moment.
#[tokio::test]
async fn services_offered_from_the_start_outside_a_nodes_permissions_are_refused(
) -> anyhow::Result<()> {
    init_logging();
    let (_server, addr, config, _file) = setup("perm-offered").await?;
    let offered = |service: &str| {
        Node::builder("limited")
            .config(config.clone())
            .message_server(addr)
            .groups(["web"])
            .subscribe(service)
            .start()
    };
    match offered("orders").await {
        Err(NodeError::Handshake {
            source: HandshakeError::Refused { refusal },
            ..
        }) => {
            ensure!(refusal.reason == RefusalReason::NotPermitted, "{refusal:?}");
            ensure!(refusal.detail.contains("orders"), "{}", refusal.detail);
        }
        Err(e) => anyhow::bail!("expected a refusal for the service, got {e:#}"),
        Ok(_) => anyhow::bail!("a node offered a service it may not offer"),
    }
    let limited = offered("cache-users").await?;
    let mut cache = limited
        .take_inbox("cache-users")
        .context("the offered service's inbox")?;
    let other = start("open-1", &config, addr, &[], Role::Server).await?;
    other
        .send(Target::Node(NodeId::new("limited")), "cache-users", "y")
        .await?;
    let got = bounded(async { cache.recv().await.context("inbox closed") }).await?;
    ensure!(got.body() == "y");
    limited.shutdown().await;
    other.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_send_outside_a_nodes_permissions_is_refused_on_every_path() -> anyhow::Result<()> {
    init_logging();
    let (_server, addr, config, _file) = setup("perm-send").await?;
    let limited = start("limited", &config, addr, &["web"], Role::Server).await?;
    let b = start("b", &config, addr, &["web"], Role::Server).await?;
    let mut b_inbox = b.subscribe("svc").await?;
    let open = start("open-1", &config, addr, &[], Role::Server).await?;
    let mut open_inbox = open.subscribe("svc").await?;
    let small = "small".to_owned();
    let big = "x".repeat(256 << 10);

    // Through the message server: another node, every node.
    let r = limited
        .send(Target::Node(NodeId::new("b")), "svc", small.clone())
        .await;
    ensure!(not_permitted(&r), "server path, node: {r:?}");
    let r = limited.send(Target::All, "svc", small.clone()).await;
    ensure!(not_permitted(&r), "server path, all: {r:?}");
    // Over a lazy channel: the receiver refuses (the server never sees it).
    let r = limited
        .send(Target::Node(NodeId::new("b")), "svc", big.clone())
        .await;
    ensure!(not_permitted(&r), "lazy channel: {r:?}");
    ensure!(
        b.counters().refused_not_permitted == 1,
        "{:?}",
        b.counters()
    );
    // A lazy fan-out: its member list is refused.
    let r = limited.send(Target::All, "svc", big.clone()).await;
    ensure!(not_permitted(&r), "lazy fan-out: {r:?}");
    ensure!(b_inbox.try_recv().is_none(), "b got a refused message");

    // Permitted: its group, and `open-*` nodes, on both paths.
    limited
        .send(Target::Group("web".into()), "svc", small.clone())
        .await?;
    let got = bounded(async { b_inbox.recv().await.context("inbox closed") }).await?;
    ensure!(got.body() == "small");
    for body in [&small, &big] {
        limited
            .send(Target::Node(NodeId::new("open-1")), "svc", body.clone())
            .await?;
        let got = bounded(async { open_inbox.recv().await.context("inbox closed") }).await?;
        ensure!(got.body().len() == body.len());
    }

    // A dispatcher's session channel to a server of its group: refused by
    // the receiver, counted at the sender, never delivered.
    let d = start("d", &config, addr, &["web"], Role::Dispatcher).await?;
    wait_until("the session channel to b is open", || {
        d.counters().session_opened >= 1
    })
    .await?;
    d.session(&NodeId::new("b"), "svc", "via session").await?;
    wait_until("the refusal reached the dispatcher", || {
        d.late_failures() >= 1
    })
    .await?;
    ensure!(
        b_inbox.try_recv().is_none(),
        "b got a refused session message"
    );
    ensure!(
        b.counters().refused_not_permitted >= 2,
        "{:?}",
        b.counters()
    );

    for node in [limited, b, open, d] {
        node.shutdown().await;
    }
    Ok(())
}
