//! [`Config`] and its sections, one struct per TOML table, each with its
//! defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use transports::protocol::Priority;
use transports::tcp::TcpOptions;

use crate::defaults::*;
use crate::permissions::PermissionsConfig;

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
    /// `[permissions]`
    pub permissions: PermissionsConfig,
    /// `[tls]`
    pub tls: TlsConfig,
    /// `[monitor]`
    pub monitor: MonitorConfig,
    /// `[services.<name>]`: the defaults of one service's messages, for
    /// the nodes that send to it.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, ServiceConfig>,
    /// `[nodes.<id>]`: per-node overrides of any of the sections above.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, toml::Table>,
}

impl Config {
    /// The priority of a message to `service` sent without one:
    /// `services.<service>.priority`, or [`Priority::Normal`].
    pub fn service_priority(&self, service: &str) -> Priority {
        if self.services.is_empty() {
            return Priority::Normal;
        }
        self.services
            .get(service)
            .and_then(|s| s.priority)
            .unwrap_or_default()
    }

    /// Whether acknowledged messages to `service` are recoverable by
    /// default (`services.<service>.recoverable`).
    pub fn service_recoverable(&self, service: &str) -> bool {
        !self.services.is_empty() && self.services.get(service).is_some_and(|s| s.recoverable)
    }

