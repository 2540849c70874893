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
//!
//! # Layout
//!
//! - `reader`: [`FrameReader`], frames read from one half of a connection.
//! - `queue`: [`OutQueue`] and its [`OutReceiver`], the bounds and who
//!   waits for room.
//! - `staging`: small frames encoded into the queue's staging buffer as
//!   they are queued.
//! - `writer`: [`write_queue`] and [`run_writer`], the task that drains a
//!   queue into its connection.

mod queue;
mod reader;
mod staging;
mod writer;

pub use queue::{out_queue, OutQueue, OutReceiver, PushError, Wakes, WeakOutQueue};
pub use reader::{FrameReader, EXACT_BUFFER_FROM_BYTES, READ_CHUNK_BYTES};
pub use staging::STAGE_UP_TO_BYTES;
pub use writer::{
    run_writer, write_queue, WriteEnd, COALESCE_BELOW, COALESCE_CREDIT, COALESCE_PROBE_EVERY,
    VECTORED_MIN_BYTES,
};
