//! The processors case (issue 17): messages handled per second by a
//! service served with 4 processors against the same service with 1, on
//! a handler that spends [`WORK`] (20 µs) of CPU per message.
//!
//! [`SENDERS`] sender nodes keep [`IN_FLIGHT`] acknowledged sends each in
//! flight (`submit` + `Pending::outcome`, acknowledged on receipt) to one
//! worker node, which serves a fresh service each round with
//! `serve_with(.., ServeOptions::new().processors(n), ..)`. A round ends
//! when the handler has handled every message; its rate is handled
//! messages over the time from the first send to the last one handled.
//! The two configurations ([`CONFIGS`]) take turns, round by round, so
//! that each is measured beside the other at nearly the same moment: the
//! peer of 4 processors is 1 processor in the same run, not NATS. The
//! result ([`Comparison`]) is each configuration's median and range and
//! the ratio of the medians.
//!
//! Both the suite (`--bench suite`, the case named [`name`]) and the
//! standalone `--bench processors` run [`run`]. They differ only in where
//! the message server runs ([`Topology`]): the standalone bench runs it
//! inside the bench process, beside the nodes, as it always has; the
//! suite runs it as a `bench-message-server` process, as it does for
//! every clustercomm case (and the README says it always does).
//! The nodes always run in the calling process, on its runtime. The
//! header ([`Plan::header`]) names the topology.
//!
//! The nodes run on the default configuration except that lazy
//! auto-activation is off (`lazy.auto_activate_messages = 0`, as in the
//! suite's small-message cases): at this rate a sender would otherwise
//! cross the activation threshold partway through the run, and the rounds
//! before and after would measure different paths. Every round checks
//! that all its messages went through the message server.
//!
//! Messages from one sender are processed in order, so three senders keep
//! at most three processors busy; on a two-core machine the runtime's two
//! workers bound the gain further (the handler's work is CPU, and it
//! shares those workers with the nodes' own tasks).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use message_server::MessageServer;
use node_runtime::{Config, Message, Node, NodeId, Pending, ServeOptions, Target};
use tokio::sync::{oneshot, Notify};

use crate::child::ListeningChild;
use crate::options::WAIT_TIMEOUT;
use crate::suite::{Measurement, Outcome, Summary};

/// Runtime worker threads of the standalone bench (the suite's runtime
/// has as many): the machines this runs on have two cores.
pub const WORKERS: usize = 2;
/// CPU time the handler spends on each message (spinning).
pub const WORK: Duration = Duration::from_micros(20);
/// Sender nodes.
pub const SENDERS: usize = 3;
/// Acknowledged sends each sender keeps in flight.
pub const IN_FLIGHT: usize = 256;
/// Processor counts compared: the first is the reference of the ratio.
pub const CONFIGS: [usize; 2] = [1, 4];
/// Rounds of each configuration in a full run.
pub const ROUNDS: u32 = 5;
/// Rounds of each configuration with `--quick`.
pub const QUICK_ROUNDS: u32 = 3;
/// Messages per sender per round in a full run.
pub const PER_SENDER: u64 = 10_000;
/// Messages per sender per round with `--quick`.
pub const QUICK_PER_SENDER: u64 = 4_000;
/// Upper bound on the handler finishing a round once every send is
/// acknowledged.
pub const HANDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The worker node's id.
const WORKER: &str = "worker";

/// The case's name in the suite, which its filters match (`processors`
/// selects it).
pub fn name() -> String {
    format!(
        "processors {} against {}, {} µs handler",
        CONFIGS[1],
        CONFIGS[0],
        WORK.as_micros()
    )
}

/// Where the message server of the measurement runs.
#[derive(Debug, Clone, Copy)]
pub enum Topology<'a> {
    /// A `MessageServer` on the calling process's runtime, beside the
    /// nodes (the standalone bench).
    InProcess,
    /// A `bench-message-server` process started from this binary, as the
    /// suite runs it for every clustercomm case.
    Process(&'a Path),
}

impl Topology<'_> {
    /// Where the server runs, for the header.
    pub fn describe(&self) -> &'static str {
        match self {
            Topology::InProcess => "message server in this process",
            Topology::Process(_) => "message server a bench-message-server process",
        }
    }
}

/// How long a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Rounds of each configuration, the configurations taking turns.
    pub rounds: u32,
    /// Messages each sender sends per round.
    pub per_sender: u64,
}

