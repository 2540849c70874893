//! The process's memory use, from `/proc/self/status` (Linux).
//!
//! `VmHWM` is the peak resident set size since the process started, or
//! since it was last reset with [`reset_peak`] (writing `5` to
//! `/proc/self/clear_refs`, Linux 4.0 and later); `VmRSS` is the resident
//! set size now. On other systems both are unavailable and the benchmarks
//! say so instead of printing a number.

use std::fmt;

/// Resident memory of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now, in KiB.
    pub rss_kib: u64,
    /// `VmHWM`: peak resident, in KiB.
    pub hwm_kib: u64,
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VmHWM {} MiB, VmRSS {} MiB",
            self.hwm_kib / 1024,
            self.rss_kib / 1024
        )
    }
}

/// The memory use now, or `None` where `/proc/self/status` is missing or
/// lacks the fields.
pub fn current() -> Option<Memory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status(&status)
}

/// Resets `VmHWM` to the current `VmRSS`, so the next reading shows the
/// peak of what ran in between; `false` if the kernel does not allow it
/// (the peak then keeps counting from the process start).
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// What a case did to memory, from a reading taken just after
/// [`reset_peak`] (`start`, with `reset` saying whether the reset worked)
/// and one taken when the case ended (`end`).
pub fn describe_case(start: Option<Memory>, end: Option<Memory>, reset: bool) -> String {
    let (Some(start), Some(end)) = (start, end) else {
        return "/proc/self/status unavailable".to_owned();
    };
    let mib = |kib: u64| kib / 1024;
    if reset {
        format!(
            "VmRSS {} MiB at the start, VmHWM {} MiB during the case (+{} MiB), VmRSS {} MiB \
             after",
            mib(start.rss_kib),
            mib(end.hwm_kib),
            mib(end.hwm_kib.saturating_sub(start.rss_kib)),
            mib(end.rss_kib)
        )
    } else {
        format!(
            "VmRSS {} MiB at the start, VmHWM {} MiB (peak since the process started: the \
             peak could not be reset), VmRSS {} MiB after",
            mib(start.rss_kib),
            mib(end.hwm_kib),
            mib(end.rss_kib)
        )
    }
}

/// `VmRSS` and `VmHWM` from the text of a `/proc/<pid>/status` file.
pub fn parse_status(status: &str) -> Option<Memory> {
    let field = |name: &str| {
        status.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some(Memory {
        rss_kib: field("VmRSS")?,
        hwm_kib: field("VmHWM")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_parsed() {
        let status = "Name:\tbulk\nVmPeak:\t  900000 kB\nVmHWM:\t  204800 kB\n\
                      VmRSS:\t  102400 kB\nThreads:\t3\n";
        let m = parse_status(status).expect("fields present");
        assert_eq!(
            m,
            Memory {
                rss_kib: 102_400,
                hwm_kib: 204_800
            }
        );
        assert_eq!(m.to_string(), "VmHWM 200 MiB, VmRSS 100 MiB");
        assert_eq!(parse_status("Name:\tbulk\nVmRSS:\t1 kB\n"), None);
    }

    #[test]
    fn cases_are_described_against_their_start() {
        let start = Memory {
            rss_kib: 100 * 1024,
            hwm_kib: 300 * 1024,
        };
        let end = Memory {
            rss_kib: 110 * 1024,
            hwm_kib: 228 * 1024,
        };
        assert_eq!(
            describe_case(Some(start), Some(end), true),
            "VmRSS 100 MiB at the start, VmHWM 228 MiB during the case (+128 MiB), \
             VmRSS 110 MiB after"
        );
        assert!(describe_case(Some(start), Some(end), false).contains("could not be reset"));
        assert_eq!(
            describe_case(None, Some(end), true),
            "/proc/self/status unavailable"
        );
    }
}
