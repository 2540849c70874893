//! Harness for clustercomm's integration and fault tests: an in-process
//! message server, child processes (the `message-server` binary and the
//! `test-node` helper) that print a readiness line and are killed and reaped
//! when dropped, short timings for fast tests, and the [`fault`] ledger
//! that accounts for every message, [`raw`] nodes spoken by hand, and the
//! TCP and UDP fault [`proxy`] that cuts, delays, stalls and resets paths.

pub mod fault;
pub mod hosts;
pub mod proxy;
pub mod raw;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use cluster_config::Config;
use message_server::{MessageServer, ServerHandle};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::oneshot;

/// The next message in `inbox`, waiting at most [`TEST_WAIT`].
///
/// # Errors
///
/// If the inbox closed, or nothing came in time.
pub async fn next_message(
    inbox: &mut node_runtime::Inbox,
) -> anyhow::Result<node_runtime::Message> {
    bounded(async { inbox.recv().await.context("inbox closed") }).await
}

/// Waits (bounded by [`TEST_WAIT`]) until `condition` holds, looking
/// every 5 ms; the error names `what` was awaited.
///
/// # Errors
///
/// If it does not hold in time.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    bounded(async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    })
    .await
    .with_context(|| what.to_owned())
}

/// Waits (bounded) until the server's dead-letter queue satisfies `done`,
/// and returns its state.
///
/// # Errors
///
/// If it does not get there in time.
pub async fn wait_dead_letters(
    server: &ServerHandle,
    done: impl Fn(&transports::protocol::DeadLetterStats) -> bool,
) -> anyhow::Result<transports::protocol::DeadLetterStats> {
    wait_until("the dead-letter queue to get there", || {
        done(&server.dead_letter_stats())
    })
    .await
    .with_context(|| format!("the queue: {:?}", server.dead_letter_stats()))?;
    Ok(server.dead_letter_stats())
}

/// A program a test needs, or an error that says how to get it.
///
/// # Errors
///
/// If `path` does not exist.
pub fn required_tool(path: &str, package: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(path);
    if !path.exists() {
        bail!(
            "{} is missing: install Debian's {package} package (apt-get install {package}; .ci/run does)",
            path.display()
        );
    }
    Ok(path)
}

/// `promtool check metrics` on `text`: it must pass.
///
/// # Errors
///
/// If promtool is missing, fails, or finds the text wrong.
pub async fn promtool_check(text: &str) -> anyhow::Result<()> {
    let promtool = required_tool("/usr/bin/promtool", "prometheus")?;
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = check.stdin.take().context("promtool stdin")?;
    stdin.write_all(text.as_bytes()).await?;
    drop(stdin);
    let out = tokio::time::timeout(TEST_WAIT, check.wait_with_output()).await??;
    ensure!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- the metrics:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Upper bound for any single wait in a test.
pub const TEST_WAIT: Duration = Duration::from_secs(30);

/// Installs a log subscriber honouring `RUST_LOG` (once per process).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A configuration with short timings, for tests: heartbeat 200 ms,
/// failure timeout 1 s, send timeout 5 s, reconnect delay 50 ms (at most
/// 500 ms), listening on an ephemeral loopback port.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.message_server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.cluster.heartbeat_interval_ms = 200;
    config.cluster.failure_timeout_ms = 1_000;
    config.node.send_timeout_ms = 5_000;
    config.message_server.connect_timeout_ms = 2_000;
    config.message_server.reconnect_delay_ms = 50;
    config.message_server.reconnect_max_delay_ms = 500;
    config
}

/// Runs `f` under [`TEST_WAIT`], so that no test can hang.
///
/// # Errors
///
/// The test's own error, or a timeout.
pub async fn bounded<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(TEST_WAIT, f)
        .await
        .context("test exceeded its time bound")?
}

/// A message server running in this process.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters and members.
    pub handle: ServerHandle,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Starts a server with `config` (use [`test_config`]).
    ///
    /// # Errors
    ///
    /// If the server cannot bind.
    pub async fn start(config: Config) -> anyhow::Result<TestServer> {
        let server = MessageServer::bind(config).await?;
        let addr = server.local_addr();
        let handle = server.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = server
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(TestServer {
            addr,
            handle,
            stop: Some(stop),
            task,
        })
    }

    /// Starts node `id` with `config`, connected to this server (and
    /// deaf to the environment's overrides).
    ///
    /// # Errors
    ///
    /// If the node cannot start.
    pub async fn node(&self, id: &str, config: &Config) -> anyhow::Result<node_runtime::Node> {
        Ok(node_runtime::Node::builder(id)
            .config(config.clone())
            .message_server(self.addr)
            .ignore_environment()
            .start()
            .await?)
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The directory holding the workspace's built binaries (`target/debug`).
///
/// # Errors
///
/// If the test binary's own path has no parent.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/debug/deps/<test> -> target/debug
    let deps = exe.parent().context("test binary has no directory")?;
    let dir = if deps.ends_with("deps") {
        deps.parent().context("no target directory")?
    } else {
        deps
    };
    Ok(dir.to_path_buf())
}

