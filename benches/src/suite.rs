//! The benchmark suite's vocabulary: the cases every system runs with the
//! same pattern, the systems, what one measurement yields, and how the
//! rounds of one case are summarised.
//!
//! Five systems run every case they have a counterpart for, in the same
//! run, taking turns round by round:
//!
//! | system | module | what it is |
//! | --- | --- | --- |
//! | [`System::Ours`] | [`crate::ours`] | clustercomm: a `bench-message-server` process and nodes in this process |
//! | [`System::NatsGo`] | [`crate::nats_go`] | nats-server driven by NATS's own Go client (nats.go), the reference peer of every ours/NATS ratio |
//! | [`System::AsyncNats`] | [`crate::nats`] | the same nats-server driven by the async-nats Rust client, a second column |
//! | [`System::Relay`] | [`crate::relay_cases`] | raw TCP through a relay process (sender → relay → receiver): the floor of every path through a server |
//! | [`System::Raw`] | [`crate::raw_cases`] | raw loopback TCP, direct: the floor of the direct paths (session and lazy channels) |
//!
//! A system that has no counterpart for a case says so with
//! [`System::pattern`] returning `None` ("n/a" in the table). Cases that a
//! system runs with the same pattern map to the same [`System::pattern`],
//! and the driver measures that pattern once per round and reuses it (so
//! fan-out All and Group never show two different NATS numbers of one
//! run).

use std::fmt;

pub use crate::latency::Latency;

/// Which path a bulk case forces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BulkPath {
    /// Over a lazy channel, node to node.
    Lazy,
    /// Forced through the message server (the peers' routed path).
    Server,
}

/// What an acknowledged `send` is compared with on the NATS side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SendPeer {
    /// Core NATS publish: fire and forget, nothing acknowledged.
    Publish,
    /// JetStream publish-with-ack to a file-backed stream
    /// (`nats-server -js`), the same window of acks outstanding.
    JetStream,
}

/// One benchmark case, run with the same pattern by every system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Case {
    /// Point to point, one-way (`notify`; NATS publish), messages/s
    /// received.
    Notify {
        /// Body size.
        body: usize,
    },
    /// One-way point to point at a fixed rate: latency from each
    /// message's intended send time to its arrival (corrected for
    /// coordinated omission), from an HdrHistogram.
    FixedRate {
        /// Body size (at least [`crate::latency::STAMP_LEN`]).
        body: usize,
        /// Messages per second. In [`cases`] this is 0: the driver sets
        /// it for each system to [`FIXED_RATE_PERCENT`] of that system's
        /// own median `notify` rate of the same body in the same run.
        rate: u64,
    },
    /// Point to point, acknowledged `send` with `outstanding` in flight,
    /// messages/s acknowledged; compared with `peer` on the NATS side.
    SendPipelined {
        /// Body size.
        body: usize,
        /// Messages in flight.
        outstanding: usize,
        /// The NATS pattern it is compared with.
        peer: SendPeer,
    },
    /// One-way fan-out to `receivers` (`Target::All`; NATS: one subject,
    /// that many subscribers), deliveries/s.
    FanOutAll {
        /// Receivers.
        receivers: usize,
        /// Body size.
        body: usize,
    },
    /// One-way fan-out to a group of `receivers` (`Target::Group`; NATS:
    /// same as [`Case::FanOutAll`]), deliveries/s.
    FanOutGroup {
        /// Receivers.
        receivers: usize,
        /// Body size.
        body: usize,
    },
    /// One-way to any one of `members` (`Target::AnyOf`; NATS: a queue
    /// group), messages/s received in all.
    AnyOf {
        /// Members.
        members: usize,
        /// Body size.
        body: usize,
    },
    /// Request/reply with one outstanding: latency percentiles.
    RequestLatency {
        /// Body size.
        body: usize,
    },
    /// Request/reply with `outstanding` in flight: requests/s.
    RequestRate {
        /// Body size.
        body: usize,
        /// Requests in flight.
        outstanding: usize,
    },
    /// One-way over a dispatcher's session channel (a direct path: no
    /// NATS counterpart), messages/s received.
    Session {
        /// Body size.
        body: usize,
    },
    /// Large bodies, acknowledged one by one (a few in flight), MB/s.
    Bulk {
        /// Body size.
        body: usize,
        /// The path forced.
        path: BulkPath,
    },
    /// [`Case::Notify`] in a cluster with `[tls]`: every connection over
    /// mutual TLS (NATS: a nats-server whose `tls` block verifies
    /// clients), messages/s received.
    NotifyTls {
        /// Body size.
        body: usize,
    },
    /// [`Case::Bulk`] over a lazy channel in a cluster with `[tls]` (no
    /// NATS counterpart), MB/s.
    LazyTls {
        /// Body size.
        body: usize,
    },
    /// Requests of `body` bytes, one at a time, while the sender sends
    /// [`HOL_BULK_BYTES`] bodies to the same receiver back to back over
    /// the same connection: latency percentiles. Ours over a lazy channel
    /// (large bodies in parts, under the channel's window); its floor is
    /// raw TCP direct, one connection carrying both in order. No NATS
    /// counterpart.
    HeadOfLine {
        /// Request body size.
        body: usize,
    },
    /// Acknowledged `Express` sends of `body` bytes, one at a time, while
    /// the sender keeps a backlog of one-way `Low` messages of
    /// [`PRIORITY_BACKLOG_BYTES`] flowing to the same receiver through the
    /// message server: latency percentiles. Its floor is raw TCP via the
    /// relay, where each measured frame waits in one stream behind the
    /// backlog queued before it (no priorities). No NATS counterpart.
    Priority {
        /// Measured body size.
        body: usize,
    },
    /// Bodies sent as streams (`Node::send_stream`, read by the receiver
    /// with `Message::body_stream` as they arrive), one after the other,
    /// over a lazy channel, MB/s. Its floor is raw TCP direct moving
    /// bodies of the same size (no NATS counterpart).
    Stream {
        /// Body size.
        body: usize,
    },
    /// Recoverable `send` (stored by the sender, then by the receiver,
    /// before it is acknowledged) from one node with a store to another,
    /// `outstanding` in flight through the message server, messages/s
    /// acknowledged; compared with JetStream publish-with-ack with the
    /// same window (the pattern of [`Case::SendPipelined`] against
    /// [`SendPeer::JetStream`]). Its floors are those of the plain send.
    RecoverableSend {
        /// Body size.
        body: usize,
        /// Messages in flight.
        outstanding: usize,
    },
    /// One recoverable `send` at a time through the message server:
    /// latency percentiles; compared with JetStream publish-with-ack, one
    /// outstanding. Its floors are those of request/reply, one
    /// outstanding (the same four hops).
    RecoverableLatency {
        /// Body size.
        body: usize,
    },
}

