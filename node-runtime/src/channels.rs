//! The node's outgoing direct channels as data: each one's queue and the
//! state the cluster manager decides on ([`cluster_manager::channels`]),
//! and the pool that finds them by peer and kind. The tasks that open,
//! read and watch them are in `direct`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cluster_manager::channels::{ChannelKind, ChannelState, Openers};
use transports::protocol::NodeId;
use transports::OutQueue;

/// An open outgoing direct channel: its socket's queue, and its state
/// (who uses it, what waits on it, when it was last heard from), which
/// [`cluster_manager::channels`] decides on.
#[derive(Debug)]
pub(crate) struct DirectConn {
    pub(crate) peer: NodeId,
    pub(crate) kind: ChannelKind,
    pub(crate) queue: OutQueue,
    /// The body limit negotiated with the peer.
    pub(crate) max_message: u64,
    pub(crate) state: Mutex<ChannelState>,
}

/// A use of a channel: while it lives, the channel is not closed as idle.
pub(crate) struct Use {
    conn: Arc<DirectConn>,
}

impl Drop for Use {
    fn drop(&mut self) {
        self.conn.lock().end_use();
    }
}

impl DirectConn {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, ChannelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a use (sending message `seq`, if tracked); `None` if the
    /// channel is closing or closed, so the caller opens another.
    pub(crate) fn begin_use(self: &Arc<Self>, seq: Option<u64>) -> Option<Use> {
        if self.queue.is_closed() {
            return None;
        }
        let now = Instant::now();
        self.lock()
            .begin_use(now, seq)
            .then(|| Use { conn: self.clone() })
    }

    /// The message no longer waits on this channel (it settled).
    pub(crate) fn settled(&self, seq: u64) {
        self.lock().handle_settled(seq);
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.lock().is_closing()
    }
}

type Key = (NodeId, ChannelKind);

/// The node's outgoing direct channels.
#[derive(Debug, Default)]
pub(crate) struct DirectPool {
    open: Mutex<HashMap<Key, Arc<DirectConn>>>,
    /// How many channels `open` holds, kept up to date under its lock:
    /// every small message asks whether one is open, and the answer is
    /// usually no, so it is read without the lock.
    open_count: std::sync::atomic::AtomicUsize,
    /// One opener at a time per peer and kind (the cluster manager's
    /// rule), and the wake-up of those that wait for one.
    openers: Mutex<Openers>,
    opened: tokio::sync::Notify,
    /// Which refusals of inbound channels are logged.
    pub(crate) refusals: transports::handshake::RefusalLog,
}

impl DirectPool {
    fn open_map(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<DirectConn>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many channels this node opened are open now.
    pub(crate) fn open_count(&self) -> usize {
        self.open_count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The open channel to `peer`, if any.
    pub(crate) fn get(&self, peer: &NodeId, kind: ChannelKind) -> Option<Arc<DirectConn>> {
        if self.open_count.load(std::sync::atomic::Ordering::Acquire) == 0 {
            // The usual case for small messages: no lock, no key to build.
            return None;
        }
        self.open_map()
            .get(&(peer.clone(), kind))
            .filter(|c| !c.queue.is_closed() && !c.is_closing())
            .cloned()
    }

    /// Whether the caller opens the channel of `kind` to `peer` (and must
    /// call [`DirectPool::open_done`] when done, opened or not) or waits for
    /// the opener at work ([`DirectPool::opener_done`] wakes it).
    pub(crate) fn begin_open(&self, peer: &NodeId, kind: ChannelKind) -> bool {
        self.openers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handle_needed(peer, kind)
    }

    /// The opener of `kind` to `peer` is done: those waiting look again.
    pub(crate) fn open_done(&self, peer: &NodeId, kind: ChannelKind) {
        self.openers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handle_done(peer, kind);
        self.opened.notify_waiters();
    }

    /// Resolves after the next opener is done.
    pub(crate) fn opener_done(&self) -> tokio::sync::futures::Notified<'_> {
        self.opened.notified()
    }

    pub(crate) fn remove(&self, conn: &Arc<DirectConn>) {
        let mut open = self.open_map();
        let key = (conn.peer.clone(), conn.kind);
        if open.get(&key).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            open.remove(&key);
        }
        self.counted(&open);
    }

    /// Publishes how many channels `open` (locked) holds.
    pub(crate) fn counted(&self, open: &HashMap<Key, Arc<DirectConn>>) {
        self.open_count
            .store(open.len(), std::sync::atomic::Ordering::Release);
    }

    /// Adds an opened channel.
    pub(crate) fn insert(&self, conn: Arc<DirectConn>) {
        let mut open = self.open_map();
        open.insert((conn.peer.clone(), conn.kind), conn);
        self.counted(&open);
    }

    /// Closes every channel to `peer` (it is gone for good).
    pub(crate) fn close_peer(&self, peer: &NodeId) {
        let gone: Vec<Arc<DirectConn>> = {
            let mut open = self.open_map();
            let keys: Vec<Key> = open.keys().filter(|(p, _)| p == peer).cloned().collect();
            let gone = keys.iter().filter_map(|k| open.remove(k)).collect();
            self.counted(&open);
            gone
        };
        for conn in gone {
            conn.queue.close();
        }
    }

    /// Every open channel.
    pub(crate) fn all(&self) -> Vec<Arc<DirectConn>> {
        self.open_map().values().cloned().collect()
    }
}
