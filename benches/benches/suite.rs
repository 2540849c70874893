//! The benchmark suite: every path of clustercomm beside nats-server
//! (driven by NATS's own Go client, and by async-nats as a second column),
//! raw TCP through a relay process (the floor of every path through a
//! server) and direct raw TCP (the floor of the direct paths), measured
//! in the same run in interleaved rounds, so that the ratios hold on a
//! noisy shared machine.
//!
//! ```text
//! cargo bench -p clustercomm-benches --bench suite             # full run
//! cargo bench -p clustercomm-benches --bench suite -- --quick  # short rounds
//! ```
//!
//! Prints a markdown table (and writes it to `benches/results/suite.md`):
//! the median round of each system with the range of the rounds beside it,
//! what one-way cases lost, and the ratios the targets are judged on. It
//! also draws the path sweep to `benches/results/sweep.png` with the
//! recommended `lazy.threshold_bytes` marked. A peer that cannot be had
//! says why in its column; the rest runs. clustercomm's own message server
//! binary is never optional: without it the suite fails.
//!
//! The TLS rows (`notify 128 B over TLS`, `16 MiB over a lazy channel over
//! TLS`) run ours in a cluster with `[tls]` (certificates made once per
//! run, removed at the end) beside nats-server requiring mutual TLS, and
//! ours in clear once more in each of their rounds, so that TLS is
//! compared with clear text at the same moment (alone: `-- --quick
//! "over TLS"`).
//!
//! The recoverable rows (issue 19; alone: `-- --quick "recoverable
//! send"`) run ours with a store on both nodes, each in a fresh temporary
//! directory, beside JetStream publish-with-ack to a file-backed stream:
//! 256 in flight (the same nats.go measurement as the plain send's
//! JetStream row when both run), and one at a time for p50/p99.
//!
//! The processors case (`processors 4 against 1, 20 µs handler`, issue 17;
//! alone: `-- --quick processors`) is clustercomm against itself: a
//! service served with 4 processors against the same service with 1, in
//! interleaved rounds, through a `bench-message-server` process
//! ([`clustercomm_benches::processors`]). It runs after the other cases,
//! once their peers are stopped, and has a table of its own in the report.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clustercomm_benches::latency::Latency;
use clustercomm_benches::nats::Nats;
use clustercomm_benches::nats_go::NatsGo;
use clustercomm_benches::processors::{self, Comparison, Plan, Topology};
use clustercomm_benches::suite::{
    self, BulkPath, Case, Measurement, Outcome, SendPeer, Summary, System, FIXED_RATE_PERCENT,
};
use clustercomm_benches::tls::TlsCluster;
use clustercomm_benches::{ours, plot, raw_cases, relay_cases, Options};

/// One case: every system's rounds.
struct Row {
    case: Case,
    summaries: HashMap<System, Summary>,
    server_peak_kib: Option<u64>,
    /// A TLS row's reference: ours in clear ([`Case::plain`]), measured
    /// after the systems in each of its rounds (empty for other rows).
    plain: Summary,
}

impl Row {
    fn of(&self, system: System) -> &Summary {
        static EMPTY: Summary = Summary { rounds: Vec::new() };
        self.summaries.get(&system).unwrap_or(&EMPTY)
    }

    /// The floor this case is compared with: the relay for paths through
    /// a server, direct TCP for the direct paths.
    fn floor(&self) -> System {
        if self.case.through_server() {
            System::Relay
        } else {
            System::Raw
        }
    }
}

/// The peers of the run and why any is missing.
struct Peers {
    server: PathBuf,
    /// Ours' TLS cluster (certificates and its file), for the TLS rows.
    tls: Result<TlsCluster, String>,
    nats_go: Result<NatsGo, String>,
    async_nats: Result<Nats, String>,
    relay: Result<PathBuf, String>,
}

impl Peers {
    async fn start(options: &Options, server: PathBuf) -> Peers {
        let tls = TlsCluster::generate(&ours::TLS_NODES).map_err(|e| format!("{e:#}"));
        if let Err(why) = &tls {
            println!("no TLS cluster ({why}): ours fails the TLS rows.");
        }
        if options.ours_only {
            let off = "--ours-only".to_owned();
            return Peers {
                server,
                tls,
                nats_go: Err(off.clone()),
                async_nats: Err(off.clone()),
                relay: Err(off),
            };
        }
        let nats_go = NatsGo::start(options.quick).await;
        if let Err(why) = &nats_go {
            println!("NATS's Go client unavailable ({why}): its column is skipped.");
        }
        let async_nats = Nats::start(options.quick).await;
        if let Err(why) = &async_nats {
            println!("nats-server unavailable to async-nats ({why}): its column is skipped.");
        }
        let relay = relay_binary();
        if let Err(why) = &relay {
            println!("the relay floor is unavailable ({why}): its column is skipped.");
        }
        Peers {
            server,
            tls,
            nats_go,
            async_nats,
            relay,
        }
    }

