//! The frame headers every path carries: handshake, messages, routing
//! results, acknowledgements and membership events.
//!
//! Headers are postcard-encoded; bodies follow them raw and are never
//! re-encoded. [`Header::Hello`] must stay the first variant and
//! [`Hello::version`] its first field, so that a peer speaking another
//! protocol version can still read which version it is talking to.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
/// The string type of names carried in member details
/// ([`MemberInfo::groups`], [`MemberInfo::services`]): one of up to 23
/// bytes is kept inline, so a member's details cost one allocation for
/// each list, not one per name.
pub use smol_str::SmolStr;

/// The protocol version this build speaks. Peers with another version are
/// refused at the handshake with [`RefusalReason::VersionMismatch`].
pub const PROTOCOL_VERSION: u16 = 11;

/// Bytes of a handshake nonce.
pub const NONCE_BYTES: usize = 16;
/// Bytes of a MAC in a handshake (HMAC-SHA256).
pub const MAC_BYTES: usize = 32;
/// Bytes of a session key's public half (Ed25519).
pub const PUBLIC_KEY_BYTES: usize = 32;
/// Bytes of a per-session secret.
pub const SESSION_SECRET_BYTES: usize = 32;
/// Bytes of a heartbeat's MAC (a truncated HMAC-SHA256).
pub const BEAT_MAC_BYTES: usize = 16;

/// A handshake nonce: fresh random bytes per connection and end.
pub type Nonce = [u8; NONCE_BYTES];
/// A MAC in a handshake.
pub type Mac = [u8; MAC_BYTES];
/// A session key's public half: who an incarnation of a node is.
pub type PublicKey = [u8; PUBLIC_KEY_BYTES];
/// A per-session secret, issued by the message server.
pub type SessionSecret = [u8; SESSION_SECRET_BYTES];
/// A heartbeat's MAC.
pub type BeatMac = [u8; BEAT_MAC_BYTES];

/// Longest node id, group or service name, in bytes. Keeps every header
/// small; longer names are refused where they enter (builder, subscribe,
/// send, and the message server's handshake).
pub const MAX_NAME_BYTES: usize = 255;

/// Most groups or services one node may announce.
pub const MAX_NAMES_PER_NODE: usize = 1024;

/// Whether two names are the same: for the hot paths that compare the
/// name in a received header with one they know (the sender, the service
/// delivered to last), without a call to the C library's `memcmp` (see
/// `wire::same_bytes` for what that costs).
#[inline]
pub fn same_name(a: &str, b: &str) -> bool {
    crate::wire::same_bytes(a.as_bytes(), b.as_bytes())
}

/// Whether `name` is a usable node id, group or service name: 1 to
/// [`MAX_NAME_BYTES`] bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_BYTES
}

/// The unique name of a cluster element, such as `server-1`.
///
/// Cheap to clone, because every delivered message carries one: an id of up
/// to 23 bytes is kept inline and cloned without touching shared memory (no
/// reference count for the threads that pass messages on to contend for),
/// a longer one is reference-counted.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(SmolStr);

impl NodeId {
    /// Creates a node id from any string.
    pub fn new(id: impl AsRef<str>) -> Self {
        NodeId(SmolStr::new(id.as_ref()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        NodeId::new(s)
    }
}

impl From<String> for NodeId {
    fn from(s: String) -> Self {
        NodeId(SmolStr::from(s))
    }
}

impl std::borrow::Borrow<str> for NodeId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for NodeId {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    /// One node.
    Node(NodeId),
    /// Every current member of the group that offers the service.
    Group(String),
    /// Exactly one member of the group that offers the service, preferring
    /// the least loaded.
    AnyOf(String),
    /// Every other node in the cluster that offers the service; never the
    /// sender itself.
    All,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&TargetRef::from(self), f)
    }
}

/// The role a node plays in the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// An application server.
    #[default]
    Server,
    /// A dispatcher, which keeps session channels to the servers of its
    /// group.
    Dispatcher,
}

/// What a node tells the message server (or a peer) when it connects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version; must stay the first field.
    pub version: u16,
    /// Cluster name; both ends must agree.
    pub cluster: String,
    /// The connecting node.
    pub node: NodeId,
    /// A fresh number each time the node starts.
    pub incarnation: u64,
    /// Role of the node.
    pub role: Role,
    /// Where the node accepts direct (lazy and session) channels.
    pub direct_addr: Option<SocketAddr>,
    /// Largest body the node is willing to send or receive.
    pub max_message_bytes: u64,
    /// The opener's fresh nonce, which the acceptor's proofs answer.
    pub nonce: Nonce,
    /// The public half of this incarnation's session key: the opener signs
    /// the handshake with the private half (see [`Proof`]).
    pub session_key: PublicKey,
    /// The address the node's heartbeats come from, when it binds them to
    /// one (`node.heartbeat_bind`); otherwise they must come from this
    /// connection's address.
    pub heartbeat_ip: Option<IpAddr>,
    /// The node was registered before (with this server or another) and
    /// lost its link. A server that a rejoining node finds empty (it
    /// restarted, or a standby took over) holds messages for members not
    /// back yet; a fresh server answers unknown targets at once.
    pub rejoining: bool,
}

