//! The reference NATS peer: nats-server driven by NATS's own Go client
//! (nats.go 1.22), through the small `nats bench`-style program in
//! `benches/nats-go/main.go`. Every ours/NATS ratio of the suite is taken
//! against this column.
//!
//! [`NatsGo::start`] makes sure `go` and nats.go are installed (Debian's
//! `golang-go` and `golang-github-nats-io-go-nats-dev`, installed with
//! `apt-get` if missing, said on stderr), builds the program offline
//! (`GOPATH=/usr/share/gocode GO111MODULE=off go build`) into
//! `nats-bench-go/` beside the target directory's profile directory
//! (rebuilt when its source changed), and starts three nats-servers: a
//! core one (the limits of [`ServerSetup::core`]), a JetStream one
//! (`-js`, file storage in a fresh directory), and a core one that
//! requires mutual TLS ([`ServerSetup::with_tls`], certificates from
//! clustercomm's generator: the server's names `127.0.0.1`, the address
//! the client dials and nats.go checks). [`NatsGo::run`] runs the
//! program once per round; the program measures and prints a result line
//! (and histogram buckets for latency), which [`parse_output`] reads.
//!
//! | case | program mode | result |
//! | --- | --- | --- |
//! | `Notify`, `Session`, `SendPipelined` (vs publish) | `oneway --subs 1` | messages/s received |
//! | `NotifyTls` | `oneway --subs 1 --tls-ca CA --tls-cert CERT --tls-key KEY`, on the TLS server | messages/s received |
//! | `FanOutAll`, `FanOutGroup` | `oneway --subs N` | deliveries/s (all subscribers) |
//! | `AnyOf` | `oneway --subs N --queue` | messages/s received in all |
//! | `FixedRate` | `fixedrate --rate R` | µs percentiles from each message's due time |
//! | `RequestLatency` | `reqlat` | µs percentiles of round trips |
//! | `RequestRate` | `reqrate --outstanding N` | requests/s |
//! | `SendPipelined` (vs JetStream), `RecoverableSend` | `jspub --outstanding N`, on the JetStream server | acks/s |
//! | `RecoverableLatency` | `jslat`, on the JetStream server: one publish-with-ack at a time | µs percentiles of publish to ack |
//! | `Bulk` | `bulk --body B --bulk-bodies N` (skipped over `max_payload`) | MB/s |
//!
//! One-way modes report what did not arrive as loss, explained only by
//! what nats.go itself reported: slow-consumer errors from its async error
//! handler, messages its subscriptions dropped, disconnects.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context};

use crate::latency::{self, Latency};
use crate::nats_server::{
    apt_install, find_on_path, log_tail, wait_child, KilledOnDrop, NatsServer, ServerSetup,
    ServerTls,
};
use crate::options::{Options, WAIT_TIMEOUT};
use crate::raw_cases::bulk_plans;
use crate::suite::{Case, Measurement, Outcome, SendPeer};
use crate::tls::Certs;

/// The Go program's source, embedded so that the suite builds the program
/// it was compiled with (also when copied away from the repository).
pub const SOURCE: &str = include_str!("../nats-go/main.go");

/// The GOPATH of Debian's Go library packages.
pub const GOPATH: &str = "/usr/share/gocode";

/// Where `golang-github-nats-io-go-nats-dev` puts nats.go.
pub const NATS_GO_DIR: &str = "/usr/share/gocode/src/github.com/nats-io/nats.go";

/// The Debian packages the program is built with.
pub const GO_PACKAGES: [&str; 2] = ["golang-go", "golang-github-nats-io-go-nats-dev"];

/// Upper bound on building the program (the first build compiles
/// nats.go and its dependencies).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// How much longer than its warm-up and measured phase one run of the
/// program may take before it is killed: its own waits are each bounded
/// by [`WAIT_TIMEOUT`], a few of them in a row.
pub const RUN_SLACK: Duration = Duration::from_secs(3 * WAIT_TIMEOUT.as_secs());

/// Most bytes of the program's stdout taken in; more fails the run.
pub const MAX_STDOUT: usize = 16 << 20;

/// Bytes of the end of the program's stderr kept for an error message.
pub const STDERR_TAIL: usize = 4096;

/// Most histogram buckets taken from one run (the program's histogram
/// has 56,320).
pub const MAX_BUCKETS: usize = 65_536;

/// How long the pipes of a finished (or killed) program may take to be
/// read to their end.
const READ_GRACE: Duration = Duration::from_secs(5);

/// The program's file name, and its directory's.
const PROGRAM: &str = "nats-bench-go";

/// Names this peer in stderr messages.
const LABEL: &str = "nats-go";

/// The name on the TLS server's certificate: the address the program
/// dials (an IP address SAN), which nats.go checks.
pub const TLS_SERVER_NAME: &str = "127.0.0.1";

/// The name on the program's client certificate.
pub const TLS_CLIENT_NAME: &str = "nats-bench-go";

/// The built program and the three servers it runs against; the servers
/// are killed and reaped (the JetStream store and the TLS server's
/// certificates removed) on drop.
pub struct NatsGo {
    program: PathBuf,
    core: NatsServer,
    jetstream: Result<NatsServer, String>,
    tls: Result<TlsServer, String>,
}

