//! Counters of what passed through the message server, readable while it
//! runs (tests and the monitor read them to see which path a message took).

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct Counters {
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) messages: AtomicU64,
    pub(crate) message_bytes: AtomicU64,
    pub(crate) deliveries: AtomicU64,
    pub(crate) delivery_bytes: AtomicU64,
    pub(crate) route_failures: AtomicU64,
    pub(crate) overloaded: AtomicU64,
    pub(crate) slow_consumers: AtomicU64,
    pub(crate) failed_nodes: AtomicU64,
    pub(crate) stale_frames: AtomicU64,
    pub(crate) heartbeats_refused: AtomicU64,
    pub(crate) expired: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CountersSnapshot {
    /// Connections that completed the handshake.
    pub connections_accepted: u64,
    /// Connections refused at the handshake.
    pub connections_refused: u64,
    /// Connections closed for a protocol violation or a bad frame.
    pub protocol_errors: u64,
    /// Message frames received from senders.
    pub messages: u64,
    /// Body bytes of those messages.
    pub message_bytes: u64,
    /// Message frames forwarded to receivers (a broadcast counts once per
    /// receiver).
    pub deliveries: u64,
    /// Body bytes forwarded to receivers.
    pub delivery_bytes: u64,
    /// Messages, or receivers of a fan-out, that could not be routed.
    pub route_failures: u64,
    /// Of those, how many because the receiver's queue was full.
    pub overloaded: u64,
    /// Connections cut off for not reading their control traffic.
    pub slow_consumers: u64,
    /// Nodes declared failed (no heartbeat within the failure timeout).
    pub failed_nodes: u64,
    /// Frames refused because they came from an earlier incarnation.
    pub stale_frames: u64,
    /// Heartbeat datagrams ignored: malformed, from no registered node,
    /// not signed with its session's secret, replayed, or from another
    /// address than the node's.
    pub heartbeats_refused: u64,
    /// Messages the server found expired (their time to live ran out) and
    /// did not forward.
    pub expired: u64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            connections_accepted: r(&self.connections_accepted),
            connections_refused: r(&self.connections_refused),
            protocol_errors: r(&self.protocol_errors),
            messages: r(&self.messages),
            message_bytes: r(&self.message_bytes),
            deliveries: r(&self.deliveries),
            delivery_bytes: r(&self.delivery_bytes),
            route_failures: r(&self.route_failures),
            overloaded: r(&self.overloaded),
            slow_consumers: r(&self.slow_consumers),
            failed_nodes: r(&self.failed_nodes),
            stale_frames: r(&self.stale_frames),
            heartbeats_refused: r(&self.heartbeats_refused),
            expired: r(&self.expired),
        }
    }
}

/// What one node sent through the server, counted by its connection's
/// read task alone, for the monitor. Each count is a plain load and store
/// (no read-modify-write), on a cache line no other task writes.
#[derive(Debug, Default)]
pub(crate) struct NodeCounters {
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
}

impl NodeCounters {
    /// Counts a message frame of `bytes` read from the node. Only the
    /// node's read task calls this (a second writer could lose counts).
    pub(crate) fn add_in(&self, bytes: usize) {
        let add = |c: &AtomicU64, n: u64| {
            c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed)
        };
        add(&self.messages_in, 1);
        add(&self.bytes_in, bytes as u64);
    }

    /// Message frames read from the node so far.
    pub(crate) fn messages_in(&self) -> u64 {
        self.messages_in.load(Ordering::Relaxed)
    }

    /// Their bytes (header and body).
    pub(crate) fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }
}
