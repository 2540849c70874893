//! Service inboxes and the messages in them.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use smol_str::SmolStr;
use tokio::sync::Notify;
use transports::protocol::{NodeId, Priority};

use crate::busy::BusyWatch;
use crate::reply::{Asked, Replier};
use crate::services::AckToken;
use crate::stream::BodyStream;
use crate::SendError;
use transports::protocol::{AckStatus, DeliveryFailure};

/// A message delivered to a service on this node.
pub struct Message {
    pub(crate) sender: NodeId,
    pub(crate) sender_incarnation: u64,
    pub(crate) seq: u64,
    /// Inline for names of up to 23 bytes: no shared count to contend on
    /// between the reader that delivers and the application that drops.
    pub(crate) service: SmolStr,
    pub(crate) body: Bytes,
    /// A `Notify`: nobody is told when it enters the inbox, so it may
    /// wait past the capacity.
    pub(crate) one_way: bool,
    /// The priority it was sent with (a reply takes it too).
    pub(crate) priority: Priority,
    /// What a request or a message acknowledged on processing needs to be
    /// answered; `None` for every other message (boxed: they stay small,
    /// and dropping them checks one pointer).
    pub(crate) answering: Option<Box<Answering>>,
    /// The body of a message sent as a stream, until the application
    /// takes it (boxed: other messages stay small).
    pub(crate) stream: Option<Box<BodyStream>>,
    /// When it expires (Unix milliseconds; 0: never): an expired message
    /// is never handed to the application (see [`Inbox::recv`]).
    pub(crate) expires_ms: u64,
}

/// The part of a message that answers it: a request's replier, or the
/// acknowledgement of a message acknowledged on processing.
#[derive(Debug, Default)]
pub(crate) struct Answering {
    /// Set for requests (and only for them): the runtime that sends the
    /// reply. Weak inside: a message the application keeps does not keep
    /// its node alive.
    pub(crate) replier: Option<Arc<Replier>>,
    /// Whether the application was handed the message (a request it drops
    /// without replying is answered `NoReply`; one the node refused was
    /// answered already).
    pub(crate) handed: bool,
    /// Whether the request was answered (`reply` or `reply_err`).
    pub(crate) replied: AtomicBool,
    /// The acknowledgement of a message of a service acknowledged on
    /// processing (`AckMode::OnProcessed`), until it is sent.
    pub(crate) ack: Option<AckToken>,
    /// A recoverable message's record in this node's store, removed once
    /// the application had the message and dropped it.
    pub(crate) recovered: Option<Recovered>,
    /// Whether the message is recoverable (its record may be gone).
    pub(crate) recoverable: bool,
}

/// Where a received recoverable message is stored (see
/// [`crate::recovery`]).
#[derive(Debug)]
pub(crate) struct Recovered {
    store: clustercomm_store::Store,
    origin: NodeId,
    epoch: u64,
    pseq: u64,
}

impl Recovered {
    /// The application had the message: its record goes, and its stream's
    /// `Handed` mark rises (not awaited: lost in a crash, the message is
    /// handed over again at start).
    fn done(self) {
        if let Err(e) = self.store.commit_later(self.changes()) {
            tracing::warn!(error = %e, origin = %self.origin, pseq = self.pseq, "could not queue the removal of a handed recoverable message; it is handed over again at the next start");
        }
    }

    /// The changes that mark the message handed over.
    fn changes(&self) -> Vec<clustercomm_store::Change> {
        use clustercomm_store::{Change, Mark, MarkKind, Record, RecordKey};
        vec![
            Change::Remove(RecordKey::Incoming(
                self.origin.to_string(),
                self.epoch,
                self.pseq,
            )),
            Change::Put(Record::Mark(Mark {
                kind: MarkKind::Handed,
                node: self.origin.to_string(),
                epoch: self.epoch,
                value: self.pseq,
            })),
        ]
    }
}

impl Message {
    /// A recoverable message stored before a restart, from `origin`.
    pub(crate) fn recovered(stored: &clustercomm_store::Incoming, origin: NodeId) -> Message {
        Message {
            sender: origin,
            sender_incarnation: 0,
            seq: 0,
            service: SmolStr::new(&stored.service),
            body: Bytes::copy_from_slice(&stored.body),
            one_way: false,
            priority: Priority::ALL
                .get(stored.priority as usize)
                .copied()
                .unwrap_or(Priority::Normal),
            answering: None,
            stream: None,
            expires_ms: stored.expires_ms.unwrap_or(0),
        }
    }

    /// Ties this message to its record in `store`: once the application
    /// has had it and drops it, the record goes.
    pub(crate) fn hand_over_recovered(
        &mut self,
        store: clustercomm_store::Store,
        origin: NodeId,
        epoch: u64,
        pseq: u64,
    ) {
        let answering = self.answering.get_or_insert_with(Default::default);
        answering.recoverable = true;
        answering.recovered = Some(Recovered {
            store,
            origin,
            epoch,
            pseq,
        });
    }

    /// The store and the changes that mark this recoverable message handed
    /// over.
    fn handed_changes(&self) -> Option<(clustercomm_store::Store, Vec<clustercomm_store::Change>)> {
        let r = self.answering.as_ref()?.recovered.as_ref()?;
        Some((r.store.clone(), r.changes()))
    }

    /// The application never had this recoverable message: its record
    /// stays in the store (it is handed over at the next start).
    pub(crate) fn keep_stored(&mut self) {
        if let Some(a) = self.answering.as_mut() {
            a.recovered = None;
        }
    }

    /// Whether this is a recoverable message (kept in the receiver's store
    /// until the application has had it).
    pub fn is_recoverable(&self) -> bool {
        self.answering.as_ref().is_some_and(|a| a.recoverable)
    }

    /// This message's acknowledgement on processing, if it still waits
    /// for one.
    pub(crate) fn take_ack(&mut self) -> Option<AckToken> {
        self.answering.as_mut().and_then(|a| a.ack.take())
    }

    /// Marks the message as handed to the application.
    #[inline]
    pub(crate) fn hand_over(&mut self) {
        if let Some(a) = self.answering.as_mut() {
            a.handed = true;
        }
    }

    /// The request this message is, as an answer names it.
    fn asked(&self) -> Asked<'_> {
        Asked {
            requester: &self.sender,
            incarnation: self.sender_incarnation,
            seq: self.seq,
            service: &self.service,
            priority: self.priority,
        }
    }

    fn replier(&self) -> Option<&Arc<Replier>> {
        self.answering.as_ref().and_then(|a| a.replier.as_ref())
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        if let Some(a) = &mut self.answering {
            if a.handed {
                if let Some(recovered) = a.recovered.take() {
                    recovered.done();
                }
            }
        }
        let Some(a) = &self.answering else { return };
        if !a.handed || a.replied.load(Ordering::Relaxed) {
            return;
        }
        if let Some(replier) = &a.replier {
            replier.no_reply_now(&self.asked());
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("sender", &self.sender)
            .field("sender_incarnation", &self.sender_incarnation)
            .field("seq", &self.seq)
            .field("service", &self.service)
            .field("one_way", &self.one_way)
            .field("request", &self.is_request())
            .field("body_len", &self.body.len())
            .field("stream", &self.stream.as_ref().map(|s| s.len()))
            .field("awaits_ack", &self.awaits_ack())
            .finish()
    }
}

