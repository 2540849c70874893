//! nats-server for the suite's NATS peers ([`crate::nats`] with async-nats,
//! [`crate::nats_go`] with nats.go): finds the binary (installing the
//! Debian package with `apt-get` if it is missing), starts it on a free
//! loopback port with a given configuration (mutual TLS included, see
//! [`ServerSetup::with_tls`]), waits until it answers, and on drop kills
//! it, reaps it and removes its files.
//!
//! Also the process helpers both peers share: [`find_on_path`],
//! [`apt_install`] (which installs the Go toolchain and nats.go too),
//! [`wait_child`] and [`KilledOnDrop`]. Child processes are `std` ones
//! (the crate's tokio has no `process` feature): waiting polls
//! `try_wait`, so it never blocks the runtime, and a killed child is
//! reaped at once.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::ConnectOptions;
use tokio::time::Instant;

use crate::tls::{quoted, Identity};

/// The `max_payload` a server is configured with: 64 MB, NATS's
/// documented maximum. A body larger than what the server announces is
/// skipped.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// The server's `max_pending` (bytes it buffers for one slow client); it
/// must be at least [`MAX_PAYLOAD`], and is larger so that a few bulk
/// bodies in flight never make the receiver a slow consumer.
pub const MAX_PENDING: usize = 4 * MAX_PAYLOAD;

/// The `timeout` of a TLS server's `tls` block: seconds a client has to
/// finish its handshake (nats-server's default is 2; a loaded two-core
/// machine can take longer).
pub const TLS_TIMEOUT_SECS: u64 = 5;

/// Upper bound on nats-server starting to accept connections.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bound on each `apt-get` command.
pub const APT_TIMEOUT: Duration = Duration::from_secs(600);

/// How often [`wait_child`] looks whether its child has exited.
pub const CHILD_POLL: Duration = Duration::from_millis(10);

/// Where Debian and hand installs put binaries, looked at after `PATH`
/// (the package installs `/usr/sbin/nats-server`, and some environments
/// leave the `sbin` directories off `PATH`).
const USUAL_DIRS: &[&str] = &["/usr/local/bin", "/usr/local/sbin", "/usr/bin", "/usr/sbin"];

/// What a server is started with beyond its address: configuration text,
/// extra arguments, and directories it owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSetup {
    /// Names the server in stderr messages and its files' names (`nats`,
    /// `nats-go`, `nats-go-js`).
    pub label: String,
    /// The configuration file's text.
    pub config: String,
    /// Arguments after `-c CONFIG -a 127.0.0.1 -p PORT`.
    pub args: Vec<OsString>,
    /// Directories the server owns: created empty before it starts,
    /// removed with their contents when it is dropped.
    pub owned_dirs: Vec<PathBuf>,
    /// Mutual TLS, if the server requires it.
    pub tls: Option<ServerTls>,
}

/// What a server that requires mutual TLS is given, and what its clients
/// present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The CA certificate: the server verifies clients against it, and
    /// clients the server.
    pub ca: PathBuf,
    /// The server's certificate (naming `127.0.0.1`, the address clients
    /// dial) and key.
    pub server: Identity,
    /// A client certificate and key from the same CA.
    pub client: Identity,
}

impl ServerSetup {
    /// A core NATS server: `max_payload` raised to [`MAX_PAYLOAD`] and
    /// `max_pending` to [`MAX_PENDING`], nothing else.
    pub fn core(label: &str) -> ServerSetup {
        ServerSetup {
            label: label.to_owned(),
            config: format!("max_payload: {MAX_PAYLOAD}\nmax_pending: {MAX_PENDING}\n"),
            args: Vec::new(),
            owned_dirs: Vec::new(),
            tls: None,
        }
    }

    /// The same server requiring mutual TLS: a `tls` block with the
    /// server's certificate and key, the CA clients are verified against,
    /// `verify: true` (a client without a certificate from the CA is
    /// refused) and [`TLS_TIMEOUT_SECS`]. Its readiness check connects
    /// with `tls.client`.
    pub fn with_tls(mut self, tls: ServerTls) -> ServerSetup {
        self.config.push_str(&format!(
            "tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: true\n  \
             timeout: {TLS_TIMEOUT_SECS}\n}}\n",
            quoted(&tls.server.cert),
            quoted(&tls.server.key),
            quoted(&tls.ca)
        ));
        self.tls = Some(tls);
        self
    }

    /// The same server with JetStream enabled (`-js`), file storage in a
    /// fresh directory under the temporary directory (`-sd`), removed
    /// when the server is dropped.
    pub fn jetstream(label: &str) -> ServerSetup {
        static STORES: AtomicU64 = AtomicU64::new(0);
        let n = STORES.fetch_add(1, Ordering::Relaxed);
        let store = std::env::temp_dir().join(format!(
            "clustercomm-bench-{label}-{}-{n}-store",
            std::process::id()
        ));
        let mut setup = ServerSetup::core(label);
        setup.args = vec!["-js".into(), "-sd".into(), store.clone().into()];
        setup.owned_dirs.push(store);
        setup
    }
}

