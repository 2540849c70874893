//! Small frames encoded as they are queued.
//!
//! A frame with a small payload ([`STAGE_UP_TO_BYTES`]) has its length
//! prefix and header encoded into a [`Head`] on the sender's stack before
//! the queue's lock is taken ([`staging`]); under the lock the head and the
//! payload are appended to [`Staged`], the bytes staged since the queue's
//! last entry. The writer finds them ready to write: no entry per frame,
//! and the frame's header (its shared names) is built and dropped on one
//! thread. Any other frame is an entry of its own, encoded by the writer.

use bytes::{Bytes, BytesMut};

use crate::frame::{OutFrame, LENGTH_PREFIX_BYTES};
use crate::protocol::{Header, MessageRef};

/// Frames with a payload up to this size are encoded into the queue's
/// staging buffer as they are queued (under its lock, on the sender's
/// thread), so that the writer finds them ready to write: no entry per
/// frame, and the frame's header (its shared names) is built and dropped
/// on one thread. The same bound as [`crate::frame::COPY_FRAMES_UP_TO`]: a
/// frame read in place ([`crate::frame::FrameCodec::in_place`]) and queued
/// is copied, so it never pins the read buffer it came in.
pub const STAGE_UP_TO_BYTES: usize = crate::frame::COPY_FRAMES_UP_TO;

/// The staging buffer grows in chunks of this size: a frame that does not
/// fit the room left starts a new chunk (the full one is queued as it is),
/// so staged bytes are never copied again and an idle connection keeps at
/// most one chunk.
const STAGING_CHUNK_BYTES: usize = 64 * 1024;

/// The most bytes a staged frame's length prefix and header take; a frame
/// with a larger header is queued as it is and encoded by the writer.
const STAGED_HEAD_BYTES: usize = 256;

/// A staged frame's length prefix and encoded header.
pub(super) struct Head {
    buf: [u8; STAGED_HEAD_BYTES],
    len: usize,
}

