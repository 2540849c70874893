//! The benchmark suite's vocabulary: the cases every system runs with the
//! same pattern, and what a measurement yields.
//!
//! `clustercomm` ([`crate::ours`]), nats-server ([`crate::nats`]) and raw
//! loopback TCP ([`crate::raw_cases`]) each implement every [`Case`] they
//! can; the driver (`benches/suite.rs`) runs them side by side in one run
//! and prints the ratios.

use std::fmt;

/// Which path a bulk case forces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkPath {
    /// Over a lazy channel, node to node.
    Lazy,
    /// Forced through the message server (the peers' routed path).
    Server,
}

/// One benchmark case, run with the same pattern by every system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// Point to point, one-way (`notify`; NATS publish), messages/s
    /// received.
    Notify {
        /// Body size.
        body: usize,
    },
    /// Point to point, acknowledged `send` with `outstanding` in flight
    /// (NATS: publish, the peer the target is set against), messages/s
    /// acknowledged.
    SendPipelined {
        /// Body size.
        body: usize,
        /// Messages in flight.
        outstanding: usize,
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
    /// One-way over a dispatcher's session channel (NATS: publish),
    /// messages/s received.
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
}

impl Case {
    /// The unit of the case's result.
    pub fn unit(&self) -> &'static str {
        match self {
            Case::Notify { .. }
            | Case::SendPipelined { .. }
            | Case::AnyOf { .. }
            | Case::Session { .. } => "msgs/s",
            Case::FanOutAll { .. } | Case::FanOutGroup { .. } => "deliveries/s",
            Case::RequestLatency { .. } => "µs p50/p99/p99.9",
            Case::RequestRate { .. } => "requests/s",
            Case::Bulk { .. } => "MB/s",
        }
    }
}

/// A body size for humans: `128 B`, `1 KiB`, `16 MiB`.
pub fn size(len: usize) -> String {
    if len >= 1 << 20 && len % (1 << 20) == 0 {
        format!("{} MiB", len >> 20)
    } else if len >= 1 << 10 && len % (1 << 10) == 0 {
        format!("{} KiB", len >> 10)
    } else {
        format!("{len} B")
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Case::Notify { body } => write!(f, "notify {}", size(body)),
            Case::SendPipelined { body, outstanding } => {
                write!(f, "send {}, {outstanding} in flight", size(body))
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
        }
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

impl Latency {
    /// Percentiles of `samples` (microseconds); `None` if there are none.
    pub fn from_samples(mut samples: Vec<f64>) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[i.min(samples.len() - 1)]
        };
        Some(Latency {
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
        })
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

/// Rounds a small-message case runs per system, the systems taking turns,
/// each round measuring its share of the measured interval. The best
/// round of each system counts: a shared machine's neighbours only ever
/// slow a round down, and taking turns puts every system through the same
/// moments. Bulk cases run once (their rounds are their bodies).
pub const ROUNDS: u32 = 2;

impl Case {
    /// How many rounds this case runs per system (see [`ROUNDS`]).
    pub fn rounds(&self) -> u32 {
        match self {
            Case::Bulk { .. } => 1,
            _ => ROUNDS,
        }
    }
}

impl Outcome {
    /// The better of two rounds of one system: the higher rate, the lower
    /// p50 latency (with its other percentiles). A failed round fails the
    /// case: a failure is never hidden behind a good round.
    pub fn best(self, other: Outcome) -> Outcome {
        match (self, other) {
            (Outcome::Failed(why), _) | (_, Outcome::Failed(why)) => Outcome::Failed(why),
            (Outcome::Rate(a), Outcome::Rate(b)) => Outcome::Rate(a.max(b)),
            (Outcome::Latency(a), Outcome::Latency(b)) => {
                Outcome::Latency(if b.p50_us < a.p50_us { b } else { a })
            }
            (Outcome::Skipped(_), other) => other,
            (this, _) => this,
        }
    }

    /// The number compared across systems: the rate, or the p50 latency.
    pub fn value(&self) -> Option<f64> {
        match self {
            Outcome::Rate(r) => Some(*r),
            Outcome::Latency(l) => Some(l.p50_us),
            Outcome::Skipped(_) | Outcome::Failed(_) => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Rate(r) if *r >= 100.0 => {
                write!(f, "{}", crate::report::group_thousands(*r as u64))
            }
            Outcome::Rate(r) => write!(f, "{r:.1}"),
            Outcome::Latency(l) => {
                write!(f, "{:.0} / {:.0} / {:.0}", l.p50_us, l.p99_us, l.p999_us)
            }
            Outcome::Skipped(why) => write!(f, "skipped ({why})"),
            Outcome::Failed(why) => write!(f, "failed ({why})"),
        }
    }
}

/// The cases of a run: `quick` keeps every kind of case but fewer sizes.
pub fn cases(quick: bool) -> Vec<Case> {
    let mut cases = vec![
        Case::Notify { body: 128 },
        Case::Notify { body: 1024 },
        Case::SendPipelined {
            body: 128,
            outstanding: 256,
        },
        Case::SendPipelined {
            body: 1024,
            outstanding: 256,
        },
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

    #[test]
    fn the_best_round_counts_and_a_failed_one_fails() {
        let latency = |p50_us| Latency {
            p50_us,
            p99_us: p50_us * 2.0,
            p999_us: p50_us * 3.0,
        };
        let value = |o: Outcome| o.value();
        assert_eq!(
            value(Outcome::Rate(3.0).best(Outcome::Rate(5.0))),
            Some(5.0)
        );
        assert_eq!(
            value(Outcome::Rate(5.0).best(Outcome::Rate(3.0))),
            Some(5.0)
        );
        let lower = Outcome::Latency(latency(40.0)).best(Outcome::Latency(latency(50.0)));
        assert!(matches!(lower, Outcome::Latency(l) if l.p50_us == 40.0 && l.p99_us == 80.0));
        let failed = Outcome::Rate(5.0).best(Outcome::Failed("lost".into()));
        assert!(matches!(failed, Outcome::Failed(why) if why == "lost"));
        let failed = Outcome::Failed("first".into()).best(Outcome::Rate(5.0));
        assert!(matches!(failed, Outcome::Failed(why) if why == "first"));
        let first = Outcome::Skipped("not run".into()).best(Outcome::Rate(2.0));
        assert_eq!(value(first), Some(2.0));
        assert_eq!(Case::Notify { body: 128 }.rounds(), ROUNDS);
    }

    #[test]
    fn percentiles_and_names() {
        let l = Latency::from_samples((1..=1000).map(f64::from).collect()).expect("samples");
        assert_eq!((l.p50_us, l.p99_us, l.p999_us), (501.0, 990.0, 999.0));
        assert_eq!(size(128), "128 B");
        assert_eq!(size(1024), "1 KiB");
        assert_eq!(size(16 << 20), "16 MiB");
        assert_eq!(sweep_sizes(false).first(), Some(&1024));
        assert_eq!(sweep_sizes(true).last(), Some(&(16 << 20)));
        assert!(cases(true).len() < cases(false).len());
    }
}
