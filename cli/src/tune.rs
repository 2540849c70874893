//! `clustercomm tune`: times requests of growing bodies to one live node
//! over both paths, the message server and a lazy channel, prints the
//! median round trips and the crossover, and recommends (and on request
//! writes) `lazy.threshold_bytes`.
//!
//! Every node answers the built-in service `clustercomm.tune` with an empty
//! body (see `node_runtime::tune`). The sender alone chooses the path of a
//! request (`cluster_manager::path::choose`), from its own `[lazy]`
//! section, so the command joins as two short-lived nodes with the
//! cluster's config, each set to take one path:
//!
//! - `clustercomm-<pid>-server`: `lazy.services = []`, so no request of it
//!   may take a lazy channel: every one goes through the message server;
//! - `clustercomm-<pid>-lazy`: `lazy.threshold_bytes = 0`, so every body
//!   (of 1 byte or more) goes over a lazy channel.
//!
//! Both have auto-activation off. Their counters confirm the path each
//! request took: a lazy channel that could not be opened sends through the
//! message server instead, and those sizes are reported as not measured on
//! the lazy path. The two take turns, request by request, so that a
//! change on the machine during the sweep weighs on both alike. Each
//! reply (empty) comes back through the message server on both paths:
//! what differs is the request's trip there.

use std::path::{Path as FilePath, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};
use node_runtime::{Config, Node, NodeId, PathCounters, SendError, Target, TUNE_SERVICE};

use crate::join::Join;

/// The sizes swept unless `--sizes` says otherwise: 256 B to 4 MiB, each
/// four times the one before.
pub const DEFAULT_SIZES: [u64; 8] = [
    256,
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
];

/// Requests per size and path unless `--rounds` says otherwise.
pub const DEFAULT_ROUNDS: u32 = 20;

/// What to measure, and where to write the result.
#[derive(Debug, Clone, Args)]
pub struct Tune {
    /// The live node to measure the paths to (its id).
    #[arg(long, value_name = "ID")]
    pub node: String,
    /// Body sizes, comma-separated, each a number with B, KiB, MiB or GiB
    /// (default 256B,1KiB,4KiB,16KiB,64KiB,256KiB,1MiB,4MiB).
    #[arg(long, value_name = "SIZES", value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Option<Vec<u64>>,
    /// Requests per size and path; the table shows their median.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_ROUNDS, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rounds: u32,
    /// Writes the recommended `[lazy]` section to this new file.
    #[arg(long, value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// Writes `[nodes.<ID>.lazy]` instead: the threshold for that node's
    /// own sends only.
    #[arg(long = "override", requires = "write")]
    pub override_node: bool,
}

/// The two paths a request can take to one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Server,
    Lazy,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Server => "server",
            Path::Lazy => "lazy",
        }
    }

    /// Sets `config` so that a node's requests all take this path.
    fn configure(self, config: &mut Config) {
        match self {
            Path::Server => config.lazy.services.clear(),
            Path::Lazy => config.lazy.threshold_bytes = 0,
        }
        config.lazy.auto_activate_messages = 0;
    }

    /// The messages this node sent on this path, by its counters.
    fn sent(self, counters: &PathCounters) -> u64 {
        match self {
            Path::Server => counters.server_messages,
            Path::Lazy => counters.lazy_messages,
        }
    }
}

/// One path at one size: the median round trip, or why it was not
/// measured.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cell {
    Median(Duration),
    Skipped(String),
}

impl Cell {
    fn median(&self) -> Option<Duration> {
        match self {
            Cell::Median(d) => Some(*d),
            Cell::Skipped(_) => None,
        }
    }
}

/// One size of the sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    size: u64,
    server: Cell,
    lazy: Cell,
}

/// What the sweep says about `lazy.threshold_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Recommendation {
    /// The smallest size from which the lazy path was faster at every
    /// size measured on both paths; `None` if it was not faster at the
    /// largest.
    crossover: Option<u64>,
    /// Bodies above it take a lazy channel: the largest size below the
    /// crossover (where the message server won), the crossover less one
    /// byte if the lazy path won at every size, or the largest size
    /// compared if it never won from there up.
    threshold_bytes: u64,
}

