//! What the monitor shows, read from the running server when a page, the
//! JSON or the metrics are asked for: the table, each connection's queue
//! and counters, the server's counters, the event log and the dead-letter
//! queue. Nothing here runs per message.
//!
//! Rates (messages and bytes per second) are the change of the counters
//! between two reads at least [`RATE_WINDOW`] apart; the first read has
//! none yet.
//!
//! The queue keeps no timestamps, so the time a message spends queued for
//! a node is estimated as the larger of two figures: Little's law
//! (messages queued divided by messages queued per second over the last
//! window), and, while messages wait, the time since the node's writer was
//! last seen writing (its oldest message has waited at least about that
//! long; seen at the reads, so to within a window).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use transports::protocol::{NodeId, Role};

use super::dead_letters::{DeadLetterList, DEAD_LETTERS_SHOWN};
use super::events::{unix_ms, EventTotals, RecentEvents};
use super::role::ServerRole;
use crate::counters::CountersSnapshot;
use crate::server::{ConnHandle, Shared};

/// Shortest time between two reads that rates are computed over.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Everything the monitor shows, at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// The server itself.
    pub status: Status,
    /// Every registered member.
    pub members: Vec<Member>,
    /// Each member's traffic and queue.
    pub nodes: Vec<NodeStats>,
    /// Recent membership events and refusals.
    pub events: RecentEvents,
    /// The dead-letter queue's state and its newest
    /// [`DEAD_LETTERS_SHOWN`] entries.
    pub dead_letters: DeadLetterList,
}

/// The server: identity, role, totals.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// This build's version.
    pub version: &'static str,
    /// `cluster.name`.
    pub cluster: String,
    /// Where nodes connect.
    pub listen: SocketAddr,
    /// Where heartbeats are received (UDP).
    pub heartbeat: Option<SocketAddr>,
    /// When this was read, in milliseconds since the Unix epoch.
    pub now_unix_ms: u64,
    /// Milliseconds since the server started.
    pub uptime_ms: u64,
    /// Registered members.
    pub members: usize,
    /// Primary or standby, and what failed over.
    pub failover: Failover,
    /// Whether nodes must prove `cluster.credentials`, and whether
    /// connections are mutual TLS.
    pub credentials: Credentials,
    /// Whether messages to members not back yet are held (after a restart
    /// or a takeover).
    pub warming_up: bool,
    /// Bytes queued across all connections, and the budget they draw on
    /// (`message_server.memory_budget_bytes`).
    pub memory: Memory,
    /// The server-wide counters.
    pub counters: CountersSnapshot,
}

/// Primary or standby, and the failovers this server has seen.
#[derive(Clone, Debug, Serialize)]
pub struct Failover {
    /// Which of `message_server.addresses` this server is.
    #[serde(flatten)]
    pub role: ServerRole,
    /// On a standby, the registrations it has taken: each is a node that
    /// could not reach the primary. Zero on the primary.
    pub failovers_in: u64,
    /// Nodes that registered again with the incarnation whose link here
    /// had broken (back after a reconnect, or from a standby).
    pub returned: u64,
    /// Reconnects that took a live registration over.
    pub reconnected: u64,
    /// Members declared failed.
    pub failed: u64,
}

/// How nodes prove who they are.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Credentials {
    /// `cluster.credentials` is set.
    pub cluster_secret: bool,
    /// `[tls]` is on.
    pub tls: bool,
}

/// The server's memory budget.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Memory {
    /// Bytes taken from the budget now.
    pub used_bytes: usize,
    /// `message_server.memory_budget_bytes`.
    pub budget_bytes: usize,
    /// Of `used_bytes`, the messages parked for full receivers (at most
    /// half the budget).
    pub parked_bytes: usize,
}

/// A registered member.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    /// Its node id.
    pub id: NodeId,
    /// Its incarnation (a string in JSON: it is beyond the integers a
    /// JavaScript number holds exactly).
    #[serde(serialize_with = "as_string")]
    pub incarnation: u64,
    /// `server` or `dispatcher`.
    pub role: &'static str,
    /// Groups it belongs to.
    pub groups: Vec<String>,
    /// Services it offers.
    pub services: Vec<String>,
    /// Where its connection to this server comes from.
    pub address: Option<SocketAddr>,
    /// Where it accepts direct channels.
    pub direct_address: Option<SocketAddr>,
    /// Whether it reports itself busy (`node.busy_upper`). `None` (shown
    /// as n/a) until it sent its first report.
    pub busy: Option<bool>,
    /// Messages waiting in its service inboxes, as it reported last
    /// (every heartbeat interval, and at once when it becomes busy or no
    /// longer busy); `AnyOf` prefers the least.
    pub backlog: Option<u64>,
    /// Milliseconds since its last heartbeat (or its registration).
    pub heartbeat_age_ms: Option<u64>,
    /// Milliseconds since it registered.
    pub connected_ms: Option<u64>,
}

