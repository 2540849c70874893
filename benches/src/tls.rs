//! What the suite's TLS cases run with: certificates made by
//! clustercomm's own generator ([`clustercomm::certs::generate`], as
//! `clustercomm certs` makes them) into a fresh directory under the
//! temporary directory, removed with it on drop ([`Certs`]), and
//! clustercomm's cluster file that uses them ([`TlsCluster`]). One set is
//! made per run for clustercomm and one for the nats.go peer's TLS server
//! ([`crate::nats_go`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{ensure, Context};
use cluster_config::{Config, DEFAULT_TLS_SERVER_NAME};

/// The cluster name the CA is made for (it only names the CA).
pub const CLUSTER: &str = "bench";

/// A certificate and its private key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A CA and a certificate for each of a few names, in a directory of
/// their own that is removed on drop.
#[derive(Debug)]
pub struct Certs {
    dir: PathBuf,
    ca: PathBuf,
    issued: Vec<(String, Identity)>,
}

impl Certs {
    /// Makes a CA and a certificate for each of `names` (each good for
    /// both ends of a connection) in a fresh directory named after
    /// `label`. A name is a DNS name (a node id, the message server's
    /// name) or an IP address, which rcgen makes an IP address SAN (what
    /// a client that dials `127.0.0.1` checks).
    ///
    /// # Errors
    ///
    /// A name that cannot be a certificate's, or a file that cannot be
    /// written (the directory is then removed).
    pub fn generate(label: &str, names: &[&str]) -> anyhow::Result<Certs> {
        static DIRS: AtomicU64 = AtomicU64::new(0);
        let n = DIRS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "clustercomm-bench-{label}-{}-{n}-certs",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        // Owned from here on: removed however this ends.
        let mut certs = Certs {
            dir,
            ca: PathBuf::new(),
            issued: Vec::new(),
        };
        let names: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
        let written = clustercomm::certs::generate(&certs.dir, CLUSTER, &names)
            .with_context(|| format!("making certificates in {}", certs.dir.display()))?;
        certs.ca = written.ca;
        certs.issued = written
            .issued
            .into_iter()
            .map(|(name, cert, key)| (name, Identity { cert, key }))
            .collect();
        Ok(certs)
    }

    /// The directory everything is in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// The certificate and key issued to `name`.
    ///
    /// # Errors
    ///
    /// If none was.
    pub fn identity(&self, name: &str) -> anyhow::Result<&Identity> {
        self.issued
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, identity)| identity)
            .with_context(|| format!("no certificate was made for {name:?}"))
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster configuration with mutual TLS: a CA and certificates for
/// the message server ([`DEFAULT_TLS_SERVER_NAME`]) and each of a few
/// nodes, and `cluster.toml` beside them with `[tls]` and a
/// `[nodes.<id>.tls]` section per node, as `clustercomm certs` prints
/// them. The message server loads the file; a node takes its sections
/// with [`TlsCluster::apply`]. Its directory is removed on drop.
#[derive(Debug)]
pub struct TlsCluster {
    /// The loaded `cluster.toml`: its `tls` and `nodes` are what nodes
    /// take.
    config: Config,
    file: PathBuf,
    certs: Certs,
}

