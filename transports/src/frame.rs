//! The frame codec: a u32 big-endian length, a postcard header, the raw
//! body.
//!
//! ```text
//! +-----------------+----------------------+---------------------+
//! | length (u32 BE) | header (postcard)    | body (raw bytes)    |
//! +-----------------+----------------------+---------------------+
//!                   |<------------- length bytes --------------->|
//! ```
//!
//! The header is self-delimiting, so no second length is needed. The
//! decoder checks the declared length against its limit before it reserves
//! a single byte for the frame, and hands out a large body as a slice of
//! the received buffer: no copy when decoding, none when forwarding (small
//! frames, up to [`COPY_FRAMES_UP_TO`], are copied once so they never pin a
//! shared read buffer).

use bytes::{Buf, BufMut, Bytes, BytesMut};
#[cfg(feature = "io")]
use tokio_util::codec::{Decoder, Encoder};

use crate::protocol::{AckRef, AcksRef, Header, MessageRef, ACKS_TAG, ACK_TAG, MESSAGE_TAG};
pub use crate::wire::NameCache;

/// Size of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Largest header accepted. Message headers are small (ids, names); the
/// largest legitimate header is a handshake listing every member of a large
/// cluster. Anything larger is a broken or hostile peer.
pub const MAX_HEADER_BYTES: usize = 1024 * 1024;

/// Frames up to this size are copied out of the read buffer when decoded;
/// larger ones are handed out as slices of it, never copied. A small
/// message waiting in a queue thus holds only its own bytes, not the read
/// buffer it shared with its neighbours, which keeps queue byte limits
/// honest.
pub const COPY_FRAMES_UP_TO: usize = 4 * 1024;

/// Frames up to this size are reserved in the decoder's buffer as soon as
/// their length is known; larger ones are left to the reader
/// ([`crate::io::FrameReader`] gives each a buffer of exactly its size).
pub const RESERVE_FRAMES_UP_TO: usize = 1024 * 1024;

/// The top bit of a length prefix marks a *part*: one chunk of a frame
/// whose contents (header and body) are larger than the writer's chunk
/// size (`limits.chunk_bytes`). A large frame thus never holds the
/// connection for longer than one chunk: the writer interleaves its parts
/// with other frames.
///
/// ```text
/// +----------------------------+-------+----------------+---------------+
/// | PART_BIT | len (u32 BE)    | flags | total (u32 BE) | piece         |
/// +----------------------------+-------+----------------+---------------+
///                              |  1 B  | first part only|<- the rest  ->|
/// ```
///
/// `flags` holds the lane (the low three bits, below [`PART_LANES`]),
/// [`PART_FIRST`] and [`PART_LAST`]. The first part of a frame declares
/// the frame's whole length (checked against the limit before anything is
/// reserved); its pieces, concatenated in order, are the frame's contents.
/// Parts of different frames interleave only across lanes: on one lane a
/// frame's parts come one after the other, so the reader keeps at most one
/// frame in assembly per lane.
pub const PART_BIT: u32 = 1 << 31;
/// The flag of a frame's first part, which carries the frame's length.
pub const PART_FIRST: u8 = 0x40;
/// The flag of a frame's last part.
pub const PART_LAST: u8 = 0x80;
/// The bits of a part's flags that name its lane.
pub const PART_LANE_MASK: u8 = 0x07;
/// Lanes a connection may have frames in assembly on at once: one per
/// class of the outgoing queue (control and the four priorities).
pub const PART_LANES: usize = 5;
/// Writes a part's head (see [`PART_BIT`]) to `buf`: its length prefix,
/// `flags`, and for a first part the frame's `total` length. The part's
/// `piece_len` bytes are to follow. (For hand-made parts too: a test's,
/// or an attacker's.)
pub fn put_part_head(buf: &mut impl BufMut, flags: u8, total: Option<u32>, piece_len: usize) {
    let declared = 1 + total.map_or(0, |_| LENGTH_PREFIX_BYTES) + piece_len;
    buf.put_u32(PART_BIT | declared as u32);
    buf.put_u8(flags);
    if let Some(total) = total {
        buf.put_u32(total);
    }
}

/// Largest frame length a prefix may declare (the top bit marks parts).
pub const MAX_FRAME_LEN: usize = (PART_BIT - 1) as usize;

/// Largest frame a peer may send before it has proven who it is: its
/// hello, its proof, or a refusal. A few KiB, so that unauthenticated
/// connections cost next to nothing however many there are.
pub const PRE_AUTH_MAX_FRAME_BYTES: usize = 4 * 1024;

