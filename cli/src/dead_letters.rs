//! `dead-letters`: the message server's dead-letter queue, read and
//! worked through a short-lived node (as `members` and `send` join; the
//! node's `permissions.dead_letters` must allow it).
//!
//! - `list [--after ID] [--limit N] [--bodies]`: the queue's state, then
//!   one line per entry, by number.
//! - `take ID...`: takes the entries out of the queue and prints them
//!   (with `--bodies`, their bodies too: once taken, they are nowhere
//!   else).
//! - `replay ID...`: sends each entry's body again from this command's
//!   node, to its target and service, and takes it out once delivered;
//!   one line per entry, and a failure if any was not delivered.
//!
//! Everything a peer named (node ids, services, bodies) is printed
//! escaped where it holds spaces or control characters, so no entry can
//! forge a line or move the terminal's cursor.

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use node_runtime::{
    DeadLetter, DeadLetterEntry, DeadLetterError, DeadLetterStats, DeliveryReport, Node,
    SendOptions, Target,
};

use crate::join::Join;

/// Body bytes `--bodies` prints of each entry.
pub const BODY_SHOWN_BYTES: usize = 64;

/// What to do with the dead-letter queue.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Prints the queue's state and its entries, by number.
    List(List),
    /// Takes entries out of the queue and prints them.
    Take {
        /// Print the first bytes of each body too.
        #[arg(long)]
        bodies: bool,
        /// The entries' numbers.
        #[arg(required = true)]
        ids: Vec<u64>,
    },
    /// Sends entries again to their targets, taking each out of the queue
    /// once it was delivered.
    Replay {
        /// The entries' numbers.
        #[arg(required = true)]
        ids: Vec<u64>,
    },
}

/// `list`'s options.
#[derive(Debug, Clone, Args)]
pub struct List {
    /// Only entries numbered above this one (the last number of the
    /// previous page).
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// Most entries printed (the server answers at most 10,000 at once).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    /// Print the first bytes of each body too.
    #[arg(long)]
    pub bodies: bool,
}

/// Runs `command` as a short-lived node, which leaves when it is done.
///
/// # Errors
///
/// If the cluster cannot be joined, the server refuses or does not
/// answer, an entry to take is not in the queue, or a replay failed.
pub async fn run(join: &Join, command: &Command) -> anyhow::Result<()> {
    let node = join.start().await?;
    let result = match command {
        Command::List(list) => self::list(&node, list).await,
        Command::Take { bodies, ids } => take(&node, ids, *bodies).await,
        Command::Replay { ids } => replay(&node, ids).await,
    };
    node.shutdown().await;
    result
}

async fn list(node: &Node, options: &List) -> anyhow::Result<()> {
    let page = node
        .dead_letters()
        .browse(options.after, options.limit)
        .await
        .context("reading the dead-letter queue")?;
    println!("{}", stats_line(&page.stats));
    print_entries(&page.entries, options.bodies);
    if let Some(last) = page.entries.last() {
        if page.entries.len() >= options.limit as usize {
            println!(
                "(more may follow: --after {} for the next page)",
                last.letter.id
            );
        }
    }
    Ok(())
}

async fn take(node: &Node, ids: &[u64], bodies: bool) -> anyhow::Result<()> {
    let taken = node
        .dead_letters()
        .take(ids)
        .await
        .context("taking dead letters")?;
    println!("taken {} of {}", taken.len(), ids.len());
    print_entries(&taken, bodies);
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !taken.iter().any(|e| e.letter.id == **id))
        .map(u64::to_string)
        .collect();
    if !missing.is_empty() {
        bail!("not in the queue: {}", missing.join(", "));
    }
    Ok(())
}

