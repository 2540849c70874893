//! The two halves of a connection: a frame reader, and a bounded outgoing
//! queue drained by one writer task that puts many frames into each
//! syscall.
//!
//! The queue is one lock around a deque, bounded in queued frames, in data
//! frames and in payload bytes (both given back once the writer has written
//! them). A push takes the lock once and wakes the writer only if it sleeps;
//! a small frame is encoded right then into the queue's staging buffer (see
//! [`STAGE_UP_TO_BYTES`]), so the writer finds it ready to write; the
//! writer takes everything queued in one swap. Data frames and control
//! frames are treated differently when it is full:
//!
//! - [`OutQueue::try_push_data`] never waits: it fails with
//!   [`PushError::Full`] so that the caller can answer the sender with an
//!   error. A share of the frame slots is kept free for control frames.
//! - [`OutQueue::push_data`] waits for room in frames and bytes (a node's own
//!   sends: back-pressure instead of growth); waiting senders are served in
//!   the order they came, and nobody overtakes them.
//! - [`OutQueue::push_control`] waits for a frame slot only; control frames
//!   are small and must not be lost.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::frame::{
    encode_header, Frame, FrameCodec, FrameError, OutFrame, RawFrame, LENGTH_PREFIX_BYTES,
};
use crate::protocol::{Header, MessageRef};

/// Bytes requested from the socket per read when the buffer runs low, by
/// default (the message server's connections); a node reads more at once
/// (`node.read_chunk_bytes`, see [`FrameReader::with_read_chunk`]).
pub const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Bodies at least this large are written from their own buffer in the
/// vectored write instead of being copied into the batch buffer.
pub const VECTORED_MIN_BYTES: usize = 16 * 1024;
/// Buffers per `write_vectored` call.
const MAX_IOSLICES: usize = 64;

/// Reads frames from one half of a connection.
///
/// Small frames are decoded from one shared read buffer. A frame larger
/// than [`EXACT_BUFFER_FROM_BYTES`] is read into a buffer of exactly its
/// size, allocated once: its body is never copied or reallocated on the way
/// in, and never shares an allocation with other frames.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    codec: FrameCodec,
    /// A large frame being read: its buffer, and its declared length.
    large: Option<(BytesMut, usize)>,
    /// Bytes at the front of `buf` still lent out by the last
    /// [`FrameReader::try_next_frame`]; dropped at the next call.
    lent: usize,
    /// Bytes requested from the socket per read when the buffer runs low.
    read_chunk: usize,
}

/// Frames above this size get a buffer of their own, of exactly their size.
pub const EXACT_BUFFER_FROM_BYTES: usize = crate::frame::RESERVE_FRAMES_UP_TO;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with the given codec, reading [`READ_CHUNK_BYTES`] at a
    /// time.
    pub fn new(io: R, codec: FrameCodec) -> Self {
        FrameReader::with_read_chunk(io, codec, READ_CHUNK_BYTES)
    }

    /// A reader with the given codec that asks the socket for up to
    /// `read_chunk` bytes per read (at least 4 KiB): larger reads take
    /// more of a backlog per system call, at the cost of a buffer that
    /// size for as long as the connection lives.
    pub fn with_read_chunk(io: R, codec: FrameCodec, read_chunk: usize) -> Self {
        let read_chunk = read_chunk.max(4 * 1024);
        FrameReader {
            io,
            buf: BytesMut::with_capacity(read_chunk),
            codec,
            large: None,
            lent: 0,
            read_chunk,
        }
    }

    /// Drops what the last borrowed frame held.
    fn settle(&mut self) {
        if self.lent > 0 {
            bytes::Buf::advance(&mut self.buf, self.lent);
            self.lent = 0;
        }
    }

    /// The next frame if a whole one is already buffered (no socket read,
    /// nothing to await), a small one borrowed in place; `None`
    /// otherwise. A read loop takes what one read brought with this (while
    /// [`FrameReader::has_buffered_frame`] holds) and awaits
    /// [`FrameReader::next_frame`] otherwise.
    ///
    /// # Errors
    ///
    /// As [`FrameReader::next_raw`].
    pub fn try_next_frame(&mut self) -> Result<Option<RawFrame<'_>>, FrameError> {
        self.settle();
        if self.large.is_some() {
            return Ok(None);
        }
        if let Some(len) = self.buffered_len() {
            if (1..=crate::frame::COPY_FRAMES_UP_TO).contains(&len) && len <= self.codec.max_frame()
            {
                self.lent = LENGTH_PREFIX_BYTES + len;
                return Ok(Some(RawFrame::Borrowed(
                    &self.buf[LENGTH_PREFIX_BYTES..self.lent],
                )));
            }
        }
        // Larger ones, and every error, the codec's way.
        Ok(self.codec.decode_raw(&mut self.buf)?.map(RawFrame::Owned))
    }

    /// The next frame, reading the socket if none is buffered, or `None`
    /// at a clean end of stream.
    ///
    /// # Errors
    ///
    /// As [`FrameReader::next_raw`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: bytes read stay buffered for the next call.
    pub async fn next_frame(&mut self) -> Result<Option<RawFrame<'_>>, FrameError> {
        self.settle();
        loop {
            if self.has_buffered_frame() {
                return self.try_next_frame();
            }
            // A large frame (read into a buffer of its own), a bad prefix,
            // or a frame beyond this reader's limit: the owned way, which
            // checks and reports.
            let small = match self.prefix() {
                None => true,
                Some(len) => {
                    (1..=crate::frame::COPY_FRAMES_UP_TO).contains(&len)
                        && len <= self.codec.max_frame()
                }
            };
            if self.large.is_some() || !small {
                return Ok(self.next_raw().await?.map(RawFrame::Owned));
            }
            // More of a small frame, to be lent once it is whole.
            if self.buf.capacity() - self.buf.len() < self.read_chunk / 4 {
                self.buf.reserve(self.read_chunk);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Ok(self
                    .codec
                    .decode_raw_eof(&mut self.buf)?
                    .map(RawFrame::Owned));
            }
        }
    }

    /// The length the prefix at the front of the buffer declares, if the
    /// prefix is there.
    fn prefix(&self) -> Option<usize> {
        let buf = &self.buf[self.lent..];
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        prefix.copy_from_slice(buf.get(..LENGTH_PREFIX_BYTES)?);
        Some(u32::from_be_bytes(prefix) as usize)
    }

    /// The length of the whole frame at the front of the buffer, if there
    /// is one.
    fn buffered_len(&self) -> Option<usize> {
        let len = self.prefix()?;
        let have = self.buf.len() - self.lent - LENGTH_PREFIX_BYTES;
        (have >= len).then_some(len)
    }

    /// The codec, to change its limit after the handshake.
    pub fn codec_mut(&mut self) -> &mut FrameCodec {
        &mut self.codec
    }

    /// The next frame, or `None` at a clean end of stream.
    ///
    /// # Errors
    ///
    /// [`FrameError`] for an oversized, undecodable or truncated frame, or an
    /// i/o error. The connection should be closed after any error.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: bytes read stay buffered for the next call.
    pub async fn next(&mut self) -> Result<Option<Frame>, FrameError> {
        match self.next_raw().await? {
            Some(raw) => Frame::decode(raw).map(Some),
            None => Ok(None),
        }
    }

    /// The next frame's contents (everything after the length prefix),
    /// undecoded, or `None` at a clean end of stream; read its header with
    /// [`crate::frame::peek`].
    ///
    /// # Errors
    ///
    /// As [`FrameReader::next`], but a bad header is left to the caller.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: bytes read stay buffered for the next call.
    pub async fn next_raw(&mut self) -> Result<Option<Bytes>, FrameError> {
        self.settle();
        loop {
            if let Some((big, len)) = &mut self.large {
                let missing = *len - big.len();
                if missing == 0 {
                    let (big, _) = self.large.take().unwrap_or_default();
                    return Ok(Some(big.freeze()));
                }
                if self.io.read_buf(&mut (&mut *big).limit(missing)).await? == 0 {
                    return Err(FrameError::Truncated {
                        buffered: LENGTH_PREFIX_BYTES + big.len(),
                    });
                }
                continue;
            }
            if let Some(raw) = self.codec.decode_raw(&mut self.buf)? {
                return Ok(Some(raw));
            }
            // The codec checked the declared length against the limit.
            if self.buf.len() >= LENGTH_PREFIX_BYTES {
                let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
                prefix.copy_from_slice(&self.buf[..LENGTH_PREFIX_BYTES]);
                let len = u32::from_be_bytes(prefix) as usize;
                if len > EXACT_BUFFER_FROM_BYTES {
                    bytes::Buf::advance(&mut self.buf, LENGTH_PREFIX_BYTES);
                    let mut big = BytesMut::with_capacity(len);
                    let have = self.buf.len().min(len);
                    big.extend_from_slice(&self.buf[..have]);
                    bytes::Buf::advance(&mut self.buf, have);
                    self.large = Some((big, len));
                    continue;
                }
            }
            if self.buf.capacity() - self.buf.len() < self.read_chunk / 4 {
                self.buf.reserve(self.read_chunk);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return self.codec.decode_raw_eof(&mut self.buf);
            }
        }
    }

    /// Whether a whole frame is already buffered, so that the next
    /// [`FrameReader::try_next_frame`] returns it without reading the socket. A
    /// reader that batches work (acknowledgements, say) flushes it when
    /// this turns false.
    pub fn has_buffered_frame(&self) -> bool {
        self.large.is_none() && self.buffered_len().is_some()
    }

    /// Gives back the underlying reader.
    pub fn into_inner(self) -> R {
        self.io
    }
}

