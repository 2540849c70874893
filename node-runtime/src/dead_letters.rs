//! The message server's dead-letter queue as a node sees it
//! ([`crate::Node::dead_letters`]): browse it, take entries out, replay
//! them; and how this node files what it gives up on.
//!
//! A replay sends the entry's body again, from this node, to the entry's
//! target and service as an acknowledged message, and takes the entry out
//! only once that send succeeded: a replay that fails leaves the entry
//! where it was, so nothing is lost between the queue and the target (a
//! crash between the send and the take leaves it in the queue, to be
//! replayed again: at least once).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use cluster_manager::{DeliveryReport, SendError};
use tokio::sync::oneshot;
use transports::protocol::{
    DeadLetter, DeadLetterQuery, DeadLetterStats, DeadReason, Header, MessageKind, NodeId,
    Priority, Target, MAX_DEAD_LETTER_QUERY,
};
use transports::{Lane, OutFrame, PushError};

use crate::runtime::Runtime;
use crate::SendOptions;

/// One dead letter: what it was, and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterEntry {
    /// Its description: number, sender, target, service, reason, time.
    pub letter: DeadLetter,
    /// Its body (empty when bodies were not asked for).
    pub body: Bytes,
}

/// A page of the queue and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPage {
    /// The entries, by number.
    pub entries: Vec<DeadLetterEntry>,
    /// The queue's state when it answered.
    pub stats: DeadLetterStats,
}

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// The message server refused, for example because this node's
    /// `permissions.dead_letters` is false.
    #[error("the message server refused: {0}")]
    Refused(String),
    /// The message server did not answer in time.
    #[error("the message server did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection to the message server is gone.
    #[error("the connection to the message server is closed")]
    Disconnected,
    /// No entry with this number (taken by someone else, or never there).
    #[error("no dead letter number {0}")]
    NotFound(u64),
    /// Replaying the entry failed; it stays in the queue.
    #[error("replaying dead letter {id} failed; it stays in the queue")]
    Replay {
        /// The entry.
        id: u64,
        /// Why the send failed.
        #[source]
        source: SendError,
    },
}

/// What a query collects until its end comes.
#[derive(Debug)]
pub(crate) struct Collecting {
    entries: Vec<DeadLetterEntry>,
    done: oneshot::Sender<Result<DeadLetterPage, String>>,
}

/// The queries waiting for the message server's answer, by token.
#[derive(Debug, Default)]
pub(crate) struct Queries(Mutex<HashMap<u64, Collecting>>);

impl Queries {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Collecting>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An entry of query `token`'s answer. More than a query may hold
    /// are not kept.
    pub(crate) fn entry(&self, token: u64, letter: DeadLetter, body: Bytes) {
        if let Some(c) = self.lock().get_mut(&token) {
            if c.entries.len() < MAX_DEAD_LETTER_QUERY {
                c.entries.push(DeadLetterEntry { letter, body });
            }
        }
    }

    /// The end of query `token`'s answer.
    pub(crate) fn end(&self, token: u64, result: Result<DeadLetterStats, String>) {
        if let Some(c) = self.lock().remove(&token) {
            let page = result.map(|stats| DeadLetterPage {
                entries: c.entries,
                stats,
            });
            let _ = c.done.send(page);
        }
    }
}

/// The message server's dead-letter queue, from this node (see the
/// module's docs). Every call asks the server; each waits at most the
/// node's send timeout. It holds a handle of its node (which runs while
/// any handle is held).
#[derive(Debug, Clone)]
pub struct DeadLetters {
    node: crate::Node,
}

impl DeadLetters {
    pub(crate) fn new(node: crate::Node) -> DeadLetters {
        DeadLetters { node }
    }

    /// Up to `limit` entries numbered above `after` (0: from the first),
    /// with their bodies, and the queue's state.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::Refused`] without `permissions.dead_letters`;
    /// `Timeout`, `Disconnected`.
    pub async fn browse(&self, after: u64, limit: u32) -> Result<DeadLetterPage, DeadLetterError> {
        self.query(DeadLetterQuery {
            after,
            limit,
            bodies: true,
            ..DeadLetterQuery::default()
        })
        .await
    }

