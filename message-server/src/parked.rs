//! Messages parked for receivers whose queues are full, so that one
//! receiver that does not keep up never holds up its sender's messages to
//! the others.
//!
//! A connection's read loop routes each message into its receivers'
//! queues. When a receiver's queue is full (and stays full for
//! `message_server.park_after_ms`), the message is parked here instead,
//! in a line of its own for that receiver; the
//! sender's later messages of the same priority to that receiver join the
//! line behind it (the order from one sender to one receiver holds per
//! priority), while its more urgent messages to that receiver, and its
//! messages to everyone else, go on. The head of each line waits for room in its
//! receiver's queue, all lines at once; a head that finds room takes the
//! line with it as far as the room goes.
//!
//! While a sender has a line for a receiver, that sender is told the
//! receiver is busy (a membership update sent to it alone): it holds its
//! messages for the receiver (bounded by their timeouts) instead of
//! pouring them into the server. `AnyOf` passes over a receiver anyone
//! has a line for (see `Session::is_busy`). A line ends, and the sender
//! hears the receiver's own busy state again once everything parked went
//! into the receiver's queue and the receiver's writer has taken half of
//! what the queue then held (and at least [`MIN_BUSY`] after the line
//! began): the sender resumes while the receiver still has work, a
//! stopped receiver stays busy, and a sender hears of it at most once per
//! [`MIN_BUSY`].
//!
//! A line is bounded (`message_server.park_bytes`), and so is all a
//! sender parks across its lines (`message_server.park_sender_bytes`) and
//! all the server parks (half its memory budget, so that parking never
//! leaves the queues nothing; every parked byte is also taken from the
//! memory budget itself): a message that does not fit is refused at once
//! as overloaded, to its sender and for that receiver only (a one-way
//! message as a failure its sender counts). A
//! parked message waits at most `message_server.slow_consumer_ms`; then
//! it is refused as overloaded, and a receiver that read nothing at all
//! meanwhile is cut off, as before parking existed.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;
use transports::io::Budget;
use transports::protocol::{DeliveryFailure, NodeId, Priority};
use transports::{OutFrame, OutQueue, PushError, Wait};

use crate::server::Session;

/// Bytes a parked message is counted at beyond its frame: the line's own
/// bookkeeping, so that many tiny messages are bounded too.
const OVERHEAD_BYTES: usize = 64;

/// The shortest time a line lasts: a receiver made busy by its queue stays
/// so at least this long (every change is sent to every member).
pub(crate) const MIN_BUSY: Duration = Duration::from_millis(1);

/// A receiver's answer for one parked message, for the sender to hear.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The message's number.
    pub(crate) seq: u64,
    /// The receiver it was for.
    pub(crate) receiver: NodeId,
    /// Why it did not get there.
    pub(crate) failure: DeliveryFailure,
}

/// What came of the lines since the last look.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Messages that reached their receivers' queues.
    pub(crate) delivered: usize,
    /// Their bytes (whole frames).
    pub(crate) delivered_bytes: usize,
    /// Messages that did not, to be answered.
    pub(crate) refused: Vec<Refusal>,
    /// Receivers to cut off for reading nothing while a message waited,
    /// and their queues (closed once the refusals are answered).
    pub(crate) cut_off: Vec<(NodeId, OutQueue)>,
    /// Receivers whose line ended: the sender may send to them again.
    pub(crate) relieved: Vec<NodeId>,
}

/// A parked message.
struct Waiting {
    raw: Bytes,
    seq: u64,
    /// The class it goes in.
    priority: Priority,
    /// When it is refused if it has not found room.
    deadline: Instant,
}

impl Waiting {
    /// What it counts against its line and the budget.
    fn charge(&self) -> usize {
        self.raw.len() + OVERHEAD_BYTES
    }
}

/// One receiver's parked messages, oldest first.
struct Line {
    receiver: NodeId,
    incarnation: u64,
    queue: OutQueue,
    /// The receiver's session: its count of lines.
    session: Arc<Session>,
    /// When the line may end at the earliest.
    until: Instant,
    /// Whether everything parked went in, and it waits out its shortest
    /// time.
    draining: bool,
    waiting: VecDeque<Waiting>,
    /// Bytes charged for `waiting`.
    bytes: usize,
    /// Whether the head's push is under way.
    pushing: bool,
    /// Bytes the receiver's writer had written when the head's push began:
    /// none since, and it reads nothing at all.
    written: u64,
    /// The priority of the message parked last: the class whose queue the
    /// line's drain waits on.
    priority: Priority,
    /// How many of `waiting` are of each priority.
    parked_at: [usize; Priority::ALL.len()],
}

