//! The one configuration file of a cluster, shared by the message server
//! and every node.
//!
//! Every key is optional; each default is a named constant below. A node
//! reads the common sections, then its own `[nodes.<id>]` section, which may
//! override any key of any section:
//!
//! ```toml
//! [cluster]
//! name = "shop"
//!
//! [lazy]
//! threshold_bytes = 65536
//!
//! [nodes.server-1.lazy]
//! threshold_bytes = 1048576
//! ```
//!
//! A bad file or value is an error at start-up that names the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tcp::TcpOptions;

/// Default cluster name.
pub const DEFAULT_CLUSTER_NAME: &str = "clustercomm";
/// Default port of the message server.
pub const DEFAULT_SERVER_PORT: u16 = 7400;
/// Default address nodes connect to.
pub const DEFAULT_SERVER_ADDRESS: &str = "127.0.0.1:7400";
/// Default address the message server listens on: every interface.
pub const DEFAULT_SERVER_LISTEN: &str = "0.0.0.0:7400";
/// Default interval between heartbeats.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// Default silence after which a node is declared failed.
pub const DEFAULT_FAILURE_TIMEOUT_MS: u64 = 5_000;
/// Default time a send waits for its acknowledgements.
pub const DEFAULT_SEND_TIMEOUT_MS: u64 = 10_000;
/// Default time allowed to connect and complete the handshake.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3_000;
/// Default delay before reconnecting to the message server.
pub const DEFAULT_RECONNECT_DELAY_MS: u64 = 500;
/// Default cap of the reconnect back-off.
pub const DEFAULT_RECONNECT_MAX_DELAY_MS: u64 = 5_000;
/// Default frame capacity of each connection's outgoing queue.
pub const DEFAULT_QUEUE_FRAMES: usize = 8_192;
/// Default byte capacity of each connection's outgoing queue.
pub const DEFAULT_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// Default `node.read_chunk_bytes`: 256 KiB. A node has few connections
/// (its link to the message server, its direct channels), and a backlog
/// of small messages taken four times as much per read costs fewer
/// system calls and wake-ups: `notify` 128 B through the server measured
/// about 7% faster than with the message server's 64 KiB
/// ([`crate::io::READ_CHUNK_BYTES`]), which keeps its smaller reads for its
/// thousands of connections.
pub const DEFAULT_NODE_READ_CHUNK_BYTES: usize = 256 * 1024;
/// Default time a control frame (ack, routing result) may wait for room in
/// a slow consumer's queue before that consumer is disconnected.
pub const DEFAULT_SLOW_CONSUMER_MS: u64 = 5_000;
/// Default address of a node's direct-channel listener.
pub const DEFAULT_DIRECT_LISTEN: &str = "0.0.0.0:0";
/// Default capacity of each service inbox, in messages.
pub const DEFAULT_INBOX_CAPACITY: usize = 1_024;
/// Default time a full inbox may hold a connection back.
pub const DEFAULT_INBOX_WAIT_MS: u64 = 1_000;
/// Default bound of acknowledged messages awaiting an outcome.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 65_536;
/// Default backlog above which a node reports itself busy.
pub const DEFAULT_BUSY_UPPER: usize = 768;
/// Default backlog below which a busy node is no longer busy.
pub const DEFAULT_BUSY_LOWER: usize = 256;
/// Default number of messages a node processes concurrently.
pub const DEFAULT_PROCESSOR_CONCURRENCY: usize = 4;
/// Default body size above which the lazy path is used.
pub const DEFAULT_LAZY_THRESHOLD_BYTES: u64 = 64 * 1024;
/// Default idle time after which a lazy channel closes.
pub const DEFAULT_LAZY_IDLE_CLOSE_MS: u64 = 30_000;
/// Default message count within the window that auto-activates a lazy
/// channel for a pair.
pub const DEFAULT_AUTO_ACTIVATE_MESSAGES: u64 = 10_000;
/// Default auto-activation window.
pub const DEFAULT_AUTO_ACTIVATE_WINDOW_MS: u64 = 1_000;
/// Default largest body of one message.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 64 * 1024 * 1024;
/// Default TCP keepalive idle time: the socket layer's own default,
/// [`crate::tcp::DEFAULT_KEEPALIVE_MS`].
pub const DEFAULT_TCP_KEEPALIVE_MS: u64 = crate::tcp::DEFAULT_KEEPALIVE_MS;

