//! Which path a message takes: through the message server, over a lazy
//! (direct) channel, or fanned out over lazy channels. The sender never
//! chooses; this function does, from facts the runtime gathers.

use cluster_config::LazyConfig;

/// The kind of target, as far as path choice cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// `Target::Node`.
    Node,
    /// `Target::AnyOf`: the server picks the member, so it goes through it.
    AnyOf,
    /// `Target::Group` or `Target::All`: a fan-out.
    FanOut,
}

/// What the runtime knows when it chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathFacts {
    /// Body size in bytes.
    pub body_len: u64,
    /// The target kind.
    pub target: TargetKind,
    /// Whether the service is on the lazy allow-list.
    pub service_allowed: bool,
    /// Whether a lazy channel to the (single) target is open already.
    pub lazy_open: bool,
    /// Whether the auto-activation counters call this pair hot.
    pub hot_pair: bool,
    /// Whether the target announced a direct-channel address.
    pub target_reachable: bool,
}

/// The chosen path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Through the message server.
    Server,
    /// Over a lazy channel to the one target (opened if needed).
    Lazy,
    /// Resolve the members through the message server, then send to each
    /// over a lazy channel.
    LazyFanOut,
}

/// Whether `service` is on the allow-list (`"*"` allows every service).
pub fn service_allowed(lazy: &LazyConfig, service: &str) -> bool {
    lazy.services.iter().any(|s| s == "*" || s == service)
}

/// Whether a single-node message could leave the message-server path: a
/// body above the threshold, an open lazy channel, or a hot pair. Only then
/// does the target's reachability matter (callers may skip looking it up).
pub fn could_go_direct(
    threshold_bytes: u64,
    body_len: u64,
    lazy_open: bool,
    hot_pair: bool,
) -> bool {
    body_len > threshold_bytes || lazy_open || hot_pair
}

/// Chooses the path for one message.
///
/// - Bodies above `threshold_bytes` of allowed services go direct: to one
///   node over its lazy channel, to a group or everyone over one lazy
///   channel per member.
/// - A single-node message of an allowed service also goes direct when a
///   lazy channel to that node is already open, or the pair is hot.
/// - Everything else, and every `AnyOf` (the server picks the member),
///   goes through the message server.
pub fn choose(threshold_bytes: u64, facts: PathFacts) -> Path {
    if !facts.service_allowed || facts.target == TargetKind::AnyOf {
        return Path::Server;
    }
    let large = facts.body_len > threshold_bytes;
    match facts.target {
        TargetKind::FanOut if large => Path::LazyFanOut,
        TargetKind::Node if !facts.target_reachable => Path::Server,
        TargetKind::Node
            if could_go_direct(
                threshold_bytes,
                facts.body_len,
                facts.lazy_open,
                facts.hot_pair,
            ) =>
        {
            Path::Lazy
        }
        _ => Path::Server,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1000;

    fn facts(body_len: u64, target: TargetKind) -> PathFacts {
        PathFacts {
            body_len,
            target,
            service_allowed: true,
            lazy_open: false,
            hot_pair: false,
            target_reachable: true,
        }
    }

    #[test]
    fn path_table() {
        use Path::*;
        use TargetKind::*;
        let cases: Vec<(&str, PathFacts, Path)> = vec![
            ("small to a node", facts(10, Node), Server),
            ("exactly the threshold", facts(T, Node), Server),
            ("threshold + 1", facts(T + 1, Node), Lazy),
            (
                "large, service not allowed",
                PathFacts {
                    service_allowed: false,
                    ..facts(T + 1, Node)
                },
                Server,
            ),
            (
                "small, channel open",
                PathFacts {
                    lazy_open: true,
                    ..facts(10, Node)
                },
                Lazy,
            ),
            (
                "small, channel open, service not allowed",
                PathFacts {
                    lazy_open: true,
                    service_allowed: false,
                    ..facts(10, Node)
                },
                Server,
            ),
            (
                "small, hot pair",
                PathFacts {
                    hot_pair: true,
                    ..facts(10, Node)
                },
                Lazy,
            ),
            (
                "large, target has no direct address",
                PathFacts {
                    target_reachable: false,
                    ..facts(T + 1, Node)
                },
                Server,
            ),
            ("large any-of", facts(T + 1, AnyOf), Server),
            ("small fan-out", facts(10, FanOut), Server),
            ("fan-out at the threshold", facts(T, FanOut), Server),
            ("large fan-out", facts(T + 1, FanOut), LazyFanOut),
            (
                "large fan-out, service not allowed",
                PathFacts {
                    service_allowed: false,
                    ..facts(T + 1, FanOut)
                },
                Server,
            ),
            (
                "small fan-out, hot",
                PathFacts {
                    hot_pair: true,
                    lazy_open: true,
                    ..facts(10, FanOut)
                },
                Server,
            ),
        ];
        for (name, f, expected) in cases {
            assert_eq!(choose(T, f), expected, "{name}");
        }
    }

    #[test]
    fn allow_list() {
        let mut lazy = LazyConfig::default();
        assert!(service_allowed(&lazy, "anything"));
        lazy.services = vec!["session-replication".into()];
        assert!(service_allowed(&lazy, "session-replication"));
        assert!(!service_allowed(&lazy, "cache-invalidation"));
        lazy.services.clear();
        assert!(!service_allowed(&lazy, "session-replication"));
    }
}
