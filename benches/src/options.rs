//! Command-line options and the durations of each phase.
//!
//! `cargo bench` passes `--bench` (and possibly filters) to a
//! `harness = false` target; anything not recognised here is ignored.

use std::time::Duration;

/// Warm-up per case in a full run.
pub const FULL_WARMUP: Duration = Duration::from_millis(500);
/// Measured interval per case in a full run.
pub const FULL_MEASURE: Duration = Duration::from_secs(3);
/// Warm-up per case with `--quick`.
pub const QUICK_WARMUP: Duration = Duration::from_millis(200);
/// Measured interval per case with `--quick`.
pub const QUICK_MEASURE: Duration = Duration::from_secs(1);
/// Upper bound on any single wait (for receivers to catch up, for tasks to
/// finish); past it the case fails instead of hanging.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(20);

/// How long each phase of a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Whether `--quick` was given.
    pub quick: bool,
    /// Traffic sent before measuring, to fill caches, buffers and windows.
    pub warmup: Duration,
    /// The measured interval.
    pub measure: Duration,
}

impl Options {
    /// Options from the process arguments.
    pub fn from_env() -> Options {
        Options::from_args(std::env::args().skip(1))
    }

    /// Options from `args` (without the program name): `--quick` selects
    /// the short phases; every other argument is ignored.
    pub fn from_args<I, S>(args: I) -> Options
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let quick = args.into_iter().any(|a| a.as_ref() == "--quick");
        if quick {
            Options {
                quick,
                warmup: QUICK_WARMUP,
                measure: QUICK_MEASURE,
            }
        } else {
            Options {
                quick,
                warmup: FULL_WARMUP,
                measure: FULL_MEASURE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_is_recognised_and_the_rest_ignored() {
        let cases: &[(&[&str], bool)] = &[
            (&[], false),
            (&["--bench"], false),
            (&["--bench", "--quick"], true),
            (&["--quick", "p2p"], true),
            (&["--quickly"], false),
        ];
        for (args, quick) in cases {
            let o = Options::from_args(args.iter());
            assert_eq!(o.quick, *quick, "{args:?}");
            let measure = if *quick { QUICK_MEASURE } else { FULL_MEASURE };
            assert_eq!(o.measure, measure, "{args:?}");
        }
    }
}
