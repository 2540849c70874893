//! Processors: [`crate::Node::serve`] runs a handler for a service's
//! messages on a fixed number of processor tasks.
//!
//! One feeder task takes the service's messages from its inbox into a
//! queue per sender, holding at most as many as the inbox does (the rest
//! wait in the inbox, whose limits slow the senders down). Each processor
//! takes the sender that has waited longest, takes up to
//! `max_in_a_row` of its messages and handles them one after another, then
//! puts the sender back at the end of the line if it has more. So:
//!
//! - messages from one sender are handled in the order they arrived (a
//!   sender is with one processor at a time);
//! - while other senders wait, no processor handles more than
//!   `max_in_a_row` messages of one sender in a row;
//! - what the processors hold counts in the node's busy backlog until
//!   handled.
//!
//! Tasks: one feeder and one per processor, for the life of the service;
//! none per message.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use transports::protocol::NodeId;

use crate::inbox::{Held, Inbox, Message};
use crate::options::AckMode;
use transports::protocol::{AckStatus, DeliveryFailure};

/// What a handler returns. An error is logged and counted
/// ([`ServingStats::failed`]); a request it did not answer is answered
/// `NoReply` when its message is dropped.
pub type HandlerResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// How a service is served; the defaults are the config's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeOptions {
    processors: Option<usize>,
    max_in_a_row: Option<usize>,
    ack: AckMode,
}

impl ServeOptions {
    /// The config's defaults (`node.processor_concurrency`,
    /// `node.max_in_a_row`).
    pub fn new() -> ServeOptions {
        ServeOptions::default()
    }

    /// Messages of this service handled at once (at least 1).
    pub fn processors(mut self, n: usize) -> ServeOptions {
        self.processors = Some(n.max(1));
        self
    }

    /// Messages of one sender a processor handles in a row while others
    /// wait (at least 1).
    pub fn max_in_a_row(mut self, n: usize) -> ServeOptions {
        self.max_in_a_row = Some(n.max(1));
        self
    }

    /// When a `send` to the service is acknowledged: on receipt (the
    /// default), or once its handler returned `Ok` (an `Err` goes back to
    /// the sender as `SendError::Rejected` with the error's text).
    pub fn ack(mut self, mode: AckMode) -> ServeOptions {
        self.ack = mode;
        self
    }

    pub(crate) fn ack_mode(&self) -> AckMode {
        self.ack
    }

    pub(crate) fn resolve(&self, config: &cluster_config::Config) -> (usize, usize) {
        (
            self.processors
                .unwrap_or(config.node.processor_concurrency)
                .max(1),
            self.max_in_a_row.unwrap_or(config.node.max_in_a_row).max(1),
        )
    }
}

/// What a served service did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServingStats {
    /// Messages handled (the handler returned).
    pub handled: u64,
    /// Of those, the handler returned an error.
    pub failed: u64,
    /// The most messages of one sender a processor took in a row while
    /// another sender waited: at most `max_in_a_row`.
    pub longest_run_while_others_waited: u64,
    /// Messages taken from the inbox, not yet handled.
    pub held: usize,
}

/// A service being served by processors. Dropping it (or [`Serving::stop`])
/// stops the service: the processors finish the message in hand, and
/// what waits is dropped (unanswered requests get `NoReply`).
#[derive(Debug)]
pub struct Serving {
    service: String,
    pool: Arc<Pool>,
    stop: CancellationToken,
}

impl Serving {
    /// The service served.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// What it did so far.
    pub fn stats(&self) -> ServingStats {
        let held = self.pool.lock().queued;
        ServingStats {
            handled: self.pool.handled.load(Ordering::Relaxed),
            failed: self.pool.failed.load(Ordering::Relaxed),
            longest_run_while_others_waited: self.pool.longest_run.load(Ordering::Relaxed),
            held: held + self.pool.in_hand.load(Ordering::Relaxed),
        }
    }

    /// Stops serving (see [`Serving`]).
    pub fn stop(self) {}
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.cancel();
        self.pool.work.notify_waiters();
        self.pool.room.notify_waiters();
    }
}

/// The scheduler the feeder and the processors share.
#[derive(Debug)]
struct Pool {
    state: Mutex<PoolState>,
    /// A sender became ready, or the pool closed.
    work: Notify,
    /// The feeder may take more.
    room: Notify,
    max_in_a_row: usize,
    /// Messages the pool holds at most (the rest wait in the inbox).
    capacity: usize,
    held: Held,
    handled: AtomicU64,
    failed: AtomicU64,
    longest_run: AtomicU64,
    /// Messages taken by processors, not yet handled.
    in_hand: AtomicUsize,
}

#[derive(Debug, Default)]
struct PoolState {
    senders: HashMap<NodeId, SenderQueue>,
    /// Senders with messages and no processor, longest waiting first.
    ready: VecDeque<NodeId>,
    /// Messages in the senders' queues.
    queued: usize,
    /// The inbox ended: nothing more comes.
    drained: bool,
}