/// The groups a node joins and the services it offers, sent to the message
/// server right after its [`Proof`]: a node may list up to
/// [`MAX_NAMES_PER_NODE`] of each, too many for the few KiB a peer may send
/// before it has proven who it is
/// ([`crate::frame::PRE_AUTH_MAX_FRAME_BYTES`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interests {
    /// Groups the node belongs to.
    pub groups: Vec<String>,
    /// Services the node offers at connect time.
    pub services: Vec<String>,
}

/// What a node tells the message server every heartbeat interval, for
/// the monitor: what went past the server (over direct channels). Totals
/// since the node started; the server keeps the latest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Messages the node sent over lazy channels.
    pub lazy_messages: u64,
    /// Their body bytes.
    pub lazy_bytes: u64,
    /// One-way messages the node sent over session channels.
    pub session_messages: u64,
    /// Their body bytes.
    pub session_bytes: u64,
    /// Messages the node received over direct (lazy or session) channels.
    pub received_direct: u64,
    /// Direct channels this node opened that are open now.
    pub channels_open: u64,
    /// Whether the node is busy (its backlog reached `node.busy_upper`
    /// and has not fallen to `node.busy_lower` since). `None`: not
    /// reported. A node sends a report at once when this changes.
    pub busy: Option<bool>,
    /// Messages waiting in the node's service inboxes, all services
    /// together: `AnyOf` sends to the least loaded.
    pub backlog: u64,
}

/// A node's request to the message server for a trace: the headers (and
/// optionally the bodies) of the messages that pass it and match the
/// filter, for a bounded time or count. Each filter left `None` matches
/// anything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Only messages from this node.
    pub sender: Option<NodeId>,
    /// Only messages to this target.
    pub target: Option<Target>,
    /// Only messages for this service.
    pub service: Option<String>,
    /// Capture the bodies too (each cut to [`TRACE_BODY_BYTES`]).
    pub bodies: bool,
    /// Stop after this many messages.
    pub max_messages: u64,
    /// Stop after this long, in milliseconds.
    pub duration_ms: u64,
}

/// Most bytes of a body a trace carries.
pub const TRACE_BODY_BYTES: usize = 4096;

/// One message a trace captured: its header; the frame's body is the
/// message's body (cut to [`TRACE_BODY_BYTES`]) when bodies were asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traced {
    /// When the server routed it, in Unix milliseconds.
    pub at_unix_ms: u64,
    /// The sender.
    pub sender: NodeId,
    /// Its incarnation.
    pub incarnation: u64,
    /// The sender's sequence number.
    pub seq: u64,
    /// What kind of message.
    pub kind: MessageKind,
    /// Its target.
    pub target: Target,
    /// Its service.
    pub service: String,
    /// Its body's length (the whole body, also when cut or not carried).
    pub body_bytes: u64,
}

/// The acceptor's answer to a [`Hello`] it does not refuse: its own nonce
/// and proofs. The opener answers with a [`Proof`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The acceptor's fresh nonce.
    pub nonce: Nonce,
    /// With a cluster secret: the acceptor's MAC under it over the hello
    /// and both nonces.
    pub secret_proof: Option<Mac>,
    /// A node accepting a direct channel: its signature of the handshake
    /// with its session key, so that the opener knows whom it reached.
    /// The message server has none.
    pub signature: Option<Vec<u8>>,
}

/// The opener's answer to a [`Challenge`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    /// With a cluster secret: the opener's MAC under it over the hello and
    /// both nonces.
    pub secret_proof: Option<Mac>,
    /// The opener's signature of the handshake with the session key its
    /// hello names.
    pub signature: Vec<u8>,
}

/// The message server's answer to an accepted [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version of the server.
    pub version: u16,
    /// Cluster name of the server.
    pub cluster: String,
    /// The negotiated body limit: the smaller of both ends' limits.
    pub max_message_bytes: u64,
    /// Every member currently registered, the new node included.
    pub members: Vec<MemberInfo>,
    /// Where to send heartbeats (UDP); an unspecified IP means the address
    /// this connection reached.
    pub heartbeat_addr: Option<SocketAddr>,
    /// From the message server: this session's secret, which heartbeats
    /// are signed with. With a cluster secret it travels masked (see
    /// `transports::auth`); the handshake unmasks it.
    pub session_secret: Option<SessionSecret>,
}