impl Plan {
    /// [`ROUNDS`] rounds of [`PER_SENDER`] messages per sender, or with
    /// `quick` [`QUICK_ROUNDS`] of [`QUICK_PER_SENDER`]; `rounds`, if
    /// given, overrides the count (the suite's `--rounds N`).
    pub fn new(quick: bool, rounds: Option<u32>) -> Plan {
        let (default_rounds, per_sender) = if quick {
            (QUICK_ROUNDS, QUICK_PER_SENDER)
        } else {
            (ROUNDS, PER_SENDER)
        };
        Plan {
            rounds: rounds.unwrap_or(default_rounds).max(1),
            per_sender,
        }
    }

    /// One line saying what the run does and where, with the calling
    /// runtime's worker count (call it on that runtime):
    /// `3 senders x 4000 messages, handler 20 µs of CPU each, 2 runtime
    /// workers, 3 interleaved rounds, message server in this process`.
    pub fn header(&self, topology: Topology<'_>) -> String {
        let workers =
            tokio::runtime::Handle::try_current().map_or(WORKERS, |h| h.metrics().num_workers());
        format!(
            "{SENDERS} senders x {} messages, handler {} µs of CPU each, {workers} runtime \
             workers, {} interleaved rounds, {}",
            self.per_sender,
            WORK.as_micros(),
            self.rounds,
            topology.describe()
        )
    }
}

/// The rounds of each configuration of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Per configuration of [`CONFIGS`], in that order: its rounds
    /// (handled messages per second).
    pub summaries: Vec<Summary>,
}

impl Comparison {
    /// A run that failed: every configuration failed with `why`.
    pub fn failed(why: impl Into<String>) -> Comparison {
        let why = why.into();
        Comparison {
            summaries: CONFIGS
                .iter()
                .map(|_| Summary {
                    rounds: vec![Measurement::failed(why.clone())],
                })
                .collect(),
        }
    }

    /// The rounds of `processors` (one of [`CONFIGS`]).
    pub fn of(&self, processors: usize) -> Option<&Summary> {
        let i = CONFIGS.iter().position(|&p| p == processors)?;
        self.summaries.get(i)
    }

    /// The median of [`CONFIGS`]' last over the median of its first (4
    /// processors against 1); `None` if either failed.
    pub fn ratio(&self) -> Option<f64> {
        let first = self.summaries.first()?.median()?;
        let last = self.summaries.last()?.median()?;
        (first > 0.0).then(|| last / first)
    }

    /// The standalone bench's table: each configuration's median and
    /// range in whole messages per second, then the ratio.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "| processors | handled/s, median (min–max) |");
        let _ = writeln!(t, "| ---: | ---: |");
        for (&processors, s) in CONFIGS.iter().zip(&self.summaries) {
            let cell = match (s.median(), s.range()) {
                (Some(m), Some((lo, hi))) => format!("{m:.0} ({lo:.0}–{hi:.0})"),
                _ => s.to_string(),
            };
            let _ = writeln!(t, "| {processors} | {cell} |");
        }
        let _ = writeln!(t);
        let _ = write!(
            t,
            "{} processors against {}: {} (ratio of the medians)",
            CONFIGS[1],
            CONFIGS[0],
            self.ratio().map_or("-".to_owned(), |x| format!("{x:.2}x"))
        );
        t
    }

    /// The suite's table of this case, in the style of its main table: the
    /// case, its unit, each configuration's median round with the range
    /// of the rounds, and the ratio of the medians.
    pub fn suite_table(&self) -> String {
        let mut t = String::new();
        let mut heading = "| case | unit |".to_owned();
        for &processors in &CONFIGS {
            let _ = write!(heading, " {} |", configuration(processors));
        }
        let _ = writeln!(t, "{heading} {}/{} |", CONFIGS[1], CONFIGS[0]);
        let _ = writeln!(t, "| --- | --- |{} ---: |", " ---: |".repeat(CONFIGS.len()));
        let mut line = format!("| {} | handled/s |", name());
        for s in &self.summaries {
            let _ = write!(line, " {s} |");
        }
        let ratio = self.ratio().map_or("-".to_owned(), |x| format!("{x:.2}"));
        let _ = writeln!(t, "{line} {ratio} |");
        t
    }

    /// One line for the suite's progress output, as its other cases
    /// print: `processors ...: 1 processor X; 4 processors Y; 4/1 Z`.
    pub fn line(&self) -> String {
        let mut line = format!("{}:", name());
        for (&processors, s) in CONFIGS.iter().zip(&self.summaries) {
            let _ = write!(line, " {} {s};", configuration(processors));
        }
        let _ = write!(
            line,
            " {}/{} {}",
            CONFIGS[1],
            CONFIGS[0],
            self.ratio().map_or("-".to_owned(), |x| format!("{x:.2}"))
        );
        line
    }
}