/// One entry of an outgoing queue.
#[derive(Debug)]
struct OutItem {
    what: Queued,
    /// Payload bytes it holds until written.
    permits: usize,
    /// Data slots it holds until written.
    data: usize,
}

impl OutItem {
    fn frame(frame: OutFrame, permits: u32, data_slot: bool) -> Self {
        OutItem {
            what: Queued::Frame(frame),
            permits: permits as usize,
            data: usize::from(data_slot),
        }
    }
}

/// What an [`OutItem`] holds.
#[derive(Debug)]
enum Queued {
    /// A frame to encode and write.
    Frame(OutFrame),
    /// Small frames encoded as they were queued, ready to write as they
    /// are.
    Framed(Bytes),
}

/// Frames with a payload up to this size are encoded into the queue's
/// staging buffer as they are queued (under its lock, on the sender's
/// thread), so that the writer finds them ready to write: no entry per
/// frame, and the frame's header (its shared names) is built and dropped
/// on one thread. The same bound as [`crate::frame::COPY_FRAMES_UP_TO`]: a
/// frame read in place ([`crate::frame::FrameCodec::in_place`]) and queued
/// is copied, so it never pins the read buffer it came in.
pub const STAGE_UP_TO_BYTES: usize = crate::frame::COPY_FRAMES_UP_TO;

/// Why a frame could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The queue is full: the receiving end does not keep up. The frame is
    /// handed back (boxed: errors stay small on the hot path).
    #[error("outgoing queue full")]
    Full(Box<OutFrame>),
    /// The connection is closed; the frame is handed back.
    #[error("connection closed")]
    Closed(Box<OutFrame>),
    /// No room was made within the allowed wait; the consumer is marked
    /// congested. The frame was dropped.
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

/// What every [`OutQueue`] handle shares; dropped with the last of them,
/// which tells the writer that nothing more will come.
#[derive(Debug)]
struct Senders {
    core: Arc<Core>,
}

impl Drop for Senders {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.core.lock();
            state.senders_gone = true;
            state.writer.take()
        };
        if let Some(waker) = waker {
            waker.wake();
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
    /// The frame limit of the connection being written (staged frames are
    /// checked against it when they are queued).
    max_frame: AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<OutItem>,
    /// Frames queued (in `items` or `staged`).
    frames: usize,
    /// Small frames encoded since the last item, in order after it.
    staged: BytesMut,
    /// What the staged frames hold: payload bytes and data slots.
    staged_permits: usize,
    staged_data: usize,
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
    next_ticket: u64,
    /// Senders waiting for a frame slot for a control frame.
    control_waiting: usize,
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

    fn permits_for(&self, frame: &OutFrame) -> u32 {
        self.permits_for_len(frame.payload_len())
    }

    /// The byte permits a payload of `len` bytes holds.
    fn permits_for_len(&self, len: usize) -> u32 {
        u32::try_from(len).unwrap_or(u32::MAX).min(self.max_bytes)
    }

    /// Stages a small data frame (`head`, then `payload`) if there is room
    /// right now and nobody waits before it, and wakes the writer if it
    /// sleeps; whether it did (if not, nothing was queued).
    fn stage_now(&self, head: &Head, payload: &[u8]) -> bool {
        match self.stage_now_quiet(head, payload) {
            Ok(waker) => {
                if let Some(waker) = waker {
                    waker.wake();
                }
                true
            }
            Err(()) => false,
        }
    }

    /// [`Core::stage_now`], handing the sleeping writer's waker (if any)
    /// to the caller instead of waking it; `Err` if nothing was staged.
    fn stage_now_quiet(&self, head: &Head, payload: &[u8]) -> Result<Option<Waker>, ()> {
        let permits = self.permits_for_len(payload.len());
        let mut state = self.lock();
        if !state.waiting.is_empty() || !self.data_fits(&state, permits) {
            return Err(());
        }
        self.stage(&mut state, head, payload, permits as usize, 1);
        Ok(self.count(&mut state, permits as usize, 1))
    }

    /// Whether a data frame of `permits` bytes fits now.
    fn data_fits(&self, state: &State, permits: u32) -> bool {
        state.frames < self.max_frames
            && state.data < self.max_data
            && state.bytes + permits as usize <= self.max_bytes as usize
    }

    /// Queues a data frame known to fit; returns the waker to wake once
    /// the lock is released.
    fn put(&self, state: &mut State, item: OutItem, staging: &Staging) -> Put {
        let OutItem {
            what,
            permits,
            data,
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
        state.frames += 1;
        self.queued.store(state.frames, Ordering::Relaxed);
        state.writer.take()
    }

    /// Appends a frame (`head`, then `payload`) to the staging buffer,
    /// starting a new chunk if it does not fit; the frame's counts are the
    /// caller's to add.
    fn stage(&self, state: &mut State, head: &Head, payload: &[u8], permits: usize, data: usize) {
        let need = head.len + payload.len();
        if state.staged.capacity() - state.staged.len() < need {
            self.seal(state);
            // Empty now: a new chunk, or the old one taken back if what was
            // cut from it is written already.
            state.staged.reserve(STAGING_CHUNK_BYTES.max(need));
        }
        state.staged.extend_from_slice(head.bytes());
        state.staged.extend_from_slice(payload);
        state.staged_permits += permits;
        state.staged_data += data;
    }

    /// Closes the staged frames into one item, so that what is queued next
    /// goes after them.
    fn seal(&self, state: &mut State) {
        if state.staged.is_empty() {
            return;
        }
        let bytes = state.staged.split().freeze();
        let item = OutItem {
            what: Queued::Framed(bytes),
            permits: std::mem::take(&mut state.staged_permits),
            data: std::mem::take(&mut state.staged_data),
        };
        state.items.push_back(item);
    }

    /// Moves everything queued into `batch`; how many frames that was.
    fn take_all(&self, state: &mut State, batch: &mut VecDeque<OutItem>) -> usize {
        let frames = state.frames;
        if frames == 0 {
            return 0;
        }
        self.seal(state);
        if batch.is_empty() {
            // A swap: the entries are not moved one by one.
            std::mem::swap(&mut state.items, batch);
        } else {
            batch.extend(state.items.drain(..));
        }
        state.frames = 0;
        self.queued.store(0, Ordering::Relaxed);
        self.made_room(state);
        frames
    }

    /// Wakes waiting senders if there are any: room was made.
    fn made_room(&self, state: &State) {
        if !state.waiting.is_empty() || state.control_waiting > 0 {
            self.room.notify_waiters();
        }
    }
}

/// A data sender's place in line while it waits for room; gives the place
/// up if the wait is abandoned.
struct Ticket<'a> {
    core: &'a Core,
    number: Option<u64>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(number) = self.number {
            let mut state = self.core.lock();
            let first = state.waiting.front() == Some(&number);
            state.waiting.retain(|t| *t != number);
            if first {
                // The next in line may fit now.
                self.core.made_room(&state);
            }
        }
    }
}