/// The server that requires mutual TLS, and its certificates.
struct TlsServer {
    // Declared first: killed before its certificates go.
    server: NatsServer,
    _certs: Certs,
}

impl TlsServer {
    /// Makes a CA, the server's certificate ([`TLS_SERVER_NAME`]) and the
    /// program's ([`TLS_CLIENT_NAME`]), and starts a core server that
    /// requires them.
    async fn start() -> Result<TlsServer, String> {
        let certs = Certs::generate("nats-go-tls", &[TLS_SERVER_NAME, TLS_CLIENT_NAME])
            .map_err(|e| format!("{e:#}"))?;
        let identity = |name| certs.identity(name).cloned().map_err(|e| format!("{e:#}"));
        let tls = ServerTls {
            ca: certs.ca().to_owned(),
            server: identity(TLS_SERVER_NAME)?,
            client: identity(TLS_CLIENT_NAME)?,
        };
        let server = NatsServer::start(ServerSetup::core("nats-go-tls").with_tls(tls)).await?;
        Ok(TlsServer {
            server,
            _certs: certs,
        })
    }
}

/// The program's flags for a client of the server `tls` describes.
pub fn tls_args(tls: &ServerTls) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        "--tls-ca".to_owned(),
        path(&tls.ca),
        "--tls-cert".to_owned(),
        path(&tls.client.cert),
        "--tls-key".to_owned(),
        path(&tls.client.key),
    ]
}

impl NatsGo {
    /// Installs what is missing (`go`, nats.go), builds the program if it
    /// is missing or older than its source, and starts a core nats-server
    /// and a JetStream one. Says on stderr what it installs, builds and
    /// starts. `quick` does not change anything here (the bulk minimum
    /// comes from the [`Options`] of each run); it is taken so that every
    /// peer starts the same way. A JetStream or TLS server that does not
    /// start fails only its cases, with the reason.
    ///
    /// # Errors
    ///
    /// A reason, if `go` or nats.go is missing and could not be installed,
    /// the build failed (with the end of its log), or the core server did
    /// not start.
    pub async fn start(quick: bool) -> Result<NatsGo, String> {
        let _ = quick;
        let program = prepare_program().await?;
        let core = NatsServer::start(ServerSetup::core(LABEL)).await?;
        let jetstream = NatsServer::start(ServerSetup::jetstream("nats-go-js")).await;
        if let Err(why) = &jetstream {
            eprintln!("{LABEL}: no JetStream server ({why}); the JetStream cases fail");
        }
        let tls = TlsServer::start().await;
        if let Err(why) = &tls {
            eprintln!("{LABEL}: no TLS server ({why}); the TLS case fails");
        }
        Ok(NatsGo {
            program,
            core,
            jetstream,
            tls,
        })
    }

    /// The built program.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The core server's client URL.
    pub fn url(&self) -> &str {
        self.core.url()
    }

    /// The largest payload the core server accepts, as it announced it.
    pub fn max_payload(&self) -> usize {
        self.core.max_payload()
    }

    /// Measures one round of `case` with the program (see the module
    /// docs). Never panics on a peer problem: a failure (the program's
    /// exit status and the end of its stderr included) comes back as
    /// [`Outcome::Failed`], a body over the server's limit as
    /// [`Outcome::Skipped`].
    pub async fn run(&self, case: Case, options: &Options) -> Measurement {
        let invocation = match Invocation::for_case(case, options, self.max_payload()) {
            Ok(invocation) => invocation,
            Err(instead) => return instead,
        };
        let server = if case.tls() {
            match &self.tls {
                Ok(tls) => &tls.server,
                Err(why) => return Measurement::failed(format!("no TLS server: {why}")),
            }
        } else if invocation.jetstream() {
            match &self.jetstream {
                Ok(server) => server,
                Err(why) => return Measurement::failed(format!("no JetStream server: {why}")),
            }
        } else {
            &self.core
        };
        let mut args = invocation.args(server.url(), options);
        if let Some(tls) = server.tls() {
            args.extend(tls_args(tls));
        }
        let limit = options.warmup + options.measure + RUN_SLACK;
        let mode = invocation.mode.name();
        match run_program(&self.program, &args, limit).await {
            Ok((stdout, stderr)) => match parse_output(&stdout) {
                Ok(report) => invocation.measurement(&report),
                Err(e) => {
                    Measurement::failed(format!("{PROGRAM} {mode}: {e:#}{}", stderr_note(&stderr)))
                }
            },
            Err(why) => Measurement::failed(format!("{PROGRAM} {mode}: {why}")),
        }
    }
}

/// A mode of the program, with the flags that go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One publisher, `subs` subscribers (one queue group if `queue`).
    OneWay {
        /// Subscriber connections.
        subs: usize,
        /// Whether they form one queue group.
        queue: bool,
    },
    /// One publisher on a fixed schedule, one subscriber.
    FixedRate {
        /// Messages per second.
        rate: u64,
    },
    /// One request at a time.
    RequestLatency,
    /// `outstanding` requesters on one connection.
    RequestRate {
        /// Requests in flight.
        outstanding: usize,
    },
    /// JetStream publish-with-ack.
    JetStream {
        /// Publishes unacknowledged at once.
        outstanding: usize,
    },
    /// JetStream publish-with-ack, one at a time.
    JetStreamLatency,
    /// Bodies as requests, answered with 1 byte.
    Bulk {
        /// Least number of measured bodies.
        min_bodies: u64,
    },
}