/// Largest frame of a handshake once the peer has proven who it is (a
/// node's [`crate::protocol::Interests`], the server's welcome listing every
/// member): enough for any handshake.
pub const HANDSHAKE_MAX_FRAME_BYTES: usize = MAX_HEADER_BYTES;

/// Errors of the frame layer. Each one ends the connection it came from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The declared frame length exceeds the limit; nothing was allocated.
    #[error("frame of {declared} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The length the peer declared.
        declared: u64,
        /// The limit in force.
        max: usize,
    },
    /// A frame of length zero, which cannot hold a header.
    #[error("empty frame (length 0)")]
    Empty,
    /// The header could not be decoded.
    #[error("undecodable frame header")]
    Header(#[source] postcard::Error),
    /// The header is larger than [`MAX_HEADER_BYTES`].
    #[error("frame header of {size} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes")]
    HeaderTooLarge {
        /// Size of the header.
        size: usize,
    },
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes received of the unfinished frame.
        buffered: usize,
    },
    /// The peer started a frame and sent nothing more of it for this long
    /// (see `FrameReader::set_stall_limit`).
    #[error("the peer stalled in the middle of a frame for {0:?} ({1} bytes buffered)")]
    Stalled(std::time::Duration, usize),
    /// A part of a chunked frame (see [`PART_BIT`]) broke the rules: an
    /// unknown lane or flag, a part that continues no frame, or parts that
    /// do not add up to the length the first one declared.
    #[error("malformed chunk of a frame: {0}")]
    BadPart(&'static str),
    /// A large frame (or the first part of one) declared more bytes than
    /// the reader's memory budget has left (see
    /// `FrameReader::charge_to`); nothing was allocated.
    #[error("a frame of {declared} bytes does not fit the memory budget ({used} of {limit} bytes in use)")]
    OverBudget {
        /// The length the peer declared.
        declared: u64,
        /// Bytes of the budget in use.
        used: usize,
        /// The budget.
        limit: usize,
    },
    /// Reading or writing the socket failed.
    #[error("i/o error on the connection")]
    Io(#[from] std::io::Error),
}

/// A decoded frame: the header, and the received bytes it came in.
#[derive(Clone, Debug)]
pub struct Frame {
    header: Header,
    raw: Bytes,
    header_len: usize,
}

impl Frame {
    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Takes the header out, keeping the body.
    pub fn into_parts(self) -> (Header, Bytes) {
        let body = self.raw.slice(self.header_len..);
        (self.header, body)
    }

    /// The body, as a slice of the received buffer (no copy).
    pub fn body(&self) -> Bytes {
        self.raw.slice(self.header_len..)
    }

    /// Length of the body in bytes.
    pub fn body_len(&self) -> usize {
        self.raw.len() - self.header_len
    }

    /// Header and body exactly as received (without the length prefix), for
    /// forwarding without re-encoding.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// Decodes one frame's contents (everything after the length prefix).
    ///
    /// # Errors
    ///
    /// [`FrameError::Header`] if the header cannot be decoded,
    /// [`FrameError::Empty`] if `raw` is empty.
    pub fn decode(raw: Bytes) -> Result<Frame, FrameError> {
        if raw.is_empty() {
            return Err(FrameError::Empty);
        }
        let window = &raw[..raw.len().min(MAX_HEADER_BYTES)];
        let (header, rest) = match postcard::take_from_bytes::<Header>(window) {
            Ok(ok) => ok,
            Err(e) if window.len() == MAX_HEADER_BYTES && raw.len() > MAX_HEADER_BYTES => {
                // The header did not end within the allowed size.
                tracing::trace!(error = %e, "header does not fit the header limit");
                return Err(FrameError::HeaderTooLarge { size: raw.len() });
            }
            Err(e) => return Err(FrameError::Header(e)),
        };
        let header_len = window.len() - rest.len();
        Ok(Frame {
            header,
            raw,
            header_len,
        })
    }
}

/// Headers up to this size are encoded on the stack and copied once.
const SMALL_HEADER_BYTES: usize = 512;

/// Encodes `header` with its length prefix into `dst`, declaring a body of
/// `body_len` bytes that the caller writes right after (or sends as a
/// separate buffer in the same vectored write).
///
/// # Errors
///
/// [`FrameError::HeaderTooLarge`] or [`FrameError::TooLarge`] if the frame
/// would break the limits; `dst` is left as it was.
pub fn encode_header(
    header: &Header,
    body_len: usize,
    max_frame: usize,
    dst: &mut BytesMut,
) -> Result<(), FrameError> {
    let start = dst.len();
    dst.put_u32(0);
    // Message headers fit a small stack buffer and go in with one copy;
    // only large ones (handshakes, membership lists) are written in pieces.
    let mut small = [0u8; SMALL_HEADER_BYTES];
    match postcard::to_slice(header, &mut small) {
        Ok(encoded) => dst.extend_from_slice(encoded),
        Err(postcard::Error::SerializeBufferFull) => {
            if let Err(e) = postcard::to_io(header, (&mut *dst).writer()) {
                dst.truncate(start);
                return Err(FrameError::Header(e));
            }
        }
        Err(e) => {
            dst.truncate(start);
            return Err(FrameError::Header(e));
        }
    }
    let header_len = dst.len() - start - LENGTH_PREFIX_BYTES;
    if header_len > MAX_HEADER_BYTES {
        dst.truncate(start);
        return Err(FrameError::HeaderTooLarge { size: header_len });
    }
    let total = header_len + body_len;
    if total > max_frame || total > MAX_FRAME_LEN {
        dst.truncate(start);
        return Err(FrameError::TooLarge {
            declared: total as u64,
            max: max_frame,
        });
    }
    dst[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&(total as u32).to_be_bytes());
    Ok(())
}

/// A frame to be written: either a header and body, or bytes received
/// earlier and forwarded as they are.
#[derive(Clone, Debug)]
pub enum OutFrame {
    /// A header to encode, followed by a body.
    Parts {
        /// The header.
        header: Header,
        /// The body, possibly empty.
        body: Bytes,
    },
    /// Header and body exactly as received ([`Frame::raw`]).
    Raw(Bytes),
}

impl OutFrame {
    /// A frame with a header and no body.
    pub fn control(header: Header) -> Self {
        OutFrame::Parts {
            header,
            body: Bytes::new(),
        }
    }

    /// The number of body (or raw) bytes this frame carries.
    pub fn payload_len(&self) -> usize {
        match self {
            OutFrame::Parts { body, .. } => body.len(),
            OutFrame::Raw(raw) => raw.len(),
        }
    }
}

/// The codec. Frames above `max_frame` bytes (header plus body) are refused
/// before any allocation.
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    max_frame: usize,
    /// Whether frames up to [`COPY_FRAMES_UP_TO`] are copied out of the
    /// read buffer (see [`FrameCodec::in_place`]).
    copy_small: bool,
    /// Frames up to this size are reserved whole in the read buffer once
    /// their length arrives; 0 for a peer not yet authenticated, whose
    /// frame takes room only as its bytes arrive.
    reserve_up_to: usize,
}

