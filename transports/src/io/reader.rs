//! The frame reader: one half of a connection, read frame by frame.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::queue::{Budget, Lane, OutQueue, PushError, Wait};
use crate::frame::OutFrame;
use crate::protocol::Header;

use crate::frame::{
    Frame, FrameCodec, FrameError, RawFrame, LENGTH_PREFIX_BYTES, PART_BIT, PART_FIRST, PART_LANES,
    PART_LANE_MASK, PART_LAST,
};

/// Bytes requested from the socket per read when the buffer runs low, at
/// most, by default (the message server's connections); a node reads more
/// at once (`node.read_chunk_bytes`, see [`FrameReader::with_read_chunk`]).
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// The least a reader asks the socket for per read, and the buffer it
/// starts with. The read size doubles, up to the reader's read chunk, each
/// time a read fills the room it was given, and halves after
/// [`SMALL_READS_BEFORE_SHRINK`] reads in a row that take under an eighth
/// of it: a connection that carries little (most of a message server's
/// thousands) keeps a buffer of this size, not of the read chunk.
pub const MIN_READ_BYTES: usize = 4 * 1024;

/// Reads in a row that take under an eighth of the read size before it
/// halves (see [`MIN_READ_BYTES`]).
pub const SMALL_READS_BEFORE_SHRINK: u32 = 64;

/// Reads frames from one half of a connection.
///
/// Small frames are decoded from one shared read buffer. A frame larger
/// than [`EXACT_BUFFER_FROM_BYTES`] is read into a buffer of exactly its
/// size, allocated once: its body is never copied or reallocated on the way
/// in, and never shares an allocation with other frames.
///
/// A frame sent in parts (see [`crate::frame::PART_BIT`]) is put together
/// the same way: its first part declares its length, which is checked
/// against the limit and then allocated once, and each part is read into
/// it. The frame comes out whole when its last part is in; frames of other
/// lanes may come out meanwhile. At most [`PART_LANES`] frames are in
/// assembly at once, each within the limit.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    codec: FrameCodec,
    /// A large frame or a part being read into its buffer.
    large: Option<Large>,
    /// Per lane, the frame being put together from parts, with its
    /// declared length.
    parts: [Option<(BytesMut, usize)>; PART_LANES],
    /// Where to say how much of the parts was read (see
    /// [`FrameReader::grant_to`]).
    grants: Option<OutQueue>,
    /// Bytes of parts read so far, and whether the peer is yet to hear.
    parts_read: u64,
    grant_due: bool,
    /// Whether the last thing read was a part (see `next_raw`).
    after_part: bool,
    /// Bytes at the front of `buf` still lent out by the last
    /// [`FrameReader::try_next_frame`]; dropped at the next call.
    lent: usize,
    /// Bytes requested from the socket per read when the buffer runs low,
    /// at most.
    read_chunk: usize,
    /// Bytes requested now: from [`MIN_READ_BYTES`] to `read_chunk`, as
    /// reads fill what they are given or not (see [`FrameReader::adapt`]).
    want: usize,
    /// Reads in a row that took under an eighth of `want`.
    small_reads: u32,
    /// How long a frame once started may go without a byte more.
    stall_limit: Option<Duration>,
    /// What the buffers of large frames and frames in parts draw on (see
    /// [`FrameReader::charge_to`]).
    charge: Charge,
}

/// The memory a reader holds for frames larger than its shared buffer,
/// charged to a budget while it holds it, and given back when the frame is
/// handed out or the reader dropped.
///
/// A reader that holds nothing may always take one frame past the budget
/// (an overdraft, not charged), as a reader did before frames came in
/// parts: a busy server slows a node that sends one large frame at a
/// time, never cuts it off. Only a second frame at once must fit.
#[derive(Debug, Default)]
struct Charge {
    budget: Option<Arc<Budget>>,
    /// Bytes taken from `budget` and not given back.
    held: usize,
    /// The length of the frame taken past the budget, 0 if none.
    overdraft: usize,
}

