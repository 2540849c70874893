//! The writer task: drains an outgoing queue into its connection, many
//! frames per system call.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::queue::{
    OutItem, OutReceiver, Queued, WrittenCounter, CLASSES, CONTROL, LOW, LOW_MARK_EVERY,
};
use super::READ_CHUNK_BYTES;
use crate::frame::{
    encode_header, put_part_head, FrameError, OutFrame, LENGTH_PREFIX_BYTES, PART_FIRST, PART_LAST,
};
use crate::protocol::Header;

/// Bodies at least this large are written from their own buffer in the
/// vectored write instead of being copied into the batch buffer.
pub const VECTORED_MIN_BYTES: usize = 16 * 1024;
/// Buffers per `write_vectored` call.
const MAX_IOSLICES: usize = 64;

/// See [`OutReceiver::coalesce_small_batches`].
pub const COALESCE_BELOW: usize = 4;

/// How many waits in a row may gather no frame before a coalescing writer
/// stops waiting; one that gathers some restores them.
pub const COALESCE_CREDIT: u8 = 4;

/// A writer that stopped waiting still tries once per this many small
/// batches, to notice when waiting pays off again.
pub const COALESCE_PROBE_EVERY: u32 = 1024;

/// How [`write_queue`] ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEnd {
    /// Every [`OutQueue`](super::OutQueue) was dropped, or a [`Header::Goodbye`] was written;
    /// the write side was flushed and shut down.
    Finished,
    /// [`OutQueue::close`](super::OutQueue::close) was called.
    Closed,
}

/// A prelude is written in batches of about this many payload bytes.
const PRELUDE_BATCH_BYTES: usize = 256 * 1024;

/// Gives back what a batch held when it is done, also if the writing
/// future is dropped half-way.
struct Release<'a> {
    rx: &'a OutReceiver,
    /// Per class: payload bytes and data slots.
    held: [(usize, usize); CLASSES],
}

impl Release<'_> {
    fn add_all<'i>(&mut self, items: impl Iterator<Item = &'i OutItem>) {
        for item in items {
            let held = &mut self.held[item.class];
            held.0 += item.permits;
            held.1 += item.data;
        }
    }
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        for (class, (permits, data_slots)) in self.held.iter().enumerate() {
            self.rx.release(class, *data_slots, *permits);
        }
    }
}

/// What is left to write of a frame sent in parts.
struct Partial {
    /// The encoded header (without its length prefix), for a frame
    /// queued as header and body, until the first part takes it.
    head: Option<Bytes>,
    /// The rest of the contents.
    rest: Bytes,
    /// The whole contents' length.
    total: usize,
    /// Whether the first part was written.
    started: bool,
    /// Payload bytes and data slots it holds in its class until written.
    permits: usize,
    data: usize,
}

/// The frames a writer sends in parts: per class, in the order they were
/// queued (one at a time per class, so that the reader has one frame in
/// assembly per lane). What they hold in the queue is given back as their
/// last parts are written, or when the writer ends.
struct Partials<'a> {
    rx: &'a OutReceiver,
    lanes: [VecDeque<Partial>; CLASSES],
    /// For [`choose`](super::queue::choose) among them alone.
    passed_over: [u8; CLASSES],
}

impl<'a> Partials<'a> {
    fn new(rx: &'a OutReceiver) -> Self {
        Partials {
            rx,
            lanes: Default::default(),
            passed_over: [0; CLASSES],
        }
    }

    fn is_empty(&self) -> bool {
        self.lanes.iter().all(VecDeque::is_empty)
    }

    fn holds(&self, class: usize) -> bool {
        !self.lanes[class].is_empty()
    }

    fn holding(&self) -> [bool; CLASSES] {
        std::array::from_fn(|c| self.holds(c))
    }

    /// The class among those holding frames in parts that goes next, by
    /// the queue's rule (the less urgent get a bounded share).
    fn most_urgent(&mut self) -> usize {
        super::queue::choose(self.holding(), &mut self.passed_over).unwrap_or(CONTROL)
    }

    fn push(&mut self, class: usize, mut partial: Partial, permits: usize, data: usize) {
        partial.permits = permits;
        partial.data = data;
        self.lanes[class].push_back(partial);
    }

    /// Adds the next part of `class`'s first frame in parts to `out`: the
    /// bytes of its piece and, for a frame's first part, the frame's size.
    /// Once its last part is added, what it held goes to `release`, given
    /// back when the batch is written.
    fn add_part(
        &mut self,
        class: usize,
        out: &mut Encoder,
        chunk_bytes: usize,
        release: &mut Release<'_>,
    ) -> (u64, Option<usize>) {
        let Some(partial) = self.lanes[class].front_mut() else {
            return (0, None);
        };
        let first = (!partial.started).then_some(partial.total);
        let (last, piece) = out.add_part(class, partial, chunk_bytes);
        if last {
            if let Some(done) = self.lanes[class].pop_front() {
                let held = &mut release.held[class];
                held.0 += done.permits;
                held.1 += done.data;
            }
        }
        (piece as u64, first)
    }
}

impl Drop for Partials<'_> {
    fn drop(&mut self) {
        for (class, lane) in self.lanes.iter().enumerate() {
            for partial in lane {
                self.rx.release(class, partial.data, partial.permits);
            }
        }
    }
}

/// Whether `item` is a goodbye, after which nothing is written.
fn is_goodbye(item: &OutItem) -> bool {
    matches!(
        &item.what,
        Queued::Frame(OutFrame::Parts {
            header: Header::Goodbye,
            ..
        })
    )
}