impl Message {
    /// The node that sent it.
    pub fn sender(&self) -> &NodeId {
        &self.sender
    }

    /// The sender's incarnation.
    pub fn sender_incarnation(&self) -> u64 {
        self.sender_incarnation
    }

    /// The sender's sequence number of this message.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The service it was addressed to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The priority it was sent with; a reply to it takes the same.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The body (a shared buffer; cloning it copies nothing).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The body of a message sent as a stream ([`crate::Node::send_stream`]),
    /// to read as it arrives; `None` for a message sent whole (its body is
    /// [`Message::body`]), or once taken. Dropping the message without
    /// taking it, or the stream before its end, gives the stream up: its
    /// sender gets an error.
    pub fn body_stream(&mut self) -> Option<BodyStream> {
        self.stream.take().map(|s| *s)
    }

    /// Whether the message came as a stream (see [`Message::body_stream`]).
    pub fn is_stream(&self) -> bool {
        self.stream.is_some()
    }

    /// Takes the body. A request whose body is taken can no longer be
    /// answered: its requester gets `NoReply` (reply first, with
    /// [`Message::body`], to answer it).
    pub fn into_body(mut self) -> Bytes {
        std::mem::take(&mut self.body)
    }

    /// Whether the sender awaits a reply.
    pub fn is_request(&self) -> bool {
        self.replier().is_some()
    }

    /// Answers a request.
    ///
    /// # Errors
    ///
    /// [`SendError::NotARequest`] if the message is not a request;
    /// [`SendError::PayloadTooLarge`] for a body over the limit;
    /// [`SendError::Shutdown`] if the node stopped.
    pub async fn reply(&self, body: impl Into<Bytes>) -> Result<(), SendError> {
        let (Some(replier), Some(a)) = (self.replier(), self.answering.as_ref()) else {
            return Err(SendError::NotARequest);
        };
        a.replied.store(true, Ordering::Relaxed);
        replier.send(&self.asked(), body.into()).await
    }

    /// Acknowledges the message as processed, for a service subscribed
    /// with `AckMode::OnProcessed`: its sender's `send` resolves
    /// delivered. Does nothing for a message acknowledged already (on
    /// receipt, or by an earlier call) or that needs none.
    pub async fn ack(&mut self) {
        if let Some(token) = self.take_ack() {
            token.send(AckStatus::Accepted).await;
        }
    }

    /// Refuses the message, for a service subscribed with
    /// `AckMode::OnProcessed`: its sender's `send` fails with
    /// `SendError::Rejected` carrying `reason`. Does nothing for a message
    /// acknowledged already. A message of such a service dropped without
    /// `ack` or `reject` is refused the same way.
    pub async fn reject(&mut self, reason: impl Into<String>) {
        if let Some(token) = self.take_ack() {
            token
                .send(AckStatus::Failed(DeliveryFailure::Rejected(reason.into())))
                .await;
        }
    }

    /// Whether the message still waits for [`Message::ack`] or
    /// [`Message::reject`].
    pub fn awaits_ack(&self) -> bool {
        self.answering.as_ref().is_some_and(|a| a.ack.is_some())
    }

    /// Answers a request with an error: the requester's `request` fails
    /// with [`SendError::Remote`] carrying `code` and `text`.
    ///
    /// # Errors
    ///
    /// As [`Message::reply`].
    pub async fn reply_err(&self, code: u32, text: impl Into<String>) -> Result<(), SendError> {
        let (Some(replier), Some(a)) = (self.replier(), self.answering.as_ref()) else {
            return Err(SendError::NotARequest);
        };
        a.replied.store(true, Ordering::Relaxed);
        replier
            .send_error(&self.asked(), Some(code), Bytes::from(text.into()))
            .await
    }
}

/// The inbox of one service: messages in arrival order.
///
/// Bounded: `node.inbox_capacity` messages in the inbox, and as many again
/// waiting to enter it (one-way messages wait in the inbox's own queue,
/// acknowledged ones with the node, so at most twice as many again when
/// both kinds wait). A message is acknowledged once it is in the inbox.
/// When both are full, the connection the next message came on is held
/// back (its sender slows down) for up to `node.inbox_wait_ms`; if the
/// application has not made room by then, that message and the following
/// ones are answered `Overloaded` until the backlog drains. The node's
/// other traffic (its own acknowledgements, replies, membership) never
/// waits longer than that. Dropping the inbox unsubscribes the service;
/// messages that arrive afterwards are answered with `NoSuchService`.
///
/// The inbox takes what has arrived in one go and hands it out from a
/// batch of its own, so a busy service takes the shared lock once per
/// batch, not once per message; the batch still counts against the
/// capacity until each message is handed out.
#[derive(Debug)]
pub struct Inbox {
    pub(crate) service: String,
    shared: Arc<Shared>,
    /// Taken from the shared queue, not yet handed out.
    batch: VecDeque<Message>,
    /// Set when processors serve the inbox: each message handed out
    /// counts in the backlog until [`Held::done`] says it was processed.
    holding: bool,
    /// Messages taken by [`Inbox::recv`] or [`Inbox::recv_many`] while
    /// the hand-over of the recoverable ones is made durable: a cancelled
    /// call leaves them here for the next (boxed: one pointer to check on
    /// every receive).
    #[allow(clippy::box_collection)]
    handing: Option<Box<VecDeque<Message>>>,
    /// Files the messages found expired as dead letters.
    filer: Option<crate::dead_letters::Filer>,
}

/// What a service's processors hold: each message taken from the inbox
/// counts in the node's busy backlog until it is done.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    shared: Arc<Shared>,
}

impl Held {
    /// One held message was processed.
    pub(crate) fn done(&self) {
        self.shared.held.fetch_sub(1, Ordering::Relaxed);
        if self.shared.is_over() {
            // The receiver's batch as far as it said (read high, never
            // low: busy ends no earlier than it should).
            self.shared.taken(self.shared.lent.load(Ordering::SeqCst));
        }
    }
}

/// The half of an inbox the node holds: the reader and the pump put
/// messages in. Dropping the last one ends the inbox.
#[derive(Debug)]
pub(crate) struct InboxSender {
    shared: Arc<Shared>,
}

/// An inbox and its sender, holding `capacity` messages; with `busy`, it
/// tells the node's busy watch when its backlog crosses a busy limit.
pub(crate) fn inbox(
    service: &str,
    capacity: usize,
    busy: Option<Arc<BusyWatch>>,
    filer: Option<crate::dead_letters::Filer>,
) -> (InboxSender, Inbox) {
    let busy = busy.map(|watch| {
        let (upper, lower) = watch.limits(capacity.max(1));
        InboxBusy {
            watch,
            upper,
            lower,
            over: AtomicBool::new(false),
        }
    });
    let shared = Arc::new(Shared {
        busy_upper: busy.as_ref().map_or(usize::MAX, |b| b.upper),
        busy,
        held: AtomicUsize::new(0),
        state: OwnLine(Mutex::new(State {
            queue: VecDeque::new(),
            waker: None,
            senders: 1,
            receiver_gone: false,
        })),
        capacity: capacity.max(1),
        lent_step: (capacity / 8).clamp(1, LENT_STEP),
        lent: OwnLine(AtomicUsize::new(0)),
        room_wanted: AtomicUsize::new(0),
        room: Notify::new(),
    });
    let inbox = Inbox {
        service: service.to_owned(),
        shared: shared.clone(),
        batch: VecDeque::new(),
        holding: false,
        handing: None,
        filer,
    };
    (InboxSender { shared }, inbox)
}