/// Path of the `message-server` binary built by `cargo test --workspace`
/// (or named by `CLUSTERCOMM_MESSAGE_SERVER_BIN`).
///
/// # Errors
///
/// If it has not been built.
pub fn message_server_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("CLUSTERCOMM_MESSAGE_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let path = bin_dir()?.join("message-server");
    if !path.exists() {
        bail!(
            "{} is missing: run the tests with `cargo test --workspace`, which builds it",
            path.display()
        );
    }
    Ok(path)
}

/// A child process that printed a readiness line; killed (SIGKILL) and
/// reaped when dropped.
pub struct ChildProcess {
    /// The process.
    pub child: Child,
    /// Its standard output after the readiness line (see
    /// [`ChildProcess::take_stdout`]).
    pub stdout: Option<Lines<BufReader<ChildStdout>>>,
    /// The readiness line.
    pub ready_line: String,
}

impl ChildProcess {
    /// Spawns `cmd` and waits (bounded) for a stdout line starting with
    /// `ready_prefix`.
    ///
    /// # Errors
    ///
    /// If it cannot start, exits, or is not ready in time.
    pub async fn spawn(mut cmd: Command, ready_prefix: &str) -> anyhow::Result<ChildProcess> {
        // Children log to stderr only when asked (RUST_LOG is passed on).
        if std::env::var_os("CLUSTERCOMM_CHILD_LOGS").is_none() {
            cmd.stderr(Stdio::null());
        }
        Self::spawn_keeping_stderr(cmd, ready_prefix).await
    }

    /// [`ChildProcess::spawn`], leaving the command's standard error as the
    /// caller set it (a test that reads the child's log pipes it).
    ///
    /// # Errors
    ///
    /// If it cannot start, exits, or is not ready in time.
    pub async fn spawn_keeping_stderr(
        mut cmd: Command,
        ready_prefix: &str,
    ) -> anyhow::Result<ChildProcess> {
        cmd.stdout(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(TEST_WAIT, async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with(ready_prefix) {
                    return Ok(line);
                }
            }
            bail!("process exited before printing {ready_prefix:?}")
        })
        .await
        .context("process not ready in time")??;
        Ok(ChildProcess {
            child,
            stdout: Some(lines),
            ready_line: ready,
        })
    }

    /// The address at the end of the readiness line (`... listening on
    /// ADDR`).
    ///
    /// # Errors
    ///
    /// If the line does not end with an address.
    pub fn ready_addr(&self) -> anyhow::Result<SocketAddr> {
        let last = self.ready_line.rsplit(' ').next();
        let addr = last.context("no address in the readiness line")?;
        addr.parse()
            .with_context(|| format!("not an address: {addr:?}"))
    }

    /// Takes the process's remaining standard output, line by line.
    ///
    /// # Errors
    ///
    /// If it was taken already.
    pub fn take_stdout(&mut self) -> anyhow::Result<Lines<BufReader<ChildStdout>>> {
        self.stdout.take().context("stdout already taken")
    }

    /// Whether the process is still running (not exited, not reaped).
    pub fn child_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("process already reaped")
    }

    /// Sends `signal` (e.g. `"KILL"`, `"STOP"`, `"CONT"`) with kill(1).
    ///
    /// # Errors
    ///
    /// If kill fails.
    pub async fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid()?.to_string())
            .status()
            .await?;
        if !status.success() {
            bail!("kill -{signal} failed");
        }
        Ok(())
    }

    /// SIGKILL and reap.
    ///
    /// # Errors
    ///
    /// If the process cannot be killed.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// A field of `/proc/<pid>/status` in KiB, such as `VmHWM` (peak
    /// resident memory).
    ///
    /// # Errors
    ///
    /// If the file or field cannot be read.
    pub fn proc_status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?))?;
        status_field(&text, field)
    }
}

