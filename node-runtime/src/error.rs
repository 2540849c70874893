//! Errors of starting and running a node. Send errors live in
//! `cluster-manager` and are re-exported by this crate.

use std::time::Duration;

use cluster_config::ConfigError;
use transports::handshake::HandshakeError;

/// Why a node could not start, or an operation on it failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration is invalid; the source names the key.
    #[error("invalid node configuration")]
    Config(#[from] ConfigError),
    /// No message server address could be reached.
    #[error("cannot reach the message server at {addresses:?} (is it running?)")]
    Connect {
        /// The addresses tried, in order.
        addresses: Vec<String>,
        /// The error of the last attempt.
        #[source]
        source: std::io::Error,
    },
    /// The message server was reached but the handshake failed, for example
    /// because it refused this node.
    #[error("handshake with the message server at {address} failed")]
    Handshake {
        /// The server's address.
        address: String,
        /// What went wrong.
        #[source]
        source: HandshakeError,
    },
    /// The direct-channel listener could not be bound.
    #[error("cannot listen for direct channels on {address}")]
    DirectListen {
        /// The address.
        address: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The node's store (`node.data_dir`) could not be opened: it is
    /// damaged and `node.store_on_damage` is `"refuse"`, or its directory
    /// cannot be used.
    #[error("cannot open the node's store (node.data_dir)")]
    Store(#[from] clustercomm_store::StoreError),
    /// The node's metrics listener (`node.monitor_listen`) could not be
    /// bound.
    #[error("cannot serve the node's metrics on {address} (node.monitor_listen)")]
    MonitorListen {
        /// The address.
        address: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A node id, group or service name that is empty or longer than
    /// `transports::protocol::MAX_NAME_BYTES`, or too many of them.
    #[error("invalid {what} {name:?}: names are 1 to 255 bytes, at most 1024 groups")]
    InvalidName {
        /// What the name is for.
        what: &'static str,
        /// The name (cut to 64 bytes).
        name: String,
    },
    /// The heartbeat socket could not be bound.
    #[error("cannot bind the heartbeat socket on {address}")]
    HeartbeatListen {
        /// The address.
        address: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake with the message server failed: a certificate
    /// that does not chain to the other end's CA, or does not carry the
    /// expected name (`tls.server_name` for the server).
    #[error("TLS handshake with the message server at {address} failed")]
    TlsHandshake {
        /// The server's address.
        address: String,
        /// The cause, as rustls says it.
        #[source]
        source: std::io::Error,
    },
    /// The `[tls]` files could not be used.
    #[error("cannot set up TLS")]
    Tls(#[from] transports::tls::TlsError),
    /// The system could not make this node's session key.
    #[error("cannot make this node's session key")]
    Identity(#[from] transports::auth::AuthError),
    /// The message server refused: this node's permissions do not allow
    /// it (`permissions.subscribe`).
    #[error("not permitted: {0}")]
    NotPermitted(String),
    /// The service name starts with `clustercomm.`, the prefix of the
    /// services every node runtime offers by itself (see
    /// [`crate::tune`]).
    #[error("service {0:?} is reserved: names starting with \"clustercomm.\" are the node runtime's own")]
    Reserved(String),
    /// The service already has an inbox on this node.
    #[error("service {0:?} is already subscribed on this node")]
    AlreadySubscribed(String),
    /// The message server did not confirm in time.
    #[error("the message server did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection to the message server is gone.
    #[error("the connection to the message server is closed")]
    Disconnected,
}

impl NodeError {
    pub(crate) fn invalid_name(what: &'static str, name: &str) -> NodeError {
        let mut cut = name.to_owned();
        if cut.len() > 64 {
            let mut end = 64;
            while !cut.is_char_boundary(end) {
                end -= 1;
            }
            cut.truncate(end);
        }
        NodeError::InvalidName { what, name: cut }
    }
}