/// The backlog's bodies in [`Case::Priority`].
pub const PRIORITY_BACKLOG_BYTES: usize = 4096;

/// The bulk bodies of [`Case::HeadOfLine`].
pub const HOL_BULK_BYTES: usize = 64 << 20;

/// The fixed-rate case runs each system at this percentage of its own
/// maximum (its median `notify` rate in the same run).
pub const FIXED_RATE_PERCENT: u64 = 50;

impl Case {
    /// The unit of the case's result.
    pub fn unit(&self) -> &'static str {
        match self {
            Case::Notify { .. }
            | Case::SendPipelined { .. }
            | Case::RecoverableSend { .. }
            | Case::AnyOf { .. }
            | Case::Session { .. }
            | Case::NotifyTls { .. } => "msgs/s",
            Case::FanOutAll { .. } | Case::FanOutGroup { .. } => "deliveries/s",
            Case::RequestLatency { .. }
            | Case::FixedRate { .. }
            | Case::HeadOfLine { .. }
            | Case::Priority { .. }
            | Case::RecoverableLatency { .. } => "µs p50/p99/p99.9",
            Case::RequestRate { .. } => "requests/s",
            Case::Bulk { .. } | Case::LazyTls { .. } | Case::Stream { .. } => "MB/s",
        }
    }

    /// Whether the case's messages go through a server (the message
    /// server, nats-server, the relay) rather than over a direct
    /// connection (session and lazy channels).
    pub fn through_server(&self) -> bool {
        !matches!(
            self,
            Case::Session { .. }
                | Case::LazyTls { .. }
                | Case::Stream { .. }
                | Case::HeadOfLine { .. }
                | Case::Bulk {
                    path: BulkPath::Lazy,
                    ..
                }
        )
    }

    /// Whether the case runs over mutual TLS.
    pub fn tls(&self) -> bool {
        matches!(self, Case::NotifyTls { .. } | Case::LazyTls { .. })
    }

    /// The same case in clear text (a case without TLS is its own): what
    /// a TLS case runs, and what it is compared with.
    pub fn plain(self) -> Case {
        match self {
            Case::NotifyTls { body } => Case::Notify { body },
            Case::LazyTls { body } => Case::Bulk {
                body,
                path: BulkPath::Lazy,
            },
            other => other,
        }
    }

    /// Whether the case is a latency case (lower is better).
    pub fn is_latency(&self) -> bool {
        matches!(
            self,
            Case::RequestLatency { .. }
                | Case::FixedRate { .. }
                | Case::HeadOfLine { .. }
                | Case::Priority { .. }
                | Case::RecoverableLatency { .. }
        )
    }

    /// How many rounds this case runs per system: [`ROUNDS`], or
    /// [`BULK_ROUNDS`] for bulk cases.
    pub fn rounds(&self) -> u32 {
        match self {
            Case::Bulk { .. } | Case::LazyTls { .. } | Case::Stream { .. } => BULK_ROUNDS,
            _ => ROUNDS,
        }
    }

    /// The same case at `rate` messages per second (only
    /// [`Case::FixedRate`] has a rate; other cases are returned as they
    /// are).
    pub fn at_rate(self, rate: u64) -> Case {
        match self {
            Case::FixedRate { body, .. } => Case::FixedRate { body, rate },
            other => other,
        }
    }
}

