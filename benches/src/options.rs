//! Command-line options and the durations of each phase.
//!
//! `cargo bench` passes `--bench` to a `harness = false` target; flags not
//! recognised here are ignored. Arguments that are not flags are filters,
//! as with libtest: only cases whose name contains one of them run (handy
//! for profiling one case).

use std::time::Duration;

/// Warm-up of each round of a case in a full run.
pub const FULL_WARMUP: Duration = Duration::from_millis(300);
/// Measured interval of each round of a case in a full run.
pub const FULL_MEASURE: Duration = Duration::from_millis(600);
/// Warm-up of each round with `--quick`.
pub const QUICK_WARMUP: Duration = Duration::from_millis(150);
/// Measured interval of each round with `--quick`.
pub const QUICK_MEASURE: Duration = Duration::from_millis(250);
/// Upper bound on any single wait (for receivers to catch up, for tasks to
/// finish); past it the case fails instead of hanging.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(20);

/// How long each phase of a case runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Whether `--quick` was given.
    pub quick: bool,
    /// Traffic sent before measuring, to fill caches, buffers and windows
    /// (each round).
    pub warmup: Duration,
    /// The measured interval of one round.
    pub measure: Duration,
    /// `--rounds N`: rounds per case instead of each case's own
    /// ([`crate::suite::ROUNDS`], [`crate::suite::BULK_ROUNDS`],
    /// [`crate::processors::ROUNDS`] or with `--quick`
    /// [`crate::processors::QUICK_ROUNDS`]).
    pub rounds: Option<u32>,
    /// Case-name filters; empty runs every case.
    pub filters: Vec<String>,
    /// `--ours-only`: skip the peers (for profiling clustercomm alone).
    pub ours_only: bool,
    /// `--help` or `-h`: print [`USAGE`] and run nothing.
    pub help: bool,
}

/// What the suite's command line takes.
pub const USAGE: &str = "\
usage: cargo bench -p clustercomm-benches --bench suite -- [--quick] [--ours-only] [--rounds N] [CASE...]

  --quick       short rounds: a few minutes in all (a full run takes about 15)
  --ours-only   skip nats-server, the relay and raw TCP (for profiling
                clustercomm alone, or an A/B of two builds)
  --rounds N    N rounds per case instead of 5 (3 for bulk, and for
                processors with --quick); the table shows the median
                round and the range
  CASE          run only the cases whose name contains one of these
                (say \"notify 128\" \"fan-out\" \"over TLS\" processors), or is exactly one that
                starts with = (\"=notify 128 B\"); a partial run does not
                replace the results in benches/results/
  -h, --help    print this and run nothing

Other flags (cargo passes --bench) are ignored.";

impl Options {
    /// Options from the process arguments.
    pub fn from_env() -> Options {
        Options::from_args(std::env::args().skip(1))
    }

    /// Options from `args` (without the program name): `--quick` selects
    /// the short phases, `--ours-only` skips the peers, `--rounds N` sets
    /// the rounds (a missing or zero `N` asks for the usage), other flags
    /// are ignored, the rest are filters.
    pub fn from_args<I, S>(args: I) -> Options
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut quick = false;
        let mut ours_only = false;
        let mut help = false;
        let mut rounds = None;
        let mut filters = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_ref() {
                "--quick" => quick = true,
                "--rounds" => {
                    rounds = args
                        .next()
                        .and_then(|n| n.as_ref().parse::<u32>().ok())
                        .filter(|&n| n > 0);
                    if rounds.is_none() {
                        help = true;
                    }
                }
                "--ours-only" => ours_only = true,
                "--help" | "-h" => help = true,
                flag if flag.starts_with('-') => {}
                filter => filters.push(filter.to_owned()),
            }
        }
        let (warmup, measure) = if quick {
            (QUICK_WARMUP, QUICK_MEASURE)
        } else {
            (FULL_WARMUP, FULL_MEASURE)
        };
        Options {
            quick,
            warmup,
            measure,
            rounds,
            filters,
            ours_only,
            help,
        }
    }

    /// Whether the case named `case` should run: every case without
    /// filters, else a case whose name contains a filter, or is exactly a
    /// filter that starts with `=` (without it).
    pub fn selects(&self, case: &str) -> bool {
        self.filters.is_empty()
            || self.filters.iter().any(|f| match f.strip_prefix('=') {
                Some(exact) => case == exact,
                None => case.contains(f.as_str()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_is_recognised_other_flags_ignored() {
        let cases: &[(&[&str], bool)] = &[
            (&[], false),
            (&["--bench"], false),
            (&["--bench", "--quick"], true),
            (&["--quick", "--bench"], true),
            (&["--quickly"], false),
        ];
        for (args, quick) in cases {
            let o = Options::from_args(args.iter());
            assert_eq!(o.quick, *quick, "{args:?}");
            let measure = if *quick { QUICK_MEASURE } else { FULL_MEASURE };
            assert_eq!(o.measure, measure, "{args:?}");
            assert!(o.filters.is_empty(), "{args:?}");
        }
    }

    #[test]
    fn filters_select_cases_by_substring() {
        let all = Options::from_args(["--bench"]);
        assert!(all.selects("notify 128 B"));
        assert!(Options::from_args(["--help"]).help);
        assert!(Options::from_args(["--bench", "-h"]).help);
        assert!(!Options::from_args(["--bench", "--quick"]).help);
        let some = Options::from_args(["--quick", "notify", "--bench"]);
        assert_eq!(some.filters, ["notify"]);
        assert!(some.selects("notify 128 B"));
        assert!(!some.selects("send 128 B, pipelined"));
        let exact = Options::from_args(["=notify 128 B"]);
        assert!(exact.selects("notify 128 B"));
        assert!(!exact.selects("notify 128 B at 50% of max rate"));
        let rounds = Options::from_args(["--rounds", "7", "notify"]);
        assert_eq!((rounds.rounds, rounds.help), (Some(7), false));
        assert_eq!(rounds.filters, ["notify"]);
        assert!(Options::from_args(["--rounds", "0"]).help);
        assert!(Options::from_args(["--rounds"]).help);
    }
}
