//! The fault-test ledger: for every message, what its sender was told and
//! what each receiver delivered; and the tally of lost, duplicated,
//! reordered and unexpected messages.
//!
//! Bodies carry `(sender index, message number)`, numbered per sender and
//! receiver from 0, so a receiver's log alone shows order and duplicates.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// The body of message `number` from sender `sender`.
pub fn body(sender: u32, number: u64) -> Bytes {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&sender.to_be_bytes());
    b.extend_from_slice(&number.to_be_bytes());
    Bytes::from(b)
}

/// Reads a body made by [`body`].
pub fn parse(body: &[u8]) -> Option<(u32, u64)> {
    if body.len() != 12 {
        return None;
    }
    let sender = u32::from_be_bytes(body[..4].try_into().ok()?);
    let number = u64::from_be_bytes(body[4..].try_into().ok()?);
    Some((sender, number))
}

/// What a sender was told about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Told {
    /// Acknowledged by the receiver.
    Delivered,
    /// An error (its text).
    Error(String),
}

/// Everything recorded in one run. Cheap to clone; shared by the tasks.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    inner: Arc<Mutex<Records>>,
}

#[derive(Debug, Default)]
struct Records {
    /// (sender, receiver, number) -> what the sender was told.
    told: HashMap<(u32, u32, u64), Told>,
    /// receiver -> sender -> numbers in delivery order.
    delivered: BTreeMap<u32, BTreeMap<u32, Vec<u64>>>,
    /// Deliveries whose body could not be read.
    garbled: u64,
}

/// The tally of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Messages sent (with an outcome recorded).
    pub sent: u64,
    /// Acknowledged to their sender.
    pub acknowledged: u64,
    /// Ended in an error at the sender.
    pub errors: u64,
    /// Acknowledged but never delivered.
    pub lost: u64,
    /// Delivered more than once to the same receiver.
    pub duplicated: u64,
    /// Delivered after a higher number from the same sender.
    pub reordered: u64,
    /// Delivered but never sent (or garbled).
    pub unexpected: u64,
    /// The first few errors, for the report.
    pub error_samples: Vec<String>,
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {}, acknowledged {}, errors {}, lost {}, duplicated {}, reordered {}, unexpected {}",
            self.sent,
            self.acknowledged,
            self.errors,
            self.lost,
            self.duplicated,
            self.reordered,
            self.unexpected
        )?;
        for e in &self.error_samples {
            write!(f, "\n  error: {e}")?;
        }
        Ok(())
    }
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what the sender was told about a message.
    pub fn told(&self, sender: u32, receiver: u32, number: u64, told: Told) {
        self.lock().told.insert((sender, receiver, number), told);
    }

    /// Records a delivery at `receiver`.
    pub fn delivered(&self, receiver: u32, body: &[u8]) {
        let mut r = self.lock();
        match parse(body) {
            Some((sender, number)) => r
                .delivered
                .entry(receiver)
                .or_default()
                .entry(sender)
                .or_default()
                .push(number),
            None => r.garbled += 1,
        }
    }

    /// Deliveries recorded so far.
    pub fn delivered_count(&self) -> u64 {
        self.lock()
            .delivered
            .values()
            .flat_map(|s| s.values())
            .map(|v| v.len() as u64)
            .sum()
    }

    /// Acknowledgements recorded so far.
    pub fn acknowledged_count(&self) -> u64 {
        self.lock()
            .told
            .values()
            .filter(|t| **t == Told::Delivered)
            .count() as u64
    }

    /// Counts what went wrong.
    pub fn tally(&self) -> Tally {
        let r = self.lock();
        let mut t = Tally {
            sent: r.told.len() as u64,
            unexpected: r.garbled,
            ..Tally::default()
        };
        for told in r.told.values() {
            match told {
                Told::Delivered => t.acknowledged += 1,
                Told::Error(e) => {
                    t.errors += 1;
                    if t.error_samples.len() < 5 {
                        t.error_samples.push(e.clone());
                    }
                }
            }
        }
        let mut seen: HashMap<(u32, u32, u64), u64> = HashMap::new();
        for (receiver, senders) in &r.delivered {
            for (sender, numbers) in senders {
                let mut highest: Option<u64> = None;
                for n in numbers {
                    *seen.entry((*sender, *receiver, *n)).or_default() += 1;
                    if highest.is_some_and(|h| *n < h) {
                        t.reordered += 1;
                    }
                    highest = Some(highest.map_or(*n, |h| h.max(*n)));
                    if !r.told.contains_key(&(*sender, *receiver, *n)) {
                        t.unexpected += 1;
                    }
                }
            }
        }
        t.duplicated = seen.values().filter(|c| **c > 1).map(|c| c - 1).sum();
        t.lost = r
            .told
            .iter()
            .filter(|(k, v)| **v == Told::Delivered && !seen.contains_key(k))
            .count() as u64;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_each_kind_of_fault() {
        let l = Ledger::default();
        for n in 0..5 {
            l.told(0, 1, n, Told::Delivered);
        }
        l.told(0, 1, 5, Told::Error("timeout".into()));
        for n in [0u64, 2, 1, 2, 4] {
            l.delivered(1, &body(0, n));
        }
        l.delivered(1, &body(7, 7));
        l.delivered(1, b"junk");
        let t = l.tally();
        assert_eq!(t.sent, 6);
        assert_eq!(t.acknowledged, 5);
        assert_eq!(t.errors, 1);
        assert_eq!(t.lost, 1, "3 was acknowledged, never delivered");
        assert_eq!(t.duplicated, 1, "2 twice");
        assert_eq!(t.reordered, 1, "1 after 2");
        assert_eq!(t.unexpected, 2, "7/7 never sent, and the junk");
    }
}
