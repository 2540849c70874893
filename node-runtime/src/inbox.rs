//! Service inboxes and the messages in them.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use smol_str::SmolStr;
use tokio::sync::Notify;
use transports::protocol::NodeId;

use crate::reply::Replier;
use crate::SendError;

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
    /// Set for requests (and only for them): the runtime that sends the
    /// reply. Weak: a message the application keeps does not keep its
    /// node alive.
    pub(crate) replier: Option<Arc<Replier>>,
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

    /// The body (a shared buffer; cloning it copies nothing).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Takes the body.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// Whether the sender awaits a reply.
    pub fn is_request(&self) -> bool {
        self.replier.is_some()
    }

    /// Answers a request.
    ///
    /// # Errors
    ///
    /// [`SendError::NotARequest`] if the message is not a request;
    /// [`SendError::PayloadTooLarge`] for a body over the limit;
    /// [`SendError::Shutdown`] if the node stopped.
    pub async fn reply(&self, body: impl Into<Bytes>) -> Result<(), SendError> {
        let Some(replier) = &self.replier else {
            return Err(SendError::NotARequest);
        };
        replier
            .send(
                &self.sender,
                self.sender_incarnation,
                self.seq,
                &self.service,
                body.into(),
            )
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
}

/// The half of an inbox the node holds: the reader and the pump put
/// messages in. Dropping the last one ends the inbox.
#[derive(Debug)]
pub(crate) struct InboxSender {
    shared: Arc<Shared>,
}

/// An inbox and its sender, holding `capacity` messages.
pub(crate) fn inbox(service: &str, capacity: usize) -> (InboxSender, Inbox) {
    let shared = Arc::new(Shared {
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

#[derive(Debug)]
struct Shared {
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

    /// Free places counting those past the capacity, where one-way messages
    /// may wait (as many again).
    fn room_waiting(&self, state: &State) -> usize {
        self.capacity
            .saturating_mul(2)
            .saturating_sub(self.used(state))
    }

    fn used(&self, state: &State) -> usize {
        state.queue.len() + self.lent.load(Ordering::SeqCst)
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
    pub(crate) fn try_send(&self, message: Message) -> Result<(), Message> {
        let waker = {
            let mut state = self.shared.lock();
            let room = if message.one_way {
                self.shared.room_waiting(&state)
            } else {
                self.shared.room(&state)
            };
            if state.receiver_gone || room == 0 {
                return Err(message);
            }
            state.queue.push_back(message);
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
    pub async fn recv(&mut self) -> Option<Message> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Inbox::recv`] as a poll; takes from tokio's cooperative budget, as
    /// its channels do, so a service that never waits still lets the other
    /// tasks of its thread run.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
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
        let message = self.batch.pop_front()?;
        let lent = self.batch.len();
        if lent % self.shared.lent_step == 0 || self.shared.room_wanted.load(Ordering::SeqCst) > 0 {
            self.shared.lent.store(lent, Ordering::SeqCst);
            self.shared.room_made(lent);
        }
        Some(message)
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
        let queued = {
            let mut state = self.shared.lock();
            state.receiver_gone = true;
            std::mem::take(&mut state.queue)
        };
        self.shared.lent.store(0, Ordering::SeqCst);
        // A sender waiting for room learns the inbox is gone.
        self.shared.room.notify_waiters();
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
        Message {
            one_way: false,
            ..one_way(seq)
        }
    }

    fn one_way(seq: u64) -> Message {
        Message {
            sender: NodeId::new("a"),
            sender_incarnation: 1,
            seq,
            service: SmolStr::new("svc"),
            body: Bytes::new(),
            one_way: true,
            replier: None,
        }
    }

    #[test]
    fn one_way_messages_may_wait_past_the_capacity_in_order() {
        let (tx, mut rx) = inbox("svc", 2);
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
        let (tx, mut rx) = inbox("svc", 4);
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
        let (tx, mut rx) = inbox("svc", 8);
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
            let (tx, mut rx) = inbox("svc", capacity);
            let receiver = tokio::spawn(async move {
                let mut next = 0u64;
                while let Some(m) = rx.recv().await {
                    assert_eq!(m.seq, next, "in order");
                    next += 1;
                    if next % 7 == 0 {
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
        let (tx, mut rx) = inbox("svc", 2);
        assert!(tx.try_send(message(0)).is_ok());
        assert!(tx.try_send(message(1)).is_ok());
        let room = tx.room(2);
        tokio::pin!(room);
        assert!(pending(room.as_mut()), "no room yet");
        assert!(rx.recv().await.is_some());
        assert!(pending(room.as_mut()), "room for one, two wanted");
        assert!(rx.recv().await.is_some());
        assert_eq!(room.await, Ok(()));
        assert!(tx.try_send(message(2)).is_ok());
        assert!(tx.try_send(message(3)).is_ok());
        let waiting = tx.room(1);
        tokio::pin!(waiting);
        assert!(pending(waiting.as_mut()));
        drop(rx);
        assert_eq!(waiting.await, Err(Closed));
        assert!(tx.is_closed());
        assert!(tx.try_send(message(4)).is_err());
        assert!(tx.slots().is_err());
    }

    /// A large inbox shows the places its receiver frees a step at a time
    /// (it never looks fuller than it is by a step or more), and at once
    /// to a sender that waits for room.
    #[test]
    fn a_large_inbox_shows_room_in_steps_and_at_once_to_a_waiter() {
        let (tx, mut rx) = inbox("svc", 256);
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
}