impl Charge {
    /// Takes `len` bytes for a frame's buffer, if there is a budget.
    fn take(&mut self, len: usize) -> Result<(), FrameError> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        if budget.try_take(len) {
            self.held += len;
            return Ok(());
        }
        if self.held == 0 && self.overdraft == 0 {
            self.overdraft = len;
            return Ok(());
        }
        Err(FrameError::OverBudget {
            declared: len as u64,
            used: budget.used(),
            limit: budget.limit(),
        })
    }

    /// Gives back what was taken for a frame of `len` bytes now handed
    /// out. (Frames of one length are interchangeable here: whichever
    /// ends first settles the overdraft, and the budget gets back what
    /// was taken from it.)
    fn give(&mut self, len: usize) {
        if self.overdraft > 0 && self.overdraft == len {
            self.overdraft = 0;
            return;
        }
        if let Some(budget) = &self.budget {
            let len = len.min(self.held);
            budget.give(len);
            self.held -= len;
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.give(self.held);
        }
    }
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

/// Bytes read straight into a buffer of their own: a large frame, or one
/// part of a frame sent in parts.
#[derive(Debug)]
struct Large {
    buf: BytesMut,
    /// The length `buf` has once this frame or part is in.
    until: usize,
    /// The bytes of the part (the frame's, for a whole frame).
    piece: usize,
    /// For a part: its lane, whether it is the last, and the length the
    /// frame declared.
    part: Option<(usize, bool, usize)>,
}

/// A part's length prefix, flags and (for a first part) the frame's
/// length.
const PART_HEAD_BYTES: usize = 2 * LENGTH_PREFIX_BYTES + 1;