    /// One round of `case` on `system`, with the server's peak memory for
    /// ours.
    async fn measure(
        &self,
        system: System,
        case: Case,
        options: &Options,
    ) -> (Measurement, Option<u64>) {
        match system {
            System::Ours => {
                match ours::run(case, options, &self.server, self.tls.as_ref().ok()).await {
                    Ok(measured) => measured,
                    Err(e) => (Measurement::failed(format!("{e:#}")), None),
                }
            }
            System::NatsGo => match &self.nats_go {
                Ok(nats) => (nats.run(case, options).await, None),
                Err(why) => (Measurement::skipped(why.clone()), None),
            },
            System::AsyncNats => match &self.async_nats {
                Ok(nats) => (nats.run(case, options).await, None),
                Err(why) => (Measurement::skipped(why.clone()), None),
            },
            System::Relay => match &self.relay {
                Ok(relay) => (relay_cases::run(case, options, relay).await, None),
                Err(why) => (Measurement::skipped(why.clone()), None),
            },
            System::Raw if options.ours_only => (Measurement::skipped("--ours-only"), None),
            System::Raw => (raw_cases::run(case, options).await, None),
        }
    }
}

/// The message server binary: the one next to this executable (so that a
/// copied suite runs its own build), else the one cargo built with it.
fn server_binary() -> anyhow::Result<PathBuf> {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_bench-message-server"));
    let found = ours::server_binary().unwrap_or(built);
    anyhow::ensure!(
        found.is_file(),
        "{} is missing: the suite runs clustercomm's message server as its own process and has \
         no fallback (`cargo build --release -p clustercomm-benches --bins` builds it)",
        found.display()
    );
    Ok(found)
}

/// The relay binary, found as [`server_binary`] is.
fn relay_binary() -> Result<PathBuf, String> {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_bench-relay"));
    let found = relay_cases::relay_binary().unwrap_or(built);
    if found.is_file() {
        Ok(found)
    } else {
        Err(format!("{} is missing", found.display()))
    }
}

/// Measurements already taken, by system, the pattern the system ran
/// and round: a pattern shared by several cases runs once per round.
#[derive(Default)]
struct Taken(HashMap<(System, Case, u32), (Measurement, Option<u64>)>);

impl Taken {
    /// Round `round` of `case` on `system`: measured now, or the
    /// measurement an earlier case with the same pattern took.
    async fn take(
        &mut self,
        peers: &Peers,
        system: System,
        case: Case,
        round: u32,
        options: &Options,
    ) -> (Measurement, Option<u64>) {
        let key = (system, case, round);
        if let Some(found) = self.0.get(&key) {
            return found.clone();
        }
        let measured = peers.measure(system, case, options).await;
        self.0.insert(key, measured.clone());
        measured
    }
}

async fn run_case(
    peers: &Peers,
    taken: &mut Taken,
    rows: &[Row],
    case: Case,
    options: &Options,
) -> Row {
    let rounds = options.rounds.unwrap_or(case.rounds());
    let mut summaries: HashMap<System, Summary> = HashMap::new();
    let mut server_peak_kib: Option<u64> = None;
    let mut plain = Summary::default();
    for round in 0..rounds {
        for system in System::ALL {
            let Some(mut pattern) = system.pattern(case) else {
                summaries
                    .entry(system)
                    .or_default()
                    .push(Measurement::skipped("n/a"));
                continue;
            };
            if let Case::FixedRate { body, .. } = pattern {
                match fixed_rate(peers, taken, rows, system, body, options).await {
                    Ok(rate) => pattern = pattern.at_rate(rate),
                    Err(why) => {
                        summaries
                            .entry(system)
                            .or_default()
                            .push(Measurement::skipped(why));
                        continue;
                    }
                }
            }
            let (measured, peak) = taken.take(peers, system, pattern, round, options).await;
            summaries.entry(system).or_default().push(measured);
            server_peak_kib = server_peak_kib.max(peak);
        }
        if case.tls() {
            // Fresh, not shared with the plain row: this round's moment.
            let (measured, _) = peers.measure(System::Ours, case.plain(), options).await;
            plain.push(measured);
        }
    }
    let row = Row {
        case,
        summaries,
        server_peak_kib,
        plain,
    };
    let mut line = format!("{case}:");
    for system in System::ALL {
        let _ = write!(line, " {} {};", short_heading(system), row.of(system));
    }
    if case.tls() {
        let _ = write!(line, " ours in clear {};", row.plain);
    }
    println!("{}", line.trim_end_matches(';'));
    row
}