impl Line {
    /// Takes the oldest waiting message off the line.
    fn pop(&mut self) -> Option<Waiting> {
        let head = self.waiting.pop_front()?;
        self.parked_at[head.priority.index()] -= 1;
        Some(head)
    }
}

/// How a line's wait ended.
struct Pushed {
    receiver: NodeId,
    incarnation: u64,
    /// The head's push; `None` for the drain wait of a line with nothing
    /// parked.
    result: Option<Result<(), PushError>>,
}

type PushFuture = Pin<Box<dyn Future<Output = Pushed> + Send>>;

/// The pushes under way. Behind a mutex only to be `Sync` (the futures
/// are not): it is only ever reached through `&mut`, never locked.
type Pushes = Mutex<FuturesUnordered<PushFuture>>;

fn pushes(pushes: &mut Pushes) -> &mut FuturesUnordered<PushFuture> {
    pushes.get_mut().unwrap_or_else(PoisonError::into_inner)
}

/// The bounds of parking.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Bytes one line holds at most (`message_server.park_bytes`; 0 turns
    /// parking off).
    pub(crate) line_bytes: usize,
    /// Bytes one sender's lines hold at most, together
    /// (`message_server.park_sender_bytes`).
    pub(crate) sender_bytes: usize,
    /// The server's memory budget, which every parked byte draws on.
    pub(crate) budget: Arc<Budget>,
    /// What every sender's parked bytes draw on together (see
    /// `Shared::parked`).
    pub(crate) parked: Arc<Budget>,
    /// How long a parked message waits for room.
    pub(crate) wait: Duration,
}

/// The bytes one sender has parked, and what they are taken from.
struct Charges {
    limits: Limits,
    /// Bytes charged across this sender's lines.
    total: usize,
}

impl Charges {
    /// Takes `charge` for a new parked message if every bound has room
    /// for it. While nothing of this sender's is parked, a message larger
    /// than the sender's bound may park alone (it could never park
    /// otherwise).
    fn take(&mut self, charge: usize) -> bool {
        if self.total > 0 && self.total + charge > self.limits.sender_bytes {
            return false;
        }
        if !self.limits.parked.try_take(charge) {
            return false;
        }
        if !self.limits.budget.try_take(charge) {
            self.limits.parked.give(charge);
            return false;
        }
        self.total += charge;
        true
    }

    /// Gives back what a message no longer parked was charged.
    fn give(&mut self, charge: usize) {
        self.limits.budget.give(charge);
        self.limits.parked.give(charge);
        self.total -= charge;
    }
}

/// One sender connection's parked messages.
pub(crate) struct Parked {
    lines: Vec<Line>,
    pushes: Pushes,
    charges: Charges,
}

impl Parked {
    /// Lines within `limits`.
    pub(crate) fn new(limits: Limits) -> Parked {
        Parked {
            lines: Vec::new(),
            pushes: Mutex::new(FuturesUnordered::new()),
            charges: Charges { limits, total: 0 },
        }
    }

    /// Whether nothing is parked (the read loop's fast path).
    pub(crate) fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Whether messages of `priority` wait for this receiver: a message of
    /// that priority to it must join them rather than overtake them (order
    /// holds per priority; a more urgent message passes a line of less
    /// urgent ones).
    pub(crate) fn holds(&self, receiver: &NodeId, incarnation: u64, priority: Priority) -> bool {
        !self.lines.is_empty()
            && self
                .find(receiver, incarnation)
                .is_some_and(|i| self.lines[i].parked_at[priority.index()] > 0)
    }

    fn find(&self, receiver: &NodeId, incarnation: u64) -> Option<usize> {
        self.lines
            .iter()
            .position(|l| l.incarnation == incarnation && l.receiver == *receiver)
    }