impl Mode {
    /// The program's name for the mode (its first argument).
    pub fn name(&self) -> &'static str {
        match self {
            Mode::OneWay { .. } => "oneway",
            Mode::FixedRate { .. } => "fixedrate",
            Mode::RequestLatency => "reqlat",
            Mode::RequestRate { .. } => "reqrate",
            Mode::JetStream { .. } => "jspub",
            Mode::JetStreamLatency => "jslat",
            Mode::Bulk { .. } => "bulk",
        }
    }
}

/// One run of the program: the mode and the body size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invocation {
    /// What the program measures.
    pub mode: Mode,
    /// Body bytes.
    pub body: usize,
}

impl Invocation {
    /// The run that measures `case` (see the module docs; a TLS case
    /// runs as its plain case, against the TLS server), or the
    /// measurement to report instead: skipped for a bulk body over
    /// `max_payload` and for the lazy channel, failed for a fixed-rate
    /// case without a rate.
    ///
    /// # Errors
    ///
    /// The measurement to report instead, as above.
    pub fn for_case(
        case: Case,
        options: &Options,
        max_payload: usize,
    ) -> Result<Invocation, Measurement> {
        let one_way = |subs, queue, body| Invocation {
            mode: Mode::OneWay { subs, queue },
            body,
        };
        Ok(match case {
            Case::Notify { body }
            | Case::NotifyTls { body }
            | Case::Session { body }
            | Case::SendPipelined {
                body,
                peer: SendPeer::Publish,
                ..
            } => one_way(1, false, body),
            Case::FanOutAll { receivers, body } | Case::FanOutGroup { receivers, body } => {
                one_way(receivers, false, body)
            }
            Case::AnyOf { members, body } => one_way(members, true, body),
            Case::FixedRate { rate: 0, .. } => {
                return Err(Measurement::failed("no rate to send at"))
            }
            Case::FixedRate { body, rate } => Invocation {
                mode: Mode::FixedRate { rate },
                body,
            },
            Case::RequestLatency { body } => Invocation {
                mode: Mode::RequestLatency,
                body,
            },
            Case::RequestRate { body, outstanding } => Invocation {
                mode: Mode::RequestRate { outstanding },
                body,
            },
            Case::SendPipelined {
                body,
                outstanding,
                peer: SendPeer::JetStream,
            }
            | Case::RecoverableSend { body, outstanding } => Invocation {
                mode: Mode::JetStream { outstanding },
                body,
            },
            Case::RecoverableLatency { body } => Invocation {
                mode: Mode::JetStreamLatency,
                body,
            },
            Case::LazyTls { .. }
            | Case::Stream { .. }
            | Case::HeadOfLine { .. }
            | Case::Priority { .. } => return Err(Measurement::skipped("n/a")),
            Case::Bulk { body, .. } if body > max_payload => {
                return Err(Measurement::skipped("over nats max_payload"))
            }
            Case::Bulk { body, .. } => Invocation {
                mode: Mode::Bulk {
                    min_bodies: bulk_plans(options).1.min_bodies,
                },
                body,
            },
        })
    }

    /// Whether it runs against the JetStream server.
    pub fn jetstream(&self) -> bool {
        matches!(self.mode, Mode::JetStream { .. } | Mode::JetStreamLatency)
    }

    /// The program's arguments against the server at `url`, with the
    /// phases of `options` and [`WAIT_TIMEOUT`] as its bound on any wait.
    pub fn args(&self, url: &str, options: &Options) -> Vec<String> {
        let ns = |d: Duration| format!("{}ns", d.as_nanos());
        let mut args = vec![
            self.mode.name().to_owned(),
            "--url".to_owned(),
            url.to_owned(),
            "--body".to_owned(),
            self.body.to_string(),
            "--warmup".to_owned(),
            ns(options.warmup),
            "--measure".to_owned(),
            ns(options.measure),
            "--timeout".to_owned(),
            ns(WAIT_TIMEOUT),
        ];
        let mut flag = |name: &str, value: String| {
            args.push(format!("--{name}"));
            args.push(value);
        };
        match self.mode {
            Mode::OneWay { subs, queue } => {
                flag("subs", subs.to_string());
                if queue {
                    args.push("--queue".to_owned());
                }
            }
            Mode::FixedRate { rate } => flag("rate", rate.to_string()),
            Mode::RequestLatency | Mode::JetStreamLatency => {}
            Mode::RequestRate { outstanding } | Mode::JetStream { outstanding } => {
                flag("outstanding", outstanding.to_string())
            }
            Mode::Bulk { min_bodies } => flag("bulk-bodies", min_bodies.to_string()),
        }
        args
    }