impl Welcome {
    /// This welcome's encoding as a `Header::Welcome`, with `members`
    /// (each a [`MemberInfo`] as postcard encodes it) as its member list in
    /// place of `self.members`: a message server's welcome assembled from
    /// its members' encodings, kept since they joined, instead of every
    /// member cloned and encoded again for each node that joins. The same
    /// bytes as postcard's encoding of the whole.
    ///
    /// # Errors
    ///
    /// The welcome's other fields cannot be encoded.
    pub fn encode_with_members<M: AsRef<[u8]>>(
        self,
        members: &[M],
    ) -> Result<Vec<u8>, postcard::Error> {
        crate::wire::encode_welcome(self, members)
    }
}

/// Why a handshake was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RefusalReason {
    /// The two ends speak different protocol versions.
    VersionMismatch {
        /// The refusing end's version.
        ours: u16,
        /// The version the other end announced.
        theirs: u16,
    },
    /// The two ends belong to different clusters.
    ClusterMismatch {
        /// The refusing end's cluster name.
        ours: String,
        /// The cluster name the other end announced.
        theirs: String,
    },
    /// A node with this id is still registered and live.
    DuplicateNode,
    /// The credentials did not match.
    BadCredentials,
    /// The first frame was not a handshake, or could not be decoded.
    ProtocolViolation,
    /// This incarnation of the node was declared failed; it must rejoin as
    /// a new one.
    IncarnationFailed,
    /// The node's permissions do not let it join a group or offer a
    /// service its hello names.
    NotPermitted,
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalReason::VersionMismatch { ours, theirs } => write!(
                f,
                "protocol version mismatch: the refusing end speaks {ours}, this end {theirs}"
            ),
            // A refusal does not say the refusing end's name; a check at
            // the connecting end does.
            RefusalReason::ClusterMismatch { ours, theirs } if ours.is_empty() => write!(
                f,
                "cluster name mismatch: the refusing end is in another cluster than {theirs:?}"
            ),
            RefusalReason::ClusterMismatch { ours, theirs } => write!(
                f,
                "cluster name mismatch: the refusing end is in cluster {ours:?}, this end in {theirs:?}"
            ),
            RefusalReason::DuplicateNode => {
                f.write_str("a node with this id is already registered and live")
            }
            RefusalReason::BadCredentials => f.write_str("bad credentials"),
            RefusalReason::ProtocolViolation => f.write_str("protocol violation"),
            RefusalReason::IncarnationFailed => {
                f.write_str("this incarnation was declared failed; rejoin as a new one")
            }
            RefusalReason::NotPermitted => {
                f.write_str("not permitted: a group or service the hello names")
            }
        }
    }
}

/// A refused handshake: the reason, and a sentence for the logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable reason.
    pub reason: RefusalReason,
    /// Human-readable detail.
    pub detail: String,
}

/// How the receiver treats a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MessageKind {
    /// One-way, no acknowledgement.
    Notify,
    /// Acknowledged once accepted into the service's inbox.
    Send,
    /// Expects one reply; no separate acknowledgement.
    Request,
    /// The reply to a request.
    Reply {
        /// Sequence number of the request answered.
        request_seq: u64,
        /// Incarnation of the requester, so a reply never reaches a later
        /// incarnation.
        requester_incarnation: u64,
    },
    /// A request's answer that is an error; the body is its text (UTF-8).
    ReplyError {
        /// Sequence number of the request answered.
        request_seq: u64,
        /// Incarnation of the requester.
        requester_incarnation: u64,
        /// The application's error code; `None`: the request was dropped
        /// without a reply.
        code: Option<u32>,
    },
    /// A recoverable message: acknowledged as a `Send`, once the receiver
    /// has it in its store. Numbered on the sender's stream to this
    /// receiver (see `cluster_manager::recovery`).
    Recoverable {
        /// The epoch of the sender's store.
        epoch: u64,
        /// Its number on the stream.
        pseq: u64,
        /// Every number below this one was acknowledged.
        floor: u64,
    },
}

impl MessageKind {
    /// Whether the receiver acknowledges it (a `Send` or a recoverable
    /// message).
    pub fn is_acknowledged(&self) -> bool {
        matches!(self, MessageKind::Send | MessageKind::Recoverable { .. })
    }

    /// Whether this answers a request (a reply or an error reply): it goes
    /// to the requester whatever services it offers.
    pub fn is_reply(&self) -> bool {
        matches!(
            self,
            MessageKind::Reply { .. } | MessageKind::ReplyError { .. }
        )
    }
}

/// How urgent a message is. Every hop (the sender's queue, the message
/// server's queue to each receiver, every direct channel) keeps one queue
/// per priority, and its writer takes the most urgent non-empty one first,
/// with a bounded share for the others so that none starves. The
/// protocol's own frames (acknowledgements, membership, pings) go before
/// all of them. Order holds per sender, receiver, priority and path.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Before everything else.
    Express,
    /// Before normal traffic.
    High,
    /// The default.
    #[default]
    Normal,
    /// After everything else (within its bounded share).
    Low,
}

