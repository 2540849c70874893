//! The bounded outgoing queue: the handles that push into it, the receiver
//! its writer drains, and who gets room when it is full.
//!
//! A connection's queue is one queue per class: the protocol's own frames
//! (control), then one per message [`Priority`]. Each class is bounded and
//! waited on by itself, so a full class never holds up another. The
//! writer takes the control class first, then the most urgent non-empty
//! priority, a batch of at most [`TAKE_UP_TO_BYTES`] at a time, except that
//! a class passed over [`PASSED_OVER_AT_MOST`] times in a row goes next:
//! the less urgent get a bounded share, and none starves.
//!
//! Every push takes the queue's lock once. A frame goes in one of two
//! [`Lane`]s: data is bounded in frames (less a reserve kept for control
//! frames) and in payload bytes, and data senders that wait for room are
//! served in the order they came (each holds a ticket; only the first in
//! line may take room, and nobody overtakes the line); control needs only a
//! frame slot. Room is given back when the writer has written what it took
//! ([`OutReceiver::release`]), and senders waiting for it are woken then.
//!
//! Frames larger than the chunk size ([`OutReceiver::chunk_above`]) are
//! large: the writer sends them in parts between other frames. A large
//! frame holds at most three quarters of its class's bytes, and large
//! frames wait for room in a line of their own, so that small frames
//! never wait for a large one to find room.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::feed::{Feed, Follower, FEED_TAKE_BYTES};
use super::staging::{staging, Chunk, Head, Staged, Staging, STAGE_UP_TO_BYTES};
use crate::frame::OutFrame;
use crate::protocol::{Header, MessageRef, Priority};

/// Classes of a connection's queue: control, then one per priority.
pub const CLASSES: usize = 1 + Priority::ALL.len();
/// The class of the protocol's own frames.
pub(super) const CONTROL: usize = 0;
/// The class of `priority`'s messages.
const fn data_class(priority: Priority) -> usize {
    1 + priority.index()
}
/// The class of frames given no priority.
const NORMAL: usize = data_class(Priority::Normal);
/// The class of `Low` messages, the one [`OutReceiver::window_low`]
/// bounds.
pub(super) const LOW: usize = data_class(Priority::Low);

/// Bytes of `Low` messages between two [`Header::LowMark`]s a writer with
/// a `Low` window writes (see [`OutReceiver::window_low`]).
pub const LOW_MARK_EVERY: usize = 64 * 1024;

/// Bytes the writer takes from one class at a time, at most (at least one
/// entry): how long a more urgent frame queued meanwhile may wait.
pub const TAKE_UP_TO_BYTES: usize = 256 * 1024;
/// Times in a row a non-empty class may be passed over for more urgent
/// ones before it goes next.
pub const PASSED_OVER_AT_MOST: u8 = 4;

/// The chunk size a writer uses unless told otherwise
/// ([`OutReceiver::chunk_above`]): `limits.chunk_bytes`' default.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;
/// The smallest chunk size a writer takes.
pub const MIN_CHUNK_BYTES: usize = 4 * 1024;

/// The class the writer takes from next, given which classes hold frames:
/// control if it does; else the most urgent priority that does, unless a
/// less urgent one was passed over [`PASSED_OVER_AT_MOST`] times in a row
/// (then the least urgent of those). `passed_over` counts, for each
/// priority, the takes in a row it held frames and another was chosen; a
/// take of the control class counts for none. `None` if none holds any.
pub(super) fn choose(holds: [bool; CLASSES], passed_over: &mut [u8; CLASSES]) -> Option<usize> {
    if holds[CONTROL] {
        return Some(CONTROL);
    }
    let urgent = (1..CLASSES).find(|&c| holds[c])?;
    let chosen = (urgent + 1..CLASSES)
        .rev()
        .find(|&c| holds[c] && passed_over[c] >= PASSED_OVER_AT_MOST)
        .unwrap_or(urgent);
    for c in 1..CLASSES {
        passed_over[c] = if c == chosen || !holds[c] {
            0
        } else {
            passed_over[c].saturating_add(1)
        };
    }
    Some(chosen)
}

/// The class `frame` goes in on `lane`: control frames in the control
/// class; data in `priority`'s class, or its message's, or normal.
fn class_for(frame: &OutFrame, lane: Lane, priority: Option<Priority>) -> usize {
    match (lane, priority) {
        (Lane::Control, _) => CONTROL,
        (Lane::Data, Some(priority)) => data_class(priority),
        (Lane::Data, None) => match frame {
            OutFrame::Parts {
                header: Header::Message(h),
                ..
            } => data_class(h.priority),
            _ => NORMAL,
        },
    }
}

/// Which bound a frame is queued against, and how it waits for room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Messages: bounded in frames and payload bytes, with a share of the
    /// frame slots kept free for control frames. A data frame never
    /// overtakes a data sender already waiting for room; waiting senders
    /// are served in the order they came.
    Data,
    /// The protocol's own frames (answers, acknowledgements, membership,
    /// a goodbye): small, and not to be lost. A control frame needs only a
    /// frame slot, may use the slots data may not, and does not queue
    /// behind waiting data senders.
    Control,
}

/// How long [`OutQueue::push`] waits for room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Until there is room or the queue closes.
    Forever,
    /// Until this instant at most.
    Until(Instant),
    /// At most this long from when the wait starts: the clock is read only
    /// if there is no room at once.
    For(Duration),
}

impl Wait {
    /// When a wait that starts now ends, if it does.
    fn deadline(self) -> Option<Instant> {
        match self {
            Wait::Forever => None,
            Wait::Until(deadline) => Some(deadline),
            Wait::For(wait) => Instant::now().checked_add(wait),
        }
    }
}

/// A [`Header::LowCredit`] answered a mark that was never written (see
/// [`OutQueue::grant_low`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("credit for low mark {0}, which was never written")]
pub struct UnknownMark(pub u64);

/// The marks a writer with a `Low` window may have unanswered (see
/// [`OutReceiver::window_low`]): with [`LOW_MARK_EVERY`], 128 KiB.
pub const LOW_WINDOW_MARKS: u64 = 2;

/// Why a frame could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The queue is full (and stayed full for as long as the push could
    /// wait): the receiving end does not keep up. The frame is handed back
    /// (boxed: errors stay small on the hot path).
    #[error("outgoing queue full")]
    Full(Box<OutFrame>),
    /// The connection is closed; the frame is handed back.
    #[error("connection closed")]
    Closed(Box<OutFrame>),
    /// No room was made within the allowed wait; the consumer is marked
    /// congested (see [`OutQueue::push_within`]). The frame was dropped.
    #[error("the receiving end made no room in time")]
    Congested,
}

/// The sending side of a connection's outgoing queue. Cheap to clone (one
/// reference count).
#[derive(Clone, Debug)]
pub struct OutQueue {
    shared: Arc<Senders>,
}

/// A reference to an [`OutQueue`] that does not keep it open: once every
/// [`OutQueue`] is gone, [`WeakOutQueue::upgrade`] fails and the writer
/// finishes. For caches that must not outlive the connection.
#[derive(Clone, Debug)]
pub struct WeakOutQueue {
    shared: std::sync::Weak<Senders>,
}

impl WeakOutQueue {
    /// The queue, if some [`OutQueue`] still holds it.
    pub fn upgrade(&self) -> Option<OutQueue> {
        self.shared.upgrade().map(|shared| OutQueue { shared })
    }
}

/// A queue of at most `frames` frames and about `bytes` payload bytes.
///
/// A single frame larger than `bytes` is still accepted when the queue is
/// otherwise empty, so the byte bound never makes a frame impossible to
/// send.
pub fn out_queue(frames: usize, bytes: usize) -> (OutQueue, OutReceiver) {
    new_queue(frames, bytes, None)
}

/// [`out_queue`], its data also drawing on `budget`, which many queues
/// share: a data frame that does not fit the budget does not fit the
/// queue (it is [`PushError::Full`], as when the queue itself is full).
pub fn out_queue_within(
    frames: usize,
    bytes: usize,
    budget: Arc<Budget>,
) -> (OutQueue, OutReceiver) {
    new_queue(frames, bytes, Some(budget))
}

/// Bytes a queue takes from its [`Budget`] at a time: queues touch the
/// shared budget once per this many bytes, not once per frame. A queue
/// keeps what it holds rounded up to this, and nothing once empty.
pub const BUDGET_CHUNK_BYTES: usize = 64 * 1024;

/// A memory budget shared by many queues (the message server's, across
/// all its connections): queued data takes its bytes from it, in chunks
/// of [`BUDGET_CHUNK_BYTES`], and gives them back once written, or when
/// its queue is dropped.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes it holds at most.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes taken now (by all queues, their chunks rounded up).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether `n` more bytes would fit now (a hint: another queue may
    /// take them first).
    pub fn has_room(&self, n: usize) -> bool {
        self.used().saturating_add(n) <= self.limit
    }

    /// Takes `n` bytes if they fit, for memory held outside any queue
    /// (the message server's parked messages); [`Budget::give`] returns
    /// them. Whether they were taken.
    pub fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&after| after <= self.limit)
            })
            .is_ok()
    }

    /// Returns `n` bytes taken with [`Budget::try_take`].
    pub fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

fn new_queue(frames: usize, bytes: usize, budget: Option<Arc<Budget>>) -> (OutQueue, OutReceiver) {
    let cores: [Arc<Core>; CLASSES] =
        std::array::from_fn(|_| new_core(frames, bytes, budget.clone()));
    (
        OutQueue {
            shared: Arc::new(Senders {
                cores: cores.clone(),
            }),
        },
        OutReceiver {
            cores,
            coalesce: false,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            window: None,
            low_window: None,
            passed_over: std::array::from_fn(|_| AtomicU8::new(0)),
        },
    )
}

/// One class of a queue.
fn new_core(frames: usize, bytes: usize, budget: Option<Arc<Budget>>) -> Arc<Core> {
    let frames = frames.max(4);
    let max_bytes = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
    Arc::new(Core {
        state: Mutex::new(State::default()),
        max_frames: frames,
        max_data: frames - frames / 8,
        max_bytes,
        room: Notify::new(),
        closed: CancellationToken::new(),
        is_closed: AtomicBool::new(false),
        congested: AtomicBool::new(false),
        queued: AtomicUsize::new(0),
        written: AtomicU64::new(0),
        pushed: AtomicU64::new(0),
        taken: AtomicU64::new(0),
        progress: Notify::new(),
        progress_waiters: AtomicUsize::new(0),
        granted: AtomicU64::new(0),
        low_granted: AtomicU64::new(0),
        low_marks: AtomicU64::new(0),
        chunk_bytes: AtomicUsize::new(DEFAULT_CHUNK_BYTES),
        grants: Notify::new(),
        budget,
        max_frame: AtomicUsize::new(u32::MAX as usize),
        feed: OnceLock::new(),
        feed_position: AtomicU64::new(0),
    })
}

impl OutQueue {
    /// The class `class`.
    fn class(&self, class: usize) -> &Core {
        &self.shared.cores[class]
    }

    /// The control class, which stands for the connection (its written
    /// bytes, its closing).
    fn core(&self) -> &Core {
        self.class(CONTROL)
    }

    /// Queues `frame` on `lane` if it fits now and (for data) nobody waits
    /// before it; hands `frame` back if not, with whether the queue is
    /// closed.
    // A method of the handle, called with the frame as it came: a call
    // made before the frame is passed on (to reach the core, say) would
    // cost a copy of it. It goes back as it came: boxing it would allocate
    // on every fall-through to the waiting path.
    fn try_put<F: Unqueued>(&self, frame: F, lane: Lane, class: usize) -> Result<(), (F, bool)> {
        let core = self.class(class);
        if core.is_closed() {
            return Err((frame, true));
        }
        let permits = core.permits_on(lane, frame.frame());
        // The header is encoded before the lock is taken.
        let staging = staging(frame.frame(), core.max_frame());
        let put = {
            let mut state = core.lock();
            let fits = match lane {
                Lane::Data => {
                    let large = core.is_large(frame.frame().payload_len());
                    core.nobody_waits(&state, large) && core.data_fits(&mut state, permits)
                }
                Lane::Control => core.control_fits(&state),
            };
            if !fits {
                return Err((frame, false));
            }
            core.put(
                &mut state,
                OutItem::frame(frame.take(), permits, lane),
                &staging,
            )
        };
        put.finish();
        Ok(())
    }

    /// Queues `frame` on `lane` if there is room right now, never waiting:
    /// for a caller that answers a full queue itself (the message server
    /// tells the sender, or cuts a slow consumer off).
    ///
    /// A frame that cannot be encoded within the connection's limit is
    /// accepted and dropped (logged), as the writer drops one.
    ///
    /// # Errors
    ///
    /// [`PushError::Full`] when there is no room now (on [`Lane::Data`],
    /// also when data senders wait before it); [`PushError::Closed`] when
    /// the writer is gone. The frame is handed back.
    pub fn try_push(&self, frame: OutFrame, lane: Lane) -> Result<(), PushError> {
        let class = class_for(&frame, lane, None);
        self.try_push_in(frame, lane, class)
    }

    /// [`OutQueue::try_push`] of a data frame at `priority` (for a frame
    /// that does not say, such as [`OutFrame::Raw`]).
    ///
    /// # Errors
    ///
    /// As [`OutQueue::try_push`].
    pub fn try_push_at(&self, frame: OutFrame, priority: Priority) -> Result<(), PushError> {
        self.try_push_in(frame, Lane::Data, data_class(priority))
    }

