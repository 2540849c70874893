//! Message traces from the message server, for investigation (the
//! `clustercomm trace` command): see [`crate::Node::trace`].

use bytes::Bytes;
use tokio::sync::mpsc;
use transports::protocol::Traced;

/// Captures a trace holds before it drops new ones (counted in
/// [`TraceEvent::End`]'s `dropped` by the server only for its own queue;
/// these are counted in [`Trace::dropped_here`]).
pub const TRACE_BUFFER: usize = 1024;

/// What a trace brings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceEvent {
    /// The server started the trace: what matches from now on is
    /// captured.
    Started,
    /// A message that matched.
    Message {
        /// Its header, as the server routed it.
        traced: Traced,
        /// Its body (cut), when bodies were asked for; otherwise empty.
        body: Bytes,
    },
    /// The trace ended.
    End {
        /// Messages the server sent.
        captured: u64,
        /// Matching messages the server could not send (this node's queue
        /// was full).
        dropped: u64,
        /// Why it ended.
        reason: String,
    },
}

/// A running trace: its captures as they come.
#[derive(Debug)]
pub struct Trace {
    pub(crate) rx: mpsc::Receiver<TraceEvent>,
    pub(crate) dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Trace {
    /// The next capture, or the end; `None` if the link to the server
    /// was lost (a trace does not survive a reconnect).
    pub async fn recv(&mut self) -> Option<TraceEvent> {
        self.rx.recv().await
    }

    /// Captures dropped here because they were not taken fast enough.
    pub fn dropped_here(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The node's end of a running trace, where its reader puts captures.
#[derive(Debug)]
pub(crate) struct TraceSink {
    pub(crate) tx: mpsc::Sender<TraceEvent>,
    pub(crate) dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl TraceSink {
    /// Hands `event` on, or counts it dropped.
    pub(crate) fn offer(&self, event: TraceEvent) {
        if self.tx.try_send(event).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A new trace and its sink.
pub(crate) fn trace() -> (TraceSink, Trace) {
    let (tx, rx) = mpsc::channel(TRACE_BUFFER);
    let dropped = std::sync::Arc::default();
    (
        TraceSink {
            tx,
            dropped: std::sync::Arc::clone(&dropped),
        },
        Trace { rx, dropped },
    )
}
