//! The library an application server embeds to join a clustercomm
//! cluster.
//!
//! A [`Node`] connects to the message server, registers its groups, offers
//! services through inboxes, and sends to one node, a group, any member of
//! a group, or every node. Acknowledged sends resolve with a
//! [`DeliveryReport`] naming the receivers, or a [`SendError`] that says
//! whether the message was definitely not delivered or may have been.
//!
//! ```no_run
//! use node_runtime::{Node, Target};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let node = Node::builder("server-1")
//!     .message_server("127.0.0.1:7400")
//!     .groups(["web"])
//!     .start()
//!     .await?;
//! let mut inbox = node.subscribe("cache-invalidation").await?;
//! let report = node.send(Target::All, "cache-invalidation", "user:42").await;
//! if let Some(message) = inbox.recv().await {
//!     println!("{} says {:?}", message.sender(), message.body());
//! }
//! # let _ = report;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! The node's decisions are [`cluster_manager`]'s ([`cluster_manager::NodeCore`]);
//! this crate is their driver: sockets, tasks, inboxes.
//!
//! - [`builder`]: configuring and starting a node.
//! - [`node`]: the [`Node`] handle: send, notify, request, subscribe.
//! - `pending`: [`Pending`], a message on its way.
//! - `runtime`: what the node's tasks share: the core, the server link,
//!   the services, the direct channels (each its own part).
//! - `core`: the core behind its short lock, and acting on its events.
//! - `supervisor`: the link to the message server: connect, reconnect and
//!   watch its deadlines when the core says, heartbeats.
//! - `connection`: reading the message-server link and delivering into
//!   inboxes, with acknowledgements.
//! - `routing`: carrying a send out on the path the core chose, with the
//!   fallback it allows.
//! - `direct`: lazy and session channels, both ends, and their monitor.
//! - [`inbox`]: service inboxes and delivered messages.
//! - [`membership`]: the stream of membership events.
//! - [`counters`]: what went over which path.
//! - [`tune`]: the built-in service `clustercomm.tune` every node answers,
//!   for `clustercomm tune` to time the paths with.
//! - [`error`]: start-up and operation errors.
//! - `identity`: the session key and cluster secret this node proves
//!   itself with.

pub mod builder;
mod busy;
mod channels;
mod connection;
mod core;
pub mod counters;
pub mod dead_letters;
mod direct;
pub mod error;
mod fair;
mod identity;
pub mod inbox;
pub mod membership;
mod metrics;
pub mod monitor;
pub mod node;
pub mod options;
mod pending;
pub mod processors;
mod recovery;
mod reply;
mod routing;
mod runtime;
mod server;
mod services;
pub mod stream;
mod supervisor;
pub mod trace;
pub mod tune;

pub use builder::NodeBuilder;
pub use cluster_config::{Config, ServiceConfig, StoreOnDamage};
pub use cluster_manager::{DeliveryReport, SendError};
pub use counters::PathCounters;
pub use dead_letters::{DeadLetterEntry, DeadLetterError, DeadLetterPage, DeadLetters};
pub use error::NodeError;
pub use inbox::{Inbox, Message};
pub use membership::{EventsError, MembershipEvent, MembershipEvents};
pub use node::{Node, Pending, Reply};
pub use options::{AckMode, RetryPolicy, SendOptions, SubscribeOptions};
pub use processors::{HandlerResult, ServeOptions, Serving, ServingStats};
pub use stream::{BodyStream, StreamError};
pub use trace::{Trace, TraceEvent};
pub use transports::protocol::{
    DeadLetter, DeadLetterStats, DeadReason, DeliveryFailure, LeaveReason, MemberInfo, MessageKind,
    NodeId, Priority, Role, SmolStr, Target, TraceRequest, Traced,
};
pub use tune::TUNE_SERVICE;

/// The README's examples, compiled and run as doc-tests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