/// A body size for humans: `128 B`, `1 KiB`, `16 MiB`.
pub fn size(len: usize) -> String {
    if len >= 1 << 20 && len.is_multiple_of(1 << 20) {
        format!("{} MiB", len >> 20)
    } else if len >= 1 << 10 && len.is_multiple_of(1 << 10) {
        format!("{} KiB", len >> 10)
    } else {
        format!("{len} B")
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Case::Notify { body } => write!(f, "notify {}", size(body)),
            Case::FixedRate { body, .. } => write!(
                f,
                "notify {} at {FIXED_RATE_PERCENT}% of max rate",
                size(body)
            ),
            Case::SendPipelined {
                body,
                outstanding,
                peer,
            } => {
                let peer = match peer {
                    SendPeer::Publish => "NATS publish",
                    SendPeer::JetStream => "JetStream publish-with-ack",
                };
                write!(f, "send {}, {outstanding} in flight vs {peer}", size(body))
            }
            Case::FanOutAll { receivers, body } => {
                write!(f, "fan-out All to {receivers}, {}", size(body))
            }
            Case::FanOutGroup { receivers, body } => {
                write!(f, "fan-out Group of {receivers}, {}", size(body))
            }
            Case::AnyOf { members, body } => write!(f, "AnyOf over {members}, {}", size(body)),
            Case::RequestLatency { body } => {
                write!(f, "request/reply {}, 1 outstanding", size(body))
            }
            Case::RequestRate { body, outstanding } => {
                write!(f, "request/reply {}, {outstanding} outstanding", size(body))
            }
            Case::Session { body } => write!(f, "session channel {}", size(body)),
            Case::Bulk {
                body,
                path: BulkPath::Lazy,
            } => write!(f, "{} over a lazy channel", size(body)),
            Case::Bulk {
                body,
                path: BulkPath::Server,
            } => {
                write!(f, "{} through the message server", size(body))
            }
            Case::NotifyTls { .. } | Case::LazyTls { .. } => {
                write!(f, "{} over TLS", self.plain())
            }
            Case::Stream { body } => write!(f, "{} streams over a lazy channel", size(body)),
            Case::Priority { body } => write!(
                f,
                "Express send {} while a Low backlog of {} flows",
                size(body),
                size(PRIORITY_BACKLOG_BYTES)
            ),
            Case::HeadOfLine { body } => write!(
                f,
                "request/reply {} while {} bodies flow",
                size(body),
                size(HOL_BULK_BYTES)
            ),
            Case::RecoverableSend { body, outstanding } => write!(
                f,
                "recoverable send {}, {outstanding} in flight vs JetStream publish-with-ack",
                size(body)
            ),
            Case::RecoverableLatency { body } => {
                write!(f, "recoverable send {}, 1 outstanding", size(body))
            }
        }
    }
}

/// The systems of the suite (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum System {
    /// clustercomm.
    Ours,
    /// nats-server through NATS's own Go client.
    NatsGo,
    /// nats-server through the async-nats client.
    AsyncNats,
    /// Raw TCP through a relay process.
    Relay,
    /// Raw loopback TCP, direct.
    Raw,
}

impl System {
    /// Every system, in the order of the table's columns (and of the
    /// turns within a round).
    pub const ALL: [System; 5] = [
        System::Ours,
        System::NatsGo,
        System::AsyncNats,
        System::Relay,
        System::Raw,
    ];