impl FrameCodec {
    /// A codec refusing frames over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame: max_frame.min(MAX_FRAME_LEN),
            copy_small: true,
            reserve_up_to: RESERVE_FRAMES_UP_TO,
        }
    }

    /// The codec of a handshake: frames up to
    /// [`PRE_AUTH_MAX_FRAME_BYTES`] until the peer has proven who it is
    /// (the handshake raises it to [`HANDSHAKE_MAX_FRAME_BYTES`] then), and
    /// nothing reserved from a declared length. A peer that declares a
    /// large frame and stalls holds only the bytes it sent (and the
    /// reader's chunk), not what it announced.
    pub fn handshake() -> Self {
        FrameCodec {
            reserve_up_to: 0,
            ..FrameCodec::new(PRE_AUTH_MAX_FRAME_BYTES)
        }
    }

    /// The same codec, handing small frames out as slices of the read
    /// buffer instead of copies. For a reader that keeps nothing of a frame
    /// but what it copies itself ([`BodyArena::owned_body`]): a slice kept would pin
    /// the whole read buffer it came in.
    pub fn in_place(mut self) -> Self {
        self.copy_small = false;
        self
    }

    /// A codec for bodies of at most `max_message_bytes`, plus a header.
    pub fn for_messages(max_message_bytes: u64) -> Self {
        let max = usize::try_from(max_message_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(MAX_HEADER_BYTES)
            .min(MAX_FRAME_LEN);
        FrameCodec::new(max)
    }

    /// The frame limit in force.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the limit, as after a handshake.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame.min(MAX_FRAME_LEN);
    }
}

/// A frame's contents (everything after the length prefix) as read. A
/// small one (up to [`COPY_FRAMES_UP_TO`]) is borrowed from
/// the reader's buffer until the reader is used again: no allocation, no
/// reference count touched. A larger one is a buffer of its own, to be
/// shared as it is.
#[derive(Debug)]
pub enum RawFrame<'a> {
    /// In the read buffer.
    Borrowed(&'a [u8]),
    /// In a buffer of its own.
    Owned(Bytes),
}

impl std::ops::Deref for RawFrame<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            RawFrame::Borrowed(raw) => raw,
            RawFrame::Owned(raw) => raw,
        }
    }
}

