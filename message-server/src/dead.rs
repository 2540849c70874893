//! The dead-letter queue: messages that were not delivered, and why (see
//! [`DeadLetter`]). The server files what it could not route itself (a
//! one-way message that went nowhere, a send its permissions refused, a
//! message that expired on its way); nodes file what they gave up on (an
//! expired message in their queues or inboxes, a send whose retries ran
//! out, a send whose target is gone). Any node may browse it, take entries
//! out, and replay them (`Node::dead_letters`).
//!
//! The queue is bounded by `message_server.dead_letter_entries` and
//! `message_server.dead_letter_bytes`: a message past either is not held,
//! but counted (`overflowed`) and logged. With `message_server.data_dir`
//! every entry is also written to the server's store, and the queue is
//! read back at start.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use clustercomm_store::{Change, DeadLetterRecord, OnDamage, Record, RecordKey, Store, StoreError};
use transports::protocol::{
    DeadLetter, DeadLetterQuery, DeadLetterStats, DeliveryFailure, MessageRef, NodeId,
    MAX_DEAD_LETTER_QUERY,
};

/// The queue and its limits.
#[derive(Debug)]
pub(crate) struct DeadLetters {
    queue: Mutex<Queue>,
    store: Option<Store>,
    /// Wakes the flusher ([`DeadLetters::flusher`]): changes wait for an
    /// fsync.
    unflushed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Queue {
    entries: BTreeMap<u64, (DeadLetter, Bytes)>,
    bytes: u64,
    next_id: u64,
    added: u64,
    overflowed: u64,
    max_entries: u64,
    max_bytes: u64,
    /// Entries added that are known to be on disk.
    durable: u64,
}

impl DeadLetters {
    /// An empty queue in memory only.
    pub(crate) fn in_memory(max_entries: usize, max_bytes: usize) -> DeadLetters {
        DeadLetters {
            queue: Mutex::new(Queue {
                next_id: 1,
                max_entries: max_entries as u64,
                max_bytes: max_bytes as u64,
                ..Queue::default()
            }),
            store: None,
            unflushed: tokio::sync::Notify::new(),
        }
    }

