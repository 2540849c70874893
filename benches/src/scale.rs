//! The scale benchmark (`--bench scale`, and a reduced test): many nodes,
//! spread over several `bench-nodes` processes, on one message server
//! (`bench-message-server`), all on loopback.
//!
//! For one cluster size it measures, in this order:
//!
//! 1. **Convergence**: from the start of the node processes until every
//!    node sees every member.
//! 2. **Membership traffic per join**: ten more nodes join; what the
//!    server wrote (`wchar` of `/proc/<pid>/io`, its sockets included) for
//!    them, less what it writes idle (heartbeat answers) over as long,
//!    divided by ten. Sending deltas, not full lists, it grows linearly
//!    with the cluster; per member it stays flat.
//! 3. **The server's memory and CPU**: `VmRSS`/`VmHWM` after the joins;
//!    CPU time over the convergence and over an idle second.
//! 4. **Broadcast**: one node notifies `All` (128 B); deliveries per second
//!    until every other node has every message.
//! 5. **Failure**: a one-node process is killed (SIGKILL); the time until
//!    no node counts it as a member.
//! 6. **Restart**: the server is killed (SIGKILL) and started again on its
//!    address; the time from its start until every node has registered
//!    again (reconnects carry jitter, so they come spread, not at once).
//!
//! The cluster runs on the defaults' timings (heartbeat 1 s, failure
//! timeout 5 s, reconnect delay 500 ms; beyond 1,000 nodes a failure
//! timeout that grows with the cluster, see [`failure_timeout`]), with the server's connection caps
//! raised for the cluster size, 30 s for a handshake and 300 s for a
//! send (thousands of nodes join at once, and each join is told to every
//! member; each node offers its service from the start, so a join is one
//! membership event, not a join and an update), and each node reading 16 KiB at
//! a time (a
//! node's default 256 KiB read buffer, a thousand times in one process,
//! would measure the bench, not the cluster). The node processes run at a
//! lower priority than the server ([`NODES_NICENESS`]), as if the server
//! had a host of its own.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use futures_util::StreamExt;
use node_runtime::{Config, MembershipEvent, Node, Target};

/// The service every node subscribes, and the broadcast goes to.
pub const SERVICE: &str = "scale";

/// Nodes one `bench-nodes` process runs at most.
pub const NODES_PER_PROCESS: usize = 500;

/// The niceness the `bench-nodes` processes run at. In a real cluster the
/// message server has a host of its own; here thousands of simulated hosts
/// share two cores with it, and at equal priority the server gets one
/// thread's share among twenty busy ones: it falls behind on handshakes
/// and reads, connections time out and rejoin, and what is measured is
/// the starved host, not the server. Lower-priority nodes leave the server
/// the CPU it needs and take the rest.
pub const NODES_NICENESS: u8 = 10;

/// Milliseconds of failure timeout per node in clusters of more than
/// 1,000 nodes (see [`failure_timeout`]).
pub const FAILURE_TIMEOUT_MS_PER_NODE: u64 = 30;

/// The failure timeout a cluster of `nodes` runs with: the default (5 s)
/// up to 1,000 nodes (the size the targets are set at), and
/// [`FAILURE_TIMEOUT_MS_PER_NODE`] per node beyond (150 s at 5,000).
///
/// Every node learns of every join (each node offers its service from the
/// start, so a join is one event), so the membership work of a cluster's
/// start grows with the square of its size: spread over thousands of hosts
/// it is a few milliseconds each, but here two cores do all of it. At
/// 5,000 nodes that is about 25 million member updates applied (welcomes
/// and joins), tens of seconds of CPU, during which each simulated host
/// gets a sliver of a core and its report to the server waits behind its
/// process's other 499 nodes: on the default timeout they were declared
/// failed, rejoined, and the churn fed itself. The timeout measured
/// against ("failure known") is this one; handshakes get as long (at
/// least 30 s).
pub fn failure_timeout(nodes: usize) -> Duration {
    let default = cluster_config::DEFAULT_FAILURE_TIMEOUT_MS;
    if nodes <= 1000 {
        return Duration::from_millis(default);
    }
    Duration::from_millis(default.max(FAILURE_TIMEOUT_MS_PER_NODE * nodes as u64))
}