impl RawFrame<'_> {
    /// The contents as a buffer that outlives the reader: copied if
    /// borrowed (small), shared if owned.
    pub fn to_bytes(&self) -> Bytes {
        match self {
            RawFrame::Borrowed(raw) => Bytes::copy_from_slice(raw),
            RawFrame::Owned(raw) => raw.clone(),
        }
    }
}

/// Where a reader that takes frames in place ([`FrameCodec::in_place`])
/// copies the bodies it keeps: small bodies are packed into shared chunks
/// of [`BODY_CHUNK_BYTES`], so that one allocation (and, on the thread that
/// drops the messages, one free) serves many messages, while a kept body
/// pins at most one chunk, never a whole read buffer.
#[derive(Debug, Default)]
pub struct BodyArena {
    chunk: BytesMut,
}

/// The size of a [`BodyArena`]'s chunks.
pub const BODY_CHUNK_BYTES: usize = 4 * 1024;

/// Bodies above this size get an allocation of their own in a
/// [`BodyArena`] (packing them would waste chunk space).
pub const PACKED_BODY_BYTES: usize = BODY_CHUNK_BYTES / 4;

impl BodyArena {
    /// An arena with no chunk yet.
    pub fn new() -> Self {
        BodyArena::default()
    }

    /// The body of `raw` (a frame read in place, whose header takes its
    /// first `header_len` bytes) in memory of its own: a small body is
    /// copied into the current chunk, a medium one into an allocation of
    /// its own, and a large frame, which already has a buffer of its own,
    /// is sliced.
    pub fn owned_body(&mut self, raw: &RawFrame<'_>, header_len: usize) -> Bytes {
        let body = raw.get(header_len..).unwrap_or_default();
        if let RawFrame::Owned(raw) = raw {
            if raw.len() > COPY_FRAMES_UP_TO {
                return raw.slice(header_len.min(raw.len())..);
            }
        }
        if body.len() > PACKED_BODY_BYTES {
            return Bytes::copy_from_slice(body);
        }
        if self.chunk.capacity() - self.chunk.len() < body.len() {
            // The full chunk lives on in the bodies cut from it.
            self.chunk = BytesMut::with_capacity(BODY_CHUNK_BYTES);
        }
        self.chunk.extend_from_slice(body);
        self.chunk.split().freeze()
    }
}

impl Default for FrameCodec {
    /// [`FrameCodec::handshake`].
    fn default() -> Self {
        FrameCodec::handshake()
    }
}

impl FrameCodec {
    /// Takes one whole frame's contents (everything after the length
    /// prefix) off `src`, undecoded; `None` until a whole frame is there.
    ///
    /// # Errors
    ///
    /// [`FrameError::Empty`] or [`FrameError::TooLarge`] from the length
    /// prefix alone, before anything is reserved.
    pub fn decode_raw(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        if src.len() < LENGTH_PREFIX_BYTES {
            return Ok(None);
        }
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        prefix.copy_from_slice(&src[..LENGTH_PREFIX_BYTES]);
        let len = u32::from_be_bytes(prefix) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                declared: len as u64,
                max: self.max_frame,
            });
        }
        let needed = LENGTH_PREFIX_BYTES + len;
        if src.len() < needed {
            // Within the limit: reserve the whole frame once, up to a size;
            // `FrameReader` reads larger frames into a buffer of their own.
            if len <= self.reserve_up_to {
                src.reserve(needed - src.len());
            }
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX_BYTES);
        let raw = if self.copy_small && len <= COPY_FRAMES_UP_TO {
            // A small frame gets its own allocation, so that a message kept
            // in a queue never pins the whole read buffer it arrived in.
            let raw = Bytes::copy_from_slice(&src[..len]);
            src.advance(len);
            raw
        } else {
            src.split_to(len).freeze()
        };
        Ok(Some(raw))
    }

    /// [`FrameCodec::decode_raw`] at the end of the stream: what is left
    /// must be whole frames.
    ///
    /// # Errors
    ///
    /// As [`FrameCodec::decode_raw`], and [`FrameError::Truncated`] for a
    /// partial frame.
    pub fn decode_raw_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self.decode_raw(buf)? {
            Some(raw) => Ok(Some(raw)),
            None if buf.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: buf.len(),
            }),
        }
    }
}

#[cfg(feature = "io")]
impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode_raw(src)? {
            Some(raw) => Frame::decode(raw).map(Some),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode_raw_eof(buf)? {
            Some(raw) => Frame::decode(raw).map(Some),
            None => Ok(None),
        }
    }
}