impl Priority {
    /// Every priority, most urgent first.
    pub const ALL: [Priority; 4] = [
        Priority::Express,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    /// Its place in [`Priority::ALL`] (0: most urgent), which is also its
    /// wire value.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The priority whose wire value is `index`.
    pub fn from_index(index: usize) -> Option<Priority> {
        Priority::ALL.get(index).copied()
    }

    /// Its name, as the configuration spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Priority::Express => "express",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Header of a message frame; the body follows raw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageHeader {
    /// The sending node.
    pub sender: NodeId,
    /// The sender's incarnation.
    pub incarnation: u64,
    /// Per-sender, per-incarnation sequence number.
    pub seq: u64,
    /// Where the message goes.
    pub target: Target,
    /// The service addressed on each receiver.
    pub service: Arc<str>,
    /// How the receiver treats it.
    pub kind: MessageKind,
    /// Which queue it takes on every hop.
    pub priority: Priority,
    /// When it expires, in milliseconds since the Unix epoch: after that
    /// it is never delivered, wherever it waits (see [`DeadReason::Expired`]).
    /// `None`: never. Clocks are taken to be synchronised (NTP): a skew
    /// between two hosts moves the expiry by as much.
    pub expires_ms: Option<u64>,
}

/// A [`Target`] read in place from a received frame: names borrowed, not
/// allocated. Same wire layout as [`Target`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TargetRef<'a> {
    /// One node.
    Node(&'a str),
    /// Every member of the group.
    Group(&'a str),
    /// One member of the group.
    AnyOf(&'a str),
    /// Every other node.
    All,
}

impl TargetRef<'_> {
    /// An owned copy.
    pub fn to_target(&self) -> Target {
        match *self {
            TargetRef::Node(n) => Target::Node(NodeId::new(n)),
            TargetRef::Group(g) => Target::Group(g.to_owned()),
            TargetRef::AnyOf(g) => Target::AnyOf(g.to_owned()),
            TargetRef::All => Target::All,
        }
    }
}

impl<'a> From<&'a Target> for TargetRef<'a> {
    fn from(target: &'a Target) -> Self {
        match target {
            Target::Node(n) => TargetRef::Node(n.as_str()),
            Target::Group(g) => TargetRef::Group(g),
            Target::AnyOf(g) => TargetRef::AnyOf(g),
            Target::All => TargetRef::All,
        }
    }
}

impl fmt::Display for TargetRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetRef::Node(n) => write!(f, "node {n}"),
            TargetRef::Group(g) => write!(f, "group {g}"),
            TargetRef::AnyOf(g) => write!(f, "any member of group {g}"),
            TargetRef::All => f.write_str("all nodes"),
        }
    }
}

/// A [`MessageHeader`] read in place from a received frame: the names are
/// borrowed from the frame, so routing or delivering a message allocates
/// nothing for its header. Same wire layout as [`MessageHeader`], so either
/// encodes what the other decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRef<'a> {
    /// The sending node.
    pub sender: &'a str,
    /// The sender's incarnation.
    pub incarnation: u64,
    /// Per-sender, per-incarnation sequence number.
    pub seq: u64,
    /// Where the message goes.
    #[serde(borrow)]
    pub target: TargetRef<'a>,
    /// The service addressed on each receiver.
    pub service: &'a str,
    /// How the receiver treats it.
    pub kind: MessageKind,
    /// Which queue it takes on every hop.
    pub priority: Priority,
    /// When it expires (see [`MessageHeader::expires_ms`]).
    pub expires_ms: Option<u64>,
}

impl MessageRef<'_> {
    /// Whether it has expired at `now_ms` (Unix milliseconds).
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|at| at <= now_ms)
    }
}

impl<'a> From<&'a MessageHeader> for MessageRef<'a> {
    fn from(h: &'a MessageHeader) -> Self {
        MessageRef {
            sender: h.sender.as_str(),
            incarnation: h.incarnation,
            seq: h.seq,
            target: TargetRef::from(&h.target),
            service: &h.service,
            kind: h.kind,
            priority: h.priority,
            expires_ms: h.expires_ms,
        }
    }
}

/// An [`Ack`] read in place from a received frame. Same wire layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRef<'a> {
    /// The original sender.
    pub to: &'a str,
    /// The original sender's incarnation.
    pub to_incarnation: u64,
    /// Sequence number of the message acknowledged.
    pub seq: u64,
    /// The receiver.
    pub from: &'a str,
    /// The receiver's incarnation.
    pub from_incarnation: u64,
    /// What happened.
    pub status: AckStatus,
}

/// Several messages from one sender accepted by one receiver, acknowledged
/// in one frame: what a receiver sends instead of one [`Ack`] per message
/// when many arrive together. Failures are always acknowledged one by one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acks {
    /// The original sender.
    pub to: NodeId,
    /// The original sender's incarnation; stale acks are dropped.
    pub to_incarnation: u64,
    /// The receiver.
    pub from: NodeId,
    /// The receiver's incarnation.
    pub from_incarnation: u64,
    /// Sequence numbers of the messages accepted into their inboxes.
    pub seqs: Vec<u64>,
}