    /// The queue kept in the store in `dir`, with what it held. Blocking.
    ///
    /// # Errors
    ///
    /// The store cannot be opened (damaged, or its directory unusable).
    pub(crate) fn open(
        dir: &Path,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<DeadLetters, StoreError> {
        let opened = Store::open(dir, OnDamage::Refuse)?;
        let dead = DeadLetters::in_memory(max_entries, max_bytes);
        {
            let mut q = dead.lock();
            for record in opened.contents.dead_letters {
                let entry: DeadLetter = match postcard::from_bytes(&record.entry) {
                    Ok(entry) => entry,
                    Err(e) => {
                        // Checksummed, so written by another version.
                        tracing::error!(id = record.id, error = %e, "a stored dead letter cannot be read by this version; left in the store");
                        continue;
                    }
                };
                q.bytes += record.body.len() as u64;
                q.next_id = q.next_id.max(record.id + 1);
                q.entries
                    .insert(record.id, (entry, Bytes::from(record.body)));
            }
            if !q.entries.is_empty() {
                tracing::info!(
                    entries = q.entries.len(),
                    bytes = q.bytes,
                    "dead-letter queue read from the store"
                );
            }
        }
        Ok(DeadLetters {
            store: Some(opened.store),
            ..dead
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Files `entry` with `body`: it gets its number and is held, or, past
    /// the queue's limits, counted as overflowed and logged. The number,
    /// if it is held.
    pub(crate) fn file(&self, mut entry: DeadLetter, body: Bytes) -> Option<u64> {
        let id = {
            let mut q = self.lock();
            let len = body.len() as u64;
            if q.entries.len() as u64 >= q.max_entries || q.bytes + len > q.max_bytes {
                q.overflowed += 1;
                let overflowed = q.overflowed;
                drop(q);
                // Logged at the 1st, 2nd, 4th, 8th... so that a flood
                // cannot flood the log; every one is counted.
                if overflowed.is_power_of_two() {
                    tracing::warn!(overflowed, sender = %entry.sender, target = %entry.target, service = %entry.service, reason = %entry.reason, "dead-letter queue full: dead letters are counted, not held (message_server.dead_letter_entries, dead_letter_bytes)");
                }
                return None;
            }
            let id = q.next_id;
            q.next_id += 1;
            q.added += 1;
            q.bytes += len;
            entry.id = id;
            entry.body_bytes = len;
            if let Some(store) = &self.store {
                let record = encode_record(&entry, &body);
                // Queued in the store's commit order without waiting (this
                // is the routing path); the flusher fsyncs it at once,
                // with whatever else was filed meanwhile.
                match store.commit_later(vec![Change::Put(record)]) {
                    Ok(()) => self.unflushed.notify_one(),
                    Err(e) => {
                        tracing::warn!(id, error = %e, "a dead letter could not be queued for the store; it is held in memory only");
                    }
                }
            }
            tracing::debug!(id, sender = %entry.sender, target = %entry.target, reason = %entry.reason, "dead letter filed");
            q.entries.insert(id, (entry, body));
            id
        };
        Some(id)
    }

    /// Answers `query`: the entries it selects (taken out of the queue if
    /// it says so), and the queue's state after it.
    pub(crate) fn query(
        &self,
        query: &DeadLetterQuery,
    ) -> (Vec<(DeadLetter, Bytes)>, DeadLetterStats) {
        let limit = (query.limit as usize).clamp(1, MAX_DEAD_LETTER_QUERY);
        let mut q = self.lock();
        let ids: Vec<u64> = if query.ids.is_empty() {
            q.entries
                .range(query.after.saturating_add(1)..)
                .take(limit)
                .map(|(id, _)| *id)
                .collect()
        } else {
            query
                .ids
                .iter()
                .copied()
                .take(MAX_DEAD_LETTER_QUERY)
                .collect()
        };
        let mut out = Vec::with_capacity(ids.len());
        let mut removed = Vec::new();
        for id in ids {
            if query.take {
                if let Some((entry, body)) = q.entries.remove(&id) {
                    q.bytes -= body.len() as u64;
                    removed.push(Change::Remove(RecordKey::DeadLetter(id)));
                    out.push((entry, body));
                }
            } else if let Some((entry, body)) = q.entries.get(&id) {
                out.push((entry.clone(), body.clone()));
            }
        }
        let stats = q.stats();
        drop(q);
        if let (Some(store), false) = (&self.store, removed.is_empty()) {
            match store.commit_later(removed) {
                Ok(()) => self.unflushed.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, "taken dead letters could not be removed from the store; they return after a restart");
                }
            }
        }
        if !query.bodies {
            for (_, body) in &mut out {
                *body = Bytes::new();
            }
        }
        (out, stats)
    }

    /// The queue's state.
    pub(crate) fn stats(&self) -> DeadLetterStats {
        self.lock().stats()
    }

    /// The newest `limit` entries (without bodies), newest first.
    pub(crate) fn newest(&self, limit: usize) -> Vec<DeadLetter> {
        self.view(limit).1
    }

    /// The queue's state and its newest `limit` entries (without bodies),
    /// newest first, read together: for the monitor.
    pub(crate) fn view(&self, limit: usize) -> (DeadLetterStats, Vec<DeadLetter>) {
        let q = self.lock();
        let newest = q
            .entries
            .values()
            .rev()
            .take(limit)
            .map(|(entry, _)| entry.clone())
            .collect();
        (q.stats(), newest)
    }

    /// Makes what is filed durable as it comes, until `cancel`: one fsync
    /// (an empty durable commit, which carries every change queued before
    /// it) for whatever was filed or taken since the last, so that a
    /// message server killed a moment after filing keeps the dead letter.
    pub(crate) async fn flusher(&self, cancel: tokio_util::sync::CancellationToken) {
        if self.store.is_none() {
            return;
        }
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.unflushed.notified() => self.flush().await,
            }
        }
    }

    /// Waits until what was filed so far is on disk.
    pub(crate) async fn flush(&self) {
        if let Some(store) = &self.store {
            // Everything added by now was queued for the store before this
            // commit, which carries it.
            let added = self.lock().added;
            match store.commit(vec![]).await {
                Ok(()) => {
                    let mut q = self.lock();
                    q.durable = q.durable.max(added);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the dead-letter store could not be flushed");
                }
            }
        }
    }