/// `clustercomm tune`: joins, sweeps, prints, and writes if asked.
pub async fn tune(join: &Join, args: &Tune) -> anyhow::Result<()> {
    let mut sizes = args.sizes.clone().unwrap_or_else(|| DEFAULT_SIZES.to_vec());
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.first() == Some(&0) {
        bail!("--sizes: a body of 0 bytes never takes a lazy channel; start at 1 B");
    }
    if let Some(path) = &args.write {
        if path.exists() {
            bail!(
                "{} exists: --write makes a new file (merge its section into the cluster's file)",
                path.display()
            );
        }
    }
    let pid = std::process::id();
    let server = start(join, &format!("clustercomm-{pid}-server"), Path::Server).await?;
    let lazy = match start(join, &format!("clustercomm-{pid}-lazy"), Path::Lazy).await {
        Ok(node) => node,
        Err(e) => {
            server.shutdown().await;
            return Err(e);
        }
    };
    let target = NodeId::new(args.node.as_str());
    let swept = tokio::select! {
        r = sweep(&server, &lazy, &target, &sizes, args.rounds) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let from = server.direct_addr().map(|a| a.ip());
    tokio::join!(server.shutdown(), lazy.shutdown());
    let (rows, to) = swept?;

    println!(
        "paths to {target}: median round trip of {} requests per size (the request's body over the path, an empty reply through the message server)",
        args.rounds
    );
    print!("{}", table(&rows));
    let Some(rec) = recommend(&rows) else {
        println!("crossover: unknown (no size was measured on both paths)");
        return Ok(());
    };
    println!("{}", crossover_line(&rows, rec));
    println!(
        "recommended: threshold_bytes = {} ({}): bodies above it take a lazy channel",
        rec.threshold_bytes,
        format_size(rec.threshold_bytes)
    );
    if let Some(path) = &args.write {
        let hosts = match (from, to) {
            (Some(from), Some(to)) => format!(" (host {from} to host {to})"),
            _ => String::new(),
        };
        let how = format!(
            "the median round trip of {} requests per body size, through the message server and over a lazy channel, to {target}{hosts}",
            args.rounds
        );
        let section = args.override_node.then_some(&target);
        write_section(path, section, rec, &how)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Joins as `id`, with every request taking `path`.
async fn start(join: &Join, id: &str, path: Path) -> anyhow::Result<Node> {
    let mut config = match &join.config {
        Some(file) => Config::load(file)?,
        None => Config::default(),
    };
    path.configure(&mut config);
    let mut builder = Node::builder(id).config(config);
    if let Some(server) = &join.server {
        builder = builder.message_server(server);
    }
    builder.start().await.context("joining the cluster")
}

/// Measures every size over both paths to `target`: the rows, and the
/// target's host.
async fn sweep(
    server: &Node,
    lazy: &Node,
    target: &NodeId,
    sizes: &[u64],
    rounds: u32,
) -> anyhow::Result<(Vec<Row>, Option<std::net::IpAddr>)> {
    let member = server
        .members()
        .into_iter()
        .find(|m| &m.id == target)
        .ok_or_else(|| {
            anyhow!("{target} is not a live node of the cluster (see `clustercomm members`)")
        })?;
    if !member.services.iter().any(|s| s == TUNE_SERVICE) {
        bail!("{target} does not answer {TUNE_SERVICE}: it runs an older version");
    }
    // Sizes above the node's limit are not sent on either path.
    let largest = sizes
        .last()
        .map_or(0, |&s| s.min(server.max_message_bytes()));
    let pattern = Bytes::from((0..largest).map(|i| i as u8).collect::<Vec<u8>>());
    let per_cell = u64::from(rounds) + 1;
    let progress = progress_bar(sizes.len() as u64 * 2 * per_cell)?;
    let limits = Limits {
        node: server.max_message_bytes(),
        server: server.server_max_message_bytes(),
        direct: member.direct_addr.is_some(),
    };
    let mut rows = Vec::with_capacity(sizes.len());
    for &size in sizes {
        progress.set_message(format_size(size));
        let body = pattern.slice(..pattern.len().min(size as usize));
        let mut cells = [
            limits.skip(size, Path::Server),
            limits.skip(size, Path::Lazy),
        ];
        let nodes = [(Path::Server, server), (Path::Lazy, lazy)];
        let mut samples: [Vec<Duration>; 2] = Default::default();
        let before = [server.counters(), lazy.counters()];
        // A warm-up request per path (not counted: it may open the lazy
        // channel), then the rounds, the paths taking turns and each
        // round starting with the other one.
        for round in 0..per_cell {
            for turn in 0..2 {
                let i = (turn + round as usize) % 2;
                let (path, node) = nodes[i];
                if cells[i].is_some() {
                    progress.inc(1);
                    continue;
                }
                let started = Instant::now();
                let reply = node
                    .request(Target::Node(target.clone()), TUNE_SERVICE, body.clone())
                    .await;
                let took = started.elapsed();
                progress.inc(1);
                match reply {
                    Ok(_) if round > 0 => samples[i].push(took),
                    Ok(_) => {}
                    Err(SendError::PayloadTooLarge { max, .. }) => {
                        cells[i] = Some(format!("over the limit ({})", format_size(max)));
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!(
                                "requesting {} over the {} path from {target}",
                                format_size(size),
                                path.name()
                            )
                        });
                    }
                }
            }
        }
        let after = [server.counters(), lazy.counters()];
        for (i, (path, _)) in nodes.iter().enumerate() {
            let sent = path.sent(&after[i]) - path.sent(&before[i]);
            if cells[i].is_none() && sent != per_cell {
                cells[i] = Some(match path {
                    Path::Lazy => {
                        "no lazy channel could be opened: sent through the message server"
                            .to_owned()
                    }
                    Path::Server => {
                        format!("{sent} of {per_cell} requests went through the message server")
                    }
                });
            }
        }
        let [server_cell, lazy_cell] = cells;
        let [server_samples, lazy_samples] = samples;
        let cell = |skip: Option<String>, mut samples: Vec<Duration>| match skip {
            Some(why) => Cell::Skipped(why),
            None => Cell::Median(median(&mut samples)),
        };
        rows.push(Row {
            size,
            server: cell(server_cell, server_samples),
            lazy: cell(lazy_cell, lazy_samples),
        });
    }
    progress.finish_and_clear();
    Ok((rows, member.direct_addr.map(|a| a.ip())))
}

/// What limits which path may carry a body.
struct Limits {
    /// `limits.max_message_bytes`: no path carries more.
    node: u64,
    /// The message-server path's (the smaller of the server's and this
    /// node's).
    server: u64,
    /// Whether the target announced a direct address.
    direct: bool,
}

impl Limits {
    /// Why `path` cannot carry `size`, if it cannot.
    fn skip(&self, size: u64, path: Path) -> Option<String> {
        if size > self.node {
            return Some(format!(
                "over limits.max_message_bytes ({})",
                format_size(self.node)
            ));
        }
        match path {
            Path::Server if size > self.server => Some(format!(
                "over the message server's limit ({})",
                format_size(self.server)
            )),
            Path::Lazy if !self.direct => Some("the node announced no direct address".to_owned()),
            _ => None,
        }
    }
}

/// The progress bar on stderr: hidden when stderr is not a terminal.
fn progress_bar(requests: u64) -> anyhow::Result<ProgressBar> {
    let target = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let style = ProgressStyle::with_template("{msg:>8} [{bar:32}] {pos}/{len} requests")
        .context("the progress bar's template")?
        .progress_chars("=> ");
    // Cleared when dropped too: an error or ctrl-c is printed on a clean
    // line.
    Ok(ProgressBar::with_draw_target(Some(requests), target)
        .with_style(style)
        .with_finish(ProgressFinish::AndClear))
}

/// The median of `samples` (the mean of the middle two for an even
/// count); zero for none.
fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    let n = samples.len();
    match n {
        0 => Duration::ZERO,
        _ if n % 2 == 1 => samples[n / 2],
        _ => (samples[n / 2 - 1] + samples[n / 2]) / 2,
    }
}