/// An [`Acks`] read in place: the names borrowed, the numbers checked and
/// counted but not collected. Same wire layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct AcksRef<'a> {
    /// The original sender.
    pub to: &'a str,
    /// The original sender's incarnation.
    pub to_incarnation: u64,
    /// The receiver.
    pub from: &'a str,
    /// The receiver's incarnation.
    pub from_incarnation: u64,
    /// How many sequence numbers the frame carries.
    pub seqs: SeqCount,
}

/// The length of a list of sequence numbers, each of them decoded (so a
/// malformed list is refused) without collecting them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqCount(pub usize);

impl<'de> Deserialize<'de> for SeqCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Count;
        impl<'de> serde::de::Visitor<'de> for Count {
            type Value = SeqCount;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of sequence numbers")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<SeqCount, A::Error> {
                let mut n = 0;
                while seq.next_element::<u64>()?.is_some() {
                    n += 1;
                }
                Ok(SeqCount(n))
            }
        }
        d.deserialize_seq(Count)
    }
}

/// Index of [`Header::Message`] among the variants: the first byte of every
/// message frame (postcard writes the variant index as a varint).
pub const MESSAGE_TAG: u8 = 3;
/// Index of [`Header::Ack`] among the variants.
pub const ACK_TAG: u8 = 5;
/// Index of [`Header::Acks`] among the variants.
pub const ACKS_TAG: u8 = 15;

/// Why a message did not reach a receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DeliveryFailure {
    /// No such node, group, or no member in it.
    UnknownTarget,
    /// The receiver (or every candidate) does not offer the service.
    NoSuchService,
    /// The body is larger than the path allows.
    PayloadTooLarge {
        /// Size of the body.
        size: u64,
        /// The limit it exceeded.
        max: u64,
    },
    /// The receiver's queue was full: it is not keeping up.
    ReceiverOverloaded,
    /// The receiver refused the message for the given reason.
    Rejected(String),
    /// The receiver stopped before the message left.
    TargetStopped,
    /// The sender's permissions (`permissions.send`) do not include the
    /// target.
    NotPermitted,
    /// The receiver is busy (see [`MemberInfo::busy`]) and its queue for
    /// the service was full.
    ReceiverBusy,
    /// Its time to live ran out before it was delivered
    /// ([`MessageHeader::expires_ms`]).
    Expired,
}

impl fmt::Display for DeliveryFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryFailure::UnknownTarget => f.write_str("unknown target"),
            DeliveryFailure::NoSuchService => f.write_str("no such service"),
            DeliveryFailure::PayloadTooLarge { size, max } => {
                write!(f, "payload of {size} bytes exceeds the limit of {max}")
            }
            DeliveryFailure::ReceiverOverloaded => f.write_str("receiver overloaded"),
            DeliveryFailure::Rejected(r) => write!(f, "rejected: {r}"),
            DeliveryFailure::TargetStopped => f.write_str("target stopped"),
            DeliveryFailure::NotPermitted => {
                f.write_str("not permitted: the sender may not send to this target")
            }
            DeliveryFailure::ReceiverBusy => f.write_str("receiver busy"),
            DeliveryFailure::Expired => f.write_str("expired: its time to live ran out"),
        }
    }
}

/// The message server's word to a sender about where a message went.
///
/// Sent for every acknowledged message or request whose receivers the
/// sender cannot know (`Group`, `AnyOf`, `All`), and for any message the
/// server could not route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routed {
    /// Sequence number of the message.
    pub seq: u64,
    /// Receivers the message was forwarded to, with their incarnations.
    pub receivers: Vec<(NodeId, u64)>,
    /// Receivers the message could not be forwarded to.
    pub failed: Vec<(NodeId, DeliveryFailure)>,
    /// Set when the message could not be routed at all.
    pub error: Option<DeliveryFailure>,
}

/// Outcome a receiver reports for one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckStatus {
    /// Accepted into the service's inbox.
    Accepted,
    /// Not accepted.
    Failed(DeliveryFailure),
}

/// A receiver's acknowledgement of one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The original sender.
    pub to: NodeId,
    /// The original sender's incarnation; a stale ack is dropped.
    pub to_incarnation: u64,
    /// Sequence number of the message acknowledged.
    pub seq: u64,
    /// The receiver.
    pub from: NodeId,
    /// The receiver's incarnation.
    pub from_incarnation: u64,
    /// What happened.
    pub status: AckStatus,
}