#[derive(Debug, Default)]
struct SenderQueue {
    messages: VecDeque<Message>,
    /// A processor has this sender.
    running: bool,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Every step leaves the state consistent: keep it after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serves `inbox` with `processors` tasks running `handler`.
pub(crate) fn start<F, Fut>(
    rt: &crate::runtime::Runtime,
    mut inbox: Inbox,
    processors: usize,
    max_in_a_row: usize,
    handler: F,
) -> Serving
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let service = inbox.service().to_owned();
    let held = inbox.holding();
    let pool = Arc::new(Pool {
        state: Mutex::new(PoolState::default()),
        work: Notify::new(),
        room: Notify::new(),
        max_in_a_row,
        capacity: rt.config.node.inbox_capacity.max(processors * max_in_a_row),
        held,
        handled: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        longest_run: AtomicU64::new(0),
        in_hand: AtomicUsize::new(0),
    });
    // Stops with the node, or with the handle.
    let stop = rt.cancel.child_token();
    let handler = Arc::new(handler);
    rt.tasks.spawn(feed(pool.clone(), inbox, stop.clone()));
    for _ in 0..processors {
        rt.tasks.spawn(process(
            pool.clone(),
            handler.clone(),
            stop.clone(),
            service.clone(),
        ));
    }
    Serving {
        service,
        pool,
        stop,
    }
}

/// Takes messages from the inbox into the senders' queues while the pool
/// has room.
async fn feed(pool: Arc<Pool>, mut inbox: Inbox, stop: CancellationToken) {
    loop {
        // Room first: what does not fit waits in the inbox.
        loop {
            let room = pool.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if pool.lock().queued < pool.capacity {
                break;
            }
            tokio::select! {
                () = stop.cancelled() => return close(&pool, inbox),
                () = room => {}
            }
        }
        let message = tokio::select! {
            () = stop.cancelled() => return close(&pool, inbox),
            m = inbox.recv() => m,
        };
        let Some(message) = message else {
            pool.lock().drained = true;
            pool.work.notify_waiters();
            return;
        };
        let ready = {
            let mut state = pool.lock();
            let sender = message.sender().clone();
            let queue = state.senders.entry(sender.clone()).or_default();
            let became_ready = queue.messages.is_empty() && !queue.running;
            queue.messages.push_back(message);
            state.queued += 1;
            if became_ready {
                state.ready.push_back(sender);
            }
            became_ready
        };
        if ready {
            pool.work.notify_one();
        }
    }
}

/// Stopped: the queued messages are dropped (each one's held place given
/// back), and the processors are told.
fn close(pool: &Pool, inbox: Inbox) {
    let dropped: Vec<Message> = {
        let mut state = pool.lock();
        state.drained = true;
        state.ready.clear();
        state.queued = 0;
        state
            .senders
            .drain()
            .flat_map(|(_, q)| q.messages)
            .collect()
    };
    for _ in &dropped {
        pool.held.done();
    }
    drop(dropped);
    drop(inbox);
    pool.work.notify_waiters();
}

/// One processor: takes the longest-waiting sender's next messages, up to
/// `max_in_a_row`, and handles them in order.
async fn process<F, Fut>(pool: Arc<Pool>, handler: Arc<F>, stop: CancellationToken, service: String)
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    loop {
        let taken = loop {
            let work = pool.work.notified();
            tokio::pin!(work);
            work.as_mut().enable();
            {
                let mut state = pool.lock();
                if let Some(sender) = state.ready.pop_front() {
                    let others_wait = !state.ready.is_empty();
                    let queue = state.senders.entry(sender.clone()).or_default();
                    queue.running = true;
                    let n = queue.messages.len().min(pool.max_in_a_row);
                    let batch: Vec<Message> = queue.messages.drain(..n).collect();
                    state.queued -= n;
                    if others_wait {
                        pool.longest_run.fetch_max(n as u64, Ordering::Relaxed);
                    }
                    break Some((sender, batch));
                }
                if state.drained {
                    break None;
                }
            }
            tokio::select! {
                () = stop.cancelled() => break None,
                () = work => {}
            }
        };
        let Some((sender, batch)) = taken else {
            return;
        };
        pool.room.notify_one();
        pool.in_hand.fetch_add(batch.len(), Ordering::Relaxed);
        let mut batch = batch.into_iter();
        for mut message in batch.by_ref() {
            // Acknowledged on processing: after the handler, by its
            // result.
            let ack = message.take_ack();
            let result = handler(message).await;
            if let Some(ack) = ack {
                let status = match &result {
                    Ok(()) => AckStatus::Accepted,
                    Err(e) => AckStatus::Failed(DeliveryFailure::Rejected(e.to_string())),
                };
                ack.send(status).await;
            }
            pool.in_hand.fetch_sub(1, Ordering::Relaxed);
            pool.held.done();
            pool.handled.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = result {
                pool.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%service, %sender, error = %e, "handler failed");
            }
            if stop.is_cancelled() {
                break;
            }
        }
        // Stopped mid-batch: the rest is dropped.
        for _ in batch {
            pool.in_hand.fetch_sub(1, Ordering::Relaxed);
            pool.held.done();
        }
        let more = {
            let mut state = pool.lock();
            let more = match state.senders.get_mut(&sender) {
                Some(q) if !q.messages.is_empty() => {
                    q.running = false;
                    true
                }
                _ => {
                    state.senders.remove(&sender);
                    false
                }
            };
            if more {
                state.ready.push_back(sender);
            }
            more
        };
        if more {
            pool.work.notify_one();
        }
    }
}