/// A received frame's header, read in place where it matters for speed:
/// messages and acknowledgements borrow their names from the frame and
/// allocate nothing; every other header is decoded whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peeked<'a> {
    /// A message header.
    Message(MessageRef<'a>),
    /// An acknowledgement.
    Ack(AckRef<'a>),
    /// Several acknowledgements.
    Acks(AcksRef<'a>),
    /// Any other header (boxed: these are rare, and a smaller `Peeked`
    /// moves without a `memcpy` on the path of every message).
    Other(Box<Header>),
}

/// Reads the header of one frame's contents (`raw`, everything after the
/// length prefix, as [`FrameCodec::decode_raw`] hands it out). Returns the
/// header and its length: the body is `raw[len..]`.
///
/// # Errors
///
/// [`FrameError::Empty`], [`FrameError::Header`] or
/// [`FrameError::HeaderTooLarge`], as [`Frame::decode`].
pub fn peek(raw: &[u8]) -> Result<(Peeked<'_>, usize), FrameError> {
    peek_with(raw, None)
}

/// [`peek`] for a connection's reader, which keeps a [`NameCache`] from
/// one frame to the next: a message header naming the same sender, target
/// and service as the one before is read without validating its names
/// again. The peeked header borrows from `raw` and from `names`.
///
/// # Errors
///
/// As [`peek`].
pub fn peek_cached<'a>(
    raw: &'a [u8],
    names: &'a mut NameCache,
) -> Result<(Peeked<'a>, usize), FrameError> {
    peek_with(raw, Some(names))
}

#[inline]
fn peek_with<'a>(
    raw: &'a [u8],
    names: Option<&'a mut NameCache>,
) -> Result<(Peeked<'a>, usize), FrameError> {
    fn take<'a, T: serde::Deserialize<'a>>(raw: &'a [u8]) -> Result<(T, usize), FrameError> {
        let window = &raw[..raw.len().min(MAX_HEADER_BYTES)];
        match postcard::take_from_bytes::<T>(&window[1..]) {
            Ok((value, rest)) => Ok((value, window.len() - rest.len())),
            Err(_) if window.len() == MAX_HEADER_BYTES && raw.len() > MAX_HEADER_BYTES => {
                Err(FrameError::HeaderTooLarge { size: raw.len() })
            }
            Err(e) => Err(FrameError::Header(e)),
        }
    }
    match raw.first() {
        None => Err(FrameError::Empty),
        Some(&MESSAGE_TAG) => {
            // The hottest header: decoded by hand, as postcard would.
            let window = &raw[..raw.len().min(MAX_HEADER_BYTES)];
            match crate::wire::decode_message_with(&window[1..], names) {
                Ok((h, n)) => Ok((Peeked::Message(h), n + 1)),
                Err(_) if window.len() == MAX_HEADER_BYTES && raw.len() > MAX_HEADER_BYTES => {
                    Err(FrameError::HeaderTooLarge { size: raw.len() })
                }
                Err(e) => Err(FrameError::Header(e)),
            }
        }
        Some(&ACK_TAG) => take::<AckRef<'_>>(raw).map(|(a, n)| (Peeked::Ack(a), n)),
        Some(&ACKS_TAG) => take::<AcksRef<'_>>(raw).map(|(a, n)| (Peeked::Acks(a), n)),
        Some(_) => {
            let window = &raw[..raw.len().min(MAX_HEADER_BYTES)];
            match postcard::take_from_bytes::<Header>(window) {
                Ok((header, rest)) => {
                    Ok((Peeked::Other(Box::new(header)), window.len() - rest.len()))
                }
                Err(_) if window.len() == MAX_HEADER_BYTES && raw.len() > MAX_HEADER_BYTES => {
                    Err(FrameError::HeaderTooLarge { size: raw.len() })
                }
                Err(e) => Err(FrameError::Header(e)),
            }
        }
    }
}

#[cfg(feature = "io")]
impl Encoder<OutFrame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: OutFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match item {
            OutFrame::Parts { header, body } => {
                encode_header(&header, body.len(), self.max_frame, dst)?;
                dst.extend_from_slice(&body);
            }
            OutFrame::Raw(raw) => {
                if raw.len() > self.max_frame {
                    return Err(FrameError::TooLarge {
                        declared: raw.len() as u64,
                        max: self.max_frame,
                    });
                }
                if raw.is_empty() {
                    return Err(FrameError::Empty);
                }
                dst.reserve(LENGTH_PREFIX_BYTES + raw.len());
                dst.put_u32(raw.len() as u32);
                dst.extend_from_slice(&raw);
            }
        }
        Ok(())
    }
}
