//! The built-in service `clustercomm.tune`: every node answers it from its
//! start, over either path, whatever its permissions say; applications
//! cannot take its name; it refuses what it cannot take rather than
//! queueing it.

use std::time::Duration;

use anyhow::{ensure, Context};
use message_server::MessageServer;
use node_runtime::{Config, Node, NodeError, SendError, Target, TUNE_SERVICE};

async fn server(config: Config) -> anyhow::Result<std::net::SocketAddr> {
    let mut config = config;
    config.message_server.listen = "127.0.0.1:0".parse()?;
    let server = MessageServer::bind(config).await?;
    let addr = server.local_addr();
    tokio::spawn(async move {
        let _ = server.run(std::future::pending()).await;
    });
    Ok(addr)
}

/// A node whose every body above 0 bytes goes over a lazy channel, or
/// (`lazy = false`) none does.
async fn sender(
    addr: std::net::SocketAddr,
    id: &str,
    config: &Config,
    lazy: bool,
) -> anyhow::Result<Node> {
    let mut config = config.clone();
    if lazy {
        config.lazy.threshold_bytes = 0;
    } else {
        config.lazy.services.clear();
    }
    config.lazy.auto_activate_messages = 0;
    Ok(Node::builder(id)
        .config(config)
        .message_server(addr)
        .ignore_environment()
        .start()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_answers_the_tune_service_over_both_paths() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(30), async {
        // Permissions that name no service: the built-in one is offered
        // all the same (the registration that carries it is not refused).
        let mut config = Config::default();
        config.permissions.subscribe = vec!["app-*".into()];
        let addr = server(config.clone()).await?;
        let target = Node::builder("target")
            .config(config.clone())
            .message_server(addr)
            .ignore_environment()
            .start()
            .await?;
        let via_server = sender(addr, "via-server", &config, false).await?;
        let via_lazy = sender(addr, "via-lazy", &config, true).await?;

        let listed = via_server
            .members()
            .into_iter()
            .find(|m| m.id == "target")
            .context("target is not a member")?;
        ensure!(
            listed.services.iter().any(|s| s == TUNE_SERVICE),
            "{listed:?}"
        );

        let body = vec![7u8; 4096];
        for _ in 0..3 {
            let reply = via_server
                .request(Target::Node("target".into()), TUNE_SERVICE, body.clone())
                .await?;
            ensure!(reply.from == "target" && reply.body.is_empty());
            let reply = via_lazy
                .request(Target::Node("target".into()), TUNE_SERVICE, body.clone())
                .await?;
            ensure!(reply.from == "target" && reply.body.is_empty());
        }
        let (s, l) = (via_server.counters(), via_lazy.counters());
        ensure!(s.server_messages == 3 && s.lazy_messages == 0, "{s:?}");
        ensure!(l.lazy_messages == 3 && l.server_messages == 0, "{l:?}");

        // One-way messages are taken and dropped; the service goes on.
        via_server
            .send(Target::Node("target".into()), TUNE_SERVICE, "x")
            .await?;
        via_server
            .notify(Target::Node("target".into()), TUNE_SERVICE, "x")
            .await?;
        let reply = via_server
            .request(Target::Node("target".into()), TUNE_SERVICE, "")
            .await?;
        ensure!(reply.body.is_empty());

        // The name, and any other with its prefix, is the runtime's.
        for name in [TUNE_SERVICE, "clustercomm.mine"] {
            match target.subscribe(name).await {
                Err(NodeError::Reserved(n)) => ensure!(n == name),
                other => anyhow::bail!("subscribing {name}: {other:?}"),
            }
        }
        Ok(())
    })
    .await
    .context("the test did not finish within 30 s")?
}

/// Many requests at once: each is answered or refused as overloaded, and
/// none waits for the send timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_answered_or_refused_never_left_waiting() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(30), async {
        let config = Config::default();
        let addr = server(config.clone()).await?;
        let _target = Node::builder("target")
            .message_server(addr)
            .ignore_environment()
            .start()
            .await?;
        let node = sender(addr, "burst", &config, false).await?;
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let node = node.clone();
            requests.spawn(async move {
                node.request(Target::Node("target".into()), TUNE_SERVICE, vec![0u8; 1024])
                    .await
            });
        }
        let mut answered = 0;
        while let Some(outcome) = requests.join_next().await {
            match outcome? {
                Ok(reply) => {
                    ensure!(reply.body.is_empty());
                    answered += 1;
                }
                Err(SendError::Overloaded { .. }) => {}
                Err(e) => anyhow::bail!("neither answered nor refused: {e}"),
            }
        }
        ensure!(answered > 0, "none was answered");
        Ok(())
    })
    .await
    .context("the test did not finish within 30 s")?
}