/// Which path won at one size, if both were measured; a tie goes to the
/// message server (the default path).
fn winner(row: &Row) -> Option<Path> {
    let (server, lazy) = (row.server.median()?, row.lazy.median()?);
    Some(if lazy < server {
        Path::Lazy
    } else {
        Path::Server
    })
}

/// The crossover and the threshold, from the sizes measured on both paths
/// (see [`Recommendation`]); `None` if there are none.
fn recommend(rows: &[Row]) -> Option<Recommendation> {
    let compared: Vec<(u64, Path)> = rows
        .iter()
        .filter_map(|r| winner(r).map(|w| (r.size, w)))
        .collect();
    let (&(largest, _), _) = compared.split_last()?;
    // The first of the last run of lazy wins.
    let first_lazy = compared
        .iter()
        .rposition(|&(_, w)| w == Path::Server)
        .map_or(0, |i| i + 1);
    Some(match compared.get(first_lazy) {
        None => Recommendation {
            crossover: None,
            threshold_bytes: largest,
        },
        Some(&(size, _)) => Recommendation {
            crossover: Some(size),
            threshold_bytes: match first_lazy {
                0 => size - 1,
                i => compared[i - 1].0,
            },
        },
    })
}

/// The line that names the crossover.
fn crossover_line(rows: &[Row], rec: Recommendation) -> String {
    let smallest = rows
        .iter()
        .find(|r| winner(r).is_some())
        .map_or(0, |r| r.size);
    match rec.crossover {
        Some(size) if size == smallest => format!(
            "crossover: at {} or below (the lazy path was faster at every size measured)",
            format_size(size)
        ),
        Some(size) => format!(
            "crossover: {} (the lazy path was faster from there on)",
            format_size(size)
        ),
        None => format!(
            "crossover: none (the message server was faster at {}, the largest size measured on both paths)",
            format_size(rec.threshold_bytes)
        ),
    }
}

