//! Per-path counters of a node: which path its messages took.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Receivers that missed a message nobody waited on.
    pub(crate) late_failures: AtomicU64,
    pub(crate) server_messages: AtomicU64,
    pub(crate) server_bytes: AtomicU64,
    pub(crate) lazy_messages: AtomicU64,
    pub(crate) lazy_bytes: AtomicU64,
    pub(crate) session_messages: AtomicU64,
    pub(crate) session_bytes: AtomicU64,
    pub(crate) lazy_opened: AtomicU64,
    pub(crate) lazy_closed: AtomicU64,
    pub(crate) lazy_failed: AtomicU64,
    pub(crate) session_opened: AtomicU64,
    pub(crate) session_failed: AtomicU64,
    pub(crate) received_server: AtomicU64,
    pub(crate) received_direct: AtomicU64,
    pub(crate) refused_failed: AtomicU64,
    pub(crate) refused_not_permitted: AtomicU64,
    pub(crate) channels_refused: AtomicU64,
    pub(crate) dead_letters_filed: AtomicU64,
    pub(crate) dead_letters_unfiled: AtomicU64,
    pub(crate) expired: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> PathCounters {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PathCounters {
            server_messages: r(&self.server_messages),
            server_bytes: r(&self.server_bytes),
            lazy_messages: r(&self.lazy_messages),
            lazy_bytes: r(&self.lazy_bytes),
            session_messages: r(&self.session_messages),
            session_bytes: r(&self.session_bytes),
            lazy_opened: r(&self.lazy_opened),
            lazy_closed: r(&self.lazy_closed),
            lazy_failed: r(&self.lazy_failed),
            session_opened: r(&self.session_opened),
            session_failed: r(&self.session_failed),
            received_server: r(&self.received_server),
            received_direct: r(&self.received_direct),
            refused_failed: r(&self.refused_failed),
            refused_not_permitted: r(&self.refused_not_permitted),
            channels_refused: r(&self.channels_refused),
            dead_letters_filed: r(&self.dead_letters_filed),
            dead_letters_unfiled: r(&self.dead_letters_unfiled),
            expired: r(&self.expired),
        }
    }
}

/// What a node sent on each path, and what became of its direct channels.
/// Bytes count bodies only; a fan-out counts once per receiver it was sent
/// to directly, once in all through the message server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathCounters {
    /// Messages sent through the message server.
    pub server_messages: u64,
    /// Their body bytes.
    pub server_bytes: u64,
    /// Messages sent over lazy channels.
    pub lazy_messages: u64,
    /// Their body bytes.
    pub lazy_bytes: u64,
    /// One-way messages sent over session channels.
    pub session_messages: u64,
    /// Their body bytes.
    pub session_bytes: u64,
    /// Lazy channels opened.
    pub lazy_opened: u64,
    /// Lazy channels closed (idle, or broken).
    pub lazy_closed: u64,
    /// Lazy channels that could not be opened.
    pub lazy_failed: u64,
    /// Session channels opened.
    pub session_opened: u64,
    /// Session channels that could not be opened.
    pub session_failed: u64,
    /// Messages received through the message server.
    pub received_server: u64,
    /// Messages received over direct (lazy or session) channels.
    pub received_direct: u64,
    /// Messages refused because their sender's incarnation was declared
    /// failed.
    pub refused_failed: u64,
    /// Messages on direct channels refused because their sender may not
    /// send to their target (`permissions.send`).
    pub refused_not_permitted: u64,
    /// Inbound direct channels refused at once, over `node.max_channels`
    /// or `node.max_unauthenticated`.
    pub channels_refused: u64,
    /// Messages this node filed in the message server's dead-letter queue
    /// (see `Node::dead_letters`).
    pub dead_letters_filed: u64,
    /// Dead letters this node could not file (its link to the message
    /// server was full or down): counted here and logged.
    pub dead_letters_unfiled: u64,
    /// Messages this node found expired (in its queues or inboxes) and
    /// did not deliver.
    pub expired: u64,
}