/// What the cluster knows about one member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The node.
    pub id: NodeId,
    /// Its current incarnation.
    pub incarnation: u64,
    /// Its role.
    pub role: Role,
    /// Groups it belongs to.
    pub groups: Vec<SmolStr>,
    /// Services it offers.
    pub services: Vec<SmolStr>,
    /// Where it accepts direct channels.
    pub direct_addr: Option<SocketAddr>,
    /// The public half of its session key: a direct channel to or from
    /// this incarnation is signed with it.
    pub session_key: PublicKey,
    /// Whether it reported itself busy (its backlog reached
    /// `node.busy_upper` and has not yet fallen to `node.busy_lower`):
    /// senders wait before sending to it, and `AnyOf` passes it over.
    pub busy: bool,
}

/// Why a member left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaveReason {
    /// It said goodbye: a planned stop.
    Stopped,
    /// Its connection broke without a goodbye.
    Disconnected,
    /// It was declared failed (silent past the failure timeout).
    Failed,
}

/// A change of membership, pushed by the message server to every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberEvent {
    /// A node joined.
    Joined(MemberInfo),
    /// A node changed its services.
    Updated(MemberInfo),
    /// A node left.
    Left {
        /// The node.
        id: NodeId,
        /// The incarnation that left.
        incarnation: u64,
        /// Why.
        reason: LeaveReason,
    },
}

/// The header of every frame.
///
/// Variants keep their places: `Hello` first (see the module docs), and
/// `Message`, `Ack` and `Acks` at [`MESSAGE_TAG`], [`ACK_TAG`] and
/// [`ACKS_TAG`], which [`crate::frame::peek`] dispatches on. New variants go
/// at the end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Header {
    /// Opens a connection; must stay the first variant. (Boxed, as the
    /// welcome: the handshake's frames are rare, and every other header
    /// stays small.)
    Hello(Box<Hello>),
    /// Accepts a connection.
    Welcome(Box<Welcome>),
    /// Refuses a connection; the refusing end closes it afterwards.
    Refused(Refusal),
    /// A message; the body follows.
    Message(MessageHeader),
    /// Where a message went (server to sender).
    Routed(Routed),
    /// A receiver's acknowledgement.
    Ack(Ack),
    /// A membership change.
    Member(MemberEvent),
    /// A node starts offering a service; answered by `Subscribed`.
    Subscribe {
        /// Correlates the answer.
        token: u64,
        /// The service.
        service: String,
    },
    /// A node stops offering a service.
    Unsubscribe {
        /// The service.
        service: String,
    },
    /// The server registered a `Subscribe`.
    Subscribed {
        /// The token of the `Subscribe`.
        token: u64,
    },
    /// A planned stop: the sender closes the connection after this.
    Goodbye,
    /// Asks the message server who a target resolves to (for fan-outs the
    /// node sends over lazy channels itself); answered by `Resolved`.
    Resolve {
        /// Correlates the answer.
        token: u64,
        /// The target.
        target: Target,
        /// The service.
        service: String,
    },
    /// Liveness probe on a direct channel; answered by `Pong`.
    Ping {
        /// Echoed in the answer.
        nonce: u64,
    },
    /// The answer to a `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// The members a `Resolve` resolved to, or why it failed.
    Resolved {
        /// The token of the `Resolve`.
        token: u64,
        /// Receivers with their incarnations, or the failure.
        result: Result<Vec<(NodeId, u64)>, DeliveryFailure>,
    },
    /// Several acknowledgements in one frame (must stay at index
    /// [`ACKS_TAG`]).
    Acks(Acks),
    /// The acceptor's answer to a hello (see [`Challenge`]).
    Challenge(Challenge),
    /// The opener's answer to a challenge (see [`Proof`]).
    Proof(Proof),
    /// The server refused a `Subscribe`.
    SubscribeRefused {
        /// The token of the `Subscribe`.
        token: u64,
        /// Why.
        reason: String,
    },
    /// A node's groups and services, after its proof (see [`Interests`]).
    Interests(Box<Interests>),
    /// A node's periodic report to the message server (see
    /// [`NodeReport`]).
    Report(NodeReport),
    /// A node asks for a trace (see [`TraceRequest`]).
    Trace(Box<TraceRequest>),
    /// The server started the trace a node asked for.
    TraceStarted,
    /// A message a trace captured (see [`Traced`]).
    Traced(Box<Traced>),
    /// A trace ended.
    TraceEnd {
        /// Messages sent to the tracer.
        captured: u64,
        /// Matching messages not sent: the tracer's queue was full.
        dropped: u64,
        /// Why it ended: its count, its time, or a refusal.
        reason: String,
    },
    /// The reader of a connection read this many bytes of parts (chunks
    /// of large frames, see [`crate::frame::PART_BIT`]) so far: the
    /// writer at the other end may send more (see
    /// [`crate::io::OutQueue::grant`]).
    Credit {
        /// Bytes of parts read since the connection opened.
        read: u64,
    },
    /// Opens a stream on a direct channel, or resumes it on a new one
    /// after the last broke (see [`StreamStart`]).
    StreamStart(Box<StreamStart>),
    /// The next bytes of a stream (the frame's body), from `offset`.
    StreamChunk {
        /// The stream: its message's sequence number.
        seq: u64,
        /// Where in the stream the body starts.
        offset: u64,
    },
    /// A stream's receiver holds `received` bytes (never to be sent
    /// again), and its application has read `consumed` of them: the
    /// sender may send up to `consumed` plus the stream window.
    StreamAck {
        /// The stream.
        seq: u64,
        /// Bytes the receiver holds, from the start.
        received: u64,
        /// Bytes its application has read.
        consumed: u64,
    },
    /// A stream ended without its body: the receiver refused it or gave
    /// it up, or the sender could not finish it.
    StreamFailed {
        /// The stream.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// Written among a connection's `Low` messages, after each
    /// [`crate::io::LOW_MARK_EVERY`] bytes of them: the reader answers it
    /// with a [`Header::LowCredit`] once it has taken in everything
    /// before it (see [`crate::io::OutReceiver::window_low`]).
    LowMark {
        /// The marks written on this connection so far, this one
        /// included.
        mark: u64,
    },
    /// The reader of a connection took in everything written before
    /// [`Header::LowMark`] `mark`: the writer at the other end may send
    /// more `Low` messages.
    LowCredit {
        /// The mark answered.
        mark: u64,
    },
    /// A node files a message in the message server's dead-letter queue;
    /// the frame's body is the message's body (see [`DeadLetter`]).
    DeadLetter(Box<DeadLetter>),
    /// A node asks the message server for dead letters (see
    /// [`DeadLetterQuery`]).
    DeadLetters(Box<DeadLetterQuery>),
    /// One entry of the answer to a [`Header::DeadLetters`] query; the
    /// frame's body is the message's body, if bodies were asked for.
    DeadLetterEntry {
        /// The query's token.
        token: u64,
        /// The entry.
        entry: Box<DeadLetter>,
    },
    /// The end of the answer to a [`Header::DeadLetters`] query.
    DeadLettersEnd {
        /// The query's token.
        token: u64,
        /// The queue's state after the query, or why it was refused.
        result: Result<DeadLetterStats, String>,
    },
}