/// The rate a system's fixed-rate case runs at: [`FIXED_RATE_PERCENT`] of
/// its median `notify` of the same body in this run (measured now, one
/// round, if no earlier row has it). The relay, a floor rather than a
/// peer, runs at ours' rate: the latency two bare hops give at the load
/// ours was measured at (half the relay's own maximum is more than the
/// load generator itself can pace).
async fn fixed_rate(
    peers: &Peers,
    taken: &mut Taken,
    rows: &[Row],
    system: System,
    body: usize,
    options: &Options,
) -> Result<u64, String> {
    let system = match system {
        System::Relay => System::Ours,
        other => other,
    };
    let notify = Case::Notify { body };
    let median = rows
        .iter()
        .find(|r| r.case == notify)
        .and_then(|r| r.of(system).median());
    let max = match median {
        Some(max) => max,
        None => {
            // A round of its own, apart from the numbered rounds.
            let (measured, _) = taken.take(peers, system, notify, u32::MAX, options).await;
            match measured.outcome {
                Outcome::Rate(max) => max,
                other => return Err(format!("no maximum rate ({other})")),
            }
        }
    };
    Ok((max * FIXED_RATE_PERCENT as f64 / 100.0) as u64)
}

fn short_heading(system: System) -> &'static str {
    match system {
        System::Ours => "ours",
        System::NatsGo => "nats.go",
        System::AsyncNats => "async-nats",
        System::Relay => "relay",
        System::Raw => "raw",
    }
}

/// `ours / other` on the compared value (p50 and p99 for latency).
fn ratio(row: &Row, other: System) -> String {
    let (ours, theirs) = (row.of(System::Ours), row.of(other));
    if row.case.is_latency() {
        return match (ours.median_latency(), theirs.median_latency()) {
            (Some(a), Some(b)) if b.p50_us > 0.0 && b.p99_us > 0.0 => format!(
                "p50 {:.2}, p99 {:.2} (lower is better)",
                a.p50_us / b.p50_us,
                a.p99_us / b.p99_us
            ),
            _ if theirs.skipped() == Some("n/a") => "n/a".into(),
            _ => "-".into(),
        };
    }
    match (ours.median(), theirs.median()) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ if theirs.skipped() == Some("n/a") => "n/a".into(),
        _ => "-".into(),
    }
}

fn ratio_of(row: Option<&Row>, other: System) -> Option<f64> {
    let row = row?;
    Some(row.of(System::Ours).median()? / row.of(other).median()?)
}

/// Ours over TLS against ours in clear in the same rounds
/// ([`Row::plain`]), on the medians.
fn tls_against_plain(row: Option<&Row>) -> Option<f64> {
    let row = row?;
    Some(row.of(System::Ours).median()? / row.plain.median()?)
}

/// The loss cell: what ours, nats.go and async-nats lost over the rounds,
/// unexplained loss marked.
fn loss_cell(row: &Row) -> String {
    let mut cells = Vec::new();
    for system in [System::Ours, System::NatsGo, System::AsyncNats] {
        let s = row.of(system);
        let measured = s.rounds.iter().any(|m| m.outcome.value().is_some());
        cells.push(if !measured {
            "-".to_owned()
        } else if s.unexplained_loss() > 0 {
            format!("**{} unexplained**", s.lost())
        } else {
            s.lost().to_string()
        });
    }
    cells.join(" / ")
}

/// The processors case: 4 processors against 1 in interleaved rounds
/// (`--quick` and `--rounds N` as for the other cases), through a
/// `bench-message-server` process like every clustercomm case; its
/// header and result (failed, not fatal, if it could not run).
async fn processors_case(options: &Options, server: &Path) -> (String, Comparison) {
    let plan = Plan::new(options.quick, options.rounds);
    let topology = Topology::Process(server);
    let header = format!("{}, nodes in the bench process", plan.header(topology));
    let comparison = processors::run(&plan, topology)
        .await
        .unwrap_or_else(|e| Comparison::failed(format!("{e:#}")));
    println!("{}", comparison.line());
    (header, comparison)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {kernel}")
}