/// Nodes one process starts at once.
const STARTING_AT_ONCE: usize = 256;

/// Nodes that join after convergence, for the traffic per join.
pub const LATE_JOINERS: usize = 10;

/// Upper bound on any one wait of a node process (the controller's own
/// bound, [`step_timeout`], ends it sooner: it kills the processes).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(900);

/// Upper bound on any one step of a cluster of `nodes`: 2 minutes, or 120
/// ms a node (on two cores, 5,000 nodes take minutes to converge).
pub fn step_timeout(nodes: usize) -> Duration {
    Duration::from_secs(120).max(Duration::from_millis(120) * nodes as u32)
}

/// How often a process looks at its nodes while it waits for a condition.
const POLL: Duration = Duration::from_millis(2);

/// Milliseconds since the Unix epoch (the processes' clocks are one).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------------
// The node processes (`bench-nodes`).
// ---------------------------------------------------------------------

/// One node of a `bench-nodes` process, and what its tasks saw.
struct Hosted {
    node: Node,
    /// When it last registered again with a server (Unix ms), 0: never.
    reconnected_ms: Arc<AtomicU64>,
}

/// Runs `count` nodes named `{prefix}-{i}` against the server at `server`
/// with the cluster's file `config`, then answers commands on stdin, one
/// per line, each with one line on stdout:
///
/// | command | answer, once true |
/// | --- | --- |
/// | `converge N` | `converged MS`: every node sees N members |
/// | `gone ID` | `gone MS`: no node counts `ID` as a member |
/// | `watch` | `watching`: from now on, registrations are noted |
/// | `reconnected SINCE` | `reconnected MS`: every node registered again after `SINCE` (its latest registration), as noted since `watch` |
/// | `received` | `received N`: messages its nodes took |
/// | `broadcast N BYTES` | `sent FAILED`: its first node notified `All` N times |
///
/// `MS` is Unix milliseconds; a wait past [`STEP_TIMEOUT`] answers
/// `timeout ...`. It prints `started COUNT` once every node joined, and
/// exits when stdin ends.
///
/// # Errors
///
/// The config cannot be read, or a node does not start.
pub async fn serve_nodes(
    server: SocketAddr,
    config: &Path,
    prefix: &str,
    count: usize,
) -> anyhow::Result<()> {
    let config = Config::load(config).context("the cluster's file")?;
    let received = Arc::new(AtomicU64::new(0));
    let started: Vec<anyhow::Result<Hosted>> = futures_util::stream::iter(0..count)
        .map(|i| start_one(&config, server, format!("{prefix}-{i}"), received.clone()))
        .buffer_unordered(STARTING_AT_ONCE)
        .collect()
        .await;
    let nodes: Vec<Hosted> = started.into_iter().collect::<anyhow::Result<_>>()?;
    say(&format!(
        "started {} ({} starts tried again)",
        nodes.len(),
        RETRIED_STARTS.load(Ordering::Relaxed)
    ))?;

    let (tx, mut commands) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = commands.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["converge", n] => {
                let n: usize = n.parse().context("converge N")?;
                wait_for(|| nodes.iter().all(|h| h.node.member_count() >= n))
                    .await
                    .map_or_else(
                        || format!("timeout converge {n}"),
                        |_| format!("converged {}", unix_ms()),
                    )
            }
            ["gone", id] => wait_for(|| nodes.iter().all(|h| !h.node.is_member(id)))
                .await
                .map_or_else(
                    || format!("timeout gone {id}"),
                    |_| format!("gone {}", unix_ms()),
                ),
            ["reconnected", since] => {
                let since: u64 = since.parse().context("reconnected SINCE")?;
                let all = || {
                    nodes
                        .iter()
                        .all(|h| h.reconnected_ms.load(Ordering::Relaxed) >= since)
                };
                match wait_for(all).await {
                    Some(()) => {
                        let latest = nodes
                            .iter()
                            .map(|h| h.reconnected_ms.load(Ordering::Relaxed))
                            .max()
                            .unwrap_or(0);
                        format!("reconnected {latest}")
                    }
                    None => format!("timeout reconnected {since}"),
                }
            }
            ["watch"] => {
                nodes.iter().for_each(watch_reconnects);
                "watching".to_owned()
            }
            ["received"] => format!("received {}", received.load(Ordering::Relaxed)),
            ["broadcast", n, bytes] => {
                let n: usize = n.parse().context("broadcast N")?;
                let bytes: usize = bytes.parse().context("broadcast BYTES")?;
                let body = Bytes::from(vec![0x5A; bytes]);
                let mut failed = 0usize;
                if let Some(first) = nodes.first() {
                    for _ in 0..n {
                        if first
                            .node
                            .notify(Target::All, SERVICE, body.clone())
                            .await
                            .is_err()
                        {
                            failed += 1;
                        }
                    }
                }
                format!("sent {failed}")
            }
            _ => format!("error unknown command {line:?}"),
        };
        say(&answer)?;
    }
    Ok(())
}