impl Head {
    /// Room for the length prefix, nothing else yet.
    pub(super) fn new() -> Self {
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
    pub(super) fn append_message(&mut self, header: &MessageRef<'_>) -> Option<usize> {
        let encoded = crate::wire::encode_message(header, &mut self.buf[self.len..])?;
        self.len += encoded;
        Some(encoded)
    }

    /// Writes the length prefix: `total` bytes follow it.
    pub(super) fn set_length(&mut self, total: usize) {
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
pub(super) enum Staging {
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
pub(super) fn staging(frame: &OutFrame, max_frame: usize) -> Staging {
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

/// The frames staged since the queue's last entry, in order after it, and
/// what they hold until written.
#[derive(Debug, Default)]
pub(super) struct Staged {
    buf: BytesMut,
    /// Payload bytes the staged frames hold.
    permits: usize,
    /// Data slots the staged frames hold.
    data: usize,
    /// Frames staged.
    frames: usize,
}

/// Staged frames closed into one piece, to be queued as one entry.
#[derive(Debug)]
pub(super) struct Chunk {
    /// Whole frames, ready to write.
    pub(super) bytes: Bytes,
    /// Payload bytes they hold.
    pub(super) permits: usize,
    /// Data slots they hold.
    pub(super) data: usize,
    /// Frames in it.
    pub(super) frames: usize,
}

impl Staged {
    /// Makes room for a frame (`head`, then `payload`): if the current
    /// chunk lacks it, closes the chunk and hands it back (the caller
    /// queues it before what is staged next) and starts a new one.
    pub(super) fn make_room(&mut self, head: &Head, payload: &[u8]) -> Option<Chunk> {
        let need = head.len + payload.len();
        if self.buf.capacity() - self.buf.len() >= need {
            return None;
        }
        let full = self.seal();
        // Empty now: a new chunk, or the old one taken back if what was cut
        // from it is written already.
        self.buf.reserve(STAGING_CHUNK_BYTES.max(need));
        full
    }

    /// Appends a frame (`head`, then `payload`) holding `permits` payload
    /// bytes and `data` data slots, after [`Staged::make_room`].
    pub(super) fn append(&mut self, head: &Head, payload: &[u8], permits: usize, data: usize) {
        self.buf.extend_from_slice(head.bytes());
        self.buf.extend_from_slice(payload);
        self.permits += permits;
        self.data += data;
        self.frames += 1;
    }

    /// Closes the staged frames into one chunk, so that what is queued next
    /// goes after them; `None` if nothing is staged.
    pub(super) fn seal(&mut self) -> Option<Chunk> {
        if self.buf.is_empty() {
            return None;
        }
        Some(Chunk {
            bytes: self.buf.split().freeze(),
            permits: std::mem::take(&mut self.permits),
            data: std::mem::take(&mut self.data),
            frames: std::mem::take(&mut self.frames),
        })
    }

    /// Forgets what is staged, with what it held; the bytes are handed
    /// back to be dropped once the lock is released.
    pub(super) fn discard(&mut self) -> BytesMut {
        self.permits = 0;
        self.data = 0;
        self.frames = 0;
        std::mem::take(&mut self.buf)
    }

    /// The staging buffer's capacity, to check that it stays within a
    /// chunk or two.
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// What is staged and not yet sealed, without sealing it.
    #[cfg(test)]
    pub(super) fn peek(&self) -> (&[u8], usize, usize) {
        (&self.buf, self.permits, self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_header, Frame, FrameCodec};

    use crate::io::subscribed;

    /// What staging decides for each kind of frame; a staged head is
    /// exactly the writer's encoding of the prefix and header.
    #[test]
    fn which_frames_are_staged() {
        enum Want {
            Head,
            Item,
            Invalid,
        }
        let goodbye = OutFrame::Parts {
            header: Header::Goodbye,
            body: Bytes::from_static(b"x"),
        };
        let cases = [
            ("small", subscribed(1, 10), 1 << 20, Want::Head),
            (
                "at the bound",
                subscribed(1, STAGE_UP_TO_BYTES),
                1 << 20,
                Want::Head,
            ),
            (
                "large",
                subscribed(1, STAGE_UP_TO_BYTES + 1),
                1 << 20,
                Want::Item,
            ),
            ("goodbye", goodbye, 1 << 20, Want::Item),
            ("over the limit", subscribed(1, 100), 50, Want::Invalid),
            (
                "small raw",
                OutFrame::Raw(Bytes::from_static(b"\x09raw")),
                1 << 20,
                Want::Head,
            ),
            (
                "empty raw",
                OutFrame::Raw(Bytes::new()),
                1 << 20,
                Want::Invalid,
            ),
            (
                "raw over the limit",
                OutFrame::Raw(Bytes::from(vec![0u8; 10])),
                9,
                Want::Invalid,
            ),
            (
                "large raw",
                OutFrame::Raw(Bytes::from(vec![0u8; STAGE_UP_TO_BYTES + 1])),
                1 << 20,
                Want::Item,
            ),
        ];
        for (name, frame, max_frame, want) in cases {
            match (staging(&frame, max_frame), want) {
                (Staging::Head(head), Want::Head) => {
                    let mut expected = bytes::BytesMut::new();
                    let payload = match &frame {
                        OutFrame::Parts { header, body } => {
                            encode_header(header, body.len(), max_frame, &mut expected)
                                .expect("encodes");
                            body.clone()
                        }
                        OutFrame::Raw(raw) => {
                            expected.extend_from_slice(&(raw.len() as u32).to_be_bytes());
                            raw.clone()
                        }
                    };
                    let mut staged = head.bytes().to_vec();
                    staged.extend_from_slice(&payload);
                    expected.extend_from_slice(&payload);
                    assert_eq!(staged, &expected[..], "{name}");
                }
                (Staging::Item, Want::Item) | (Staging::Invalid, Want::Invalid) => {}
                _ => panic!("{name}: staged the wrong way"),
            }
        }
    }

    /// A burst is staged in chunks handed back one after the other, whole
    /// frames in order with what they hold; the buffer never grows past a
    /// chunk or two.
    #[test]
    fn staging_grows_in_chunks() {
        let mut staged = Staged::default();
        let mut chunks = Vec::new();
        for token in 0..256 {
            let frame = subscribed(token, 4000);
            let Staging::Head(head) = staging(&frame, 1 << 20) else {
                panic!("staged");
            };
            let OutFrame::Parts { body, .. } = &frame else {
                panic!("parts");
            };
            chunks.extend(staged.make_room(&head, body));
            staged.append(&head, body, body.len(), 1);
            assert!(staged.capacity() <= 2 * STAGING_CHUNK_BYTES);
        }
        assert!(chunks.len() > 10, "full chunks handed back");
        chunks.extend(staged.seal());
        assert!(staged.seal().is_none(), "nothing left");
        assert_eq!(chunks.iter().map(|c| c.permits).sum::<usize>(), 256 * 4000);
        assert_eq!(chunks.iter().map(|c| c.data).sum::<usize>(), 256);
        let mut tokens = Vec::new();
        for chunk in &chunks {
            let mut src = BytesMut::from(&chunk.bytes[..]);
            let mut codec = FrameCodec::new(1 << 20);
            while let Some(raw) = codec.decode_raw(&mut src).expect("decodes") {
                match Frame::decode(raw).expect("frame").header() {
                    Header::Subscribed { token } => tokens.push(*token),
                    other => panic!("unexpected frame {other:?}"),
                }
            }
            assert!(src.is_empty(), "whole frames in each chunk");
        }
        assert_eq!(tokens, (0..256).collect::<Vec<_>>());
    }
}