/// Messages the receiver hands out at most between two updates of
/// [`Shared::lent`] (see [`Inbox::next_taken`]); fewer in a small inbox
/// (an eighth of its capacity), so that it never looks much fuller than it
/// is.
const LENT_STEP: usize = 32;

/// A value on a cache line of its own: a thread that writes it does not
/// take its neighbours' line away from the threads that use them.
#[derive(Debug)]
#[repr(align(64))]
struct OwnLine<T>(T);

impl<T> std::ops::Deref for OwnLine<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// An application inbox's part in the node's busy state.
#[derive(Debug)]
struct InboxBusy {
    watch: Arc<BusyWatch>,
    /// Busy when this many messages are in the inbox...
    upper: usize,
    /// ...until no more than this many are.
    lower: usize,
    /// Whether this inbox reached `upper` and has not fallen to `lower`.
    /// Changed under the inbox's lock; read without it as a hint.
    over: AtomicBool,
}

#[derive(Debug)]
struct Shared {
    /// See [`InboxBusy`]; `None` for the built-in services.
    busy: Option<InboxBusy>,
    /// Its upper limit (`usize::MAX` without one), beside `held`.
    busy_upper: usize,
    /// Messages handed to a service's processors (see [`Inbox::holding`])
    /// and not yet processed: they count in the service's backlog.
    held: AtomicUsize,
    /// Written by every sender for every message.
    state: OwnLine<Mutex<State>>,
    capacity: usize,
    /// See [`LENT_STEP`].
    lent_step: usize,
    /// How many messages the receiver's batch holds: set under the lock
    /// when it takes a batch, lowered (by the receiver alone, without the
    /// lock) as it hands them out, every `lent_step` messages or when
    /// someone waits for room. Senders may read it high, never low, so
    /// the capacity holds; read high, the inbox only looks fuller than it
    /// is, by less than a step.
    lent: OwnLine<AtomicUsize>,
    /// How many places the sender waiting for room (the pump; one at a
    /// time) wants, 0 if none: the receiver notifies `room` once it may
    /// have handed that many out. Set before the waiter looks at the
    /// room, read after the receiver lowers `lent`, both sequentially
    /// consistent, so one of the two sees the other.
    room_wanted: AtomicUsize,
    room: Notify,
}

#[derive(Debug)]
struct State {
    queue: VecDeque<Message>,
    /// The receiver, waiting for a message.
    waker: Option<Waker>,
    senders: usize,
    receiver_gone: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Free places in the inbox proper, seen from a sender holding the
    /// lock.
    fn room(&self, state: &State) -> usize {
        self.capacity.saturating_sub(self.used(state))
    }

    fn used(&self, state: &State) -> usize {
        state.queue.len() + self.lent.load(Ordering::SeqCst)
    }

    /// After a message went in, under the lock: `used` messages are in
    /// the inbox now.
    #[inline]
    fn pushed(&self, used: usize) {
        // One compare per message; what the processors hold is read only
        // when they hold any.
        if used >= self.busy_upper || self.held.load(Ordering::Relaxed) > 0 {
            self.pushed_near_busy(used);
        }
    }

    #[cold]
    #[inline(never)]
    fn pushed_near_busy(&self, used: usize) {
        if let Some(b) = &self.busy {
            let used = used + self.held.load(Ordering::Relaxed);
            if used >= b.upper && !b.over.load(Ordering::Relaxed) {
                b.over.store(true, Ordering::Relaxed);
                b.watch.service_over();
            }
        }
    }

    /// After the receiver took messages, if this inbox was over its upper
    /// limit: `batch` are still in the receiver's batch.
    fn taken(&self, batch: usize) {
        let Some(b) = &self.busy else { return };
        let state = self.lock();
        let held = self.held.load(Ordering::Relaxed);
        if b.over.load(Ordering::Relaxed) && state.queue.len() + batch + held <= b.lower {
            b.over.store(false, Ordering::Relaxed);
            b.watch.service_under();
        }
    }

    /// Whether this inbox is over its busy limit (a hint, without the
    /// lock).
    fn is_over(&self) -> bool {
        self.busy
            .as_ref()
            .is_some_and(|b| b.over.load(Ordering::Relaxed))
    }

    /// Wakes the sender waiting for room if it may have enough now:
    /// `lent` is the receiver's batch (what it knows of the room without
    /// the lock; the waiter checks again).
    fn room_made(&self, lent: usize) {
        let wanted = self.room_wanted.load(Ordering::SeqCst);
        if wanted > 0
            && self.capacity.saturating_sub(lent) >= wanted
            && self.room_wanted.swap(0, Ordering::SeqCst) > 0
        {
            self.room.notify_waiters();
        }
    }
}