/// Drains `rx` into `io` until every [`OutQueue`](super::OutQueue) is
/// dropped or a [`Header::Goodbye`] was written (then flushes and shuts the
/// write side down), or [`OutQueue::close`](super::OutQueue::close) is
/// called (then stops at once).
///
/// The frames of `prelude` go first, before anything queued, encoded and
/// checked as queued frames are and written in batches; they hold no room
/// in the queue. A reconnected link resends through it what awaits an
/// outcome.
///
/// Each batch (at most about 256 KiB of one class, see
/// [`OutReceiver`]'s classes) goes out in as few
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
/// Dropping the future loses the batch being written and what is left of
/// the prelude, nothing else.
pub async fn write_queue<W: AsyncWrite + Unpin>(
    io: &mut W,
    rx: &mut OutReceiver,
    max_frame: usize,
    prelude: Vec<OutFrame>,
) -> Result<WriteEnd, FrameError> {
    let closed = rx.closed();
    let written = rx.written_counter();
    // Frames staged from now on are checked against this connection's
    // limit as they are queued.
    rx.set_max_frame(max_frame);
    // No `Low` marks written or answered on this connection yet.
    rx.reset_low();
    let mut out = Encoder::new(max_frame);
    let mut prelude = prelude.into_iter().peekable();
    while prelude.peek().is_some() {
        let mut bytes = 0;
        while let Some(frame) = prelude.next_if(|_| bytes < PRELUDE_BATCH_BYTES) {
            bytes += frame.payload_len();
            out.add(Queued::Frame(frame));
        }
        if let Some(end) = out.write(io, &closed, &written).await? {
            return Ok(end);
        }
    }
    let mut batch = VecDeque::new();
    let chunk_bytes = rx.chunk_bytes();
    // Frames larger than a chunk, written a part per turn.
    let mut partials = Partials::new(rx);
    // Coalescing (see `OutReceiver::coalesce_small_batches`): waits left
    // that may gather nothing, and small batches seen.
    let mut credit = COALESCE_CREDIT;
    let mut small_batches = 0u32;
    // A goodbye taken, and the messages queued before it that are still to
    // be written (entries per class, see `OutReceiver::mark`).
    let mut goodbye: Option<(Queued, [usize; CLASSES])> = None;
    // The class whose turn this is, when the writer chose it.
    let mut turn: Option<usize> = None;
    // Bytes of parts written (see `OutReceiver::window_parts`), and
    // whether every sender is gone while parts are left to write.
    let mut parts = PartWindow::default();
    let mut senders_gone = false;
    // Bytes of `Low` messages written since the last `LowMark` (see
    // `OutReceiver::window_low`).
    let mut low_unmarked = 0usize;
    loop {
        let frames = match goodbye.as_mut() {
            Some((_, left)) => match rx.take_before(left, &mut batch) {
                0 if !partials.is_empty() => {
                    // Frames in parts were taken before it: they go first.
                    tokio::select! {
                        biased;
                        _ = closed.cancelled() => return Ok(WriteEnd::Closed),
                        () = parts.granted(rx) => {}
                    }
                    let mut release = Release {
                        rx,
                        held: [(0, 0); CLASSES],
                    };
                    let class = partials.most_urgent();
                    parts.wrote(
                        partials.add_part(class, &mut out, chunk_bytes, &mut release),
                        chunk_bytes,
                    );
                    let end = out.write(io, &closed, &written).await;
                    drop(release);
                    if let Some(end) = end? {
                        return Ok(end);
                    }
                    continue;
                }
                0 => {
                    // Everything queued before it is written: it goes now,
                    // and nothing after it.
                    if let Some((what, _)) = goodbye.take() {
                        out.add(what);
                    }
                    if let Some(end) = out.write(io, &closed, &written).await? {
                        return Ok(end);
                    }
                    continue;
                }
                frames => frames,
            },
            None if !partials.is_empty() && parts.open(rx) => {
                // Frames in parts are being written: no waiting, a turn of
                // the class chosen among the queue's and theirs.
                if closed.is_cancelled() {
                    return Ok(WriteEnd::Closed);
                }
                let before = batch.len();
                turn = rx.take_turn(&mut batch, partials.holding());
                batch.len() - before
            }
            None if !partials.is_empty() => {
                // Parts wait for the peer to read what it has: whatever
                // comes first, frames to write or its word.
                tokio::select! {
                    biased;
                    _ = closed.cancelled() => return Ok(WriteEnd::Closed),
                    () = parts.granted(rx) => 0,
                    took = std::future::poll_fn(|cx| rx.poll_take(cx, &mut batch)), if !senders_gone => {
                        match took {
                            Some(frames) => frames,
                            None => {
                                senders_gone = true;
                                0
                            }
                        }
                    }
                }
            }
            None => {
                let took = tokio::select! {
                    biased;
                    _ = closed.cancelled() => return Ok(WriteEnd::Closed),
                    took = std::future::poll_fn(|cx| rx.poll_take(cx, &mut batch)) => took,
                };
                let Some(frames) = took else {
                    io.shutdown().await?;
                    return Ok(WriteEnd::Finished);
                };
                frames
            }
        };
        // What the batch holds is given back however this turn ends (the
        // future may be dropped at any await below).
        let mut release = Release {
            rx,
            held: [(0, 0); CLASSES],
        };
        release.add_all(batch.iter());
        if rx.coalesces() && frames < COALESCE_BELOW && goodbye.is_none() && partials.is_empty() {
            small_batches = small_batches.wrapping_add(1);
            // Only while waiting pays off: a lone request/reply pair gains
            // nothing from it but latency.
            if credit > 0 || small_batches.is_multiple_of(COALESCE_PROBE_EVERY) {
                let before = batch.len();
                tokio::task::yield_now().await;
                rx.take_more(&mut batch);
                release.add_all(batch.iter().skip(before));
                credit = if batch.len() > before {
                    COALESCE_CREDIT
                } else {
                    credit.saturating_sub(1)
                };
            }
        }
        let mut after_goodbye = false;
        for item in batch.drain(..) {
            if after_goodbye && item.class == CONTROL {
                // Queued after the goodbye: not written. (Messages in the
                // batch were taken before the goodbye's mark: they are
                // written, as those the mark counts.)
                continue;
            }
            if goodbye.is_none() && is_goodbye(&item) {
                // It goes last: after every message queued before it, which
                // may wait in less urgent classes than its own.
                goodbye = Some((item.what, rx.mark()));
                after_goodbye = true;
                continue;
            }
            let class = item.class;
            if class == LOW {
                low_unmarked += what_len(&item.what);
            }
            // A control frame goes whole, however large: the peer hands
            // out a frame in parts only once its last part is in, so the
            // frames written between its parts (the feed's membership
            // events after a welcome) would overtake it.
            let split_above = if class == CONTROL {
                usize::MAX
            } else {
                chunk_bytes
            };
            match out.add_or_split(item.what, split_above) {
                None if class != CONTROL => parts.small_message(),
                None => {}
                Some(partial) => {
                    // Held until its last part is written.
                    let held = &mut release.held[class];
                    held.0 -= item.permits;
                    held.1 -= item.data;
                    partials.push(class, partial, item.permits, item.data);
                    turn = turn.or(Some(class));
                }
            }
        }
        // One part of a frame in parts: of the class whose turn it is if it
        // has one (a class taken from the queue has its batch and a part),
        // else of the most urgent.
        if !partials.is_empty() && parts.open(rx) {
            let class = turn
                .filter(|c| partials.holds(*c))
                .unwrap_or_else(|| partials.most_urgent());
            parts.wrote(
                partials.add_part(class, &mut out, chunk_bytes, &mut release),
                chunk_bytes,
            );
        }
        turn = None;
        // A mark after each `LOW_MARK_EVERY` bytes of `Low` messages: the
        // peer answers it once it has taken in what came before.
        if low_unmarked >= LOW_MARK_EVERY && rx.marks_low() {
            let mark = rx.next_low_mark();
            out.add(Queued::Frame(OutFrame::control(Header::LowMark { mark })));
            low_unmarked = 0;
        }
        let end = out.write(io, &closed, &written).await;
        drop(release);
        if let Some(end) = end? {
            return Ok(end);
        }
    }
}