/// What to say when the paths do not cross.
fn no_crossover(points: &[ours::SweepPoint]) -> String {
    match points.first() {
        Some(p) if p.lazy_mb_s > p.server_mb_s => format!(
            "none for throughput: the lazy channel wins from {} up, so the threshold trades \
             direct connections (one per pair that talks) against throughput",
            suite::size(p.body)
        ),
        _ => "none: the message-server path wins at every size measured".into(),
    }
}

fn results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
}

/// One target of the issue, checked against the run's medians.
fn check(targets: &mut String, ok: Option<bool>, what: &str, measured: String) {
    let mark = match ok {
        Some(true) => "met",
        Some(false) => "**NOT met**",
        None => "not measured",
    };
    let _ = writeln!(targets, "- {what}: {mark} ({measured})");
}

fn find(rows: &[Row], case: Case) -> Option<&Row> {
    rows.iter().find(|r| r.case == case)
}

fn shown(x: Option<f64>) -> String {
    x.map_or("-".to_owned(), |x| format!("{x:.2}x"))
}

/// At least `min` times NATS (nats.go) on the median.
fn against_nats(t: &mut String, rows: &[Row], case: Case, min: f64) {
    let x = ratio_of(find(rows, case), System::NatsGo);
    check(
        t,
        x.map(|x| x >= min),
        &format!("{case}: at least {min}x NATS (nats.go)"),
        shown(x),
    );
}

fn targets(rows: &[Row]) -> String {
    let mut t = String::new();
    for case in [
        Case::Notify { body: 128 },
        Case::Notify { body: 1024 },
        Case::FanOutAll {
            receivers: 8,
            body: 128,
        },
        Case::FanOutGroup {
            receivers: 8,
            body: 128,
        },
        Case::AnyOf {
            members: 4,
            body: 128,
        },
    ] {
        against_nats(&mut t, rows, case, 2.0);
    }
    let send = |peer| Case::SendPipelined {
        body: 128,
        outstanding: 256,
        peer,
    };
    against_nats(&mut t, rows, send(SendPeer::Publish), 0.8);
    against_nats(&mut t, rows, send(SendPeer::JetStream), 3.0);
    let recoverable = Case::RecoverableSend {
        body: 128,
        outstanding: 256,
    };
    against_nats(&mut t, rows, recoverable, 1.0);
    let one = Case::RecoverableLatency { body: 128 };
    let of = |system| find(rows, one).and_then(|r| r.of(system).median_latency());
    let _ = writeln!(
        t,
        "- {one}: p50/p99 µs: ours {}, JetStream publish-with-ack one at a time (nats.go) {} \
         (no target)",
        show_latency(of(System::Ours)),
        show_latency(of(System::NatsGo))
    );

    let latency = find(rows, Case::RequestLatency { body: 128 });
    let of = |system| latency.and_then(|r| r.of(system).median_latency());
    let (ours, raw, nats) = (of(System::Ours), of(System::Raw), of(System::NatsGo));
    let relay = of(System::Relay);
    let ok = match (ours, raw, nats) {
        (Some(o), Some(r), Some(n)) => Some(
            o.p50_us <= 3.0 * r.p50_us
                && o.p99_us <= 5.0 * r.p99_us
                && o.p50_us < n.p50_us
                && o.p99_us < n.p99_us,
        ),
        _ => None,
    };
    check(
        &mut t,
        ok,
        "request/reply 1 outstanding: p50 at most 3x and p99 at most 5x raw TCP ping-pong, \
         both below NATS",
        format!(
            "p50/p99 µs: ours {}, raw direct {}, NATS {}; the relay floor (four hops through a \
             process, as ours) {}",
            show_latency(ours),
            show_latency(raw),
            show_latency(nats),
            show_latency(relay)
        ),
    );
    let x = ratio_of(find(rows, Case::Notify { body: 128 }), System::Relay);
    check(
        &mut t,
        x.map(|x| x >= 0.6),
        "notify 128 B through the server: at least 0.6x the raw relay floor",
        shown(x),
    );
    let lazy16 = Case::Bulk {
        body: 16 << 20,
        path: BulkPath::Lazy,
    };
    let x = ratio_of(find(rows, lazy16), System::Raw);
    check(
        &mut t,
        x.map(|x| x >= 0.9),
        "lazy channel 16 MiB: at least 90% of raw TCP",
        shown(x),
    );
    let notify_tls = Case::NotifyTls { body: 128 };
    let x = tls_against_plain(find(rows, notify_tls));
    check(
        &mut t,
        x.map(|x| x >= 0.7),
        &format!("{notify_tls}: at least 0.7x ours in clear (notify 128 B in the same rounds)"),
        shown(x),
    );
    against_nats(&mut t, rows, notify_tls, 1.5);
    let lazy_tls = Case::LazyTls { body: 16 << 20 };
    let _ = writeln!(
        t,
        "- {lazy_tls}: {} ours in clear in the same rounds (no target)",
        shown(tls_against_plain(find(rows, lazy_tls)))
    );
    let peak = server_peak(rows);
    check(
        &mut t,
        peak.map(|k| k < 64 * 1024),
        "message server peak memory during fan-out under 64 MiB",
        peak.map_or("unknown".into(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        }),
    );
    t
}