impl InboxSender {
    /// Puts `message` in if there is room now; gives it back if the inbox
    /// is full or its receiver is gone. A one-way message may also take one
    /// of the places past the capacity, where it waits to enter the inbox
    /// proper (nobody is to be told when it does); the caller sees to it
    /// that nothing waits before it elsewhere.
    // The message comes back by value on the hot path: boxing it would
    // allocate for every full inbox.
    #[allow(clippy::result_large_err)]
    pub(crate) fn try_send(&self, message: Message) -> Result<(), Message> {
        let waker = {
            let mut state = self.shared.lock();
            // Read once: `lent` is on the receiver's cache line. One-way
            // messages may also take the places past the capacity (as many
            // again), where they wait to enter the inbox proper.
            let used = self.shared.used(&state);
            let limit = if message.one_way {
                self.shared.capacity.saturating_mul(2)
            } else {
                self.shared.capacity
            };
            if state.receiver_gone || used >= limit {
                return Err(message);
            }
            state.queue.push_back(message);
            self.shared.pushed(used + 1);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Room for several messages at once: the inbox stays locked until the
    /// [`Slots`] are dropped, which wakes the receiver once.
    ///
    /// # Errors
    ///
    /// [`Closed`] if the receiver is gone.
    pub(crate) fn slots(&self) -> Result<Slots<'_>, Closed> {
        let state = self.shared.lock();
        if state.receiver_gone {
            return Err(Closed);
        }
        let room = self.shared.room(&state);
        Ok(Slots {
            shared: &self.shared,
            state,
            room,
            pushed: false,
        })
    }

    /// Waits until the inbox has room for `want` messages (or as many as
    /// it holds at all). One waiter at a time (the service's pump).
    ///
    /// # Errors
    ///
    /// [`Closed`] if the receiver is gone.
    pub(crate) async fn room(&self, want: usize) -> Result<(), Closed> {
        let want = want.clamp(1, self.shared.capacity);
        loop {
            let notified = self.shared.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.shared.lock();
                if state.receiver_gone {
                    return Err(Closed);
                }
                // Said before looking (see `Shared::room_wanted`).
                self.shared.room_wanted.store(want, Ordering::SeqCst);
                if self.shared.room(&state) >= want {
                    self.shared.room_wanted.store(0, Ordering::SeqCst);
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Whether the receiver is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.lock().receiver_gone
    }

    /// Messages in the inbox, the receiver's batch included, and those
    /// its processors hold.
    pub(crate) fn backlog(&self) -> usize {
        let state = self.shared.lock();
        self.shared.used(&state) + self.shared.held.load(Ordering::Relaxed)
    }

    /// How many messages the inbox holds at most.
    pub(crate) fn capacity(&self) -> usize {
        self.shared.capacity
    }
}

impl Clone for InboxSender {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        InboxSender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for InboxSender {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.lock();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
            state.waker.take()
        };
        // The last one: a waiting receiver learns the inbox has ended.
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The receiver of an inbox is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// Places in a locked inbox, from [`InboxSender::slots`].
pub(crate) struct Slots<'a> {
    shared: &'a Shared,
    state: MutexGuard<'a, State>,
    room: usize,
    pushed: bool,
}

impl Slots<'_> {
    /// Whether another message fits.
    pub(crate) fn has_room(&self) -> bool {
        self.room > 0
    }

    /// Puts `message` in; only when [`Slots::has_room`] says it fits.
    pub(crate) fn push(&mut self, message: Message) {
        debug_assert!(self.room > 0, "pushed into a full inbox");
        self.room = self.room.saturating_sub(1);
        self.state.queue.push_back(message);
        self.pushed = true;
        // The room was the capacity less what was used when the slots
        // were taken; each push took one.
        self.shared.pushed(self.shared.capacity - self.room);
    }
}

impl Drop for Slots<'_> {
    fn drop(&mut self) {
        if !self.pushed {
            return;
        }
        if let Some(waker) = self.state.waker.take() {
            // Woken after the lock is let go would be better, but the
            // guard is a field; waking under it only costs the receiver a
            // brief wait for the lock.
            waker.wake();
        }
    }
}

impl Inbox {
    /// The service this inbox serves.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The next message, or `None` once the node has shut down.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: no message is lost if the call is cancelled.
    ///
    /// A recoverable message ([`Message::is_recoverable`]) is marked handed
    /// over in the node's store, fsynced, before it is returned: after a
    /// crash it is never handed over again. (With [`Inbox::poll_recv`] and
    /// [`Inbox::try_recv`], which cannot wait for the disk, the mark is
    /// written once the message is dropped: a crash before that hands it
    /// over again at the next start.)
    pub async fn recv(&mut self) -> Option<Message> {
        if self.handing.is_none() {
            let message = std::future::poll_fn(|cx| self.poll_recv(cx)).await?;
            if !message.is_recoverable() {
                return Some(message);
            }
            self.handing = Some(Box::new(VecDeque::from([message])));
        }
        self.mark_handing().await;
        let handing = self.handing.as_mut()?;
        let message = handing.pop_front();
        if handing.is_empty() {
            self.handing = None;
        }
        message
    }

    /// Marks the recoverable messages in [`Inbox::handing`] handed over,
    /// with one fsync (done again after a cancelled wait: the same
    /// changes), so that none is ever handed over again.
    async fn mark_handing(&mut self) {
        let Some(handing) = self.handing.as_mut() else {
            return;
        };
        let mut store = None;
        let mut changes = Vec::new();
        for message in handing.iter() {
            if let Some((s, c)) = message.handed_changes() {
                store.get_or_insert(s);
                changes.extend(c);
            }
        }
        if let Some(store) = store {
            if let Err(e) = store.commit(changes).await {
                tracing::error!(error = %e, "the store could not mark recoverable messages handed over; they may be handed over again at the next start");
            }
        }
        for message in handing.iter_mut() {
            message.keep_stored();
        }
    }

    /// Up to `limit` messages (at least one: it waits for the first),
    /// appended to `buf`; how many, 0 once the node has shut down. The
    /// recoverable ones among them are marked handed over with one fsync
    /// for all, before they are returned (as [`Inbox::recv`] marks one):
    /// the way to read recoverable messages faster than one per disk
    /// flush.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: messages taken by a cancelled call come with the next.
    pub async fn recv_many(&mut self, buf: &mut Vec<Message>, limit: usize) -> usize {
        if self.handing.is_none() {
            let Some(first) = std::future::poll_fn(|cx| self.poll_recv(cx)).await else {
                return 0;
            };
            let mut taken = VecDeque::from([first]);
            while taken.len() < limit.max(1) {
                match self.try_recv() {
                    Some(message) => taken.push_back(message),
                    None => break,
                }
            }
            self.handing = Some(Box::new(taken));
        }
        self.mark_handing().await;
        let Some(handing) = self.handing.take() else {
            return 0;
        };
        let n = handing.len();
        buf.extend(*handing);
        n
    }

    /// The first message a cancelled `recv` or `recv_many` left (its mark,
    /// if it was not made, is made once it is dropped).
    fn take_handing(&mut self) -> Option<Message> {
        let handing = self.handing.as_mut()?;
        let message = handing.pop_front();
        if handing.is_empty() {
            self.handing = None;
        }
        message
    }

    /// [`Inbox::recv`] as a poll; takes from tokio's cooperative budget, as
    /// its channels do, so a service that never waits still lets the other
    /// tasks of its thread run.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        if self.handing.is_some() {
            coop.made_progress();
            return Poll::Ready(self.take_handing());
        }
        if let Some(message) = self.next_taken() {
            coop.made_progress();
            return Poll::Ready(Some(message));
        }
        let mut state = self.shared.lock();
        if !state.queue.is_empty() {
            take_batch(&self.shared, &mut state, &mut self.batch);
            drop(state);
            coop.made_progress();
            return Poll::Ready(self.next_taken());
        }
        if state.senders == 0 {
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        drop(state);
        // Empty: whoever waits for room has it.
        self.shared.room_made(0);
        Poll::Pending
    }