    /// How long messages to `service` live by default
    /// (`services.<service>.retention_ms`), if they expire.
    pub fn service_retention(&self, service: &str) -> Option<Duration> {
        if self.services.is_empty() {
            return None;
        }
        self.services
            .get(service)
            .and_then(|s| s.retention_ms)
            .map(Duration::from_millis)
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

/// `[services.<name>]`: how messages to one service are sent when the
/// sender does not say otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The priority of its messages: `"express"`, `"high"`, `"normal"`
    /// or `"low"`. None: normal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Whether its acknowledged messages (`send`, `submit`) to one node
    /// are recoverable (kept in the sender's store, `node.data_dir`, until
    /// acknowledged). Default false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub recoverable: bool,
    /// How long its messages live, in milliseconds, when the sender does
    /// not say (`SendOptions::ttl`): past it a message is never delivered,
    /// and it goes to the dead-letter queue. None (the default): forever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<u64>,
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
    /// The network interface (`eth1`) the message server receives
    /// heartbeats on: its address, at start, with `heartbeat_listen`'s port
    /// (or the listen port) becomes `heartbeat_listen`. Missing at start:
    /// an error. None: as `heartbeat_listen` says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interface: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: DEFAULT_CLUSTER_NAME.to_owned(),
            credentials: None,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            failure_timeout_ms: DEFAULT_FAILURE_TIMEOUT_MS,
            heartbeat_listen: None,
            heartbeat_interface: None,
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
    /// The network interface (`eth0`) the message server listens on: its
    /// address, at start, with `listen`'s port becomes `listen` (the
    /// seeds' NIC selection). Missing at start: an error. None: `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The heartbeat address (UDP) the message server tells nodes, instead
    /// of the one it bound (`cluster.heartbeat_listen`, or its listen
    /// address): for a server behind NAT or a forwarder. An unspecified IP
    /// (`0.0.0.0:7402`) has each node use the IP it reached the server on,
    /// as it does when the bound address is unspecified. Heartbeats must
    /// still arrive from the node's own address. None: the bound address.
    pub heartbeat_advertise: Option<SocketAddr>,
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
    /// How long a frame waits for room in a consumer's queue. A control
    /// frame that waits this long, or a message while the consumer read
    /// nothing at all, disconnects the consumer; a message to a consumer
    /// that reads, only slowly, is refused as overloaded. Default
    /// [`DEFAULT_SLOW_CONSUMER_MS`].
    pub slow_consumer_ms: u64,
    /// Bytes of one sender's messages the message server parks for one
    /// receiver whose queue is full, so that the sender's messages to
    /// everyone else go on meanwhile (each parked message waits at most
    /// `slow_consumer_ms`). A message past it is answered `Overloaded` at
    /// once, to its sender and for that receiver only (a one-way message
    /// as a failure the sender counts). Parked bytes count against
    /// `memory_budget_bytes`. Default [`DEFAULT_PARK_BYTES`].
    pub park_bytes: usize,
    /// Bytes of one sender's messages the message server parks for all
    /// its full receivers together; past it, a message that would park is
    /// answered `Overloaded` as past `park_bytes`. All senders together
    /// park at most half of `memory_budget_bytes`, so that parking never
    /// takes the room the queues need. Default
    /// [`DEFAULT_PARK_SENDER_BYTES`].
    pub park_sender_bytes: usize,
    /// How long a message waits for room in a full receiver's queue,
    /// holding its sender back, before it is parked: a queue full only
    /// until its writer takes the next batch costs no parking, and a
    /// stream to a slower receiver keeps its pace. Once parked for, a
    /// receiver's further messages park at once. Default
    /// [`DEFAULT_PARK_AFTER_MS`].
    pub park_after_ms: u64,
    /// Connections the message server keeps at most; more are refused at
    /// once. Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// Connections not yet registered that the message server keeps at
    /// most (each for at most the hello deadline); more are refused at
    /// once. Default [`DEFAULT_MAX_UNAUTHENTICATED`].
    pub max_unauthenticated: usize,
    /// Whether a node may announce a direct-channel address on another
    /// host than the one it connects from (behind NAT, say). Default
    /// false: such a registration is refused, so that a member cannot
    /// point the others' channels (and their credentials) elsewhere.
    pub allow_foreign_direct_addr: bool,
    /// Bytes of messages the message server holds queued across all its
    /// connections, at most; a message past it is answered as for a full
    /// queue (the sender waits, then hears `Overloaded`). Default
    /// [`DEFAULT_MEMORY_BUDGET_BYTES`].
    pub memory_budget_bytes: usize,
    /// Where the message server keeps its dead-letter queue
    /// (`store.redb`), so that it survives a restart. None (the default):
    /// the queue lives in memory only.
    pub data_dir: Option<std::path::PathBuf>,
    /// Entries the dead-letter queue holds at most; a message past it is
    /// counted (`overflowed`) and logged, not held. Default
    /// [`DEFAULT_DEAD_LETTER_ENTRIES`].
    pub dead_letter_entries: usize,
    /// Bytes of bodies the dead-letter queue holds at most; as
    /// `dead_letter_entries`. Default [`DEFAULT_DEAD_LETTER_BYTES`].
    pub dead_letter_bytes: usize,
}

impl Default for MessageServerConfig {
    fn default() -> Self {
        MessageServerConfig {
            addresses: vec![DEFAULT_SERVER_ADDRESS.to_owned()],
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_SERVER_PORT)),
            interface: None,
            heartbeat_advertise: None,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            reconnect_delay_ms: DEFAULT_RECONNECT_DELAY_MS,
            reconnect_max_delay_ms: DEFAULT_RECONNECT_MAX_DELAY_MS,
            queue_frames: DEFAULT_QUEUE_FRAMES,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            slow_consumer_ms: DEFAULT_SLOW_CONSUMER_MS,
            park_bytes: DEFAULT_PARK_BYTES,
            park_sender_bytes: DEFAULT_PARK_SENDER_BYTES,
            park_after_ms: DEFAULT_PARK_AFTER_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_unauthenticated: DEFAULT_MAX_UNAUTHENTICATED,
            allow_foreign_direct_addr: false,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
            data_dir: None,
            dead_letter_entries: DEFAULT_DEAD_LETTER_ENTRIES,
            dead_letter_bytes: DEFAULT_DEAD_LETTER_BYTES,
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
    /// The network interface (`eth0`) the node accepts direct channels on:
    /// its address, at start, with `direct_listen`'s port becomes
    /// `direct_listen` (and, without `direct_advertise`, the address
    /// announced). Missing at start: an error. None: `direct_listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_interface: Option<String>,
    /// Where a node sends its heartbeats from (UDP). None: any interface,
    /// an ephemeral port.
    pub heartbeat_bind: Option<SocketAddr>,
    /// The network interface (`eth1`) the node sends its heartbeats from:
    /// its address, at start, with `heartbeat_bind`'s port (or any)
    /// becomes `heartbeat_bind`. Missing at start: an error. None:
    /// `heartbeat_bind`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interface: Option<String>,
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
    /// Body bytes of acknowledged messages awaiting their outcome, at
    /// most; further sends wait (bounded by the send timeout). Bounds the
    /// resend buffer in bytes. A body larger than this takes all of it;
    /// bodies of at most 1 KiB are bounded by `max_in_flight` alone.
    /// Default [`DEFAULT_MAX_IN_FLIGHT_BYTES`].
    pub max_in_flight_bytes: usize,
    /// Messages waiting in one of the node's service inboxes at which the
    /// node becomes busy (at most the inbox's capacity: a smaller inbox
    /// makes the node busy when full). A busy node tells the message
    /// server at once; senders to it wait (bounded by their timeout) and
    /// `AnyOf` passes it over. Default [`DEFAULT_BUSY_UPPER`].
    pub busy_upper: usize,
    /// Messages waiting in each of its inboxes at or below which a busy
    /// node is no longer busy. Default [`DEFAULT_BUSY_LOWER`].
    pub busy_lower: usize,
    /// Messages processed concurrently. Default
    /// [`DEFAULT_PROCESSOR_CONCURRENCY`].
    pub processor_concurrency: usize,
    /// Messages of one sender a processor handles in a row while messages
    /// of other senders wait (`Node::serve`). Default
    /// [`DEFAULT_MAX_IN_A_ROW`].
    pub max_in_a_row: usize,
    /// Frames the node's outgoing queue to the message server holds.
    /// Default [`DEFAULT_QUEUE_FRAMES`].
    pub queue_frames: usize,
    /// Bytes the node's outgoing queue holds; senders wait for room.
    /// Default [`DEFAULT_QUEUE_BYTES`].
    pub queue_bytes: usize,
    /// Bytes of messages to one target the outgoing queue holds ahead of
    /// its writer, at most: a send to a target past it waits (bounded by
    /// its timeout), so that messages to other targets never queue behind
    /// more than this of one target's. Default
    /// [`DEFAULT_TARGET_QUEUE_BYTES`].
    pub target_queue_bytes: usize,
    /// Bytes a node asks the socket for per read on each of its
    /// connections (each keeps a buffer that size). Default
    /// [`DEFAULT_NODE_READ_CHUNK_BYTES`].
    pub read_chunk_bytes: usize,
    /// Inbound direct channels the node keeps at most; more are refused at
    /// once. Default [`DEFAULT_NODE_MAX_CHANNELS`].
    pub max_channels: usize,
    /// Inbound direct channels still in their handshake (each for at most
    /// the hello deadline) the node keeps at most; more are refused at
    /// once. Default [`DEFAULT_NODE_MAX_UNAUTHENTICATED`].
    pub max_unauthenticated: usize,
    /// Where the node serves its own metrics (`/metrics`, Prometheus text)
    /// over HTTP, for an application without a `/metrics` to merge them
    /// into. No access control: keep it on loopback or a management
    /// network. None (the default): not served.
    pub monitor_listen: Option<SocketAddr>,
    /// Where the node keeps its store (`store.redb`): recoverable messages
    /// it sends until they are acknowledged, those it received until its
    /// application has them, and the numbers that keep each delivered once.
    /// None (the default): no store, and a recoverable send fails.
    pub data_dir: Option<std::path::PathBuf>,
    /// What the node does at start with a store found damaged: `"refuse"`
    /// (the default: it does not start, and says why) or `"salvage"` (it
    /// keeps every intact record, moves the damaged file aside and logs
    /// what it could not read).
    pub store_on_damage: StoreOnDamage,
}

/// What a node does with a store found damaged at start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreOnDamage {
    /// It does not start.
    #[default]
    Refuse,
    /// It starts with what is intact.
    Salvage,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            direct_listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            direct_advertise: None,
            direct_interface: None,
            heartbeat_bind: None,
            heartbeat_interface: None,
            send_timeout_ms: DEFAULT_SEND_TIMEOUT_MS,
            inbox_capacity: DEFAULT_INBOX_CAPACITY,
            inbox_wait_ms: DEFAULT_INBOX_WAIT_MS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            busy_upper: DEFAULT_BUSY_UPPER,
            busy_lower: DEFAULT_BUSY_LOWER,
            processor_concurrency: DEFAULT_PROCESSOR_CONCURRENCY,
            max_in_a_row: DEFAULT_MAX_IN_A_ROW,
            queue_frames: DEFAULT_QUEUE_FRAMES,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            target_queue_bytes: DEFAULT_TARGET_QUEUE_BYTES,
            read_chunk_bytes: DEFAULT_NODE_READ_CHUNK_BYTES,
            max_channels: DEFAULT_NODE_MAX_CHANNELS,
            max_unauthenticated: DEFAULT_NODE_MAX_UNAUTHENTICATED,
            monitor_listen: None,
            data_dir: None,
            store_on_damage: StoreOnDamage::Refuse,
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
    /// A frame whose header and body are larger than this travels in
    /// parts of this size, interleaved with other frames on every hop, so
    /// that a small message never waits behind more than one part of a
    /// large body. 4 KiB to 16 MiB; default [`DEFAULT_CHUNK_BYTES`].
    pub chunk_bytes: usize,
    /// Largest stream (`Node::send_stream`) a node sends or accepts; none
    /// (the default): no limit. Streams are not bound by
    /// `max_message_bytes`.
    pub max_stream_bytes: Option<u64>,
    /// Bytes a stream's sender may have sent beyond what the receiving
    /// application has read: what each end of a stream holds at most
    /// (the sender keeps what the receiver has not yet got, to resend it
    /// on a new channel). At least two chunks; default
    /// [`DEFAULT_STREAM_WINDOW_BYTES`].
    pub stream_window_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_stream_bytes: None,
            stream_window_bytes: DEFAULT_STREAM_WINDOW_BYTES,
        }
    }
}