/// Why a message went to the dead-letter queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeadReason {
    /// Its time to live ran out before it was delivered.
    Expired,
    /// Its target left the cluster for good, or was never in it.
    TargetGone,
    /// Its sender may not send to its target (`permissions.send`).
    NotPermitted,
    /// Every attempt its retry policy allowed failed.
    RetriesExhausted {
        /// The attempts made.
        attempts: u32,
        /// Why the last one failed.
        last: DeliveryFailure,
    },
    /// A one-way message that could not be delivered.
    Undeliverable(DeliveryFailure),
}

impl DeadReason {
    /// The reason a message that failed with `failure` is dead-lettered
    /// for, if it is: a target gone, a refusal by permissions, an expiry;
    /// any other failure of a one-way message (`one_way`), whose sender
    /// has nobody to tell. An acknowledged message's other failures are
    /// its sender's to handle, and not dead-lettered.
    pub fn for_failure(failure: &DeliveryFailure, one_way: bool) -> Option<DeadReason> {
        match failure {
            DeliveryFailure::UnknownTarget | DeliveryFailure::TargetStopped => {
                Some(DeadReason::TargetGone)
            }
            DeliveryFailure::NotPermitted => Some(DeadReason::NotPermitted),
            DeliveryFailure::Expired => Some(DeadReason::Expired),
            other if one_way => Some(DeadReason::Undeliverable(other.clone())),
            _ => None,
        }
    }

    /// A short name, for metrics and filters: `expired`, `target_gone`,
    /// `not_permitted`, `retries_exhausted`, `undeliverable`.
    pub fn name(&self) -> &'static str {
        match self {
            DeadReason::Expired => "expired",
            DeadReason::TargetGone => "target_gone",
            DeadReason::NotPermitted => "not_permitted",
            DeadReason::RetriesExhausted { .. } => "retries_exhausted",
            DeadReason::Undeliverable(_) => "undeliverable",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadReason::Expired => f.write_str("expired"),
            DeadReason::TargetGone => f.write_str("target gone"),
            DeadReason::NotPermitted => f.write_str("not permitted"),
            DeadReason::RetriesExhausted { attempts, last } => {
                write!(
                    f,
                    "retries exhausted after {attempts} attempts (last: {last})"
                )
            }
            DeadReason::Undeliverable(why) => write!(f, "undeliverable: {why}"),
        }
    }
}

/// One entry of the dead-letter queue: a message that was not delivered,
/// and why. Its body travels as the frame's body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its number in the queue, given by the message server (0 when a node
    /// files it).
    pub id: u64,
    /// The node that sent the message.
    pub sender: NodeId,
    /// Where it was going.
    pub target: Target,
    /// The service it addressed.
    pub service: String,
    /// Its priority.
    pub priority: Priority,
    /// Why it is here.
    pub reason: DeadReason,
    /// When it was dead-lettered, in Unix milliseconds.
    pub at_unix_ms: u64,
    /// The node that filed it (set by the message server from the
    /// connection it came on; empty for what the server filed itself).
    pub filed_by: String,
    /// Its body's length.
    pub body_bytes: u64,
}

