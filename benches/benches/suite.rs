//! The benchmark suite: every path of clustercomm beside nats-server and
//! raw loopback TCP, measured in the same run, so that the ratios hold on a
//! noisy shared machine.
//!
//! ```text
//! cargo bench -p clustercomm-benches --bench suite             # full, < 10 min
//! cargo bench -p clustercomm-benches --bench suite -- --quick  # about a minute
//! ```
//!
//! Prints a markdown table (and writes it to `benches/results/suite.md`),
//! draws the path sweep to `benches/results/sweep.png` with the recommended
//! `lazy.threshold_bytes` marked, and checks the targets. If nats-server
//! cannot be had, its column says so and the rest runs.

use std::fmt::Write as _;
use std::path::PathBuf;

use clustercomm_benches::nats::Nats;
use clustercomm_benches::suite::{self, BulkPath, Case, Outcome};
use clustercomm_benches::{ours, plot, raw_cases, Options};

struct Row {
    case: Case,
    ours: Outcome,
    nats: Outcome,
    raw: Outcome,
    server_peak_kib: Option<u64>,
}

fn ratio(ours: &Outcome, other: &Outcome) -> String {
    match (ours, other) {
        (Outcome::Latency(a), Outcome::Latency(b)) if b.p50_us > 0.0 => {
            format!("{:.2} (latency: lower is better)", a.p50_us / b.p50_us)
        }
        (a, b) => match (a.value(), b.value()) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        },
    }
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

/// One target of the issue, checked against the run.
fn check(targets: &mut String, ok: Option<bool>, what: &str) {
    let mark = match ok {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    };
    let _ = writeln!(targets, "- {what}: {mark}");
}

fn find(rows: &[Row], want: impl Fn(&Case) -> bool) -> Option<&Row> {
    rows.iter().find(|r| want(&r.case))
}

fn ratio_of(a: &Outcome, b: &Outcome) -> Option<f64> {
    Some(a.value()? / b.value()?)
}

fn targets(rows: &[Row]) -> String {
    let mut t = String::new();
    let notify = find(rows, |c| *c == Case::Notify { body: 128 });
    check(
        &mut t,
        notify
            .and_then(|r| ratio_of(&r.ours, &r.nats))
            .map(|x| x >= 1.9),
        "notify 128 B at least 1.9x NATS",
    );
    let fan = find(rows, |c| matches!(c, Case::FanOutAll { .. }));
    check(
        &mut t,
        fan.and_then(|r| ratio_of(&r.ours, &r.nats))
            .map(|x| x >= 1.5),
        "fan-out at least 1.5x NATS",
    );
    let send = find(rows, |c| matches!(c, Case::SendPipelined { body: 128, .. }));
    check(
        &mut t,
        send.and_then(|r| ratio_of(&r.ours, &r.nats))
            .map(|x| x >= 0.7),
        "acknowledged send pipelined at least 0.7x NATS publish",
    );
    let latency = find(rows, |c| matches!(c, Case::RequestLatency { .. }));
    let lat_ok = latency.and_then(|r| match (&r.ours, &r.nats) {
        (Outcome::Latency(o), Outcome::Latency(n)) => Some(
            o.p50_us <= 50.0 && o.p99_us <= 100.0 && o.p50_us <= n.p50_us && o.p99_us <= n.p99_us,
        ),
        (Outcome::Latency(o), _) => Some(o.p50_us <= 50.0 && o.p99_us <= 100.0),
        _ => None,
    });
    check(
        &mut t,
        lat_ok,
        "request/reply p50 <= 50 µs, p99 <= 100 µs, never worse than NATS",
    );
    let lazy16 = find(rows, |c| {
        *c == Case::Bulk {
            body: 16 << 20,
            path: BulkPath::Lazy,
        }
    });
    check(
        &mut t,
        lazy16
            .and_then(|r| ratio_of(&r.ours, &r.raw))
            .map(|x| x >= 0.9),
        "lazy channel 16 MiB at least 90% of raw TCP",
    );
    let peak = rows
        .iter()
        .filter(|r| matches!(r.case, Case::FanOutAll { .. } | Case::FanOutGroup { .. }))
        .filter_map(|r| r.server_peak_kib)
        .max();
    check(
        &mut t,
        peak.map(|k| k < 64 * 1024),
        &format!(
            "message server peak memory during fan-out under 64 MiB ({})",
            peak.map_or("unknown".into(), |k| format!(
                "{:.1} MiB",
                k as f64 / 1024.0
            ))
        ),
    );
    t
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // On a worker thread, like an application's own tasks: a client
    // driven from `block_on` is woken across threads for every completion.
    tokio::spawn(run()).await?
}