    fn try_push_in(&self, frame: OutFrame, lane: Lane, class: usize) -> Result<(), PushError> {
        match self.try_put(frame, lane, class) {
            Ok(()) => Ok(()),
            Err((frame, true)) => Err(PushError::Closed(Box::new(frame))),
            Err((frame, false)) => Err(PushError::Full(Box::new(frame))),
        }
    }

    /// Queues `frame` on `lane`, waiting for room as long as `wait` allows:
    /// back-pressure instead of growth. A frame that fits at once is
    /// queued by the first poll, without a timer or a waiting future; one
    /// that waits allocates its waiting future then, once, so that the
    /// caller's future stays small. Nothing happens until it is polled.
    ///
    /// # Errors
    ///
    /// [`PushError::Full`] when the wait ended without room;
    /// [`PushError::Closed`] when the writer is gone, also while waiting.
    /// The frame is handed back.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled call queued nothing, and a data sender
    /// gives its place in line up to the next.
    pub fn push(&self, frame: OutFrame, lane: Lane, wait: Wait) -> Push<'_> {
        let class = class_for(&frame, lane, None);
        Push {
            queue: self,
            frame: Some(frame),
            lane,
            class,
            wait,
            waiting: None,
        }
    }

    /// [`OutQueue::push`] of a data frame at `priority` (for a frame that
    /// does not say, such as [`OutFrame::Raw`]).
    pub fn push_at(&self, frame: OutFrame, priority: Priority, wait: Wait) -> Push<'_> {
        Push {
            queue: self,
            frame: Some(frame),
            lane: Lane::Data,
            class: data_class(priority),
            wait,
            waiting: None,
        }
    }

    /// Queues a data frame for a consumer that may be slow, waiting at most
    /// `wait` for room: slows the sender down without stalling it for ever.
    ///
    /// When a wait ends without room the queue is marked congested: until
    /// it has drained below a quarter of its frames and bytes, further
    /// calls fail at once instead of each waiting again.
    ///
    /// # Errors
    ///
    /// [`PushError::Congested`] when there was no room in time (the frame is
    /// dropped), [`PushError::Full`] when the queue is congested and full,
    /// [`PushError::Closed`] when the writer is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled call queued nothing.
    pub async fn push_within(&self, frame: OutFrame, wait: Duration) -> Result<(), PushError> {
        let core = self.class(class_for(&frame, Lane::Data, None));
        if core.congested.load(Ordering::Relaxed) {
            if core.is_drained() {
                core.congested.store(false, Ordering::Relaxed);
            } else {
                return self.try_push(frame, Lane::Data);
            }
        }
        match self.push(frame, Lane::Data, Wait::For(wait)).await {
            Err(PushError::Full(_)) => {
                core.congested.store(true, Ordering::Relaxed);
                Err(PushError::Congested)
            }
            other => other,
        }
    }

    /// Queues a message given by reference, without building its frame: its
    /// header is encoded (the names read in place) and the frame staged if
    /// its body is small ([`STAGE_UP_TO_BYTES`]), it fits within the
    /// connection's limit, there is room right now and nobody waits before
    /// it. Whether it was queued; if not, nothing was, and the caller
    /// queues the frame the usual way (which reports what went wrong).
    pub fn try_push_message(&self, header: &MessageRef<'_>, body: &[u8]) -> bool {
        let core = self.class(data_class(header.priority));
        if body.len() > STAGE_UP_TO_BYTES || core.is_closed() {
            return false;
        }
        let mut head = Head::new();
        let Some(encoded) = head.append_message(header) else {
            return false;
        };
        let total = encoded + body.len();
        if total > core.max_frame() {
            return false;
        }
        head.set_length(total);
        match core.stage_now(&head, body) {
            Ok(writer) => {
                if let Some(writer) = writer {
                    writer.wake();
                }
                true
            }
            Err(()) => false,
        }
    }

    /// Queues a received frame's contents (everything after the length
    /// prefix) given by reference, as [`OutFrame::Raw`] would be, if it is
    /// small ([`STAGE_UP_TO_BYTES`]), fits within the connection's limit,
    /// there is room right now and nobody waits before it: copied straight
    /// into the staging buffer, no buffer shared or cloned. Whether it was
    /// queued; if not, nothing was, and the caller queues the frame the
    /// usual way (which reports what went wrong).
    ///
    /// With `wakes`, a writer found asleep is woken when `wakes` is (or
    /// when it drops), not at once: a reader that queues many frames in a
    /// row wakes each writer once for the whole run. That caller wakes
    /// `wakes` before it waits for anything.
    ///
    /// It goes in `priority`'s class: the caller read it from the frame's
    /// header.
    pub fn try_push_raw(&self, raw: &[u8], priority: Priority, wakes: Option<&mut Wakes>) -> bool {
        let core = self.class(data_class(priority));
        if raw.is_empty()
            || raw.len() > STAGE_UP_TO_BYTES
            || raw.len() > core.max_frame()
            || core.is_closed()
        {
            return false;
        }
        let mut head = Head::new();
        head.set_length(raw.len());
        match core.stage_now(&head, raw) {
            Ok(writer) => {
                if let Some(writer) = writer {
                    match wakes {
                        Some(wakes) => wakes.wakers.push(writer),
                        None => writer.wake(),
                    }
                }
                true
            }
            Err(()) => false,
        }
    }

    /// The waiting part of [`OutQueue::push`], once `frame` did not fit at
    /// once.
    async fn wait_for_room(
        &self,
        mut frame: OutFrame,
        lane: Lane,
        class: usize,
        wait: Wait,
    ) -> Result<(), PushError> {
        let core = self.class(class);
        let permits = core.permits_on(lane, &frame);
        let staging = staging(&frame, core.max_frame());
        let deadline = wait.deadline();
        let expired = async move {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        let mut place = Place {
            core,
            lane,
            large: lane == Lane::Data && core.is_large(frame.payload_len()),
            ticket: None,
            counted: false,
        };
        let mut late = false;
        loop {
            let notified = core.room.notified();
            tokio::pin!(notified);
            // Registered before looking, so no room made after the look is
            // missed.
            notified.as_mut().enable();
            let look = {
                let mut state = core.lock();
                if core.is_closed() {
                    Look::Closed(frame)
                } else if place.take_room(&mut state, permits) {
                    let item = OutItem::frame(frame, permits, lane);
                    Look::Queued(core.put(&mut state, item, &staging))
                } else {
                    Look::Wait(frame)
                }
            };
            frame = match look {
                Look::Queued(put) => {
                    put.finish();
                    return Ok(());
                }
                Look::Closed(frame) => return Err(PushError::Closed(Box::new(frame))),
                Look::Wait(frame) => frame,
            };
            if late {
                return Err(PushError::Full(Box::new(frame)));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = core.closed.cancelled() => {}
                // One more look, then give up.
                _ = &mut expired => late = true,
            }
        }
    }

    /// Whether the consumer was found not keeping up (see
    /// [`OutQueue::push_within`]).
    pub fn is_congested(&self) -> bool {
        self.shared
            .cores
            .iter()
            .any(|core| core.congested.load(Ordering::Relaxed))
    }

    /// The peer says it has read `read` bytes of the parts written to it
    /// so far (a `Credit` frame, see [`crate::io::FrameReader::grant_to`]):
    /// a writer with a window ([`OutReceiver::window_parts`]) may write
    /// parts up to `read` plus the window. Older news is ignored.
    pub fn grant(&self, read: u64) {
        let core = self.core();
        if core.granted.fetch_max(read, Ordering::AcqRel) < read {
            core.grants.notify_waiters();
        }
    }

    /// The peer took in everything written before its `mark`th
    /// [`Header::LowMark`] (a [`Header::LowCredit`]): a writer with a `Low`
    /// window ([`OutReceiver::window_low`]) may write more `Low` messages.
    /// Older news is ignored.
    ///
    /// # Errors
    ///
    /// [`UnknownMark`] if no such mark was written on this connection: the
    /// peer answers what it never read.
    pub fn grant_low(&self, mark: u64) -> Result<(), UnknownMark> {
        let core = self.core();
        if mark > core.low_marks.load(Ordering::Acquire) {
            return Err(UnknownMark(mark));
        }
        if core.low_granted.fetch_max(mark, Ordering::AcqRel) < mark {
            // Under the class's lock: a writer that found the window shut
            // looked at it under the same lock, and left its waker there.
            let waker = self.class(LOW).lock().writer.take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        Ok(())
    }

    /// A reference that does not keep the queue open.
    pub fn downgrade(&self) -> WeakOutQueue {
        WeakOutQueue {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// Whether `other` is a handle to this same queue.
    pub fn same_queue(&self, other: &OutQueue) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Bytes the writer has written to the connection so far. Unchanged
    /// over a period while the queue holds frames, it means the consumer
    /// read nothing in it (its socket stayed full): the message server cuts
    /// such a consumer off.
    pub fn written_bytes(&self) -> u64 {
        self.core().written.load(Ordering::Relaxed)
    }

    /// Where the queue stands, in payload bytes counted since it was made:
    /// `(queued, taken)`, all ever queued and all the writer has taken of
    /// them (to write now). A frame queued when the first stood at `p` is
    /// taken once the second reaches `p`; the difference is what waits in
    /// the queue now. Read without the lock: a hint, for sharing the queue
    /// fairly among the targets of its messages.
    ///
    /// Each priority has a queue of its own: these are `priority`'s.
    pub fn positions(&self, priority: Priority) -> (u64, u64) {
        let core = self.class(data_class(priority));
        // Taken first: it can only fall behind the other, never pass it.
        let taken = core.taken.load(Ordering::Relaxed);
        (core.pushed.load(Ordering::Relaxed).max(taken), taken)
    }

    /// Waits until the writer has taken `priority`'s queue up to
    /// `position` (see [`OutQueue::positions`]), or the queue closed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn taken_up_to(&self, priority: Priority, position: u64) {
        self.progressed(data_class(priority), |core| {
            core.taken.load(Ordering::SeqCst) >= position
        })
        .await;
    }

    /// Waits until the writer has taken all but `frames` of the frames
    /// queued at `priority` (see [`OutQueue::queued_at`]; frames it took
    /// may still be being written), or the queue closed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn taken_down_to(&self, priority: Priority, frames: usize) {
        self.progressed(data_class(priority), |core| {
            core.queued.load(Ordering::SeqCst) <= frames
        })
        .await;
    }

    /// Waits until `done` holds of `class`, looking each time the writer
    /// takes frames of it, or until the queue closed.
    async fn progressed(&self, class: usize, done: impl Fn(&Core) -> bool) {
        let core = self.class(class);
        core.progress_waiters.fetch_add(1, Ordering::SeqCst);
        let _counted = ProgressWaiter(core);
        loop {
            let progressed = core.progress.notified();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            if done(core) || core.is_closed() {
                return;
            }
            tokio::select! {
                () = progressed => {}
                () = core.closed.cancelled() => return,
            }
        }
    }

    /// Whether the queue holds any frame, queued or being written (a cold
    /// path: it takes the lock).
    pub fn holds_frames(&self) -> bool {
        self.shared.cores.iter().any(|core| {
            let state = core.lock();
            state.frames > 0 || state.data > 0
        })
    }

    /// What the queue holds now and has carried so far, read under its
    /// lock once: for a monitor, never on a per-frame path.
    pub fn stats(&self) -> QueueStats {
        let mut stats = QueueStats {
            written_bytes: self.written_bytes(),
            ..QueueStats::default()
        };
        for (class, core) in self.shared.cores.iter().enumerate() {
            let state = core.lock();
            if class != CONTROL {
                stats.frames_by_priority[class - 1] = state.frames;
            }
            stats.frames += state.frames;
            stats.data += state.data;
            stats.bytes += state.bytes;
            stats.data_total += state.data_total;
            stats.bytes_total += state.bytes_total;
        }
        stats
    }

    /// Frames waiting to be written, in every class: a measure of the
    /// receiver's load.
    pub fn queued_frames(&self) -> usize {
        self.shared
            .cores
            .iter()
            .map(|core| core.queued.load(Ordering::Relaxed))
            .sum()
    }

    /// Frames waiting to be written at `priority`.
    pub fn queued_at(&self, priority: Priority) -> usize {
        self.class(data_class(priority))
            .queued
            .load(Ordering::Relaxed)
    }

    /// Has the writer also write `feed`'s frames from `from` on (see
    /// [`Feed`]): frames every connection gets, kept once. They go in the
    /// order they came among the control frames queued from now on (what
    /// the control class holds already goes first: the welcome). A queue
    /// follows one feed, from one position: a second call is ignored (and
    /// logged).
    pub fn follow(&self, feed: &Arc<Feed>, from: u64) {
        let core = self.core();
        if core.feed.set(feed.clone()).is_err() {
            tracing::error!("a queue follows one feed only: ignored");
            return;
        }
        let follower = Follower::new(feed, from);
        let writer = {
            let mut state = core.lock();
            core.feed_position
                .store(follower.position(), Ordering::Release);
            state.feed_marked = follower.position();
            state.follower = Some(follower);
            state.writer.take()
        };
        if let Some(writer) = writer {
            writer.wake();
        }
    }

    /// Whether the connection's writer has stopped.
    pub fn is_closed(&self) -> bool {
        self.core().is_closed()
    }

    /// Stops the writer without draining: frames still queued are dropped.
    /// Used to cut off a slow consumer or a misbehaving peer.
    pub fn close(&self) {
        for core in self.shared.cores.iter() {
            core.close();
        }
    }

    /// Resolves once the writer has stopped or [`OutQueue::close`] was called.
    pub async fn closed(&self) {
        self.core().closed.cancelled().await;
    }
}

/// A queue's depth and what it has carried, as [`OutQueue::stats`] reads
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Frames queued and not yet taken by the writer (any lane).
    pub frames: usize,
    /// Data frames queued or being written.
    pub data: usize,
    /// Their payload bytes (a frame's counted up to the queue's byte
    /// bound).
    pub bytes: usize,
    /// Data frames queued since the queue was made.
    pub data_total: u64,
    /// Their payload bytes.
    pub bytes_total: u64,
    /// Bytes the writer has written (see [`OutQueue::written_bytes`]).
    pub written_bytes: u64,
    /// Frames queued and not yet taken, per priority (in
    /// [`Priority::ALL`]'s order).
    pub frames_by_priority: [usize; 4],
}