/// `1 processor`, `4 processors`.
fn configuration(processors: usize) -> String {
    match processors {
        1 => "1 processor".to_owned(),
        n => format!("{n} processors"),
    }
}

/// The message server of one run. Dropped, the in-process one stops (its
/// shutdown future ends with the sender) and the process is killed.
enum Server {
    InProcess { _stop: oneshot::Sender<()> },
    Process(ListeningChild),
}

impl Server {
    async fn start(
        topology: Topology<'_>,
        config: &Config,
    ) -> anyhow::Result<(Server, SocketAddr)> {
        match topology {
            Topology::InProcess => {
                let mut config = config.clone();
                config.message_server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
                let server = MessageServer::bind(config)
                    .await
                    .context("starting the message server")?;
                let addr = server.local_addr();
                let (stop, stopped) = oneshot::channel::<()>();
                tokio::spawn(async move {
                    let _ = server
                        .run(async move {
                            let _ = stopped.await;
                        })
                        .await;
                });
                Ok((Server::InProcess { _stop: stop }, addr))
            }
            Topology::Process(binary) => {
                let child =
                    ListeningChild::start(binary, ["--listen", "127.0.0.1:0"], Stdio::inherit())
                        .await
                        .with_context(|| {
                            format!("starting the message server {}", binary.display())
                        })?;
                let addr = child.addr();
                Ok((Server::Process(child), addr))
            }
        }
    }

    /// Stops the server once the nodes are gone: the in-process one by
    /// its shutdown future, the process by closing its stdin (it is
    /// killed if it does not exit in time).
    async fn stop(self) {
        match self {
            Server::InProcess { .. } => {}
            Server::Process(child) => {
                if let Err(e) = child.stop().await {
                    eprintln!("the message server did not stop cleanly: {e:#}");
                }
            }
        }
    }
}

/// Runs `plan`: starts the message server where `topology` says, a worker
/// node and [`SENDERS`] sender nodes, then measures [`CONFIGS`] in turn,
/// round by round, and shuts everything down.
///
/// # Errors
///
/// The server or a node does not start, a send or its acknowledgement
/// fails, a message takes another path than the message server, or the
/// handler does not finish a round within [`HANDLE_TIMEOUT`]. The first
/// failed round ends the run: a failed round fails the case.
pub async fn run(plan: &Plan, topology: Topology<'_>) -> anyhow::Result<Comparison> {
    let mut config = Config::default();
    config.lazy.auto_activate_messages = 0;
    let (server, addr) = Server::start(topology, &config).await?;
    let start = |id: String| {
        let builder = Node::builder(id.as_str())
            .config(config.clone())
            .message_server(addr)
            .ignore_environment();
        async move {
            tokio::time::timeout(WAIT_TIMEOUT, builder.start())
                .await
                .with_context(|| format!("starting {id} timed out"))?
                .with_context(|| format!("starting {id}"))
        }
    };
    let mut nodes = vec![start(WORKER.to_owned()).await?];
    for i in 0..SENDERS {
        nodes.push(start(format!("sender-{i}")).await?);
    }
    let measured = rounds(plan, &nodes[0], &nodes[1..]).await;
    let all = futures_util::future::join_all(nodes.into_iter().map(Node::shutdown));
    let _ = tokio::time::timeout(WAIT_TIMEOUT, all).await;
    server.stop().await;
    measured
}

/// Every round of `plan`, the configurations taking turns.
async fn rounds(plan: &Plan, worker: &Node, senders: &[Node]) -> anyhow::Result<Comparison> {
    let mut summaries = vec![Summary::default(); CONFIGS.len()];
    for round in 0..plan.rounds {
        for (c, &processors) in CONFIGS.iter().enumerate() {
            let service = format!("jobs-{processors}-{round}");
            let rate = once(worker, senders, &service, processors, plan.per_sender)
                .await
                .with_context(|| format!("round {round} with {}", configuration(processors)))?;
            summaries[c].push(Outcome::Rate(rate).into());
        }
    }
    Ok(Comparison { summaries })
}