/// `[tls]`: mutual TLS on every TCP connection of the cluster (the
/// message server's port, every node's direct channels). Off unless the
/// three files are set; a node's own certificate and key usually come from
/// its `[nodes.<id>.tls]` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the cluster's CA certificate.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM file of this process's certificate (chain). A node's names its
    /// node id; the message server's names `server_name`.
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM file of this process's private key.
    pub key_file: Option<std::path::PathBuf>,
    /// The name the message server's certificate carries, which nodes
    /// check. Default [`DEFAULT_TLS_SERVER_NAME`].
    pub server_name: String,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca_file: None,
            cert_file: None,
            key_file: None,
            server_name: DEFAULT_TLS_SERVER_NAME.to_owned(),
        }
    }
}

impl TlsConfig {
    /// Whether TLS is on (all three files are set).
    pub fn enabled(&self) -> bool {
        self.ca_file.is_some() && self.cert_file.is_some() && self.key_file.is_some()
    }

    /// The three files, when TLS is on.
    pub fn files(&self) -> Option<(&std::path::Path, &std::path::Path, &std::path::Path)> {
        Some((
            self.ca_file.as_deref()?,
            self.cert_file.as_deref()?,
            self.key_file.as_deref()?,
        ))
    }
}

/// `[monitor]`: the message server's monitor, an HTTP listener with the
/// cluster at a glance (`/`), the same as JSON (`/api/v1/...`) and as
/// Prometheus metrics (`/metrics`). It has no access control: keep it on
/// loopback or a management network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// Where the monitor listens; `None` (`listen = ""` in the file) turns
    /// it off. Default [`DEFAULT_MONITOR_LISTEN`].
    #[serde(with = "listen_or_off")]
    pub listen: Option<SocketAddr>,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_MONITOR_PORT))),
        }
    }
}