/// Writers' wakers held back while a reader queues a run of frames (see
/// [`OutQueue::try_push_raw`]): each writer found asleep is woken once,
/// when [`Wakes::wake_all`] is called or the batch drops, instead of once
/// per frame. The batch grows by at most one waker per class of a queue between two
/// wakes (a writer's waker is handed out once per sleep).
#[derive(Debug, Default)]
pub struct Wakes {
    wakers: Vec<Waker>,
}

impl Wakes {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes every writer held back.
    pub fn wake_all(&mut self) {
        for waker in self.wakers.drain(..) {
            waker.wake();
        }
    }

    /// Whether no writer is held back.
    pub fn is_empty(&self) -> bool {
        self.wakers.is_empty()
    }
}

impl Drop for Wakes {
    fn drop(&mut self) {
        self.wake_all();
    }
}

/// The future of [`OutQueue::push`].
///
/// Its first poll queues the frame if there is room, with no timer and no
/// waiting future; otherwise it waits in a future of its own, allocated
/// then, so that this one stays small.
#[must_use = "a push does nothing unless polled"]
pub struct Push<'a> {
    queue: &'a OutQueue,
    /// The frame, until it is queued or handed to the wait.
    frame: Option<OutFrame>,
    lane: Lane,
    /// The class it goes in.
    class: usize,
    wait: Wait,
    /// The wait for room, once the frame did not fit at once.
    waiting: Option<Waiting<'a>>,
}

/// A [`Push`] waiting for room.
type Waiting<'a> = Pin<Box<dyn Future<Output = Result<(), PushError>> + Send + 'a>>;

impl std::fmt::Debug for Push<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Push")
            .field("lane", &self.lane)
            .field("wait", &self.wait)
            .field("waiting", &self.waiting.is_some())
            .finish_non_exhaustive()
    }
}

impl Future for Push<'_> {
    type Output = Result<(), PushError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(waiting) = &mut this.waiting {
            return waiting.as_mut().poll(cx);
        }
        // The frame stays in its slot unless it is queued: one move, as for
        // a frame queued by value.
        let frame = match this.queue.try_put(&mut this.frame, this.lane, this.class) {
            Ok(()) => return Poll::Ready(Ok(())),
            Err((slot, closed)) => {
                let frame = Unqueued::take(slot);
                if closed {
                    return Poll::Ready(Err(PushError::Closed(Box::new(frame))));
                }
                frame
            }
        };
        let waiting = this.waiting.insert(Box::pin(
            this.queue
                .wait_for_room(frame, this.lane, this.class, this.wait),
        ));
        waiting.as_mut().poll(cx)
    }
}

/// A frame not queued yet: owned, or in a slot it leaves only once it is
/// queued (so that a [`Push`] queued at once moves its frame no more than
/// [`OutQueue::try_push`] does).
trait Unqueued {
    fn frame(&self) -> &OutFrame;
    fn take(self) -> OutFrame;
}

impl Unqueued for OutFrame {
    fn frame(&self) -> &OutFrame {
        self
    }

    fn take(self) -> OutFrame {
        self
    }
}

impl Unqueued for &mut Option<OutFrame> {
    fn frame(&self) -> &OutFrame {
        self.as_ref().expect("a push polled after it finished")
    }

    fn take(self) -> OutFrame {
        Option::take(self).expect("a push polled after it finished")
    }
}

/// The writer's side of an outgoing queue.
#[derive(Debug)]
pub struct OutReceiver {
    /// The classes, control first, then the priorities, most urgent first.
    cores: [Arc<Core>; CLASSES],
    /// Whether a small batch waits one scheduling turn for more.
    coalesce: bool,
    /// Frames whose contents are larger than this are written in parts
    /// of this size (see [`OutReceiver::chunk_above`]).
    chunk_bytes: usize,
    /// Bytes of parts that may be written beyond what the peer said it
    /// read (see [`OutReceiver::window_parts`]); none: no window.
    window: Option<u64>,
    /// [`Header::LowMark`]s that may be unanswered before `Low` messages
    /// wait (see [`OutReceiver::window_low`]); none: no window.
    low_window: Option<u64>,
    /// How many takes in a row each class was passed over while it held
    /// frames (see [`choose`]). Only the writer touches them: atomics only
    /// so that the writer may take through a shared reference.
    passed_over: [AtomicU8; CLASSES],
}

impl OutReceiver {
    /// Lets the writer wait one scheduling turn before writing a batch of
    /// fewer than [`COALESCE_BELOW`](super::COALESCE_BELOW) frames, so that
    /// frames queued by a task that is still running (a burst of sends)
    /// share one write.
    ///
    /// Adaptive: after [`COALESCE_CREDIT`](super::COALESCE_CREDIT) waits in
    /// a row that gathered nothing (one request at a time, say), it writes
    /// at once, trying a wait again every
    /// [`COALESCE_PROBE_EVERY`](super::COALESCE_PROBE_EVERY) small batches.
    pub fn coalesce_small_batches(&mut self) {
        self.coalesce = true;
    }

    /// Has the writer send a frame whose contents (header and body) are
    /// larger than `chunk_bytes` in parts of at most that size
    /// ([`crate::frame::PART_BIT`]), interleaved with the other frames: a
    /// frame queued behind it, or in a more urgent class, waits for one
    /// part at most, not for the whole of it. Control frames go whole
    /// (a welcome must reach the peer before the membership events after
    /// it). At least [`MIN_CHUNK_BYTES`]; [`DEFAULT_CHUNK_BYTES`] unless
    /// set.
    pub fn chunk_above(&mut self, chunk_bytes: usize) {
        self.chunk_bytes = chunk_bytes.max(MIN_CHUNK_BYTES);
        for core in &self.cores {
            core.chunk_bytes.store(self.chunk_bytes, Ordering::Relaxed);
        }
    }

    /// See [`OutReceiver::chunk_above`].
    pub(super) fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// Has the writer keep at most `window` bytes of parts between itself
    /// and the peer's reader: a part goes out only while the bytes of
    /// parts written exceed those the peer said it read
    /// ([`OutQueue::grant`]) by less than `window`. The socket buffers then
    /// hold little of a large frame, and a small frame written after them
    /// waits for that little. Only for a peer whose reader grants
    /// ([`crate::io::FrameReader::grant_to`]): without grants, parts stop
    /// after the first window.
    pub fn window_parts(&mut self, window: usize) {
        self.window = Some(window.max(1) as u64);
    }

    /// Bounds the `Low` messages between the writer and what the peer's
    /// reader has taken in: after every [`LOW_MARK_EVERY`] bytes of them
    /// the writer writes a [`Header::LowMark`], and while `marks` of those
    /// are unanswered (no [`Header::LowCredit`], see
    /// [`OutQueue::grant_low`]) it takes no `Low` messages; the other
    /// classes go on. A mark follows the batch that passed
    /// [`LOW_MARK_EVERY`], so the sockets' buffers hold at most `marks`
    /// times that and a batch ([`TAKE_UP_TO_BYTES`]), and
    /// `LOW_MARK_EVERY` more, of `Low` messages ahead of a more urgent
    /// frame, however many are queued. Only for a
    /// peer that answers marks: without credits, `Low` messages stop after
    /// the first window.
    pub fn window_low(&mut self, marks: u64) {
        self.low_window = Some(marks.max(1));
    }

    /// Whether this writer writes [`Header::LowMark`]s.
    pub(super) fn marks_low(&self) -> bool {
        self.low_window.is_some()
    }

    /// A new connection: no marks written or answered on it yet.
    pub(super) fn reset_low(&self) {
        let core = &self.cores[CONTROL];
        core.low_marks.store(0, Ordering::Release);
        core.low_granted.store(0, Ordering::Release);
    }