/// `p50/p99` in µs, or `-`.
fn show_latency(l: Option<Latency>) -> String {
    l.map_or("-".to_owned(), |l| {
        format!("{:.0}/{:.0}", l.p50_us, l.p99_us)
    })
}

fn server_peak(rows: &[Row]) -> Option<u64> {
    rows.iter()
        .filter(|r| matches!(r.case, Case::FanOutAll { .. } | Case::FanOutGroup { .. }))
        .filter_map(|r| r.server_peak_kib)
        .max()
}

fn table(rows: &[Row]) -> String {
    let mut table = String::new();
    let mut heading = "| case | unit |".to_owned();
    for system in System::ALL {
        let _ = write!(heading, " {} |", system.heading());
    }
    heading.push_str(" lost (ours / nats.go / async-nats) | ours/NATS | ours/floor |");
    let _ = writeln!(table, "{heading}");
    let _ = writeln!(
        table,
        "| --- | --- |{} --- | ---: | ---: |",
        " ---: |".repeat(System::ALL.len())
    );
    for r in rows {
        let mut line = format!("| {} | {} |", r.case, r.case.unit());
        for system in System::ALL {
            let _ = write!(line, " {} |", r.of(system));
        }
        // A TLS row's floor is ours in clear.
        let floor = match (r.case.tls(), r.floor()) {
            (true, _) => format!(
                "{} (ours in clear: {})",
                tls_against_plain(Some(r)).map_or("-".to_owned(), |x| format!("{x:.2}")),
                r.plain
            ),
            (false, System::Relay) => format!("{} (relay)", ratio(r, System::Relay)),
            (false, _) => format!("{} (direct)", ratio(r, System::Raw)),
        };
        let _ = write!(
            line,
            " {} | {} | {floor} |",
            loss_cell(r),
            ratio(r, System::NatsGo),
        );
        let _ = writeln!(table, "{line}");
    }
    table
}

/// What each system reported of its loss, and loss nobody accounted for.
fn loss_notes(rows: &[Row]) -> String {
    let mut notes = String::new();
    for r in rows {
        for system in [System::Ours, System::NatsGo, System::AsyncNats] {
            let s = r.of(system);
            if s.lost() == 0 {
                continue;
            }
            let reports = s.loss_reports().join("; ");
            let unexplained = s.unexplained_loss();
            let _ = write!(
                notes,
                "- {}, {}: {} lost over {} rounds",
                r.case,
                short_heading(system),
                s.lost(),
                s.rounds.len()
            );
            if !reports.is_empty() {
                let _ = write!(notes, "; reported: {reports}");
            }
            if unexplained > 0 {
                let _ = write!(notes, "; **{unexplained} unexplained**");
            }
            notes.push('\n');
        }
    }
    notes
}

async fn sweep(options: &Options, server: &Path, machine: &str) -> String {
    let mut text = String::new();
    let sizes = suite::sweep_sizes(options.quick);
    let points = match ours::sweep(&sizes, options, server).await {
        Ok(points) => points,
        Err(e) => {
            let _ = writeln!(text, "\nsweep failed: {e:#}");
            return text;
        }
    };
    let threshold = ours::recommend_threshold(&points);
    let _ = writeln!(text, "\n| body | lazy MB/s | through the server MB/s |");
    let _ = writeln!(text, "| --- | ---: | ---: |");
    for p in &points {
        let _ = writeln!(
            text,
            "| {} | {:.0} | {:.0} |",
            suite::size(p.body),
            p.lazy_mb_s,
            p.server_mb_s
        );
    }
    let _ = writeln!(
        text,
        "\nRecommended `lazy.threshold_bytes` for this machine: {}",
        threshold.map_or_else(|| no_crossover(&points), |t| t.to_string())
    );
    let png = results_dir().join("sweep.png");
    let drawn = std::fs::create_dir_all(results_dir())
        .context("creating the results directory")
        .and_then(|()| plot::sweep_png(&png, &points, threshold, machine));
    match drawn {
        Ok(()) => {
            let _ = writeln!(text, "Picture: {}", png.display());
        }
        Err(e) => {
            let _ = writeln!(text, "Picture not drawn: {e:#}");
        }
    }
    text
}

