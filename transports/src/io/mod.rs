//! The two halves of a connection: a frame reader, and a bounded outgoing
//! queue drained by one writer task that puts many frames into each
//! syscall.
//!
//! The queue is one lock around a deque, bounded in queued frames, in data
//! frames and in payload bytes (both given back once the writer has written
//! them). A push takes the lock once and wakes the writer only if it sleeps;
//! a small frame is encoded right then into the queue's staging buffer (see
//! [`STAGE_UP_TO_BYTES`]), so the writer finds it ready to write; the
//! writer takes everything queued in one swap.
//!
//! Frames are pushed in one of two [`Lane`]s, treated differently when the
//! queue is full: data is bounded in frames and bytes, and its waiting
//! senders are served in the order they came; control frames need only a
//! frame slot (a share of the slots is kept for them) and must not be
//! lost. Five ways in:
//!
//! - [`OutQueue::try_push`] never waits: it fails with [`PushError::Full`]
//!   so that the caller can answer the sender with an error.
//! - [`OutQueue::push`] waits for room as long as its [`Wait`] allows (a
//!   node's own sends: back-pressure instead of growth).
//! - [`OutQueue::push_within`] waits a bounded time for a consumer that may
//!   be slow, and marks the queue congested when it does not keep up.
//! - [`OutQueue::try_push_message`] and [`OutQueue::try_push_raw`] stage a
//!   small message given by reference, never building its frame: the hot
//!   paths, which fall back to the others when they cannot.
//!
//! # Layout
//!
//! - `reader`: [`FrameReader`], frames read from one half of a connection.
//! - `queue`: [`OutQueue`] and its [`OutReceiver`], the bounds and who
//!   waits for room.
//! - `feed`: [`Feed`], frames kept once that many queues' writers write
//!   from where each stands (membership events).
//! - `staging`: small frames encoded into the queue's staging buffer as
//!   they are queued.
//! - `stream`: [`ReadHalf`] and [`WriteHalf`], a connection's halves over
//!   plain TCP or TLS.
//! - `writer`: [`write_queue`] and [`run_writer`], the task that drains a
//!   queue into its connection (after a prelude of frames, when given one:
//!   what a reconnected link resends).

mod feed;
mod queue;
mod reader;
mod silence;
mod staging;
mod stream;
mod writer;

pub use feed::{Feed, FEED_TAKE_BYTES, LINGER_PER_FOLLOWER, MAX_LINGER};
pub use queue::{
    out_queue, out_queue_within, Budget, Lane, OutQueue, OutReceiver, Push, PushError, QueueStats,
    UnknownMark, Wait, Wakes, WeakOutQueue, BUDGET_CHUNK_BYTES, DEFAULT_CHUNK_BYTES,
    LOW_MARK_EVERY, LOW_WINDOW_MARKS, MIN_CHUNK_BYTES,
};
pub use reader::{FrameReader, EXACT_BUFFER_FROM_BYTES, READ_CHUNK_BYTES};
pub use silence::Silence;
pub use staging::STAGE_UP_TO_BYTES;
pub use stream::{accept, split, split_tls, PeerCertificates, ReadHalf, WriteHalf};
pub use writer::{
    run_writer, write_queue, WriteEnd, COALESCE_BELOW, COALESCE_CREDIT, COALESCE_PROBE_EVERY,
    VECTORED_MIN_BYTES, WINDOW_AFTER_SMALL_PARTS,
};

/// A `Subscribed` frame numbered `token`, with a body of `len` bytes of
/// that number: the frames the queue's, staging's and writer's tests push.
#[cfg(test)]
pub(crate) fn subscribed(token: u64, len: usize) -> crate::frame::OutFrame {
    crate::frame::OutFrame::Parts {
        header: crate::protocol::Header::Subscribed { token },
        body: bytes::Bytes::from(vec![token as u8; len]),
    }
}
