//! Auto-activation: a pair that exchanges more than
//! `lazy.auto_activate_messages` messages within
//! `lazy.auto_activate_window_ms` gets a lazy channel even for small bodies.
//!
//! Pure state with the time passed in. Each peer has a fixed window: the
//! count restarts when a message comes after the window has ended.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use transports::protocol::NodeId;

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u64,
}

/// Message counters per peer.
#[derive(Debug)]
pub struct AutoActivation {
    limit: u64,
    window: Duration,
    peers: HashMap<NodeId, Window>,
}

impl AutoActivation {
    /// Counters that call a pair hot after more than `limit` messages
    /// within `window`; a `limit` of 0 disables auto-activation.
    pub fn new(limit: u64, window: Duration) -> Self {
        AutoActivation {
            limit,
            window,
            peers: HashMap::new(),
        }
    }

    /// Counts one message to `peer` at `now`; returns whether the pair is
    /// now hot (more than the limit within the window).
    pub fn handle_message(&mut self, peer: &NodeId, now: Instant) -> bool {
        if self.limit == 0 {
            return false;
        }
        let window = self.window;
        let w = self.peers.entry(peer.clone()).or_insert(Window {
            start: now,
            count: 0,
        });
        if now.saturating_duration_since(w.start) >= window {
            *w = Window {
                start: now,
                count: 0,
            };
        }
        w.count += 1;
        w.count > self.limit
    }

    /// Forgets `peer`'s count, as when its lazy channel closed for idling:
    /// its traffic returns to the message server until it is hot again.
    pub fn forget(&mut self, peer: &NodeId) {
        self.peers.remove(peer);
    }

    /// Forgets peers whose window ended before `now`, so the map stays as
    /// small as the set of recently active peers.
    pub fn handle_timeout(&mut self, now: Instant) {
        let window = self.window;
        self.peers
            .retain(|_, w| now.saturating_duration_since(w.start) < window);
    }

    /// Peers tracked now.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is tracked.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_after_more_than_the_limit_within_the_window() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let b = NodeId::new("b");
        let c = NodeId::new("c");
        let mut a = AutoActivation::new(3, ms(100));
        // (peer, offset, hot after this message)
        let steps: Vec<(&NodeId, u64, bool)> = vec![
            (&b, 0, false),
            (&b, 10, false),
            (&b, 20, false),
            (&c, 25, false),
            (&b, 30, true), // 4th within 100 ms
            (&b, 40, true),
            (&b, 150, false), // window over: counting restarts
            (&b, 151, false),
            (&b, 152, false),
            (&b, 153, true),
        ];
        for (i, (peer, offset, hot)) in steps.into_iter().enumerate() {
            assert_eq!(a.handle_message(peer, t0 + ms(offset)), hot, "step {i}");
        }
        a.forget(&b);
        assert!(
            !a.handle_message(&b, t0 + ms(160)),
            "forgotten: counting restarts"
        );
        a.handle_timeout(t0 + ms(240));
        assert_eq!(a.len(), 1, "c's window ended long ago");
        a.handle_timeout(t0 + ms(260));
        assert!(a.is_empty());
    }

    #[test]
    fn zero_disables() {
        let mut a = AutoActivation::new(0, Duration::from_secs(1));
        let now = Instant::now();
        assert!((0..1000).all(|_| !a.handle_message(&NodeId::new("b"), now)));
        assert!(a.is_empty());
    }
}