fn main() -> anyhow::Result<()> {
    // Before any thread starts, so that every thread inherits it: the
    // fixed-rate pacer sleeps to the microsecond.
    if let Err(e) = clustercomm_benches::latency::fine_timers() {
        eprintln!("timer slack not lowered ({e}): fixed-rate loads are paced more coarsely");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the runtime")?;
    // On a worker thread, like an application's own tasks: a client
    // driven from `block_on` is woken across threads for every completion.
    runtime.block_on(async { tokio::spawn(run()).await? })
}

async fn run() -> anyhow::Result<()> {
    let options = Options::from_env();
    if options.help {
        println!("{}", clustercomm_benches::options::USAGE);
        return Ok(());
    }
    let server = server_binary()?;
    let machine = machine();
    let title = format!(
        "# clustercomm benchmark suite{}",
        if options.quick { " (--quick)" } else { "" }
    );
    println!("{title}");
    println!("{machine}; compare ratios, not absolutes.\n");
    let cases: Vec<Case> = suite::cases(options.quick)
        .into_iter()
        .filter(|case| options.selects(&case.to_string()))
        .collect();
    let mut rows: Vec<Row> = Vec::new();
    // No peers to start when the filters leave only the processors case.
    if !cases.is_empty() {
        let peers = Peers::start(&options, server.clone()).await;
        let mut taken = Taken::default();
        for case in cases {
            let row = run_case(&peers, &mut taken, &rows, case, &options).await;
            rows.push(row);
        }
    }

    let processors = if options.selects(&processors::name()) {
        Some(processors_case(&options, &server).await)
    } else {
        None
    };

    let sweep_text = if options.selects("sweep") {
        sweep(&options, &server_binary()?, &machine).await
    } else {
        String::new()
    };

    let rounds = match options.rounds {
        Some(n) => format!("{n} rounds per case"),
        None => format!(
            "{} rounds per case ({} for bulk)",
            suite::ROUNDS,
            suite::BULK_ROUNDS
        ),
    };
    let mut report = String::new();
    let _ = writeln!(report, "{title}\n");
    let _ = writeln!(
        report,
        "Machine: {machine}. {rounds}, the systems taking turns in each round; each cell is the \
         median round with the range of the rounds in brackets (for latency: median p50 / p99 / \
         p99.9 in µs, with the ranges of p50 and p99). Ratios and targets use the medians. \
         Compare ratios, not absolutes.\n"
    );
    report.push_str(&table(&rows));
    let notes = loss_notes(&rows);
    if !notes.is_empty() {
        let _ = writeln!(report, "\nLoss (one-way messages that did not arrive):\n");
        report.push_str(&notes);
    }
    let _ = writeln!(
        report,
        "\nMessage server peak memory during fan-out: {}",
        server_peak(&rows).map_or("unknown".into(), |k| format!(
            "{:.1} MiB",
            k as f64 / 1024.0
        ))
    );
    if let Some((header, comparison)) = &processors {
        report.push_str(&processors::section(header, comparison));
    }
    report.push_str(&sweep_text);
    let _ = writeln!(report, "\n## Targets (medians)\n");
    report.push_str(&targets(&rows));
    if let Some((_, comparison)) = &processors {
        let _ = writeln!(report, "{}", processors::target_line(Some(comparison)));
    }
    println!("\n{report}");
    if !options.filters.is_empty() || options.ours_only || options.rounds.is_some() {
        // A partial run does not replace the recorded results.
        return Ok(());
    }
    std::fs::create_dir_all(results_dir())?;
    let name = if options.quick {
        "suite-quick.md"
    } else {
        "suite.md"
    };
    std::fs::write(results_dir().join(name), &report)?;
    println!("written to {}", results_dir().join(name).display());
    Ok(())
}
