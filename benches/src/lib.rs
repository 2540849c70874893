//! Shared pieces of the clustercomm benchmarks: the suite's cases and
//! systems, the peers every case is compared against in the same run
//! (nats-server through NATS's own Go client and through async-nats, raw
//! TCP through a relay process, raw TCP direct), latency histograms and
//! fixed-rate pacing, bounded waits, and the result tables.
//!
//! The benchmarks themselves live in `benches/`: the suite
//! (`cargo bench -p clustercomm-benches --bench suite`, `-- --quick` for
//! short rounds) and the older, narrower `--bench p2p`, `--bench bulk`
//! and `--bench processors` (a thin wrapper around [`processors`]), and
//! `--bench scale` ([`scale`]).
//! Numbers are only meaningful as ratios against the peers measured in the
//! same run, at nearly the same moment.
//!
//! # Layout
//!
//! - [`options`]: command-line options (`--quick`, `--rounds`, filters)
//!   and phase durations.
//! - [`latency`]: HdrHistogram percentiles, due-time stamps, and the
//!   fixed-rate pacer that measures latency without coordinated omission.
//! - [`raw_tcp`]: the raw-TCP peers: a one-way frame sink and a pipelined
//!   ack loop over loopback.
//! - [`wait`]: counters and bounded waits on them.
//! - [`report`]: rates and the markdown result table.
//! - [`transfer`]: bulk phases (how long, how many bodies) and what they
//!   moved.
//! - [`bulk_tcp`]: the raw-TCP bulk-copy peer: length-prefixed bodies, a
//!   1-byte ack each.
//! - [`bulk_report`]: the bulk benchmark's table (MB/s per path, ratios).
//! - [`child`]: the suite's helper processes (the message server, the
//!   relay): started, their address read, stopped, killed on drop.
//! - [`memory`]: peak and current resident memory from `/proc/self/status`.
//! - [`plot`]: the sweep picture (PNG).
//! - [`suite`]: the suite's cases and outcomes, shared by every system.
//! - [`nats_server`]: nats-server for the NATS peers: install, start on a
//!   loopback port (core or JetStream), kill and clean up on drop.
//! - [`nats_go`]: the reference NATS peer: a small Go program on NATS's own
//!   client (nats.go) runs every case against nats-server.
//! - [`nats`]: the async-nats peer: every case through the async-nats
//!   client, a second NATS column.
//! - [`raw_cases`]: raw loopback TCP as the floor of every suite case.
//! - [`relay_cases`]: raw TCP through a relay process (`bench-relay`) as
//!   the floor of every suite case that goes through a server.
//! - [`ours`]: clustercomm's side of the suite: every case against a fresh
//!   message-server process, and the lazy-versus-server path sweep.
//! - [`processors`]: the processors case (4 processors against 1 on a
//!   20 µs handler, in interleaved rounds), for the suite and the
//!   standalone `--bench processors`.
//! - [`scale`]: the scale benchmark (`--bench scale`): many nodes in
//!   `bench-nodes` processes on one server; convergence, membership bytes
//!   per join, the server's memory and CPU, broadcast, failure detection
//!   and re-registration after a restart.
//! - [`tls`]: what the TLS cases run with: certificates from
//!   clustercomm's own generator in a temporary directory removed on
//!   drop, and clustercomm's cluster file with `[tls]`.

pub mod bulk_report;
pub mod bulk_tcp;
pub mod child;
pub mod latency;
pub mod memory;
pub mod nats;
pub mod nats_go;
pub mod nats_server;
pub mod options;
pub mod ours;
pub mod plot;
pub mod processors;
pub mod raw_cases;
pub mod raw_tcp;
pub mod relay_cases;
pub mod report;
pub mod scale;
pub mod suite;
pub mod tls;
pub mod transfer;
pub mod wait;

pub use options::Options;
pub use report::{Row, Table};
pub use wait::{wait_for_count, wait_until, Counter};
