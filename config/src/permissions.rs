//! `[permissions]`: what a node may do, in the style of NATS permissions.
//! The message server enforces them for every node (its own file's
//! `[permissions]`, overridden per node by `[nodes.<id>.permissions]`), and
//! every node's direct listener enforces them for the nodes that open
//! channels to it (from its own file: keep one file for the cluster).
//!
//! ```toml
//! [permissions]             # every node, unless its own section says otherwise
//! subscribe = ["*"]
//! join = ["*"]
//! send = ["*"]
//!
//! [nodes.web-1.permissions]
//! subscribe = ["cache-*"]   # services it may offer
//! join = ["web"]            # groups it may join
//! send = ["group:web", "node:db-*", "all"]
//! trace = false             # may not capture others' messages
//! ```
//!
//! A pattern is a name in which `*` stands for any run of characters. A
//! `send` pattern names a target: `node:<id>` (a `Node` target),
//! `group:<group>` (`Group` and `AnyOf`), `all`, or `*` for any. Replies
//! are not sends: a node may always answer a request it was given.
//!
//! Service names starting with [`RESERVED_SERVICE_PREFIX`] belong to the
//! node runtime: every node offers [`TUNE_SERVICE`] whatever its
//! `subscribe` patterns say, and no application may subscribe to a name
//! with that prefix.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use transports::protocol::TargetRef;

use crate::{Config, ConfigError};

/// The prefix of the services the node runtime offers by itself; an
/// application's service may not start with it.
pub const RESERVED_SERVICE_PREFIX: &str = "clustercomm.";

/// The built-in service every node runtime offers: it answers a request
/// with an empty body, so that `clustercomm tune` can time the request
/// paths to a node. Always permitted ([`PermissionsConfig::may_subscribe`]).
pub const TUNE_SERVICE: &str = "clustercomm.tune";

/// Every node's permissions, read once from the file: `[permissions]`, and
/// each `[nodes.<id>.permissions]` over it.
#[derive(Clone, Debug, Default)]
pub struct PermissionsTable {
    default: Arc<PermissionsConfig>,
    by_node: HashMap<String, Arc<PermissionsConfig>>,
}

impl PermissionsTable {
    /// The permissions of node `id`.
    pub fn of(&self, id: &str) -> Arc<PermissionsConfig> {
        self.by_node.get(id).unwrap_or(&self.default).clone()
    }
}

impl Config {
    /// Every node's permissions, as [`PermissionsTable`].
    ///
    /// # Errors
    ///
    /// A node section that does not merge ([`Config::for_node`]).
    pub fn permissions_table(&self) -> Result<PermissionsTable, ConfigError> {
        let mut by_node = HashMap::new();
        for id in self.nodes.keys() {
            let own = self.for_node(id)?.permissions;
            if own != self.permissions {
                by_node.insert(id.clone(), Arc::new(own));
            }
        }
        Ok(PermissionsTable {
            default: Arc::new(self.permissions.clone()),
            by_node,
        })
    }
}

/// `[permissions]`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PermissionsConfig {
    /// Services the node may offer. Default `["*"]`.
    pub subscribe: Vec<String>,
    /// Groups the node may join. Default `["*"]`.
    pub join: Vec<String>,
    /// Targets the node may send to (`node:<id>`, `group:<group>`,
    /// `all`). Default `["*"]`.
    pub send: Vec<String>,
    /// Whether the node may ask the message server for a trace of
    /// others' messages (`clustercomm trace`). Default `true`, as every
    /// other permission defaults to anything.
    pub trace: bool,
    /// Whether the node may browse, take and replay the message server's
    /// dead letters (`Node::dead_letters`, `clustercomm dead-letters`).
    /// Default `true`. Filing a dead letter is always permitted.
    pub dead_letters: bool,
}

impl Default for PermissionsConfig {
    fn default() -> Self {
        let any = || vec!["*".to_owned()];
        PermissionsConfig {
            subscribe: any(),
            join: any(),
            send: any(),
            trace: true,
            dead_letters: true,
        }
    }
}