/// Starts one node: it offers [`SERVICE`] from the start (registered with
/// the node, as an application that knows its services does: one
/// membership event per join, not a join and an update), counts what it
/// takes into `received`, and notes when it registers again.
async fn start_one(
    config: &Config,
    server: SocketAddr,
    id: String,
    received: Arc<AtomicU64>,
) -> anyhow::Result<Hosted> {
    // A handshake has 2 s (`transports::handshake::HELLO_DEADLINE`); a
    // process of hundreds of nodes busy with the joins of thousands may
    // not answer within it. The start is tried again, a few times.
    let mut attempt = 1;
    let node = loop {
        let started = Node::builder(id.as_str())
            .config(config.clone())
            .ignore_environment()
            .message_server(server)
            .subscribe(SERVICE)
            .start()
            .await;
        match started {
            Ok(node) => break node,
            Err(e) if attempt < START_ATTEMPTS => {
                RETRIED_STARTS.fetch_add(1, Ordering::Relaxed);
                note_retry(&id, attempt, &e);
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500) * attempt).await;
            }
            Err(e) => return Err(e).with_context(|| format!("starting node {id}")),
        }
    };
    let mut inbox = node
        .take_inbox(SERVICE)
        .context("the service's inbox, offered at the start")?;
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(64);
        loop {
            let n = inbox.recv_many(&mut batch, 64).await;
            if n == 0 {
                return;
            }
            received.fetch_add(n as u64, Ordering::Relaxed);
            batch.clear();
        }
    });
    let reconnected_ms = Arc::new(AtomicU64::new(0));
    Ok(Hosted {
        node,
        reconnected_ms,
    })
}

/// Times a node's start is tried before the process gives up.
const START_ATTEMPTS: u32 = 5;

/// Starts tried again in this process (printed with `started`).
static RETRIED_STARTS: AtomicU64 = AtomicU64::new(0);

/// Says on stderr that a start is tried again, the first few times.
fn note_retry(id: &str, attempt: u32, error: &node_runtime::NodeError) {
    if RETRIED_STARTS.load(Ordering::Relaxed) <= 5 {
        eprintln!("bench-nodes: starting {id} failed (attempt {attempt}), trying again: {error}");
    }
}

/// From now on, notes when `hosted` registers again with a server. Only
/// asked for before a restart: a subscription to membership events takes a
/// copy of every join, which would weigh on the convergence measured.
fn watch_reconnects(hosted: &Hosted) {
    let mut events = hosted.node.membership_events();
    let noted = hosted.reconnected_ms.clone();
    let watched = hosted.node.clone();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(MembershipEvent::Reconnected { .. }) => {
                    noted.store(unix_ms(), Ordering::Relaxed);
                }
                Ok(MembershipEvent::Disconnected) => noted.store(0, Ordering::Relaxed),
                Ok(_) => {}
                // Lagged behind a burst of membership events: a
                // registration may be among those skipped. Registered
                // now counts as registered now (later than it was: the
                // figure errs long, never short).
                Err(node_runtime::EventsError::Lagged(_)) => {
                    if watched.message_server().is_some() && noted.load(Ordering::Relaxed) == 0 {
                        noted.store(unix_ms(), Ordering::Relaxed);
                    }
                }
                Err(_) => return,
            }
        }
    });
}