    /// The queue's state: entries, bytes, what it could not hold.
    ///
    /// # Errors
    ///
    /// As [`DeadLetters::browse`].
    pub async fn stats(&self) -> Result<DeadLetterStats, DeadLetterError> {
        let page = self
            .query(DeadLetterQuery {
                after: u64::MAX,
                limit: 1,
                ..DeadLetterQuery::default()
            })
            .await?;
        Ok(page.stats)
    }

    /// Takes the entries numbered `ids` out of the queue, and returns them
    /// with their bodies (those still there: another node may have taken
    /// some first).
    ///
    /// # Errors
    ///
    /// As [`DeadLetters::browse`].
    pub async fn take(&self, ids: &[u64]) -> Result<Vec<DeadLetterEntry>, DeadLetterError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(MAX_DEAD_LETTER_QUERY) {
            let page = self
                .query(DeadLetterQuery {
                    ids: chunk.to_vec(),
                    limit: chunk.len() as u32,
                    take: true,
                    bodies: true,
                    ..DeadLetterQuery::default()
                })
                .await?;
            out.extend(page.entries);
        }
        Ok(out)
    }

    /// Sends entry `id` again from this node, to its target and service,
    /// as an acknowledged message with `options`, and takes it out of the
    /// queue once the send succeeded.
    ///
    /// # Errors
    ///
    /// [`DeadLetterError::NotFound`] if it is not in the queue;
    /// [`DeadLetterError::Replay`] if the send failed (the entry stays);
    /// otherwise as [`DeadLetters::browse`].
    pub async fn replay(
        &self,
        id: u64,
        options: &SendOptions,
    ) -> Result<DeliveryReport, DeadLetterError> {
        let page = self
            .query(DeadLetterQuery {
                ids: vec![id],
                limit: 1,
                bodies: true,
                ..DeadLetterQuery::default()
            })
            .await?;
        let Some(entry) = page.entries.into_iter().next() else {
            return Err(DeadLetterError::NotFound(id));
        };
        // Not filed again if it fails: its entry stays.
        let report = self
            .node
            .send_filing(
                entry.letter.target.clone(),
                &entry.letter.service,
                entry.body,
                options,
                false,
            )
            .await
            .map_err(|source| DeadLetterError::Replay { id, source })?;
        tracing::info!(id, target = %entry.letter.target, "dead letter replayed");
        self.take(&[id]).await?;
        Ok(report)
    }

    async fn query(&self, mut query: DeadLetterQuery) -> Result<DeadLetterPage, DeadLetterError> {
        let rt = self.node.runtime();
        let server = &rt.server;
        let token = server.next_token();
        query.token = token;
        let (done, rx) = oneshot::channel();
        server.dead_letters.lock().insert(
            token,
            Collecting {
                entries: Vec::new(),
                done,
            },
        );
        let timeout = rt.config.send_timeout();
        let frame = OutFrame::control(Header::DeadLetters(Box::new(query)));
        let answer = tokio::time::timeout(timeout, async {
            server
                .queue
                .push(frame, Lane::Control, transports::Wait::Forever)
                .await
                .map_err(|_| DeadLetterError::Disconnected)?;
            rx.await.map_err(|_| DeadLetterError::Disconnected)
        })
        .await;
        match answer {
            Ok(Ok(Ok(page))) => Ok(page),
            Ok(Ok(Err(reason))) => Err(DeadLetterError::Refused(reason)),
            Ok(Err(e)) => {
                server.dead_letters.lock().remove(&token);
                Err(e)
            }
            Err(_) => {
                server.dead_letters.lock().remove(&token);
                Err(DeadLetterError::Timeout(timeout))
            }
        }
    }
}

/// A message this node gives up on, to file as a dead letter.
#[derive(Debug, Clone)]
pub(crate) struct GivenUp<'a> {
    pub(crate) sender: &'a NodeId,
    pub(crate) target: &'a Target,
    pub(crate) service: &'a str,
    pub(crate) priority: Priority,
    pub(crate) reason: DeadReason,
    pub(crate) body: Bytes,
}