/// A running nats-server on a loopback port; dropping it kills and reaps
/// the process, then removes its configuration, log and owned
/// directories.
pub struct NatsServer {
    // Declared first: dropped (killed and reaped) before its files go.
    child: KilledOnDrop,
    _files: OwnedFiles,
    url: String,
    max_payload: usize,
    jetstream: bool,
    tls: Option<ServerTls>,
}

impl NatsServer {
    /// Finds (or installs) nats-server, starts it with `setup` on a free
    /// loopback port and waits until it accepts a client and answers a
    /// round trip. Says on stderr what it started (and what it installed).
    ///
    /// # Errors
    ///
    /// A reason, if nats-server is not on `PATH` and could not be
    /// installed (see [`nats_server_binary`]), if its files could not be
    /// written, or if it did not start and accept a client within
    /// [`STARTUP_TIMEOUT`] (with the end of its log).
    pub async fn start(setup: ServerSetup) -> Result<NatsServer, String> {
        let binary = nats_server_binary(&setup.label).await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free loopback port: {e}"))?
            .port();
        let stem = format!(
            "clustercomm-bench-{}-{}-{port}",
            setup.label,
            std::process::id()
        );
        let config = std::env::temp_dir().join(format!("{stem}.conf"));
        let log = std::env::temp_dir().join(format!("{stem}.log"));
        // Everything created from here on is removed however this ends.
        let files = OwnedFiles {
            files: vec![config.clone(), log.clone()],
            dirs: setup.owned_dirs.clone(),
        };
        for dir in &files.dirs {
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        std::fs::write(&config, &setup.config)
            .map_err(|e| format!("writing {}: {e}", config.display()))?;
        let log_file =
            File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let log_file2 = log_file
            .try_clone()
            .map_err(|e| format!("duplicating the log file handle: {e}"))?;
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(&setup.args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_file2)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let mut server = NatsServer {
            child: KilledOnDrop(child),
            _files: files,
            url: format!("nats://127.0.0.1:{port}"),
            max_payload: 0,
            jetstream: false,
            tls: setup.tls.clone(),
        };
        // `server` is dropped (killed, its files removed) on every early
        // return.
        server.wait_ready().await.map_err(|e| {
            let tail = log_tail(&log);
            format!("{} did not start: {e:#}{tail}", binary.display())
        })?;
        eprintln!(
            "{}: {} listening on {} (max_payload {} bytes{}{})",
            setup.label,
            binary.display(),
            server.url,
            server.max_payload,
            if server.jetstream { ", JetStream" } else { "" },
            if server.tls.is_some() {
                ", mutual TLS"
            } else {
                ""
            }
        );
        Ok(server)
    }

    /// The server's client URL (`nats://127.0.0.1:PORT`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The largest payload the server accepts, as it announced it.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// The server's TLS, if it requires it.
    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.as_ref()
    }

    /// Whether the server announced JetStream.
    pub fn jetstream(&self) -> bool {
        self.jetstream
    }