    /// Parks `raw` (message `seq`, of `priority`) for `receiver`, whose queue is full or
    /// who has messages parked already. Whether this began the receiver's
    /// line (it is busy now for this sender: the caller tells it).
    ///
    /// # Errors
    ///
    /// [`DeliveryFailure::ReceiverOverloaded`] when the receiver's line,
    /// the sender's parked bytes, the server's parked bytes or its memory
    /// budget have no room for it, or parking is off: the message is
    /// refused for this receiver only.
    pub(crate) fn park(
        &mut self,
        receiver: &NodeId,
        incarnation: u64,
        queue: &OutQueue,
        session: &Arc<Session>,
        raw: Bytes,
        (seq, priority): (u64, Priority),
    ) -> Result<bool, DeliveryFailure> {
        let waiting = Waiting {
            raw,
            seq,
            priority,
            deadline: Instant::now() + self.charges.limits.wait,
        };
        let charge = waiting.charge();
        let line_bytes = self.charges.limits.line_bytes;
        if line_bytes == 0 {
            // Parking is off: a full queue refuses at once.
            return Err(DeliveryFailure::ReceiverOverloaded);
        }
        // A line takes its first message whatever its size (a frame larger
        // than the line could never park otherwise), later ones while they
        // fit.
        let found = self.find(receiver, incarnation);
        if let Some(i) = found {
            if !self.lines[i].waiting.is_empty() && self.lines[i].bytes + charge > line_bytes {
                return Err(DeliveryFailure::ReceiverOverloaded);
            }
        }
        if !self.charges.take(charge) {
            return Err(DeliveryFailure::ReceiverOverloaded);
        }
        let (index, first) = match found {
            Some(i) => (i, false),
            None => {
                session.parked_lines.fetch_add(1, Ordering::Relaxed);
                let first = true;
                self.lines.push(Line {
                    receiver: receiver.clone(),
                    incarnation,
                    queue: queue.clone(),
                    session: session.clone(),
                    until: Instant::now() + MIN_BUSY,
                    draining: false,
                    waiting: VecDeque::new(),
                    bytes: 0,
                    pushing: false,
                    written: 0,
                    priority,
                    parked_at: [0; Priority::ALL.len()],
                });
                (self.lines.len() - 1, first)
            }
        };
        let line = &mut self.lines[index];
        line.bytes += charge;
        line.priority = priority;
        line.parked_at[priority.index()] += 1;
        line.waiting.push_back(waiting);
        if !line.pushing {
            Self::start_push(line, pushes(&mut self.pushes));
        }
        Ok(first)
    }

    /// Starts the wait of `line`, whose messages all went in, for its
    /// receiver's writer to take half of what its queue holds now (a
    /// writer stuck on a full socket takes nothing), and for its shortest
    /// time to pass.
    fn start_drain(line: &mut Line, pushes: &mut FuturesUnordered<PushFuture>) {
        line.draining = true;
        let until = line.until;
        let receiver = line.receiver.clone();
        let incarnation = line.incarnation;
        let queue = line.queue.clone();
        let priority = line.priority;
        let half = queue.queued_at(priority) / 2;
        pushes.push(Box::pin(async move {
            tokio::time::sleep_until(until).await;
            queue.taken_down_to(priority, half).await;
            Pushed {
                receiver,
                incarnation,
                result: None,
            }
        }));
    }

    /// Ends the line at `index`.
    fn end_line(&mut self, index: usize, progress: &mut Progress) {
        let line = self.lines.swap_remove(index);
        self.charges.give(line.bytes);
        line.session.parked_lines.fetch_sub(1, Ordering::Relaxed);
        progress.relieved.push(line.receiver);
    }

    /// Starts the push of `line`'s head.
    fn start_push(line: &mut Line, pushes: &mut FuturesUnordered<PushFuture>) {
        let Some(head) = line.waiting.front() else {
            return;
        };
        line.pushing = true;
        line.written = line.queue.written_bytes();
        let queue = line.queue.clone();
        let raw = head.raw.clone();
        let (deadline, priority) = (head.deadline, head.priority);
        let receiver = line.receiver.clone();
        let incarnation = line.incarnation;
        pushes.push(Box::pin(async move {
            let result = queue
                .push_at(OutFrame::Raw(raw), priority, Wait::Until(deadline))
                .await;
            Pushed {
                receiver,
                incarnation,
                result: Some(result),
            }
        }));
    }

    /// Waits until some head's push ends, and moves its line on. Pending
    /// for ever while nothing is parked.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a push that ended is taken in the same poll that sees
    /// it end.
    pub(crate) async fn progress(&mut self) -> Progress {
        let mut progress = Progress::default();
        match pushes(&mut self.pushes).next().await {
            Some(pushed) => self.pushed(pushed, &mut progress),
            None => std::future::pending().await,
        }
        progress
    }