    /// The column heading, with the client's version where one is used.
    pub fn heading(self) -> &'static str {
        match self {
            System::Ours => "ours",
            System::NatsGo => "nats-server 2.9.10, nats.go 1.22",
            System::AsyncNats => "nats-server 2.9.10, async-nats 0.46",
            System::Relay => "raw TCP via relay",
            System::Raw => "raw TCP direct",
        }
    }

    /// The case this system actually runs for `case`, or `None` if it
    /// has no counterpart ("n/a"). Cases with the same pattern are
    /// measured once per round and the result reused for each of them:
    ///
    /// - NATS: `notify` and a send compared with publish are one
    ///   publisher and one subscriber; fan-out All and Group are one
    ///   subject with that many subscribers; both bulk paths go through
    ///   the server. The direct paths (session channel, lazy channel)
    ///   have no NATS counterpart. async-nats has no JetStream case.
    /// - Over TLS, nats.go runs `notify` against a nats-server that
    ///   requires TLS; the other columns have no TLS case.
    /// - The relay carries what goes through a server, so it has no
    ///   direct-path case; direct raw TCP has no fixed-rate case (the
    ///   relay is that case's floor).
    /// - Ours runs a send once whichever NATS peer it is compared with.
    /// - A recoverable send: nats.go runs the JetStream publish-with-ack of
    ///   the plain send's row (the same window), or one publish at a time
    ///   for the latency row; async-nats has none. The relay and raw TCP
    ///   run the floors of the plain send and of request/reply with one
    ///   outstanding: the path without a store.
    pub fn pattern(self, case: Case) -> Option<Case> {
        let send = |body, outstanding| Case::SendPipelined {
            body,
            outstanding,
            peer: SendPeer::Publish,
        };
        match (self, case) {
            (System::Ours, Case::RecoverableSend { .. } | Case::RecoverableLatency { .. }) => {
                Some(case)
            }
            (System::AsyncNats, Case::RecoverableSend { .. } | Case::RecoverableLatency { .. }) => {
                None
            }
            (System::NatsGo, Case::RecoverableSend { body, outstanding }) => {
                Some(Case::SendPipelined {
                    body,
                    outstanding,
                    peer: SendPeer::JetStream,
                })
            }
            (System::NatsGo, Case::RecoverableLatency { .. }) => Some(case),
            (_, Case::RecoverableSend { body, outstanding }) => Some(send(body, outstanding)),
            (_, Case::RecoverableLatency { body }) => Some(Case::RequestLatency { body }),
            (System::NatsGo, Case::NotifyTls { .. }) => Some(case),
            (System::Ours, Case::NotifyTls { .. } | Case::LazyTls { .. }) => Some(case),
            (_, Case::NotifyTls { .. } | Case::LazyTls { .. }) => None,
            (System::Ours, Case::Stream { .. }) => Some(case),
            (System::Raw, Case::Stream { body }) => Some(Case::Bulk {
                body,
                path: BulkPath::Lazy,
            }),
            (_, Case::Stream { .. }) => None,
            (System::Ours | System::Raw, Case::HeadOfLine { .. }) => Some(case),
            (_, Case::HeadOfLine { .. }) => None,
            (System::Ours | System::Relay, Case::Priority { .. }) => Some(case),
            (_, Case::Priority { .. }) => None,
            (System::NatsGo | System::AsyncNats, Case::Session { .. }) => None,
            (
                System::NatsGo | System::AsyncNats | System::Relay,
                Case::Bulk {
                    path: BulkPath::Lazy,
                    ..
                },
            ) => None,
            (
                System::AsyncNats,
                Case::SendPipelined {
                    peer: SendPeer::JetStream,
                    ..
                },
            ) => None,
            (
                System::NatsGo | System::AsyncNats,
                Case::SendPipelined {
                    body,
                    peer: SendPeer::Publish,
                    ..
                },
            ) => Some(Case::Notify { body }),
            (
                System::NatsGo | System::AsyncNats | System::Relay | System::Raw,
                Case::FanOutGroup { receivers, body },
            ) => Some(Case::FanOutAll { receivers, body }),
            (System::Relay, Case::Session { .. }) => None,
            (System::Raw, Case::FixedRate { .. }) => None,
            (
                System::Ours | System::Relay | System::Raw,
                Case::SendPipelined {
                    body, outstanding, ..
                },
            ) => Some(send(body, outstanding)),
            (System::Raw, Case::Session { body }) => Some(Case::Notify { body }),
            (System::Raw, Case::Bulk { body, .. }) => Some(Case::Bulk {
                body,
                path: BulkPath::Lazy,
            }),
            (_, case) => Some(case),
        }
    }
}

/// What measuring a case gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A rate in the case's unit.
    Rate(f64),
    /// Latency percentiles.
    Latency(Latency),
    /// Not run, with the reason (the peer cannot do it, or is missing).
    Skipped(String),
    /// Run, but failed, with the reason.
    Failed(String),
}

impl Outcome {
    /// The number compared across systems: the rate, or the p50 latency.
    pub fn value(&self) -> Option<f64> {
        match self {
            Outcome::Rate(r) => Some(*r),
            Outcome::Latency(l) => Some(l.p50_us),
            Outcome::Skipped(_) | Outcome::Failed(_) => None,
        }
    }
}

/// One round of one system in one case: the outcome, and what of a
/// one-way case did not arrive.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The rate or the latency (or why there is none).
    pub outcome: Outcome,
    /// One-way messages the system accepted but did not deliver in the
    /// measured phase (always 0 for acknowledged and TCP cases).
    pub lost: u64,
    /// What the system itself reported of that loss (the sender's late
    /// failures, a slow-consumer error, messages a client dropped); `None`
    /// with `lost > 0` is loss nothing accounted for.
    pub loss_reported: Option<String>,
}

impl From<Outcome> for Measurement {
    fn from(outcome: Outcome) -> Measurement {
        Measurement {
            outcome,
            lost: 0,
            loss_reported: None,
        }
    }
}

impl Measurement {
    /// A failed round, with the reason.
    pub fn failed(why: impl Into<String>) -> Measurement {
        Outcome::Failed(why.into()).into()
    }