    /// Waits for the port, then connects, checks a round trip and reads
    /// what the server announced.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let addr = self.url.trim_start_matches("nats://").to_owned();
        loop {
            if let Some(status) = self.child.0.try_wait()? {
                bail!("nats-server exited ({status})");
            }
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("no connection accepted within {STARTUP_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut connect = ConnectOptions::new().name("bench-ready");
        if let Some(tls) = &self.tls {
            connect = connect
                .require_tls(true)
                .add_root_certificates(tls.ca.clone())
                .add_client_certificate(tls.client.cert.clone(), tls.client.key.clone());
        }
        let client = tokio::time::timeout(remaining, connect.connect(self.url.as_str()))
            .await
            .context("connecting timed out")?
            .context("connecting")?;
        // A round trip (a request no one answers, which the server turns
        // down); `Client::flush` would not be one.
        tokio::time::timeout(STARTUP_TIMEOUT, client.request("bench.ready", "".into()))
            .await
            .context("the first round trip timed out")?
            .map(|_| ())
            .or_else(|e| match e.kind() {
                // No one answers: the server did.
                async_nats::RequestErrorKind::NoResponders => Ok(()),
                _ => Err(e),
            })
            .context("the first round trip")?;
        let info = client.server_info();
        self.max_payload = info.max_payload;
        self.jetstream = info.jetstream;
        Ok(())
    }
}

/// Files and directories removed on drop.
struct OwnedFiles {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Drop for OwnedFiles {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A child process, killed (SIGKILL) and reaped when dropped; reaping a
/// killed process does not wait on anything it does.
#[derive(Debug)]
pub struct KilledOnDrop(pub Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `child` to exit, looking every [`CHILD_POLL`]; kills and
/// reaps it after `timeout`.
///
/// # Errors
///
/// A reason, if it was killed after `timeout` or could not be waited on.
pub async fn wait_child(child: &mut Child, timeout: Duration) -> Result<ExitStatus, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("killed after {timeout:?}"));
            }
            Ok(None) => tokio::time::sleep(CHILD_POLL).await,
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// `name` in a directory of `PATH` (or of the usual binary directories,
/// `/usr/sbin` among them), if it is an executable file there.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(USUAL_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The nats-server binary: the one on `PATH`, else the one the Debian
/// package `nats-server` installs (installed now, said on stderr with
/// `label` in front).
///
/// # Errors
///
/// A reason, if it is not on `PATH` and installing it did not put it
/// there.
pub async fn nats_server_binary(label: &str) -> Result<PathBuf, String> {
    if let Some(binary) = find_on_path("nats-server") {
        return Ok(binary);
    }
    eprintln!("{label}: nats-server is not on PATH");
    let installed = apt_install(label, &["nats-server"]).await;
    match (find_on_path("nats-server"), installed) {
        (Some(binary), _) => {
            eprintln!("{label}: installed {}", binary.display());
            Ok(binary)
        }
        (None, Err(e)) => Err(format!("nats-server not on PATH and not installable: {e}")),
        (None, Ok(())) => Err("the nats-server package installed no nats-server binary".to_owned()),
    }
}

/// Installs the Debian `packages` with `apt-get install -y`, running
/// `apt-get update` first only if a plain install fails. Says what it
/// runs on stderr (with `label` in front); apt's own output goes to
/// stderr too.
///
/// # Errors
///
/// A reason, if the install still fails after an update (not root, no
/// network and no package lists, no such package), or an `apt-get` did
/// not finish within [`APT_TIMEOUT`].
pub async fn apt_install(label: &str, packages: &[&str]) -> Result<(), String> {
    let mut install = vec!["install", "-y", "-q"];
    install.extend_from_slice(packages);
    eprintln!("{label}: running `apt-get {}`", install.join(" "));
    let Err(e) = apt(&install).await else {
        return Ok(());
    };
    eprintln!("{label}: {e}; running `apt-get update` and installing again");
    apt(&["update", "-q"]).await?;
    apt(&install).await
}

/// Runs `apt-get ARGS` non-interactively, its output on stderr, killed
/// after [`APT_TIMEOUT`].
async fn apt(args: &[&str]) -> Result<(), String> {
    let what = format!("`apt-get {}`", args.join(" "));
    let child = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::from(std::io::stderr()))
        .spawn()
        .map_err(|e| format!("{what} could not start: {e}"))?;
    let mut child = KilledOnDrop(child);
    let status = wait_child(&mut child.0, APT_TIMEOUT)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

/// The last lines of a log file, for an error message (empty if there
/// are none).
pub fn log_tail(log: &Path) -> String {
    const LINES: usize = 5;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
    if tail.is_empty() {
        String::new()
    } else {
        format!("; its log ends:\n{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setups_say_what_the_server_gets() {
        let core = ServerSetup::core("t");
        assert!(core.config.contains(&format!("max_payload: {MAX_PAYLOAD}")));
        assert!(core.args.is_empty() && core.owned_dirs.is_empty());
        let a = ServerSetup::jetstream("t");
        let b = ServerSetup::jetstream("t");
        assert_eq!(a.config, core.config);
        assert_eq!(a.args[..2], ["-js", "-sd"].map(OsString::from));
        assert_eq!(a.owned_dirs.len(), 1);
        assert_eq!(a.args[2], a.owned_dirs[0].as_os_str());
        assert_ne!(a.owned_dirs, b.owned_dirs, "each store is fresh");
        let id = |name: &str| Identity {
            cert: PathBuf::from(format!("/c/{name}.pem")),
            key: PathBuf::from(format!("/c/{name}.key")),
        };
        let tls = ServerSetup::core("t").with_tls(ServerTls {
            ca: PathBuf::from("/c/ca.pem"),
            server: id("127.0.0.1"),
            client: id("client"),
        });
        assert!(tls.config.starts_with(&core.config));
        for line in [
            "cert_file: \"/c/127.0.0.1.pem\"",
            "key_file: \"/c/127.0.0.1.key\"",
            "ca_file: \"/c/ca.pem\"",
            "verify: true",
        ] {
            assert!(tls.config.contains(line), "{line} in {}", tls.config);
        }
        assert!(core.tls.is_none() && tls.tls.is_some());
    }

    #[test]
    fn binaries_are_found_and_missing_ones_are_not() {
        assert!(find_on_path("sh").is_some());
        assert_eq!(find_on_path("no-such-binary-clustercomm"), None);
    }

    #[tokio::test]
    async fn a_child_past_its_time_is_killed() {
        let child = Command::new("sleep").arg("10").spawn().expect("sleep runs");
        let mut child = KilledOnDrop(child);
        let started = Instant::now();
        let waited = wait_child(&mut child.0, Duration::from_millis(50)).await;
        assert!(waited.is_err(), "{waited:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let child = Command::new("true").spawn().expect("true runs");
        let mut child = KilledOnDrop(child);
        let status = wait_child(&mut child.0, Duration::from_secs(5)).await;
        assert!(status.is_ok_and(|s| s.success()));
    }
}