/// Most entries a [`DeadLetterQuery`] names or returns.
pub const MAX_DEAD_LETTER_QUERY: usize = 10_000;

/// A query of the dead-letter queue: browse it, or take entries out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterQuery {
    /// Echoed in the answer.
    pub token: u64,
    /// Only these entries; empty: every entry after `after`.
    pub ids: Vec<u64>,
    /// With no `ids`: entries with a greater id (0: from the first).
    pub after: u64,
    /// With no `ids`: most entries answered (1 to
    /// [`MAX_DEAD_LETTER_QUERY`]).
    pub limit: u32,
    /// Remove the entries answered from the queue.
    pub take: bool,
    /// Carry their bodies.
    pub bodies: bool,
}

/// The dead-letter queue's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterStats {
    /// Entries held.
    pub entries: u64,
    /// Bytes of bodies held.
    pub bytes: u64,
    /// Entries ever added.
    pub added: u64,
    /// Messages that could not be held (the queue was full), ever.
    pub overflowed: u64,
    /// The queue's limits: entries and bytes.
    pub max_entries: u64,
    /// Its byte limit.
    pub max_bytes: u64,
    /// Of the entries added since the message server started, how many
    /// are known to be on disk (with `message_server.data_dir`; 0
    /// without): the first `durable` of them survive a crash of the
    /// server. Each is fsynced within one flush of being filed.
    pub durable: u64,
}

/// A stream's opening (and, on a new channel after the last broke, its
/// resumption): the message it is, and how long its body is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStart {
    /// The message: its sender, incarnation, sequence number (the
    /// stream's), service and priority. Its kind is `Notify`: the stream
    /// answers for itself.
    pub msg: MessageHeader,
    /// The body's length in bytes.
    pub len: u64,
}

impl Header {
    /// A short name of the variant for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Header::Hello(_) => "hello",
            Header::Welcome(_) => "welcome",
            Header::Refused(_) => "refused",
            Header::Message(_) => "message",
            Header::Routed(_) => "routed",
            Header::Ack(_) => "ack",
            Header::Member(_) => "member",
            Header::Subscribe { .. } => "subscribe",
            Header::Unsubscribe { .. } => "unsubscribe",
            Header::Subscribed { .. } => "subscribed",
            Header::Goodbye => "goodbye",
            Header::Resolve { .. } => "resolve",
            Header::Ping { .. } => "ping",
            Header::Pong { .. } => "pong",
            Header::Resolved { .. } => "resolved",
            Header::Acks(_) => "acks",
            Header::Challenge(_) => "challenge",
            Header::Proof(_) => "proof",
            Header::SubscribeRefused { .. } => "subscribe refused",
            Header::Interests(_) => "interests",
            Header::Report(_) => "report",
            Header::Trace(_) => "trace",
            Header::TraceStarted => "trace started",
            Header::Traced(_) => "traced",
            Header::TraceEnd { .. } => "trace end",
            Header::Credit { .. } => "credit",
            Header::StreamStart(_) => "stream start",
            Header::StreamChunk { .. } => "stream chunk",
            Header::StreamAck { .. } => "stream ack",
            Header::StreamFailed { .. } => "stream failed",
            Header::LowMark { .. } => "low mark",
            Header::LowCredit { .. } => "low credit",
            Header::DeadLetter(_) => "dead letter",
            Header::DeadLetters(_) => "dead letters",
            Header::DeadLetterEntry { .. } => "dead letter entry",
            Header::DeadLettersEnd { .. } => "dead letters end",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Short ids (kept inline) and long ones (shared) behave alike: equal
    /// by text, found by `&str` in a map, and the same on the wire as a
    /// plain string.
    #[test]
    fn node_ids_short_and_long_compare_hash_and_encode_as_strings() {
        let long = "a-node-id-well-past-twenty-three-bytes";
        for text in ["server-1", long, &"x".repeat(MAX_NAME_BYTES)] {
            let id = NodeId::new(text);
            let copy = id.clone();
            assert_eq!(id, copy);
            assert_eq!(id.as_str(), text);
            assert_eq!(id, *text);
            assert_eq!(NodeId::from(text.to_owned()), id);
            let mut map = HashMap::new();
            map.insert(copy, 7);
            assert_eq!(map.get(text), Some(&7));
            let encoded = postcard::to_stdvec(&id).expect("encodes");
            assert_eq!(encoded, postcard::to_stdvec(text).expect("encodes"));
            let decoded: NodeId = postcard::from_bytes(&encoded).expect("decodes");
            assert_eq!(decoded, id);
        }
        assert!(NodeId::new("a") < NodeId::new(long));
    }
}