/// A control sender counted as waiting while it waits.
struct ControlWait<'a> {
    core: &'a Core,
    counted: bool,
}

impl Drop for ControlWait<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.core.lock().control_waiting -= 1;
        }
    }
}

/// The writer's side of an outgoing queue.
#[derive(Debug)]
pub struct OutReceiver {
    core: Arc<Core>,
    /// Whether a small batch waits one scheduling turn for more.
    coalesce: bool,
}

impl OutReceiver {
    /// Lets the writer wait one scheduling turn before writing a batch of
    /// fewer than [`COALESCE_BELOW`] frames, so that frames queued by a
    /// task that is still running (a burst of sends) share one write.
    ///
    /// Adaptive: after [`COALESCE_CREDIT`] waits in a row that gathered
    /// nothing (one request at a time, say), it writes at once, trying a
    /// wait again every [`COALESCE_PROBE_EVERY`] small batches.
    pub fn coalesce_small_batches(&mut self) {
        self.coalesce = true;
    }

    /// Moves every queued frame into `batch`: `Ready(Some(frames))` if it
    /// took any, `Ready(None)` once every sender is gone and nothing is
    /// left, `Pending` (the writer to be woken) if there is nothing yet.
    fn poll_take(
        &self,
        cx: &mut Context<'_>,
        batch: &mut VecDeque<OutItem>,
    ) -> Poll<Option<usize>> {
        let mut state = self.core.lock();
        let frames = self.core.take_all(&mut state, batch);
        if frames > 0 {
            return Poll::Ready(Some(frames));
        }
        if state.senders_gone {
            return Poll::Ready(None);
        }
        if !matches!(&state.writer, Some(w) if w.will_wake(cx.waker())) {
            state.writer = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Moves what was queued meanwhile into `batch`, without waiting.
    fn take_more(&self, batch: &mut VecDeque<OutItem>) {
        let mut state = self.core.lock();
        self.core.take_all(&mut state, batch);
    }

    /// Gives back what written frames held.
    fn release(&self, data: usize, bytes: usize) {
        if data == 0 && bytes == 0 {
            return;
        }
        let mut state = self.core.lock();
        state.data -= data;
        state.bytes -= bytes;
        self.core.made_room(&state);
    }
}

impl Drop for OutReceiver {
    /// Nothing will be written any more: senders see the queue closed, and
    /// what was queued is dropped now, not when the last sender goes.
    fn drop(&mut self) {
        self.core.close();
        let (items, staged) = {
            let mut state = self.core.lock();
            state.frames = 0;
            state.staged_permits = 0;
            state.staged_data = 0;
            (
                std::mem::take(&mut state.items),
                std::mem::take(&mut state.staged),
            )
        };
        self.core.queued.store(0, Ordering::Relaxed);
        drop((items, staged));
    }
}

/// See [`OutReceiver::coalesce_small_batches`].
pub const COALESCE_BELOW: usize = 4;

/// How many waits in a row may gather no frame before a coalescing writer
/// stops waiting; one that gathers some restores them.
pub const COALESCE_CREDIT: u8 = 4;

/// A writer that stopped waiting still tries once per this many small
/// batches, to notice when waiting pays off again.
pub const COALESCE_PROBE_EVERY: u32 = 1024;

/// Writers' wakers held back while a reader queues a run of frames (see
/// [`OutQueue::try_push_raw_later`]): each writer found asleep is woken
/// once, when [`Wakes::wake_all`] is called or the batch drops, instead of
/// once per frame. The batch grows by at most one waker per queue between
/// two wakes (a writer's waker is handed out once per sleep).
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

/// A queue of at most `frames` frames and about `bytes` payload bytes.
///
/// A single frame larger than `bytes` is still accepted when the queue is
/// otherwise empty, so the byte bound never makes a frame impossible to
/// send.
pub fn out_queue(frames: usize, bytes: usize) -> (OutQueue, OutReceiver) {
    let frames = frames.max(4);
    let max_bytes = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
    let core = Arc::new(Core {
        state: Mutex::new(State::default()),
        max_frames: frames,
        max_data: frames - frames / 8,
        max_bytes,
        room: Notify::new(),
        closed: CancellationToken::new(),
        is_closed: AtomicBool::new(false),
        congested: AtomicBool::new(false),
        queued: AtomicUsize::new(0),
        max_frame: AtomicUsize::new(u32::MAX as usize),
    });
    (
        OutQueue {
            shared: Arc::new(Senders { core: core.clone() }),
        },
        OutReceiver {
            core,
            coalesce: false,
        },
    )
}

/// What a waiting data sender found when it looked.
enum Look {
    /// Queued; what is left to do once the lock is released.
    Queued(Put),
    Closed(OutFrame),
    Wait(OutFrame),
}

/// Why a data frame was not queued at once.
enum TryData {
    Full(OutFrame),
    Closed(OutFrame),
}

impl OutQueue {
    fn core(&self) -> &Core {
        &self.shared.core
    }

    /// Queues a data frame now if it fits and nobody waits before it.
    // The frame goes back by value: boxing it would allocate on every
    // fall-through to the waiting path.
    #[allow(clippy::result_large_err)]
    fn try_data(&self, frame: OutFrame) -> Result<(), TryData> {
        let core = self.core();
        if core.is_closed() {
            return Err(TryData::Closed(frame));
        }
        let permits = core.permits_for(&frame);
        // The header is encoded before the lock is taken.
        let staging = staging(&frame, core.max_frame.load(Ordering::Relaxed));
        let put = {
            let mut state = core.lock();
            if !state.waiting.is_empty() || !core.data_fits(&state, permits) {
                return Err(TryData::Full(frame));
            }
            core.put(&mut state, OutItem::frame(frame, permits, true), &staging)
        };
        put.finish();
        Ok(())
    }

    /// Queues a data frame without waiting.
    ///
    /// # Errors
    ///
    /// [`PushError::Full`] when the frame slots left are reserved for control
    /// frames or the bytes are used up; [`PushError::Closed`] when the
    /// writer is gone. The frame is handed back.
    pub fn try_push_data(&self, frame: OutFrame) -> Result<(), PushError> {
        match self.try_data(frame) {
            Ok(()) => Ok(()),
            Err(TryData::Full(frame)) => Err(PushError::Full(Box::new(frame))),
            Err(TryData::Closed(frame)) => Err(PushError::Closed(Box::new(frame))),
        }
    }

    /// Queues a data frame, waiting for room in frames and bytes. Waiting
    /// senders are served in the order they came.
    ///
    /// # Errors
    ///
    /// [`PushError::Closed`] when the writer is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled call queued nothing.
    pub async fn push_data(&self, frame: OutFrame) -> Result<(), PushError> {
        // The usual case, room at once, without building any future.
        let frame = match self.try_data(frame) {
            Ok(()) => return Ok(()),
            Err(TryData::Full(frame)) => frame,
            Err(TryData::Closed(frame)) => return Err(PushError::Closed(Box::new(frame))),
        };
        let core = self.core();
        let permits = core.permits_for(&frame);
        let staging = staging(&frame, core.max_frame.load(Ordering::Relaxed));
        let mut ticket = Ticket { core, number: None };
        let mut frame = frame;
        loop {
            let notified = core.room.notified();
            tokio::pin!(notified);
            // Registered before looking, so no room made after the look is
            // missed.
            notified.as_mut().enable();
            let look = {
                let mut state = core.lock();
                let number = *ticket.number.get_or_insert_with(|| {
                    let number = state.next_ticket;
                    state.next_ticket += 1;
                    state.waiting.push_back(number);
                    number
                });
                if core.is_closed() {
                    Look::Closed(frame)
                } else if state.waiting.front() == Some(&number) && core.data_fits(&state, permits)
                {
                    state.waiting.pop_front();
                    ticket.number = None;
                    // The next in line may fit too.
                    core.made_room(&state);
                    let item = OutItem::frame(frame, permits, true);
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
            tokio::select! {
                _ = &mut notified => {}
                _ = core.closed.cancelled() => {}
            }
        }
    }

    /// Queues a data frame if there is room right now; hands it back
    /// otherwise, also when the queue is closed. The non-waiting first
    /// step of [`OutQueue::push_data`].
    ///
    /// # Errors
    ///
    /// The frame, handed back, when it could not be queued right now.
    // The frame goes back by value: boxing it would allocate on every
    // fall-through to the waiting path.
    #[allow(clippy::result_large_err)]
    pub fn try_push_room(&self, frame: OutFrame) -> Result<(), OutFrame> {
        match self.try_data(frame) {
            Ok(()) => Ok(()),
            Err(TryData::Full(frame)) | Err(TryData::Closed(frame)) => Err(frame),
        }
    }

    /// Queues a message given by reference, without building its frame: its
    /// header is encoded (the names read in place) and the frame staged if
    /// its body is small ([`STAGE_UP_TO_BYTES`]), it fits within the
    /// connection's limit, there is room right now and nobody waits before
    /// it. Whether it was queued; if not, nothing was, and the caller
    /// queues the frame the usual way (which reports what went wrong).
    pub fn try_push_message(&self, header: &MessageRef<'_>, body: &[u8]) -> bool {
        let core = self.core();
        if body.len() > STAGE_UP_TO_BYTES || core.is_closed() {
            return false;
        }
        let mut head = Head::new();
        let Some(encoded) = head.append_message(header) else {
            return false;
        };
        let total = encoded + body.len();
        if total > core.max_frame.load(Ordering::Relaxed) {
            return false;
        }
        head.set_length(total);
        core.stage_now(&head, body)
    }

    /// Queues a received frame's contents (everything after the length
    /// prefix) given by reference, as [`OutFrame::Raw`] would be, if it is
    /// small ([`STAGE_UP_TO_BYTES`]), fits within the connection's limit,
    /// there is room right now and nobody waits before it: copied straight
    /// into the staging buffer, no buffer shared or cloned. Whether it was
    /// queued; if not, nothing was, and the caller queues the frame the
    /// usual way (which reports what went wrong).
    pub fn try_push_raw(&self, raw: &[u8]) -> bool {
        let mut wakes = Wakes::new();
        self.try_push_raw_later(raw, &mut wakes)
    }

    /// [`OutQueue::try_push_raw`] for a reader that queues many frames in
    /// a row: a writer found asleep is woken when `wakes` is (or when it
    /// drops), not at once, so that it wakes once for the whole run of
    /// frames. The caller wakes `wakes` before it waits for anything.
    pub fn try_push_raw_later(&self, raw: &[u8], wakes: &mut Wakes) -> bool {
        let core = self.core();
        if raw.is_empty()
            || raw.len() > STAGE_UP_TO_BYTES
            || raw.len() > core.max_frame.load(Ordering::Relaxed)
            || core.is_closed()
        {
            return false;
        }
        let mut head = Head::new();
        head.set_length(raw.len());
        match core.stage_now_quiet(&head, raw) {
            Ok(waker) => {
                if let Some(waker) = waker {
                    wakes.wakers.push(waker);
                }
                true
            }
            Err(()) => false,
        }
    }

    /// Queues a data frame, waiting at most `wait` for room; the way to
    /// slow a sender down for a slow consumer without stalling for ever.
    ///
    /// When a wait times out the queue is marked congested: until it has
    /// drained below a quarter of its frames and bytes, further calls fail
    /// at once instead of each waiting again.
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
    pub async fn push_data_within(&self, frame: OutFrame, wait: Duration) -> Result<(), PushError> {
        let core = self.core();
        if core.congested.load(Ordering::Relaxed) {
            if self.is_drained() {
                core.congested.store(false, Ordering::Relaxed);
            } else {
                return self.try_push_data(frame);
            }
        }
        let frame = match self.try_push_data(frame) {
            Err(PushError::Full(f)) => *f,
            other => return other,
        };
        match tokio::time::timeout(wait, self.push_data(frame)).await {
            Ok(result) => result,
            Err(_) => {
                core.congested.store(true, Ordering::Relaxed);
                Err(PushError::Congested)
            }
        }
    }

    /// Whether the queue holds under a quarter of its frames and bytes.
    fn is_drained(&self) -> bool {
        let core = self.core();
        let state = core.lock();
        state.data < core.max_data / 4 && state.bytes < core.max_bytes as usize / 4
    }

    /// Whether the consumer was found not keeping up (see
    /// [`OutQueue::push_data_within`]).
    pub fn is_congested(&self) -> bool {
        self.core().congested.load(Ordering::Relaxed)
    }

    /// Queues a control frame if a frame slot is free; the frame back if
    /// not, with whether the queue is closed.
    #[allow(clippy::result_large_err)]
    fn try_control(&self, frame: OutFrame) -> Result<(), (OutFrame, bool)> {
        let core = self.core();
        if core.is_closed() {
            return Err((frame, true));
        }
        let staging = staging(&frame, core.max_frame.load(Ordering::Relaxed));
        let put = {
            let mut state = core.lock();
            if state.frames >= core.max_frames {
                return Err((frame, false));
            }
            core.put(&mut state, OutItem::frame(frame, 0, false), &staging)
        };
        put.finish();
        Ok(())
    }

    /// Queues a control frame, waiting for a frame slot.
    ///
    /// # Errors
    ///
    /// [`PushError::Closed`] when the writer is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled call queued nothing.
    pub async fn push_control(&self, frame: OutFrame) -> Result<(), PushError> {
        let mut frame = match self.try_control(frame) {
            Ok(()) => return Ok(()),
            Err((frame, true)) => return Err(PushError::Closed(Box::new(frame))),
            Err((frame, false)) => frame,
        };
        let core = self.core();
        let mut counted = ControlWait {
            core,
            counted: false,
        };
        loop {
            let notified = core.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !counted.counted {
                core.lock().control_waiting += 1;
                counted.counted = true;
            }
            frame = match self.try_control(frame) {
                Ok(()) => return Ok(()),
                Err((frame, true)) => return Err(PushError::Closed(Box::new(frame))),
                Err((frame, false)) => frame,
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = core.closed.cancelled() => {}
            }
        }
    }

    /// Queues a control frame if a slot is free.
    ///
    /// # Errors
    ///
    /// [`PushError::Full`] or [`PushError::Closed`], handing the frame back.
    pub fn try_push_control(&self, frame: OutFrame) -> Result<(), PushError> {
        match self.try_control(frame) {
            Ok(()) => Ok(()),
            Err((frame, true)) => Err(PushError::Closed(Box::new(frame))),
            Err((frame, false)) => Err(PushError::Full(Box::new(frame))),
        }
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

    /// Frames waiting to be written: a measure of the receiver's load.
    pub fn queued_frames(&self) -> usize {
        self.core().queued.load(Ordering::Relaxed)
    }

    /// Whether the connection's writer has stopped.
    pub fn is_closed(&self) -> bool {
        self.core().is_closed()
    }

    /// Stops the writer without draining: frames still queued are dropped.
    /// Used to cut off a slow consumer or a misbehaving peer.
    pub fn close(&self) {
        self.core().close();
    }

    /// Resolves once the writer has stopped or [`OutQueue::close`] was called.
    pub async fn closed(&self) {
        self.core().closed.cancelled().await;
    }
}

/// The staging buffer grows in chunks of this size: a frame that does not
/// fit the room left starts a new chunk (the full one is queued as it is),
/// so staged bytes are never copied again and an idle connection keeps at
/// most one chunk.
const STAGING_CHUNK_BYTES: usize = 64 * 1024;

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

/// The most bytes a staged frame's length prefix and header take; a frame
/// with a larger header is queued as it is and encoded by the writer.
const STAGED_HEAD_BYTES: usize = 256;

/// A staged frame's length prefix and encoded header.
struct Head {
    buf: [u8; STAGED_HEAD_BYTES],
    len: usize,
}

impl Head {
    /// Room for the length prefix, nothing else yet.
    fn new() -> Self {
        Head {
            buf: [0u8; STAGED_HEAD_BYTES],
            len: LENGTH_PREFIX_BYTES,
        }
    }

    /// Encodes `value` after what is there; how many bytes it took.
    fn append(&mut self, value: &impl serde::Serialize) -> Result<usize, postcard::Error> {
        let encoded = postcard::to_slice(value, &mut self.buf[self.len..])?.len();
        self.len += encoded;
        Ok(encoded)
    }

    /// Encodes `Header::Message(header)` after what is there; how many
    /// bytes it took, or `None` if it does not fit.
    fn append_message(&mut self, header: &MessageRef<'_>) -> Option<usize> {
        let encoded = crate::wire::encode_message(header, &mut self.buf[self.len..])?;
        self.len += encoded;
        Some(encoded)
    }

    /// Writes the length prefix: `total` bytes follow it.
    fn set_length(&mut self, total: usize) {
        self.buf[..LENGTH_PREFIX_BYTES].copy_from_slice(&(total as u32).to_be_bytes());
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// How a frame is queued, decided (and its header encoded) before the
/// queue's lock is taken.
// Lives on the stack for one push: boxing the head would allocate per frame.
#[allow(clippy::large_enum_variant)]
enum Staging {
    /// Into the staging buffer: this head, then the payload.
    Head(Head),
    /// As an entry of its own, encoded by the writer.
    Item,
    /// Not at all: it cannot be encoded within the limits (logged).
    Invalid,
}

/// How `frame` is to be queued on a connection whose frames may take
/// `max_frame` bytes: small ones are staged, but never a goodbye (the
/// writer must see it to stop after it).
fn staging(frame: &OutFrame, max_frame: usize) -> Staging {
    let mut head = Head::new();
    let total = match frame {
        OutFrame::Parts {
            header: Header::Goodbye,
            ..
        } => return Staging::Item,
        OutFrame::Parts { body, .. } if body.len() > STAGE_UP_TO_BYTES => return Staging::Item,
        OutFrame::Raw(raw) if raw.len() > STAGE_UP_TO_BYTES => return Staging::Item,
        OutFrame::Parts {
            header: Header::Message(message),
            body,
        } => match head.append_message(&MessageRef::from(message)) {
            Some(encoded) => encoded + body.len(),
            // Long names: the writer encodes it.
            None => return Staging::Item,
        },
        OutFrame::Parts { header, body } => match head.append(header) {
            Ok(encoded) => encoded + body.len(),
            // A large header: the writer encodes it.
            Err(postcard::Error::SerializeBufferFull) => return Staging::Item,
            Err(e) => {
                tracing::error!(error = %e, kind = header.kind(), "dropping frame that cannot be encoded");
                return Staging::Invalid;
            }
        },
        OutFrame::Raw(raw) => raw.len(),
    };
    if total == 0 || total > max_frame {
        tracing::error!(len = total, max_frame, "dropping frame outside the limit");
        return Staging::Invalid;
    }
    head.set_length(total);
    Staging::Head(head)
}

/// How [`write_queue`] ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEnd {
    /// Every [`OutQueue`] was dropped, or a [`Header::Goodbye`] was written;
    /// the write side was flushed and shut down.
    Finished,
    /// [`OutQueue::close`] was called.
    Closed,
}

/// Gives back what a batch held when it is done, also if the writing
/// future is dropped half-way.
struct Release<'a> {
    rx: &'a OutReceiver,
    permits: usize,
    data_slots: usize,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.rx.release(self.data_slots, self.permits);
    }
}

/// Drains `rx` into `io` until every [`OutQueue`] is dropped or a
/// [`Header::Goodbye`] was written (then flushes and shuts the write side
/// down), or [`OutQueue::close`] is called (then stops at once).
///
/// Each batch (everything queued when the writer looks) goes out in as few
/// vectored writes as the kernel takes: headers and small bodies are copied
/// into one buffer, bodies of [`VECTORED_MIN_BYTES`] and more are written
/// from their own `Bytes`.
///
/// The queue outlives an i/o error: the caller may reconnect and call this
/// again with the same `rx` (the batch being written when the connection
/// broke is lost; acknowledged messages are resent by their senders).
///
/// # Errors
///
/// The i/o error that ended the connection. A frame that cannot be encoded
/// (over `max_frame`) is logged and skipped, not fatal.
///
/// # Cancel safety
///
/// Dropping the future loses the batch being written, nothing else.
pub async fn write_queue<W: AsyncWrite + Unpin>(
    io: &mut W,
    rx: &mut OutReceiver,
    max_frame: usize,
) -> Result<WriteEnd, FrameError> {
    let mut batch = VecDeque::new();
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let closed = rx.core.closed.clone();
    // Frames staged from now on are checked against this connection's
    // limit as they are queued.
    rx.core.max_frame.store(max_frame, Ordering::Relaxed);
    // Coalescing (see `OutReceiver::coalesce_small_batches`): waits left
    // that may gather nothing, and small batches seen.
    let mut credit = COALESCE_CREDIT;
    let mut small_batches = 0u32;
    loop {
        let took = tokio::select! {
            biased;
            _ = closed.cancelled() => return Ok(WriteEnd::Closed),
            took = std::future::poll_fn(|cx| rx.poll_take(cx, &mut batch)) => took,
        };
        let Some(frames) = took else {
            io.shutdown().await?;
            return Ok(WriteEnd::Finished);
        };
        if rx.coalesce && frames < COALESCE_BELOW {
            small_batches = small_batches.wrapping_add(1);
            // Only while waiting pays off: a lone request/reply pair gains
            // nothing from it but latency.
            if credit > 0 || small_batches % COALESCE_PROBE_EVERY == 0 {
                let before = batch.len();
                tokio::task::yield_now().await;
                rx.take_more(&mut batch);
                credit = if batch.len() > before {
                    COALESCE_CREDIT
                } else {
                    credit.saturating_sub(1)
                };
            }
        }
        let mut release = Release {
            rx,
            permits: 0,
            data_slots: 0,
        };
        let mut goodbye = false;
        for item in batch.drain(..) {
            release.permits += item.permits;
            release.data_slots += item.data;
            if goodbye {
                // Nothing follows a goodbye.
                continue;
            }
            let frame = match item.what {
                Queued::Framed(bytes) => {
                    // Encoded when queued: written as it is.
                    if !buf.is_empty() {
                        chunks.push_back(buf.split().freeze());
                    }
                    chunks.push_back(bytes);
                    continue;
                }
                Queued::Frame(frame) => frame,
            };
            if let OutFrame::Parts {
                header: Header::Goodbye,
                ..
            } = &frame
            {
                goodbye = true;
            }
            let body = match frame {
                OutFrame::Parts { header, body } => {
                    if let Err(e) = encode_header(&header, body.len(), max_frame, &mut buf) {
                        tracing::error!(error = %e, kind = header.kind(), "dropping frame that cannot be encoded");
                        continue;
                    }
                    body
                }
                OutFrame::Raw(raw) => {
                    if raw.len() > max_frame || raw.is_empty() {
                        tracing::error!(
                            len = raw.len(),
                            max_frame,
                            "dropping raw frame outside the limit"
                        );
                        continue;
                    }
                    buf.reserve(LENGTH_PREFIX_BYTES);
                    buf.put_u32(raw.len() as u32);
                    raw
                }
            };
            if body.len() >= VECTORED_MIN_BYTES {
                chunks.push_back(buf.split().freeze());
                chunks.push_back(body);
            } else {
                buf.extend_from_slice(&body);
            }
        }
        if !buf.is_empty() {
            chunks.push_back(buf.split().freeze());
        }
        let written = tokio::select! {
            biased;
            _ = closed.cancelled() => return Ok(WriteEnd::Closed),
            w = write_chunks(io, &mut chunks) => w,
        };
        drop(release);
        chunks.clear();
        written?;
        if goodbye {
            io.shutdown().await?;
            return Ok(WriteEnd::Finished);
        }
    }
}

/// [`write_queue`] for a connection that owns its queue: when it ends, the
/// queue is closed (senders see [`PushError::Closed`]).
///
/// # Errors
///
/// As [`write_queue`].
pub async fn run_writer<W: AsyncWrite + Unpin>(
    mut io: W,
    mut rx: OutReceiver,
    max_frame: usize,
) -> Result<(), FrameError> {
    let result = write_queue(&mut io, &mut rx, max_frame).await;
    // Dropping the receiver closes the queue for its senders.
    drop(rx);
    result.map(|_| ())
}

/// Writes every chunk, many per syscall.
async fn write_chunks<W: AsyncWrite + Unpin>(
    io: &mut W,
    chunks: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !chunks.is_empty() {
        let n = {
            let mut slices = [IoSlice::new(&[]); MAX_IOSLICES];
            let mut count = 0;
            for (slot, chunk) in slices.iter_mut().zip(chunks.iter()) {
                *slot = IoSlice::new(chunk);
                count += 1;
            }
            io.write_vectored(&slices[..count]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 {
            let Some(front) = chunks.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                chunks.pop_front();
            } else {
                bytes::Buf::advance(front, left);
                left = 0;
            }
        }
    }
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writer_batches_and_reader_reads_back() {
        let (client, server) = tokio::io::duplex(1024);
        let (q, rx) = out_queue(64, 1 << 20);
        let writer = tokio::spawn(run_writer(client, rx, 1 << 20));
        let big = Bytes::from(vec![7u8; 100_000]);
        for i in 0..10u64 {
            let body = if i == 5 {
                big.clone()
            } else {
                Bytes::from(vec![i as u8; 10])
            };
            q.push_data(OutFrame::Parts {
                header: Header::Subscribed { token: i },
                body,
            })
            .await
            .expect("queued");
        }
        drop(q);
        let mut reader = FrameReader::new(server, FrameCodec::new(1 << 20));
        for i in 0..10u64 {
            let frame = reader.next().await.expect("frame").expect("not eof");
            assert_eq!(frame.header(), &Header::Subscribed { token: i });
            if i == 5 {
                assert_eq!(frame.body(), big);
            } else {
                assert_eq!(&frame.body()[..], &[i as u8; 10]);
            }
        }
        assert!(reader.next().await.expect("clean eof").is_none());
        writer.await.expect("join").expect("writer ok");
    }

    /// Counts the write calls that reach it.
    struct CountingSink {
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AsyncWrite for CountingSink {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            std::task::Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// One frame, then a burst queued while the writer waits its turn: with
    /// coalescing they share one write, without it the first goes alone.
    #[tokio::test(flavor = "current_thread")]
    async fn small_batches_wait_a_turn_when_coalescing() {
        for coalesce in [false, true] {
            let (q, mut rx) = out_queue(64, 1 << 20);
            if coalesce {
                rx.coalesce_small_batches();
            }
            let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let sink = CountingSink {
                writes: writes.clone(),
            };
            let writer = tokio::spawn(run_writer(sink, rx, 1 << 20));
            let frame = || OutFrame::control(Header::Subscribed { token: 1 });
            // Let the writer start waiting.
            tokio::task::yield_now().await;
            q.try_push_data(frame()).expect("room");
            // The writer takes the one frame, and (coalescing) waits a turn.
            tokio::task::yield_now().await;
            for _ in 0..9 {
                q.try_push_data(frame()).expect("room");
            }
            while q.queued_frames() > 0 {
                tokio::task::yield_now().await;
            }
            let expected = if coalesce { 1 } else { 2 };
            assert_eq!(
                writes.load(Ordering::SeqCst),
                expected,
                "coalesce {coalesce}"
            );
            drop(q);
            writer.await.expect("join").expect("writer");
        }
    }

    /// Frames that one read brought come out without awaiting; past them
    /// `try_next_frame` says so instead of reading.
    #[tokio::test]
    async fn buffered_frames_come_out_without_awaiting() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut wire = BytesMut::new();
        for token in 0..3u64 {
            encode_header(&Header::Subscribed { token }, 0, 1 << 20, &mut wire).expect("encodes");
        }
        client.write_all(&wire).await.expect("written");
        let mut reader = FrameReader::new(server, FrameCodec::new(1 << 20));
        assert!(reader.try_next_frame().expect("nothing read yet").is_none());
        let first = reader.next_raw().await.expect("read").expect("frame");
        assert!(reader.has_buffered_frame());
        let second = reader.try_next_frame().expect("decodes").expect("buffered");
        let second = second.to_bytes();
        let third = reader.try_next_frame().expect("decodes").expect("buffered");
        let third = third.to_bytes();
        assert!(!reader.has_buffered_frame());
        assert!(reader.try_next_frame().expect("no error").is_none());
        for (token, raw) in [first, second, third].into_iter().enumerate() {
            let frame = Frame::decode(raw).expect("frame");
            assert_eq!(
                frame.header(),
                &Header::Subscribed {
                    token: token as u64
                }
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_wait_marks_congestion_until_drained() {
        let (q, rx) = out_queue(8, 1 << 20);
        let frame = || OutFrame::control(Header::Subscribed { token: 0 });
        while q.try_push_data(frame()).is_ok() {}
        let wait = Duration::from_millis(100);
        assert!(matches!(
            q.push_data_within(frame(), wait).await,
            Err(PushError::Congested)
        ));
        assert!(q.is_congested());
        // Congested and still full: fails at once, no second wait.
        let started = tokio::time::Instant::now();
        assert!(matches!(
            q.push_data_within(frame(), wait).await,
            Err(PushError::Full(_))
        ));
        assert_eq!(started.elapsed(), Duration::ZERO);
        // Drained: accepted again and no longer congested.
        let writer = tokio::spawn(run_writer(tokio::io::sink(), rx, 1 << 20));
        while q.queued_frames() > 0 {
            tokio::task::yield_now().await;
        }
        assert!(q.push_data_within(frame(), wait).await.is_ok());
        assert!(!q.is_congested());
        drop(q);
        writer.await.expect("join").expect("writer");
    }

    #[tokio::test]
    async fn large_frames_get_exact_buffers_between_small_ones() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (q, rx) = out_queue(64, 64 << 20);
        let writer = tokio::spawn(run_writer(client, rx, 64 << 20));
        let sizes = [10usize, 3 << 20, 20, (1 << 20) + 1, 0, 5 << 20, 7];
        let bodies: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| Bytes::from(vec![i as u8 + 1; *n]))
            .collect();
        let expected = bodies.clone();
        let feeder = tokio::spawn(async move {
            for (i, body) in bodies.into_iter().enumerate() {
                q.push_data(OutFrame::Parts {
                    header: Header::Subscribed { token: i as u64 },
                    body,
                })
                .await
                .expect("queued");
            }
        });
        let mut reader = FrameReader::new(server, FrameCodec::new(64 << 20));
        for (i, body) in expected.iter().enumerate() {
            let frame = reader.next().await.expect("frame").expect("not eof");
            assert_eq!(frame.header(), &Header::Subscribed { token: i as u64 });
            assert_eq!(&frame.body(), body, "frame {i}");
        }
        assert!(reader.next().await.expect("clean eof").is_none());
        feeder.await.expect("feeder");
        writer.await.expect("join").expect("writer ok");
    }

    #[test]
    fn try_push_data_reports_full_and_keeps_control_room() {
        let (q, _rx) = out_queue(16, 1000);
        let frame = || OutFrame::Parts {
            header: Header::Goodbye,
            body: Bytes::from_static(b"x"),
        };
        let mut pushed = 0;
        while q.try_push_data(frame()).is_ok() {
            pushed += 1;
        }
        assert_eq!(pushed, 16 - 16 / 8);
        assert!(q
            .try_push_control(OutFrame::control(Header::Goodbye))
            .is_ok());

        let (q, _rx) = out_queue(16, 100);
        let body = |n| OutFrame::Parts {
            header: Header::Goodbye,
            body: Bytes::from(vec![0u8; n]),
        };
        assert!(q.try_push_data(body(60)).is_ok());
        assert!(matches!(q.try_push_data(body(60)), Err(PushError::Full(_))));
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

    /// A task pushing a data frame, waiting for room.
    fn spawn_push(
        q: &OutQueue,
        token: u64,
        len: usize,
    ) -> tokio::task::JoinHandle<Result<(), PushError>> {
        let q = q.clone();
        tokio::spawn(async move { q.push_data(numbered(token, len)).await })
    }

    /// A task pushing a control frame, waiting for a slot.
    fn spawn_push_control(
        q: &OutQueue,
        token: u64,
        len: usize,
    ) -> tokio::task::JoinHandle<Result<(), PushError>> {
        let q = q.clone();
        tokio::spawn(async move { q.push_control(numbered(token, len)).await })
    }

    /// Takes what is queued, as the writer does, and gives back what the
    /// taken frames held, as the writer does once they are written.
    fn take_and_write(rx: &OutReceiver) -> Vec<u64> {
        let mut batch = VecDeque::new();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        if rx.poll_take(&mut cx, &mut batch).is_pending() {
            return vec![];
        }
        let tokens = batch.iter().flat_map(tokens_of).collect();
        let data = batch.iter().map(|i| i.data).sum();
        let bytes = batch.iter().map(|i| i.permits).sum();
        rx.release(data, bytes);
        tokens
    }

    /// A sender that waits for room is served before anyone who comes
    /// later, even one that would fit at once; waiting senders keep their
    /// order.
    #[tokio::test(flavor = "current_thread")]
    async fn waiting_senders_are_served_in_order_and_not_overtaken() {
        let (q, rx) = out_queue(64, 100);
        q.try_push_data(numbered(0, 80)).expect("room");
        let first = spawn_push(&q, 1, 60);
        tokio::task::yield_now().await;
        let second = spawn_push(&q, 2, 10);
        tokio::task::yield_now().await;
        // 10 bytes would fit, but two senders wait before this one.
        assert!(matches!(
            q.try_push_data(numbered(3, 10)),
            Err(PushError::Full(_))
        ));
        assert_eq!(take_and_write(&rx), vec![0]);
        first.await.expect("join").expect("queued");
        second.await.expect("join").expect("queued");
        assert_eq!(take_and_write(&rx), vec![1, 2]);
        q.try_push_data(numbered(4, 10)).expect("nobody waits now");
        assert_eq!(take_and_write(&rx), vec![4]);
    }

    /// A wait given up (its future dropped) gives its place up: the next
    /// in line is served.
    #[tokio::test(flavor = "current_thread")]
    async fn an_abandoned_wait_lets_the_next_sender_in() {
        let (q, rx) = out_queue(64, 100);
        q.try_push_data(numbered(0, 100)).expect("room");
        let abandoned = spawn_push(&q, 1, 100);
        tokio::task::yield_now().await;
        let next = spawn_push(&q, 2, 50);
        tokio::task::yield_now().await;
        abandoned.abort();
        assert!(abandoned.await.is_err(), "aborted");
        assert_eq!(take_and_write(&rx), vec![0]);
        next.await.expect("join").expect("queued");
        assert_eq!(take_and_write(&rx), vec![2]);
    }

    /// Closing wakes waiting senders with their frames handed back; a
    /// dropped writer closes the queue too.
    #[tokio::test(flavor = "current_thread")]
    async fn closing_fails_waiting_senders_and_later_pushes() {
        let (q, rx) = out_queue(8, 100);
        q.try_push_data(numbered(0, 100)).expect("room");
        let waiting = spawn_push(&q, 1, 10);
        tokio::task::yield_now().await;
        q.close();
        assert!(matches!(
            waiting.await.expect("join"),
            Err(PushError::Closed(_))
        ));
        assert!(q.is_closed());
        assert!(matches!(
            q.try_push_control(numbered(2, 0)),
            Err(PushError::Closed(_))
        ));
        q.closed().await;

        let (q, rx2) = out_queue(8, 100);
        drop(rx2);
        assert!(q.is_closed());
        assert!(matches!(
            q.push_control(numbered(3, 0)).await,
            Err(PushError::Closed(_))
        ));
        drop(rx);
    }

    /// Control frames use the slots data may not, and wait only for a
    /// slot; the writer finishes once every sender is gone.
    #[tokio::test(flavor = "current_thread")]
    async fn control_frames_wait_for_a_slot_and_the_writer_ends_with_the_senders() {
        let (q, rx) = out_queue(8, 1 << 20);
        while q.try_push_data(numbered(0, 1)).is_ok() {}
        assert_eq!(q.queued_frames(), 7);
        q.try_push_control(numbered(1, 0))
            .expect("the reserved slot");
        assert!(matches!(
            q.try_push_control(numbered(2, 0)),
            Err(PushError::Full(_))
        ));
        let control = spawn_push_control(&q, 2, 0);
        tokio::task::yield_now().await;
        assert_eq!(take_and_write(&rx).len(), 8);
        control.await.expect("join").expect("queued");
        assert_eq!(take_and_write(&rx), vec![2]);
        let weak = q.downgrade();
        assert!(weak.upgrade().is_some());
        drop(q);
        assert!(weak.upgrade().is_none());
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut batch = VecDeque::new();
        assert_eq!(rx.poll_take(&mut cx, &mut batch), Poll::Ready(None));
    }

    /// A burst is staged in chunks, queued one after the other in order;
    /// the staging buffer never grows past one chunk.
    #[test]
    fn staging_grows_in_chunks() {
        let (q, rx) = out_queue(1024, 64 << 20);
        for token in 0..256 {
            q.try_push_data(numbered(token, 4000)).expect("room");
            assert!(q.core().lock().staged.capacity() <= 2 * STAGING_CHUNK_BYTES);
        }
        assert!(q.core().lock().items.len() > 10, "full chunks queued");
        assert_eq!(take_and_write(&rx), (0..256).collect::<Vec<_>>());
        q.try_push_data(numbered(256, 10)).expect("room");
        assert_eq!(take_and_write(&rx), vec![256]);
    }

    /// A frame over the connection's limit is dropped when queued, as the
    /// writer drops one it cannot encode; the queue holds nothing for it.
    #[test]
    fn a_staged_frame_over_the_limit_is_dropped() {
        let (q, rx) = out_queue(64, 1 << 20);
        q.core().max_frame.store(100, Ordering::Relaxed);
        q.try_push_data(numbered(1, 200))
            .expect("accepted and dropped");
        assert_eq!(q.queued_frames(), 0);
        q.try_push_data(numbered(2, 10)).expect("room");
        assert_eq!(take_and_write(&rx), vec![2]);
        assert_eq!(q.core().lock().bytes, 0, "nothing held");
    }

    /// A message queued by reference is staged as exactly the bytes its
    /// owned frame would be; it is refused (nothing queued) when the queue
    /// is full, when someone waits, or when its body is not small.
    #[tokio::test(flavor = "current_thread")]
    async fn a_message_by_reference_stages_the_same_bytes() {
        use crate::protocol::{MessageHeader, MessageKind, MessageRef, NodeId, Target, TargetRef};
        let target = Target::Node(NodeId::new("b"));
        let body = Bytes::from_static(b"hello");
        let by_ref = MessageRef {
            sender: "a",
            incarnation: 7,
            seq: 42,
            target: TargetRef::from(&target),
            service: "svc",
            kind: MessageKind::Notify,
        };
        let owned = OutFrame::Parts {
            header: Header::Message(MessageHeader {
                sender: NodeId::new("a"),
                incarnation: 7,
                seq: 42,
                target: target.clone(),
                service: Arc::from("svc"),
                kind: MessageKind::Notify,
            }),
            body: body.clone(),
        };
        let staged = |push: &dyn Fn(&OutQueue)| {
            let (q, rx) = out_queue(64, 1 << 20);
            push(&q);
            let mut state = rx.core.lock();
            state.staged.split().freeze()
        };
        let a = staged(&|q| assert!(q.try_push_message(&by_ref, &body)));
        let b = staged(&|q| q.try_push_data(owned.clone()).expect("room"));
        assert_eq!(a, b);

        let (q, rx) = out_queue(64, 10);
        q.try_push_data(numbered(0, 10)).expect("room");
        assert!(!q.try_push_message(&by_ref, &body), "no bytes left");
        let waiting = spawn_push(&q, 1, 10);
        tokio::task::yield_now().await;
        assert_eq!(take_and_write(&rx), vec![0]);
        assert!(!q.try_push_message(&by_ref, &body), "someone waits");
        waiting.await.expect("join").expect("queued");
        let big = vec![0u8; STAGE_UP_TO_BYTES + 1];
        assert!(!q.try_push_message(&by_ref, &big), "not small");
        assert_eq!(take_and_write(&rx), vec![1]);
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
            let mut state = rx.core.lock();
            (state.staged.split().freeze(), state.frames, state.bytes)
        };
        let a = staged(&|q| assert!(q.try_push_raw(&raw)));
        let b = staged(&|q| q.try_push_data(OutFrame::Raw(raw.clone())).expect("room"));
        assert_eq!(a, b);
        assert_eq!(a.1, 1, "one frame");

        let (q, rx) = out_queue(64, 10);
        q.try_push_data(numbered(0, 10)).expect("room");
        assert!(!q.try_push_raw(&raw), "no bytes left");
        let waiting = spawn_push(&q, 1, 10);
        tokio::task::yield_now().await;
        assert_eq!(take_and_write(&rx), vec![0]);
        assert!(!q.try_push_raw(b"x"), "someone waits");
        waiting.await.expect("join").expect("queued");
        assert!(!q.try_push_raw(&[]), "empty");
        assert!(
            !q.try_push_raw(&vec![0u8; STAGE_UP_TO_BYTES + 1]),
            "not small"
        );
        assert_eq!(take_and_write(&rx), vec![1]);
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
            assert!(q.try_push_raw_later(b"\x03frame", &mut wakes));
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
            assert!(q.try_push_raw_later(b"\x03frame", &mut wakes));
            assert_eq!(wakes_seen(), 1);
        }
        assert_eq!(wakes_seen(), 2, "woken when the batch dropped");
    }
}