    /// What ended without waiting, if anything did.
    pub(crate) fn poll_progress(&mut self) -> Option<Progress> {
        if pushes(&mut self.pushes).is_empty() {
            return None;
        }
        let waker = futures_util::task::noop_waker_ref();
        let mut cx = std::task::Context::from_waker(waker);
        let mut progress = Progress::default();
        let mut any = false;
        while let std::task::Poll::Ready(Some(pushed)) =
            pushes(&mut self.pushes).poll_next_unpin(&mut cx)
        {
            any = true;
            self.pushed(pushed, &mut progress);
        }
        any.then_some(progress)
    }

    /// A head's push ended: its line moves on as far as the room goes.
    fn pushed(&mut self, pushed: Pushed, progress: &mut Progress) {
        let Some(index) = self.find(&pushed.receiver, pushed.incarnation) else {
            return;
        };
        let line = &mut self.lines[index];
        let Some(result) = pushed.result else {
            // Drained: the line ends, unless messages were parked since
            // (their push is under way; a drain follows them).
            line.draining = false;
            if line.waiting.is_empty() {
                self.end_line(index, progress);
            }
            return;
        };
        line.pushing = false;
        let Some(head) = line.pop() else {
            return;
        };
        let charge = head.charge();
        line.bytes -= charge;
        self.charges.give(charge);
        match result {
            Ok(()) => {
                progress.delivered += 1;
                progress.delivered_bytes += head.raw.len();
            }
            Err(PushError::Closed(_)) => progress.refused.push(Refusal {
                seq: head.seq,
                receiver: line.receiver.clone(),
                failure: DeliveryFailure::TargetStopped,
            }),
            Err(PushError::Full(_) | PushError::Congested) => {
                if line.queue.written_bytes() == line.written && line.queue.holds_frames() {
                    // Not a byte read while the message waited: the
                    // receiver does not read at all (it may still
                    // heartbeat). Cut off once its sender has heard of
                    // this message (before it hears the receiver left);
                    // what is parked behind is then refused as stopped.
                    progress
                        .cut_off
                        .push((line.receiver.clone(), line.queue.clone()));
                }
                progress.refused.push(Refusal {
                    seq: head.seq,
                    receiver: line.receiver.clone(),
                    failure: DeliveryFailure::ReceiverOverloaded,
                });
            }
        }
        // The rest, as far as the room goes without waiting.
        while let Some(next) = line.waiting.front() {
            let frame = OutFrame::Raw(next.raw.clone());
            let failure = match line.queue.try_push_at(frame, next.priority) {
                Ok(()) => None,
                Err(PushError::Closed(_)) => Some(DeliveryFailure::TargetStopped),
                Err(PushError::Full(_) | PushError::Congested) => {
                    if next.deadline > Instant::now() {
                        break;
                    }
                    Some(DeliveryFailure::ReceiverOverloaded)
                }
            };
            let Some(done) = line.pop() else {
                break;
            };
            let charge = done.charge();
            line.bytes -= charge;
            self.charges.give(charge);
            match failure {
                None => {
                    progress.delivered += 1;
                    progress.delivered_bytes += done.raw.len();
                }
                Some(failure) => progress.refused.push(Refusal {
                    seq: done.seq,
                    receiver: line.receiver.clone(),
                    failure,
                }),
            }
        }
        if !line.waiting.is_empty() {
            Self::start_push(line, pushes(&mut self.pushes));
        } else if !line.draining {
            Self::start_drain(line, pushes(&mut self.pushes));
        }
    }