impl Runtime {
    /// Files a message this node gave up on in the message server's
    /// dead-letter queue (see [`Filer::file`]).
    pub(crate) fn file_dead_letter(&self, given_up: GivenUp<'_>) {
        self.filer().file(given_up);
    }

    /// What files this node's dead letters, for the parts of the node that
    /// do not hold the runtime (inboxes).
    pub(crate) fn filer(&self) -> Filer {
        Filer {
            id: self.id.clone(),
            queue: self.server.queue.downgrade(),
            counters: self.counters.clone(),
        }
    }
}

/// Files this node's dead letters in the message server's queue, over its
/// link to the server (held weakly: an inbox kept by the application does
/// not keep the node's link).
#[derive(Debug, Clone)]
pub(crate) struct Filer {
    id: NodeId,
    queue: transports::WeakOutQueue,
    counters: std::sync::Arc<crate::counters::Counters>,
}

impl Filer {
    /// This node.
    pub(crate) fn id(&self) -> &NodeId {
        &self.id
    }

    /// Counts a message found expired here.
    pub(crate) fn count_expired(&self) {
        self.counters
            .expired
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Files `given_up`. Never waits: if the link to the server has no
    /// room or is down, the dead letter is counted
    /// (`dead_letters_unfiled`) and logged, not lost silently.
    pub(crate) fn file(&self, given_up: GivenUp<'_>) {
        let entry = DeadLetter {
            id: 0,
            sender: given_up.sender.clone(),
            target: given_up.target.clone(),
            service: given_up.service.to_owned(),
            priority: given_up.priority,
            reason: given_up.reason,
            at_unix_ms: crate::options::unix_ms(),
            filed_by: String::new(),
            body_bytes: given_up.body.len() as u64,
        };
        tracing::debug!(target = %entry.target, service = %entry.service, reason = %entry.reason, "message dead-lettered");
        let frame = OutFrame::Parts {
            header: Header::DeadLetter(Box::new(entry)),
            body: given_up.body,
        };
        let pushed = match self.queue.upgrade() {
            Some(queue) => queue.try_push(frame, Lane::Control),
            None => Err(PushError::Closed(Box::new(frame))),
        };
        match pushed {
            Ok(()) => {
                self.counters
                    .dead_letters_filed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(PushError::Full(_) | PushError::Congested | PushError::Closed(_)) => {
                let unfiled = self
                    .counters
                    .dead_letters_unfiled
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                // Every one counted; the 1st, 2nd, 4th, 8th... logged.
                if unfiled.is_power_of_two() {
                    tracing::warn!(unfiled, "dead letters could not be filed: the link to the message server is full or down (counted in dead_letters_unfiled)");
                }
            }
        }
    }
}

/// Whether an acknowledged message of `kind` that failed with `failure`
/// at its sender is filed by the sender: a target gone for good; not an
/// expiry (whoever found it expired filed it), nor a refusal by
/// permissions (the message server filed it).
pub(crate) fn sender_files(kind: MessageKind, failure: &SendError) -> Option<DeadReason> {
    if kind != MessageKind::Send {
        return None;
    }
    match failure {
        SendError::UnknownTarget(_) | SendError::TargetStopped { .. } => {
            Some(DeadReason::TargetGone)
        }
        _ => None,
    }
}

/// The wire's word for a send's failure, for a dead letter.
pub(crate) fn failure_of(error: &SendError) -> transports::protocol::DeliveryFailure {
    use transports::protocol::DeliveryFailure;
    match error {
        SendError::Busy { .. } => DeliveryFailure::ReceiverBusy,
        SendError::Overloaded { .. } => DeliveryFailure::ReceiverOverloaded,
        SendError::UnknownTarget(_) => DeliveryFailure::UnknownTarget,
        SendError::TargetStopped { .. } => DeliveryFailure::TargetStopped,
        SendError::NotPermitted { .. } => DeliveryFailure::NotPermitted,
        SendError::Expired { .. } => DeliveryFailure::Expired,
        SendError::StillQueued { cause, .. } => failure_of(cause),
        other => DeliveryFailure::Rejected(other.to_string()),
    }
}