/// One round: `service` served with `processors`, every sender sending
/// `per_sender` messages; handled messages per second.
async fn once(
    worker: &Node,
    senders: &[Node],
    service: &str,
    processors: usize,
    per_sender: u64,
) -> anyhow::Result<f64> {
    let total = per_sender * senders.len() as u64;
    let handled = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let serving = {
        let (handled, done) = (handled.clone(), done.clone());
        worker
            .serve_with(
                service,
                &ServeOptions::new().processors(processors),
                move |m: Message| {
                    let (handled, done) = (handled.clone(), done.clone());
                    async move {
                        let until = Instant::now() + WORK;
                        while Instant::now() < until {
                            std::hint::spin_loop();
                        }
                        drop(m);
                        if handled.fetch_add(1, Ordering::Relaxed) + 1 == total {
                            done.notify_one();
                        }
                        Ok(())
                    }
                },
            )
            .await
            .context("serving")?
    };
    let before: Vec<_> = senders.iter().map(Node::counters).collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in senders {
        let s = s.clone();
        let service = service.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut in_flight: VecDeque<Pending> = VecDeque::new();
            for n in 0..per_sender {
                if in_flight.len() >= IN_FLIGHT {
                    if let Some(p) = in_flight.pop_front() {
                        p.outcome().await?;
                    }
                }
                in_flight.push_back(
                    s.submit(
                        Target::Node(NodeId::new(WORKER)),
                        &service,
                        n.to_le_bytes().to_vec(),
                    )
                    .await?,
                );
            }
            for p in in_flight {
                p.outcome().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a sender panicked")??;
    }
    tokio::time::timeout(HANDLE_TIMEOUT, async {
        while handled.load(Ordering::Relaxed) < total {
            done.notified().await;
        }
    })
    .await
    .with_context(|| format!("the handler did not finish within {HANDLE_TIMEOUT:?}"))?;
    let elapsed = started.elapsed();
    let stats = serving.stats();
    ensure!(stats.handled == total, "{stats:?}");
    drop(serving);
    let (mut server, mut other) = (0, 0);
    for (s, b) in senders.iter().zip(&before) {
        let c = s.counters();
        server += c.server_messages - b.server_messages;
        other += (c.lazy_messages - b.lazy_messages) + (c.session_messages - b.session_messages);
    }
    ensure!(
        server == total && other == 0,
        "expected all {total} messages through the message server: {server} through it, \
         {other} direct"
    );
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// The suite's report section of this case: a heading, the header, the
/// table ([`Comparison::suite_table`]).
pub fn section(header: &str, comparison: &Comparison) -> String {
    format!(
        "\n## Processors\n\n{header}; {} and {} processors take turns in each round. Each \
         cell is the median round with the range of the rounds in brackets; the last column \
         is the ratio of the medians (the peer of {} processors is {} in the same run).\n\n{}",
        CONFIGS[0],
        CONFIGS[1],
        CONFIGS[1],
        CONFIGS[0],
        comparison.suite_table()
    )
}

/// The suite's line under its targets (the issue sets no target).
pub fn target_line(comparison: Option<&Comparison>) -> String {
    format!(
        "- {}: {} processors {} {} in the same rounds (no target)",
        name(),
        CONFIGS[1],
        comparison
            .and_then(Comparison::ratio)
            .map_or("-".to_owned(), |x| format!("{x:.2}x")),
        configuration(CONFIGS[0])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(values: &[f64]) -> Summary {
        Summary {
            rounds: values.iter().map(|&r| Outcome::Rate(r).into()).collect(),
        }
    }

    #[test]
    fn plan_rounds() {
        assert_eq!(Plan::new(false, None).rounds, ROUNDS);
        assert_eq!(Plan::new(true, None).rounds, QUICK_ROUNDS);
        assert_eq!(Plan::new(true, None).per_sender, QUICK_PER_SENDER);
        assert_eq!(Plan::new(true, Some(7)).rounds, 7);
    }

    #[test]
    fn ratio_and_tables() {
        let c = Comparison {
            summaries: vec![
                rates(&[30_000.0, 40_000.0, 35_000.0]),
                rates(&[70_000.0, 60_000.0, 80_000.0]),
            ],
        };
        assert_eq!(c.ratio(), Some(2.0));
        assert!(
            c.table().contains("| 1 | 35000 (30000–40000) |"),
            "{}",
            c.table()
        );
        assert!(c
            .table()
            .ends_with("4 processors against 1: 2.00x (ratio of the medians)"));
        assert!(
            c.suite_table()
                .contains("| 35,000 (30,000–40,000) | 70,000 (60,000–80,000) | 2.00 |"),
            "{}",
            c.suite_table()
        );
        let only = crate::Options::from_args(["--quick", "processors"]);
        assert!(only.selects(&name()));
        for case in crate::suite::cases(false) {
            assert!(!only.selects(&case.to_string()), "{case}");
        }
        let failed = Comparison::failed("no server");
        assert_eq!(failed.ratio(), None);
        assert!(failed.suite_table().contains("failed (no server)"));
        assert!(target_line(Some(&failed)).contains(" - "));
    }
}