/// How many chunks' worth of parts make the window on parts
/// ([`OutReceiver::window_parts`]) give way, and how large a frame must be
/// for it to. The window keeps the sockets' buffers shallow for small
/// messages that go beside large frames (and, measured, moves frames of a
/// few chunks faster), but costs very large frames that go alone: a part
/// waits for the peer's word on the one before last. So once a writer has
/// written this many parts with no message going whole meanwhile, it
/// writes frames of at least this many chunks without the window, until
/// the next message that goes whole. That message may wait for what the
/// buffers hold; those after it do not.
pub const WINDOW_AFTER_SMALL_PARTS: u32 = 16;

/// The writer's account of its parts, for the window on them.
#[derive(Debug, Default)]
struct PartWindow {
    /// Bytes of parts written on this connection.
    sent: u64,
    /// Parts written since the last message that went whole.
    since_small: u32,
    /// Whether the frame whose part was written last is of at least
    /// [`WINDOW_AFTER_SMALL_PARTS`] chunks.
    large: bool,
}

impl PartWindow {
    /// Whether a part may go out now.
    fn open(&self, rx: &OutReceiver) -> bool {
        (self.large && self.since_small >= WINDOW_AFTER_SMALL_PARTS) || rx.may_send_part(self.sent)
    }

    /// Waits until a part may go out.
    async fn granted(&self, rx: &OutReceiver) {
        if !self.open(rx) {
            rx.part_granted(self.sent).await;
        }
    }

    /// A part of `bytes` was added, and, if it was a frame's first, the
    /// frame's size.
    fn wrote(&mut self, (bytes, first): (u64, Option<usize>), chunk_bytes: usize) {
        self.sent += bytes;
        self.since_small = self.since_small.saturating_add(1);
        if let Some(total) = first {
            self.large = total >= WINDOW_AFTER_SMALL_PARTS as usize * chunk_bytes;
        }
    }

    /// A message went whole.
    fn small_message(&mut self) {
        self.since_small = 0;
    }
}

/// A batch of frames encoded for writing, in order: headers and small
/// bodies copied into one buffer, staged chunks and large bodies kept as
/// they are.
struct Encoder {
    /// The frames' limit on this connection.
    max_frame: usize,
    /// Small pieces, copied.
    buf: BytesMut,
    /// What is ready to write, in order.
    chunks: VecDeque<Bytes>,
    /// A goodbye was added: nothing after it is written.
    goodbye: bool,
}

impl Encoder {
    fn new(max_frame: usize) -> Self {
        Encoder {
            max_frame,
            buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            chunks: VecDeque::new(),
            goodbye: false,
        }
    }

    /// Adds what an entry holds. A frame that cannot be encoded within the
    /// limit is logged and skipped.
    fn add(&mut self, what: Queued) {
        if self.goodbye {
            // Nothing follows a goodbye.
            return;
        }
        let frame = match what {
            Queued::Framed(bytes) => {
                // Encoded when queued: written as it is.
                if !self.buf.is_empty() {
                    self.chunks.push_back(self.buf.split().freeze());
                }
                self.chunks.push_back(bytes);
                return;
            }
            Queued::Frame(frame) => frame,
        };
        let max_frame = self.max_frame;
        let body = match frame {
            OutFrame::Parts { header, body } => {
                self.goodbye = matches!(header, Header::Goodbye);
                if let Err(e) = encode_header(&header, body.len(), max_frame, &mut self.buf) {
                    tracing::error!(error = %e, kind = header.kind(), "dropping frame that cannot be encoded");
                    return;
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
                    return;
                }
                self.buf.reserve(LENGTH_PREFIX_BYTES);
                self.buf.put_u32(raw.len() as u32);
                raw
            }
        };
        if body.len() >= VECTORED_MIN_BYTES {
            self.chunks.push_back(self.buf.split().freeze());
            self.chunks.push_back(body);
        } else {
            self.buf.extend_from_slice(&body);
        }
    }