    /// The connection ended: what fits its receivers' queues now goes in,
    /// the rest is refused (its sender is gone, and hears nothing).
    /// Returns how many were delivered and how many dropped.
    pub(crate) fn finish(&mut self) -> (usize, usize) {
        let (mut delivered, mut dropped) = (0, 0);
        pushes(&mut self.pushes).clear();
        for mut line in self.lines.drain(..) {
            line.session.parked_lines.fetch_sub(1, Ordering::Relaxed);
            let mut full = false;
            for waiting in line.waiting.drain(..) {
                self.charges.give(waiting.charge());
                if !full
                    && line
                        .queue
                        .try_push_at(OutFrame::Raw(waiting.raw), waiting.priority)
                        .is_ok()
                {
                    delivered += 1;
                } else {
                    full = true;
                    dropped += 1;
                }
            }
        }
        (delivered, dropped)
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        for line in &self.lines {
            self.charges.limits.budget.give(line.bytes);
            self.charges.limits.parked.give(line.bytes);
            line.session.parked_lines.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charges(sender_bytes: usize, parked: usize, budget: usize) -> Charges {
        Charges {
            limits: Limits {
                line_bytes: 1 << 20,
                sender_bytes,
                budget: Budget::new(budget),
                parked: Budget::new(parked),
                wait: Duration::from_secs(1),
            },
            total: 0,
        }
    }

    #[test]
    fn a_sender_parks_up_to_its_bound_and_no_further() {
        let mut c = charges(1000, 10_000, 10_000);
        assert!(c.take(400));
        assert!(c.take(600));
        assert!(!c.take(1), "past the sender's bound");
        assert_eq!(
            (c.total, c.limits.parked.used(), c.limits.budget.used()),
            (1000, 1000, 1000),
            "a refusal takes nothing"
        );
        c.give(400);
        assert!(c.take(400), "room given back is room again");
    }

    #[test]
    fn a_message_larger_than_the_sender_bound_parks_alone() {
        let mut c = charges(100, 10_000, 10_000);
        assert!(c.take(500), "nothing else parked: it may park");
        assert!(!c.take(1), "but nothing joins it");
        c.give(500);
        assert_eq!(c.total, 0);
    }

    #[test]
    fn all_senders_together_are_bounded_by_the_servers_share() {
        let parked = Budget::new(1000);
        let budget = Budget::new(10_000);
        let sender = |parked: &Arc<Budget>| Charges {
            limits: Limits {
                line_bytes: 1 << 20,
                sender_bytes: 800,
                budget: budget.clone(),
                parked: parked.clone(),
                wait: Duration::from_secs(1),
            },
            total: 0,
        };
        let (mut a, mut b) = (sender(&parked), sender(&parked));
        assert!(a.take(800));
        assert!(!b.take(300), "the server's share is spent");
        assert!(b.take(200));
        assert_eq!((parked.used(), budget.used()), (1000, 1000));
    }

    /// A line holds back later messages of its own priorities only: a more
    /// urgent one to the same receiver passes it.
    #[tokio::test]
    async fn a_line_holds_back_its_own_priorities_only() {
        let secret = transports::auth::random::<{ transports::auth::SESSION_SECRET_BYTES }>()
            .expect("random");
        let session = Arc::new(Session {
            mac: transports::auth::SessionMac::new(&secret),
            heartbeat_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            last_nonce: std::sync::atomic::AtomicU64::new(0),
            wrong_address_told: std::sync::atomic::AtomicBool::new(false),
            peer: "127.0.0.1:1".parse().expect("address"),
            since_ms: 0,
            counters: Default::default(),
            report: Mutex::new(None),
            busy: std::sync::atomic::AtomicBool::new(false),
            parked_lines: std::sync::atomic::AtomicUsize::new(0),
            backlog: std::sync::atomic::AtomicU64::new(0),
        });
        let mut parked = Parked::new(charges(1 << 20, 1 << 20, 1 << 20).limits);
        let (queue, _rx) = transports::out_queue(16, 1 << 20);
        let r = NodeId::new("r");
        let raw = Bytes::from_static(b"parked");
        assert_eq!(
            parked.park(&r, 1, &queue, &session, raw.clone(), (1, Priority::Low)),
            Ok(true),
            "a new line"
        );
        assert_eq!(
            parked.park(&r, 1, &queue, &session, raw, (2, Priority::Normal)),
            Ok(false)
        );
        assert!(parked.holds(&r, 1, Priority::Low));
        assert!(parked.holds(&r, 1, Priority::Normal));
        assert!(!parked.holds(&r, 1, Priority::High), "High passes");
        assert!(!parked.holds(&r, 1, Priority::Express), "Express passes");
        assert!(!parked.holds(&r, 2, Priority::Low), "another incarnation");
        // The queue has room: the line drains into it, in order.
        let mut delivered = 0;
        while delivered < 2 {
            delivered += parked.progress().await.delivered;
        }
        assert!(!parked.holds(&r, 1, Priority::Low));
        assert!(!parked.holds(&r, 1, Priority::Normal));
    }

    #[test]
    fn a_full_memory_budget_refuses_and_keeps_the_share_unspent() {
        let mut c = charges(10_000, 10_000, 500);
        assert!(c.take(500));
        assert!(!c.take(1));
        assert_eq!(
            c.limits.parked.used(),
            500,
            "the refused charge was given back"
        );
    }
}