    /// A round not run, with the reason.
    pub fn skipped(why: impl Into<String>) -> Measurement {
        Outcome::Skipped(why.into()).into()
    }

    /// This measurement with `lost` messages, and what the system
    /// reported of them.
    pub fn with_loss(mut self, lost: u64, reported: Option<String>) -> Measurement {
        self.lost = lost;
        self.loss_reported = if lost > 0 { reported } else { None };
        self
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Rate(r) => write!(f, "{}", short_rate(*r)),
            Outcome::Latency(l) => {
                write!(f, "{:.0} / {:.0} / {:.0}", l.p50_us, l.p99_us, l.p999_us)?;
                match l.rate {
                    Some(rate) => write!(f, " at {}/s", short_rate(rate)),
                    None => Ok(()),
                }
            }
            Outcome::Skipped(why) => write!(f, "skipped ({why})"),
            Outcome::Failed(why) => write!(f, "failed ({why})"),
        }
    }
}

impl fmt::Display for Measurement {
    /// The outcome, and the loss if there was any.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.outcome)?;
        match (self.lost, &self.loss_reported) {
            (0, _) => Ok(()),
            (lost, Some(why)) => write!(f, ", {lost} lost ({why})"),
            (lost, None) => write!(f, ", {lost} lost (unexplained)"),
        }
    }
}

/// Rounds a small-message case runs per system, the systems taking turns
/// within each round. The table shows the median round with the range
/// beside it, and targets are judged on the median.
pub const ROUNDS: u32 = 5;

/// Rounds of a bulk case per system.
pub const BULK_ROUNDS: u32 = 3;

/// The rounds of one system in one case.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Every round, in the order run.
    pub rounds: Vec<Measurement>,
}

/// The median of `values` (the mean of the middle two for an even
/// count); `None` if empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

impl Summary {
    /// Adds a round.
    pub fn push(&mut self, round: Measurement) {
        self.rounds.push(round);
    }

    /// The first failure of any round: a failed round fails the case,
    /// never hidden behind good ones.
    pub fn failure(&self) -> Option<&str> {
        self.rounds.iter().find_map(|m| match &m.outcome {
            Outcome::Failed(why) => Some(why.as_str()),
            _ => None,
        })
    }

    /// Why no round ran, if none did.
    pub fn skipped(&self) -> Option<&str> {
        if self.rounds.iter().any(|m| m.outcome.value().is_some()) {
            return None;
        }
        self.rounds.iter().find_map(|m| match &m.outcome {
            Outcome::Skipped(why) => Some(why.as_str()),
            _ => None,
        })
    }

    /// The compared values of the rounds that measured something.
    fn values(&self, pick: impl Fn(&Outcome) -> Option<f64>) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|m| pick(&m.outcome))
            .collect()
    }

    /// The median of the rounds' rates or p50 latencies; `None` if a
    /// round failed or none measured anything.
    pub fn median(&self) -> Option<f64> {
        if self.failure().is_some() {
            return None;
        }
        median(&self.values(Outcome::value))
    }

    /// The lowest and highest of the rounds' rates or p50 latencies.
    pub fn range(&self) -> Option<(f64, f64)> {
        let values = self.values(Outcome::value);
        let min = values.iter().copied().reduce(f64::min)?;
        let max = values.iter().copied().reduce(f64::max)?;
        Some((min, max))
    }

    /// The median of each percentile over the rounds (for latency
    /// cases), with the median offered rate of a fixed-rate case; `None`
    /// if a round failed or none measured latency.
    pub fn median_latency(&self) -> Option<Latency> {
        if self.failure().is_some() {
            return None;
        }
        let latencies: Vec<Latency> = self
            .rounds
            .iter()
            .filter_map(|m| match m.outcome {
                Outcome::Latency(l) => Some(l),
                _ => None,
            })
            .collect();
        let pick = |f: fn(&Latency) -> f64| median(&latencies.iter().map(f).collect::<Vec<_>>());
        let rates: Vec<f64> = latencies.iter().filter_map(|l| l.rate).collect();
        Some(Latency {
            p50_us: pick(|l| l.p50_us)?,
            p99_us: pick(|l| l.p99_us)?,
            p999_us: pick(|l| l.p999_us)?,
            rate: median(&rates),
        })
    }

    /// The lowest and highest p99 of the rounds (latency cases).
    pub fn p99_range(&self) -> Option<(f64, f64)> {
        let values = self.values(|o| match o {
            Outcome::Latency(l) => Some(l.p99_us),
            _ => None,
        });
        let min = values.iter().copied().reduce(f64::min)?;
        let max = values.iter().copied().reduce(f64::max)?;
        Some((min, max))
    }

    /// Messages lost over all rounds.
    pub fn lost(&self) -> u64 {
        self.rounds.iter().map(|m| m.lost).sum()
    }

    /// Messages lost over all rounds that the system did not account for
    /// (rounds with loss and no report).
    pub fn unexplained_loss(&self) -> u64 {
        self.rounds
            .iter()
            .filter(|m| m.loss_reported.is_none())
            .map(|m| m.lost)
            .sum()
    }

    /// What the system reported of its loss, each distinct text once.
    pub fn loss_reports(&self) -> Vec<&str> {
        let mut reports: Vec<&str> = Vec::new();
        for m in &self.rounds {
            if let Some(r) = m.loss_reported.as_deref() {
                if !reports.contains(&r) {
                    reports.push(r);
                }
            }
        }
        reports
    }
}