    /// Adds `what` as [`Encoder::add`] does, unless its body is a chunk
    /// (`chunk_bytes`) or more, so that its contents are larger than a
    /// chunk: then it is handed back to be written in parts
    /// ([`Encoder::add_part`]). A stream's chunks go in parts too, and so
    /// under a channel's window. One over the limit is logged and skipped
    /// either way.
    fn add_or_split(&mut self, what: Queued, chunk_bytes: usize) -> Option<Partial> {
        if self.goodbye || what_len(&what) < chunk_bytes {
            self.add(what);
            return None;
        }
        let (head, rest) = match what {
            Queued::Frame(OutFrame::Parts { header, body }) => {
                let mut head = BytesMut::new();
                if let Err(e) = encode_header(&header, body.len(), self.max_frame, &mut head) {
                    tracing::error!(error = %e, kind = header.kind(), "dropping frame that cannot be encoded");
                    return None;
                }
                let head = head.freeze().slice(LENGTH_PREFIX_BYTES..);
                (Some(head), body)
            }
            Queued::Frame(OutFrame::Raw(raw)) => {
                if raw.len() > self.max_frame {
                    tracing::error!(
                        len = raw.len(),
                        max_frame = self.max_frame,
                        "dropping raw frame outside the limit"
                    );
                    return None;
                }
                (None, raw)
            }
            framed @ Queued::Framed(_) => {
                // Small frames staged as queued: never split.
                self.add(framed);
                return None;
            }
        };
        let total = head.as_ref().map_or(0, Bytes::len) + rest.len();
        Some(Partial {
            head,
            rest,
            total,
            started: false,
            permits: 0,
            data: 0,
        })
    }

    /// Adds the next part of `partial`, on `lane`: its header (the first
    /// part) and up to `chunk_bytes` of the rest. Whether that was its
    /// last, and the bytes of its piece (what the reader counts, see
    /// [`crate::io::FrameReader::grant_to`]).
    fn add_part(
        &mut self,
        lane: usize,
        partial: &mut Partial,
        chunk_bytes: usize,
    ) -> (bool, usize) {
        let first = !partial.started;
        partial.started = true;
        let head = partial.head.take();
        let head_len = head.as_ref().map_or(0, Bytes::len);
        let piece = partial.rest.split_to(
            partial
                .rest
                .len()
                .min(chunk_bytes.saturating_sub(head_len).max(1)),
        );
        let last = partial.rest.is_empty();
        let piece_len = head_len + piece.len();
        let mut flags = lane as u8;
        if first {
            flags |= PART_FIRST;
        }
        if last {
            flags |= PART_LAST;
        }
        self.buf.reserve(2 * LENGTH_PREFIX_BYTES + 1 + head_len);
        let total = first.then_some(partial.total as u32);
        put_part_head(&mut self.buf, flags, total, piece_len);
        if let Some(head) = head {
            self.buf.extend_from_slice(&head);
        }
        if piece.len() >= VECTORED_MIN_BYTES {
            self.chunks.push_back(self.buf.split().freeze());
            self.chunks.push_back(piece);
        } else {
            self.buf.extend_from_slice(&piece);
        }
        (last, piece_len)
    }

    /// Writes everything added, then flushes; after a goodbye, shuts the
    /// write side down. How the writer ends, if it does: closed meanwhile,
    /// or finished with the goodbye.
    async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        closed: &CancellationToken,
        written: &WrittenCounter,
    ) -> Result<Option<WriteEnd>, FrameError> {
        if !self.buf.is_empty() {
            self.chunks.push_back(self.buf.split().freeze());
        }
        let written = tokio::select! {
            biased;
            _ = closed.cancelled() => return Ok(Some(WriteEnd::Closed)),
            w = write_chunks(io, &mut self.chunks, written) => w,
        };
        self.chunks.clear();
        written?;
        if self.goodbye {
            io.shutdown().await?;
            return Ok(Some(WriteEnd::Finished));
        }
        Ok(None)
    }
}

/// About the bytes a queued entry's contents take (header aside).
fn what_len(what: &Queued) -> usize {
    match what {
        Queued::Frame(frame) => frame.payload_len(),
        Queued::Framed(bytes) => bytes.len(),
    }
}

/// [`write_queue`] for a connection that owns its queue: when it ends, the
/// queue is closed (senders see [`PushError::Closed`](super::PushError::Closed)).
///
/// # Errors
///
/// As [`write_queue`].
pub async fn run_writer<W: AsyncWrite + Unpin>(
    mut io: W,
    mut rx: OutReceiver,
    max_frame: usize,
) -> Result<(), FrameError> {
    let result = write_queue(&mut io, &mut rx, max_frame, Vec::new()).await;
    // Dropping the receiver closes the queue for its senders.
    drop(rx);
    result.map(|_| ())
}