/// A member's traffic and queue.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStats {
    /// Its node id.
    pub id: NodeId,
    /// Its incarnation (a string in JSON).
    #[serde(serialize_with = "as_string")]
    pub incarnation: u64,
    /// Its outgoing queue on this server.
    pub queue: QueueDepth,
    /// Per second over the last window; `None` until two reads were made.
    pub rates: Option<Rates>,
    /// Counts per path.
    pub paths: Paths,
}

/// A member's outgoing queue on this server.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct QueueDepth {
    /// Frames queued, not yet taken by its writer (messages and control).
    pub frames: usize,
    /// Messages queued or being written.
    pub messages: usize,
    /// Their bytes.
    pub bytes: usize,
    /// `message_server.queue_frames`.
    pub limit_frames: usize,
    /// `message_server.queue_bytes`.
    pub limit_bytes: usize,
    /// Estimated time a message spends queued, in milliseconds (see the
    /// module's docs); `None` when it cannot be told yet.
    pub wait_ms_estimate: Option<u64>,
    /// Bytes its writer has written to the node's socket.
    pub written_bytes: u64,
    /// Of `frames`, the messages queued at each priority (each has a queue
    /// of its own, see the README's Priorities).
    pub by_priority: ByPriority,
}

/// A count per message priority.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ByPriority {
    /// `Express`.
    pub express: usize,
    /// `High`.
    pub high: usize,
    /// `Normal`.
    pub normal: usize,
    /// `Low`.
    pub low: usize,
}

impl ByPriority {
    /// The counts, in [`transports::protocol::Priority::ALL`]'s order.
    fn of([express, high, normal, low]: [usize; 4]) -> ByPriority {
        ByPriority {
            express,
            high,
            normal,
            low,
        }
    }

    /// Each priority's name and count.
    pub fn named(&self) -> [(&'static str, usize); 4] {
        [
            ("express", self.express),
            ("high", self.high),
            ("normal", self.normal),
            ("low", self.low),
        ]
    }
}

/// Rates over the last window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Messages per second the node sent through the server.
    pub messages_in_per_s: f64,
    /// Their bytes per second.
    pub bytes_in_per_s: f64,
    /// Messages per second queued to the node.
    pub messages_out_per_s: f64,
    /// Their bytes per second.
    pub bytes_out_per_s: f64,
    /// The window, in milliseconds.
    pub window_ms: u64,
}

/// A member's counts on each path.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Paths {
    /// Through this server.
    pub server: PathCounts,
    /// Over lazy channels, as the node last reported (`None`: no report
    /// yet; nodes report every heartbeat interval).
    pub lazy: Option<DirectCounts>,
    /// Over session channels, as the node last reported.
    pub session: Option<DirectCounts>,
    /// Messages the node received over direct (lazy or session) channels,
    /// as it last reported.
    pub received_direct: Option<u64>,
    /// Direct channels the node opened that are open, as it last reported.
    pub channels_open: Option<u64>,
}

/// What a node sent on a direct path, as it reported: a receiver does not
/// tell lazy from session channels, so only the sender's side is split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirectCounts {
    /// Messages the node sent.
    pub messages_sent: u64,
    /// Their body bytes.
    pub bytes_sent: u64,
}

/// Messages and bytes in each direction on one path. Bytes are whole
/// frames (header and body).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PathCounts {
    /// Messages the node sent.
    pub messages_in: u64,
    /// Their bytes.
    pub bytes_in: u64,
    /// Messages sent to the node.
    pub messages_out: u64,
    /// Their bytes.
    pub bytes_out: u64,
}

/// Remembers the last read of every connection's counters, for rates and
/// the queue-time estimate. Holds at most one entry per connection read.
#[derive(Debug, Default)]
pub(crate) struct Sampler {
    last: Mutex<Option<Sample>>,
}

#[derive(Debug)]
struct Sample {
    at: Instant,
    /// By node and connection id.
    nodes: HashMap<(NodeId, u64), Totals>,
    /// The rates computed when this sample was taken.
    rates: HashMap<(NodeId, u64), Rates>,
}