    /// Flushes, and closes the store.
    #[cfg(test)]
    async fn close(self) {
        self.flush().await;
        if let Some(store) = self.store {
            store.close().await;
        }
    }
}

impl Queue {
    fn stats(&self) -> DeadLetterStats {
        DeadLetterStats {
            entries: self.entries.len() as u64,
            bytes: self.bytes,
            added: self.added,
            overflowed: self.overflowed,
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            durable: self.durable,
        }
    }
}

fn encode_record(entry: &DeadLetter, body: &Bytes) -> Record {
    Record::DeadLetter(DeadLetterRecord {
        id: entry.id,
        // A struct of plain fields: encoding cannot fail.
        entry: postcard::to_stdvec(entry).unwrap_or_default(),
        body: body.to_vec(),
    })
}

/// A dead letter for message `h`, failed with `reason`, filed by the
/// server itself.
pub(crate) fn from_message(
    h: &MessageRef<'_>,
    reason: transports::protocol::DeadReason,
    unix_ms: u64,
) -> DeadLetter {
    DeadLetter {
        id: 0,
        sender: NodeId::new(h.sender),
        target: h.target.to_target(),
        service: h.service.to_owned(),
        priority: h.priority,
        reason,
        at_unix_ms: unix_ms,
        filed_by: String::new(),
        body_bytes: 0,
    }
}

/// Whether a message of this kind that failed with `failure` at the
/// server goes to the dead-letter queue there: a one-way message for any
/// failure; an acknowledged one when permissions refused it or it
/// expired (its sender hears of the failure, and a retry would not
/// help); a request or a reply never (their senders wait for them).
pub(crate) fn server_files(
    kind: transports::protocol::MessageKind,
    failure: &DeliveryFailure,
) -> Option<transports::protocol::DeadReason> {
    use transports::protocol::{DeadReason, MessageKind};
    match kind {
        MessageKind::Notify => DeadReason::for_failure(failure, true),
        MessageKind::Send | MessageKind::Recoverable { .. } => match failure {
            DeliveryFailure::NotPermitted => Some(DeadReason::NotPermitted),
            DeliveryFailure::Expired => Some(DeadReason::Expired),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use transports::protocol::{DeadReason, Priority, Target};

    fn entry(n: u64) -> DeadLetter {
        DeadLetter {
            id: 0,
            sender: NodeId::new("a"),
            target: Target::Node(NodeId::new("b")),
            service: format!("svc-{n}"),
            priority: Priority::Normal,
            reason: DeadReason::Expired,
            at_unix_ms: n,
            filed_by: String::new(),
            body_bytes: 0,
        }
    }

    #[test]
    fn bounded_by_entries_and_bytes_and_counts_what_it_cannot_hold() {
        let dead = DeadLetters::in_memory(3, 10);
        assert_eq!(dead.file(entry(1), Bytes::from_static(b"1234")), Some(1));
        assert_eq!(dead.file(entry(2), Bytes::from_static(b"1234")), Some(2));
        // 8 + 4 > 10 bytes.
        assert_eq!(dead.file(entry(3), Bytes::from_static(b"1234")), None);
        assert_eq!(dead.file(entry(4), Bytes::new()), Some(3));
        // 3 entries.
        assert_eq!(dead.file(entry(5), Bytes::new()), None);
        let stats = dead.stats();
        assert_eq!(
            (stats.entries, stats.bytes, stats.added, stats.overflowed),
            (3, 8, 3, 2)
        );
    }

    #[test]
    fn browse_pages_by_id_and_take_removes() {
        let dead = DeadLetters::in_memory(100, 1 << 20);
        for n in 1..=5 {
            dead.file(entry(n), Bytes::from(vec![n as u8; n as usize]));
        }
        let page = |after, limit| DeadLetterQuery {
            after,
            limit,
            bodies: true,
            ..DeadLetterQuery::default()
        };
        let (first, _) = dead.query(&page(0, 2));
        assert_eq!(first.iter().map(|(e, _)| e.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(first[1].1.as_ref(), &[2, 2]);
        let (next, _) = dead.query(&page(2, 10));
        assert_eq!(
            next.iter().map(|(e, _)| e.id).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        let take = DeadLetterQuery {
            ids: vec![4, 2, 99],
            take: true,
            ..DeadLetterQuery::default()
        };
        let (taken, stats) = dead.query(&take);
        assert_eq!(taken.iter().map(|(e, _)| e.id).collect::<Vec<_>>(), [4, 2]);
        assert!(taken.iter().all(|(_, b)| b.is_empty()), "no bodies asked");
        assert_eq!((stats.entries, stats.bytes), (3, 1 + 3 + 5));
        let (left, _) = dead.query(&page(0, 10));
        assert_eq!(
            left.iter().map(|(e, _)| e.id).collect::<Vec<_>>(),
            [1, 3, 5]
        );
    }

    #[test]
    fn survives_a_restart_in_its_store() {
        let dir = std::env::temp_dir().join(format!("cc-dead-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        {
            let dead = DeadLetters::open(&dir, 10, 1 << 20).expect("opens");
            dead.file(entry(1), Bytes::from_static(b"one"));
            dead.file(entry(2), Bytes::from_static(b"two"));
            dead.query(&DeadLetterQuery {
                ids: vec![1],
                take: true,
                ..DeadLetterQuery::default()
            });
            rt.block_on(dead.close());
        }
        let dead = DeadLetters::open(&dir, 10, 1 << 20).expect("opens again");
        let (all, stats) = dead.query(&DeadLetterQuery {
            limit: 10,
            bodies: true,
            ..DeadLetterQuery::default()
        });
        assert_eq!(stats.entries, 1);
        assert_eq!(all[0].0.id, 2);
        assert_eq!(all[0].0.service, "svc-2");
        assert_eq!(all[0].1.as_ref(), b"two");
        // New numbers go on after the stored ones.
        assert_eq!(dead.file(entry(3), Bytes::new()), Some(3));
        rt.block_on(dead.close());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
