//! Shared pieces of the clustercomm benchmarks: run options, the raw-TCP
//! peers every case is compared against in the same run, bounded waits, and
//! the result table.
//!
//! The benchmarks themselves live in `benches/` (run them with
//! `cargo bench -p clustercomm-benches --bench p2p`, add `-- --quick` for a
//! short run). Numbers are only meaningful as ratios against the peers
//! measured in the same process, on the same runtime, at the same moment.
//!
//! # Layout
//!
//! - [`options`]: command-line options (`--quick`) and phase durations.
//! - [`raw_tcp`]: the raw-TCP peers: a one-way frame sink and a pipelined
//!   ack loop over loopback.
//! - [`wait`]: counters and bounded waits on them.
//! - [`report`]: rates and the markdown result table.

pub mod options;
pub mod raw_tcp;
pub mod report;
pub mod wait;

pub use options::Options;
pub use report::{Row, Table};
pub use wait::{wait_for_count, wait_until, Counter};