    /// A message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        if self.handing.is_some() {
            return self.take_handing();
        }
        if let Some(message) = self.next_taken() {
            return Some(message);
        }
        let mut state = self.shared.lock();
        if state.queue.is_empty() {
            return None;
        }
        take_batch(&self.shared, &mut state, &mut self.batch);
        drop(state);
        self.next_taken()
    }

    /// From now on each message handed out is held by processors until
    /// the returned [`Held::done`] is called for it.
    pub(crate) fn holding(&mut self) -> Held {
        self.holding = true;
        Held {
            shared: self.shared.clone(),
        }
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.batch.len() + self.shared.lock().queue.len()
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next message of the batch; its place is free again.
    ///
    /// Senders read [`Shared::lent`] for every message they put in, so
    /// writing it for every message taken would move its cache line
    /// between the threads each time (measured: about 2% of
    /// `notify`'s throughput). It is written every `lent_step` messages, when the
    /// batch is done, and whenever a sender waits for room (the waiter
    /// says so before it looks at `lent`, this reads that after it took
    /// the message, both sequentially consistent: one of the two sees the
    /// other).
    fn next_taken(&mut self) -> Option<Message> {
        loop {
            let message = self.batch.pop_front()?;
            // The clock is read only for a message that expires.
            if message.expires_ms != 0 && message.expires_ms <= crate::options::unix_ms() {
                self.expired(message);
                self.lent_taken();
                continue;
            }
            return Some(self.handed(message));
        }
    }

    /// `message` is handed to the application.
    fn handed(&mut self, mut message: Message) -> Message {
        message.hand_over();
        if self.holding {
            self.shared.held.fetch_add(1, Ordering::Relaxed);
        }
        self.lent_taken();
        message
    }

    /// A message whose time to live ran out while it waited here: never
    /// handed over. It goes to the dead-letter queue; a message that
    /// waits for its acknowledgement on processing is answered
    /// `Expired`; a recoverable one is marked handed in the store (it is
    /// done with).
    fn expired(&mut self, mut message: Message) {
        if let Some(a) = message.answering.as_mut() {
            if let Some(token) = a.ack.take() {
                token.try_send(AckStatus::Failed(DeliveryFailure::Expired));
            }
            a.handed = true;
        }
        let Some(filer) = &self.filer else {
            return;
        };
        filer.count_expired();
        let target = transports::protocol::Target::Node(filer.id().clone());
        filer.file(crate::dead_letters::GivenUp {
            sender: &message.sender,
            target: &target,
            service: &message.service,
            priority: message.priority,
            reason: transports::protocol::DeadReason::Expired,
            body: std::mem::take(&mut message.body),
        });
        // A request's replier must not answer "no reply" for it.
        if let Some(a) = message.answering.as_mut() {
            a.replied.store(true, Ordering::Relaxed);
        }
    }

    /// Bookkeeping of a message taken from the batch (see
    /// [`Inbox::next_taken`]).
    fn lent_taken(&mut self) {
        let lent = self.batch.len();
        if lent.is_multiple_of(self.shared.lent_step)
            || self.shared.room_wanted.load(Ordering::SeqCst) > 0
        {
            self.shared.lent.store(lent, Ordering::SeqCst);
            self.shared.room_made(lent);
            // A busy inbox looks whether it drained to its lower limit
            // as often as it tells senders of room.
            if self.shared.is_over() {
                self.shared.taken(lent);
            }
        }
    }
}