/// The table: one line per size, the medians, the winner, and why a path
/// was not measured.
fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<10} {:>12} {:>12}  {:<7} NOTE\n",
        "SIZE", "SERVER p50", "LAZY p50", "WINNER"
    );
    for row in rows {
        let cell = |c: &Cell| c.median().map_or("-".to_owned(), format_duration);
        let mut notes = Vec::new();
        match (&row.server, &row.lazy) {
            (Cell::Skipped(a), Cell::Skipped(b)) if a == b => notes.push(a.clone()),
            _ => {
                for (path, c) in [(Path::Server, &row.server), (Path::Lazy, &row.lazy)] {
                    if let Cell::Skipped(why) = c {
                        notes.push(format!("{}: {why}", path.name()));
                    }
                }
            }
        }
        let line = format!(
            "{:<10} {:>12} {:>12}  {:<7} {}",
            format_size(row.size),
            cell(&row.server),
            cell(&row.lazy),
            winner(row).map_or("-", Path::name),
            notes.join("; ")
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Writes the `[lazy]` section (or `[nodes.<node>.lazy]`) to a new file,
/// with a comment saying how it was measured.
fn write_section(
    path: &FilePath,
    node: Option<&NodeId>,
    rec: Recommendation,
    how: &str,
) -> anyhow::Result<()> {
    let text = section_text(node, rec, how);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The text [`write_section`] writes.
fn section_text(node: Option<&NodeId>, rec: Recommendation, how: &str) -> String {
    let mut text = String::from("# Written by `clustercomm tune`: ");
    text.push_str(how);
    text.push_str(".\n");
    match rec.crossover {
        Some(size) => text.push_str(&format!(
            "# The lazy path was faster from {} on.\n",
            format_size(size)
        )),
        None => text.push_str("# The message server was faster at every size measured.\n"),
    }
    match node {
        Some(id) => {
            text.push_str(&format!(
                "# For {id}'s own sends only; the other nodes keep [lazy].\n"
            ));
            text.push_str(&format!("[nodes.{}.lazy]\n", toml_key(id.as_str())));
        }
        None => text.push_str("[lazy]\n"),
    }
    text.push_str(&format!(
        "threshold_bytes = {}  # bodies above it take a lazy channel\n",
        rec.threshold_bytes
    ));
    text
}

/// `key` as a TOML key: bare if it may be, quoted otherwise.
fn toml_key(key: &str) -> String {
    let bare = key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare && !key.is_empty() {
        key.to_owned()
    } else {
        toml::Value::String(key.to_owned()).to_string()
    }
}

/// Parses a size: a whole number, optionally followed by `B`, `KiB`,
/// `MiB` or `GiB` (any case).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("{text:?} is not a size: use a number with B, KiB, MiB or GiB (4KiB)");
    let number: u64 = number.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    number.checked_mul(scale).ok_or_else(bad)
}

/// A size in the largest binary unit that divides it.
pub fn format_size(bytes: u64) -> String {
    for (scale, unit) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{} {unit}", bytes / scale);
        }
    }
    format!("{bytes} B")
}