/// An error in the configuration, naming the file and the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the
    /// wrong type; the source names the key and line.
    #[error("invalid config in {origin}: {source}")]
    Parse {
        /// The file, and the node section if the error is in one.
        origin: String,
        /// The parser's error, which quotes the offending line.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid config value for `{key}`: {reason}")]
    Invalid {
        /// The key, as `section.key` (prefixed by `nodes.<id>.` in a node
        /// section).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[cluster]`
    pub cluster: ClusterConfig,
    /// `[message_server]`
    pub message_server: MessageServerConfig,
    /// `[node]`
    pub node: NodeConfig,
    /// `[lazy]`
    pub lazy: LazyConfig,
    /// `[limits]`
    pub limits: LimitsConfig,
    /// `[tcp]`
    pub tcp: TcpConfig,
    /// `[nodes.<id>]`: per-node overrides of any of the sections above.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, toml::Table>,
}

/// `[cluster]`: what every member must agree on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster name; nodes of another cluster are refused.
    /// Default [`DEFAULT_CLUSTER_NAME`].
    pub name: String,
    /// Shared secret every node must present; none by default.
    pub credentials: Option<String>,
    /// Interval between heartbeats. Default [`DEFAULT_HEARTBEAT_INTERVAL_MS`].
    pub heartbeat_interval_ms: u64,
    /// Silence after which a node is declared failed.
    /// Default [`DEFAULT_FAILURE_TIMEOUT_MS`].
    pub failure_timeout_ms: u64,
    /// Where the message server receives heartbeats (UDP), so cluster
    /// traffic can use its own interface. None: its listen address.
    pub heartbeat_listen: Option<SocketAddr>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: DEFAULT_CLUSTER_NAME.to_owned(),
            credentials: None,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            failure_timeout_ms: DEFAULT_FAILURE_TIMEOUT_MS,
            heartbeat_listen: None,
        }
    }
}

/// `[message_server]`: where the message server is and how it queues.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessageServerConfig {
    /// Addresses nodes connect to, `host:port`, primary first, then
    /// standbys. Default `[DEFAULT_SERVER_ADDRESS]`.
    pub addresses: Vec<String>,
    /// Where the message server listens. Default [`DEFAULT_SERVER_LISTEN`].
    pub listen: SocketAddr,
    /// Time allowed to connect and complete the handshake.
    /// Default [`DEFAULT_CONNECT_TIMEOUT_MS`].
    pub connect_timeout_ms: u64,
    /// Delay before reconnecting. Default [`DEFAULT_RECONNECT_DELAY_MS`].
    pub reconnect_delay_ms: u64,
    /// Cap of the reconnect back-off. Default
    /// [`DEFAULT_RECONNECT_MAX_DELAY_MS`].
    pub reconnect_max_delay_ms: u64,
    /// Frames each connection's outgoing queue holds.
    /// Default [`DEFAULT_QUEUE_FRAMES`].
    pub queue_frames: usize,
    /// Bytes each connection's outgoing queue holds; a message that does not
    /// fit is answered to its sender with an error.
    /// Default [`DEFAULT_QUEUE_BYTES`].
    pub queue_bytes: usize,
    /// How long a control frame waits for a slow consumer before that
    /// consumer is disconnected. Default [`DEFAULT_SLOW_CONSUMER_MS`].
    pub slow_consumer_ms: u64,
}

impl Default for MessageServerConfig {
    fn default() -> Self {
        MessageServerConfig {
            addresses: vec![DEFAULT_SERVER_ADDRESS.to_owned()],
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_SERVER_PORT)),
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            reconnect_delay_ms: DEFAULT_RECONNECT_DELAY_MS,
            reconnect_max_delay_ms: DEFAULT_RECONNECT_MAX_DELAY_MS,
            queue_frames: DEFAULT_QUEUE_FRAMES,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            slow_consumer_ms: DEFAULT_SLOW_CONSUMER_MS,
        }
    }
}

