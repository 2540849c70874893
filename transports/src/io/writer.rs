//! The writer task: drains an outgoing queue into its connection, many
//! frames per system call.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::queue::{OutItem, OutReceiver, Queued, WrittenCounter, CLASSES, CONTROL};
use super::READ_CHUNK_BYTES;
use crate::frame::{encode_header, FrameError, OutFrame, LENGTH_PREFIX_BYTES};
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
    // Coalescing (see `OutReceiver::coalesce_small_batches`): waits left
    // that may gather nothing, and small batches seen.
    let mut credit = COALESCE_CREDIT;
    let mut small_batches = 0u32;
    // A goodbye taken, and the messages queued before it that are still to
    // be written (entries per class, see `OutReceiver::mark`).
    let mut goodbye: Option<(Queued, [usize; CLASSES])> = None;
    loop {
        let frames = match goodbye.as_mut() {
            Some((_, left)) => match rx.take_before(left, &mut batch) {
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
        if rx.coalesces() && frames < COALESCE_BELOW && goodbye.is_none() {
            small_batches = small_batches.wrapping_add(1);
            // Only while waiting pays off: a lone request/reply pair gains
            // nothing from it but latency.
            if credit > 0 || small_batches % COALESCE_PROBE_EVERY == 0 {
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
            out.add(item.what);
        }
        let end = out.write(io, &closed, &written).await;
        drop(release);
        if let Some(end) = end? {
            return Ok(end);
        }
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
    use crate::io::{out_queue, FrameReader, Lane, Wait};

    use crate::io::subscribed;

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
}