    /// The measurement `report` makes for this run: a rate, or latency
    /// percentiles from its buckets (at the offered rate for a fixed-rate
    /// run), with its loss.
    pub fn measurement(&self, report: &GoReport) -> Measurement {
        let outcome = match self.mode {
            Mode::FixedRate { .. } | Mode::RequestLatency | Mode::JetStreamLatency => {
                let mut histogram = latency::histogram();
                latency::record_buckets(&mut histogram, &report.buckets);
                let Some(latency) = Latency::from_histogram(&histogram) else {
                    return Measurement::failed("no latency sample in the program's output");
                };
                match self.mode {
                    Mode::FixedRate { rate } => Outcome::Latency(latency.at_rate(rate as f64)),
                    _ => Outcome::Latency(latency),
                }
            }
            _ if report.rate > 0.0 => Outcome::Rate(report.rate),
            _ => return Measurement::failed("the program measured a rate of 0"),
        };
        Measurement::from(outcome).with_loss(report.lost, report.loss_reported())
    }
}

/// What one run of the program printed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GoReport {
    /// `(ns, count)` of every non-empty histogram bucket (latency modes).
    pub buckets: Vec<(u64, u64)>,
    /// Messages, deliveries, requests or acks per second, or MB/s for
    /// bulk; the offered rate for a fixed-rate run.
    pub rate: f64,
    /// Messages sent in the measured phase.
    pub sent: u64,
    /// Deliveries expected from them.
    pub expected: u64,
    /// Deliveries that arrived.
    pub received: u64,
    /// Deliveries that did not arrive.
    pub lost: u64,
    /// Slow-consumer errors from nats.go's async error handler.
    pub slow_consumer: u64,
    /// Messages the subscriptions dropped (`Subscription::Dropped`).
    pub dropped: u64,
    /// Disconnects nats.go reported.
    pub disconnects: u64,
}

impl GoReport {
    /// What nats.go reported that may account for lost messages; `None`
    /// if it reported nothing.
    pub fn loss_reported(&self) -> Option<String> {
        let mut parts = Vec::new();
        let mut count = |n: u64, one: &str, many: &str| match n {
            0 => {}
            1 => parts.push(format!("1 {one}")),
            n => parts.push(format!("{n} {many}")),
        };
        count(
            self.slow_consumer,
            "slow-consumer error",
            "slow-consumer errors",
        );
        count(
            self.dropped,
            "message dropped by the client",
            "messages dropped by the client",
        );
        count(self.disconnects, "disconnect", "disconnects");
        (!parts.is_empty()).then(|| format!("nats.go reported {}", parts.join(", ")))
    }
}

/// Reads the program's stdout: `bucket <ns> <count>` lines, then one
/// `result key=value ...` line (`rate`, `sent`, `expected`, `received`,
/// `lost`, `slow_consumer`, `dropped`, `disconnects`; other keys are
/// ignored). Blank lines are skipped.
///
/// # Errors
///
/// An unexpected or malformed line, a line after the result, more than
/// [`MAX_BUCKETS`] buckets, a missing key, or no result line.
pub fn parse_output(stdout: &str) -> anyhow::Result<GoReport> {
    let mut buckets = Vec::new();
    let mut result: Option<GoReport> = None;
    for (i, line) in stdout.lines().enumerate() {
        let n = i + 1;
        let mut words = line.split_ascii_whitespace();
        let Some(kind) = words.next() else { continue };
        ensure!(result.is_none(), "line {n}: {line:?} after the result line");
        match kind {
            "bucket" => {
                ensure!(
                    buckets.len() < MAX_BUCKETS,
                    "more than {MAX_BUCKETS} buckets"
                );
                let mut number = |what: &str| -> anyhow::Result<u64> {
                    let word = words
                        .next()
                        .with_context(|| format!("line {n}: no {what} in {line:?}"))?;
                    word.parse()
                        .with_context(|| format!("line {n}: bad {what} {word:?}"))
                };
                let bucket = (number("value")?, number("count")?);
                ensure!(words.next().is_none(), "line {n}: extra words in {line:?}");
                buckets.push(bucket);
            }
            "result" => {
                result = Some(parse_result(words).with_context(|| format!("line {n}: {line:?}"))?)
            }
            other => bail!("line {n}: unexpected {other:?}"),
        }
    }
    let mut report = result.context("no result line")?;
    report.buckets = buckets;
    Ok(report)
}

/// The `key=value` words of a result line.
fn parse_result<'a>(words: impl Iterator<Item = &'a str>) -> anyhow::Result<GoReport> {
    let mut rate = None;
    let mut counts: [Option<u64>; 7] = [None; 7];
    const KEYS: [&str; 7] = [
        "sent",
        "expected",
        "received",
        "lost",
        "slow_consumer",
        "dropped",
        "disconnects",
    ];
    for word in words {
        let (key, value) = word
            .split_once('=')
            .with_context(|| format!("{word:?} is not key=value"))?;
        if key == "rate" {
            let r: f64 = value
                .parse()
                .with_context(|| format!("bad rate {value:?}"))?;
            ensure!(r.is_finite() && r >= 0.0, "bad rate {value:?}");
            rate = Some(r);
        } else if let Some(slot) = KEYS.iter().position(|k| *k == key) {
            let count = value
                .parse()
                .with_context(|| format!("bad {key} {value:?}"))?;
            counts[slot] = Some(count);
        }
    }
    let rate = rate.context("no rate")?;
    let mut got = [0u64; 7];
    for (slot, key) in KEYS.iter().enumerate() {
        got[slot] = counts[slot].with_context(|| format!("no {key}"))?;
    }
    let [sent, expected, received, lost, slow_consumer, dropped, disconnects] = got;
    Ok(GoReport {
        buckets: Vec::new(),
        rate,
        sent,
        expected,
        received,
        lost,
        slow_consumer,
        dropped,
        disconnects,
    })
}

