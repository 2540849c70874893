//! A node spoken by hand, for the hostile tests: it registers with the
//! real handshake (or a forged one) and then does exactly what a test
//! says, nothing more (no heartbeats of its own).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use transports::auth::{ClusterSecret, SessionKey, SessionMac};
use transports::frame::FrameCodec;
use transports::handshake::{self, HandshakeError, Opener};
use transports::heartbeat::Beat;
use transports::protocol::{Hello, Interests, NodeId, Role, Welcome, PROTOCOL_VERSION};
use transports::FrameReader;

/// A hello from `node` of `cluster`, naming `key`, with a fresh nonce.
pub fn hello(node: &str, cluster: &str, key: &SessionKey) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        cluster: cluster.to_owned(),
        node: NodeId::new(node),
        incarnation: 1,
        role: Role::Server,
        direct_addr: None,
        max_message_bytes: 1 << 20,
        nonce: transports::auth::random().unwrap_or_default(),
        session_key: key.public(),
        heartbeat_ip: None,
        rejoining: false,
    }
}

/// A registered hand-spoken node.
#[derive(Debug)]
pub struct RawNode {
    /// The connection's read half.
    pub reader: FrameReader<OwnedReadHalf>,
    /// The connection's write half.
    pub writer: OwnedWriteHalf,
    /// What the server answered.
    pub welcome: Welcome,
    /// Its id.
    pub id: NodeId,
    /// Its incarnation.
    pub incarnation: u64,
    /// Its session key.
    pub key: SessionKey,
    /// Where its heartbeats go.
    pub beat_to: SocketAddr,
    /// Its session's heartbeat key.
    pub session: SessionMac,
}

impl RawNode {
    /// Registers `hello` at the server at `addr`, in the groups and with
    /// the services of `interests`, signing with `key` and proving `secret`
    /// when given.
    ///
    /// # Errors
    ///
    /// The handshake's error (a refusal, say), or a welcome without a
    /// heartbeat address or session secret.
    pub async fn register(
        addr: SocketAddr,
        hello: Hello,
        interests: &Interests,
        key: SessionKey,
        secret: Option<&str>,
    ) -> anyhow::Result<RawNode> {
        let stream = TcpStream::connect(addr).await?;
        let (rd, mut writer) = stream.into_split();
        let mut reader = FrameReader::new(rd, FrameCodec::handshake());
        let secret = secret.map(ClusterSecret::new);
        let opener = Opener {
            key: &key,
            secret: secret.as_ref(),
            expect: None,
        };
        let welcome = handshake::connect_handshake(
            &mut reader,
            &mut writer,
            &hello,
            Some(interests),
            opener,
            Duration::from_secs(5),
        )
        .await?;
        *reader.codec_mut() = FrameCodec::for_messages(hello.max_message_bytes);
        let mut beat_to = welcome.heartbeat_addr.context("no heartbeat address")?;
        if beat_to.ip().is_unspecified() {
            beat_to.set_ip(addr.ip());
        }
        let secret = welcome.session_secret.context("no session secret")?;
        Ok(RawNode {
            reader,
            writer,
            id: hello.node.clone(),
            incarnation: hello.incarnation,
            welcome,
            key,
            beat_to,
            session: SessionMac::new(&secret),
        })
    }

    /// A correctly signed ping with `nonce`.
    pub fn ping(&self, nonce: u64) -> Beat {
        Beat::Ping {
            node: self.id.clone(),
            incarnation: self.incarnation,
            nonce,
            mac: self.session.ping_mac(&self.id, self.incarnation, nonce),
        }
    }
}

/// Whether `e` is a refusal for `reason`.
pub fn refused_for(e: &anyhow::Error, reason: &transports::protocol::RefusalReason) -> bool {
    matches!(
        e.downcast_ref::<HandshakeError>(),
        Some(HandshakeError::Refused { refusal }) if &refusal.reason == reason
    )
}
