//! The dead-letter queue as the monitor shows it: the queue's state and
//! its newest entries, without their bodies. `/api/v1/dead-letters`
//! answers up to [`DEAD_LETTERS_MAX_LIMIT`] of them; the snapshot (and so
//! the page) carries the newest [`DEAD_LETTERS_SHOWN`]; the metrics count
//! them.
//!
//! Bodies are never shown here: the monitor has no access control, and a
//! body is the application's data. A node reads them
//! (`Node::dead_letters`, `clustercomm dead-letters list --bodies`) if its
//! `permissions.dead_letters` allows.

use serde::Serialize;
use transports::protocol::{DeadLetter, DeadLetterStats, NodeId, Target};

use crate::server::Shared;

/// Entries `/api/v1/dead-letters` answers when its query names no
/// `limit`.
pub const DEAD_LETTERS_DEFAULT_LIMIT: usize = 100;

/// Most entries `/api/v1/dead-letters` answers: a larger `limit` is cut
/// to this.
pub const DEAD_LETTERS_MAX_LIMIT: usize = 1000;

/// Entries the snapshot carries, for the page's table.
pub const DEAD_LETTERS_SHOWN: usize = 20;

/// The queue's state and its newest entries, newest first.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterList {
    /// Entries and bytes held, added and overflowed, and the limits
    /// (`message_server.dead_letter_entries`, `dead_letter_bytes`).
    pub stats: DeadLetterStats,
    /// The newest entries, newest first.
    pub entries: Vec<DeadLetterRow>,
}

/// One dead letter, without its body.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterRow {
    /// Its number in the queue (what `clustercomm dead-letters take` and
    /// `replay` name).
    pub id: u64,
    /// When it was dead-lettered, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// The node that sent the message.
    pub sender: NodeId,
    /// Where it was going.
    pub target: TargetView,
    /// The service it addressed.
    pub service: String,
    /// Its priority: `express`, `high`, `normal` or `low`.
    pub priority: &'static str,
    /// Why it is here, as a short name: `expired`, `target_gone`,
    /// `not_permitted`, `retries_exhausted` or `undeliverable`.
    pub reason: &'static str,
    /// Why it is here, in words (with the last failure, where there is
    /// one).
    pub detail: String,
    /// The node that filed it; `None` when the message server filed it
    /// itself.
    pub filed_by: Option<String>,
    /// Its body's length.
    pub body_bytes: u64,
}

/// A message's target, in JSON: `{"kind": "node", "name": "web-1"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetView {
    /// `node`, `group`, `any_of` (one member of the group) or `all`.
    pub kind: &'static str,
    /// The node's or the group's name; `None` for `all`.
    pub name: Option<String>,
}

impl From<&Target> for TargetView {
    fn from(target: &Target) -> TargetView {
        let (kind, name) = match target {
            Target::Node(n) => ("node", Some(n.as_str().to_owned())),
            Target::Group(g) => ("group", Some(g.clone())),
            Target::AnyOf(g) => ("any_of", Some(g.clone())),
            Target::All => ("all", None),
        };
        TargetView { kind, name }
    }
}

impl From<&DeadLetter> for DeadLetterRow {
    fn from(letter: &DeadLetter) -> DeadLetterRow {
        DeadLetterRow {
            id: letter.id,
            at_unix_ms: letter.at_unix_ms,
            sender: letter.sender.clone(),
            target: TargetView::from(&letter.target),
            service: letter.service.clone(),
            priority: letter.priority.name(),
            reason: letter.reason.name(),
            detail: letter.reason.to_string(),
            filed_by: (!letter.filed_by.is_empty()).then(|| letter.filed_by.clone()),
            body_bytes: letter.body_bytes,
        }
    }
}

/// The queue's state and its newest `limit` entries.
pub(crate) fn gather(shared: &Shared, limit: usize) -> DeadLetterList {
    // One read of the queue: the rows and the counts agree.
    let (stats, newest) = shared.dead.view(limit);
    DeadLetterList {
        stats,
        entries: newest.iter().map(DeadLetterRow::from).collect(),
    }
}

/// The entries a query string (`limit=N`, other keys ignored) asks for:
/// [`DEAD_LETTERS_DEFAULT_LIMIT`] when it names none, at most
/// [`DEAD_LETTERS_MAX_LIMIT`].
///
/// # Errors
///
/// A message for the client when `limit` is not a whole number.
pub(crate) fn limit(query: Option<&str>) -> Result<usize, String> {
    let mut limit = DEAD_LETTERS_DEFAULT_LIMIT;
    for pair in query.unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "limit" {
            limit = value.parse().map_err(|_| {
                format!(
                    "limit must be a whole number (0 to {DEAD_LETTERS_MAX_LIMIT}), not {value:?}"
                )
            })?;
        }
    }
    Ok(limit.min(DEAD_LETTERS_MAX_LIMIT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use transports::protocol::{DeadReason, DeliveryFailure, Priority};

    #[test]
    fn limits_default_cap_and_refuse_what_is_not_a_number() {
        let cases: [(Option<&str>, Result<usize, ()>); 9] = [
            (None, Ok(DEAD_LETTERS_DEFAULT_LIMIT)),
            (Some(""), Ok(DEAD_LETTERS_DEFAULT_LIMIT)),
            (Some("limit=5"), Ok(5)),
            (Some("limit=0"), Ok(0)),
            (Some("x=1&limit=7&y"), Ok(7)),
            (Some("limit=1000000"), Ok(DEAD_LETTERS_MAX_LIMIT)),
            (Some("limit=-1"), Err(())),
            (Some("limit="), Err(())),
            (Some("limit=ten"), Err(())),
        ];
        for (query, want) in cases {
            assert_eq!(limit(query).map_err(|_| ()), want, "{query:?}");
        }
    }

    #[test]
    fn rows_name_the_target_and_reason_and_who_filed() {
        let letter = DeadLetter {
            id: 7,
            sender: NodeId::new("web-1"),
            target: Target::AnyOf("db".into()),
            service: "orders".into(),
            priority: Priority::High,
            reason: DeadReason::RetriesExhausted {
                attempts: 3,
                last: DeliveryFailure::ReceiverOverloaded,
            },
            at_unix_ms: 1_700_000_000_000,
            filed_by: "web-1".into(),
            body_bytes: 12,
        };
        let row = DeadLetterRow::from(&letter);
        assert_eq!(
            row.target,
            TargetView {
                kind: "any_of",
                name: Some("db".into())
            }
        );
        assert_eq!((row.priority, row.reason), ("high", "retries_exhausted"));
        assert!(row.detail.contains("3 attempts"), "{}", row.detail);
        assert_eq!(row.filed_by.as_deref(), Some("web-1"));
        let by_server = DeadLetterRow::from(&DeadLetter {
            filed_by: String::new(),
            target: Target::All,
            ..letter
        });
        assert_eq!(by_server.filed_by, None);
        assert_eq!(by_server.target.name, None);
    }
}