/// Runs `program ARGS`, killed after `limit`: its stdout and the end of
/// its stderr.
///
/// # Errors
///
/// A reason, with the end of its stderr: it did not start, exited
/// unsuccessfully, was killed after `limit`, or printed more than
/// [`MAX_STDOUT`].
async fn run_program(
    program: &Path,
    args: &[String],
    limit: Duration,
) -> Result<(String, String), String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not start {}: {e}", program.display()))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    // Killed and reaped however this ends (a cancelled round included).
    let mut child = KilledOnDrop(child);
    let out = tokio::task::spawn_blocking(move || match stdout {
        Some(pipe) => read_capped(pipe, MAX_STDOUT),
        None => Ok((Vec::new(), false)),
    });
    let err = tokio::task::spawn_blocking(move || match stderr {
        Some(pipe) => read_tail(pipe, STDERR_TAIL),
        None => String::new(),
    });
    let status = wait_child(&mut child.0, limit).await;
    // The pipes end when the program does.
    let stderr = match tokio::time::timeout(READ_GRACE, err).await {
        Ok(Ok(tail)) => tail,
        _ => String::new(),
    };
    let note = stderr_note(&stderr);
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => return Err(format!("exited with {status}{note}")),
        Err(why) => return Err(format!("{why}{note}")),
    }
    match tokio::time::timeout(READ_GRACE, out).await {
        Ok(Ok(Ok((bytes, false)))) => Ok((String::from_utf8_lossy(&bytes).into_owned(), stderr)),
        Ok(Ok(Ok((_, true)))) => Err(format!("more than {MAX_STDOUT} bytes on stdout{note}")),
        Ok(Ok(Err(e))) => Err(format!("reading its stdout: {e}{note}")),
        Ok(Err(e)) => Err(format!("the stdout reader failed: {e}{note}")),
        Err(_) => Err(format!("its stdout did not end{note}")),
    }
}

/// The end of a program's stderr for an error message (empty if none).
fn stderr_note(stderr: &str) -> String {
    let tail = stderr.trim();
    if tail.is_empty() {
        String::new()
    } else {
        format!("; its stderr ends: {tail}")
    }
}

/// Reads `reader` to its end, keeping at most `cap` bytes; the flag says
/// whether there was more.
fn read_capped(mut reader: impl Read, cap: usize) -> std::io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::new();
    let mut over = false;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return Ok((kept, over)),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if kept.len() + n <= cap {
            kept.extend_from_slice(&chunk[..n]);
        } else {
            over = true;
        }
    }
}

/// Reads `reader` to its end (or its first error) and returns the last
/// `keep` bytes of it, as text.
fn read_tail(mut reader: impl Read, keep: usize) -> String {
    let mut tail = Vec::new();
    let mut chunk = vec![0u8; 8 * 1024];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => tail.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
        if tail.len() > 2 * keep {
            tail.drain(..tail.len() - keep);
        }
    }
    let from = tail.len().saturating_sub(keep);
    String::from_utf8_lossy(&tail[from..]).into_owned()
}

// ---------------------------------------------------------------------------
// Installing and building
// ---------------------------------------------------------------------------

/// `go` and nats.go (installing the Debian packages if either is
/// missing), then the built program, rebuilt if it is older than its
/// source.
async fn prepare_program() -> Result<PathBuf, String> {
    let go = go_toolchain().await?;
    let dir = program_dir();
    let at = dir.clone();
    let (binary, stale) = tokio::task::spawn_blocking(move || write_source(&at))
        .await
        .map_err(|e| format!("preparing {}: {e}", dir.display()))??;
    if stale {
        build(&go, &dir, &binary).await?;
    }
    Ok(binary)
}

/// The `go` binary, once it and nats.go are there.
async fn go_toolchain() -> Result<PathBuf, String> {
    let nats_go = Path::new(NATS_GO_DIR).join("nats.go");
    let missing = || {
        let go = find_on_path("go");
        let mut missing = Vec::new();
        if go.is_none() {
            missing.push("go".to_owned());
        }
        if !nats_go.is_file() {
            missing.push(format!("nats.go ({NATS_GO_DIR})"));
        }
        (go, missing)
    };
    let (go, gone) = missing();
    if let (Some(go), true) = (go, gone.is_empty()) {
        return Ok(go);
    }
    eprintln!(
        "{LABEL}: {} missing, needed to build the nats.go peer",
        gone.join(" and ")
    );
    let installed = apt_install(LABEL, &GO_PACKAGES).await;
    match (missing(), installed) {
        ((Some(go), gone), _) if gone.is_empty() => {
            eprintln!("{LABEL}: installed {}", GO_PACKAGES.join(" "));
            Ok(go)
        }
        ((_, gone), Err(e)) => Err(format!(
            "{} missing and not installable: {e}",
            gone.join(" and ")
        )),
        ((_, gone), Ok(())) => Err(format!(
            "{} still missing after installing {}",
            gone.join(" and "),
            GO_PACKAGES.join(" ")
        )),
    }
}