/// A round trip, in µs below a millisecond, in ms below a second.
fn format_duration(d: Duration) -> String {
    let micros = d.as_micros();
    if micros < 1_000 {
        format!("{micros} µs")
    } else if micros < 1_000_000 {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        let cases = [
            ("256", Some(256)),
            ("256B", Some(256)),
            ("1KiB", Some(1024)),
            ("64kib", Some(64 << 10)),
            ("4 MiB", Some(4 << 20)),
            ("1GiB", Some(1 << 30)),
            ("1KB", None),
            ("KiB", None),
            ("-1", None),
            ("99999999999GiB", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text).ok(), expected, "{text}");
        }
        for (bytes, text) in [
            (255, "255 B"),
            (1024, "1 KiB"),
            (1536, "1536 B"),
            (4 << 20, "4 MiB"),
            (0, "0 B"),
        ] {
            assert_eq!(format_size(bytes), text);
        }
    }

    #[test]
    fn medians() {
        let ms = Duration::from_millis;
        assert_eq!(median(&mut [ms(3), ms(1), ms(2)]), ms(2));
        assert_eq!(
            median(&mut [ms(4), ms(1), ms(2), ms(3)]),
            Duration::from_micros(2500)
        );
        assert_eq!(median(&mut []), Duration::ZERO);
    }

    fn row(size: u64, server: Option<u64>, lazy: Option<u64>) -> Row {
        let cell = |us: Option<u64>| {
            us.map_or(Cell::Skipped("no".into()), |us| {
                Cell::Median(Duration::from_micros(us))
            })
        };
        Row {
            size,
            server: cell(server),
            lazy: cell(lazy),
        }
    }

    #[test]
    fn recommendation_table() {
        let k = 1024;
        /// A name, the rows, and the crossover and threshold expected.
        type Case = (&'static str, Vec<Row>, Option<(Option<u64>, u64)>);
        let cases: Vec<Case> = vec![
            (
                "a clean crossover",
                vec![row(k, Some(10), Some(20)), row(4 * k, Some(30), Some(25))],
                Some((Some(4 * k), k)),
            ),
            (
                "a lazy win below a server win is noise",
                vec![
                    row(k, Some(10), Some(5)),
                    row(4 * k, Some(30), Some(40)),
                    row(16 * k, Some(90), Some(50)),
                ],
                Some((Some(16 * k), 4 * k)),
            ),
            (
                "the lazy path wins everywhere",
                vec![row(k, Some(10), Some(5)), row(4 * k, Some(30), Some(25))],
                Some((Some(k), k - 1)),
            ),
            (
                "the server wins everywhere",
                vec![row(k, Some(10), Some(20)), row(4 * k, Some(30), Some(35))],
                Some((None, 4 * k)),
            ),
            (
                "a tie goes to the server",
                vec![row(k, Some(10), Some(10))],
                Some((None, k)),
            ),
            (
                "sizes measured on one path only do not count",
                vec![
                    row(k, Some(10), Some(20)),
                    row(4 * k, Some(30), Some(25)),
                    row(64 * k, None, Some(25)),
                ],
                Some((Some(4 * k), k)),
            ),
            ("nothing compared", vec![row(k, None, Some(1))], None),
        ];
        for (name, rows, expected) in cases {
            let got = recommend(&rows).map(|r| (r.crossover, r.threshold_bytes));
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn the_section_parses_and_sets_the_threshold() {
        let rec = Recommendation {
            crossover: Some(64 << 10),
            threshold_bytes: 16 << 10,
        };
        let text = section_text(None, rec, "a test");
        let config = Config::parse(&text, "test").expect("parses");
        assert_eq!(config.lazy.threshold_bytes, 16 << 10);
        for id in ["web-1", "web.eu 1\"x"] {
            let text = section_text(Some(&NodeId::new(id)), rec, "a test");
            let config = Config::parse(&text, "test").expect("parses");
            assert_eq!(
                config.lazy.threshold_bytes,
                Config::default().lazy.threshold_bytes
            );
            let own = config.for_node(id).expect("merges");
            assert_eq!(own.lazy.threshold_bytes, 16 << 10, "{text}");
        }
    }

    #[test]
    fn the_table_names_the_winner_and_why_a_path_was_skipped() {
        let rows = [
            row(1024, Some(50), Some(80)),
            row(4 << 20, None, Some(1500)),
            row(128 << 20, None, None),
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("1 KiB") && lines[1].contains("50 µs"));
        assert!(lines[1].contains("80 µs") && lines[1].ends_with("server"));
        assert!(lines[2].contains("1.50 ms") && lines[2].contains("server: no"));
        assert!(
            lines[3].ends_with(" -       no"),
            "one reason for both: {text}"
        );
    }
}