    /// Counts a [`Header::LowMark`] written: its number.
    pub(super) fn next_low_mark(&self) -> u64 {
        self.cores[CONTROL].low_marks.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether `Low` messages may be taken now (see
    /// [`OutReceiver::window_low`]).
    fn low_open(&self) -> bool {
        match self.low_window {
            None => true,
            Some(window) => {
                let core = &self.cores[CONTROL];
                core.low_marks.load(Ordering::Acquire)
                    < core.low_granted.load(Ordering::Acquire) + window
            }
        }
    }

    /// Whether a part may go out after `sent` bytes of parts.
    pub(super) fn may_send_part(&self, sent: u64) -> bool {
        match self.window {
            None => true,
            Some(window) => sent < self.cores[CONTROL].granted.load(Ordering::Acquire) + window,
        }
    }

    /// Waits until a part may go out after `sent` bytes of parts.
    pub(super) async fn part_granted(&self, sent: u64) {
        let core = &self.cores[CONTROL];
        loop {
            let granted = core.grants.notified();
            tokio::pin!(granted);
            granted.as_mut().enable();
            if self.may_send_part(sent) {
                return;
            }
            granted.await;
        }
    }

    /// Whether small batches wait a turn (see
    /// [`OutReceiver::coalesce_small_batches`]).
    pub(super) fn coalesces(&self) -> bool {
        self.coalesce
    }

    /// Cancelled once the queue is closed.
    pub(super) fn closed(&self) -> CancellationToken {
        self.cores[CONTROL].closed.clone()
    }

    /// Sets the frame limit of the connection being written: frames staged
    /// from now on are checked against it as they are queued.
    pub(super) fn set_max_frame(&self, max_frame: usize) {
        for core in &self.cores {
            core.max_frame.store(max_frame, Ordering::Relaxed);
        }
    }

    /// Which classes hold frames that may be taken, read without the
    /// locks (`Low` not while its window is shut).
    fn holding(&self) -> [bool; CLASSES] {
        let mut holds: [bool; CLASSES] =
            std::array::from_fn(|c| self.cores[c].queued.load(Ordering::Relaxed) > 0);
        holds[CONTROL] |= self.cores[CONTROL].feed_behind();
        if holds[LOW] && !self.low_open() {
            holds[LOW] = false;
        }
        holds
    }

    /// Takes one batch from the class [`choose`] picks: how many frames,
    /// 0 if every class looked empty (or was emptied meanwhile).
    fn take_next(&self, batch: &mut VecDeque<OutItem>) -> usize {
        let before = batch.len();
        self.take_turn(batch, [false; CLASSES]);
        batch.len() - before
    }

    /// One turn of the writer: the class [`choose`] picks among those
    /// that hold frames and those `also` names (the writer's frames being
    /// written in parts), with a batch of its frames moved into `batch`
    /// (none if it holds none). `None` if no class holds anything.
    pub(super) fn take_turn(
        &self,
        batch: &mut VecDeque<OutItem>,
        also: [bool; CLASSES],
    ) -> Option<usize> {
        let mut passed_over = self
            .passed_over
            .each_ref()
            .map(|c| c.load(Ordering::Relaxed));
        let mut holds = self.holding();
        for (holds, also) in holds.iter_mut().zip(also) {
            *holds |= also;
        }
        let chosen = choose(holds, &mut passed_over);
        for (counter, n) in self.passed_over.iter().zip(passed_over) {
            counter.store(n, Ordering::Relaxed);
        }
        let class = chosen?;
        let core = &self.cores[class];
        core.take(&mut core.lock(), batch, class, usize::MAX);
        Some(class)
    }

    /// Moves the next batch into `batch` (at most about
    /// [`TAKE_UP_TO_BYTES`] of the class [`choose`] picks):
    /// `Ready(Some(frames))` if it took any, `Ready(None)` once every
    /// sender is gone and nothing is left, `Pending` (the writer to be
    /// woken) if there is nothing yet.
    pub(super) fn poll_take(
        &self,
        cx: &mut Context<'_>,
        batch: &mut VecDeque<OutItem>,
    ) -> Poll<Option<usize>> {
        let frames = self.take_next(batch);
        if frames > 0 {
            return Poll::Ready(Some(frames));
        }
        // Everything looked empty: each class, under its lock, is taken
        // from (a frame queued since the look; rare, so in class order) or
        // told to wake the writer, so that nothing queued from now on is
        // missed.
        let mut gone = false;
        for (class, core) in self.cores.iter().enumerate() {
            let mut state = core.lock();
            // A shut `Low` window is looked at under the class's lock, as
            // a credit opens it (see `OutQueue::grant_low`).
            let frames = if class == LOW && !self.low_open() {
                0
            } else {
                core.take(&mut state, batch, class, usize::MAX)
            };
            if frames > 0 {
                return Poll::Ready(Some(frames));
            }
            gone |= state.senders_gone;
            if !matches!(&state.writer, Some(w) if w.will_wake(cx.waker())) {
                state.writer = Some(cx.waker().clone());
            }
            // The feed too: what is appended from now on wakes the writer.
            if state
                .follower
                .as_ref()
                .is_some_and(|f| f.behind_or_wake(cx.waker()))
            {
                let frames = core.take(&mut state, batch, class, usize::MAX);
                if frames > 0 {
                    return Poll::Ready(Some(frames));
                }
            }
        }
        if gone {
            // A class looked at before the last sender left may have had a
            // frame queued since; once the senders are gone nothing more
            // comes, so one more look at each is the last.
            for (class, core) in self.cores.iter().enumerate() {
                let frames = core.take(&mut core.lock(), batch, class, usize::MAX);
                if frames > 0 {
                    return Poll::Ready(Some(frames));
                }
            }
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// Moves what was queued meanwhile into `batch`, without waiting: one
    /// more batch, as [`OutReceiver::poll_take`] would take it.
    pub(super) fn take_more(&self, batch: &mut VecDeque<OutItem>) {
        self.take_next(batch);
    }

    /// Marks where a goodbye stands: seals what each priority has queued
    /// and returns how many entries each holds now, the messages to write
    /// before the goodbye (see [`OutReceiver::take_before`]).
    pub(super) fn mark(&self) -> [usize; CLASSES] {
        std::array::from_fn(|class| {
            if class == CONTROL {
                return 0;
            }
            let core = &self.cores[class];
            let mut state = core.lock();
            core.seal(&mut state);
            state.items.len()
        })
    }

    /// Takes, from the most urgent priority that has any left, a batch of
    /// the entries `left` counts (see [`OutReceiver::mark`]), counting them
    /// off: nothing queued after the mark. How many frames.
    pub(super) fn take_before(
        &self,
        left: &mut [usize; CLASSES],
        batch: &mut VecDeque<OutItem>,
    ) -> usize {
        let Some(class) = (1..CLASSES).find(|&c| left[c] > 0) else {
            return 0;
        };
        let core = &self.cores[class];
        let before = batch.len();
        let frames = core.take(&mut core.lock(), batch, class, left[class]);
        // Entries cannot be taken from under the writer: what it counted
        // is there (a closed queue dropped them, and ends the writer).
        left[class] = left[class].saturating_sub((batch.len() - before).max(1));
        frames
    }

    /// The counter the writer adds what it wrote to.
    pub(super) fn written_counter(&self) -> WrittenCounter {
        WrittenCounter(self.cores[CONTROL].clone())
    }

    /// Gives back what written frames of `class` held.
    pub(super) fn release(&self, class: usize, data: usize, bytes: usize) {
        if data == 0 && bytes == 0 {
            return;
        }
        let core = &self.cores[class];
        let mut state = core.lock();
        state.data -= data;
        state.bytes -= bytes;
        core.return_budget(&mut state);
        core.made_room(&state);
    }
}

impl Drop for OutReceiver {
    /// Nothing will be written any more: senders see the queue closed, and
    /// what was queued is dropped now, not when the last sender goes.
    fn drop(&mut self) {
        for core in &self.cores {
            core.close();
            let (items, staged, follower) = {
                let mut state = core.lock();
                state.frames = 0;
                // Nothing of it will be written: its budget goes back.
                if let Some(budget) = &core.budget {
                    budget.give(state.reserved);
                    state.reserved = 0;
                }
                (
                    std::mem::take(&mut state.items),
                    state.staged.discard(),
                    state.follower.take(),
                )
            };
            core.queued.store(0, Ordering::Relaxed);
            drop((items, staged, follower));
        }
    }
}

/// A waiter of [`OutQueue::written_up_to`], counted while it waits.
struct ProgressWaiter<'a>(&'a Core);

impl Drop for ProgressWaiter<'_> {
    fn drop(&mut self) {
        self.0.progress_waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a writer counts the bytes it wrote (see
/// [`OutQueue::written_bytes`]).
#[derive(Debug)]
pub(super) struct WrittenCounter(Arc<Core>);

impl WrittenCounter {
    pub(super) fn add(&self, n: usize) {
        self.0.written.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What every [`OutQueue`] handle shares; dropped with the last of them,
/// which tells the writer that nothing more will come.
#[derive(Debug)]
struct Senders {
    /// The classes (see [`OutReceiver::cores`]).
    cores: [Arc<Core>; CLASSES],
}

impl Drop for Senders {
    fn drop(&mut self) {
        for core in &self.cores {
            let waker = {
                let mut state = core.lock();
                state.senders_gone = true;
                state.writer.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// The queue itself, shared by the senders and the writer.
#[derive(Debug)]
struct Core {
    state: Mutex<State>,
    /// Frames the queue holds (taken frames no longer count).
    max_frames: usize,
    /// Frames data may use (queued or being written): `max_frames` less a
    /// reserve kept for control frames.
    max_data: usize,
    /// Payload bytes queued or being written.
    max_bytes: u32,
    /// Wakes senders waiting for room.
    room: Notify,
    /// Cancelled by [`OutQueue::close`] or when the writer's side is gone.
    closed: CancellationToken,
    /// The same, readable without a lock on every push.
    is_closed: AtomicBool,
    /// Set when a bounded wait for room timed out: the consumer is not
    /// keeping up, so further data fails at once until the queue drains.
    congested: AtomicBool,
    /// Frames queued, readable without the lock (a receiver's load, asked
    /// for on every `AnyOf` choice).
    queued: AtomicUsize,
    /// Bytes the writer has written to the connection so far: whether the
    /// consumer makes progress (see [`OutQueue::written_bytes`]).
    written: AtomicU64,
    /// Payload bytes ever queued (`State::bytes_total`, readable without
    /// the lock) and ever taken by the writer: see [`OutQueue::positions`].
    pushed: AtomicU64,
    taken: AtomicU64,
    /// Wakes [`OutQueue::taken_up_to`] and [`OutQueue::taken_down_to`]
    /// waiters, of whom there are `progress_waiters`.
    progress: Notify,
    progress_waiters: AtomicUsize,
    /// The budget its data also draws on, if it shares one.
    budget: Option<Arc<Budget>>,
    /// The frame limit of the connection being written (staged frames are
    /// checked against it when they are queued).
    max_frame: AtomicUsize,
    /// [`OutReceiver::chunk_above`]'s size, for [`Core::is_large`].
    chunk_bytes: AtomicUsize,
    /// Bytes of parts the peer said it read (see [`OutQueue::grant`]);
    /// the control class's only.
    granted: AtomicU64,
    /// The last [`Header::LowMark`] the peer answered (see
    /// [`OutQueue::grant_low`]); the control class's only.
    low_granted: AtomicU64,
    /// `LowMark`s written on the current connection; the control class's
    /// only, changed by the writer alone.
    low_marks: AtomicU64,
    /// Wakes a writer waiting for the peer to read parts.
    grants: Notify,
    /// The feed the control class follows, if it does (see
    /// [`OutQueue::follow`]), and its position there, readable without
    /// the lock (the follower itself is in [`State::follower`]).
    feed: OnceLock<Arc<Feed>>,
    feed_position: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<OutItem>,
    /// Frames queued (in `items` or `staged`).
    frames: usize,
    /// Small frames encoded since the last item, in order after it.
    staged: Staged,
    /// Data frames queued or being written.
    data: usize,
    /// Payload bytes queued or being written.
    bytes: usize,
    /// The writer, when it waits for frames.
    writer: Option<Waker>,
    /// Every [`OutQueue`] is gone.
    senders_gone: bool,
    /// Data senders waiting for room, in arrival order (their tickets):
    /// only the first may take room, and nobody overtakes them.
    waiting: VecDeque<u64>,
    /// The same for large frames ([`Core::is_large`]), which wait in a
    /// line of their own: a small frame never waits for a large one to
    /// find room (a large frame goes in parts, and may be overtaken on
    /// the wire anyway).
    waiting_large: VecDeque<u64>,
    next_ticket: u64,
    /// Senders waiting for a frame slot for a control frame.
    control_waiting: usize,
    /// Bytes taken from the shared budget: at least `bytes`.
    reserved: usize,
    /// Data frames ever queued (see [`QueueStats::data_total`]).
    data_total: u64,
    /// Their payload bytes (see [`QueueStats::bytes_total`]).
    bytes_total: u64,
    /// The payload bytes of the frames taken by the writer so far.
    taken_total: u64,
    /// The control class's place in a feed (see [`OutQueue::follow`]).
    follower: Option<Follower>,
    /// The feed's head at the last mark (see [`Core::mark_feed`]).
    feed_marked: u64,
}

impl State {
    /// The line data senders of large frames wait in, or the other's.
    fn line(&mut self, large: bool) -> &mut VecDeque<u64> {
        if large {
            &mut self.waiting_large
        } else {
            &mut self.waiting
        }
    }
}

/// What a waiting sender found when it looked.
enum Look {
    /// Queued; what is left to do once the lock is released.
    Queued(Put),
    Closed(OutFrame),
    Wait(OutFrame),
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.is_closed.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.is_closed.store(true, Ordering::Release);
        self.closed.cancel();
    }

    fn max_frame(&self) -> usize {
        self.max_frame.load(Ordering::Relaxed)
    }

    /// The byte permits `frame` holds on `lane`: control frames hold none.
    fn permits_on(&self, lane: Lane, frame: &OutFrame) -> u32 {
        match lane {
            Lane::Data => self.permits_for_len(frame.payload_len()),
            Lane::Control => 0,
        }
    }

    /// The byte permits a payload of `len` bytes holds: all the class's
    /// bytes at most; for a large frame ([`Core::is_large`]) three
    /// quarters at most, so that small frames find room beside a large
    /// one however large it is.
    fn permits_for_len(&self, len: usize) -> u32 {
        let max = if self.is_large(len) {
            (self.max_bytes - self.max_bytes / 4).max(1)
        } else {
            self.max_bytes
        };
        u32::try_from(len).unwrap_or(u32::MAX).min(max)
    }

    /// Whether a data frame with a payload of `len` bytes is large: the
    /// writer sends it in parts (see [`OutReceiver::chunk_above`]). Large
    /// frames wait for room in a line of their own (see
    /// [`State::waiting_large`]).
    fn is_large(&self, len: usize) -> bool {
        len > self.chunk_bytes.load(Ordering::Relaxed)
    }

    /// Whether no data sender waits before a frame in its line (the large
    /// frames' if `large`).
    fn nobody_waits(&self, state: &State, large: bool) -> bool {
        if large {
            state.waiting_large.is_empty()
        } else {
            state.waiting.is_empty()
        }
    }

    /// Whether a data frame of `permits` bytes fits now (in the queue, and
    /// in the shared budget, taking another chunk of it if need be).
    fn data_fits(&self, state: &mut State, permits: u32) -> bool {
        let fits = state.frames < self.max_frames
            && state.data < self.max_data
            && state.bytes + permits as usize <= self.max_bytes as usize;
        let Some(budget) = self.budget.as_ref().filter(|_| fits) else {
            return fits;
        };
        let need = state.bytes + permits as usize;
        if need <= state.reserved {
            return true;
        }
        // A closed queue gave its budget back (under this lock) and takes
        // none again.
        if self.is_closed() {
            return false;
        }
        let more = (need - state.reserved).max(BUDGET_CHUNK_BYTES);
        if budget.try_take(more) {
            state.reserved += more;
            true
        } else {
            false
        }
    }

    /// Gives back to the shared budget what the queue holds beyond its
    /// bytes rounded up to a chunk (all of it once empty).
    fn return_budget(&self, state: &mut State) {
        if let Some(budget) = &self.budget {
            let keep = state.bytes.next_multiple_of(BUDGET_CHUNK_BYTES);
            if state.reserved > keep {
                budget.give(state.reserved - keep);
                state.reserved = keep;
            }
        }
    }

    /// Whether a control frame fits now.
    fn control_fits(&self, state: &State) -> bool {
        state.frames < self.max_frames
    }

    /// Whether the queue holds under a quarter of its data frames and
    /// bytes.
    fn is_drained(&self) -> bool {
        let state = self.lock();
        state.data < self.max_data / 4 && state.bytes < self.max_bytes as usize / 4
    }

    /// Stages a small data frame (`head`, then `payload`) if there is room
    /// right now and nobody waits before it; the sleeping writer's waker,
    /// if any, for the caller to wake. `Err` if nothing was staged.
    fn stage_now(&self, head: &Head, payload: &[u8]) -> Result<Option<Waker>, ()> {
        let permits = self.permits_for_len(payload.len());
        let mut state = self.lock();
        if !self.nobody_waits(&state, self.is_large(payload.len()))
            || !self.data_fits(&mut state, permits)
        {
            return Err(());
        }
        self.stage(&mut state, head, payload, permits as usize, 1);
        Ok(self.count(&mut state, permits as usize, 1))
    }

    /// Queues a frame known to fit; what is left to do once the lock is
    /// released.
    fn put(&self, state: &mut State, item: OutItem, staging: &Staging) -> Put {
        self.mark_feed(state);
        let OutItem {
            what,
            permits,
            data,
            frames,
            class,
            feed_mark,
        } = item;
        let mut spent = None;
        match (what, staging) {
            (Queued::Frame(frame), Staging::Head(head)) => {
                let payload = match &frame {
                    OutFrame::Parts { body, .. } => &body[..],
                    OutFrame::Raw(raw) => &raw[..],
                };
                self.stage(state, head, payload, permits, data);
                // Dropped by the caller, once the lock is released.
                spent = Some(frame);
            }
            (Queued::Frame(frame), Staging::Invalid) => {
                // As the writer does with a frame it cannot encode (the
                // error was logged when it was looked at).
                return Put {
                    writer: None,
                    spent: Some(frame),
                };
            }
            (what, _) => {
                self.seal(state);
                state.items.push_back(OutItem {
                    what,
                    permits,
                    data,
                    frames,
                    class,
                    feed_mark,
                });
            }
        }
        Put {
            writer: self.count(state, permits, data),
            spent,
        }
    }

    /// Counts a frame just queued; the writer to wake, if it sleeps.
    fn count(&self, state: &mut State, permits: usize, data: usize) -> Option<Waker> {
        state.data += data;
        state.bytes += permits;
        // Under the lock already held: no atomic of their own.
        state.data_total += data as u64;
        state.bytes_total += permits as u64;
        self.pushed.store(state.bytes_total, Ordering::Relaxed);
        state.frames += 1;
        self.queued.store(state.frames, Ordering::Relaxed);
        state.writer.take()
    }

    /// Appends a frame (`head`, then `payload`) to the staged frames; a
    /// chunk it closes on the way goes in line first. The frame's counts
    /// are the caller's to add.
    fn stage(&self, state: &mut State, head: &Head, payload: &[u8], permits: usize, data: usize) {
        if let Some(full) = state.staged.make_room(head, payload) {
            state.items.push_back(full.into());
        }
        state.staged.append(head, payload, permits, data);
    }

    /// Closes the staged frames into one item, so that what is queued next
    /// goes after them.
    fn seal(&self, state: &mut State) {
        if let Some(chunk) = state.staged.seal() {
            state.items.push_back(chunk.into());
        }
    }

    /// Moves what is queued into `batch`, oldest first, up to about
    /// [`TAKE_UP_TO_BYTES`] and at most `max_items` entries (at least one),
    /// marking each entry as of `class`; how many frames that was.
    fn take(
        &self,
        state: &mut State,
        batch: &mut VecDeque<OutItem>,
        class: usize,
        max_items: usize,
    ) -> usize {
        let frames = self.take_queued(state, batch, class, max_items);
        if state.frames == 0 {
            // The feed's frames after everything queued before the look.
            frames + self.take_feed(state, batch, class)
        } else {
            frames
        }
    }

    /// Whether the class follows a feed and has frames to take there
    /// (read without the lock).
    fn feed_behind(&self) -> bool {
        self.feed
            .get()
            .is_some_and(|feed| feed.head() > self.feed_position.load(Ordering::Acquire))
    }

    /// Moves a batch of the feed's frames beyond its position into `batch`
    /// as one entry, if it follows one: how many frames. One that lost
    /// its place closes the queue: the peer cannot be told what it missed.
    fn take_feed(&self, state: &mut State, batch: &mut VecDeque<OutItem>, class: usize) -> usize {
        self.take_feed_from(state, batch, class, u64::MAX, false)
    }

    /// Moves every frame of the feed before `end` not taken yet into
    /// `batch`, in entries of at most about [`FEED_TAKE_BYTES`].
    fn take_feed_before(
        &self,
        state: &mut State,
        batch: &mut VecDeque<OutItem>,
        class: usize,
        end: u64,
    ) -> usize {
        self.take_feed_from(state, batch, class, end, true)
    }

    /// Takes the feed's frames before `end`: one entry, or (`all`) as
    /// many as it takes.
    fn take_feed_from(
        &self,
        state: &mut State,
        batch: &mut VecDeque<OutItem>,
        class: usize,
        end: u64,
        all: bool,
    ) -> usize {
        let mut taken = 0;
        loop {
            let Some(follower) = state.follower.as_mut() else {
                return taken;
            };
            match follower.take_before(FEED_TAKE_BYTES, end) {
                Ok(Some((bytes, frames))) => {
                    self.feed_position
                        .store(follower.position(), Ordering::Release);
                    batch.push_back(OutItem {
                        what: Queued::Framed(bytes),
                        permits: 0,
                        data: 0,
                        frames: 0,
                        class,
                        feed_mark: None,
                    });
                    taken += frames;
                    if !all {
                        return taken;
                    }
                }
                Ok(None) => return taken,
                Err(lagged) => {
                    tracing::warn!(error = %lagged, "closing the connection: it missed frames every peer gets");
                    state.follower = None;
                    self.feed_position.store(u64::MAX, Ordering::Release);
                    self.close();
                    return taken;
                }
            }
        }
    }

    /// In a class that follows a feed: if frames were appended to the
    /// feed since the last mark, a mark, so that they are written before
    /// the frame about to be queued, as they were appended before it (a
    /// member's own update before the answer to its subscription, a busy
    /// receiver's update told to one sender before the one told to all).
    fn mark_feed(&self, state: &mut State) {
        let Some(feed) = self.feed.get() else {
            return;
        };
        let head = feed.head();
        if head > state.feed_marked {
            self.seal(state);
            state.items.push_back(OutItem::feed_mark(head));
            state.feed_marked = head;
        }
    }

    /// Replaces the marks among `batch[from..]` with the feed's frames
    /// before each; how many frames that was.
    fn expand_feed_marks(
        &self,
        state: &mut State,
        batch: &mut VecDeque<OutItem>,
        from: usize,
        class: usize,
    ) -> usize {
        if !batch.range(from..).any(|item| item.feed_mark.is_some()) {
            return 0;
        }
        let taken: Vec<OutItem> = batch.drain(from..).collect();
        let mut frames = 0;
        for item in taken {
            match item.feed_mark {
                Some(end) => frames += self.take_feed_before(state, batch, class, end),
                None => batch.push_back(item),
            }
        }
        frames
    }

    /// [`Core::take`] of the frames queued.
    fn take_queued(
        &self,
        state: &mut State,
        batch: &mut VecDeque<OutItem>,
        class: usize,
        max_items: usize,
    ) -> usize {
        if state.frames == 0 {
            return 0;
        }
        self.seal(state);
        let (mut frames, mut permits, mut bytes, mut count) = (0, 0, 0, 0);
        for item in state.items.iter_mut() {
            if count > 0 && (bytes >= TAKE_UP_TO_BYTES || count >= max_items) {
                break;
            }
            item.class = class;
            frames += item.frames;
            permits += item.permits;
            bytes += item.len();
            count += 1;
        }
        let from = batch.len();
        if count == state.items.len() && batch.is_empty() {
            // A swap: the entries are not moved one by one.
            std::mem::swap(&mut state.items, batch);
        } else {
            batch.extend(state.items.drain(..count));
        }
        state.frames -= frames;
        let feed_frames = self.expand_feed_marks(state, batch, from, class);
        state.taken_total += permits as u64;
        // Sequentially consistent with the waiters' count and look: one of
        // the two sees the other.
        self.queued.store(state.frames, Ordering::SeqCst);
        self.taken.store(state.taken_total, Ordering::SeqCst);
        self.made_room(state);
        if self.progress_waiters.load(Ordering::SeqCst) > 0 {
            self.progress.notify_waiters();
        }
        frames + feed_frames
    }

    /// Wakes waiting senders if there are any: room was made.
    fn made_room(&self, state: &State) {
        if !state.waiting.is_empty() || !state.waiting_large.is_empty() || state.control_waiting > 0
        {
            self.room.notify_waiters();
        }
    }
}

/// A sender waiting for room on its lane: a data sender's place in line
/// (its ticket), or a control sender counted as waiting. Dropped, also
/// when the wait is abandoned, it gives the place up.
struct Place<'a> {
    core: &'a Core,
    lane: Lane,
    /// A data sender's ticket, once it joined the line.
    ticket: Option<u64>,
    /// Whether its line is the large frames' ([`State::waiting_large`]).
    large: bool,
    /// Whether a control sender is counted in `control_waiting`.
    counted: bool,
}

impl Place<'_> {
    /// Takes room for a frame of `permits` bytes if there is room and it
    /// is this sender's turn, leaving the line; otherwise stays (or gets)
    /// in line, so that room made from now on wakes it.
    fn take_room(&mut self, state: &mut State, permits: u32) -> bool {
        let core = self.core;
        match self.lane {
            Lane::Data => {
                let large = self.large;
                let ticket = *self.ticket.get_or_insert_with(|| {
                    let ticket = state.next_ticket;
                    state.next_ticket += 1;
                    state.line(large).push_back(ticket);
                    ticket
                });
                if state.line(large).front() != Some(&ticket) || !core.data_fits(state, permits) {
                    return false;
                }
                state.line(large).pop_front();
                self.ticket = None;
                // The next in line may fit too.
                core.made_room(state);
                true
            }
            Lane::Control => {
                let fits = core.control_fits(state);
                // Counted while it waits, so that room made wakes it.
                match (fits, self.counted) {
                    (true, true) => state.control_waiting -= 1,
                    (false, false) => state.control_waiting += 1,
                    _ => {}
                }
                self.counted = !fits;
                fits
            }
        }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if self.ticket.is_none() && !self.counted {
            return;
        }
        let mut state = self.core.lock();
        if let Some(ticket) = self.ticket {
            let line = state.line(self.large);
            let first = line.front() == Some(&ticket);
            line.retain(|t| *t != ticket);
            if first {
                // The next in line may fit now.
                self.core.made_room(&state);
            }
        }
        if self.counted {
            state.control_waiting -= 1;
        }
    }
}

/// One entry of an outgoing queue.
#[derive(Debug)]
pub(super) struct OutItem {
    pub(super) what: Queued,
    /// Payload bytes it holds until written.
    pub(super) permits: usize,
    /// Data slots it holds until written.
    pub(super) data: usize,
    /// Frames it holds.
    frames: usize,
    /// The class it was queued in, once taken (its room goes back there).
    pub(super) class: usize,
    /// For a mark in a class that follows a feed (see
    /// [`Core::mark_feed`]): the feed's frames before this sequence number
    /// go here, before what was queued after the mark.
    pub(super) feed_mark: Option<u64>,
}

impl OutItem {
    /// A frame queued on `lane`, holding `permits` payload bytes.
    pub(super) fn frame(frame: OutFrame, permits: u32, lane: Lane) -> Self {
        OutItem {
            what: Queued::Frame(frame),
            permits: permits as usize,
            data: usize::from(lane == Lane::Data),
            frames: 1,
            class: NORMAL,
            feed_mark: None,
        }
    }

    /// A mark: the feed's frames before `end` go where it stands.
    fn feed_mark(end: u64) -> Self {
        OutItem {
            what: Queued::Framed(bytes::Bytes::new()),
            permits: 0,
            data: 0,
            frames: 0,
            class: CONTROL,
            feed_mark: Some(end),
        }
    }

    /// About the bytes it takes on the wire.
    fn len(&self) -> usize {
        match &self.what {
            Queued::Frame(frame) => frame.payload_len(),
            Queued::Framed(bytes) => bytes.len(),
        }
    }
}

impl From<Chunk> for OutItem {
    fn from(chunk: Chunk) -> Self {
        OutItem {
            what: Queued::Framed(chunk.bytes),
            permits: chunk.permits,
            data: chunk.data,
            frames: chunk.frames,
            class: NORMAL,
            feed_mark: None,
        }
    }
}

/// What an [`OutItem`] holds.
#[derive(Debug)]
pub(super) enum Queued {
    /// A frame to encode and write.
    Frame(OutFrame),
    /// Small frames encoded as they were queued, ready to write as they
    /// are.
    Framed(bytes::Bytes),
}

/// What queuing a frame leaves to do once the lock is released.
#[must_use]
struct Put {
    /// The writer to wake, if it slept.
    writer: Option<Waker>,
    /// A frame whose bytes were copied: dropped outside the lock.
    spent: Option<OutFrame>,
}

impl Put {
    fn finish(self) {
        if let Some(waker) = self.writer {
            waker.wake();
        }
        drop(self.spent);
    }
}

/// What a queue holds and who waits for room, as seen from the writer's
/// side; all zero once everything is written and nobody waits.
#[cfg(test)]
#[derive(Debug, Default, PartialEq, Eq)]
struct Held {
    /// Frames queued, as counted and as published.
    frames: (usize, usize),
    /// Entries not yet taken, and what the staged frames hold (bytes,
    /// payload bytes, data slots).
    items: usize,
    staged: (usize, usize, usize),
    /// Data slots and payload bytes held, queued or being written.
    data: usize,
    bytes: usize,
    /// Data senders in line, control senders waiting.
    waiting: usize,
    control_waiting: usize,
}

#[cfg(test)]
impl OutReceiver {
    /// What every class holds, added up.
    fn held(&self) -> Held {
        let mut held = Held::default();
        for core in &self.cores {
            let state = core.lock();
            let (staged, permits, data) = state.staged.peek();
            held.frames.0 += state.frames;
            held.frames.1 += core.queued.load(Ordering::Relaxed);
            held.items += state.items.len();
            held.staged.0 += staged.len();
            held.staged.1 += permits;
            held.staged.2 += data;
            held.data += state.data;
            held.bytes += state.bytes;
            held.waiting += state.waiting.len() + state.waiting_large.len();
            held.control_waiting += state.control_waiting;
        }
        held
    }

    /// Gives back what the written `batch` held, class by class.
    fn release_batch(&self, batch: &VecDeque<OutItem>) {
        for item in batch {
            self.release(item.class, item.data, item.permits);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::frame::{Frame, FrameCodec};
    use crate::io::run_writer;
    use crate::protocol::Header;

    #[tokio::test(start_paused = true)]
    async fn bounded_wait_marks_congestion_until_drained() {
        let (q, rx) = out_queue(8, 1 << 20);
        let frame = || OutFrame::control(Header::Subscribed { token: 0 });
        while q.try_push(frame(), Lane::Data).is_ok() {}
        let wait = Duration::from_millis(100);
        assert!(matches!(
            q.push_within(frame(), wait).await,
            Err(PushError::Congested)
        ));
        assert!(q.is_congested());
        // Congested and still full: fails at once, no second wait.
        let started = tokio::time::Instant::now();
        assert!(matches!(
            q.push_within(frame(), wait).await,
            Err(PushError::Full(_))
        ));
        assert_eq!(started.elapsed(), Duration::ZERO);
        // Drained: accepted again and no longer congested.
        let writer = tokio::spawn(run_writer(tokio::io::sink(), rx, 1 << 20));
        while q.queued_frames() > 0 {
            tokio::task::yield_now().await;
        }
        assert!(q.push_within(frame(), wait).await.is_ok());
        assert!(!q.is_congested());
        drop(q);
        writer.await.expect("join").expect("writer");
    }

    /// Stats count data frames (staged or not) and their bytes, both what
    /// is queued and what ever was; control frames only as frames.
    #[tokio::test]
    async fn stats_count_depth_and_totals() {
        let (q, rx) = out_queue(64, 1 << 20);
        assert_eq!(q.stats(), QueueStats::default());
        q.try_push(crate::io::subscribed(1, 100), Lane::Data)
            .expect("room");
        q.try_push(crate::io::subscribed(2, 10_000), Lane::Data)
            .expect("room");
        q.try_push(OutFrame::control(Header::Goodbye), Lane::Control)
            .expect("room");
        let stats = q.stats();
        assert_eq!((stats.frames, stats.data, stats.bytes), (3, 2, 10_100));
        assert_eq!((stats.data_total, stats.bytes_total), (2, 10_100));
        let writer = tokio::spawn(run_writer(tokio::io::sink(), rx, 1 << 20));
        while q.stats().data > 0 {
            tokio::task::yield_now().await;
        }
        let stats = q.stats();
        assert_eq!((stats.frames, stats.data, stats.bytes), (0, 0, 0));
        assert_eq!((stats.data_total, stats.bytes_total), (2, 10_100));
        assert!(stats.written_bytes > 10_100);
        drop(q);
        writer.await.expect("join").expect("writer");
    }

    /// A full data class refuses at once; control frames, a class of their
    /// own, still go.
    #[test]
    fn try_push_reports_full_and_keeps_control_room() {
        let (q, _rx) = out_queue(16, 1000);
        let frame = || OutFrame::Parts {
            header: Header::Goodbye,
            body: Bytes::from_static(b"x"),
        };
        let mut pushed = 0;
        while q.try_push(frame(), Lane::Data).is_ok() {
            pushed += 1;
        }
        assert_eq!(pushed, 16 - 16 / 8);
        assert!(q
            .try_push(OutFrame::control(Header::Goodbye), Lane::Control)
            .is_ok());

        let (q, _rx) = out_queue(16, 100);
        let body = |n| OutFrame::Parts {
            header: Header::Goodbye,
            body: Bytes::from(vec![0u8; n]),
        };
        assert!(q.try_push(body(60), Lane::Data).is_ok());
        assert!(matches!(
            q.try_push(body(60), Lane::Data),
            Err(PushError::Full(_))
        ));
        // A push not polled queues nothing.
        drop(q.push(body(10), Lane::Data, Wait::Forever));
        assert_eq!(q.queued_frames(), 1);
    }

    #[test]
    fn queues_sharing_a_budget_take_no_more_than_it_and_give_it_back() {
        let chunk = BUDGET_CHUNK_BYTES;
        let budget = Budget::new(4 * chunk);
        let body = |n: usize| OutFrame::Parts {
            header: Header::Goodbye,
            body: Bytes::from(vec![0u8; n]),
        };
        // Each queue alone could hold 8 chunks; together they get 4.
        let (a, a_rx) = out_queue_within(1024, 8 * chunk, budget.clone());
        let (b, b_rx) = out_queue_within(1024, 8 * chunk, budget.clone());
        for _ in 0..3 {
            assert!(a.try_push(body(chunk), Lane::Data).is_ok());
        }
        assert!(b.try_push(body(chunk / 2), Lane::Data).is_ok());
        assert_eq!(budget.used(), 4 * chunk);
        // The budget is spent: neither queue takes more data, though
        // both have room of their own; control frames still go.
        for q in [&a, &b] {
            assert!(matches!(
                q.try_push(body(chunk), Lane::Data),
                Err(PushError::Full(_))
            ));
            assert!(q
                .try_push(OutFrame::control(Header::Goodbye), Lane::Control)
                .is_ok());
        }
        // Small frames within a queue's chunk still fit.
        assert!(b.try_push(body(100), Lane::Data).is_ok());
        // What `a`'s writer writes goes back (all of it: `a` is empty), and
        // `b` gets it.
        let mut batch = VecDeque::new();
        loop {
            let before = batch.len();
            a_rx.take_more(&mut batch);
            if batch.len() == before {
                break;
            }
        }
        a_rx.release_batch(&batch);
        assert_eq!(budget.used(), chunk);
        assert!(budget.has_room(3 * chunk) && !budget.has_room(3 * chunk + 1));
        assert!(b.try_push(body(chunk), Lane::Data).is_ok());
        // A dropped queue gives back all it had.
        drop(b_rx);
        assert_eq!(budget.used(), 0);
        drop(a_rx);
        assert_eq!(budget.used(), 0);
    }

    fn numbered(token: u64, len: usize) -> OutFrame {
        OutFrame::Parts {
            header: Header::Subscribed { token },
            body: Bytes::from(vec![0u8; len]),
        }
    }

    /// The tokens of the `Subscribed` frames an entry holds, staged or not.
    fn tokens_of(item: &OutItem) -> Vec<u64> {
        let token = |header: &Header| match header {
            Header::Subscribed { token } => *token,
            other => panic!("unexpected frame {other:?}"),
        };
        match &item.what {
            Queued::Frame(OutFrame::Parts { header, .. }) => vec![token(header)],
            Queued::Frame(other) => panic!("unexpected frame {other:?}"),
            Queued::Framed(bytes) => {
                let mut src = BytesMut::from(&bytes[..]);
                let mut codec = FrameCodec::new(1 << 20);
                let mut tokens = vec![];
                while let Some(raw) = codec.decode_raw(&mut src).expect("decodes") {
                    tokens.push(token(Frame::decode(raw).expect("frame").header()));
                }
                assert!(src.is_empty(), "whole frames");
                tokens
            }
        }
    }

    /// A task pushing a frame on `lane`, waiting for room (a data frame)
    /// or a slot (a control frame).
    fn spawn_push(
        q: &OutQueue,
        lane: Lane,
        token: u64,
        len: usize,
    ) -> tokio::task::JoinHandle<Result<(), PushError>> {
        let q = q.clone();
        tokio::spawn(async move { q.push(numbered(token, len), lane, Wait::Forever).await })
    }

    /// Takes what is queued, as the writer does, and gives back what the
    /// taken frames held, as the writer does once they are written.
    fn take_and_write(rx: &mut OutReceiver) -> Vec<u64> {
        let mut batch = VecDeque::new();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        // Every class, as the writer takes them: batch after batch.
        while rx.poll_take(&mut cx, &mut batch).is_ready() && rx.held().frames.0 > 0 {}
        let tokens = batch.iter().flat_map(tokens_of).collect();
        rx.release_batch(&batch);
        tokens
    }

    /// A sender that waits for room is served before anyone who comes
    /// later, even one that would fit at once; waiting senders keep their
    /// order.
    #[tokio::test(flavor = "current_thread")]
    async fn waiting_senders_are_served_in_order_and_not_overtaken() {
        let (q, mut rx) = out_queue(64, 100);
        q.try_push(numbered(0, 80), Lane::Data).expect("room");
        let first = spawn_push(&q, Lane::Data, 1, 60);
        tokio::task::yield_now().await;
        let second = spawn_push(&q, Lane::Data, 2, 10);
        tokio::task::yield_now().await;
        // 10 bytes would fit, but two senders wait before this one.
        assert!(matches!(
            q.try_push(numbered(3, 10), Lane::Data),
            Err(PushError::Full(_))
        ));
        assert_eq!(take_and_write(&mut rx), vec![0]);
        first.await.expect("join").expect("queued");
        second.await.expect("join").expect("queued");
        assert_eq!(take_and_write(&mut rx), vec![1, 2]);
        q.try_push(numbered(4, 10), Lane::Data)
            .expect("nobody waits now");
        assert_eq!(take_and_write(&mut rx), vec![4]);
    }

    /// A large frame (one the writer sends in parts) holds three quarters
    /// of the bytes at most, and waits in a line of its own: small frames
    /// find room beside it, and never wait behind a large one waiting for
    /// room.
    #[tokio::test(flavor = "current_thread")]
    async fn small_frames_pass_a_large_one_waiting_for_room() {
        let (q, mut rx) = out_queue(64, 64 * 1024);
        rx.chunk_above(4 * 1024);
        q.try_push(numbered(0, 1 << 20), Lane::Data).expect("room");
        assert_eq!(rx.held().bytes, 48 * 1024, "three quarters of the bytes");
        let large = spawn_push(&q, Lane::Data, 1, 1 << 20);
        tokio::task::yield_now().await;
        assert!(!large.is_finished(), "no room for a second large frame");
        q.try_push(numbered(2, 4 * 1024), Lane::Data)
            .expect("a small frame does not wait behind the large one");
        for token in 3..6 {
            q.try_push(numbered(token, 4 * 1024), Lane::Data)
                .expect("up to the bound beside the large one");
        }
        assert!(matches!(
            q.try_push(numbered(6, 1), Lane::Data),
            Err(PushError::Full(_))
        ));
        assert_eq!(take_and_write(&mut rx), vec![0, 2, 3, 4, 5]);
        large
            .await
            .expect("join")
            .expect("queued once room was made");
        assert_eq!(take_and_write(&mut rx), vec![1]);
    }

    /// A wait given up (its future dropped) gives its place up: the next
    /// in line is served.
    #[tokio::test(flavor = "current_thread")]
    async fn an_abandoned_wait_lets_the_next_sender_in() {
        let (q, mut rx) = out_queue(64, 100);
        q.try_push(numbered(0, 100), Lane::Data).expect("room");
        let abandoned = spawn_push(&q, Lane::Data, 1, 100);
        tokio::task::yield_now().await;
        let next = spawn_push(&q, Lane::Data, 2, 50);
        tokio::task::yield_now().await;
        abandoned.abort();
        assert!(abandoned.await.is_err(), "aborted");
        assert_eq!(take_and_write(&mut rx), vec![0]);
        next.await.expect("join").expect("queued");
        assert_eq!(take_and_write(&mut rx), vec![2]);
        assert_eq!(rx.held(), Held::default(), "nothing held, nobody waits");
    }

    /// A push whose wait runs out hands its frame back as `Full` and gives
    /// its place up; a control push waits for a slot just the same. With
    /// room at once, an instant already past does not matter.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_wait_that_runs_out_hands_the_frame_back_and_its_place_up() {
        let (q, mut rx) = out_queue(8, 100);
        q.try_push(numbered(0, 100), Lane::Data).expect("room");
        let wait = Duration::from_millis(100);
        let bounded = {
            let q = q.clone();
            tokio::spawn(async move { q.push(numbered(1, 50), Lane::Data, Wait::For(wait)).await })
        };
        tokio::task::yield_now().await;
        let next = spawn_push(&q, Lane::Data, 2, 50);
        tokio::task::yield_now().await;
        let started = Instant::now();
        match bounded.await.expect("join") {
            Err(PushError::Full(frame)) => assert!(matches!(
                *frame,
                OutFrame::Parts {
                    header: Header::Subscribed { token: 1 },
                    ..
                }
            )),
            other => panic!("expected the frame back, got {other:?}"),
        }
        assert!(started.elapsed() >= wait);
        assert_eq!(take_and_write(&mut rx), vec![0]);
        next.await.expect("join").expect("queued");
        assert_eq!(take_and_write(&mut rx), vec![2]);

        while q.try_push(numbered(3, 0), Lane::Control).is_ok() {}
        let deadline = Instant::now() + wait;
        assert!(matches!(
            q.push(numbered(4, 0), Lane::Control, Wait::Until(deadline))
                .await,
            Err(PushError::Full(_))
        ));
        assert!(Instant::now() >= deadline);
        assert_eq!(take_and_write(&mut rx).len(), 8);
        let past = Instant::now() - wait;
        q.push(numbered(5, 0), Lane::Control, Wait::Until(past))
            .await
            .expect("room at once");
        q.push(numbered(6, 1), Lane::Data, Wait::Until(past))
            .await
            .expect("room at once");
        assert_eq!(take_and_write(&mut rx), vec![5, 6]);
        assert_eq!(rx.held(), Held::default(), "nothing held, nobody waits");
    }

    /// Closing wakes waiting senders with their frames handed back; a
    /// dropped writer closes the queue too.
    #[tokio::test(flavor = "current_thread")]
    async fn closing_fails_waiting_senders_and_later_pushes() {
        let (q, rx) = out_queue(8, 100);
        q.try_push(numbered(0, 100), Lane::Data).expect("room");
        let waiting = spawn_push(&q, Lane::Data, 1, 10);
        tokio::task::yield_now().await;
        q.close();
        assert!(matches!(
            waiting.await.expect("join"),
            Err(PushError::Closed(_))
        ));
        assert!(q.is_closed());
        assert!(matches!(
            q.try_push(numbered(2, 0), Lane::Control),
            Err(PushError::Closed(_))
        ));
        q.closed().await;

        let (q, rx2) = out_queue(8, 100);
        drop(rx2);
        assert!(q.is_closed());
        assert!(matches!(
            q.push(numbered(3, 0), Lane::Control, Wait::Forever).await,
            Err(PushError::Closed(_))
        ));
        drop(rx);
    }

    /// Runs the writer on `rx` until it finishes (a goodbye written, or
    /// every sender gone) and reads back the headers of what it wrote.
    async fn write_to_the_end(rx: &mut OutReceiver) -> Vec<Header> {
        use crate::io::{write_queue, FrameReader, WriteEnd};
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let end = write_queue(&mut client, rx, 1 << 20, Vec::new())
            .await
            .expect("written");
        assert_eq!(end, WriteEnd::Finished);
        drop(client);
        let mut reader = FrameReader::new(server, FrameCodec::new(1 << 20));
        let mut headers = Vec::new();
        while let Some(frame) = reader.next().await.expect("whole frames") {
            headers.push(frame.header().clone());
        }
        headers
    }

    /// Takes one batch, as the writer does, and gives back what it held.
    fn take_once(rx: &mut OutReceiver) -> Vec<u64> {
        let mut batch = VecDeque::new();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        if rx.poll_take(&mut cx, &mut batch).is_pending() {
            return vec![];
        }
        let tokens = batch.iter().flat_map(tokens_of).collect();
        rx.release_batch(&batch);
        tokens
    }

    /// Control frames first, then the priorities, most urgent first; each
    /// in the order it was queued.
    #[test]
    fn the_writer_takes_the_most_urgent_class_first() {
        let (q, mut rx) = out_queue(1024, 1 << 20);
        for token in 0..3 {
            q.try_push_at(numbered(token, 10), Priority::Low)
                .expect("room");
        }
        q.try_push(numbered(10, 10), Lane::Data).expect("room");
        q.try_push_at(numbered(20, 10), Priority::Express)
            .expect("room");
        q.try_push(numbered(30, 0), Lane::Control).expect("room");
        q.try_push_at(numbered(21, 10), Priority::High)
            .expect("room");
        q.try_push_at(numbered(22, 10), Priority::Express)
            .expect("room");
        assert_eq!(take_once(&mut rx), vec![30], "control first");
        assert_eq!(take_once(&mut rx), vec![20, 22]);
        assert_eq!(take_once(&mut rx), vec![21]);
        assert_eq!(take_once(&mut rx), vec![10]);
        assert_eq!(take_once(&mut rx), vec![0, 1, 2]);
        assert_eq!(rx.held(), Held::default(), "nothing held, nobody waits");
    }

    /// Which class goes next, take after take, while the classes marked
    /// keep holding frames: none is passed over more than
    /// `PASSED_OVER_AT_MOST` times in a row, the middle ones included.
    #[test]
    fn choose_passes_no_busy_class_over_too_often() {
        let (e, h, n, l) = (
            data_class(Priority::Express),
            data_class(Priority::High),
            data_class(Priority::Normal),
            data_class(Priority::Low),
        );
        let busy = |classes: &[usize]| {
            let mut holds = [false; CLASSES];
            for &c in classes {
                holds[c] = true;
            }
            holds
        };
        let picks = |holds: [bool; CLASSES], takes: usize| {
            let mut passed_over = [0u8; CLASSES];
            (0..takes)
                .map(|_| choose(holds, &mut passed_over).expect("some class holds frames"))
                .collect::<Vec<_>>()
        };
        // (classes holding frames, takes, the picks)
        let cases: [(&[usize], usize, Vec<usize>); 4] = [
            (&[n], 3, vec![n, n, n]),
            (&[e, l], 6, vec![e, e, e, e, l, e]),
            (&[e, h, l], 12, vec![e, e, e, e, l, h, e, e, e, l, h, e]),
            (&[CONTROL, e, l], 3, vec![CONTROL, CONTROL, CONTROL]),
        ];
        for (classes, takes, want) in cases {
            assert_eq!(picks(busy(classes), takes), want, "busy {classes:?}");
        }
        // Every busy class gets a take within each run of
        // `PASSED_OVER_AT_MOST + 1` takes after the first ones.
        let all = busy(&[e, h, n, l]);
        let got = picks(all, 200);
        for class in [e, h, n, l] {
            let gaps = got
                .iter()
                .enumerate()
                .filter(|(_, &c)| c == class)
                .map(|(i, _)| i)
                .collect::<Vec<_>>();
            let longest = gaps.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
            assert!(!gaps.is_empty(), "class {class} never taken: {got:?}");
            assert!(
                longest <= 2 * usize::from(PASSED_OVER_AT_MOST) + 2,
                "class {class} waited {longest} takes: {got:?}"
            );
        }
        assert_eq!(choose([false; CLASSES], &mut [0; CLASSES]), None);
    }

    /// A goodbye queued by the last sender just before it leaves is still
    /// written, after the message queued before it: the writer finishes
    /// only once nothing is left. Also when the writer coalesces small
    /// batches and takes the message into the goodbye's batch (it was lost
    /// so once: a one-way message a node sent just before it stopped).
    #[tokio::test(flavor = "current_thread")]
    async fn the_last_senders_goodbye_is_written_before_the_writer_finishes() {
        for (data_first, coalesce) in [(false, false), (true, false), (true, true)] {
            let (q, mut rx) = out_queue(64, 1 << 20);
            if coalesce {
                rx.coalesce_small_batches();
            }
            // The writer is asleep, registered with every class.
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            assert!(rx.poll_take(&mut cx, &mut VecDeque::new()).is_pending());
            if data_first {
                q.try_push_at(numbered(1, 10), Priority::Low).expect("room");
            }
            q.try_push(OutFrame::control(Header::Goodbye), Lane::Control)
                .expect("room");
            drop(q);
            let got: Vec<bool> = write_to_the_end(&mut rx)
                .await
                .iter()
                .map(|h| matches!(h, Header::Goodbye))
                .collect();
            let want = if data_first {
                vec![false, true]
            } else {
                vec![true]
            };
            assert_eq!(got, want, "goodbyes among the frames read");
        }
    }

    /// A class that holds frames while more urgent ones keep coming is
    /// passed over at most `PASSED_OVER_AT_MOST` times in a row.
    #[test]
    fn a_class_passed_over_gets_its_turn() {
        let (q, mut rx) = out_queue(1024, 1 << 20);
        for token in 100..110 {
            q.try_push_at(numbered(token, 10), Priority::Low)
                .expect("room");
        }
        let mut turns = Vec::new();
        for round in 0..8 {
            q.try_push_at(numbered(round, 10), Priority::Express)
                .expect("room");
            turns.push(take_once(&mut rx));
        }
        let low_at = turns
            .iter()
            .position(|t| t.first() == Some(&100))
            .expect("the low class had its turn");
        assert_eq!(low_at, usize::from(PASSED_OVER_AT_MOST), "{turns:?}");
        assert_eq!(turns[low_at], (100..110).collect::<Vec<_>>());
        // The express frames queued meanwhile go next, in order.
        assert_eq!(turns[low_at + 1], vec![4, 5]);
    }

    /// A batch holds at most about `TAKE_UP_TO_BYTES` of one class, so a
    /// more urgent frame queued meanwhile waits for no more than that.
    #[test]
    fn a_batch_is_bounded_and_an_urgent_frame_goes_next() {
        let (q, mut rx) = out_queue(1024, 8 << 20);
        let large = 100 * 1024;
        for token in 0..8 {
            q.try_push(numbered(token, large), Lane::Data)
                .expect("room");
        }
        let first = take_once(&mut rx);
        assert_eq!(first, vec![0, 1, 2], "{} bytes at most", TAKE_UP_TO_BYTES);
        q.try_push_at(numbered(50, 10), Priority::Express)
            .expect("room");
        assert_eq!(take_once(&mut rx), vec![50]);
        assert_eq!(take_once(&mut rx), vec![3, 4, 5]);
    }

    /// A goodbye is written after the messages queued before it, even
    /// those of less urgent classes than its own, and nothing queued after
    /// the writer took it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_goodbye_goes_after_the_messages_queued_before_it() {
        let (q, rx) = out_queue(64, 1 << 20);
        for token in 0..3 {
            q.try_push_at(numbered(token, 10), Priority::Low)
                .expect("room");
        }
        q.try_push(OutFrame::control(Header::Goodbye), Lane::Control)
            .expect("room");
        // The writer takes the goodbye (control first) and marks what was
        // queued before it; a message queued after that is not written.
        let mut taken = VecDeque::new();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(rx.poll_take(&mut cx, &mut taken).is_ready());
        let mut left = rx.mark();
        q.try_push_at(numbered(9, 10), Priority::Express)
            .expect("room");
        let mut before = VecDeque::new();
        while rx.take_before(&mut left, &mut before) > 0 {}
        let tokens: Vec<u64> = before.iter().flat_map(tokens_of).collect();
        assert_eq!(tokens, vec![0, 1, 2], "only what was queued before");
        rx.release_batch(&before);
        rx.release_batch(&taken);
        drop(rx);
        // The whole writer: the same, end to end.
        let (q, mut rx) = out_queue(64, 1 << 20);
        for token in 0..3 {
            q.try_push_at(numbered(token, 10), Priority::Low)
                .expect("room");
        }
        q.try_push(OutFrame::control(Header::Goodbye), Lane::Control)
            .expect("room");
        let got: Vec<Option<u64>> = write_to_the_end(&mut rx)
            .await
            .iter()
            .map(|h| match h {
                Header::Subscribed { token } => Some(*token),
                Header::Goodbye => None,
                other => panic!("unexpected frame {other:?}"),
            })
            .collect();
        assert_eq!(got, vec![Some(0), Some(1), Some(2), None]);
        drop(q);
    }

    /// Control frames have a class of their own, which a queue full of
    /// data does not hold up, wait only for a slot in it, and are written
    /// first; the writer finishes once every sender is gone.
    #[tokio::test(flavor = "current_thread")]
    async fn control_frames_wait_for_a_slot_and_the_writer_ends_with_the_senders() {
        let (q, mut rx) = out_queue(8, 1 << 20);
        while q.try_push(numbered(0, 1), Lane::Data).is_ok() {}
        assert_eq!(q.queued_frames(), 7);
        for _ in 0..8 {
            q.try_push(numbered(1, 0), Lane::Control)
                .expect("a slot of its own class");
        }
        assert!(matches!(
            q.try_push(numbered(2, 0), Lane::Control),
            Err(PushError::Full(_))
        ));
        let control = spawn_push(&q, Lane::Control, 2, 0);
        tokio::task::yield_now().await;
        let taken = take_and_write(&mut rx);
        assert_eq!(taken.len(), 15);
        assert!(
            taken[..8].iter().all(|&t| t == 1),
            "control first: {taken:?}"
        );
        control.await.expect("join").expect("queued");
        assert_eq!(take_and_write(&mut rx), vec![2]);
        assert_eq!(rx.held(), Held::default(), "nothing held, nobody waits");
        let weak = q.downgrade();
        assert!(weak.upgrade().is_some());
        drop(q);
        assert!(weak.upgrade().is_none());
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut batch = VecDeque::new();
        assert_eq!(rx.poll_take(&mut cx, &mut batch), Poll::Ready(None));
    }

    /// A staged frame over the connection's limit is accepted and dropped
    /// (as the writer drops one), holding nothing; the next one goes.
    #[test]
    fn a_staged_frame_over_the_limit_is_dropped() {
        let (q, mut rx) = out_queue(64, 1 << 20);
        rx.set_max_frame(100);
        q.try_push(numbered(1, 200), Lane::Data)
            .expect("accepted and dropped");
        assert_eq!(q.queued_frames(), 0);
        q.try_push(numbered(2, 10), Lane::Data).expect("room");
        assert_eq!(take_and_write(&mut rx), vec![2]);
        assert_eq!(q.class(NORMAL).lock().bytes, 0, "nothing held");
    }

    /// A message queued by reference is staged as exactly the bytes its
    /// owned frame would be; it is refused (nothing queued) when the queue
    /// is full, when someone waits, or when its body is not small.
    #[tokio::test(flavor = "current_thread")]
    async fn a_message_by_reference_stages_the_same_bytes() {
        use crate::protocol::{
            MessageHeader, MessageKind, MessageRef, NodeId, Priority, Target, TargetRef,
        };
        let target = Target::Node(NodeId::new("b"));
        let body = Bytes::from_static(b"hello");
        let by_ref = MessageRef {
            sender: "a",
            incarnation: 7,
            seq: 42,
            target: TargetRef::from(&target),
            service: "svc",
            kind: MessageKind::Notify,
            priority: Priority::Low,
            expires_ms: None,
        };
        let owned = OutFrame::Parts {
            header: Header::Message(MessageHeader {
                sender: NodeId::new("a"),
                incarnation: 7,
                seq: 42,
                target: target.clone(),
                service: Arc::from("svc"),
                kind: MessageKind::Notify,
                priority: Priority::Low,
                expires_ms: None,
            }),
            body: body.clone(),
        };
        let staged = |push: &dyn Fn(&OutQueue)| {
            let (q, rx) = out_queue(64, 1 << 20);
            push(&q);
            let state = rx.cores[data_class(Priority::Low)].lock();
            Bytes::copy_from_slice(state.staged.peek().0)
        };
        let a = staged(&|q| assert!(q.try_push_message(&by_ref, &body)));
        let b = staged(&|q| q.try_push(owned.clone(), Lane::Data).expect("room"));
        assert_eq!(a, b);

        // Refused when its own class is full or waited on: the normal one,
        // as the numbered frames'.
        let by_ref = MessageRef {
            priority: Priority::Normal,
            expires_ms: None,
            ..by_ref
        };
        let (q, mut rx) = out_queue(64, 10);
        q.try_push(numbered(0, 10), Lane::Data).expect("room");
        assert!(!q.try_push_message(&by_ref, &body), "no bytes left");
        let waiting = spawn_push(&q, Lane::Data, 1, 10);
        tokio::task::yield_now().await;
        assert_eq!(take_and_write(&mut rx), vec![0]);
        assert!(!q.try_push_message(&by_ref, &body), "someone waits");
        waiting.await.expect("join").expect("queued");
        let big = vec![0u8; STAGE_UP_TO_BYTES + 1];
        assert!(!q.try_push_message(&by_ref, &big), "not small");
        assert_eq!(take_and_write(&mut rx), vec![1]);
    }

    /// A received frame queued by reference is staged as exactly the bytes
    /// of its `OutFrame::Raw`; refused (nothing queued) when full, when
    /// someone waits, when empty, or when not small.
    #[tokio::test(flavor = "current_thread")]
    async fn a_raw_frame_by_reference_stages_the_same_bytes() {
        let raw = Bytes::from_static(b"\x03a received frame");
        let staged = |push: &dyn Fn(&OutQueue)| {
            let (q, rx) = out_queue(64, 1 << 20);
            push(&q);
            let state = rx.cores[NORMAL].lock();
            (
                Bytes::copy_from_slice(state.staged.peek().0),
                state.frames,
                state.bytes,
            )
        };
        let a = staged(&|q| assert!(q.try_push_raw(&raw, Priority::Normal, None)));
        let b = staged(&|q| {
            q.try_push(OutFrame::Raw(raw.clone()), Lane::Data)
                .expect("room")
        });
        assert_eq!(a, b);
        assert_eq!(a.1, 1, "one frame");

        let (q, mut rx) = out_queue(64, 10);
        q.try_push(numbered(0, 10), Lane::Data).expect("room");
        assert!(
            !q.try_push_raw(&raw, Priority::Normal, None),
            "no bytes left"
        );
        let waiting = spawn_push(&q, Lane::Data, 1, 10);
        tokio::task::yield_now().await;
        assert_eq!(take_and_write(&mut rx), vec![0]);
        assert!(
            !q.try_push_raw(b"x", Priority::Normal, None),
            "someone waits"
        );
        waiting.await.expect("join").expect("queued");
        assert!(!q.try_push_raw(&[], Priority::Normal, None), "empty");
        assert!(
            !q.try_push_raw(&vec![0u8; STAGE_UP_TO_BYTES + 1], Priority::Normal, None),
            "not small"
        );
        assert_eq!(take_and_write(&mut rx), vec![1]);
    }
    /// Counts its wakes.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Frames queued with their wakes held back wake the sleeping writer
    /// once, when the batch is woken (or dropped), not per frame.
    #[test]
    fn held_back_wakes_wake_the_writer_once_per_batch() {
        let (q, rx) = out_queue(64, 1 << 20);
        let counter = Arc::new(CountingWaker(std::sync::atomic::AtomicUsize::new(0)));
        let waker = std::task::Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut batch = VecDeque::new();
        let wakes_seen = || counter.0.load(Ordering::SeqCst);
        // The writer finds nothing and sleeps.
        assert!(rx.poll_take(&mut cx, &mut batch).is_pending());
        let mut wakes = Wakes::new();
        for _ in 0..3 {
            assert!(q.try_push_raw(b"\x03frame", Priority::Normal, Some(&mut wakes)));
        }
        assert_eq!(wakes_seen(), 0, "held back");
        assert!(!wakes.is_empty());
        wakes.wake_all();
        assert_eq!(wakes_seen(), 1, "woken once for three frames");
        assert!(wakes.is_empty());
        assert!(rx.poll_take(&mut cx, &mut batch).is_ready());
        // Asleep again: a batch dropped wakes what it holds.
        batch.clear();
        assert!(rx.poll_take(&mut cx, &mut batch).is_pending());
        {
            let mut wakes = Wakes::new();
            assert!(q.try_push_raw(b"\x03frame", Priority::Normal, Some(&mut wakes)));
            assert_eq!(wakes_seen(), 1);
        }
        assert_eq!(wakes_seen(), 2, "woken when the batch dropped");
    }
}

/// Pushers racing on one queue through a writer and a reader.
#[cfg(test)]
mod stress {
    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::frame::{encode_header, FrameCodec};
    use crate::io::{write_queue, FrameReader, WriteEnd};
    use crate::protocol::{Header, MessageKind, Priority, TargetRef};

    const PUSHERS: u64 = 8;
    const FRAMES_EACH: u64 = 2500;
    const MAX_FRAME: usize = 1 << 20;
    /// A wait that often runs out while the queue is full.
    const SHORT: Duration = Duration::from_micros(300);

    /// `task`, failing the test instead of hanging if it is stuck.
    async fn unstuck<T>(task: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("stuck: nothing moved for 30 s")
    }

    /// The bits a frame's size and way in are drawn from.
    fn mix(token: u64) -> u64 {
        let mut x = token.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    /// How a frame is pushed.
    #[derive(Clone, Copy, Debug)]
    enum Way {
        TryData,
        PushData,
        /// Waits, for a while at most.
        PushDataFor,
        /// Waits until a timeout cancels the wait.
        PushDataCancelled,
        Raw,
        Message,
        TryControl,
        PushControl,
        PushControlFor,
    }

    /// A frame's body size (staged, an entry of its own, written from its
    /// own buffer, or larger than the queue's bytes) and way in.
    fn plan(token: u64) -> (usize, Way) {
        let bits = mix(token);
        let len = match bits % 16 {
            0..=3 => 0,
            4..=8 => 100,
            9..=11 => 1500,
            12..=13 => STAGE_UP_TO_BYTES + 500,
            14 => 20_000,
            _ => 40_000,
        };
        let way = match (bits >> 8) % 12 {
            0 => Way::TryData,
            1 | 2 => Way::PushData,
            3 => Way::PushDataFor,
            4 => Way::PushDataCancelled,
            5 => Way::Raw,
            6 | 7 => Way::Message,
            8 => Way::TryControl,
            9 => Way::PushControl,
            10 => Way::PushControlFor,
            _ => Way::PushData,
        };
        match way {
            // Control frames are small.
            Way::TryControl | Way::PushControl | Way::PushControlFor => (len.min(100), way),
            _ => (len, way),
        }
    }

    fn body(token: u64, len: usize) -> Bytes {
        Bytes::from(vec![token as u8; len])
    }

    /// The priority of a frame that gives one (raw frames and messages).
    fn priority(token: u64) -> Priority {
        Priority::ALL[(mix(token) >> 16) as usize % Priority::ALL.len()]
    }

    /// The class a frame goes in: the only order that holds.
    fn class_of(token: u64) -> usize {
        match plan(token).1 {
            Way::TryControl | Way::PushControl | Way::PushControlFor => CONTROL,
            Way::Raw | Way::Message => data_class(priority(token)),
            _ => NORMAL,
        }
    }

    /// The token a frame read back carries.
    fn token_of(header: &Header) -> u64 {
        match header {
            Header::Subscribed { token } => *token,
            Header::Pong { nonce } => *nonce,
            Header::Message(m) => m.seq,
            other => panic!("unexpected frame {other:?}"),
        }
    }

    /// Pushes `FRAMES_EACH` numbered frames; the tokens of those reported
    /// queued, in order.
    async fn push_all(q: OutQueue, pusher: u64) -> Vec<u64> {
        let target = crate::protocol::Target::Node(crate::protocol::NodeId::new("b"));
        let mut queued = Vec::new();
        for i in 0..FRAMES_EACH {
            let token = pusher << 32 | i;
            let (len, way) = plan(token);
            let data = || OutFrame::Parts {
                header: Header::Subscribed { token },
                body: body(token, len),
            };
            let control = || OutFrame::Parts {
                header: Header::Pong { nonce: token },
                body: body(token, len),
            };
            let ok = match way {
                Way::TryData => q.try_push(data(), Lane::Data).is_ok(),
                Way::PushData => {
                    q.push(data(), Lane::Data, Wait::Forever)
                        .await
                        .expect("the queue stays open");
                    true
                }
                Way::PushDataFor => q.push(data(), Lane::Data, Wait::For(SHORT)).await.is_ok(),
                Way::PushDataCancelled => {
                    tokio::time::timeout(SHORT, q.push(data(), Lane::Data, Wait::Forever))
                        .await
                        .is_ok_and(|pushed| pushed.is_ok())
                }
                Way::Raw => {
                    let mut raw = BytesMut::new();
                    let header = Header::Subscribed { token };
                    encode_header(&header, len, MAX_FRAME, &mut raw).expect("encodes");
                    raw.extend_from_slice(&body(token, len));
                    q.try_push_raw(&raw[4..], priority(token), None)
                }
                Way::Message => {
                    let header = MessageRef {
                        sender: "a",
                        incarnation: 1,
                        seq: token,
                        target: TargetRef::from(&target),
                        service: "svc",
                        kind: MessageKind::Notify,
                        priority: priority(token),
                        expires_ms: None,
                    };
                    q.try_push_message(&header, &body(token, len))
                }
                Way::TryControl => q.try_push(control(), Lane::Control).is_ok(),
                Way::PushControl => {
                    q.push(control(), Lane::Control, Wait::Forever)
                        .await
                        .expect("the queue stays open");
                    true
                }
                Way::PushControlFor => q
                    .push(control(), Lane::Control, Wait::For(SHORT))
                    .await
                    .is_ok(),
            };
            if ok {
                queued.push(token);
            }
        }
        queued
    }

    /// Pushers race through every way in (waiting and not, waits that run
    /// out or are cancelled, control frames between data, every priority,
    /// staged frames and entries of their own) while a writer drains the
    /// queue into a socket that a reader reads back. Each pusher's frames
    /// arrive whole, in the order they were queued in each class; every
    /// frame reported queued arrives once, none reported refused does; at
    /// the end the queue holds nothing and nobody waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_pushers_lose_nothing_and_keep_their_order() {
        let (q, mut rx) = out_queue(32, 16 * 1024);
        let (client, server) = tokio::io::duplex(8 * 1024);
        let writer = tokio::spawn(async move {
            let mut client = client;
            let end = write_queue(&mut client, &mut rx, MAX_FRAME, Vec::new()).await;
            (end, rx)
        });
        let reader = tokio::spawn(async move {
            let mut reader = FrameReader::new(server, FrameCodec::new(MAX_FRAME));
            let mut got = vec![Vec::new(); PUSHERS as usize];
            while let Some(frame) = reader.next().await.expect("a whole frame") {
                let token = token_of(frame.header());
                let (len, _) = plan(token);
                assert_eq!(frame.body(), body(token, len), "frame {token:#x}");
                got[(token >> 32) as usize].push(token);
            }
            got
        });
        let pushers: Vec<_> = (0..PUSHERS)
            .map(|pusher| tokio::spawn(push_all(q.clone(), pusher)))
            .collect();
        drop(q);
        let mut queued = Vec::new();
        for pusher in pushers {
            queued.push(unstuck(pusher).await.expect("pusher"));
        }
        let got = unstuck(reader).await.expect("reader");
        let (end, rx) = unstuck(writer).await.expect("writer");
        assert_eq!(end.expect("written"), WriteEnd::Finished);
        for (pusher, class, got, queued) in
            got.iter()
                .zip(&queued)
                .enumerate()
                .flat_map(|(pusher, (got, queued))| {
                    (0..CLASSES).map(move |class| {
                        let of = |tokens: &Vec<u64>| -> Vec<u64> {
                            tokens
                                .iter()
                                .copied()
                                .filter(|&t| class_of(t) == class)
                                .collect()
                        };
                        (pusher, class, of(got), of(queued))
                    })
                })
        {
            if got != queued {
                let pusher = format!("{pusher}, class {class}");
                let at = got.iter().zip(&queued).take_while(|(g, q)| g == q).count();
                panic!(
                    "pusher {pusher}: {} frames read back, {} queued; from #{at} on, read {:#x?} where {:#x?} was queued",
                    got.len(),
                    queued.len(),
                    got.get(at),
                    queued.get(at),
                );
            }
        }
        let total: usize = queued.iter().map(Vec::len).sum();
        let refused = (PUSHERS * FRAMES_EACH) as usize - total;
        assert!(
            refused > 0 && total > refused,
            "{total} queued, {refused} refused"
        );
        assert_eq!(rx.held(), Held::default(), "nothing held, nobody waits");
    }
}