/// Whether a length prefix marks a part.
fn is_part(prefix: usize) -> bool {
    prefix & PART_BIT as usize != 0
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with the given codec, reading [`READ_CHUNK_BYTES`] at a
    /// time.
    pub fn new(io: R, codec: FrameCodec) -> Self {
        FrameReader::with_read_chunk(io, codec, READ_CHUNK_BYTES)
    }

    /// A reader with the given codec that asks the socket for up to
    /// `read_chunk` bytes per read (at least [`MIN_READ_BYTES`]): larger
    /// reads take more of a backlog per system call, at the cost of a
    /// buffer that size while the backlog lasts. It starts with reads of
    /// [`MIN_READ_BYTES`] and grows them as reads fill them.
    pub fn with_read_chunk(io: R, codec: FrameCodec, read_chunk: usize) -> Self {
        let read_chunk = read_chunk.max(MIN_READ_BYTES);
        FrameReader {
            io,
            buf: BytesMut::with_capacity(MIN_READ_BYTES),
            want: MIN_READ_BYTES,
            small_reads: 0,
            codec,
            large: None,
            parts: Default::default(),
            grants: None,
            parts_read: 0,
            grant_due: false,
            after_part: false,
            lent: 0,
            read_chunk,
            stall_limit: None,
            charge: Charge::default(),
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

    /// Charges the buffers of large frames, and of frames in parts, to
    /// `budget` from when their length is declared until they are handed
    /// out (or the reader is dropped). A reader that holds no other frame
    /// may take one past the budget; a second frame at once that does not
    /// fit ends the connection with [`FrameError::OverBudget`] before
    /// anything is allocated. So a peer that declares frames it does not
    /// finish holds no more than the budget and one frame.
    pub fn charge_to(&mut self, budget: Arc<Budget>) {
        self.charge.budget = Some(budget);
    }

    /// Tells the peer's writer, through `queue` (this connection's
    /// outgoing queue), how much of its parts this reader has read: a
    /// [`Header::Credit`] for each part read, whatever the writer's chunk
    /// size. A writer with a window
    /// ([`crate::io::OutReceiver::window_parts`]) needs them to go on.
    pub fn grant_to(&mut self, queue: OutQueue) {
        self.grants = Some(queue);
    }

    /// Grants what was read of the parts so far, if a grant is due: at
    /// once if the control class has a slot, else waiting for one (the
    /// writer at the other end may wait for nothing else).
    async fn grant(&mut self) {
        if !std::mem::take(&mut self.grant_due) {
            return;
        }
        let Some(queue) = &self.grants else {
            return;
        };
        let credit = OutFrame::control(Header::Credit {
            read: self.parts_read,
        });
        if let Err(PushError::Full(credit)) = queue.try_push(credit, Lane::Control) {
            let _ = queue.push(*credit, Lane::Control, Wait::Forever).await;
        }
    }

    /// Bytes of a large frame not yet whole; 0 if the frame at the front
    /// is small (or not started).
    fn partial_bytes(&self) -> usize {
        match &self.large {
            Some(large) => LENGTH_PREFIX_BYTES + large.buf.len(),
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
        if self.large.is_some() || self.prefix().is_some_and(is_part) {
            // Parts are put together by `next_raw`.
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
            let room = self.make_room();
            let partial = self.partial_bytes();
            let read = self.io.read_buf(&mut self.buf);
            let read = within(self.stall_limit, partial, read).await?;
            self.adapt(read, room);
            if read == 0 {
                return Ok(self
                    .codec
                    .decode_raw_eof(&mut self.buf)?
                    .map(RawFrame::Owned));
            }
        }
    }

    /// Makes room for the next read, of the current read size: a fresh
    /// buffer of that size when nothing is buffered (so one grown for a
    /// burst is let go once the burst is over), else more of the one in
    /// use. The room there is now.
    fn make_room(&mut self) -> usize {
        let idle = self.buf.is_empty() && self.lent == 0;
        if self.buf.capacity() - self.buf.len() < self.want / 4
            || (idle && self.buf.capacity() > 4 * self.want)
        {
            if idle {
                self.buf = BytesMut::with_capacity(self.want);
            } else {
                self.buf.reserve(self.want);
            }
        }
        self.buf.capacity() - self.buf.len()
    }

    /// Adapts the read size to a read that took `read` bytes of the `room`
    /// it was given (see [`MIN_READ_BYTES`]).
    fn adapt(&mut self, read: usize, room: usize) {
        if read >= room {
            self.want = (self.want * 2).min(self.read_chunk);
            self.small_reads = 0;
        } else if read < self.want / 8 && self.want > MIN_READ_BYTES {
            self.small_reads += 1;
            if self.small_reads >= SMALL_READS_BEFORE_SHRINK {
                self.want = (self.want / 2).max(MIN_READ_BYTES);
                self.small_reads = 0;
            }
        } else {
            self.small_reads = 0;
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
    /// is one (not a part).
    fn buffered_len(&self) -> Option<usize> {
        let len = self.prefix().filter(|len| !is_part(*len))?;
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
            if let Some(large) = &mut self.large {
                let missing = large.until - large.buf.len();
                if missing == 0 {
                    let whole = self.finish_large()?;
                    self.grant().await;
                    if let Some(whole) = whole {
                        return Ok(Some(whole));
                    }
                    continue;
                }
                let partial = LENGTH_PREFIX_BYTES + large.buf.len();
                let mut rest = (&mut large.buf).limit(missing);
                let read = self.io.read_buf(&mut rest);
                if within(self.stall_limit, partial, read).await? == 0 {
                    return Err(FrameError::Truncated { buffered: partial });
                }
                continue;
            }
            if self.prefix().is_some_and(is_part) {
                if self.start_part()? {
                    continue;
                }
            } else if let Some(raw) = self.codec.decode_raw(&mut self.buf)? {
                return Ok(Some(raw));
            }
            // The codec checked the declared length against the limit.
            if self.buf.len() >= LENGTH_PREFIX_BYTES {
                let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
                prefix.copy_from_slice(&self.buf[..LENGTH_PREFIX_BYTES]);
                let len = u32::from_be_bytes(prefix) as usize;
                if len > EXACT_BUFFER_FROM_BYTES && !is_part(len) {
                    self.charge.take(len)?;
                    bytes::Buf::advance(&mut self.buf, LENGTH_PREFIX_BYTES);
                    let big = BytesMut::with_capacity(len);
                    self.read_into(big, len, None);
                    continue;
                }
            }
            let room = self.make_room();
            let partial = self.partial_bytes();
            // After a part, another part likely follows: its header alone
            // is read into the shared buffer, and its piece then straight
            // into its frame's, not copied there from the shared one.
            let wanted = if self.after_part && self.buf.is_empty() {
                PART_HEAD_BYTES
            } else {
                usize::MAX
            };
            let mut limited = (&mut self.buf).limit(wanted);
            let read = self.io.read_buf(&mut limited);
            let read = within(self.stall_limit, partial, read).await?;
            if wanted == usize::MAX {
                self.adapt(read, room);
            }
            if self.prefix().is_some_and(|p| !is_part(p)) {
                self.after_part = false;
            }
            if read == 0 {
                let assembling: usize = self.parts.iter().flatten().map(|(b, _)| b.len()).sum();
                if assembling > 0 || self.prefix().is_some_and(is_part) {
                    return Err(FrameError::Truncated {
                        buffered: assembling + self.buf.len(),
                    });
                }
                return self.codec.decode_raw_eof(&mut self.buf);
            }
        }
    }

    /// Moves what is buffered of the next `len` bytes into `buf`, and
    /// reads the rest straight into it.
    fn read_into(&mut self, mut buf: BytesMut, len: usize, part: Option<(usize, bool, usize)>) {
        let until = buf.len() + len;
        let have = self.buf.len().min(len);
        buf.extend_from_slice(&self.buf[..have]);
        bytes::Buf::advance(&mut self.buf, have);
        self.large = Some(Large {
            buf,
            until,
            piece: len,
            part,
        });
    }

    /// A large frame or a part is in: the frame, if it is whole now.
    fn finish_large(&mut self) -> Result<Option<Bytes>, FrameError> {
        let Some(Large {
            buf, part, piece, ..
        }) = self.large.take()
        else {
            return Ok(None);
        };
        self.after_part = part.is_some();
        if part.is_some() {
            self.parts_read += piece as u64;
            self.grant_due = self.grants.is_some();
        }
        match part {
            None => {
                self.charge.give(buf.len());
                Ok(Some(buf.freeze()))
            }
            Some((_, true, total)) if buf.len() != total => Err(FrameError::BadPart(
                "the last part ends before the length the first declared",
            )),
            Some((_, true, total)) => {
                self.charge.give(total);
                Ok(Some(buf.freeze()))
            }
            Some((lane, false, total)) => {
                self.parts[lane] = Some((buf, total));
                Ok(None)
            }
        }
    }

    /// Starts reading the part at the front of the buffer into its lane's
    /// frame: `false` if its flags (and the length a first part declares)
    /// are not buffered yet.
    fn start_part(&mut self) -> Result<bool, FrameError> {
        let Some(prefix) = self.prefix() else {
            return Ok(false);
        };
        let declared = prefix & !(PART_BIT as usize);
        if declared > self.codec.max_frame() {
            return Err(FrameError::TooLarge {
                declared: declared as u64,
                max: self.codec.max_frame(),
            });
        }
        let Some(&flags) = self.buf.get(LENGTH_PREFIX_BYTES) else {
            return Ok(false);
        };
        let lane = usize::from(flags & PART_LANE_MASK);
        if flags & !(PART_LANE_MASK | PART_FIRST | PART_LAST) != 0 || lane >= PART_LANES {
            return Err(FrameError::BadPart("unknown flags or lane"));
        }
        let first = flags & PART_FIRST != 0;
        let head = 1 + if first { LENGTH_PREFIX_BYTES } else { 0 };
        let piece = declared
            .checked_sub(head)
            .ok_or(FrameError::BadPart("a part shorter than its own flags"))?;
        if self.buf.len() < LENGTH_PREFIX_BYTES + head {
            return Ok(false);
        }
        let (buf, total) = if first {
            if self.parts[lane].is_some() {
                return Err(FrameError::BadPart(
                    "a frame began on a lane before the last one on it ended",
                ));
            }
            let mut total = [0u8; LENGTH_PREFIX_BYTES];
            total.copy_from_slice(&self.buf[LENGTH_PREFIX_BYTES + 1..][..LENGTH_PREFIX_BYTES]);
            let total = u32::from_be_bytes(total) as usize;
            if total == 0 {
                return Err(FrameError::Empty);
            }
            if total > self.codec.max_frame() {
                return Err(FrameError::TooLarge {
                    declared: total as u64,
                    max: self.codec.max_frame(),
                });
            }
            self.charge.take(total)?;
            (BytesMut::with_capacity(total), total)
        } else {
            self.parts[lane]
                .take()
                .ok_or(FrameError::BadPart("a part continues no frame"))?
        };
        if buf.len() + piece > total {
            return Err(FrameError::BadPart(
                "parts add up to more than the length the first declared",
            ));
        }
        bytes::Buf::advance(&mut self.buf, LENGTH_PREFIX_BYTES + head);
        // The writer counts a first part's flags and length field as
        // this does: not at all.
        self.read_into(buf, piece, Some((lane, flags & PART_LAST != 0, total)));
        Ok(true)
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

    /// A reader's frames draw on its budget: one frame past it is allowed
    /// while nothing else is held, a second is refused, and everything is
    /// given back as frames end and when the reader goes.
    #[test]
    fn frames_draw_on_the_budget_with_one_overdraft() {
        let budget = Budget::new(100);
        let mut charge = Charge {
            budget: Some(budget.clone()),
            ..Charge::default()
        };
        charge.take(60).expect("fits");
        assert!(
            matches!(
                charge.take(60),
                Err(FrameError::OverBudget {
                    declared: 60,
                    used: 60,
                    limit: 100
                })
            ),
            "a second frame past the budget"
        );
        charge.give(60);
        assert_eq!(budget.used(), 0);
        charge
            .take(500)
            .expect("alone, one frame may go past the budget");
        assert_eq!(budget.used(), 0, "an overdraft is not charged");
        assert!(charge.take(1).is_ok(), "what fits still fits");
        assert!(charge.take(100).is_err(), "no second overdraft");
        charge.give(500);
        charge.give(1);
        charge.take(500).expect("the overdraft was settled");
        drop(charge);
        assert_eq!(budget.used(), 0, "given back when the reader goes");
    }

    /// A reader starts small and stays small while frames come one at a
    /// time; a backlog that fills its reads grows them (doubling, up to its
    /// read chunk); many small reads in a row shrink them again, and the
    /// buffer grown for the backlog is let go.
    #[tokio::test]
    async fn the_read_size_follows_the_traffic() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::with_read_chunk(server, FrameCodec::new(1 << 20), 64 * 1024);
        assert_eq!(reader.want, MIN_READ_BYTES);
        let frame = |token: u64| {
            let mut wire = BytesMut::new();
            encode_header(&Header::Subscribed { token }, 0, 1 << 20, &mut wire).expect("encodes");
            wire
        };
        // One frame per read.
        for token in 0..10 {
            client.write_all(&frame(token)).await.expect("written");
            let got = reader.next().await.expect("read").expect("frame");
            assert_eq!(got.header(), &Header::Subscribed { token });
        }
        assert_eq!(reader.want, MIN_READ_BYTES);
        assert!(reader.buf.capacity() <= 2 * MIN_READ_BYTES);
        // A backlog: 512 KiB of small frames written before any is read.
        let mut backlog = BytesMut::new();
        let mut count = 0u64;
        while backlog.len() < 512 * 1024 {
            backlog.extend_from_slice(&frame(count));
            count += 1;
        }
        client.write_all(&backlog).await.expect("written");
        for token in 0..count {
            let got = reader.next().await.expect("read").expect("frame");
            assert_eq!(got.header(), &Header::Subscribed { token });
        }
        assert_eq!(reader.want, 64 * 1024, "reads grew to the read chunk");
        // Quiet again: one small frame per read.
        for token in 0..u64::from(SMALL_READS_BEFORE_SHRINK) * 8 {
            client.write_all(&frame(token)).await.expect("written");
            reader.next().await.expect("read").expect("frame");
        }
        assert_eq!(reader.want, MIN_READ_BYTES, "shrunk back");
        assert!(
            reader.buf.capacity() <= 2 * MIN_READ_BYTES,
            "the large buffer is let go"
        );
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

    #[tokio::test]
    async fn large_frames_get_exact_buffers_between_small_ones() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (q, mut rx) = out_queue(64, 64 << 20);
        // Whole frames: the exact buffers are what this test is about.
        rx.chunk_above(64 << 20);
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
