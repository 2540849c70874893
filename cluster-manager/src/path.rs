//! Which path a message takes: through the message server, over a lazy
//! (direct) channel, or fanned out over lazy channels. The sender never
//! chooses; this function does, from facts the runtime gathers.

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
    /// Messages to the (single) target sent through the message server and
    /// not yet settled: a small message does not switch to the direct
    /// channel while any are (see [`choose`]).
    pub server_in_flight: usize,
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

/// Whether `service` is on the allow-list `services` (`lazy.services`;
/// `"*"` allows every service).
pub fn service_allowed(services: &[String], service: &str) -> bool {
    services.iter().any(|s| s == "*" || s == service)
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
/// - The switch rule: a message at or below the threshold moves from the
///   message server to the direct channel only once nothing sent to that
///   node through the message server is unsettled, so the switch never
///   overtakes earlier messages (order holds per sender and receiver).
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
        TargetKind::Node if !large && facts.server_in_flight > 0 => Path::Server,
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

/// What becomes of a message whose direct channel could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// It goes through the message server instead.
    Server,
    /// It fails (`DirectUnavailable`): the message-server path cannot
    /// carry its body.
    Fail,
}

/// The fallback rule: a message whose channel cannot be opened falls back
/// to the message server when its body fits there (`server_max`, the
/// negotiated limit of that path), and fails clearly otherwise; it never
/// hangs.
pub fn fallback(body_len: u64, server_max: u64) -> Fallback {
    if body_len <= server_max {
        Fallback::Server
    } else {
        Fallback::Fail
    }
}

/// Why a body cannot go through the message server, when the caller
/// already knows it is above that path's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TooLarge {
    /// A lazy channel would carry it, but the target announced no
    /// direct-channel address (`DirectUnavailable`).
    NoDirectAddress,
    /// No path carries it (`PayloadTooLarge`).
    Payload,
}

/// For a body above the message server's limit: whether a lazy channel
/// would have carried it (an allowed service, above the threshold, to a
/// member other than this node), so that the error names the real cause.
pub fn too_large(
    threshold_bytes: u64,
    body_len: u64,
    allowed: bool,
    other_member: bool,
) -> TooLarge {
    if body_len > threshold_bytes && allowed && other_member {
        TooLarge::NoDirectAddress
    } else {
        TooLarge::Payload
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
            server_in_flight: 0,
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

    /// The switch rule: small messages wait for the server path to drain
    /// before they take the direct channel; large ones go at once (the
    /// server path could not carry them in order anyway).
    #[test]
    fn switch_rule_table() {
        use Path::*;
        use TargetKind::*;
        let open = |body, in_flight| PathFacts {
            lazy_open: true,
            server_in_flight: in_flight,
            ..facts(body, Node)
        };
        let hot = |body, in_flight| PathFacts {
            hot_pair: true,
            server_in_flight: in_flight,
            ..facts(body, Node)
        };
        let cases: Vec<(&str, PathFacts, Path)> = vec![
            ("open, server path drained", open(10, 0), Lazy),
            (
                "open, one unsettled through the server",
                open(10, 1),
                Server,
            ),
            ("hot, many unsettled", hot(10, 100), Server),
            ("hot, drained", hot(10, 0), Lazy),
            ("at the threshold, unsettled", open(T, 1), Server),
            ("large, unsettled: direct at once", open(T + 1, 5), Lazy),
            (
                "fan-out ignores the count",
                PathFacts {
                    server_in_flight: 3,
                    ..facts(T + 1, FanOut)
                },
                LazyFanOut,
            ),
        ];
        for (name, f, expected) in cases {
            assert_eq!(choose(T, f), expected, "{name}");
        }
    }

    #[test]
    fn fallback_table() {
        let cases = [
            (0, 100, Fallback::Server),
            (100, 100, Fallback::Server),
            (101, 100, Fallback::Fail),
        ];
        for (body, max, expected) in cases {
            assert_eq!(fallback(body, max), expected, "{body} of {max}");
        }
        let cases = [
            (
                "large, allowed, another member",
                T + 1,
                true,
                true,
                TooLarge::NoDirectAddress,
            ),
            ("at the threshold", T, true, true, TooLarge::Payload),
            ("not allowed", T + 1, false, true, TooLarge::Payload),
            (
                "to itself or a non-member",
                T + 1,
                true,
                false,
                TooLarge::Payload,
            ),
        ];
        for (name, body, allowed, other, expected) in cases {
            assert_eq!(too_large(T, body, allowed, other), expected, "{name}");
        }
    }

    #[test]
    fn allow_list() {
        let all = vec!["*".to_string()];
        assert!(service_allowed(&all, "anything"));
        let one = vec!["session-replication".to_string()];
        assert!(service_allowed(&one, "session-replication"));
        assert!(!service_allowed(&one, "cache-invalidation"));
        assert!(!service_allowed(&[], "session-replication"));
    }
}
