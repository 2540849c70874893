//! How long a connection has carried nothing: the watch both ends of a
//! member's connection keep, so that a connection whose network is down
//! ends within the failure timeout even while heartbeats (on another
//! network) arrive.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// One timer per connection, moved on only when it fires (not at every
/// read): a read costs one clock reading.
#[derive(Debug)]
pub struct Silence {
    limit: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Silence {
    /// Watching from now for silences of `limit`.
    pub fn new(limit: Duration) -> Self {
        Silence {
            limit,
            last: Instant::now(),
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }

    /// Something arrived.
    pub fn heard(&mut self) {
        self.last = Instant::now();
    }

    /// Completes once nothing arrived for the limit.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the timer and the last arrival live in `self`.
    pub async fn elapsed(&mut self) {
        loop {
            self.timer.as_mut().await;
            if self.last.elapsed() >= self.limit {
                return;
            }
            let next = self.last + self.limit;
            self.timer.as_mut().reset(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn elapses_only_after_the_limit_without_arrivals() {
        let limit = Duration::from_secs(1);
        let start = Instant::now();
        let mut silence = Silence::new(limit);
        // Arrivals every 600 ms keep it from elapsing.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(600)).await;
            silence.heard();
        }
        let last = Instant::now();
        silence.elapsed().await;
        assert_eq!(
            Instant::now() - last,
            limit,
            "a limit after the last arrival"
        );
        assert!(Instant::now() - start > Duration::from_secs(3));
    }
}
