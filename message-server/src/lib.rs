//! The message server: one process per cluster that knows every connected
//! node and dispatches their small messages to one node, a group, one
//! member of a group, or every node.
//!
//! It holds only soft state: everything it knows, nodes tell it again when
//! they reconnect. Each connection has a read task, which decodes headers,
//! resolves targets in the routing table and pushes the received frame (the
//! same `Bytes`, never re-encoded) into each receiver's bounded queue, and a
//! write task, which drains its queue many frames per syscall.
//!
//! ```no_run
//! # async fn run() -> Result<(), message_server::ServerError> {
//! let server = message_server::MessageServer::bind(cluster_config::Config::default()).await?;
//! println!("listening on {}", server.local_addr());
//! server.run(std::future::pending()).await
//! # }
//! ```
//!
//! # Layout
//!
//! - [`table`]: the pure routing table (members, groups, services, target
//!   resolution).
//! - [`server`]: binding, accepting, shutdown.
//! - `connection`: one node's handshake and read loop.
//! - `registry`: registration, takeover on reconnect, the warm-up hold.
//! - [`counters`]: what passed through.
//! - [`monitor`]: the monitor page, its JSON and Prometheus metrics.

mod connection;
pub mod counters;
mod dead;
pub mod monitor;
mod parked;
mod registry;
pub mod server;
pub mod table;
mod trace;

pub use connection::MAX_MEMBER_CHANGES_PER_S;
pub use counters::CountersSnapshot;
pub use server::{MessageServer, ServerError, ServerHandle};