/// `[node]`: how a node runtime behaves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Where the node accepts direct channels. Default
    /// [`DEFAULT_DIRECT_LISTEN`].
    pub direct_listen: SocketAddr,
    /// Where a node sends its heartbeats from (UDP). None: any interface,
    /// an ephemeral port.
    pub heartbeat_bind: Option<SocketAddr>,
    /// The direct-channel address announced to other nodes. None: the
    /// listen address, or, when that is unspecified (`0.0.0.0`), the
    /// interface that reaches the message server.
    pub direct_advertise: Option<SocketAddr>,
    /// Time a send waits for its acknowledgements, and a request for its
    /// reply. Default [`DEFAULT_SEND_TIMEOUT_MS`].
    pub send_timeout_ms: u64,
    /// Capacity of each service inbox. Default [`DEFAULT_INBOX_CAPACITY`].
    pub inbox_capacity: usize,
    /// How long a full inbox backlog may hold back the connection a message
    /// came on (slowing its sender down) before the message is answered
    /// `Overloaded`. Default [`DEFAULT_INBOX_WAIT_MS`].
    pub inbox_wait_ms: u64,
    /// Acknowledged messages a node may have awaiting their outcome;
    /// further sends wait (bounded by the send timeout). Bounds the resend
    /// buffer. Default [`DEFAULT_MAX_IN_FLIGHT`].
    pub max_in_flight: usize,
    /// Backlog above which the node reports itself busy.
    /// Default [`DEFAULT_BUSY_UPPER`].
    pub busy_upper: usize,
    /// Backlog below which the node is no longer busy.
    /// Default [`DEFAULT_BUSY_LOWER`].
    pub busy_lower: usize,
    /// Messages processed concurrently. Default
    /// [`DEFAULT_PROCESSOR_CONCURRENCY`].
    pub processor_concurrency: usize,
    /// Frames the node's outgoing queue to the message server holds.
    /// Default [`DEFAULT_QUEUE_FRAMES`].
    pub queue_frames: usize,
    /// Bytes the node's outgoing queue holds; senders wait for room.
    /// Default [`DEFAULT_QUEUE_BYTES`].
    pub queue_bytes: usize,
    /// Bytes a node asks the socket for per read on each of its
    /// connections (each keeps a buffer that size). Default
    /// [`DEFAULT_NODE_READ_CHUNK_BYTES`].
    pub read_chunk_bytes: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            direct_listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            direct_advertise: None,
            heartbeat_bind: None,
            send_timeout_ms: DEFAULT_SEND_TIMEOUT_MS,
            inbox_capacity: DEFAULT_INBOX_CAPACITY,
            inbox_wait_ms: DEFAULT_INBOX_WAIT_MS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            busy_upper: DEFAULT_BUSY_UPPER,
            busy_lower: DEFAULT_BUSY_LOWER,
            processor_concurrency: DEFAULT_PROCESSOR_CONCURRENCY,
            queue_frames: DEFAULT_QUEUE_FRAMES,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            read_chunk_bytes: DEFAULT_NODE_READ_CHUNK_BYTES,
        }
    }
}

/// `[lazy]`: when messages bypass the message server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LazyConfig {
    /// Bodies larger than this take a lazy channel.
    /// Default [`DEFAULT_LAZY_THRESHOLD_BYTES`].
    pub threshold_bytes: u64,
    /// Services allowed on lazy channels; `"*"` for all. Default `["*"]`.
    pub services: Vec<String>,
    /// Idle time after which a lazy channel closes.
    /// Default [`DEFAULT_LAZY_IDLE_CLOSE_MS`].
    pub idle_close_ms: u64,
    /// Messages a pair must exchange within the window for a lazy channel to
    /// open even for small bodies; 0 disables auto-activation.
    /// Default [`DEFAULT_AUTO_ACTIVATE_MESSAGES`].
    pub auto_activate_messages: u64,
    /// The auto-activation window. Default
    /// [`DEFAULT_AUTO_ACTIVATE_WINDOW_MS`].
    pub auto_activate_window_ms: u64,
}