/// Writes every chunk, many per syscall.
async fn write_chunks<W: AsyncWrite + Unpin>(
    io: &mut W,
    chunks: &mut VecDeque<Bytes>,
    written: &WrittenCounter,
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
        written.add(n);
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
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::*;
    use crate::frame::FrameCodec;
    use crate::io::{out_queue, FrameReader, Lane, UnknownMark, Wait};
    use crate::protocol::Priority;

    use crate::io::subscribed;

    /// The token of a `Subscribed` frame read back.
    async fn token_of<R: tokio::io::AsyncRead + Unpin>(reader: &mut FrameReader<R>) -> u64 {
        let frame = reader.next().await.expect("frame").expect("not the end");
        match frame.into_parts().0 {
            Header::Subscribed { token } => token,
            other => panic!("unexpected frame {other:?}"),
        }
    }

    /// A queue that follows a feed writes what its control class held
    /// first (the welcome), then every frame of the feed from its start,
    /// once and in order, before data queued beside them; frames appended
    /// while the writer sleeps wake it; the feed's frames and control
    /// frames go in the order they came.
    #[tokio::test]
    async fn a_follower_writes_the_feed_and_control_frames_in_the_order_they_came() {
        let feed = crate::io::Feed::new(1 << 20);
        // Before the follower: not its to write.
        feed.append(&Header::Subscribed { token: 999 })
            .expect("appends");
        let (client, server) = tokio::io::duplex(1 << 20);
        let (q, rx) = out_queue(64, 1 << 20);
        q.try_push(
            OutFrame::control(Header::Subscribed { token: 0 }),
            Lane::Control,
        )
        .expect("room");
        q.follow(&feed, feed.head());
        for token in 1..=3 {
            feed.append(&Header::Subscribed { token }).expect("appends");
        }
        q.try_push(subscribed(100, 10), Lane::Data).expect("room");
        let writer = tokio::spawn(run_writer(client, rx, 1 << 20));
        let mut reader = FrameReader::new(server, FrameCodec::new(1 << 20));
        let got: Vec<u64> = [
            token_of(&mut reader).await,
            token_of(&mut reader).await,
            token_of(&mut reader).await,
            token_of(&mut reader).await,
            token_of(&mut reader).await,
        ]
        .into();
        assert_eq!(got, [0, 1, 2, 3, 100]);
        // The writer sleeps now; an append wakes it.
        for token in 4..200 {
            feed.append(&Header::Subscribed { token }).expect("appends");
        }
        for token in 4..200 {
            assert_eq!(token_of(&mut reader).await, token);
        }
        // Control frames and the feed's, interleaved: each goes in the
        // order it came, whatever the writer takes when.
        let control = |token| OutFrame::control(Header::Subscribed { token });
        let mut expected = Vec::new();
        for round in 0..50u64 {
            let base = 1000 + round * 10;
            feed.append(&Header::Subscribed { token: base })
                .expect("appends");
            q.try_push(control(base + 1), Lane::Control).expect("room");
            q.try_push(control(base + 2), Lane::Control).expect("room");
            feed.append(&Header::Subscribed { token: base + 3 })
                .expect("appends");
            feed.append(&Header::Subscribed { token: base + 4 })
                .expect("appends");
            q.try_push(control(base + 5), Lane::Control).expect("room");
            expected.extend([base, base + 1, base + 2, base + 3, base + 4, base + 5]);
            if round % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        for token in expected {
            assert_eq!(token_of(&mut reader).await, token);
        }
        assert_eq!(feed.held(), (0, 0), "everything written is let go");
        drop(q);
        assert!(reader.next().await.expect("clean end").is_none());
        writer.await.expect("joins").expect("writes");
        assert_eq!(feed.followers(), 0);
    }

    /// A control frame larger than the chunk size (a welcome listing
    /// thousands of members) is written whole: the peer takes the frames
    /// of the feed that follow it after it, not between its parts (a
    /// reader hands out whole frames while one in parts is put together,
    /// so a node saw a membership event before its welcome, and its
    /// handshake failed).
    #[tokio::test]
    async fn a_large_control_frame_goes_whole_before_the_feed_after_it() {
        let feed = crate::io::Feed::new(1 << 22);
        let (client, server) = tokio::io::duplex(1 << 16);
        let (q, mut rx) = out_queue(64, 1 << 22);
        rx.chunk_above(crate::io::MIN_CHUNK_BYTES);
        let member = |i: u64| crate::protocol::MemberInfo {
            id: crate::protocol::NodeId::new(format!("node-{i}")),
            incarnation: i,
            role: crate::protocol::Role::Server,
            groups: vec![],
            services: vec!["service".into()],
            direct_addr: None,
            session_key: [7; 32],
            busy: false,
        };
        let welcome = crate::protocol::Welcome {
            version: crate::protocol::PROTOCOL_VERSION,
            cluster: "c".to_owned(),
            max_message_bytes: 1 << 20,
            members: vec![],
            heartbeat_addr: None,
            session_secret: None,
        };
        // As the message server assembles it: from each member's encoding.
        let members: Vec<Vec<u8>> = (0..2_000)
            .map(|i| postcard::to_allocvec(&member(i)).expect("encodes"))
            .collect();
        let raw = welcome.encode_with_members(&members).expect("encodes");
        assert!(raw.len() > 16 * crate::io::MIN_CHUNK_BYTES, "{}", raw.len());
        q.try_push(OutFrame::Raw(Bytes::from(raw)), Lane::Control)
            .expect("room");
        q.follow(&feed, feed.head());
        for token in 0..100 {
            feed.append(&Header::Subscribed { token }).expect("appends");
        }
        let writer = tokio::spawn(run_writer(client, rx, 1 << 22));
        let mut reader = FrameReader::new(server, FrameCodec::new(1 << 22));
        let first = reader.next().await.expect("frame").expect("not the end");
        match first.into_parts().0 {
            Header::Welcome(w) => assert_eq!(w.members.len(), 2_000),
            other => panic!("{} before the welcome", other.kind()),
        }
        for token in 0..100 {
            assert_eq!(token_of(&mut reader).await, token);
        }
        drop(q);
        assert!(reader.next().await.expect("clean end").is_none());
        writer.await.expect("joins").expect("writes");
    }

    /// A follower that fell further behind than the feed keeps loses its
    /// place: its connection is closed, not left with a gap.
    #[tokio::test]
    async fn a_follower_past_the_feeds_bound_is_closed() {
        let one = 4 + postcard::to_allocvec(&Header::Subscribed { token: 0 })
            .expect("encodes")
            .len();
        let feed = crate::io::Feed::new(4 * one);
        let (client, _server) = tokio::io::duplex(1 << 20);
        let (q, rx) = out_queue(64, 1 << 20);
        q.follow(&feed, feed.head());
        for token in 0..10 {
            feed.append(&Header::Subscribed { token }).expect("appends");
        }
        assert!(feed.held().1 <= 4 * one);
        let writer = tokio::spawn(run_writer(client, rx, 1 << 20));
        q.closed().await;
        assert!(q.is_closed());
        writer.await.expect("joins").expect("writes");
        assert_eq!(feed.lagged(), 1);
        assert_eq!(feed.followers(), 0);
    }

    /// A prelude goes out before what was queued, in order (over several
    /// batches), its frames checked against the limit as queued ones are
    /// (one too large is skipped); it holds no room in the queue.
    #[tokio::test]
    async fn the_prelude_goes_out_first_and_is_checked_like_queued_frames() {
        let max_frame = 64 * 1024;
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (q, mut rx) = out_queue(64, 1 << 20);
        for token in 100..103 {
            q.try_push(subscribed(token, 10), Lane::Data).expect("room");
        }
        let len = |token| match token {
            7 => max_frame + 1,
            t if t < 40 && t % 2 == 0 => 20_000,
            _ => 10,
        };
        let prelude = (0..40).map(|t| subscribed(t, len(t))).collect();
        let writer = tokio::spawn(async move {
            let mut client = client;
            let end = write_queue(&mut client, &mut rx, max_frame, prelude).await;
            (end, rx)
        });
        drop(q);
        let mut reader = FrameReader::new(server, FrameCodec::new(max_frame));
        let mut got = Vec::new();
        while let Some(frame) = reader.next().await.expect("frame") {
            let (header, body) = frame.into_parts();
            let Header::Subscribed { token } = header else {
                panic!("unexpected frame {header:?}");
            };
            assert_eq!(body.len(), len(token), "frame {token}");
            got.push(token);
        }
        let expected: Vec<u64> = (0..40).filter(|t| *t != 7).chain(100..103).collect();
        assert_eq!(got, expected);
        let (end, _rx) = writer.await.expect("join");
        assert_eq!(end.expect("written"), WriteEnd::Finished);
    }

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
            q.push(
                OutFrame::Parts {
                    header: Header::Subscribed { token: i },
                    body,
                },
                Lane::Data,
                Wait::Forever,
            )
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
            q.try_push(frame(), Lane::Data).expect("room");
            // The writer takes the one frame, and (coalescing) waits a turn.
            tokio::task::yield_now().await;
            for _ in 0..9 {
                q.try_push(frame(), Lane::Data).expect("room");
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

    /// Reads frames until the end: each one's token and body.
    async fn read_all(server: tokio::io::DuplexStream, max_frame: usize) -> Vec<(u64, Bytes)> {
        let mut reader = FrameReader::new(server, FrameCodec::new(max_frame));
        let mut got = Vec::new();
        while let Some(frame) = reader.next().await.expect("frame") {
            let (header, body) = frame.into_parts();
            match header {
                Header::Subscribed { token } => got.push((token, body)),
                Header::Goodbye => got.push((u64::MAX, body)),
                other => panic!("unexpected frame {other:?}"),
            }
        }
        got
    }

    /// A frame larger than the chunk size goes in parts, and the frames
    /// queued after it (of its class or a more urgent one, by header and
    /// body or raw) come out before it is whole; every frame arrives
    /// intact, the large ones in their order.
    #[tokio::test]
    async fn large_frames_go_in_parts_and_small_ones_pass_them() {
        let max_frame = 16 << 20;
        let (client, server) = tokio::io::duplex(1 << 20);
        let (q, mut rx) = out_queue(1024, 64 << 20);
        rx.chunk_above(64 * 1024);
        let body = |token: u64, len: usize| {
            Bytes::from(
                (0..len)
                    .map(|i| (i as u64 ^ token) as u8)
                    .collect::<Vec<u8>>(),
            )
        };
        // Two large frames of the normal class, a large raw one of the
        // express class, and small ones behind them in each.
        let large = [(1u64, 3 << 20), (2, (1 << 20) + 17)];
        for (token, len) in large {
            q.try_push(
                OutFrame::Parts {
                    header: Header::Subscribed { token },
                    body: body(token, len),
                },
                Lane::Data,
            )
            .expect("room");
        }
        let mut raw = BytesMut::new();
        encode_header(&Header::Subscribed { token: 3 }, 0, max_frame, &mut raw).expect("encodes");
        let mut raw = raw.split_off(LENGTH_PREFIX_BYTES);
        raw.extend_from_slice(&body(3, 700 * 1024));
        q.try_push_at(OutFrame::Raw(raw.freeze()), Priority::Express)
            .expect("room");
        for token in 10..20 {
            q.try_push(subscribed(token, 100), Lane::Data)
                .expect("room");
        }
        for token in 20..25 {
            q.try_push_at(subscribed(token, 100), Priority::Express)
                .expect("room");
        }
        let writer = tokio::spawn(run_writer(client, rx, max_frame));
        drop(q);
        let got = read_all(server, max_frame).await;
        writer.await.expect("join").expect("writer");
        let order: Vec<u64> = got.iter().map(|(t, _)| *t).collect();
        assert_eq!(order.len(), 18, "every frame arrives once: {order:?}");
        let at = |token| order.iter().position(|t| *t == token).expect("arrived");
        for small in 10..25 {
            assert!(
                at(small) < at(1),
                "{small} waited for the large frame: {order:?}"
            );
        }
        assert!(at(1) < at(2), "large frames of a class keep their order");
        for (token, b) in &got {
            match token {
                1..=3 => {
                    let len = large
                        .iter()
                        .find(|(t, _)| t == token)
                        .map_or(700 * 1024, |l| l.1);
                    assert_eq!(b, &body(*token, len), "frame {token} intact");
                }
                _ => assert_eq!(b.len(), 100),
            }
        }
    }

    /// A goodbye queued after a frame in parts goes after its last part.
    #[tokio::test]
    async fn a_goodbye_waits_for_the_frame_in_parts_before_it() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (q, mut rx) = out_queue(64, 8 << 20);
        rx.chunk_above(16 * 1024);
        q.try_push(subscribed(1, 1 << 20), Lane::Data)
            .expect("room");
        q.try_push(OutFrame::control(Header::Goodbye), Lane::Control)
            .expect("room");
        let writer = tokio::spawn(run_writer(client, rx, 4 << 20));
        let got = read_all(server, 4 << 20).await;
        writer.await.expect("join").expect("writer");
        let order: Vec<(u64, usize)> = got.iter().map(|(t, b)| (*t, b.len())).collect();
        assert_eq!(order, vec![(1, 1 << 20), (u64::MAX, 0)]);
        drop(q);
    }

    /// The reader refuses parts that break the rules, each with its own
    /// error, and a connection that ends with a frame half put together.
    #[tokio::test]
    async fn broken_parts_are_refused() {
        use crate::frame::{PART_BIT, PART_FIRST, PART_LAST};
        use tokio::io::AsyncWriteExt;
        fn part(flags: u8, total: Option<u32>, piece: &[u8]) -> Vec<u8> {
            let mut v = Vec::new();
            crate::frame::put_part_head(&mut v, flags, total, piece.len());
            v.extend_from_slice(piece);
            v
        }
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (part(7, Some(10), b"x"), "unknown flags or lane"),
            (part(0x20, Some(10), b"x"), "unknown flags or lane"),
            (part(1, None, b"x"), "continues no frame"),
            (
                [part(PART_FIRST | 1, Some(4), b"ab"), part(1, None, b"cde")].concat(),
                "add up to more",
            ),
            (
                [
                    part(PART_FIRST | 1, Some(4), b"ab"),
                    part(PART_FIRST | 1, Some(4), b"ab"),
                ]
                .concat(),
                "began on a lane",
            ),
            (part(PART_FIRST | PART_LAST, Some(4), b"ab"), "ends before"),
            (part(PART_FIRST, Some(1 << 20), b"ab"), "exceeds the limit"),
            (part(PART_FIRST, Some(0), b""), "empty frame"),
            (part(PART_FIRST, Some(8), b"ab"), "in the middle of a frame"),
            (PART_BIT.to_be_bytes().to_vec(), "in the middle of a frame"),
        ];
        for (bytes, expected) in cases {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            client.write_all(&bytes).await.expect("written");
            drop(client);
            let mut reader = FrameReader::new(server, FrameCodec::new(64 * 1024));
            let err = loop {
                match reader.next_raw().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("{expected}: ended cleanly"),
                    Err(e) => break e,
                }
            };
            assert!(err.to_string().contains(expected), "{expected}: got {err}");
        }
    }

    /// With a window, parts stop once the window is out and go on as the
    /// peer grants what it read; small frames pass meanwhile.
    #[tokio::test]
    async fn parts_wait_for_grants_beyond_the_window() {
        let chunk = 16 * 1024;
        let (client, server) = tokio::io::duplex(4 << 20);
        let (q, mut rx) = out_queue(1024, 8 << 20);
        rx.chunk_above(chunk);
        rx.window_parts(2 * chunk);
        q.try_push(subscribed(1, 10 * chunk), Lane::Data)
            .expect("room");
        let writer = tokio::spawn(run_writer(client, rx, 1 << 20));
        let mut reader = FrameReader::new(server, FrameCodec::new(1 << 20));
        let (grants, grant_rx) = out_queue(1024, 1 << 20);
        reader.grant_to(grants);
        // Nothing whole arrives yet: the window is out (the grants go to a
        // queue nobody forwards).
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), reader.next()).await;
        assert!(early.is_err(), "more than the window was written");
        // A small frame passes the waiting parts.
        q.try_push(subscribed(2, 10), Lane::Data).expect("room");
        let frame = reader.next().await.expect("frame").expect("not eof");
        assert_eq!(frame.header(), &Header::Subscribed { token: 2 });
        // Forward the grants as they come: the large frame completes.
        let (grants_in, grants_out) = tokio::io::duplex(64 * 1024);
        let grant_writer = tokio::spawn(run_writer(grants_in, grant_rx, 1 << 20));
        let forward = tokio::spawn({
            let q = q.clone();
            async move {
                let mut grants = FrameReader::new(grants_out, FrameCodec::new(1 << 20));
                while let Ok(Some(frame)) = grants.next().await {
                    if let Header::Credit { read } = frame.header() {
                        q.grant(*read);
                    }
                }
            }
        });
        let frame = reader.next().await.expect("frame").expect("not eof");
        assert_eq!(frame.header(), &Header::Subscribed { token: 1 });
        assert_eq!(frame.body().len(), 10 * chunk);
        forward.abort();
        grant_writer.abort();
        drop(q);
        assert!(reader.next().await.expect("clean end").is_none());
        writer.await.expect("join").expect("writer");
    }

    /// With a `Low` window, `Low` messages stop once the marks written
    /// after them go unanswered, more urgent ones pass meanwhile, and the
    /// rest follow the peer's credit. A credit for a mark never written is
    /// refused.
    #[tokio::test]
    async fn low_messages_wait_for_credit_beyond_the_window() {
        use crate::io::queue::{LOW_MARK_EVERY, TAKE_UP_TO_BYTES};
        const FRAMES: u64 = 400;
        const LEN: usize = 4096;
        let (client, server) = tokio::io::duplex(16 << 20);
        let (q, mut rx) = out_queue(4096, 64 << 20);
        rx.window_low(2);
        for token in 0..FRAMES {
            q.try_push_at(subscribed(token, LEN), Priority::Low)
                .expect("room");
        }
        let writer = tokio::spawn(run_writer(client, rx, 1 << 20));
        let mut reader = FrameReader::new(server, FrameCodec::new(1 << 20));
        let (mut low, mut marks) = (0u64, 0u64);
        let short = std::time::Duration::from_millis(100);
        while let Ok(frame) = tokio::time::timeout(short, reader.next()).await {
            match frame.expect("frame").expect("not eof").header() {
                Header::Subscribed { token } => {
                    assert_eq!(*token, low, "in order");
                    low += 1;
                }
                Header::LowMark { mark } => {
                    marks += 1;
                    assert_eq!(*mark, marks);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // Two marks unanswered: before each, less than `LOW_MARK_EVERY`
        // and a batch since the last; after the last, less than
        // `LOW_MARK_EVERY`.
        assert_eq!(marks, 2, "marks before the window shut");
        let most = ((2 * (LOW_MARK_EVERY + TAKE_UP_TO_BYTES) + LOW_MARK_EVERY) / LEN) as u64;
        assert!(
            low < FRAMES && low <= most,
            "{low} Low frames written, at most {most}"
        );
        assert_eq!(q.grant_low(3), Err(UnknownMark(3)), "never written");
        // A more urgent frame passes the shut window.
        q.try_push_at(subscribed(FRAMES, 10), Priority::Express)
            .expect("room");
        let frame = reader.next().await.expect("frame").expect("not eof");
        assert_eq!(frame.header(), &Header::Subscribed { token: FRAMES });
        // Credit as the marks come: the rest follow, in order.
        q.grant_low(2).expect("written");
        while low < FRAMES {
            match reader
                .next()
                .await
                .expect("frame")
                .expect("not eof")
                .header()
            {
                Header::Subscribed { token } => {
                    assert_eq!(*token, low, "in order");
                    low += 1;
                }
                Header::LowMark { mark } => q.grant_low(*mark).expect("written"),
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(q);
        while let Some(frame) = reader.next().await.expect("clean end") {
            assert!(
                matches!(frame.header(), Header::LowMark { .. }),
                "only marks left"
            );
        }
        writer.await.expect("join").expect("writer");
    }

    /// The window on parts gives way for a large frame once the writer has
    /// written [`WINDOW_AFTER_SMALL_PARTS`] parts and nothing whole: the
    /// rest goes without the peer's grants. After the next small message
    /// it holds again.
    #[tokio::test]
    async fn the_part_window_gives_way_to_large_frames_alone() {
        let chunk = 16 * 1024;
        let parts = WINDOW_AFTER_SMALL_PARTS as usize;
        let (client, server) = tokio::io::duplex(16 << 20);
        let (q, mut rx) = out_queue(1024, 16 << 20);
        rx.chunk_above(chunk);
        rx.window_parts(2 * chunk);
        let writer = tokio::spawn(run_writer(client, rx, 8 << 20));
        let mut reader = FrameReader::new(server, FrameCodec::new(8 << 20));
        let (grants, grant_rx) = out_queue(1024, 1 << 20);
        reader.grant_to(grants);
        // The peer's grants reach the writer until it read as many parts
        // as it takes for the window to give way, then no more.
        let forwarded = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (grants_in, grants_out) = tokio::io::duplex(64 * 1024);
        let grant_writer = tokio::spawn(run_writer(grants_in, grant_rx, 1 << 20));
        let forward = tokio::spawn({
            let (q, forwarded) = (q.clone(), forwarded.clone());
            async move {
                let mut grants = FrameReader::new(grants_out, FrameCodec::new(1 << 20));
                while let Ok(Some(frame)) = grants.next().await {
                    if let Header::Credit { read } = frame.header() {
                        if *read <= (parts * chunk) as u64 {
                            q.grant(*read);
                            forwarded.store(*read, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        // A large frame alone: granted for its first parts, then written
        // without grants.
        q.try_push(subscribed(1, 4 * parts * chunk), Lane::Data)
            .expect("room");
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), reader.next())
            .await
            .expect("the window did not give way")
            .expect("frame")
            .expect("not eof");
        assert_eq!(frame.header(), &Header::Subscribed { token: 1 });
        assert!(forwarded.load(Ordering::Relaxed) <= (parts * chunk) as u64);
        // A small message, then a large frame again: held to the window,
        // and no grant comes any more.
        q.try_push(subscribed(2, 10), Lane::Data).expect("room");
        q.try_push(subscribed(3, 4 * parts * chunk), Lane::Data)
            .expect("room");
        let frame = reader.next().await.expect("frame").expect("not eof");
        assert_eq!(frame.header(), &Header::Subscribed { token: 2 });
        let stalled =
            tokio::time::timeout(std::time::Duration::from_millis(100), reader.next()).await;
        assert!(
            stalled.is_err(),
            "parts went past the window after a small message"
        );
        forward.abort();
        grant_writer.abort();
        writer.abort();
    }
}