/// Starts the `message-server` binary on an ephemeral loopback port and
/// returns it with the address it printed.
///
/// # Errors
///
/// If the binary is missing or does not come up.
pub async fn spawn_message_server(
    extra_args: &[&str],
) -> anyhow::Result<(ChildProcess, SocketAddr)> {
    let mut cmd = Command::new(message_server_bin()?);
    cmd.args(["--listen", "127.0.0.1:0"]).args(extra_args);
    let child = ChildProcess::spawn(cmd, "message-server listening on").await?;
    let addr = child.ready_addr()?;
    Ok((child, addr))
}

/// Starts the `test-node` helper: a node that subscribes `service` and
/// acknowledges everything it receives.
///
/// # Errors
///
/// If it does not come up.
pub async fn spawn_test_node(
    server: SocketAddr,
    id: &str,
    service: &str,
) -> anyhow::Result<ChildProcess> {
    spawn_test_node_with(server, id, service, &[]).await
}

/// [`spawn_test_node`] with extra arguments (`--groups a,b`,
/// `--max-message-bytes N`).
///
/// # Errors
///
/// If it does not come up.
pub async fn spawn_test_node_with(
    server: SocketAddr,
    id: &str,
    service: &str,
    extra: &[&str],
) -> anyhow::Result<ChildProcess> {
    let mut cmd = Command::new(bin_dir()?.join("test-node"));
    let server = server.to_string();
    cmd.args(["--server", &server, "--id", id, "--service", service]);
    cmd.args(extra);
    ChildProcess::spawn(cmd, "ready").await
}

/// A field of this process's `/proc/self/status` in KiB (e.g. `VmHWM`).
///
/// # Errors
///
/// If it cannot be read.
pub fn own_status_kib(field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    status_field(&text, field)
}

fn status_field(text: &str, field: &str) -> anyhow::Result<u64> {
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()?)
}

/// A server's configuration file, removed when dropped.
pub struct ConfigFile {
    dir: std::path::PathBuf,
    /// The file's path.
    pub path: String,
}

impl ConfigFile {
    /// Writes `toml` to a file of this test's own (`name`).
    ///
    /// # Errors
    ///
    /// If the file cannot be written.
    pub fn new(name: &str, toml: &str) -> anyhow::Result<ConfigFile> {
        let dir = std::env::temp_dir().join(format!("clustercomm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("server.toml");
        std::fs::write(&file, toml)?;
        let path = file
            .to_str()
            .context("a temporary path that is not UTF-8")?
            .to_owned();
        Ok(ConfigFile { dir, path })
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The address of the monitor of a `message-server` started with
/// `--monitor`, from its banner line `  monitor      http://ADDR/` (the
/// server's stdout is taken).
///
/// # Errors
///
/// If the banner names no monitor within [`TEST_WAIT`].
pub async fn monitor_addr(server: &mut ChildProcess) -> anyhow::Result<SocketAddr> {
    let mut lines = server.take_stdout()?;
    let url = tokio::time::timeout(TEST_WAIT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.trim().strip_prefix("monitor") {
                return Ok(url.trim().to_owned());
            }
        }
        anyhow::bail!("the server's banner has no monitor line")
    })
    .await
    .map_err(|_| anyhow::anyhow!("no banner in time"))??;
    monitor_url_addr(&url)
}

/// The address of a monitor URL as the server's banner prints it
/// (`http://ADDR/`).
///
/// # Errors
///
/// If it is not such a URL.
pub fn monitor_url_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let addr = url
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix('/'))
        .with_context(|| format!("not a monitor URL: {url:?}"))?;
    addr.parse()
        .with_context(|| format!("not an address: {addr:?}"))
}

/// A plain GET of the monitor's JSON at `path` (HTTP/1.0, the body as it
/// comes; `tests/monitor.rs` checks the response itself).
///
/// # Errors
///
/// If the monitor cannot be reached or the body is not JSON.
pub async fn monitor_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await?;
    let (_, body) = raw.split_once("\r\n\r\n").context("no body")?;
    serde_json::from_str(body).with_context(|| format!("{path} is not JSON: {body}"))
}

/// A directory of its own under the system's temporary directory (for a
/// node's store, `node.data_dir`), removed when dropped.
pub struct DataDir(PathBuf);

impl DataDir {
    /// A new directory name for `name`, unique to this process and moment
    /// (the directory itself is made by whoever writes into it).
    pub fn new(name: &str) -> DataDir {
        DataDir(std::env::temp_dir().join(format!(
            "clustercomm-data-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        )))
    }

    /// Where it is.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