impl Default for LazyConfig {
    fn default() -> Self {
        LazyConfig {
            threshold_bytes: DEFAULT_LAZY_THRESHOLD_BYTES,
            services: vec!["*".to_owned()],
            idle_close_ms: DEFAULT_LAZY_IDLE_CLOSE_MS,
            auto_activate_messages: DEFAULT_AUTO_ACTIVATE_MESSAGES,
            auto_activate_window_ms: DEFAULT_AUTO_ACTIVATE_WINDOW_MS,
        }
    }
}

/// `[limits]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest body of one message; larger ones fail with
    /// `PayloadTooLarge` before anything is sent.
    /// Default [`DEFAULT_MAX_MESSAGE_BYTES`].
    pub max_message_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// `[tcp]`: socket options for every connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TcpConfig {
    /// Disable Nagle's algorithm. Default true.
    pub nodelay: bool,
    /// TCP keepalive idle time; 0 disables. Default
    /// [`DEFAULT_TCP_KEEPALIVE_MS`].
    pub keepalive_ms: u64,
    /// `SO_SNDBUF`; none keeps the system default.
    pub send_buffer_bytes: Option<usize>,
    /// `SO_RCVBUF`; none keeps the system default.
    pub recv_buffer_bytes: Option<usize>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            nodelay: true,
            keepalive_ms: DEFAULT_TCP_KEEPALIVE_MS,
            send_buffer_bytes: None,
            recv_buffer_bytes: None,
        }
    }
}

impl TcpConfig {
    /// The socket options [`crate::tcp`] applies.
    pub fn options(&self) -> TcpOptions {
        TcpOptions::from(self)
    }
}

impl From<&TcpConfig> for TcpOptions {
    fn from(tcp: &TcpConfig) -> Self {
        TcpOptions {
            nodelay: tcp.nodelay,
            keepalive_ms: tcp.keepalive_ms,
            send_buffer_bytes: tcp.send_buffer_bytes,
            recv_buffer_bytes: tcp.recv_buffer_bytes,
        }
    }
}