/// The unit a rate is shown in: (divisor, suffix).
fn rate_unit(rate: f64) -> (f64, &'static str) {
    if rate >= 1e6 {
        (1e6, " M")
    } else if rate >= 1e5 {
        (1e3, " K")
    } else {
        (1.0, "")
    }
}

/// `rate` in the unit of `unit`, without the suffix.
fn rate_in(rate: f64, unit: (f64, &'static str)) -> String {
    let scaled = rate / unit.0;
    match unit.1 {
        " M" => format!("{scaled:.2}"),
        " K" => format!("{scaled:.0}"),
        _ if scaled >= 100.0 => crate::report::group_thousands(scaled.round() as u64),
        _ => format!("{scaled:.1}"),
    }
}

/// A rate for a table cell: `2.19 M`, `612 K`, `3,852` (MB/s and
/// requests stay whole numbers below 100,000).
pub fn short_rate(rate: f64) -> String {
    let unit = rate_unit(rate);
    format!("{}{}", rate_in(rate, unit), unit.1)
}

/// A median with the range of the rounds, in the median's unit:
/// `2.19 M (2.05–2.30)`.
pub fn rate_with_range(median: f64, min: f64, max: f64) -> String {
    let unit = rate_unit(median);
    format!(
        "{}{} ({}–{})",
        rate_in(median, unit),
        unit.1,
        rate_in(min, unit),
        rate_in(max, unit)
    )
}

impl fmt::Display for Summary {
    /// The median with the range of the rounds beside it; for latency the
    /// median p50 / p99 / p99.9 with the ranges of p50 and p99 (and the
    /// offered rate of a fixed-rate case).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = self.failure() {
            return write!(f, "failed ({why})");
        }
        if let Some(why) = self.skipped() {
            return write!(f, "{why}");
        }
        if let Some(l) = self.median_latency() {
            write!(f, "{:.0} / {:.0} / {:.0}", l.p50_us, l.p99_us, l.p999_us)?;
            if let (Some((a, b)), Some((c, d))) = (self.range(), self.p99_range()) {
                write!(f, " (p50 {a:.0}–{b:.0}, p99 {c:.0}–{d:.0})")?;
            }
            if let Some(rate) = l.rate {
                write!(f, " at {}/s", short_rate(rate))?;
            }
            return Ok(());
        }
        match (self.median(), self.range()) {
            (Some(m), Some((a, b))) => {
                write!(f, "{}", rate_with_range(m, a, b))
            }
            _ => write!(f, "-"),
        }
    }
}

/// The cases of a run: `quick` keeps every kind of case but fewer bulk
/// sizes. The TLS rows come last, each compared with its plain row
/// ([`Case::plain`]) of the same run.
pub fn cases(quick: bool) -> Vec<Case> {
    let send = |body, peer| Case::SendPipelined {
        body,
        outstanding: 256,
        peer,
    };
    let mut cases = vec![
        Case::Notify { body: 128 },
        Case::Notify { body: 1024 },
        Case::FixedRate { body: 128, rate: 0 },
        send(128, SendPeer::Publish),
        send(128, SendPeer::JetStream),
        Case::RecoverableSend {
            body: 128,
            outstanding: 256,
        },
        Case::RecoverableLatency { body: 128 },
        send(1024, SendPeer::Publish),
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
        Case::RequestLatency { body: 128 },
        Case::RequestRate {
            body: 128,
            outstanding: 32,
        },
        Case::Session { body: 128 },
    ];
    let bulk: &[usize] = if quick {
        &[1 << 20, 16 << 20]
    } else {
        &[1 << 20, 16 << 20, 64 << 20]
    };
    for &body in bulk {
        cases.push(Case::Bulk {
            body,
            path: BulkPath::Lazy,
        });
        cases.push(Case::Bulk {
            body,
            path: BulkPath::Server,
        });
    }
    cases.push(Case::NotifyTls { body: 128 });
    cases.push(Case::LazyTls { body: 16 << 20 });
    cases.push(Case::Stream { body: 64 << 20 });
    cases.push(Case::HeadOfLine { body: 128 });
    cases.push(Case::Priority { body: 128 });
    cases
}

