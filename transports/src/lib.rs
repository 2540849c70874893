//! Wire format and connections of clustercomm.
//!
//! Everything that crosses a socket is defined here: the frame codec, the
//! headers, the handshake, the bounded outgoing queue and its writer task,
//! and TCP tuning. The configuration every process reads is the
//! `cluster-config` crate's, which builds on this one.
//!
//! # Layout
//!
//! - [`protocol`]: the frame headers (`Hello`, `Message`, `Ack`, ...), node
//!   ids and targets.
//! - [`frame`]: the codec (length prefix, postcard header, raw body).
//! - [`io`]: the frame reader and the outgoing queue with its writer task.
//! - [`handshake`]: opening a connection, refusing a bad one.
//! - [`auth`]: the cluster secret's MACs and the session keys.
//! - [`tcp`]: listening and connecting with socket options applied.
//! - [`tls`]: mutual TLS with certificates that name node ids.
//! - [`heartbeat`]: the UDP heartbeat datagrams.

#[cfg(feature = "io")]
pub mod auth;
pub mod frame;
#[cfg(feature = "io")]
pub mod handshake;
pub mod heartbeat;
#[cfg(feature = "io")]
pub mod io;
pub mod protocol;
pub mod tcp;
#[cfg(feature = "io")]
pub mod tls;
mod wire;

pub use frame::{Frame, FrameCodec, FrameError, OutFrame};
#[cfg(feature = "io")]
pub use handshake::HandshakeError;
#[cfg(feature = "io")]
pub use io::{
    out_queue, run_writer, write_queue, Feed, FrameReader, Lane, OutQueue, OutReceiver, PushError,
    Wait, Wakes, WeakOutQueue, WriteEnd,
};
pub use protocol::{Header, NodeId, Target};