async fn run() -> anyhow::Result<()> {
    let options = Options::from_env();
    if options.help {
        println!("{}", clustercomm_benches::options::USAGE);
        return Ok(());
    }
    let machine = machine();
    println!(
        "# clustercomm benchmark suite{}",
        if options.quick { " (--quick)" } else { "" }
    );
    println!("{machine}; one run on a shared machine: compare ratios, not absolutes.\n");
    let nats = match Nats::start(options.quick).await {
        Ok(_) if options.ours_only => None,
        Ok(n) => Some(n),
        Err(why) => {
            println!("nats-server unavailable ({why}): its column is skipped.\n");
            None
        }
    };
    let mut rows = Vec::new();
    for case in suite::cases(options.quick) {
        if !options.selects(&case.to_string()) {
            continue;
        }
        // The systems take turns, each round measuring its share.
        let rounds = case.rounds();
        let round = Options {
            measure: options.measure / rounds,
            ..options.clone()
        };
        let not_run = || Outcome::Skipped("not run".into());
        let (mut ours, mut nats_outcome, mut raw) = (not_run(), not_run(), not_run());
        let mut server_peak_kib: Option<u64> = None;
        for _ in 0..rounds {
            let (outcome, peak) = match ours::run(case, &round).await {
                Ok(r) => r,
                Err(e) => (Outcome::Failed(format!("{e:#}")), None),
            };
            ours = ours.best(outcome);
            server_peak_kib = server_peak_kib.max(peak);
            nats_outcome = nats_outcome.best(match &nats {
                Some(n) => n.run(case, &round).await,
                None if options.ours_only => Outcome::Skipped("--ours-only".into()),
                None => Outcome::Skipped("nats-server unavailable".into()),
            });
            raw = raw.best(if options.ours_only {
                Outcome::Skipped("--ours-only".into())
            } else {
                raw_cases::run(case, &round).await
            });
        }
        println!("{case}: ours {ours}, NATS {nats_outcome}, raw TCP {raw}");
        rows.push(Row {
            case,
            ours,
            nats: nats_outcome,
            raw,
            server_peak_kib,
        });
    }
    drop(nats);

    let mut sweep_text = String::new();
    if options.selects("sweep") {
        let sizes = suite::sweep_sizes(options.quick);
        match ours::sweep(&sizes, &options).await {
            Ok(points) => {
                let threshold = ours::recommend_threshold(&points);
                let _ = writeln!(
                    sweep_text,
                    "\n| body | lazy MB/s | through the server MB/s |"
                );
                let _ = writeln!(sweep_text, "| --- | ---: | ---: |");
                for p in &points {
                    let _ = writeln!(
                        sweep_text,
                        "| {} | {:.0} | {:.0} |",
                        suite::size(p.body),
                        p.lazy_mb_s,
                        p.server_mb_s
                    );
                }
                let _ = writeln!(
                    sweep_text,
                    "\nRecommended `lazy.threshold_bytes` for this machine: {}",
                    threshold.map_or_else(|| no_crossover(&points), |t| t.to_string())
                );
                std::fs::create_dir_all(results_dir())?;
                let png = results_dir().join("sweep.png");
                match plot::sweep_png(&png, &points, threshold, &machine) {
                    Ok(()) => {
                        let _ = writeln!(sweep_text, "Picture: {}", png.display());
                    }
                    Err(e) => {
                        let _ = writeln!(sweep_text, "Picture not drawn: {e:#}");
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(sweep_text, "\nsweep failed: {e:#}");
            }
        }
    }

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| case | unit | ours | NATS | raw TCP | ours/NATS | ours/raw |"
    );
    let _ = writeln!(table, "| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.case,
            r.case.unit(),
            r.ours,
            r.nats,
            r.raw,
            ratio(&r.ours, &r.nats),
            ratio(&r.ours, &r.raw)
        );
    }
    let peak = rows
        .iter()
        .filter(|r| matches!(r.case, Case::FanOutAll { .. } | Case::FanOutGroup { .. }))
        .filter_map(|r| r.server_peak_kib)
        .max();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "# clustercomm benchmark suite{}\n",
        if options.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(
        report,
        "Machine: {machine}. One run on a shared machine: compare ratios, not absolutes.\n"
    );
    report.push_str(&table);
    let _ = writeln!(
        report,
        "\nMessage server peak memory during fan-out: {}",
        peak.map_or("unknown".into(), |k| format!(
            "{:.1} MiB",
            k as f64 / 1024.0
        ))
    );
    report.push_str(&sweep_text);
    let _ = writeln!(report, "\n## Targets\n");
    report.push_str(&targets(&rows));
    println!("\n{report}");
    if !options.filters.is_empty() {
        // A partial run (filters) does not replace the recorded results.
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
