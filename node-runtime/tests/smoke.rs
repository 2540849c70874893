//! A quick end-to-end check over loopback: one server, two nodes.

use std::time::Duration;

use message_server::MessageServer;
use node_runtime::{Config, Node, Target};

async fn server() -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let mut config = Config::default();
    config.message_server.listen = "127.0.0.1:0".parse()?;
    let server = MessageServer::bind(config).await?;
    let addr = server.local_addr();
    let task = tokio::spawn(async move {
        let _ = server.run(std::future::pending()).await;
    });
    Ok((addr, task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_notify_request() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::time::timeout(Duration::from_secs(20), async {
        let (addr, _server) = server().await?;
        let a = Node::builder("a").message_server(addr).start().await?;
        let b = Node::builder("b").message_server(addr).start().await?;
        let mut inbox = b.subscribe("echo").await?;
        let echo = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(m) = inbox.recv().await {
                if m.is_request() {
                    m.reply(m.body().clone()).await.expect("reply");
                }
                seen.push(m.body().clone());
                if seen.len() == 3 {
                    break;
                }
            }
            seen
        });
        let report = a.send(Target::Node("b".into()), "echo", "one").await?;
        assert_eq!(report.delivered, vec![node_runtime::NodeId::new("b")]);
        a.notify(Target::Node("b".into()), "echo", "two").await?;
        let reply = a.request(Target::Node("b".into()), "echo", "three").await?;
        assert_eq!(&reply.body[..], b"three");
        assert_eq!(reply.from, "b");
        let seen = echo.await?;
        assert_eq!(seen, vec!["one", "two", "three"]);
        anyhow::Ok(())
    })
    .await?
}

/// Interfaces named in the config: `lo` resolves to loopback and the node
/// listens and announces there; one the host lacks fails the start with
/// an error naming the key and the interface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interfaces_by_name() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(20), async {
        let (addr, _server) = server().await?;
        let mut config = Config::default();
        config.node.direct_interface = Some("lo".into());
        config.node.heartbeat_interface = Some("lo".into());
        let a = Node::builder("a")
            .config(config.clone())
            .message_server(addr)
            .start()
            .await?;
        let direct = a.direct_addr().expect("a direct listener");
        assert!(direct.ip().is_loopback(), "announced {direct}");
        assert_ne!(direct.port(), 0);
        a.shutdown().await;

        config.node.direct_interface = Some("cc-missing0".into());
        let err = Node::builder("b")
            .config(config)
            .message_server(addr)
            .start()
            .await
            .expect_err("no such interface");
        let err = format!("{:#}", anyhow::Error::from(err));
        assert!(
            err.contains(
                "`node.direct_interface`: this host has no network interface \"cc-missing0\""
            ),
            "{err}"
        );
        assert!(err.contains("lo"), "lists what the host has: {err}");
        anyhow::Ok(())
    })
    .await?
}
