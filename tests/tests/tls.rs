//! Mutual TLS against the real `message-server` binary, with certificates
//! made by `clustercomm certs`: a cluster over TLS works on every path; a
//! node with a certificate from another CA is refused; a certificate for
//! one node id cannot register as another. The good nodes keep exchanging
//! messages throughout.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};
use clustercomm_tests::{bounded, init_logging, ConfigFile};
use node_runtime::{Config, Node, NodeError, NodeId, Target};
use transports::handshake::HandshakeError;
use transports::protocol::RefusalReason;

/// A directory of this test's own, removed when dropped.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(name: &str) -> Dir {
    Dir(std::env::temp_dir().join(format!("clustercomm-tls-{name}-{}", std::process::id())))
}

/// The cluster's file: the server's certificate in `[tls]`, each node's in
/// its own section.
fn cluster_file(certs: &Path, nodes: &[&str]) -> String {
    let path = |f: &str| certs.join(f).display().to_string();
    let mut toml = format!(
        "[cluster]\nheartbeat_interval_ms = 200\nfailure_timeout_ms = 1000\n\n\
         [tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        path("ca.pem"),
        path("message-server.pem"),
        path("message-server.key"),
    );
    for node in nodes {
        toml.push_str(&format!(
            "\n[nodes.{node}.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            path(&format!("{node}.pem")),
            path(&format!("{node}.key")),
        ));
    }
    toml
}

fn names(nodes: &[&str]) -> Vec<String> {
    std::iter::once("message-server")
        .chain(nodes.iter().copied())
        .map(str::to_owned)
        .collect()
}

async fn setup(
    name: &str,
    nodes: &[&str],
) -> anyhow::Result<(
    clustercomm_tests::ChildProcess,
    std::net::SocketAddr,
    Config,
    ConfigFile,
    Dir,
)> {
    let certs = dir(name);
    clustercomm::certs::generate(&certs.0, "test", &names(nodes))?;
    let file = ConfigFile::new(name, &cluster_file(&certs.0, nodes))?;
    let (server, addr) = clustercomm_tests::spawn_message_server(&["--config", &file.path]).await?;
    let mut config = Config::load(&file.path)?;
    config.message_server.connect_timeout_ms = 2_000;
    config.node.send_timeout_ms = 5_000;
    Ok((server, addr, config, file, certs))
}

async fn start(id: &str, config: &Config, addr: std::net::SocketAddr) -> Result<Node, NodeError> {
    Node::builder(id)
        .config(config.clone())
        .message_server(addr)
        .start()
        .await
}

#[tokio::test]
async fn a_cluster_over_mutual_tls_works_on_every_path() -> anyhow::Result<()> {
    init_logging();
    let (_server, addr, config, _file, _certs) = setup("paths", &["a", "b"]).await?;
    let a = start("a", &config, addr).await?;
    let b = start("b", &config, addr).await?;
    let mut inbox = b.subscribe("svc").await?;
    for body in [vec![1u8; 128], vec![2u8; 256 << 10]] {
        a.send(Target::Node(NodeId::new("b")), "svc", body.clone())
            .await?;
        let got = bounded(async { inbox.recv().await.context("inbox closed") }).await?;
        ensure!(got.body().len() == body.len());
    }
    ensure!(a.counters().lazy_opened == 1, "{:?}", a.counters());
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn foreign_certificates_and_borrowed_names_are_refused() -> anyhow::Result<()> {
    init_logging();
    let (_server, addr, config, _file, certs) = setup("refusals", &["a", "b"]).await?;
    let b = start("b", &config, addr).await?;
    let mut inbox = b.subscribe("svc").await?;

    // `c` trusts the cluster's CA, but its own certificate is from another.
    let other = dir("other-ca");
    clustercomm::certs::generate(&other.0, "other", &names(&["c"]))?;
    let mut foreign = config.for_node("c")?;
    foreign.tls.cert_file = Some(other.0.join("c.pem"));
    foreign.tls.key_file = Some(other.0.join("c.key"));
    match start("c", &foreign, addr).await {
        Err(NodeError::TlsHandshake { .. } | NodeError::Handshake { .. }) => {}
        Err(e) => anyhow::bail!("expected a refused TLS handshake, got {e:#}"),
        Ok(_) => anyhow::bail!("a certificate from another CA was accepted"),
    }

    // `a`'s certificate cannot register as `x`.
    let mut borrowed = config.for_node("a")?;
    borrowed.nodes.clear();
    match start("x", &borrowed, addr).await {
        Err(NodeError::Handshake {
            source: HandshakeError::Refused { refusal },
            ..
        }) => {
            ensure!(
                refusal.reason == RefusalReason::BadCredentials,
                "{refusal:?}"
            );
            ensure!(
                refusal.detail.contains("does not name"),
                "{}",
                refusal.detail
            );
        }
        Err(e) => anyhow::bail!("expected a refusal for the name, got {e:#}"),
        Ok(_) => anyhow::bail!("a certificate for a registered as x"),
    }

    // A node whose own CA is another does not trust the server.
    let mut distrust = config.for_node("a")?;
    distrust.tls.ca_file = Some(other.0.join("ca.pem"));
    match start("a", &distrust, addr).await {
        Err(NodeError::TlsHandshake { .. }) => {}
        Err(e) => anyhow::bail!("expected a TLS handshake error, got {e:#}"),
        Ok(_) => anyhow::bail!("a node trusted a server of another CA"),
    }

    // The good nodes carry on.
    let a = start("a", &config, addr).await?;
    a.send(Target::Node(NodeId::new("b")), "svc", "still here")
        .await?;
    let got = bounded(async { inbox.recv().await.context("inbox closed") }).await?;
    ensure!(got.body() == "still here");
    drop(certs);
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}
