//! The default of every key, each a named constant that the key's doc
//! comment cites, so the docs and the code cannot drift.

/// Default cluster name.
pub const DEFAULT_CLUSTER_NAME: &str = "clustercomm";
/// Default port of the message server.
pub const DEFAULT_SERVER_PORT: u16 = 7400;
/// Default address nodes connect to.
pub const DEFAULT_SERVER_ADDRESS: &str = "127.0.0.1:7400";
/// Default address the message server listens on: every interface.
pub const DEFAULT_SERVER_LISTEN: &str = "0.0.0.0:7400";
/// Default port of the message server's monitor (`monitor.listen`).
pub const DEFAULT_MONITOR_PORT: u16 = 7480;
/// Default address of the message server's monitor: this host only, since
/// the monitor has no access control.
pub const DEFAULT_MONITOR_LISTEN: &str = "127.0.0.1:7480";
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
/// (`transports::io::READ_CHUNK_BYTES`), which keeps its smaller reads
/// for its thousands of connections.
pub const DEFAULT_NODE_READ_CHUNK_BYTES: usize = 256 * 1024;
/// Default time a control frame (ack, routing result) may wait for room in
/// a slow consumer's queue before that consumer is disconnected.
pub const DEFAULT_SLOW_CONSUMER_MS: u64 = 5_000;
/// Bytes of one sender's messages parked for one full receiver
/// (`message_server.park_bytes`): enough for what a sender has in flight
/// when it hears the receiver is busy (its share of its queue, and the
/// sockets' buffers, up to about 10 MiB on Linux).
pub const DEFAULT_PARK_BYTES: usize = 16 * 1024 * 1024;
/// Bytes of one sender's messages parked for all its full receivers
/// together (`message_server.park_sender_bytes`): four receivers' worth of
/// [`DEFAULT_PARK_BYTES`], so that a sender which ignores "busy" cannot
/// take the memory budget from everyone else.
pub const DEFAULT_PARK_SENDER_BYTES: usize = 64 * 1024 * 1024;
/// How long a message waits for room in a full receiver's queue before it
/// is parked (`message_server.park_after_ms`).
pub const DEFAULT_PARK_AFTER_MS: u64 = 20;

/// Entries the message server's dead-letter queue holds at most
/// (`message_server.dead_letter_entries`).
pub const DEFAULT_DEAD_LETTER_ENTRIES: usize = 100_000;

/// Bytes of bodies the dead-letter queue holds at most
/// (`message_server.dead_letter_bytes`): 64 MiB.
pub const DEFAULT_DEAD_LETTER_BYTES: usize = 64 << 20;
/// Bytes of one target's messages a node's outgoing queue holds ahead of
/// its writer (`node.target_queue_bytes`).
pub const DEFAULT_TARGET_QUEUE_BYTES: usize = 1024 * 1024;
/// Default cap of the message server's connections: more are refused at
/// once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4_096;
/// Default cap of the message server's connections that have not yet
/// registered (said a hello that was accepted): more are refused at once,
/// so a flood of idle sockets cannot take more than this.
pub const DEFAULT_MAX_UNAUTHENTICATED: usize = 256;
/// Default cap of the channels a node's direct listener keeps open: more
/// are refused at once.
pub const DEFAULT_NODE_MAX_CHANNELS: usize = 1_024;
/// Default cap of a node's inbound channels still in their handshake: more
/// are refused at once.
pub const DEFAULT_NODE_MAX_UNAUTHENTICATED: usize = 64;
/// Default name the message server's TLS certificate carries.
pub const DEFAULT_TLS_SERVER_NAME: &str = "message-server";
/// Default memory budget of the message server: the bytes of queued
/// messages across all its connections.
pub const DEFAULT_MEMORY_BUDGET_BYTES: usize = 1024 * 1024 * 1024;
/// Default address of a node's direct-channel listener.
pub const DEFAULT_DIRECT_LISTEN: &str = "0.0.0.0:0";
/// Default capacity of each service inbox, in messages.
pub const DEFAULT_INBOX_CAPACITY: usize = 1_024;
/// Default time a full inbox may hold a connection back.
pub const DEFAULT_INBOX_WAIT_MS: u64 = 1_000;
/// Default bound of acknowledged messages awaiting an outcome.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 65_536;
/// Default cap of the body bytes of a node's acknowledged messages
/// awaiting their outcome (the resend buffer's size in bytes).
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 256 * 1024 * 1024;
/// Default backlog above which a node reports itself busy.
pub const DEFAULT_BUSY_UPPER: usize = 1024;
/// Default backlog below which a busy node is no longer busy.
pub const DEFAULT_BUSY_LOWER: usize = 512;
/// Default number of messages a node processes concurrently.
pub const DEFAULT_PROCESSOR_CONCURRENCY: usize = 4;
/// Default number of messages of one sender a processor handles in a row
/// while others wait.
pub const DEFAULT_MAX_IN_A_ROW: usize = 10;
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
/// Default chunk size: frames larger than this travel in parts of it.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;
/// Default window of a stream: bytes its sender may send beyond what the
/// receiving application has read.
pub const DEFAULT_STREAM_WINDOW_BYTES: usize = 4 * 1024 * 1024;
/// Default TCP keepalive idle time: the socket layer's own default,
/// [`transports::tcp::DEFAULT_KEEPALIVE_MS`].
pub const DEFAULT_TCP_KEEPALIVE_MS: u64 = transports::tcp::DEFAULT_KEEPALIVE_MS;
