//! Shared counters and bounded waits on them.
//!
//! Receivers count into a [`Counter`]; the measuring task polls it until the
//! expected total arrives, never longer than a timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use crate::options::WAIT_TIMEOUT;
use tokio::time::Instant;

/// How often a wait looks at the counter. Tokio's timer has millisecond
/// resolution, so a completion time is late by at most about this much.
pub const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// A cheap, cloneable event counter.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// A counter at zero.
    pub fn new() -> Counter {
        Counter::default()
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Waits until `counter` reaches `target` and returns when it saw that.
///
/// # Errors
///
/// If the counter is still short of `target` after `timeout`; the message
/// says how far it got.
pub async fn wait_for_count(
    counter: &Counter,
    target: u64,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    match wait_until(timeout, || counter.get() >= target).await {
        Some(at) => Ok(at),
        None => bail!("counted {} of {target} within {timeout:?}", counter.get()),
    }
}

/// Polls `done` every [`POLL_INTERVAL`] until it holds and returns when it
/// saw that, or `None` once `timeout` passed.
pub async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = Instant::now();
        if done() {
            return Some(now);
        }
        if now >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// How long a count may stand still before [`settle`] takes it as final
/// (messages were dropped).
pub const STALL: Duration = Duration::from_millis(500);

/// Waits for `counter` to reach `target` and returns the count and when it
/// was seen. If the count stands still for [`STALL`] first (messages were
/// dropped), settles for what arrived, as of its last change.
///
/// # Errors
///
/// If the count is still moving but short of `target` after
/// [`WAIT_TIMEOUT`].
pub async fn settle(counter: &Counter, target: u64) -> anyhow::Result<(u64, Instant)> {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    let mut last = counter.get();
    let mut last_change = Instant::now();
    loop {
        let now = Instant::now();
        let count = counter.get();
        if count >= target {
            return Ok((count, now));
        }
        if count != last {
            last = count;
            last_change = now;
        } else if now - last_change >= STALL {
            return Ok((count, last_change));
        }
        if now >= deadline {
            bail!("counted {count} of {target} within {WAIT_TIMEOUT:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Waits for one acknowledged send's outcome (bounded by the node's send
/// timeout, which fails it) and checks that it reached its one receiver.
///
/// # Errors
///
/// A send error (a timeout included), or a report that is not exactly one
/// delivery.
pub async fn delivered_once(pending: node_runtime::Pending) -> anyhow::Result<()> {
    use anyhow::{ensure, Context};
    let seq = pending.seq();
    let report = pending
        .outcome()
        .await
        .with_context(|| format!("send {seq}"))?;
    ensure!(
        report.is_complete() && report.delivered.len() == 1,
        "message {seq} not delivered: {report:?}"
    );
    Ok(())
}
