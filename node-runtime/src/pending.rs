//! A message on its way: the handle [`crate::Node::submit`] returns.

use std::sync::Arc;
use std::time::Duration;

use cluster_manager::{Completion, DeliveryReport, SendError};
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;

use crate::core::CoreCell;

/// A message on its way: queued for the wire, its outcome not yet known.
///
/// Returned by [`crate::Node::submit`]; [`Pending::outcome`] waits for the
/// receivers' acknowledgements. Dropping it stops tracking the message (it
/// may still be delivered). It holds the node's core and its place among
/// the messages in flight (`node.max_in_flight`), not the node.
#[derive(Debug)]
#[must_use = "a pending send does nothing unless its outcome is awaited"]
pub struct Pending {
    core: Arc<CoreCell>,
    seq: u64,
    deadline: Instant,
    /// The send timeout, for the error that says how long it waited.
    after: Duration,
    rx: Option<oneshot::Receiver<Completion>>,
    /// Set once the outcome arrived: the tracker let go of the message
    /// then, so dropping this handle has nothing to cancel.
    settled: bool,
    /// Its places among the messages in flight; given back on drop. None
    /// for a recoverable message's handle: the node's own handle on the
    /// message holds them (see [`Pending::detached`]).
    _places: Option<Places>,
    /// A recoverable message's receiver and number: its handle's own
    /// timeout says it is still queued (see [`Pending::detached`]).
    recoverable: Option<Box<(transports::protocol::NodeId, u64)>>,
}

/// A message's places among those in flight: one in their count
/// (`node.max_in_flight`), and its body's share of their bytes
/// (`node.max_in_flight_bytes`, in KiB).
#[derive(Debug)]
pub(crate) struct Places {
    // Held, never read: given back when dropped.
    pub(crate) _message: OwnedSemaphorePermit,
    pub(crate) _bytes: Option<OwnedSemaphorePermit>,
}

/// Bodies up to this size take no share of the in-flight bytes: their
/// count alone bounds them (`node.max_in_flight` of them hold at most
/// that many KiB), and the hot path of small sends skips the byte count.
pub(crate) const UNCOUNTED_BODY_BYTES: usize = 1024;

/// The share of the in-flight bytes (in KiB units) a body of `len` bytes
/// takes: none up to [`UNCOUNTED_BODY_BYTES`], else its KiB, at most all
/// (`capacity`).
pub(crate) fn byte_units(len: usize, capacity: usize) -> u32 {
    if len <= UNCOUNTED_BODY_BYTES {
        return 0;
    }
    let units = len.div_ceil(1024).min(capacity.max(1));
    u32::try_from(units).unwrap_or(u32::MAX)
}

impl Pending {
    pub(crate) fn new(
        core: Arc<CoreCell>,
        seq: u64,
        deadline: Instant,
        after: Duration,
        rx: oneshot::Receiver<Completion>,
        places: Places,
    ) -> Pending {
        Pending {
            core,
            seq,
            deadline,
            after,
            rx: Some(rx),
            settled: false,
            _places: Some(places),
            recoverable: None,
        }
    }

    /// A handle fed by the node rather than by the core: recoverable
    /// message `seq` to `receiver`, whose outcome the node watches itself
    /// (it stays in the store until acknowledged). Dropping it cancels
    /// nothing; its timeout answers `StillQueued`.
    pub(crate) fn detached(
        core: Arc<CoreCell>,
        receiver: transports::protocol::NodeId,
        seq: u64,
        deadline: Instant,
        after: Duration,
        rx: oneshot::Receiver<Completion>,
    ) -> Pending {
        Pending {
            core,
            seq,
            deadline,
            after,
            rx: Some(rx),
            settled: true,
            _places: None,
            recoverable: Some(Box::new((receiver, seq))),
        }
    }

    /// The message's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) async fn completion(mut self) -> Result<Completion, SendError> {
        let Some(mut rx) = self.rx.take() else {
            return Err(SendError::Shutdown);
        };
        // Often there already (many in flight): one poll, no timer armed.
        // A poll, not a `try_recv`, so that it takes from tokio's
        // cooperative budget and a sender that never waits still yields.
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(std::pin::Pin::new(&mut rx), cx))
        })
        .await;
        let outcome = match first {
            std::task::Poll::Ready(received) => Ok(received),
            std::task::Poll::Pending => tokio::time::timeout_at(self.deadline, rx).await,
        };
        match outcome {
            Ok(Ok(c)) => {
                self.settled = true;
                Ok(c)
            }
            Ok(Err(_)) => Err(self.core.closed_error()),
            Err(_) if self.recoverable.is_some() => {
                let (node, pseq) = self
                    .recoverable
                    .take()
                    .map(|b| *b)
                    .unwrap_or_else(|| (transports::protocol::NodeId::new(""), self.seq));
                Err(SendError::StillQueued {
                    node,
                    pseq,
                    cause: Box::new(SendError::Timeout {
                        after: self.after,
                        waiting_for: vec![],
                    }),
                })
            }
            Err(_) => {
                let waiting_for = self
                    .core
                    .lock()
                    .handle_cancel(self.seq)
                    .map(|(_, m)| m)
                    .unwrap_or_default();
                Err(SendError::Timeout {
                    after: self.after,
                    waiting_for,
                })
            }
        }
    }

    /// Waits until every receiver has accepted the message, or it failed.
    ///
    /// # Errors
    ///
    /// As [`crate::Node::send`].
    pub async fn outcome(self) -> Result<DeliveryReport, SendError> {
        match self.completion().await? {
            Completion::Delivered(report) => Ok(report),
            Completion::Failed(e) => Err(e),
            Completion::Replied { .. } => Err(SendError::Disconnected),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // An unsettled message stops being tracked (and resent); what it
        // held is freed after the lock is let go.
        if !self.settled {
            let cancelled = self.core.lock().handle_cancel(self.seq);
            drop(cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::byte_units;

    #[test]
    fn a_body_over_a_kib_takes_its_kib_at_most_all() {
        let cases = [
            (0, 1024, 0),
            (1, 1024, 0),
            (1024, 1024, 0),
            (1025, 1024, 2),
            (2048, 1024, 2),
            (256 << 10, 1024, 256),
            (64 << 20, 1024, 1024),
            (10, 0, 0),
            (4096, 0, 1),
        ];
        for (len, capacity, units) in cases {
            assert_eq!(
                byte_units(len, capacity),
                units,
                "{len} bytes of {capacity} KiB"
            );
        }
    }
}