async fn replay(node: &Node, ids: &[u64]) -> anyhow::Result<()> {
    let queue = node.dead_letters();
    let options = SendOptions::new();
    let mut failed = 0;
    for &id in ids {
        let outcome = queue.replay(id, &options).await;
        let (line, ok) = replay_line(id, &outcome);
        println!("{line}");
        if !ok {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {} dead letters not replayed", ids.len());
    }
    Ok(())
}

/// The line `replay` prints for entry `id`, and whether it was delivered
/// to every receiver.
fn replay_line(id: u64, outcome: &Result<DeliveryReport, DeadLetterError>) -> (String, bool) {
    match outcome {
        Ok(report) => {
            let delivered: Vec<String> =
                report.delivered.iter().map(|n| shown(n.as_str())).collect();
            let mut line = format!("replayed {id}: delivered to {}", or_none(&delivered));
            for (node, why) in &report.failed {
                line.push_str(&format!(
                    "; not delivered to {}: {why}",
                    shown(node.as_str())
                ));
            }
            if !report.is_complete() {
                line.push_str(" (taken out of the queue all the same)");
            }
            (line, report.is_complete())
        }
        Err(e) => (format!("not replayed {id}: {}", chain(e)), false),
    }
}

/// An error and its sources, `: `-separated (as anyhow's `{:#}`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `dead letters: N held (B bytes) of at most N (B bytes); N added, N
/// overflowed`.
fn stats_line(s: &DeadLetterStats) -> String {
    format!(
        "dead letters: {} held ({} bytes) of at most {} ({} bytes); {} added, {} overflowed",
        s.entries, s.bytes, s.max_entries, s.max_bytes, s.added, s.overflowed
    )
}

fn print_entries(entries: &[DeadLetterEntry], bodies: bool) {
    if entries.is_empty() {
        return;
    }
    println!(
        "{:<8} {:<24} {:<20} {:<24} {:<20} {:>8} REASON",
        "ID", "TIME (UTC)", "SENDER", "TARGET", "SERVICE", "BYTES"
    );
    for entry in entries {
        println!("{}", entry_line(&entry.letter));
        if bodies {
            println!(
                "         body {}",
                body_text(&entry.body, entry.letter.body_bytes)
            );
        }
    }
}

/// One entry: number, time (UTC), sender, target, service, bytes, and the
/// reason (with who filed it, when a node did).
fn entry_line(l: &DeadLetter) -> String {
    let mut reason = l.reason.to_string();
    if !l.filed_by.is_empty() {
        reason.push_str(&format!(" (filed by {})", shown(&l.filed_by)));
    }
    format!(
        "{:<8} {:<24} {:<20} {:<24} {:<20} {:>8} {}",
        l.id,
        utc(l.at_unix_ms),
        shown(l.sender.as_str()),
        target_text(&l.target),
        shown(&l.service),
        l.body_bytes,
        reason
    )
}

/// A target as `--to` spells it: `node:ID`, `group:NAME`, `any:GROUP`,
/// `all`.
fn target_text(target: &Target) -> String {
    match target {
        Target::Node(n) => format!("node:{}", shown(n.as_str())),
        Target::Group(g) => format!("group:{}", shown(g)),
        Target::AnyOf(g) => format!("any:{}", shown(g)),
        Target::All => "all".to_owned(),
    }
}

/// The first [`BODY_SHOWN_BYTES`] of `body`, as quoted and escaped text
/// (invalid UTF-8 replaced), and how many bytes were left out.
fn body_text(body: &Bytes, body_bytes: u64) -> String {
    let cut = &body[..body.len().min(BODY_SHOWN_BYTES)];
    let mut text = format!("{:?}", String::from_utf8_lossy(cut));
    let left = body_bytes.max(body.len() as u64) - cut.len() as u64;
    if left > 0 {
        text.push_str(&format!(" (+{left} bytes)"));
    }
    text
}

/// A name as is when it is plain (no spaces, control characters or
/// quotes), else quoted and escaped.
fn shown(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '\\');
    if plain {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

fn or_none(names: &[String]) -> String {
    if names.is_empty() {
        "no one".to_owned()
    } else {
        names.join(", ")
    }
}

/// Unix milliseconds as an RFC 3339 UTC time, `2023-11-14T22:13:20.123Z`.
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        unix_ms % 1000
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use node_runtime::{DeadReason, DeliveryFailure, NodeId, Priority};

    #[test]
    fn times_are_utc() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (951_868_799_999, "2000-02-29T23:59:59.999Z"),
            (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
            (4_102_444_800_000, "2100-01-01T00:00:00.000Z"),
        ];
        for (ms, want) in cases {
            assert_eq!(utc(ms), want, "{ms}");
        }
    }

    #[test]
    fn names_and_bodies_are_escaped() {
        assert_eq!(shown("web-1"), "web-1");
        assert_eq!(shown("a b"), "\"a b\"");
        assert_eq!(shown("evil\x1b[2J"), "\"evil\\u{1b}[2J\"");
        assert_eq!(shown(""), "\"\"");
        assert_eq!(
            body_text(&Bytes::from_static(b"hi\n\xff"), 4),
            "\"hi\\n\u{fffd}\""
        );
        let long = Bytes::from(vec![b'x'; 100]);
        let text = body_text(&long, 100);
        assert!(text.ends_with("\" (+36 bytes)"), "{text}");
        assert_eq!(text.matches('x').count(), BODY_SHOWN_BYTES);
    }

    #[test]
    fn an_entry_is_one_line_with_its_reason_last() {
        let letter = DeadLetter {
            id: 12,
            sender: NodeId::new("app-1"),
            target: Target::AnyOf("db".into()),
            service: "orders\nforged line".into(),
            priority: Priority::Normal,
            reason: DeadReason::RetriesExhausted {
                attempts: 3,
                last: DeliveryFailure::ReceiverOverloaded,
            },
            at_unix_ms: 1_700_000_000_123,
            filed_by: "app-1".into(),
            body_bytes: 5,
        };
        let line = entry_line(&letter);
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.starts_with("12 "), "{line}");
        assert!(line.contains(" 2023-11-14T22:13:20.123Z "), "{line}");
        assert!(line.contains(" any:db "), "{line}");
        assert!(line.contains(" \"orders\\nforged line\" "), "{line}");
        assert!(
            line.ends_with(
                " 5 retries exhausted after 3 attempts (last: receiver overloaded) (filed by app-1)"
            ),
            "{line}"
        );
    }

    #[test]
    fn replay_lines_say_what_happened() {
        let report = DeliveryReport {
            delivered: vec![NodeId::new("web-1")],
            failed: vec![],
        };
        assert_eq!(
            replay_line(3, &Ok(report)),
            ("replayed 3: delivered to web-1".to_owned(), true)
        );
        let (line, ok) = replay_line(4, &Err(DeadLetterError::NotFound(4)));
        assert_eq!(line, "not replayed 4: no dead letter number 4");
        assert!(!ok);
    }
}
