//! Busy hysteresis: a node whose backlog in one of its services reaches
//! `node.busy_upper` is busy until every service's backlog has fallen to
//! `node.busy_lower`. The inboxes tell a [`BusyWatch`] when one of them
//! crosses a limit (under their own lock, from the counts they keep
//! anyway); the heartbeat task reports a change to the message server at
//! once, which tells every member.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// A node's busy state, shared by its application services' inboxes.
#[derive(Debug)]
pub(crate) struct BusyWatch {
    /// `node.busy_upper`.
    pub(crate) upper: usize,
    /// `node.busy_lower`.
    pub(crate) lower: usize,
    /// Services whose backlog reached their upper limit and has not yet
    /// fallen to their lower one.
    over: AtomicUsize,
    /// Woken when the node becomes busy or stops being busy.
    pub(crate) changed: Notify,
}

impl BusyWatch {
    pub(crate) fn new(upper: usize, lower: usize) -> BusyWatch {
        BusyWatch {
            upper,
            lower,
            over: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    /// Whether the node is busy.
    pub(crate) fn is_busy(&self) -> bool {
        self.over.load(Ordering::Acquire) > 0
    }

    /// The limits for an inbox of `capacity` messages: the upper limit at
    /// most the capacity (a smaller inbox is busy when full), the lower
    /// below the upper.
    pub(crate) fn limits(&self, capacity: usize) -> (usize, usize) {
        let upper = self.upper.min(capacity).max(1);
        (upper, self.lower.min(upper - 1))
    }

    /// A service's backlog reached its upper limit.
    pub(crate) fn service_over(&self) {
        if self.over.fetch_add(1, Ordering::AcqRel) == 0 {
            self.changed.notify_one();
        }
    }

    /// A service that was over its upper limit fell to its lower one (or
    /// closed).
    pub(crate) fn service_under(&self) {
        if self.over.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_while_any_service_is_over_and_told_at_each_change() {
        let w = BusyWatch::new(768, 256);
        assert!(!w.is_busy());
        assert_eq!(w.limits(1024), (768, 256));
        assert_eq!(w.limits(100), (100, 99));
        assert_eq!(w.limits(1), (1, 0));
        w.service_over();
        w.service_over();
        assert!(w.is_busy());
        w.service_under();
        assert!(w.is_busy(), "one service is still over");
        w.service_under();
        assert!(!w.is_busy());
        // Told of each change (the permits of `notify_one` do not stack,
        // so one is waiting).
        use std::future::Future;
        let mut told = std::pin::pin!(w.changed.notified());
        assert!(told
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
            .is_ready());
    }
}