impl Config {
    /// Reads and validates a config file, node sections included.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file and the bad key.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the bad key.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source,
        })?;
        config.validate("")?;
        for id in config.nodes.keys() {
            config.for_node(id)?;
        }
        Ok(config)
    }

    /// The configuration as node `id` sees it: the common sections with its
    /// `[nodes.<id>]` section merged over them.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the merged result is invalid, naming the key under
    /// `nodes.<id>`.
    pub fn for_node(&self, id: &str) -> Result<Config, ConfigError> {
        let Some(overrides) = self.nodes.get(id) else {
            let mut config = self.clone();
            config.nodes.clear();
            return Ok(config);
        };
        let mut base = self.clone();
        base.nodes.clear();
        let origin = format!("[nodes.{id}]");
        let mut table = toml::Table::try_from(&base).map_err(|e| ConfigError::Invalid {
            key: format!("nodes.{id}"),
            reason: e.to_string(),
        })?;
        merge(&mut table, overrides);
        let text = toml::to_string(&table).map_err(|e| ConfigError::Invalid {
            key: format!("nodes.{id}"),
            reason: e.to_string(),
        })?;
        let merged: Config =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { origin, source })?;
        merged.validate(&format!("nodes.{id}."))?;
        Ok(merged)
    }

    /// Applies the environment overrides for the common keys, reading each
    /// variable through `var`:
    ///
    /// | variable | key |
    /// | --- | --- |
    /// | `CLUSTERCOMM_CLUSTER` | `cluster.name` |
    /// | `CLUSTERCOMM_MESSAGE_SERVER` | `message_server.addresses` (comma-separated) |
    /// | `CLUSTERCOMM_LISTEN` | `message_server.listen` |
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the variable if its value is bad.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(name) = var("CLUSTERCOMM_CLUSTER") {
            self.cluster.name = name;
        }
        if let Some(addrs) = var("CLUSTERCOMM_MESSAGE_SERVER") {
            self.message_server.addresses = addrs
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(listen) = var("CLUSTERCOMM_LISTEN") {
            self.message_server.listen = listen.parse().map_err(|e| ConfigError::Invalid {
                key: "CLUSTERCOMM_LISTEN".to_owned(),
                reason: format!("{listen:?} is not a socket address: {e}"),
            })?;
        }
        self.validate("")
    }

    /// Checks ranges and consistency; `prefix` is put before key names.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Invalid {
                key: format!("{prefix}{key}"),
                reason,
            })
        };
        if self.cluster.name.is_empty() {
            return bad("cluster.name", "must not be empty".into());
        }
        if self.cluster.heartbeat_interval_ms == 0 {
            return bad("cluster.heartbeat_interval_ms", "must be above 0".into());
        }
        if self.cluster.failure_timeout_ms <= self.cluster.heartbeat_interval_ms {
            return bad(
                "cluster.failure_timeout_ms",
                format!(
                    "{} must be above cluster.heartbeat_interval_ms ({})",
                    self.cluster.failure_timeout_ms, self.cluster.heartbeat_interval_ms
                ),
            );
        }
        let ms = &self.message_server;
        if ms.addresses.is_empty() {
            return bad(
                "message_server.addresses",
                "needs at least one address".into(),
            );
        }
        if let Some(a) = ms.addresses.iter().find(|a| !a.contains(':')) {
            return bad(
                "message_server.addresses",
                format!("{a:?} is not host:port"),
            );
        }
        for (key, v) in [
            ("message_server.connect_timeout_ms", ms.connect_timeout_ms),
            ("message_server.reconnect_delay_ms", ms.reconnect_delay_ms),
            ("message_server.slow_consumer_ms", ms.slow_consumer_ms),
            ("node.send_timeout_ms", self.node.send_timeout_ms),
            ("lazy.idle_close_ms", self.lazy.idle_close_ms),
            (
                "lazy.auto_activate_window_ms",
                self.lazy.auto_activate_window_ms,
            ),
            ("limits.max_message_bytes", self.limits.max_message_bytes),
        ] {
            if v == 0 {
                return bad(key, "must be above 0".into());
            }
        }
        if ms.reconnect_max_delay_ms < ms.reconnect_delay_ms {
            return bad(
                "message_server.reconnect_max_delay_ms",
                format!(
                    "{} is below message_server.reconnect_delay_ms ({})",
                    ms.reconnect_max_delay_ms, ms.reconnect_delay_ms
                ),
            );
        }
        for (key, v, min) in [
            ("message_server.queue_frames", ms.queue_frames, 16),
            ("message_server.queue_bytes", ms.queue_bytes, 64 * 1024),
            ("node.queue_frames", self.node.queue_frames, 16),
            ("node.queue_bytes", self.node.queue_bytes, 64 * 1024),
            ("node.inbox_capacity", self.node.inbox_capacity, 1),
            ("node.max_in_flight", self.node.max_in_flight, 1),
            (
                "node.processor_concurrency",
                self.node.processor_concurrency,
                1,
            ),
        ] {
            if v < min {
                return bad(key, format!("{v} is below the minimum of {min}"));
            }
        }
        let chunk = self.node.read_chunk_bytes;
        if !(4 * 1024..=16 * 1024 * 1024).contains(&chunk) {
            return bad(
                "node.read_chunk_bytes",
                format!("{chunk} is outside 4096 to 16777216 (4 KiB to 16 MiB)"),
            );
        }
        if ms.queue_bytes > u32::MAX as usize || self.node.queue_bytes > u32::MAX as usize {
            return bad("queue_bytes", "must be below 4 GiB".into());
        }
        if self.node.busy_lower >= self.node.busy_upper {
            return bad(
                "node.busy_lower",
                format!(
                    "{} must be below node.busy_upper ({})",
                    self.node.busy_lower, self.node.busy_upper
                ),
            );
        }
        let max_frame_body = u64::from(u32::MAX) - crate::frame::MAX_HEADER_BYTES as u64;
        if self.limits.max_message_bytes > max_frame_body {
            return bad(
                "limits.max_message_bytes",
                format!("must be at most {max_frame_body} (4 GiB less a header)"),
            );
        }
        if self.lazy.threshold_bytes > self.limits.max_message_bytes {
            return bad(
                "lazy.threshold_bytes",
                format!(
                    "{} is above limits.max_message_bytes ({})",
                    self.lazy.threshold_bytes, self.limits.max_message_bytes
                ),
            );
        }
        Ok(())
    }

    /// `cluster.failure_timeout_ms` as a duration.
    pub fn failure_timeout(&self) -> Duration {
        Duration::from_millis(self.cluster.failure_timeout_ms)
    }

    /// `node.send_timeout_ms` as a duration.
    pub fn send_timeout(&self) -> Duration {
        Duration::from_millis(self.node.send_timeout_ms)
    }

    /// `message_server.connect_timeout_ms` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.message_server.connect_timeout_ms)
    }
}

