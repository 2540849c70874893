//! The cluster manager: the part of each node that decides what happens to
//! a message after the application hands it over, and keeps track of it
//! until its outcome is known.
//!
//! Everything here is pure state with table-driven tests; the node runtime
//! drives it from its connection tasks.
//!
//! # Layout
//!
//! - [`path`]: which path a message takes (threshold, allow-list, open
//!   channel, hot pair, target kind).
//! - [`activation`]: the auto-activation counters per peer.
//! - [`tracker`]: acknowledged messages and requests waiting for their
//!   receivers, and how each one ends.
//! - [`error`]: the delivery report and the send errors, definite or
//!   uncertain.

pub mod activation;
pub mod channels;
pub mod core;
pub mod dedup;
pub mod error;
pub mod link;
pub mod members;
pub mod path;
pub mod tracker;

pub use activation::AutoActivation;
pub use error::{DeliveryReport, SendError};
pub use path::{Path, PathFacts, TargetKind};
pub use tracker::{Awaiting, Completion, DeliveryTracker};