impl TlsCluster {
    /// Makes the certificates for the server and `nodes` (node ids), and
    /// writes and loads the cluster file.
    ///
    /// # Errors
    ///
    /// If the certificates or the file could not be written, or the file
    /// does not load.
    pub fn generate(nodes: &[&str]) -> anyhow::Result<TlsCluster> {
        let mut names = vec![DEFAULT_TLS_SERVER_NAME];
        names.extend(nodes);
        let certs = Certs::generate("ours-tls", &names)?;
        let server = certs.identity(DEFAULT_TLS_SERVER_NAME)?;
        let mut text = format!(
            "[tls]\nca_file = {}\ncert_file = {}\nkey_file = {}\nserver_name = {:?}\n",
            quoted(certs.ca()),
            quoted(&server.cert),
            quoted(&server.key),
            DEFAULT_TLS_SERVER_NAME,
        );
        for id in nodes {
            let node = certs.identity(id)?;
            text.push_str(&format!(
                "\n[nodes.{id}.tls]\ncert_file = {}\nkey_file = {}\n",
                quoted(&node.cert),
                quoted(&node.key)
            ));
        }
        let file = certs.dir().join("cluster.toml");
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        let config = Config::load(&file).with_context(|| format!("loading {}", file.display()))?;
        ensure!(
            config.tls.enabled(),
            "{} does not turn TLS on",
            file.display()
        );
        Ok(TlsCluster {
            config,
            file,
            certs,
        })
    }

    /// The cluster file (for the message server's `--config`).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The directory of the certificates and the cluster file.
    pub fn dir(&self) -> &Path {
        self.certs.dir()
    }

    /// `config` with this cluster's `[tls]` and `[nodes.<id>.tls]`
    /// sections, for node `id` (its builder merges its own section in,
    /// [`Config::for_node`]).
    ///
    /// # Errors
    ///
    /// If `id` has no certificate here.
    pub fn apply(&self, id: &str, config: &Config) -> anyhow::Result<Config> {
        ensure!(
            self.config.nodes.contains_key(id),
            "{id} has no certificate in the TLS cluster"
        );
        let mut config = config.clone();
        config.tls = self.config.tls.clone();
        config.nodes = self.config.nodes.clone();
        Ok(config)
    }
}

/// `path` as a TOML (and nats-server configuration) string.
pub fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_made_and_removed_with_their_directory() {
        let certs = Certs::generate("test", &["message-server", "127.0.0.1"]).expect("certs");
        let dir = certs.dir().to_owned();
        assert!(certs.ca().starts_with(&dir) && certs.ca().is_file());
        for name in ["message-server", "127.0.0.1"] {
            let id = certs.identity(name).expect("issued");
            assert!(id.cert.is_file() && id.key.is_file(), "{id:?}");
        }
        assert!(certs.identity("someone-else").is_err());
        let again = Certs::generate("test", &["a"]).expect("a second set");
        assert_ne!(again.dir(), dir, "each set has its own directory");
        drop(certs);
        assert!(!dir.exists(), "{} left behind", dir.display());
        assert!(Certs::generate("test", &["under_score"]).is_err());
        assert_eq!(quoted(Path::new("/tmp/a b/c.pem")), "\"/tmp/a b/c.pem\"");
    }

    #[test]
    fn the_tls_cluster_gives_each_node_its_own_certificate() {
        let nodes = ["sender", "receiver"];
        let tls = TlsCluster::generate(&nodes).expect("a TLS cluster");
        let dir = tls.dir().to_owned();
        assert!(tls.file().starts_with(&dir));
        // The message server's view of the file.
        let server = Config::load(tls.file()).expect("loads");
        let server_cert = server.tls.cert_file.expect("a server certificate");
        assert!(server_cert.ends_with(format!("{DEFAULT_TLS_SERVER_NAME}.pem")));
        let mut case = Config::default();
        case.lazy.auto_activate_messages = 0;
        for id in nodes {
            // What a node builder makes of a case's configuration.
            let config = tls.apply(id, &case).expect("applies");
            assert_eq!(
                config.lazy.auto_activate_messages, 0,
                "the case's keys stay"
            );
            let seen = config.for_node(id).expect("merges");
            assert!(seen.tls.enabled(), "{id}");
            let cert = seen.tls.cert_file.expect("a certificate");
            assert!(
                cert.ends_with(format!("{id}.pem")),
                "{id}: {}",
                cert.display()
            );
            assert!(cert.is_file() && seen.tls.key_file.is_some_and(|k| k.is_file()));
        }
        assert!(tls.apply("someone-else", &case).is_err());
        drop(tls);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
