//! The clustercomm admin command's library: what `clustercomm` does, for
//! tests and tools to call.
//!
//! - [`certs`]: a cluster's CA and the certificates of its message server
//!   and nodes, for `[tls]`.

pub mod certs;