impl PermissionsConfig {
    /// Whether the node may offer `service`. Every node may offer the
    /// built-in [`TUNE_SERVICE`], which its runtime offers by itself.
    pub fn may_subscribe(&self, service: &str) -> bool {
        service == TUNE_SERVICE || any_matches(&self.subscribe, "", service)
    }

    /// Whether the node may join `group`.
    pub fn may_join(&self, group: &str) -> bool {
        any_matches(&self.join, "", group)
    }

    /// Whether the node may send to `target`.
    pub fn may_send(&self, target: TargetRef<'_>) -> bool {
        match target {
            TargetRef::Node(id) => any_matches(&self.send, "node:", id),
            TargetRef::Group(g) | TargetRef::AnyOf(g) => any_matches(&self.send, "group:", g),
            TargetRef::All => self.send.iter().any(|p| p == "*" || p == "all"),
        }
    }

    /// Whether everything is allowed (the default): the checks can be
    /// skipped.
    pub fn allows_everything(&self) -> bool {
        let any = |list: &[String]| list.iter().any(|p| p == "*");
        any(&self.subscribe) && any(&self.join) && any(&self.send) && self.trace
    }

    /// The first `send` pattern that names no kind of target, if any.
    pub(crate) fn bad_send_pattern(&self) -> Option<&str> {
        self.send
            .iter()
            .find(|p| {
                !(p.as_str() == "*"
                    || p.as_str() == "all"
                    || p.starts_with("node:")
                    || p.starts_with("group:"))
            })
            .map(String::as_str)
    }
}

/// Whether a pattern of `patterns` matches `prefix` + `name` (a lone `*`
/// matches anything).
fn any_matches(patterns: &[String], prefix: &str, name: &str) -> bool {
    patterns.iter().any(|p| {
        p == "*"
            || p.strip_prefix(prefix)
                .is_some_and(|rest| glob(rest.as_bytes(), name.as_bytes()))
    })
}

/// Whether `text` matches `pattern`, where `*` stands for any run of
/// bytes (none included). Linear in the pattern times the text at worst.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it stands up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` take one more byte.
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use transports::protocol::TargetRef;

    #[test]
    fn glob_matches_runs() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("cache-*", "cache-users", true),
            ("cache-*", "cache-", true),
            ("cache-*", "cach", false),
            ("*-eu", "db-eu", true),
            ("*-eu", "db-us", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("**", "x", true),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                glob(pattern.as_bytes(), text.as_bytes()),
                expected,
                "{pattern} ~ {text}"
            );
        }
    }

    #[test]
    fn each_permission_reads_its_own_patterns() {
        let p = PermissionsConfig {
            subscribe: vec!["cache-*".into()],
            join: vec!["web".into()],
            send: vec!["group:web".into(), "node:db-*".into()],
            trace: true,
            dead_letters: true,
        };
        assert!(p.may_subscribe("cache-users"));
        assert!(!p.may_subscribe("orders"));
        assert!(
            p.may_subscribe(TUNE_SERVICE),
            "the built-in service, always"
        );
        assert!(!p.may_subscribe("clustercomm.other"), "only that one");
        assert!(p.may_join("web"));
        assert!(!p.may_join("admin"));
        assert!(p.may_send(TargetRef::Group("web")));
        assert!(p.may_send(TargetRef::AnyOf("web")));
        assert!(!p.may_send(TargetRef::Group("admin")));
        assert!(p.may_send(TargetRef::Node("db-1")));
        assert!(!p.may_send(TargetRef::Node("web-1")));
        assert!(!p.may_send(TargetRef::All));
        assert!(!p.allows_everything());
        // A `node:` pattern does not grant a group of the same name.
        assert!(!p.may_send(TargetRef::Group("db-1")));
        let all = PermissionsConfig {
            send: vec!["all".into()],
            ..PermissionsConfig::default()
        };
        assert!(all.may_send(TargetRef::All));
        assert!(!all.may_send(TargetRef::Node("x")));
        assert!(PermissionsConfig::default().allows_everything());
        let no_trace = PermissionsConfig {
            trace: false,
            ..PermissionsConfig::default()
        };
        assert!(!no_trace.allows_everything(), "trace is checked too");
        assert!(PermissionsConfig::default().may_send(TargetRef::All));
    }
}
