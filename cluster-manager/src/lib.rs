//! The cluster manager: the node's brain. Every decision a node makes
//! about a message, from the moment the application hands it over until
//! its outcome is known, and about the node's links and members, is made
//! here, as pure state with no sockets, no tasks, no locks and no clock
//! (`.ci/run` checks that tokio stays out of this crate's dependencies).
//!
//! [`core::NodeCore`] follows quinn's contract: time is an input
//! (`handle_*(now, ...)`), and the runtime pulls what to do
//! (`poll_event`, `poll_transmit`, `poll_timeout`). `node-runtime` is its
//! driver: it owns the sockets, tasks and inboxes, feeds the core what it
//! reads, and carries out what the core decides.
//!
//! # Layout
//!
//! Where each decision lives:
//!
//! - [`core`]: [`NodeCore`], the one state machine that holds the rest and
//!   is driven by the runtime.
//! - [`path`]: which path a message takes (threshold, allow-list, open
//!   channel, hot pair, target kind), the order-preserving switch to a
//!   direct channel, and the fallback when a channel cannot be opened.
//! - [`activation`]: the auto-activation counters per peer (hot pairs).
//! - [`channels`]: one direct channel's state: its uses, what is in flight
//!   on it, idle close, and the probe deadline that declares it broken.
//! - [`link`]: the link to the message server: heartbeat deadline, primary
//!   probe, address order and reconnect back-off.
//! - [`members`]: who is a member, and when a disconnected one is declared
//!   gone (its failure deadline); the membership events.
//! - [`tracker`]: acknowledged messages and requests waiting for their
//!   receivers, how each one ends, and the order in which they are resent
//!   after a reconnect.
//! - [`dedup`]: the receivers' duplicate window per sender incarnation.
//! - [`recovery`]: recoverable messages: the numbered stream from a
//!   sender's store to each receiver, and the receiver's verdict on each
//!   number (stored once, in order).
//! - [`error`]: the delivery report and the send errors, definite or
//!   uncertain.
//!
//! Each has table-driven tests beside it; `tests/pair.rs` drives two
//! cores and a simulated message server on a virtual clock through the
//! failover scenarios the process tests cover.

pub mod activation;
pub mod channels;
pub mod core;
pub mod dedup;
pub mod error;
pub mod link;
pub mod members;
pub mod path;
pub mod recovery;
pub mod tracker;

pub use crate::core::NodeCore;
pub use activation::AutoActivation;
pub use error::{DeliveryReport, SendError};
pub use path::{Path, PathFacts, TargetKind};
pub use tracker::{Awaiting, Completion, DeliveryTracker};