/// Waits until `ready`, looking every [`POLL`], at most [`STEP_TIMEOUT`].
async fn wait_for(mut ready: impl FnMut() -> bool) -> Option<()> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        if ready() {
            return Some(());
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One line on stdout, flushed.
fn say(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------
// The controller: the bench and the test.
// ---------------------------------------------------------------------

/// What one cluster size measured.
#[derive(Debug, Clone)]
pub struct ScaleReport {
    /// Nodes at the start (the late joiners come on top).
    pub nodes: usize,
    /// `bench-nodes` processes they ran in.
    pub processes: usize,
    /// From starting the processes until every node saw every member.
    pub converged: Duration,
    /// Bytes the server wrote per late join (idle writes taken out).
    pub bytes_per_join: f64,
    /// The server's resident memory after the joins, and its peak.
    pub server_rss: u64,
    /// The server's peak resident memory.
    pub server_peak_rss: u64,
    /// The server's CPU over the convergence (1.0: one core all along).
    pub server_cpu_joining: f64,
    /// The server's CPU while idle (heartbeats only).
    pub server_cpu_idle: f64,
    /// `All` deliveries per second, and whether every one arrived.
    pub broadcast_per_sec: f64,
    /// Deliveries expected and counted.
    pub broadcast_counted: (u64, u64),
    /// From the SIGKILL of one node until no node counted it.
    pub failure_known: Duration,
    /// From the restarted server's start until every node registered
    /// again.
    pub reregistered: Duration,
    /// The failure timeout the cluster ran with.
    pub failure_timeout: Duration,
}

/// A `bench-nodes` process, driven through its stdin and stdout.
struct NodesProcess {
    name: String,
    /// How long a step may take.
    step: Duration,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl NodesProcess {
    fn start(
        exe: &Path,
        server: SocketAddr,
        config: &Path,
        prefix: &str,
        count: usize,
    ) -> anyhow::Result<Self> {
        // Lowered priority (see `NODES_NICENESS`): `nice` is coreutils'.
        let mut child = Command::new("nice")
            .args(["-n", &NODES_NICENESS.to_string()])
            .arg(exe)
            .arg("--server")
            .arg(server.to_string())
            .arg("--config")
            .arg(config)
            .args(["--prefix", prefix, "--count", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(NodesProcess {
            name: prefix.to_owned(),
            step: STEP_TIMEOUT,
            stdin: child.stdin.take(),
            child,
            lines,
        })
    }

    fn send(&mut self, command: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{command}").with_context(|| format!("{}: {command}", self.name))?;
        stdin.flush()?;
        Ok(())
    }

    /// The next line, which must start with `prefix`.
    fn expect(&mut self, prefix: &str) -> anyhow::Result<String> {
        match self.lines.recv_timeout(self.step) {
            Ok(line) if line.starts_with(prefix) => Ok(line),
            Ok(line) => bail!("{}: {line:?} where {prefix:?} was expected", self.name),
            Err(RecvTimeoutError::Timeout) => {
                bail!("{}: nothing within the step's time", self.name)
            }
            Err(RecvTimeoutError::Disconnected) => bail!("{}: exited", self.name),
        }
    }

    /// The number after `prefix` in the next line.
    fn expect_number(&mut self, prefix: &str) -> anyhow::Result<u64> {
        let line = self.expect(prefix)?;
        line[prefix.len()..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("{}: no number in {line:?}", self.name))
    }
}

impl Drop for NodesProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The message server, restartable on its address.
struct Server {
    exe: PathBuf,
    config: PathBuf,
    child: Child,
    _stdin: Option<ChildStdin>,
    addr: SocketAddr,
}

impl Server {
    fn start(exe: &Path, config: &Path, listen: SocketAddr) -> anyhow::Result<Self> {
        let mut child = Command::new(exe)
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(listen.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .context("the server's first line")?;
        // Kept open: the server writes nothing more, and must not meet a
        // closed pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .parse()
            .with_context(|| format!("bad address in {line:?}"))?;
        Ok(Server {
            exe: exe.to_owned(),
            config: config.to_owned(),
            _stdin: child.stdin.take(),
            child,
            addr,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Killed with SIGKILL, then started again on its address.
    fn restart(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("killing the server")?;
        self.child.wait().context("reaping the server")?;
        *self = Server::start(&self.exe, &self.config, self.addr)?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `/proc/<pid>` says of a process: bytes written, CPU ticks, and
/// resident and peak memory in bytes.
#[derive(Debug, Clone, Copy)]
struct ProcStat {
    wchar: u64,
    cpu_ticks: u64,
    rss: u64,
    peak_rss: u64,
}

fn proc_stat(pid: u32) -> anyhow::Result<ProcStat> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).context("/proc/<pid>/io")?;
    let wchar = io
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no wchar")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("/proc/<pid>/stat")?;
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let cpu_ticks = tick(11) + tick(12);
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("/proc/<pid>/status")?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(ProcStat {
        wchar,
        cpu_ticks,
        rss: kib("VmRSS:"),
        peak_rss: kib("VmHWM:"),
    })
}

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// The cluster's file for `nodes` nodes, written to `dir`.
fn write_config(dir: &Path, nodes: usize) -> anyhow::Result<PathBuf> {
    let path = dir.join("scale.toml");
    let connections = (nodes + LATE_JOINERS) * 2 + 64;
    let failure_timeout = failure_timeout(nodes);
    // Handshakes wait as long: a late starter's process is busy with the
    // joins of those before it.
    let connect_timeout = failure_timeout.max(Duration::from_secs(30)).as_millis();
    let failure_timeout = failure_timeout.as_millis();
    std::fs::write(
        &path,
        format!(
            "[cluster]\nfailure_timeout_ms = {failure_timeout}\n\n\
             [message_server]\nmax_connections = {connections}\nmax_unauthenticated = {connections}\nconnect_timeout_ms = {connect_timeout}\n\n\
             [node]\ndirect_listen = \"127.0.0.1:0\"\nread_chunk_bytes = 16384\ninbox_capacity = 4096\nsend_timeout_ms = 300000\n"
        ),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Where the helper binaries are: beside the running executable, or one
/// directory up.
fn helper(name: &str) -> anyhow::Result<PathBuf> {
    crate::child::beside_exe(name).with_context(|| {
        format!("{name} not found beside the bench (cargo build --release -p clustercomm-benches --bins)")
    })
}

/// Open files one process of a cluster of `nodes` may hold at once: the
/// server a connection per node, and as many again being made while
/// nodes rejoin after its restart; a node process four per node (its
/// connection, direct listener, heartbeat socket and a channel); and a
/// margin for the rest.
pub fn open_files_needed(nodes: usize) -> u64 {
    let server = (nodes + LATE_JOINERS) * 2;
    let node_process = NODES_PER_PROCESS.min(nodes) * 4;
    (server.max(node_process) + 256) as u64
}

/// This process' soft and hard limits on open files (`/proc/self/limits`;
/// `u64::MAX`: unlimited).
fn open_file_limits() -> anyhow::Result<(u64, u64)> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-file limit in /proc/self/limits")?;
    let value = |v: Option<&str>| -> anyhow::Result<u64> {
        match v {
            Some("unlimited") => Ok(u64::MAX),
            Some(v) => v.parse().with_context(|| format!("open-file limit {v:?}")),
            None => bail!("no open-file limit in {line:?}"),
        }
    };
    let mut words = line["Max open files".len()..].split_whitespace();
    Ok((value(words.next())?, value(words.next())?))
}

/// Raises this process' soft limit on open files to what a cluster of
/// `nodes` needs ([`open_files_needed`]), if it is lower, and says so on
/// stderr; the server and the node processes it starts inherit it. With
/// `prlimit` (util-linux): the workspace has no `unsafe` to call
/// `setrlimit` with.
///
/// # Errors
///
/// The hard limit is lower than what is needed, or `prlimit` failed:
/// one line saying which, and how to raise it.
pub fn raise_open_file_limit(nodes: usize) -> anyhow::Result<()> {
    let need = open_files_needed(nodes);
    let (soft, hard) = open_file_limits()?;
    if soft >= need {
        return Ok(());
    }
    ensure!(
        hard >= need,
        "a cluster of {nodes} nodes needs {need} open files a process, and the hard limit is {hard}: raise it (as root: ulimit -Hn {need}), then run again"
    );
    set_soft_open_file_limit(need)
        .with_context(|| format!("raising the open-file limit from {soft} to {need}"))?;
    eprintln!(
        "scale: raised the open-file limit from {soft} to {need} for {nodes} nodes (the server and node processes inherit it)"
    );
    Ok(())
}

/// Sets this process' soft limit on open files to `soft` (within the hard
/// limit), with `prlimit` (util-linux).
fn set_soft_open_file_limit(soft: u64) -> anyhow::Result<()> {
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={soft}:"),
        ])
        .status()
        .context("running prlimit (util-linux)")?;
    ensure!(status.success(), "prlimit failed ({status})");
    Ok(())
}

/// Runs the whole measurement for `nodes` nodes (at least 2), in a
/// temporary directory under `dir`. The open-file limit is raised first
/// if the cluster needs it ([`raise_open_file_limit`]).
///
/// # Errors
///
/// A helper is missing, a process fails, or a step does not finish
/// within [`step_timeout`].
pub fn run(nodes: usize, dir: &Path, broadcasts: usize) -> anyhow::Result<ScaleReport> {
    ensure!(nodes >= 2, "a scale run needs at least 2 nodes");
    raise_open_file_limit(nodes)?;
    std::fs::create_dir_all(dir)?;
    let config = write_config(dir, nodes)?;
    let mut server = Server::start(
        &helper("bench-message-server")?,
        &config,
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )?;
    let nodes_exe = helper("bench-nodes")?;
    let failure_timeout = failure_timeout(nodes);

    // 1. Convergence: the victim (one node of its own) counts among them.
    let workers = nodes - 1;
    let processes = workers.div_ceil(NODES_PER_PROCESS).max(1);
    let cpu_start = proc_stat(server.pid())?;
    let started_ms = unix_ms();
    let started = Instant::now();
    let mut procs = Vec::new();
    let mut left = workers;
    for p in 0..processes {
        let count = left.div_ceil(processes - p);
        left -= count;
        procs.push(NodesProcess::start(
            &nodes_exe,
            server.addr,
            &config,
            &format!("p{p}"),
            count,
        )?);
    }
    let mut victim = NodesProcess::start(&nodes_exe, server.addr, &config, "victim", 1)?;
    let step = step_timeout(nodes);
    for p in procs.iter_mut().chain(std::iter::once(&mut victim)) {
        p.step = step;
    }
    for p in procs.iter_mut().chain(std::iter::once(&mut victim)) {
        p.expect("started ")?;
    }
    let converged_ms = converge(&mut procs, nodes)?;
    let joined_in = started.elapsed();
    let cpu_joined = proc_stat(server.pid())?;
    let converged = Duration::from_millis(converged_ms.saturating_sub(started_ms));

    // 2 and 3. An idle second, then the late joiners.
    let idle_start = proc_stat(server.pid())?;
    let idle_clock = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let idle_end = proc_stat(server.pid())?;
    let idle_secs = idle_clock.elapsed().as_secs_f64();
    let idle_rate = (idle_end.wchar - idle_start.wchar) as f64 / idle_secs;
    let before = proc_stat(server.pid())?;
    let joining = Instant::now();
    let mut late = NodesProcess::start(&nodes_exe, server.addr, &config, "late", LATE_JOINERS)?;
    late.step = step;
    late.expect("started ")?;
    procs.push(late);
    converge(&mut procs, nodes + LATE_JOINERS)?;
    let after = proc_stat(server.pid())?;
    let written = (after.wchar - before.wchar) as f64 - idle_rate * joining.elapsed().as_secs_f64();
    let bytes_per_join = written.max(0.0) / LATE_JOINERS as f64;
    let total = nodes + LATE_JOINERS;

    // 4. Broadcast from the first process's first node to all others
    // (the victim included).
    let expected = (broadcasts * (total - 1)) as u64;
    let base = received(&mut procs, &mut victim)?;
    let sending = Instant::now();
    procs[0].send(&format!("broadcast {broadcasts} 128"))?;
    let failed = procs[0].expect_number("sent ")?;
    ensure!(failed == 0, "{failed} broadcasts failed");
    let mut counted = 0;
    let deadline = Instant::now() + step;
    while Instant::now() < deadline {
        counted = received(&mut procs, &mut victim)? - base;
        if counted >= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let broadcast_per_sec = counted as f64 / sending.elapsed().as_secs_f64();

    // 5. A node fails.
    let killed_ms = unix_ms();
    victim.child.kill().context("killing the victim")?;
    let _ = victim.child.wait();
    let mut known = 0;
    for p in &mut procs {
        p.send("gone victim-0")?;
    }
    for p in &mut procs {
        known = known.max(p.expect_number("gone ")?);
    }
    let failure_known = Duration::from_millis(known.saturating_sub(killed_ms));

    // 6. The server restarts.
    for p in &mut procs {
        p.send("watch")?;
    }
    for p in &mut procs {
        p.expect("watching")?;
    }
    let before_restart = proc_stat(server.pid())?;
    let since = unix_ms();
    server.restart()?;
    let up_ms = unix_ms();
    let mut registered = 0;
    for p in &mut procs {
        p.send(&format!("reconnected {since}"))?;
    }
    for p in &mut procs {
        registered = registered.max(p.expect_number("reconnected ")?);
    }
    let reregistered = Duration::from_millis(registered.saturating_sub(up_ms));

    Ok(ScaleReport {
        nodes,
        processes: processes + 1,
        converged,
        bytes_per_join,
        server_rss: before_restart.rss,
        server_peak_rss: before_restart.peak_rss,
        server_cpu_joining: (cpu_joined.cpu_ticks - cpu_start.cpu_ticks) as f64
            / TICKS_PER_SEC
            / joined_in.as_secs_f64(),
        server_cpu_idle: (idle_end.cpu_ticks - idle_start.cpu_ticks) as f64
            / TICKS_PER_SEC
            / idle_secs,
        broadcast_per_sec,
        broadcast_counted: (expected, counted),
        failure_known,
        reregistered,
        failure_timeout,
    })
}

/// Asks every process to wait for `members` members; the latest time one
/// saw them all (Unix ms).
fn converge(procs: &mut [NodesProcess], members: usize) -> anyhow::Result<u64> {
    for p in procs.iter_mut() {
        p.send(&format!("converge {members}"))?;
    }
    let mut latest = 0;
    for p in procs.iter_mut() {
        latest = latest.max(p.expect_number("converged ")?);
    }
    Ok(latest)
}

/// Messages every process's nodes took, in all.
fn received(procs: &mut [NodesProcess], victim: &mut NodesProcess) -> anyhow::Result<u64> {
    let mut total = 0;
    for p in procs.iter_mut().chain(std::iter::once(victim)) {
        p.send("received")?;
        total += p.expect_number("received ")?;
    }
    Ok(total)
}

/// The report's rows, as a Markdown table, with the targets at 1,000
/// nodes judged.
pub fn table(reports: &[ScaleReport]) -> String {
    let mut out = String::from(
        "| nodes | processes | converged | membership bytes per join (per member) | server RSS (peak) | server CPU joining / idle | All deliveries/s | failure known | re-registered after restart |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in reports {
        let members = (r.nodes + LATE_JOINERS) as f64;
        let lost = if r.broadcast_counted.1 < r.broadcast_counted.0 {
            format!(
                " ({} of {} arrived)",
                r.broadcast_counted.1, r.broadcast_counted.0
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| {} | {} | {} ms | {:.0} ({:.0}) | {:.1} MiB ({:.1}) | {:.0}% / {:.1}% | {:.0}{lost} | {} ms | {} ms |\n",
            r.nodes,
            r.processes,
            r.converged.as_millis(),
            r.bytes_per_join,
            r.bytes_per_join / members,
            r.server_rss as f64 / (1 << 20) as f64,
            r.server_peak_rss as f64 / (1 << 20) as f64,
            r.server_cpu_joining * 100.0,
            r.server_cpu_idle * 100.0,
            r.broadcast_per_sec,
            r.failure_known.as_millis(),
            r.reregistered.as_millis(),
        ));
    }
    if let Some(r) = reports.iter().find(|r| r.nodes == 1000) {
        let judge = |ok: bool| if ok { "met" } else { "**NOT met**" };
        out.push_str(&format!(
            "\nTargets at 1,000 nodes: converged under 1 s: {} ({} ms); server RSS under 128 MiB: {} ({:.1} MiB peak); \
             failure known within the failure timeout + 1 s: {} ({} ms, timeout {} ms); re-registered within 2 s: {} ({} ms)\n",
            judge(r.converged < Duration::from_secs(1)),
            r.converged.as_millis(),
            judge(r.server_peak_rss < 128 << 20),
            r.server_peak_rss as f64 / (1 << 20) as f64,
            judge(r.failure_known <= r.failure_timeout + Duration::from_secs(1)),
            r.failure_known.as_millis(),
            r.failure_timeout.as_millis(),
            judge(r.reregistered <= Duration::from_secs(2)),
            r.reregistered.as_millis(),
        ));
    }
    out
}

/// The arguments of `bench-nodes`.
#[derive(Debug)]
pub struct NodesArgs {
    /// The message server.
    pub server: SocketAddr,
    /// The cluster's file.
    pub config: PathBuf,
    /// Node ids are `{prefix}-{i}`.
    pub prefix: String,
    /// How many nodes.
    pub count: usize,
}

impl NodesArgs {
    /// Parses `--server ADDR --config FILE --prefix P --count N`.
    ///
    /// # Errors
    ///
    /// A flag is missing, unknown or has a bad value.
    pub fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<NodesArgs> {
        let mut flags: HashMap<String, String> = HashMap::new();
        let mut args = args;
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            flags.insert(flag, value);
        }
        let get = |k: &str| {
            flags.get(k).cloned().with_context(|| {
                format!(
                    "usage: bench-nodes --server ADDR --config FILE --prefix P --count N (no {k})"
                )
            })
        };
        Ok(NodesArgs {
            server: get("--server")?.parse().context("--server")?,
            config: PathBuf::from(get("--config")?),
            prefix: get("--prefix")?,
            count: get("--count")?.parse().context("--count")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a soft limit lower than a 1,000-node cluster needs, the bench
    /// raises it (the hard limit allows it) before it starts anything;
    /// with one high enough, it leaves it alone.
    #[test]
    fn the_open_file_limit_is_raised_to_what_the_cluster_needs() -> anyhow::Result<()> {
        let need = open_files_needed(1000);
        let (_, hard) = open_file_limits()?;
        ensure!(
            hard >= need,
            "this test needs a hard open-file limit of at least {need} (it is {hard})"
        );
        set_soft_open_file_limit(need - 1).context("lowering the soft limit")?;
        ensure!(open_file_limits()?.0 == need - 1);
        raise_open_file_limit(1000)?;
        ensure!(open_file_limits()?.0 == need, "{:?}", open_file_limits()?);
        raise_open_file_limit(100)?;
        ensure!(
            open_file_limits()?.0 == need,
            "a lower need changes nothing"
        );
        Ok(())
    }
}
