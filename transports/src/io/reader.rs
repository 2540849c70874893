//! The frame reader: one half of a connection, read frame by frame.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::frame::{Frame, FrameCodec, FrameError, RawFrame, LENGTH_PREFIX_BYTES};

/// Bytes requested from the socket per read when the buffer runs low, by
/// default (the message server's connections); a node reads more at once
/// (`node.read_chunk_bytes`, see [`FrameReader::with_read_chunk`]).
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

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
    /// How long a frame once started may go without a byte more.
    stall_limit: Option<Duration>,
}

/// A read, bounded by `limit` when `partial` bytes of a frame wait for
/// more (no bound between frames, or without a limit).
async fn within(
    limit: Option<Duration>,
    partial: usize,
    read: impl std::future::Future<Output = std::io::Result<usize>>,
) -> Result<usize, FrameError> {
    match limit {
        Some(limit) if partial > 0 => match tokio::time::timeout(limit, read).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(FrameError::Stalled(limit, partial)),
        },
        _ => Ok(read.await?),
    }
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
            stall_limit: None,
        }
    }

    /// Cuts off a peer that starts a frame of more than
    /// [`crate::frame::COPY_FRAMES_UP_TO`] bytes and then sends nothing more
    /// of it for `limit`: the read fails with [`FrameError::Stalled`].
    /// Between frames a peer may stay silent as long as it likes (its
    /// liveness is the heartbeats' business); a large frame sent slowly but
    /// steadily is never cut, since each byte that arrives restarts the
    /// wait. Small frames are not watched (a stalled one holds at most a
    /// few KiB), so the usual read, a batch of small frames split at the
    /// buffer's end, arms no timer.
    pub fn set_stall_limit(&mut self, limit: Duration) {
        self.stall_limit = Some(limit);
    }

    /// Bytes of a large frame not yet whole; 0 if the frame at the front
    /// is small (or not started).
    fn partial_bytes(&self) -> usize {
        match &self.large {
            Some((big, _)) => LENGTH_PREFIX_BYTES + big.len(),
            None => match self.prefix() {
                Some(len) if len > crate::frame::COPY_FRAMES_UP_TO => self.buf.len() - self.lent,
                _ => 0,
            },
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
            let partial = self.partial_bytes();
            let read = self.io.read_buf(&mut self.buf);
            if within(self.stall_limit, partial, read).await? == 0 {
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
                let partial = LENGTH_PREFIX_BYTES + big.len();
                let mut rest = (&mut *big).limit(missing);
                let read = self.io.read_buf(&mut rest);
                if within(self.stall_limit, partial, read).await? == 0 {
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
            let partial = self.partial_bytes();
            let read = self.io.read_buf(&mut self.buf);
            if within(self.stall_limit, partial, read).await? == 0 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_header, OutFrame};
    use crate::io::{out_queue, run_writer, Lane, Wait};
    use crate::protocol::Header;

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
                q.push(
                    OutFrame::Parts {
                        header: Header::Subscribed { token: i as u64 },
                        body,
                    },
                    Lane::Data,
                    Wait::Forever,
                )
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
}