#[derive(Clone, Copy, Debug)]
struct Totals {
    counts: PathCounts,
    written: u64,
    /// When its writer was last seen writing, or its queue empty.
    progress_at: Instant,
}

/// One member as read under the state's lock.
struct Read {
    info: transports::protocol::MemberInfo,
    conn: Option<ConnHandle>,
}

/// One connection's queue and counts, as read.
struct NodeRead {
    key: (NodeId, u64),
    incarnation: u64,
    stats: transports::io::QueueStats,
    counts: PathCounts,
    report: Option<transports::protocol::NodeReport>,
    rates: Option<Rates>,
    progress_at: Instant,
}

/// Reads everything the monitor shows.
pub(crate) fn gather(
    shared: &Shared,
    local_addr: SocketAddr,
    role: &ServerRole,
    sampler: &Sampler,
) -> Snapshot {
    let now = Instant::now();
    let now_ms = shared.now_ms();
    // Under the read lock: only clones of the members and connection
    // handles (reference counts); queues are read after it is released.
    let read: Vec<Read> = {
        let state = shared.read();
        state
            .table
            .members()
            .into_iter()
            .map(|info| Read {
                conn: state.conns.get(&info.id).cloned(),
                info,
            })
            .collect()
    };
    let ms = &shared.config.message_server;
    let mut members = Vec::with_capacity(read.len());
    let mut nodes = Vec::with_capacity(read.len());
    let mut totals = HashMap::with_capacity(read.len());
    let mut last = sampler.last.lock().unwrap_or_else(|p| p.into_inner());
    for Read { info, conn } in read {
        let session = conn.as_ref().map(|c| c.session.clone());
        members.push(Member {
            id: info.id.clone(),
            incarnation: info.incarnation,
            role: match info.role {
                Role::Server => "server",
                Role::Dispatcher => "dispatcher",
            },
            groups: info.groups.iter().map(ToString::to_string).collect(),
            services: info.services.iter().map(ToString::to_string).collect(),
            address: session.as_ref().map(|s| s.peer),
            direct_address: info.direct_addr,
            busy: session
                .as_ref()
                .and_then(|s| s.report())
                .and_then(|r| r.busy),
            backlog: session.as_ref().and_then(|s| s.report()).map(|r| r.backlog),
            heartbeat_age_ms: conn.as_ref().map(|c| {
                now_ms.saturating_sub(c.last_seen.load(std::sync::atomic::Ordering::Relaxed))
            }),
            connected_ms: session.as_ref().map(|s| now_ms.saturating_sub(s.since_ms)),
        });
        let Some(conn) = conn else { continue };
        let stats = conn.queue.stats();
        let counts = PathCounts {
            messages_in: conn.session.counters.messages_in(),
            bytes_in: conn.session.counters.bytes_in(),
            messages_out: stats.data_total,
            bytes_out: stats.bytes_total,
        };
        let key = (info.id.clone(), conn.conn_id);
        let before = last.as_ref().and_then(|s| s.nodes.get(&key));
        let progressed = stats.data == 0 || before.is_none_or(|b| b.written != stats.written_bytes);
        let progress_at = match before {
            Some(b) if !progressed => b.progress_at,
            _ => now,
        };
        totals.insert(
            key.clone(),
            Totals {
                counts,
                written: stats.written_bytes,
                progress_at,
            },
        );
        let rates = last.as_ref().and_then(|s| s.rates.get(&key)).copied();
        nodes.push(NodeRead {
            key,
            incarnation: info.incarnation,
            stats,
            counts,
            report: conn.session.report(),
            rates,
            progress_at,
        });
    }
    // A new sample once the last is a window old: its rates serve every
    // read until the next.
    let fresh = last
        .as_ref()
        .is_none_or(|s| now.duration_since(s.at) >= RATE_WINDOW);
    if fresh {
        let rates = match last.as_ref() {
            Some(before) => totals
                .iter()
                .filter_map(|(key, now_totals)| {
                    let then = before.nodes.get(key)?;
                    Some((key.clone(), rates(then, now_totals, now - before.at)))
                })
                .collect(),
            None => HashMap::new(),
        };
        for node in &mut nodes {
            node.rates = rates.get(&node.key).copied();
        }
        *last = Some(Sample {
            at: now,
            nodes: totals,
            rates,
        });
    }
    drop(last);
    let nodes = nodes
        .into_iter()
        .map(|node| {
            let NodeRead {
                key: (id, _),
                incarnation,
                stats,
                counts,
                report,
                rates,
                progress_at,
            } = node;
            let wait_ms_estimate = if stats.data == 0 {
                Some(0)
            } else {
                rates.map(|r| {
                    let little = if r.messages_out_per_s > 0.0 {
                        stats.data as f64 / r.messages_out_per_s
                    } else {
                        0.0
                    };
                    let stalled = now.duration_since(progress_at).as_secs_f64();
                    (little.max(stalled) * 1000.0) as u64
                })
            };
            NodeStats {
                incarnation,
                id,
                queue: QueueDepth {
                    frames: stats.frames,
                    messages: stats.data,
                    bytes: stats.bytes,
                    limit_frames: ms.queue_frames,
                    limit_bytes: ms.queue_bytes,
                    wait_ms_estimate,
                    written_bytes: stats.written_bytes,
                    by_priority: ByPriority::of(stats.frames_by_priority),
                },
                rates,
                paths: Paths {
                    server: counts,
                    lazy: report.map(|r| DirectCounts {
                        messages_sent: r.lazy_messages,
                        bytes_sent: r.lazy_bytes,
                    }),
                    session: report.map(|r| DirectCounts {
                        messages_sent: r.session_messages,
                        bytes_sent: r.session_bytes,
                    }),
                    received_direct: report.map(|r| r.received_direct),
                    channels_open: report.map(|r| r.channels_open),
                },
            }
        })
        .collect();
    let events = shared.events.recent();
    let status = status(shared, local_addr, role, members.len(), events.totals);
    Snapshot {
        status,
        members,
        nodes,
        events,
        dead_letters: super::dead_letters::gather(shared, DEAD_LETTERS_SHOWN),
    }
}