/// Takes everything queued into `batch` (which is empty), under the lock,
/// so senders never see the messages in neither place.
fn take_batch(shared: &Shared, state: &mut State, batch: &mut VecDeque<Message>) {
    std::mem::swap(&mut state.queue, batch);
    shared.lent.store(batch.len(), Ordering::SeqCst);
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // Requests never handed out are answered `NoReply` as they go;
        // recoverable messages stay in the store, for the next start.
        if let Some(handing) = self.handing.as_mut() {
            for m in handing.iter_mut() {
                m.keep_stored();
            }
        }
        for m in self.batch.iter_mut() {
            m.keep_stored();
            m.hand_over();
        }
        let queued = {
            let mut state = self.shared.lock();
            state.receiver_gone = true;
            if let Some(b) = &self.shared.busy {
                if b.over.swap(false, Ordering::Relaxed) {
                    b.watch.service_under();
                }
            }
            std::mem::take(&mut state.queue)
        };
        self.shared.lent.store(0, Ordering::SeqCst);
        // A sender waiting for room learns the inbox is gone.
        self.shared.room.notify_waiters();
        let mut queued = queued;
        for m in queued.iter_mut() {
            m.keep_stored();
            m.hand_over();
        }
        drop(queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls once: whether it is still pending.
    fn pending<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        f.poll(&mut Context::from_waker(Waker::noop())).is_pending()
    }

    /// An acknowledged message (it only ever takes the inbox's places).
    fn message(seq: u64) -> Message {
        let mut m = one_way(seq);
        m.one_way = false;
        m
    }

    fn one_way(seq: u64) -> Message {
        Message {
            sender: NodeId::new("a"),
            sender_incarnation: 1,
            seq,
            service: SmolStr::new("svc"),
            body: Bytes::new(),
            one_way: true,
            priority: Priority::Normal,
            answering: None,
            stream: None,
            expires_ms: 0,
        }
    }

    /// A message past its expiry is never handed out: the next one is,
    /// and the queue's room is made for both.
    #[test]
    fn expired_messages_are_never_handed_out() {
        let (tx, mut rx) = inbox("svc", 4, None, None);
        let mut old = one_way(1);
        old.expires_ms = 1;
        let mut later = one_way(2);
        later.expires_ms = u64::MAX;
        let mut gone = one_way(3);
        gone.expires_ms = crate::options::unix_ms().saturating_sub(1).max(1);
        for m in [old, later, gone, one_way(4)] {
            tx.try_send(m).expect("room");
        }
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(2));
        assert_eq!(rx.try_recv().map(|m| m.seq()), Some(4));
        assert!(rx.try_recv().is_none());
        assert!(rx.is_empty());
    }

    #[test]
    fn one_way_messages_may_wait_past_the_capacity_in_order() {
        let (tx, mut rx) = inbox("svc", 2, None, None);
        assert!(tx.try_send(message(0)).is_ok());
        assert!(tx.try_send(one_way(1)).is_ok());
        // Full for acknowledged messages, and for the pump.
        assert!(tx.try_send(message(2)).is_err());
        assert!(!tx.slots().expect("open").has_room());
        // One-way messages take the places past it, as many again.
        assert!(tx.try_send(one_way(2)).is_ok());
        assert!(tx.try_send(one_way(3)).is_ok());
        assert!(
            tx.try_send(one_way(4)).is_err(),
            "twice the capacity at most"
        );
        assert_eq!(rx.len(), 4);
        // Handing two out leaves two: the inbox proper is full until a
        // third goes.
        assert_eq!(rx.try_recv().map(|m| m.seq), Some(0));
        assert_eq!(rx.try_recv().map(|m| m.seq), Some(1));
        assert!(!tx.slots().expect("open").has_room());
        assert_eq!(rx.try_recv().map(|m| m.seq), Some(2));
        let mut slots = tx.slots().expect("open");
        assert!(slots.has_room());
        slots.push(message(5));
        drop(slots);
        let rest: Vec<u64> = std::iter::from_fn(|| rx.try_recv().map(|m| m.seq)).collect();
        assert_eq!(rest, [3, 5], "in arrival order");
    }

    #[test]
    fn the_capacity_holds_while_a_batch_is_handed_out() {
        let (tx, mut rx) = inbox("svc", 4, None, None);
        for seq in 0..4 {
            assert!(tx.try_send(message(seq)).is_ok(), "{seq} fits");
        }
        assert_eq!(tx.try_send(message(4)).map_err(|m| m.seq), Err(4), "full");
        assert_eq!(rx.len(), 4);
        // The receiver takes all four as one batch; only what it handed
        // out makes room.
        assert_eq!(rx.try_recv().map(|m| m.seq), Some(0));
        assert!(tx.try_send(message(4)).is_ok(), "one place free");
        assert!(tx.try_send(message(5)).is_err(), "still only one");
        let mut slots = tx.slots().expect("open");
        assert!(!slots.has_room());
        drop(slots);
        let seqs: Vec<u64> = std::iter::from_fn(|| rx.try_recv().map(|m| m.seq)).collect();
        assert_eq!(seqs, [1, 2, 3, 4], "in order, across batches");
        assert!(rx.is_empty());
        slots = tx.slots().expect("open");
        for seq in 6..10 {
            assert!(slots.has_room());
            slots.push(message(seq));
        }
        assert!(!slots.has_room());
        drop(slots);
        assert_eq!(rx.len(), 4);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_and_ends_with_the_last_sender() {
        let (tx, mut rx) = inbox("svc", 8, None, None);
        let other = tx.clone();
        let receiver = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(m) = rx.recv().await {
                got.push(m.seq);
            }
            got
        });
        for seq in 0..20 {
            // Wait for room as the pump does, then put it in.
            tx.room(1).await.expect("open");
            let mut slots = tx.slots().expect("open");
            assert!(slots.has_room());
            slots.push(message(seq));
            drop(slots);
            tokio::task::yield_now().await;
        }
        // The first sender gone, the other still delivers.
        drop(tx);
        other.room(1).await.expect("open");
        assert!(other.try_send(message(20)).is_ok());
        drop(other);
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), receiver)
            .await
            .expect("the receiver ends")
            .expect("no panic");
        assert_eq!(got.len(), 21, "{got:?}");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    }

    /// A pump waiting for room against a receiver handing messages out on
    /// another thread, many times over small capacities: no wakeup may be
    /// lost (the test would time out), nothing lost or reordered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_pump_is_always_woken_by_the_receiver() {
        const COUNT: u64 = 20_000;
        for capacity in [1usize, 2, 3, 8] {
            let (tx, mut rx) = inbox("svc", capacity, None, None);
            let receiver = tokio::spawn(async move {
                let mut next = 0u64;
                while let Some(m) = rx.recv().await {
                    assert_eq!(m.seq, next, "in order");
                    next += 1;
                    if next.is_multiple_of(7) {
                        tokio::task::yield_now().await;
                    }
                }
                next
            });
            let pump = tokio::spawn(async move {
                let mut seq = 0u64;
                while seq < COUNT {
                    let want = 1 + (seq as usize % capacity);
                    tx.room(want).await.expect("open");
                    let mut slots = tx.slots().expect("open");
                    while slots.has_room() && seq < COUNT {
                        slots.push(message(seq));
                        seq += 1;
                    }
                }
            });
            let within = std::time::Duration::from_secs(30);
            tokio::time::timeout(within, pump)
                .await
                .expect("the pump was always woken")
                .expect("no panic");
            let got = tokio::time::timeout(within, receiver)
                .await
                .expect("the receiver ends")
                .expect("no panic");
            assert_eq!(got, COUNT, "capacity {capacity}");
        }
    }

    #[tokio::test]
    async fn room_waits_for_the_receiver_and_fails_once_it_is_gone() {
        let (tx, mut rx) = inbox("svc", 2, None, None);
        assert!(tx.try_send(message(0)).is_ok());
        assert!(tx.try_send(message(1)).is_ok());
        let room = tx.room(2);
        tokio::pin!(room);
        assert!(pending(room.as_mut()), "no room yet");
        assert!(rx.recv().await.is_some());
        assert!(pending(room.as_mut()), "room for one, two wanted");
        assert!(rx.recv().await.is_some());
        let within = std::time::Duration::from_secs(10);
        let room = tokio::time::timeout(within, room).await;
        assert_eq!(room.expect("woken once the receiver made room"), Ok(()));
        assert!(tx.try_send(message(2)).is_ok());
        assert!(tx.try_send(message(3)).is_ok());
        let waiting = tx.room(1);
        tokio::pin!(waiting);
        assert!(pending(waiting.as_mut()));
        drop(rx);
        let waited = tokio::time::timeout(within, waiting).await;
        assert_eq!(
            waited.expect("woken when the inbox is dropped"),
            Err(Closed)
        );
        assert!(tx.is_closed());
        assert!(tx.try_send(message(4)).is_err());
        assert!(tx.slots().is_err());
    }

    /// A large inbox shows the places its receiver frees a step at a time
    /// (it never looks fuller than it is by a step or more), and at once
    /// to a sender that waits for room.
    #[test]
    fn a_large_inbox_shows_room_in_steps_and_at_once_to_a_waiter() {
        let (tx, mut rx) = inbox("svc", 256, None, None);
        assert_eq!(tx.shared.lent_step, LENT_STEP);
        for seq in 0..256 {
            assert!(tx.try_send(message(seq)).is_ok(), "{seq} fits");
        }
        assert!(tx.try_send(message(256)).is_err(), "full");
        for seq in 0..31 {
            assert_eq!(rx.try_recv().map(|m| m.seq), Some(seq));
        }
        assert!(
            tx.try_send(message(256)).is_err(),
            "not shown before a step"
        );
        assert_eq!(rx.try_recv().map(|m| m.seq), Some(31));
        for seq in 256..288 {
            assert!(tx.try_send(message(seq)).is_ok(), "{seq}: a step shown");
        }
        assert!(tx.try_send(message(288)).is_err(), "full again");
        let mut room = std::pin::pin!(tx.room(1));
        assert!(pending(room.as_mut()), "no room yet");
        assert_eq!(rx.try_recv().map(|m| m.seq), Some(32));
        assert!(!pending(room.as_mut()), "shown to the waiter at once");
        let rest: Vec<u64> = std::iter::from_fn(|| rx.try_recv().map(|m| m.seq)).collect();
        assert_eq!(rest, (33..288).collect::<Vec<_>>(), "all, in order");
    }

    /// Choices for the stress tests: a xorshift, so they vary without a
    /// dependency and repeat for a seed (the scheduling does not).
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng((0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9)) | 1)
        }

        /// A number below `n` (which is not 0).
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Message `n` of sender `from`: the sender is named `s{from}`, the
    /// number is the `seq`, and the body holds both.
    fn numbered(from: usize, n: u64, one_way: bool) -> Message {
        let mut body = Vec::with_capacity(16);
        body.extend_from_slice(&(from as u64).to_le_bytes());
        body.extend_from_slice(&n.to_le_bytes());
        Message {
            sender: NodeId::new(format!("s{from}")),
            sender_incarnation: 1,
            seq: n,
            service: SmolStr::new("svc"),
            body: Bytes::from(body),
            one_way,
            priority: Priority::Normal,
            answering: None,
            stream: None,
            expires_ms: 0,
        }
    }

    /// Which sender sent `m` and its number, checking that its sender, seq
    /// and body agree.
    fn origin(m: &Message) -> (usize, u64) {
        let body: &[u8] = m.body();
        assert_eq!(body.len(), 16, "{m:?}");
        let from = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
        let n = u64::from_le_bytes(body[8..].try_into().expect("8 bytes"));
        assert_eq!(m.seq(), n, "{m:?}");
        assert_eq!(m.sender().as_str(), format!("s{from}"), "{m:?}");
        (usize::try_from(from).expect("small"), n)
    }

    /// Polls once with the task's own waker: `Pending` instead of waiting.
    async fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await
    }

    /// Checks, at the receiver, the bounds the inbox promises: it holds at
    /// most `bound` messages, and what senders count as used (the shared
    /// queue and the published batch) stays within it too; the published
    /// batch is never lower than the batch, and higher by less than a step.
    fn check_bounds(rx: &Inbox, bound: usize) {
        let len = rx.len();
        assert!(
            len <= bound,
            "{len} messages in an inbox bounded at {bound}"
        );
        let state = rx.shared.lock();
        let lent = rx.shared.lent.load(Ordering::SeqCst);
        let batch = rx.batch.len();
        assert!(batch <= lent, "batch {batch} published as {lent}: too low");
        assert!(
            lent < batch + rx.shared.lent_step,
            "batch {batch} published as {lent}: a step or more too high"
        );
        let used = state.queue.len() + lent;
        assert!(used <= bound, "senders count {used} used of {bound}");
    }

    /// What the inbox tracks, back at rest: nothing queued, lent or
    /// wanted, no sender left.
    fn check_at_rest(rx: &Inbox) {
        let state = rx.shared.lock();
        assert!(state.queue.is_empty(), "{} still queued", state.queue.len());
        assert!(rx.batch.is_empty(), "{} still in the batch", rx.batch.len());
        assert_eq!(rx.shared.lent.load(Ordering::SeqCst), 0, "lent");
        assert_eq!(
            rx.shared.room_wanted.load(Ordering::SeqCst),
            0,
            "room wanted"
        );
        assert_eq!(state.senders, 0, "senders");
    }

    /// How a stress sender got on: how often it found the inbox full, and
    /// how many of its waits for room it cancelled.
    #[derive(Debug, Default, Clone, Copy)]
    struct Waits {
        full: u64,
        cancelled: u64,
    }

    /// Sends `count` numbered messages as sender `me`, in order, each way
    /// the node puts messages in: `try_send` (one-way ones a `one_way` in
    /// 8 of the time), batches under `slots`, and waits for room when
    /// full. Waits for room take turns through `pump`, as the inbox allows
    /// one waiter at a time (the service's pump); some are cut short by a
    /// timeout or dropped after one poll, then retried.
    async fn stress_sender(
        tx: InboxSender,
        me: usize,
        count: u64,
        one_way: u64,
        pump: Arc<tokio::sync::Mutex<()>>,
    ) -> Waits {
        let capacity = tx.capacity() as u64;
        let mut rng = Rng::new(me as u64 + 1);
        let mut waits = Waits::default();
        let mut n = 0u64;
        while n < count {
            let sent = if rng.below(2) == 0 {
                let message = numbered(me, n, rng.below(8) < one_way);
                match tx.try_send(message) {
                    Ok(()) => 1,
                    Err(back) => {
                        assert_eq!(origin(&back), (me, n), "given back");
                        0
                    }
                }
            } else {
                let most = 1 + rng.below(2 * capacity);
                let mut slots = tx.slots().expect("open");
                let mut pushed = 0;
                while slots.has_room() && pushed < most && n + pushed < count {
                    slots.push(numbered(me, n + pushed, false));
                    pushed += 1;
                }
                pushed
            };
            n += sent;
            if sent > 0 {
                if rng.below(16) == 0 {
                    tokio::task::yield_now().await;
                }
                continue;
            }
            waits.full += 1;
            // Full. Someone else waiting: try again later, or queue up to
            // be the one waiting.
            let turn = match pump.try_lock() {
                Ok(turn) => turn,
                Err(_) if rng.below(2) == 0 => {
                    tokio::task::yield_now().await;
                    continue;
                }
                Err(_) => pump.lock().await,
            };
            let want = 1 + rng.below(capacity) as usize;
            match rng.below(3) {
                0 => tx.room(want).await.expect("open"),
                1 => loop {
                    let within = std::time::Duration::from_micros(rng.below(1_500));
                    match tokio::time::timeout(within, tx.room(want)).await {
                        Ok(room) => break room.expect("open"),
                        Err(_) => waits.cancelled += 1,
                    }
                },
                _ => {
                    let mut room = std::pin::pin!(tx.room(want));
                    if let Poll::Ready(room) = poll_once(room.as_mut()).await {
                        room.expect("open");
                    } else {
                        // Dropped after one poll; then wait for one place,
                        // as the pump does after its short wait.
                        waits.cancelled += 1;
                        tx.room(1).await.expect("open");
                    }
                }
            }
            drop(turn);
        }
        waits
    }

    /// Takes messages from `senders` senders until the last is gone, with
    /// `recv`, `try_recv` and `poll_recv`, sometimes letting others run,
    /// checking that each sender's come once each and in order and that
    /// the inbox stays within `bound`: how many it took.
    async fn stress_receiver(mut rx: Inbox, senders: usize, bound: usize) -> (Inbox, u64) {
        let mut next = vec![0u64; senders];
        let mut rng = Rng::new(0);
        let mut got = 0u64;
        loop {
            check_bounds(&rx, bound);
            let message = match rng.below(8) {
                0..=2 => rx.recv().await,
                3 | 4 => match rx.try_recv() {
                    Some(m) => Some(m),
                    None => {
                        tokio::task::yield_now().await;
                        continue;
                    }
                },
                5 | 6 => match std::future::poll_fn(|cx| Poll::Ready(rx.poll_recv(cx))).await {
                    Poll::Ready(m) => m,
                    Poll::Pending => {
                        tokio::task::yield_now().await;
                        continue;
                    }
                },
                _ => {
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            let Some(message) = message else {
                break;
            };
            let (from, n) = origin(&message);
            assert!(from < senders, "{message:?}");
            assert_eq!(n, next[from], "sender {from}: once each, in order");
            next[from] += 1;
            got += 1;
        }
        check_bounds(&rx, bound);
        assert!(rx.try_recv().is_none(), "ended, and empty");
        (rx, got)
    }

    /// Many senders against one receiver on several threads, every way in
    /// and every way out, over a small inbox (a step of one), a mid-sized
    /// one (a step of eight) and a large one (a step of `LENT_STEP`),
    /// with and without one-way messages: each message arrives once, each
    /// sender's in order, the inbox never holds more than it may, and its
    /// counts are back at zero at the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_senders_and_a_receiver_lose_nothing_and_keep_the_bound() {
        const SENDERS: usize = 6;
        const COUNT: u64 = 20_000;
        let within = std::time::Duration::from_secs(60);
        // The capacity, and in how many of 8 `try_send`s the message is
        // one-way (they may wait past the capacity, as many again).
        for (capacity, one_way) in [(3usize, 0u64), (64, 2), (256, 0)] {
            let (tx, rx) = inbox("svc", capacity, None, None);
            let bound = if one_way > 0 { 2 * capacity } else { capacity };
            let receiver = tokio::spawn(stress_receiver(rx, SENDERS, bound));
            let pump = Arc::new(tokio::sync::Mutex::new(()));
            let senders: Vec<_> = (0..SENDERS)
                .map(|me| tokio::spawn(stress_sender(tx.clone(), me, COUNT, one_way, pump.clone())))
                .collect();
            drop(tx);
            let mut waits = Waits::default();
            for sender in senders {
                let w = tokio::time::timeout(within, sender)
                    .await
                    .expect("each sender finishes")
                    .expect("no panic");
                waits.full += w.full;
                waits.cancelled += w.cancelled;
            }
            let (rx, got) = tokio::time::timeout(within, receiver)
                .await
                .expect("the receiver ends")
                .expect("no panic");
            assert_eq!(got, SENDERS as u64 * COUNT, "capacity {capacity}");
            check_at_rest(&rx);
            eprintln!("capacity {capacity}, one-way {one_way}/8 of try_send: {waits:?}");
        }
    }

    /// Senders blocked in `room` while the receiver is dropped, from
    /// another task while other senders hammer the inbox: every one wakes
    /// with `Closed`, and everything after sees it closed. Closing wakes
    /// every waiter, not just the one the inbox expects (the pump).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn dropping_the_inbox_wakes_every_sender_waiting_for_room() {
        const WAITERS: usize = 6;
        let within = std::time::Duration::from_secs(10);
        for round in 0..200u64 {
            let capacity = 1 + (round % 4) as usize;
            let (tx, rx) = inbox("svc", capacity, None, None);
            for n in 0..capacity as u64 {
                assert!(tx.try_send(message(n)).is_ok(), "{n} fits");
            }
            let (blocked, mut waiting) = tokio::sync::mpsc::channel(WAITERS);
            let waiters: Vec<_> = (0..WAITERS)
                .map(|w| {
                    let tx = tx.clone();
                    let blocked = blocked.clone();
                    tokio::spawn(async move {
                        let mut room = std::pin::pin!(tx.room(1 + w % capacity));
                        assert!(poll_once(room.as_mut()).await.is_pending(), "full");
                        blocked.send(()).await.expect("the test waits");
                        room.await
                    })
                })
                .collect();
            drop(blocked);
            // Others keep trying to put messages in until they see it
            // closed.
            let hammers: Vec<_> = (0..2)
                .map(|h| {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        loop {
                            let closed = if h == 0 {
                                tx.try_send(message(n)).is_err() && tx.is_closed()
                            } else {
                                tx.slots().is_err()
                            };
                            if closed {
                                return n;
                            }
                            n += 1;
                            tokio::task::yield_now().await;
                        }
                    })
                })
                .collect();
            for _ in 0..WAITERS {
                tokio::time::timeout(within, waiting.recv())
                    .await
                    .expect("each waiter blocks")
                    .expect("each waiter says so");
            }
            tokio::spawn(async move { drop(rx) });
            for waiter in waiters {
                let woken = tokio::time::timeout(within, waiter)
                    .await
                    .expect("each waiter wakes")
                    .expect("no panic");
                assert_eq!(woken, Err(Closed), "round {round}");
            }
            for hammer in hammers {
                tokio::time::timeout(within, hammer)
                    .await
                    .expect("each hammer sees it closed")
                    .expect("no panic");
            }
            assert!(tx.is_closed());
            assert!(tx.try_send(one_way(0)).is_err());
            assert!(tx.slots().is_err());
            assert_eq!(tx.room(1).await, Err(Closed), "at once");
        }
    }

    /// The receiver drops the inbox at a random point while senders send
    /// every way and wait for room, several at a time: each sender learns
    /// it is closed (`room` answers `Closed` to those waiting), and none
    /// hangs or panics.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn senders_in_full_flight_learn_the_inbox_closed() {
        const SENDERS: usize = 6;
        let within = std::time::Duration::from_secs(10);
        let mut rng = Rng::new(99);
        let mut in_room_at_close = 0u64;
        for round in 0..400u64 {
            let capacity = 1 + rng.below(8) as usize;
            let keep = rng.below(300);
            let (tx, mut rx) = inbox("svc", capacity, None, None);
            let receiver = tokio::spawn(async move {
                for _ in 0..keep {
                    if rx.recv().await.is_none() {
                        break;
                    }
                }
                drop(rx);
            });
            let senders: Vec<_> = (0..SENDERS)
                .map(|me| {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut rng = Rng::new(round * 64 + me as u64);
                        let mut n = 0u64;
                        loop {
                            let full = if rng.below(2) == 0 {
                                match tx.try_send(numbered(me, n, false)) {
                                    Ok(()) => false,
                                    Err(_) if tx.is_closed() => return (n, false),
                                    Err(_) => true,
                                }
                            } else {
                                let Ok(mut slots) = tx.slots() else {
                                    return (n, false);
                                };
                                let full = !slots.has_room();
                                if !full {
                                    slots.push(numbered(me, n, false));
                                }
                                full
                            };
                            if !full {
                                n += 1;
                                continue;
                            }
                            let want = 1 + rng.below(capacity as u64) as usize;
                            if tx.room(want).await == Err(Closed) {
                                return (n, true);
                            }
                        }
                    })
                })
                .collect();
            drop(tx);
            for sender in senders {
                let (_, in_room) = tokio::time::timeout(within, sender)
                    .await
                    .expect("each sender learns it closed")
                    .expect("no panic");
                in_room_at_close += u64::from(in_room);
            }
            tokio::time::timeout(within, receiver)
                .await
                .expect("the receiver ends")
                .expect("no panic");
        }
        eprintln!("senders that learnt it closed in `room`: {in_room_at_close}");
    }

    /// A sender waiting for room against a receiver on another thread that
    /// hands out just enough messages and then stops (no `recv` to notice
    /// that anyone waits): the waiter still gets through. The published
    /// batch lags by less than a step, so a step less one more than it
    /// wants is enough, whether the receiver took them before or after the
    /// waiter said it waits. Both start together, then each spins a random
    /// while, so the last message handed out falls anywhere around the
    /// waiter's look at the room.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_waiter_gets_the_room_a_receiver_made_before_it_stopped() {
        let within = std::time::Duration::from_secs(10);
        let mut rng = Rng::new(7);
        for round in 0..1_500u64 {
            let capacity = [1usize, 2, 3, 8, 64, 256][round as usize % 6];
            let (tx, mut rx) = inbox("svc", capacity, None, None);
            let step = rx.shared.lent_step;
            for n in 0..capacity as u64 {
                assert!(tx.try_send(message(n)).is_ok(), "{n} fits");
            }
            let want = 1 + rng.below((capacity + 1 - step) as u64) as usize;
            let hand_out = want + step - 1;
            let (receiver_spins, waiter_spins) = (rng.below(4_000), rng.below(4_000));
            // Both tasks block a worker thread each while they wait for the
            // other: there are four.
            let start = Arc::new(std::sync::Barrier::new(2));
            let receiver = tokio::spawn({
                let start = start.clone();
                async move {
                    start.wait();
                    for n in 0..hand_out as u64 {
                        if n + 1 == hand_out as u64 {
                            (0..receiver_spins).for_each(|_| std::hint::spin_loop());
                        }
                        assert_eq!(rx.try_recv().map(|m| m.seq), Some(n));
                    }
                    // Kept, but no longer asked for anything.
                    rx
                }
            });
            let waiter = tokio::spawn(async move {
                start.wait();
                (0..waiter_spins).for_each(|_| std::hint::spin_loop());
                tx.room(want).await
            });
            let room = tokio::time::timeout(within, waiter)
                .await
                .unwrap_or_else(|_| {
                    panic!("capacity {capacity}: {hand_out} handed out, {want} wanted, never woken")
                })
                .expect("no panic");
            assert_eq!(room, Ok(()));
            drop(receiver.await.expect("no panic"));
        }
    }
}