/// Body sizes of the path sweep (1 KiB to 16 MiB).
pub fn sweep_sizes(quick: bool) -> Vec<usize> {
    let step = if quick { 4 } else { 2 };
    let mut sizes = Vec::new();
    let mut s = 1usize << 10;
    while s <= 16 << 20 {
        sizes.push(s);
        s *= step;
    }
    if *sizes.last().unwrap_or(&0) != 16 << 20 {
        sizes.push(16 << 20);
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(p50_us: f64) -> Latency {
        Latency {
            p50_us,
            p99_us: p50_us * 2.0,
            p999_us: p50_us * 3.0,
            rate: None,
        }
    }

    fn rounds(outcomes: Vec<Outcome>) -> Summary {
        Summary {
            rounds: outcomes.into_iter().map(Measurement::from).collect(),
        }
    }

    #[test]
    fn the_median_round_counts_and_a_failed_one_fails() {
        let rates = rounds([5.0, 1.0, 3.0, 9.0, 4.0].map(Outcome::Rate).to_vec());
        assert_eq!(rates.median(), Some(4.0));
        assert_eq!(rates.range(), Some((1.0, 9.0)));
        assert_eq!(rates.to_string(), "4.0 (1.0–9.0)");
        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), Some(2.5));
        assert_eq!(median(&[]), None);

        let failed = rounds(vec![Outcome::Rate(5.0), Outcome::Failed("lost".into())]);
        assert_eq!(failed.median(), None);
        assert_eq!(failed.failure(), Some("lost"));
        assert_eq!(failed.to_string(), "failed (lost)");

        let skipped = rounds(vec![Outcome::Skipped("n/a".into())]);
        assert_eq!(skipped.skipped(), Some("n/a"));
        assert_eq!(skipped.median(), None);
        assert_eq!(skipped.to_string(), "n/a");

        let lat = rounds(
            [40.0, 50.0, 45.0]
                .map(|p| Outcome::Latency(latency(p)))
                .to_vec(),
        );
        let m = lat.median_latency().expect("latency");
        assert_eq!((m.p50_us, m.p99_us, m.p999_us), (45.0, 90.0, 135.0));
        assert_eq!(lat.to_string(), "45 / 90 / 135 (p50 40–50, p99 80–100)");
        assert_eq!(Case::Notify { body: 128 }.rounds(), ROUNDS);
    }

    #[test]
    fn loss_is_summed_and_unexplained_loss_kept_apart() {
        let mut s = Summary::default();
        s.push(Measurement::from(Outcome::Rate(1.0)).with_loss(10, Some("slow consumer".into())));
        s.push(Measurement::from(Outcome::Rate(1.0)).with_loss(3, None));
        s.push(Measurement::from(Outcome::Rate(1.0)).with_loss(0, Some("ignored".into())));
        assert_eq!(s.lost(), 13);
        assert_eq!(s.unexplained_loss(), 3);
        assert_eq!(s.loss_reports(), ["slow consumer"]);
    }

    #[test]
    fn patterns_are_shared_where_the_peer_does_the_same() {
        let send = |peer| Case::SendPipelined {
            body: 128,
            outstanding: 256,
            peer,
        };
        let all = Case::FanOutAll {
            receivers: 8,
            body: 128,
        };
        let group = Case::FanOutGroup {
            receivers: 8,
            body: 128,
        };
        let lazy = Case::Bulk {
            body: 1 << 20,
            path: BulkPath::Lazy,
        };
        let server = Case::Bulk {
            body: 1 << 20,
            path: BulkPath::Server,
        };
        let session = Case::Session { body: 128 };
        let notify = Case::Notify { body: 128 };
        // NATS: a publish, a notify; All and Group alike; no direct path.
        for nats in [System::NatsGo, System::AsyncNats] {
            assert_eq!(nats.pattern(send(SendPeer::Publish)), Some(notify));
            assert_eq!(nats.pattern(group), Some(all));
            assert_eq!(nats.pattern(session), None);
            assert_eq!(nats.pattern(lazy), None);
            assert_eq!(nats.pattern(server), Some(server));
        }
        assert_eq!(
            System::NatsGo.pattern(send(SendPeer::JetStream)),
            Some(send(SendPeer::JetStream))
        );
        assert_eq!(System::AsyncNats.pattern(send(SendPeer::JetStream)), None);
        // Ours and the floors run one send whatever it is compared with.
        for system in [System::Ours, System::Relay, System::Raw] {
            assert_eq!(
                system.pattern(send(SendPeer::JetStream)),
                Some(send(SendPeer::Publish))
            );
        }
        assert_eq!(System::Ours.pattern(group), Some(group));
        assert_eq!(System::Relay.pattern(session), None);
        assert_eq!(System::Relay.pattern(lazy), None);
        assert_eq!(System::Raw.pattern(session), Some(notify));
        assert_eq!(System::Raw.pattern(server), Some(lazy));
        let fixed = Case::FixedRate { body: 128, rate: 0 };
        assert_eq!(System::Raw.pattern(fixed), None);
        assert_eq!(System::Relay.pattern(fixed), Some(fixed));
        assert!(!session.through_server() && !lazy.through_server());
        assert!(server.through_server() && notify.through_server());
        // Over TLS: ours, and nats.go for notify; nobody else.
        let notify_tls = Case::NotifyTls { body: 128 };
        let lazy_tls = Case::LazyTls { body: 1 << 20 };
        assert_eq!(System::Ours.pattern(notify_tls), Some(notify_tls));
        assert_eq!(System::Ours.pattern(lazy_tls), Some(lazy_tls));
        assert_eq!(System::NatsGo.pattern(notify_tls), Some(notify_tls));
        assert_eq!(System::NatsGo.pattern(lazy_tls), None);
        for system in [System::AsyncNats, System::Relay, System::Raw] {
            assert_eq!(system.pattern(notify_tls), None);
            assert_eq!(system.pattern(lazy_tls), None);
        }
        assert_eq!(notify_tls.plain(), notify);
        assert_eq!(lazy_tls.plain(), lazy);
        assert_eq!(notify.plain(), notify);
        assert!(notify_tls.tls() && lazy_tls.tls() && !notify.tls() && !lazy.tls());
        assert!(notify_tls.through_server() && !lazy_tls.through_server());
        // Recoverable: nats.go's JetStream (the plain row's window shared),
        // no async-nats, the floors of the plain send and of request/reply.
        let recoverable = Case::RecoverableSend {
            body: 128,
            outstanding: 256,
        };
        let one = Case::RecoverableLatency { body: 128 };
        assert_eq!(System::Ours.pattern(recoverable), Some(recoverable));
        assert_eq!(System::Ours.pattern(one), Some(one));
        assert_eq!(
            System::NatsGo.pattern(recoverable),
            System::NatsGo.pattern(send(SendPeer::JetStream))
        );
        assert_eq!(System::NatsGo.pattern(one), Some(one));
        assert_eq!(System::AsyncNats.pattern(recoverable), None);
        assert_eq!(System::AsyncNats.pattern(one), None);
        let request = Case::RequestLatency { body: 128 };
        for system in [System::Relay, System::Raw] {
            assert_eq!(
                system.pattern(recoverable),
                system.pattern(send(SendPeer::Publish))
            );
            assert_eq!(system.pattern(one), system.pattern(request));
        }
        assert!(recoverable.through_server() && one.through_server());
        assert!(!recoverable.is_latency() && one.is_latency());
        assert_eq!((recoverable.unit(), one.unit()), ("msgs/s", request.unit()));
    }

    #[test]
    fn percentiles_and_names() {
        assert_eq!(size(128), "128 B");
        assert_eq!(size(1024), "1 KiB");
        assert_eq!(size(16 << 20), "16 MiB");
        assert_eq!(short_rate(2_187_261.0), "2.19 M");
        assert_eq!(short_rate(612_345.0), "612 K");
        assert_eq!(short_rate(3_852.4), "3,852");
        assert_eq!(
            rate_with_range(2_187_261.0, 1_950_000.0, 2_301_000.0),
            "2.19 M (1.95–2.30)"
        );
        assert_eq!(
            rate_with_range(3_852.0, 3_700.0, 4_012.0),
            "3,852 (3,700–4,012)"
        );
        assert_eq!(sweep_sizes(false).first(), Some(&1024));
        assert_eq!(sweep_sizes(true).last(), Some(&(16 << 20)));
        assert!(cases(true).len() < cases(false).len());
        let fixed = Case::FixedRate { body: 128, rate: 0 }.at_rate(1000);
        assert_eq!(
            fixed,
            Case::FixedRate {
                body: 128,
                rate: 1000
            }
        );
        assert_eq!(fixed.to_string(), "notify 128 B at 50% of max rate");
        assert_eq!(
            Case::NotifyTls { body: 128 }.to_string(),
            "notify 128 B over TLS"
        );
        let lazy_tls = Case::LazyTls { body: 16 << 20 };
        assert_eq!(lazy_tls.to_string(), "16 MiB over a lazy channel over TLS");
        assert_eq!((lazy_tls.unit(), lazy_tls.rounds()), ("MB/s", BULK_ROUNDS));
        let quick = cases(true);
        assert_eq!(quick.iter().filter(|c| c.tls()).count(), 2);
        assert!(quick.contains(&lazy_tls.plain()));
        let recoverable = Case::RecoverableSend {
            body: 128,
            outstanding: 256,
        };
        let one = Case::RecoverableLatency { body: 128 };
        assert_eq!(
            recoverable.to_string(),
            "recoverable send 128 B, 256 in flight vs JetStream publish-with-ack"
        );
        assert_eq!(one.to_string(), "recoverable send 128 B, 1 outstanding");
        assert!(quick.contains(&recoverable) && quick.contains(&one));
        // Case names are unique: `=name` selects exactly one.
        let names: std::collections::HashSet<String> =
            cases(false).iter().map(Case::to_string).collect();
        assert_eq!(names.len(), cases(false).len());
    }
}
