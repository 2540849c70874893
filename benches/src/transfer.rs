//! Bulk transfers: how long a phase runs, and what it moved.
//!
//! A bulk case sends bodies of one size for a [`Plan`]: at least
//! `min_bodies`, and more until `duration` has passed since the phase
//! started. The phase ends when the last body sent was acknowledged; its
//! [`Transfer`] says how many bodies and bytes that was and how long it
//! took, so that every column of the bulk table is computed the same way.

use std::time::Duration;

/// Bytes in a mebibyte, the unit of the body sizes.
pub const MIB: usize = 1024 * 1024;

/// Bytes in a megabyte, the unit of the rates (MB/s, as `dd` and `iperf`
/// print them).
pub const MB: f64 = 1_000_000.0;

/// How many bodies one phase sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Keep starting bodies until this much time has passed...
    pub duration: Duration,
    /// ...and at least this many.
    pub min_bodies: u64,
}

impl Plan {
    /// Whether another body should be started, `sent` bodies and `elapsed`
    /// into the phase.
    pub fn more(&self, sent: u64, elapsed: Duration) -> bool {
        sent < self.min_bodies || elapsed < self.duration
    }
}

/// What one measured phase moved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transfer {
    /// Bodies acknowledged.
    pub bodies: u64,
    /// Their bytes (bodies only, no framing).
    pub bytes: u64,
    /// From the first body started to the last acknowledgement.
    pub elapsed: Duration,
}

impl Transfer {
    /// `bodies` bodies of `body_len` bytes each in `elapsed`.
    pub fn new(bodies: u64, body_len: usize, elapsed: Duration) -> Transfer {
        Transfer {
            bodies,
            bytes: bodies * body_len as u64,
            elapsed,
        }
    }

    /// Acknowledged body bytes per second, in MB (10^6 bytes); zero for
    /// an empty interval.
    pub fn mb_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.bytes as f64 / MB / secs
        } else {
            0.0
        }
    }

    /// Mean time from one acknowledgement to the next.
    pub fn per_body(&self) -> Duration {
        if self.bodies == 0 {
            Duration::ZERO
        } else {
            self.elapsed.div_f64(self.bodies as f64)
        }
    }
}

/// `len` bytes as `64 MiB`, `512 KiB` or `100 B`.
pub fn size_label(len: usize) -> String {
    const KIB: usize = 1024;
    if len >= MIB && len.is_multiple_of(MIB) {
        format!("{} MiB", len / MIB)
    } else if len >= KIB && len.is_multiple_of(KIB) {
        format!("{} KiB", len / KIB)
    } else {
        format!("{len} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_run_for_the_duration_and_at_least_min_bodies() {
        let plan = Plan {
            duration: Duration::from_secs(1),
            min_bodies: 3,
        };
        let cases = [
            (0, 0, true),
            (2, 5_000, true),
            (3, 5_000, false),
            (3, 999, true),
            (1_000, 999, true),
            (1_000, 1_000, false),
        ];
        for (sent, ms, more) in cases {
            assert_eq!(
                plan.more(sent, Duration::from_millis(ms)),
                more,
                "{sent} sent, {ms} ms"
            );
        }
    }

    #[test]
    fn rates_are_in_megabytes_per_second() {
        let t = Transfer::new(4, 16 * MIB, Duration::from_millis(500));
        assert_eq!(t.bytes, 64 * MIB as u64);
        assert!((t.mb_per_second() - 134.217_728).abs() < 1e-9);
        assert_eq!(t.per_body(), Duration::from_millis(125));
        let empty = Transfer::new(0, MIB, Duration::ZERO);
        assert_eq!(empty.mb_per_second(), 0.0);
        assert_eq!(empty.per_body(), Duration::ZERO);
    }

    #[test]
    fn sizes_are_labelled_in_binary_units() {
        for (len, label) in [
            (MIB, "1 MiB"),
            (64 * MIB, "64 MiB"),
            (64 * 1024, "64 KiB"),
            (100, "100 B"),
            (MIB + 1, "1048577 B"),
        ] {
            assert_eq!(size_label(len), label);
        }
    }
}