/// The server's status alone (for `/api/v1/status`).
pub(crate) fn status(
    shared: &Shared,
    local_addr: SocketAddr,
    role: &ServerRole,
    members: usize,
    totals: EventTotals,
) -> Status {
    let config = &shared.config;
    Status {
        version: env!("CARGO_PKG_VERSION"),
        cluster: config.cluster.name.clone(),
        listen: local_addr,
        heartbeat: shared.heartbeat_addr,
        now_unix_ms: unix_ms(),
        uptime_ms: shared.now_ms(),
        members,
        failover: Failover {
            role: role.clone(),
            failovers_in: if role.is_standby() {
                totals.joined + totals.returned
            } else {
                0
            },
            returned: totals.returned,
            reconnected: totals.reconnected,
            failed: totals.failed,
        },
        credentials: Credentials {
            cluster_secret: config.cluster.credentials.is_some(),
            tls: shared.tls.is_some(),
        },
        warming_up: crate::registry::warming_up(shared),
        memory: Memory {
            used_bytes: shared.budget.used(),
            budget_bytes: config.message_server.memory_budget_bytes,
            parked_bytes: shared.parked.used(),
        },
        counters: shared.counters.snapshot(),
    }
}

/// A `u64` as a JSON string: incarnations are nanosecond clocks, beyond
/// the 2^53 a JavaScript number holds exactly.
pub(crate) fn as_string<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(n)
}

fn rates(then: &Totals, now: &Totals, elapsed: Duration) -> Rates {
    let secs = elapsed.as_secs_f64().max(1e-3);
    // A counter that went back (it cannot, per connection) reads as 0.
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let (a, b) = (then.counts, now.counts);
    Rates {
        messages_in_per_s: per_s(a.messages_in, b.messages_in),
        bytes_in_per_s: per_s(a.bytes_in, b.bytes_in),
        messages_out_per_s: per_s(a.messages_out, b.messages_out),
        bytes_out_per_s: per_s(a.bytes_out, b.bytes_out),
        window_ms: elapsed.as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_the_change_per_second() {
        let at = Instant::now();
        let totals = |messages, bytes| Totals {
            counts: PathCounts {
                messages_in: messages,
                bytes_in: bytes,
                messages_out: messages * 2,
                bytes_out: bytes * 2,
            },
            written: 0,
            progress_at: at,
        };
        let r = rates(
            &totals(100, 1000),
            &totals(300, 5000),
            Duration::from_secs(2),
        );
        assert_eq!(
            r,
            Rates {
                messages_in_per_s: 100.0,
                bytes_in_per_s: 2000.0,
                messages_out_per_s: 200.0,
                bytes_out_per_s: 4000.0,
                window_ms: 2000,
            }
        );
        let back = rates(
            &totals(300, 5000),
            &totals(100, 1000),
            Duration::from_secs(1),
        );
        assert_eq!(back.messages_in_per_s, 0.0);
    }
}