/// Merges `over` into `base`, table by table; values of `over` win.
fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", "test").expect("empty config is valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.lazy.threshold_bytes, DEFAULT_LAZY_THRESHOLD_BYTES);
    }

    #[test]
    fn unknown_key_is_named() {
        let err =
            Config::parse("[lazy]\nthreshhold_bytes = 5\n", "test.toml").expect_err("unknown key");
        let text = format!("{err}");
        assert!(text.contains("threshhold_bytes"), "{text}");
        assert!(text.contains("test.toml"), "{text}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::parse("[node]\nsend_timeout_ms = \"soon\"\n", "t").expect_err("type");
        let text = format!("{err}");
        assert!(text.contains("send_timeout_ms"), "{text}");
    }

    #[test]
    fn inconsistent_values_name_the_key() {
        let cases = [
            (
                "[node]\nbusy_lower = 900\nbusy_upper = 100\n",
                "node.busy_lower",
            ),
            (
                "[cluster]\nfailure_timeout_ms = 10\n",
                "cluster.failure_timeout_ms",
            ),
            (
                "[lazy]\nthreshold_bytes = 100\n[limits]\nmax_message_bytes = 10\n",
                "lazy.threshold_bytes",
            ),
            (
                "[message_server]\naddresses = []\n",
                "message_server.addresses",
            ),
            ("[node]\ninbox_capacity = 0\n", "node.inbox_capacity"),
            ("[node]\nread_chunk_bytes = 1024\n", "node.read_chunk_bytes"),
            (
                "[node]\nread_chunk_bytes = 1073741824\n",
                "node.read_chunk_bytes",
            ),
        ];
        for (text, key) in cases {
            match Config::parse(text, "t") {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected an error naming {key}, got {other:?}"),
            }
        }
    }

    #[test]
    fn node_sections_override_and_are_validated() {
        let text =
            "[lazy]\nthreshold_bytes = 1000\n[nodes.server-1.lazy]\nthreshold_bytes = 2000\n";
        let c = Config::parse(text, "t").expect("valid");
        assert_eq!(
            c.for_node("server-1").expect("merge").lazy.threshold_bytes,
            2000
        );
        assert_eq!(
            c.for_node("server-2").expect("merge").lazy.threshold_bytes,
            1000
        );

        let bad = "[nodes.server-1.node]\nbusy_lower = 5000\n";
        match Config::parse(bad, "t") {
            Err(ConfigError::Invalid { key, .. }) => {
                assert_eq!(key, "nodes.server-1.node.busy_lower")
            }
            other => panic!("expected an error, got {other:?}"),
        }
        let unknown = "[nodes.server-1.lazy]\nbogus = 1\n";
        let err = Config::parse(unknown, "t").expect_err("unknown key in node section");
        let text = format!("{err}");
        assert!(
            text.contains("bogus") && text.contains("nodes.server-1"),
            "{text}"
        );
    }

    #[test]
    fn tcp_defaults_are_the_socket_defaults() {
        assert_eq!(TcpConfig::default().options(), TcpOptions::default());
    }

    #[test]
    fn env_overrides() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "CLUSTERCOMM_MESSAGE_SERVER" => Some("10.0.0.1:1, 10.0.0.2:2".into()),
            "CLUSTERCOMM_CLUSTER" => Some("shop".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(c.message_server.addresses, ["10.0.0.1:1", "10.0.0.2:2"]);
        assert_eq!(c.cluster.name, "shop");
        let err = c
            .apply_env(|k| (k == "CLUSTERCOMM_LISTEN").then(|| "nope".into()))
            .expect_err("bad listen");
        assert!(format!("{err}").contains("CLUSTERCOMM_LISTEN"));
    }
}