/// `monitor.listen` in the file: an address, or `""` for none. A bad value
/// is an error that names the key.
mod listen_or_off {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        listen: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match listen {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "monitor.listen: {text:?} is not an address (ip:port, such as \"127.0.0.1:7480\"), nor \"\" to turn the monitor off"
            ))
        })
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
    /// The socket options [`transports::tcp`] applies.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_listen_is_an_address_or_off() {
        let default: SocketAddr = DEFAULT_MONITOR_LISTEN.parse().expect("an address");
        assert_eq!(MonitorConfig::default().listen, Some(default));
        let parse = |text: &str| crate::Config::parse(text, "t").map(|c| c.monitor.listen);
        assert_eq!(parse("[monitor]\nlisten = \"\"\n").expect("off"), None);
        let addr = parse("[monitor]\nlisten = \"0.0.0.0:9000\"\n").expect("valid");
        assert_eq!(addr, Some(SocketAddr::from(([0, 0, 0, 0], 9000))));
        let err = parse("[monitor]\nlisten = \"nowhere\"\n").expect_err("bad");
        assert!(format!("{err}").contains("monitor.listen"), "{err}");
        // Off survives a node section's merge (the config goes through
        // TOML and back).
        let text = "[monitor]\nlisten = \"\"\n[nodes.a.lazy]\nthreshold_bytes = 10\n";
        let config = crate::Config::parse(text, "t").expect("valid");
        assert_eq!(config.for_node("a").expect("merge").monitor.listen, None);
    }

    #[test]
    fn tcp_defaults_are_the_socket_defaults() {
        assert_eq!(TcpConfig::default().options(), TcpOptions::default());
    }
}
