//! Fair shares of the node's outgoing queue to the message server: traffic
//! to one target never queues the node's messages to other targets behind
//! more than `node.target_queue_bytes` of it.
//!
//! The queue stays one FIFO (the wire order of a target's messages is
//! their send order), but no target may run more than its share ahead of
//! the writer: a send to a target whose last message is still further
//! than the share from being taken by the writer waits until it is not.
//! A message to any other target is queued at once, behind at most the
//! share of each target that is busy (and the batch the writer is
//! writing), and goes out as soon as the writer has taken that.
//!
//! While the whole queue holds less than one share, nobody can be over
//! theirs: the check is then two atomic loads, and nothing is recorded.
//! Past that, each send looks up (and after queueing, records) where its
//! target's last message stands, under a lock.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use rustc_hash::FxHasher;
use tokio::time::Instant;
use transports::protocol::{Priority, TargetRef};
use transports::OutQueue;

/// Targets remembered before the positions already taken are
/// forgotten.
const PRUNE_AT: usize = 256;

/// The share of the outgoing queue each target may hold.
#[derive(Debug)]
pub(crate) struct FairShare {
    /// Bytes of one target's messages the queue may hold ahead of the
    /// writer.
    share: u64,
    /// Where each target's last message stood when it was queued (its end,
    /// in [`OutQueue::positions`]), by a hash of the target: targets that
    /// collide share one share, which costs fairness, never a message.
    last: Mutex<HashMap<u64, u64, rustc_hash::FxBuildHasher>>,
}

/// A target, as the shares know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TargetKey(u64);

impl TargetKey {
    /// The key of `target`'s messages of `priority` (each priority has a
    /// queue of its own, and so a share of its own).
    fn of(target: TargetRef<'_>, priority: Priority) -> TargetKey {
        let mut h = FxHasher::default();
        priority.hash(&mut h);
        match target {
            TargetRef::Node(id) => (0u8, id).hash(&mut h),
            TargetRef::Group(g) => (1u8, g).hash(&mut h),
            TargetRef::AnyOf(g) => (2u8, g).hash(&mut h),
            TargetRef::All => 3u8.hash(&mut h),
        }
        TargetKey(h.finish())
    }
}

/// A send waited for its target's share until its deadline.
#[derive(Debug)]
pub(crate) struct ShareTimeout;

impl FairShare {
    /// Shares of `share` bytes (at least 1).
    pub(crate) fn new(share: usize) -> FairShare {
        FairShare {
            share: (share as u64).max(1),
            last: Mutex::new(HashMap::default()),
        }
    }

    /// How far the writer must get before `key` is within its share, if
    /// it is over it now.
    fn over(&self, queue: &OutQueue, target: TargetRef<'_>, priority: Priority) -> Option<u64> {
        let (queued, taken) = queue.positions(priority);
        if queued - taken <= self.share {
            return None;
        }
        let key = TargetKey::of(target, priority);
        let last = *self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key.0)?;
        (last > taken + self.share).then(|| last - self.share)
    }

    /// For a send that waited: whether `key` is within its share now; if
    /// it is, its message of `len` bytes takes its place at once (under
    /// the lock), so that of many senders woken together only as many go
    /// as the share has room for, and the others wait again.
    fn enter(
        &self,
        queue: &OutQueue,
        key: TargetKey,
        priority: Priority,
        len: u64,
    ) -> Result<(), u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (queued, taken) = queue.positions(priority);
        let mine = last.entry(key.0).or_insert(0);
        if *mine > taken + self.share {
            return Err(*mine - self.share);
        }
        *mine = (*mine).max(queued) + len;
        Ok(())
    }

    /// Waits until `target` is within its share of `queue`'s `priority`
    /// for a message of `len` payload bytes, at most until `deadline` (`None`: for
    /// `timeout` from when it starts waiting; the clock is read only
    /// then). Whether it waited.
    ///
    /// # Errors
    ///
    /// [`ShareTimeout`] at the deadline.
    pub(crate) async fn wait_turn(
        &self,
        queue: &OutQueue,
        target: TargetRef<'_>,
        priority: Priority,
        len: usize,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<bool, ShareTimeout> {
        let Some(mut position) = self.over(queue, target, priority) else {
            return Ok(false);
        };
        let key = TargetKey::of(target, priority);
        let deadline = deadline.unwrap_or_else(|| Instant::now() + timeout);
        // Boxed: rare, and every send's future would grow otherwise.
        Box::pin(async {
            loop {
                tokio::time::timeout_at(deadline, queue.taken_up_to(priority, position))
                    .await
                    .map_err(|_| ShareTimeout)?;
                if queue.is_closed() {
                    // The send itself reports the closed queue.
                    return Ok(true);
                }
                match self.enter(queue, key, priority, len as u64) {
                    Err(next) => position = next,
                    Ok(()) => return Ok(true),
                }
            }
        })
        .await
    }

    /// Notes that a message to `target` of `priority` was just queued.
    pub(crate) fn queued(&self, queue: &OutQueue, target: TargetRef<'_>, priority: Priority) {
        let (queued, taken) = queue.positions(priority);
        if queued - taken <= self.share {
            return;
        }
        let key = TargetKey::of(target, priority);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.len() >= PRUNE_AT {
            last.retain(|_, position| *position > taken);
        }
        let mine = last.entry(key.0).or_insert(0);
        *mine = (*mine).max(queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use transports::{out_queue, Lane, OutFrame};

    fn frame(len: usize) -> OutFrame {
        OutFrame::Raw(Bytes::from(vec![0u8; len]))
    }

    #[test]
    fn a_target_past_its_share_waits_and_the_others_do_not() {
        let (queue, _rx) = out_queue(1024, 1 << 20);
        let fair = FairShare::new(1000);
        let flood = TargetRef::Node("flood");
        let other = TargetRef::Node("other");
        let normal = Priority::Normal;
        assert_ne!(TargetKey::of(flood, normal), TargetKey::of(other, normal));
        assert_ne!(
            TargetKey::of(flood, normal),
            TargetKey::of(flood, Priority::Express)
        );
        // Within the share: nothing is over, nothing recorded.
        for _ in 0..3 {
            assert!(fair.over(&queue, flood, normal).is_none());
            queue.try_push(frame(300), Lane::Data).ok();
            fair.queued(&queue, flood, normal);
        }
        // 1200 bytes queued: the flood's last one stands past the share.
        queue.try_push(frame(300), Lane::Data).ok();
        fair.queued(&queue, flood, normal);
        assert_eq!(fair.over(&queue, flood, normal), Some(1200 - 1000));
        // Another target goes at once, and so does the same target's more
        // urgent traffic (a queue of its own).
        assert!(fair.over(&queue, other, normal).is_none());
        assert!(fair.over(&queue, flood, Priority::Express).is_none());
    }
}