/// Where the program is built: `nats-bench-go/` in the profile directory
/// (`target/release/`) of the running executable (which lives in its
/// `deps/`), else under the temporary directory.
fn program_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join(PROGRAM)))
        .unwrap_or_else(|| std::env::temp_dir().join(format!("clustercomm-{PROGRAM}")))
}

/// Writes [`SOURCE`] to `dir/main.go` if it differs from what is there;
/// returns the binary's path and whether it must be (re)built (missing,
/// or older than the source).
fn write_source(dir: &Path) -> Result<(PathBuf, bool), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let source = dir.join("main.go");
    if std::fs::read(&source).ok().as_deref() != Some(SOURCE.as_bytes()) {
        std::fs::write(&source, SOURCE)
            .map_err(|e| format!("writing {}: {e}", source.display()))?;
    }
    let binary = dir.join(PROGRAM);
    let modified = |path: &Path| path.metadata().and_then(|m| m.modified()).ok();
    let stale = match (modified(&binary), modified(&source)) {
        (Some(built), Some(written)) => built < written,
        _ => true,
    };
    Ok((binary, stale))
}

/// Builds `dir/main.go` into `binary` with `go`, in GOPATH mode against
/// Debian's packages, with its cache in `dir` (nothing written to
/// `$HOME`, which need not be set).
async fn build(go: &Path, dir: &Path, binary: &Path) -> Result<(), String> {
    eprintln!(
        "{LABEL}: building {} with {} (GOPATH={GOPATH} GO111MODULE=off)",
        binary.display(),
        go.display()
    );
    let started = SystemTime::now();
    let log = dir.join("build.log");
    let log_file =
        std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let log_file2 = log_file
        .try_clone()
        .map_err(|e| format!("duplicating the log file handle: {e}"))?;
    // Built under a name of its own, then renamed: a concurrent suite
    // never runs half a binary.
    let partial = dir.join(format!("{PROGRAM}.{}.partial", std::process::id()));
    let child = Command::new(go)
        .arg("build")
        .arg("-o")
        .arg(&partial)
        .arg("main.go")
        .current_dir(dir)
        .env("GOPATH", GOPATH)
        .env("GO111MODULE", "off")
        .env("GOCACHE", dir.join("cache"))
        .env("GOENV", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_file2)
        .spawn()
        .map_err(|e| format!("could not start {}: {e}", go.display()))?;
    let mut child = KilledOnDrop(child);
    let status = wait_child(&mut child.0, BUILD_TIMEOUT).await;
    let failed = |why: String| {
        let _ = std::fs::remove_file(&partial);
        Err(format!("go build {why}{}", log_tail(&log)))
    };
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => return failed(format!("failed ({status})")),
        Err(why) => return failed(why),
    }
    if let Err(e) = std::fs::rename(&partial, binary) {
        return failed(format!(
            "built, but renaming it to {}: {e}",
            binary.display()
        ));
    }
    let took = started.elapsed().unwrap_or_default();
    eprintln!("{LABEL}: built in {:.1} s", took.as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{cases, BulkPath, FIXED_RATE_PERCENT};

    const ONE_WAY: &str = "result rate=1556239.592 sent=451872 expected=451872 \
                           received=451000 lost=872 slow_consumer=0 dropped=0 disconnects=0\n";

    fn options() -> Options {
        let mut options = Options::from_args(["--quick"]);
        options.warmup = Duration::from_millis(100);
        options.measure = Duration::from_millis(250);
        options
    }

    #[test]
    fn a_result_line_is_read_with_its_counts() {
        let report = parse_output(ONE_WAY).expect("parses");
        assert_eq!(report.rate, 1556239.592);
        assert_eq!(
            (report.sent, report.expected, report.received, report.lost),
            (451872, 451872, 451000, 872)
        );
        assert!(report.buckets.is_empty());
        assert_eq!(report.loss_reported(), None);
        // Unknown keys and blank lines are let through.
        let more = format!("\n{}", ONE_WAY.trim_end().to_owned() + " future=1\n\n");
        assert_eq!(parse_output(&more).expect("parses"), report);

        let one_way = Invocation {
            mode: Mode::OneWay {
                subs: 1,
                queue: false,
            },
            body: 128,
        };
        let m = one_way.measurement(&report);
        assert_eq!(m.outcome, Outcome::Rate(1556239.592));
        assert_eq!((m.lost, m.loss_reported.as_deref()), (872, None));
        assert_eq!(m.to_string(), "1.56 M, 872 lost (unexplained)");
    }

    #[test]
    fn loss_is_explained_only_by_what_nats_go_reported() {
        let mut report = parse_output(ONE_WAY).expect("parses");
        report.slow_consumer = 2;
        report.dropped = 872;
        report.disconnects = 1;
        let text = "nats.go reported 2 slow-consumer errors, 872 messages dropped by the client, \
                    1 disconnect";
        assert_eq!(report.loss_reported().as_deref(), Some(text));
        let m = Invocation {
            mode: Mode::OneWay {
                subs: 1,
                queue: false,
            },
            body: 128,
        }
        .measurement(&report);
        assert_eq!(m.loss_reported.as_deref(), Some(text));
        // Reports without loss are not kept.
        report.lost = 0;
        let m = Invocation {
            mode: Mode::RequestRate { outstanding: 32 },
            body: 128,
        }
        .measurement(&report);
        assert_eq!((m.lost, m.loss_reported), (0, None));
    }

    #[test]
    fn buckets_become_latency_percentiles() {
        let mut out = String::new();
        for us in 1..=1000u64 {
            out.push_str(&format!("bucket {} 1\n", us * 1000));
        }
        out.push_str(
            "result rate=20000.000 sent=1000 expected=1000 received=1000 lost=0 \
             slow_consumer=0 dropped=0 disconnects=0\n",
        );
        let report = parse_output(&out).expect("parses");
        assert_eq!(report.buckets.len(), 1000);
        let fixed = Invocation {
            mode: Mode::FixedRate { rate: 20_000 },
            body: 128,
        };
        let Outcome::Latency(l) = fixed.measurement(&report).outcome else {
            panic!("no latency")
        };
        assert!((l.p50_us - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_us - 990.0).abs() < 1.0, "{l:?}");
        assert_eq!(l.rate, Some(20_000.0));
        let plain = Invocation {
            mode: Mode::RequestLatency,
            body: 128,
        };
        let Outcome::Latency(l) = plain.measurement(&report).outcome else {
            panic!("no latency")
        };
        assert_eq!(l.rate, None);
        // A latency run without buckets fails, a rate of 0 too.
        let empty = parse_output(ONE_WAY).expect("parses");
        assert!(matches!(
            plain.measurement(&empty).outcome,
            Outcome::Failed(_)
        ));
        let zero = GoReport::default();
        let m = Invocation {
            mode: Mode::Bulk { min_bodies: 3 },
            body: 1 << 20,
        }
        .measurement(&zero);
        assert!(matches!(m.outcome, Outcome::Failed(_)), "{m}");
    }

    #[test]
    fn bad_lines_are_errors_that_say_where() {
        let bad: &[(&str, &str)] = &[
            ("bucket 12\n", "line 1: no count"),
            ("bucket x 3\n", "line 1: bad value"),
            ("bucket 1 2 3\n", "extra words"),
            ("bucket -1 2\n", "bad value"),
            ("hello\n", "line 1: unexpected \"hello\""),
            (
                "result rate=abc sent=1 expected=1 received=1 lost=0 slow_consumer=0 \
                 dropped=0 disconnects=0\n",
                "bad rate",
            ),
            (
                "result rate=NaN sent=1 expected=1 received=1 lost=0 slow_consumer=0 \
                 dropped=0 disconnects=0\n",
                "bad rate",
            ),
            ("result rate=1 sent=1\n", "no expected"),
            ("result sent=1\n", "no rate"),
            ("result rate=1 sent\n", "not key=value"),
            ("result rate=1 sent=-1\n", "bad sent"),
        ];
        for (text, why) in bad {
            let e = parse_output(text).expect_err(text);
            let e = format!("{e:#}");
            assert!(e.contains(why), "{text:?}: {e}");
        }
        let after = format!("{ONE_WAY}bucket 1 1\n");
        let e = format!("{:#}", parse_output(&after).expect_err("after"));
        assert!(e.contains("after the result line"), "{e}");
        let too_many = "bucket 1 1\n".repeat(MAX_BUCKETS + 1);
        let e = format!("{:#}", parse_output(&too_many).expect_err("many"));
        assert!(e.contains("more than"), "{e}");
    }

    #[test]
    fn a_missing_result_line_is_an_error() {
        for text in ["", "\n\n", "bucket 1000 3\nbucket 2000 1\n"] {
            let e = format!("{:#}", parse_output(text).expect_err(text));
            assert_eq!(e, "no result line", "{text:?}");
        }
    }

    #[test]
    fn cases_map_to_modes_and_flags() {
        let o = options();
        let max = 64 << 20;
        let run =
            |case: Case| Invocation::for_case(case, &o, max).unwrap_or_else(|_| panic!("{case}"));
        let send = |peer| Case::SendPipelined {
            body: 128,
            outstanding: 256,
            peer,
        };
        assert_eq!(
            run(send(SendPeer::Publish)),
            run(Case::Notify { body: 128 })
        );
        let js = run(send(SendPeer::JetStream));
        assert_eq!(js.mode, Mode::JetStream { outstanding: 256 });
        assert!(js.jetstream() && !run(Case::Notify { body: 128 }).jetstream());
        // Recoverable: the same publish-with-ack window, and one at a time.
        let recoverable = Case::RecoverableSend {
            body: 128,
            outstanding: 256,
        };
        assert_eq!(run(recoverable), js);
        let one = run(Case::RecoverableLatency { body: 128 });
        assert_eq!((one.mode, one.body), (Mode::JetStreamLatency, 128));
        assert!(one.jetstream());
        let args = one.args("nats://127.0.0.1:1", &o);
        assert_eq!(args[0], "jslat");
        assert!(!args.iter().any(|a| a == "--outstanding"), "{args:?}");
        let any = run(Case::AnyOf {
            members: 4,
            body: 128,
        });
        assert_eq!(
            any.mode,
            Mode::OneWay {
                subs: 4,
                queue: true
            }
        );
        let args = any.args("nats://127.0.0.1:1", &o);
        assert_eq!(args[0], "oneway");
        assert!(args.ends_with(&["--subs".into(), "4".into(), "--queue".into()]));
        assert!(args.contains(&"100000000ns".to_owned()));
        let fixed = run(Case::FixedRate {
            body: 128,
            rate: 5000,
        });
        assert!(fixed
            .args("u", &o)
            .ends_with(&["--rate".into(), "5000".into()]));
        let bulk = run(Case::Bulk {
            body: 1 << 20,
            path: BulkPath::Lazy,
        });
        assert_eq!(
            bulk.mode,
            Mode::Bulk {
                min_bodies: bulk_plans(&o).1.min_bodies
            }
        );
        let over = Invocation::for_case(
            Case::Bulk {
                body: max + 1,
                path: BulkPath::Server,
            },
            &o,
            max,
        );
        assert_eq!(over, Err(Measurement::skipped("over nats max_payload")));
        let unrated = Invocation::for_case(Case::FixedRate { body: 128, rate: 0 }, &o, max);
        assert!(matches!(unrated, Err(m) if matches!(m.outcome, Outcome::Failed(_))));
        // TLS: notify as in clear (the server and the flags make it TLS);
        // no lazy channel.
        assert_eq!(
            run(Case::NotifyTls { body: 128 }),
            run(Case::Notify { body: 128 })
        );
        assert_eq!(
            Invocation::for_case(Case::LazyTls { body: 1 << 20 }, &o, max),
            Err(Measurement::skipped("n/a"))
        );
        let file = |name: &str| PathBuf::from(format!("/c/{name}"));
        let tls = ServerTls {
            ca: file("ca.pem"),
            server: crate::tls::Identity {
                cert: file("s.pem"),
                key: file("s.key"),
            },
            client: crate::tls::Identity {
                cert: file("c.pem"),
                key: file("c.key"),
            },
        };
        assert_eq!(
            tls_args(&tls),
            [
                "--tls-ca",
                "/c/ca.pem",
                "--tls-cert",
                "/c/c.pem",
                "--tls-key",
                "/c/c.key"
            ]
        );
    }

    #[test]
    fn output_is_read_within_bounds() {
        let (kept, over) = read_capped(&b"abcdef"[..], 6).expect("reads");
        assert_eq!((kept.as_slice(), over), (&b"abcdef"[..], false));
        let (kept, over) = read_capped(&[7u8; 200_000][..], 100_000).expect("reads");
        assert!(over && kept.len() <= 100_000);
        assert_eq!(read_tail(&b"0123456789"[..], 4), "6789");
        let long: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        assert_eq!(read_tail(&long[..], 3).len(), 3);
        assert_eq!(stderr_note(" \n"), "");
        assert_eq!(stderr_note("boom\n"), "; its stderr ends: boom");
    }

    #[test]
    fn the_source_is_embedded_and_says_how_it_is_built() {
        assert!(SOURCE.starts_with("// Command nats-bench-go"));
        assert!(SOURCE.contains("GOPATH=/usr/share/gocode GO111MODULE=off go build"));
    }

    /// Needs `go`, nats.go and nats-server (installs them with apt-get if
    /// it can): `cargo test -p clustercomm-benches --lib -- --ignored
    /// --nocapture`. Runs every case of a full run once with short
    /// phases; the fixed-rate case at [`FIXED_RATE_PERCENT`] of the
    /// `notify` rate just measured, as the driver does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "builds a Go program and starts nats-server, which CI need not have"]
    async fn nats_go_runs_every_case() {
        let nats = match NatsGo::start(true).await {
            Ok(nats) => nats,
            Err(why) => panic!("the nats.go peer is unavailable: {why}"),
        };
        let mut options = Options::from_args(["--quick"]);
        options.warmup = Duration::from_millis(100);
        options.measure = Duration::from_millis(500);
        let mut all = vec![Case::Notify { body: 128 }];
        all.extend(cases(false));
        all.push(Case::Bulk {
            body: nats.max_payload() + 1,
            path: BulkPath::Server,
        });
        let mut notify_rate = 0.0;
        for case in all {
            let case = case.at_rate((notify_rate * FIXED_RATE_PERCENT as f64 / 100.0) as u64);
            let started = std::time::Instant::now();
            let measured = nats.run(case, &options).await;
            println!(
                "nats.go {case}: {measured} {} ({:.1} s)",
                case.unit(),
                started.elapsed().as_secs_f64()
            );
            match (case, &measured.outcome) {
                (Case::Notify { body: 128 }, Outcome::Rate(rate)) => notify_rate = *rate,
                (Case::Bulk { body, .. }, outcome) if body > nats.max_payload() => {
                    assert_eq!(*outcome, Outcome::Skipped("over nats max_payload".into()));
                    continue;
                }
                (Case::LazyTls { .. }, outcome) => {
                    assert_eq!(*outcome, Outcome::Skipped("n/a".into()));
                    continue;
                }
                (Case::FixedRate { .. }, Outcome::Latency(l)) => {
                    assert!(l.rate.is_some_and(|r| r > 0.0), "{l:?}")
                }
                _ => {}
            }
            assert!(
                measured.outcome.value().is_some_and(|v| v > 0.0),
                "{case}: {measured}"
            );
        }
    }
}
