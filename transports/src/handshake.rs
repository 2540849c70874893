//! The handshake that opens every connection, in two round trips:
//!
//! 1. the opener sends [`Hello`] (with its nonce and session key);
//! 2. the acceptor checks it and answers [`Challenge`] (its nonce, and its
//!    proofs: the cluster secret's MAC, a node's signature);
//! 3. the opener checks those and answers [`Proof`] (its MAC and its
//!    signature), and a node registering with the message server follows
//!    it with its [`Interests`] (groups and services);
//! 4. the acceptor checks the proof and answers [`Welcome`].
//!
//! Until a peer has proven who it is, it may send frames of a few KiB
//! ([`crate::frame::PRE_AUTH_MAX_FRAME_BYTES`]); afterwards, handshake
//! frames of up to [`HANDSHAKE_MAX_FRAME_BYTES`].
//!
//! Any step can instead be answered with [`Refused`] and a closed
//! connection. A version or cluster-name mismatch or a failed proof is a
//! clear error on both ends: the acceptor logs and refuses, the connector
//! gets [`HandshakeError::Refused`] with the reason. See [`crate::auth`]
//! for what each proof shows.
//!
//! [`Refused`]: crate::protocol::Header::Refused

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::auth::{self, ClusterSecret, SessionKey};
use crate::frame::{FrameCodec, FrameError, OutFrame, HANDSHAKE_MAX_FRAME_BYTES};
use crate::io::FrameReader;
use crate::protocol::{
    Challenge, Header, Hello, Interests, Nonce, Proof, PublicKey, Refusal, RefusalReason,
    SessionSecret, Welcome, PROTOCOL_VERSION,
};
use tokio_util::codec::Encoder;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The other end refused us.
    #[error("the peer refused the connection: {} ({})", .refusal.reason, .refusal.detail)]
    Refused {
        /// What the peer said.
        refusal: Refusal,
    },
    /// We refused the other end (and told it why).
    #[error("refused the peer: {0}")]
    Mismatch(RefusalReason),
    /// The peer sent another frame than the handshake expects.
    #[error("expected a {expected} frame, got {got}")]
    Unexpected {
        /// What we waited for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The peer did not prove what it must (the cluster secret, or the
    /// session key of the member it was meant to be).
    #[error("the peer failed authentication: {0}")]
    Unauthenticated(&'static str),
    /// This end could not make its nonce (the system's random number
    /// generator failed).
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// The peer closed the connection during the handshake.
    #[error("the peer closed the connection during the handshake")]
    Closed,
    /// The handshake did not complete in time.
    #[error("the handshake did not complete within {0:?}")]
    Timeout(Duration),
    /// A frame error (oversized, undecodable) or an i/o error.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// How long an accepting end waits for a connection's hello before it
/// closes the connection: an unauthenticated peer holds a connection no
/// longer than this (less if the configured connect timeout is shorter).
pub const HELLO_DEADLINE: Duration = Duration::from_secs(2);

/// The most characters of a peer's string that are logged.
pub const LOGGED_CHARS: usize = 64;

/// A string a peer chose, as it may be logged: at most [`LOGGED_CHARS`]
/// characters, control characters and quotes escaped (a newline cannot
/// forge a log line), and the full length said when it was cut.
pub fn for_log(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(LOGGED_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(LOGGED_CHARS).is_some() {
        out.push_str(&format!("... ({} bytes)", s.len()));
    }
    out
}

/// Refusals logged in full in each minute; past that, only the ones whose
/// count is a power of two, so that a flood of bad hellos cannot flood the
/// log.
pub const REFUSALS_LOGGED_PER_MINUTE: u64 = 16;

/// Counts a listener's refusals per minute and says which to log.
#[derive(Debug)]
pub struct RefusalLog {
    /// When this minute began, and the refusals in it.
    window: std::sync::Mutex<(std::time::Instant, u64)>,
}

impl Default for RefusalLog {
    fn default() -> RefusalLog {
        RefusalLog {
            window: std::sync::Mutex::new((std::time::Instant::now(), 0)),
        }
    }
}

impl RefusalLog {
    /// Counts a refusal; whether to log it. When a minute with refusals
    /// left unlogged ends, says how many there were.
    pub fn admit(&self) -> bool {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let (start, count) = &mut *window;
        if start.elapsed() >= Duration::from_secs(60) {
            if *count > REFUSALS_LOGGED_PER_MINUTE {
                tracing::warn!(
                    refusals = *count,
                    "refused connections in the last minute; not all were logged"
                );
            }
            *start = std::time::Instant::now();
            *count = 0;
        }
        *count += 1;
        let n = *count;
        if n == REFUSALS_LOGGED_PER_MINUTE + 1 {
            tracing::warn!("more refusals this minute: only every power of two is logged now");
        }
        n <= REFUSALS_LOGGED_PER_MINUTE || n.is_power_of_two()
    }
}

/// Writes one frame directly (outside any writer task).
///
/// # Errors
///
/// The frame or i/o error.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    frame: OutFrame,
) -> Result<(), FrameError> {
    let mut buf = bytes::BytesMut::new();
    FrameCodec::new(HANDSHAKE_MAX_FRAME_BYTES.max(frame.payload_len() + HANDSHAKE_MAX_FRAME_BYTES))
        .encode(frame, &mut buf)?;
    io.write_all(&buf).await?;
    io.flush().await?;
    Ok(())
}

/// What a handshake proves over: the opener's hello as encoded, and the
/// acceptor's nonce, length-prefixed and labelled with who proves.
fn transcript<'a>(label: &'a [u8], hello: &'a [u8], acceptor_nonce: &'a Nonce) -> [&'a [u8]; 4] {
    [b"clustercomm handshake", label, hello, acceptor_nonce]
}

fn encoded(hello: &Hello) -> Result<Vec<u8>, HandshakeError> {
    postcard::to_allocvec(hello).map_err(|e| HandshakeError::Frame(FrameError::Header(e)))
}

/// What the opening end proves itself with, and whom it means to reach.
#[derive(Debug, Clone, Copy)]
pub struct Opener<'a> {
    /// This incarnation's session key; the hello names its public half.
    pub key: &'a SessionKey,
    /// The cluster secret, when the cluster has one.
    pub secret: Option<&'a ClusterSecret>,
    /// A member's session key when opening a direct channel to it: the
    /// acceptor must sign with it. `None` for the message server.
    pub expect: Option<&'a PublicKey>,
}

/// The connecting side: sends `hello`, answers the acceptor's challenge
/// (followed by `interests` when given: a node registering with the message
/// server), and waits for the welcome.
///
/// The acceptor must prove the cluster secret when `opener` has one, and
/// sign with the expected session key when one is given. Until it has,
/// the reader takes frames of at most
/// [`crate::frame::PRE_AUTH_MAX_FRAME_BYTES`] (its codec should be
/// [`FrameCodec::handshake`]); the welcome may be up to
/// [`HANDSHAKE_MAX_FRAME_BYTES`]. A session secret in the welcome comes
/// back unmasked.
///
/// The reader keeps any bytes that arrived after the answer.
///
/// # Errors
///
/// [`HandshakeError`]; in particular `Refused` with the peer's reason,
/// `Unauthenticated` if the acceptor does not prove what it must, and
/// `Mismatch` if its `Welcome` is of another version or cluster.
pub async fn connect_handshake<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    hello: &Hello,
    interests: Option<&Interests>,
    opener: Opener<'_>,
    timeout: Duration,
) -> Result<Welcome, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let exchange = async {
        write_frame(
            writer,
            OutFrame::control(Header::Hello(Box::new(hello.clone()))),
        )
        .await?;
        let challenge = match next_header(reader).await? {
            Header::Challenge(c) => c,
            Header::Refused(refusal) => return Err(HandshakeError::Refused { refusal }),
            other => {
                return Err(HandshakeError::Unexpected {
                    expected: "challenge",
                    got: other.kind(),
                })
            }
        };
        let hello_bytes = encoded(hello)?;
        let theirs = transcript(b"acceptor", &hello_bytes, &challenge.nonce);
        let secret_proven = opener.secret.is_none_or(|secret| {
            challenge
                .secret_proof
                .is_some_and(|mac| secret.verify(&theirs, &mac))
        });
        let signed = opener.expect.is_none_or(|expected| {
            challenge
                .signature
                .as_deref()
                .is_some_and(|sig| auth::verify_signature(expected, &auth::framed(&theirs), sig))
        });
        let failed = match (secret_proven, signed) {
            (false, _) => Some("the acceptor did not prove the cluster secret (do both ends have the same cluster.credentials?)"),
            (_, false) => Some("the acceptor is not the member it was meant to be: its session key did not sign"),
            _ => None,
        };
        if let Some(why) = failed {
            let detail = "wrong or no credentials".to_owned();
            refuse(writer, RefusalReason::BadCredentials, detail).await;
            return Err(HandshakeError::Unauthenticated(why));
        }
        let ours = transcript(b"opener", &hello_bytes, &challenge.nonce);
        let proof = Proof {
            secret_proof: opener.secret.map(|s| s.mac(&ours)),
            signature: opener.key.sign(&auth::framed(&ours)).to_vec(),
        };
        write_frame(writer, OutFrame::control(Header::Proof(proof))).await?;
        if let Some(interests) = interests {
            let frame = OutFrame::control(Header::Interests(Box::new(interests.clone())));
            write_frame(writer, frame).await?;
        }
        // The acceptor proved what it had to: its welcome may list the
        // whole cluster.
        raise_limit(reader);
        match next_header(reader).await? {
            Header::Welcome(welcome) => {
                let mut welcome = *welcome;
                if welcome.version != hello.version {
                    return Err(HandshakeError::Mismatch(RefusalReason::VersionMismatch {
                        ours: hello.version,
                        theirs: welcome.version,
                    }));
                }
                if welcome.cluster != hello.cluster {
                    return Err(HandshakeError::Mismatch(RefusalReason::ClusterMismatch {
                        ours: hello.cluster.clone(),
                        theirs: welcome.cluster,
                    }));
                }
                if let (Some(secret), Some(masked)) = (opener.secret, welcome.session_secret) {
                    welcome.session_secret = Some(auth::xor(
                        &masked,
                        &secret.session_mask(&hello.nonce, &challenge.nonce),
                    ));
                }
                Ok(welcome)
            }
            Header::Refused(refusal) => Err(HandshakeError::Refused { refusal }),
            other => Err(HandshakeError::Unexpected {
                expected: "welcome",
                got: other.kind(),
            }),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    }
}

/// Lets the reader take handshake frames of up to
/// [`HANDSHAKE_MAX_FRAME_BYTES`], once the peer has proven who it is.
fn raise_limit<R: AsyncRead + Unpin>(reader: &mut FrameReader<R>) {
    let codec = reader.codec_mut();
    let max = codec.max_frame().max(HANDSHAKE_MAX_FRAME_BYTES);
    codec.set_max_frame(max);
}

async fn next_header<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<Header, HandshakeError> {
    match reader.next().await? {
        None => Err(HandshakeError::Closed),
        Some(frame) => Ok(frame.into_parts().0),
    }
}

/// The accepting side, second half (after the caller's own checks of the
/// hello): challenges the opener and checks its proof. The opener must
/// prove the cluster secret when `secret` is given, and always sign with
/// the session key its hello names. A node passes its own `key` to sign
/// in return; the message server has none.
///
/// Returns the acceptor's nonce (for [`mask_session_secret`]). Once the
/// proof holds, the reader takes frames of up to
/// [`HANDSHAKE_MAX_FRAME_BYTES`] (see [`read_interests`]); until then its
/// limit stays that of [`FrameCodec::handshake`].
///
/// # Errors
///
/// [`HandshakeError::Mismatch`] with `BadCredentials` (and the opener is
/// told so, and nothing more) when the proof fails; otherwise as
/// [`read_hello`].
pub async fn challenge<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    hello: &Hello,
    secret: Option<&ClusterSecret>,
    key: Option<&SessionKey>,
    timeout: Duration,
) -> Result<Nonce, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let nonce: Nonce = auth::random()
        .map_err(|e| HandshakeError::Frame(FrameError::Io(std::io::Error::other(e.to_string()))))?;
    let hello_bytes = encoded(hello)?;
    let ours = transcript(b"acceptor", &hello_bytes, &nonce);
    let challenge = Challenge {
        nonce,
        secret_proof: secret.map(|s| s.mac(&ours)),
        signature: key.map(|k| k.sign(&auth::framed(&ours)).to_vec()),
    };
    let exchange = async {
        write_frame(writer, OutFrame::control(Header::Challenge(challenge))).await?;
        match next_header(reader).await? {
            Header::Proof(proof) => Ok(proof),
            // The opener did not believe our proofs.
            Header::Refused(refusal) => Err(HandshakeError::Refused { refusal }),
            other => Err(HandshakeError::Unexpected {
                expected: "proof",
                got: other.kind(),
            }),
        }
    };
    let proof = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(proof)) => proof,
        Ok(Err(e)) => {
            if let HandshakeError::Unexpected { got, .. } = &e {
                let detail = format!("expected a proof frame, got {got}");
                refuse(writer, RefusalReason::ProtocolViolation, detail).await;
            }
            return Err(e);
        }
        Err(_) => return Err(HandshakeError::Timeout(timeout)),
    };
    let theirs = transcript(b"opener", &hello_bytes, &nonce);
    let secret_ok = secret.is_none_or(|s| {
        proof
            .secret_proof
            .is_some_and(|mac| s.verify(&theirs, &mac))
    });
    let signed =
        auth::verify_signature(&hello.session_key, &auth::framed(&theirs), &proof.signature);
    if !(secret_ok && signed) {
        let reason = RefusalReason::BadCredentials;
        refuse(writer, reason.clone(), "wrong or no credentials".into()).await;
        return Err(HandshakeError::Mismatch(reason));
    }
    raise_limit(reader);
    Ok(nonce)
}

/// The message server's side, after [`challenge`]: reads the node's
/// [`Interests`]. Another frame is answered with a `ProtocolViolation`
/// refusal.
///
/// # Errors
///
/// As [`read_hello`].
pub async fn read_interests<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    timeout: Duration,
) -> Result<Interests, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let header = match tokio::time::timeout(timeout, next_header(reader)).await {
        Err(_) => return Err(HandshakeError::Timeout(timeout)),
        Ok(h) => h?,
    };
    match header {
        Header::Interests(interests) => Ok(*interests),
        other => {
            let got = other.kind();
            let detail = format!("expected the node's groups and services, got {got}");
            refuse(writer, RefusalReason::ProtocolViolation, detail).await;
            Err(HandshakeError::Unexpected {
                expected: "interests",
                got,
            })
        }
    }
}

/// The session secret as the message server puts it in a `Welcome`:
/// masked under the cluster secret when there is one.
pub fn mask_session_secret(
    session: &SessionSecret,
    secret: Option<&ClusterSecret>,
    opener_nonce: &Nonce,
    acceptor_nonce: &Nonce,
) -> SessionSecret {
    match secret {
        Some(s) => auth::xor(session, &s.session_mask(opener_nonce, acceptor_nonce)),
        None => *session,
    }
}

/// The accepting side, first half: reads the peer's [`Hello`].
///
/// A first frame that is not a `Hello`, or is larger than the reader's
/// limit, is answered with a `ProtocolViolation` refusal.
///
/// # Errors
///
/// [`HandshakeError`]; the caller closes the connection.
pub async fn read_hello<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    timeout: Duration,
) -> Result<Hello, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let first = match tokio::time::timeout(timeout, reader.next()).await {
        Err(_) => return Err(HandshakeError::Timeout(timeout)),
        Ok(Err(FrameError::TooLarge { declared, max })) => {
            let detail = format!(
                "a frame of {declared} bytes before authentication; the limit is {max} bytes"
            );
            refuse(writer, RefusalReason::ProtocolViolation, detail).await;
            return Err(HandshakeError::Frame(FrameError::TooLarge {
                declared,
                max,
            }));
        }
        Ok(r) => r?,
    };
    match first {
        None => Err(HandshakeError::Closed),
        Some(frame) => match frame.into_parts().0 {
            Header::Hello(hello) => Ok(*hello),
            other => {
                let got = other.kind();
                refuse(
                    writer,
                    RefusalReason::ProtocolViolation,
                    format!("expected a hello frame first, got {got}"),
                )
                .await;
                Err(HandshakeError::Unexpected {
                    expected: "hello",
                    got,
                })
            }
        },
    }
}

/// Checks a peer's [`Hello`] against our version and cluster name (its
/// credentials are checked by [`challenge`]).
///
/// A refusal reveals nothing of this end (not its cluster name) and echoes
/// nothing long of the peer's: its cluster name comes back cut to
/// [`crate::protocol::MAX_NAME_BYTES`], its node id not at all.
///
/// # Errors
///
/// The [`Refusal`] to send back.
pub fn check_hello(hello: &Hello, cluster: &str) -> Result<(), Refusal> {
    if hello.version != PROTOCOL_VERSION {
        return Err(Refusal {
            reason: RefusalReason::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: hello.version,
            },
            detail: format!(
                "the hello speaks protocol version {}, this end speaks {}",
                hello.version, PROTOCOL_VERSION
            ),
        });
    }
    if hello.cluster != cluster {
        let mut theirs = hello.cluster.clone();
        let mut cut = theirs.len().min(crate::protocol::MAX_NAME_BYTES);
        while !theirs.is_char_boundary(cut) {
            cut -= 1;
        }
        theirs.truncate(cut);
        return Err(Refusal {
            reason: RefusalReason::ClusterMismatch {
                ours: String::new(),
                theirs,
            },
            detail: "the hello names another cluster".into(),
        });
    }
    Ok(())
}

/// The accepting side of a peer connection, first half: reads the
/// [`Hello`], checks it against our version and cluster, and refuses a
/// mismatch (telling the peer why). [`challenge`] comes next.
///
/// # Errors
///
/// [`HandshakeError::Mismatch`] with the reason when refused; otherwise as
/// [`read_hello`].
pub async fn accept_hello<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    cluster: &str,
    timeout: Duration,
) -> Result<Hello, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello = read_hello(reader, writer, timeout).await?;
    if let Err(refusal) = check_hello(&hello, cluster) {
        refuse(writer, refusal.reason.clone(), refusal.detail).await;
        return Err(HandshakeError::Mismatch(refusal.reason));
    }
    Ok(hello)
}

/// Sends a refusal, best effort (the connection is closed next anyway).
pub async fn refuse<W: AsyncWrite + Unpin>(writer: &mut W, reason: RefusalReason, detail: String) {
    let frame = OutFrame::control(Header::Refused(Refusal { reason, detail }));
    if let Err(e) = write_frame(writer, frame).await {
        tracing::debug!(error = %e, "could not send refusal");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{NodeId, Role};

    fn hello(node: &str, cluster: &str) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            cluster: cluster.into(),
            node: NodeId::new(node),
            incarnation: 1,
            role: Role::Server,
            direct_addr: None,
            max_message_bytes: 1,
            nonce: [3; 16],
            session_key: [0; 32],
            heartbeat_ip: None,
            rejoining: false,
        }
    }

    #[test]
    fn a_peer_string_is_logged_short_and_escaped() {
        let cases = [
            ("short", "short"),
            ("line\nbreak", r"line\nbreak"),
            ("quote\"", r#"quote\""#),
            ("tab\tand\u{1b}[31m", r"tab\tand\u{1b}[31m"),
        ];
        for (input, expected) in cases {
            assert_eq!(for_log(input), expected, "{input:?}");
        }
        let huge = format!("{}\n{}", "x".repeat(100), "y".repeat(900_000));
        let logged = for_log(&huge);
        assert!(!logged.contains('\n'), "no raw newline");
        assert!(
            logged.len() < 2 * LOGGED_CHARS + 32,
            "{} bytes",
            logged.len()
        );
        assert!(logged.ends_with(&format!("({} bytes)", huge.len())));
    }

    #[test]
    fn refusals_reveal_nothing_and_echo_nothing_long() {
        let ours = "the-real-cluster";
        let long = "c".repeat(10_000);
        let cases: Vec<(&str, Hello)> = vec![
            ("another cluster", hello("n", "other")),
            ("a long cluster name", hello(&"n".repeat(200), &long)),
        ];
        for (name, hello) in cases {
            let refusal = check_hello(&hello, ours).expect_err(name);
            let said = format!("{:?} {}", refusal.reason, refusal.detail);
            assert!(!said.contains(ours), "{name}: {said}");
            assert!(!said.contains("s3cret"), "{name}: {said}");
            assert!(said.len() < 600, "{name}: {} bytes", said.len());
            assert!(
                !said.contains(&"n".repeat(200)),
                "{name}: the node id echoed"
            );
        }
        assert!(check_hello(&hello("n", ours), ours).is_ok());
    }

    /// How one end of a handshake test is set up.
    struct Side {
        secret: Option<&'static str>,
    }

    struct Case {
        name: &'static str,
        opener: Side,
        acceptor: Side,
        /// The opener's hello names another key than it signs with.
        foreign_key: bool,
        /// The opener expects the acceptor to sign with another key.
        wrong_acceptor: bool,
        /// What the opener gets: `Ok`, or the start of its error.
        opener_gets: Result<(), &'static str>,
    }

    async fn run(
        case: &Case,
    ) -> (
        Result<Welcome, HandshakeError>,
        Result<Nonce, HandshakeError>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ard, mut awr) = tokio::io::split(a);
        let (brd, mut bwr) = tokio::io::split(b);
        let opener_key = SessionKey::generate().expect("key");
        let signer = SessionKey::generate().expect("key");
        let acceptor_key = SessionKey::generate().expect("key");
        let stranger = SessionKey::generate().expect("key");
        let mut h = hello("n", "c");
        h.session_key = if case.foreign_key {
            signer.public()
        } else {
            opener_key.public()
        };
        let opener_secret = case.opener.secret.map(ClusterSecret::new);
        let acceptor_secret = case.acceptor.secret.map(ClusterSecret::new);
        let expect = if case.wrong_acceptor {
            stranger.public()
        } else {
            acceptor_key.public()
        };
        let t = Duration::from_secs(5);
        let opener = async {
            let mut reader = FrameReader::new(ard, FrameCodec::default());
            let opener = Opener {
                key: &opener_key,
                secret: opener_secret.as_ref(),
                expect: Some(&expect),
            };
            let r = connect_handshake(&mut reader, &mut awr, &h, None, opener, t).await;
            drop(awr);
            r
        };
        let acceptor = async {
            let mut reader = FrameReader::new(brd, FrameCodec::default());
            let hello = accept_hello(&mut reader, &mut bwr, "c", t).await?;
            let nonce = challenge(
                &mut reader,
                &mut bwr,
                &hello,
                acceptor_secret.as_ref(),
                Some(&acceptor_key),
                t,
            )
            .await?;
            let session = [9u8; 32];
            let welcome = Welcome {
                version: PROTOCOL_VERSION,
                cluster: "c".into(),
                max_message_bytes: 1,
                members: vec![],
                heartbeat_addr: None,
                session_secret: Some(mask_session_secret(
                    &session,
                    acceptor_secret.as_ref(),
                    &hello.nonce,
                    &nonce,
                )),
            };
            write_frame(
                &mut bwr,
                OutFrame::control(Header::Welcome(Box::new(welcome))),
            )
            .await?;
            drop(bwr);
            Ok(nonce)
        };
        tokio::join!(opener, acceptor)
    }

    /// Before its proof a peer may send a few KiB a frame; after it, its
    /// interests may list the most groups and services a node may have.
    #[tokio::test]
    async fn only_a_proven_peer_may_send_large_frames() {
        use crate::protocol::{MAX_NAMES_PER_NODE, MAX_NAME_BYTES};
        let t = Duration::from_secs(5);
        let secret = ClusterSecret::new("s3cret");

        // A hello over the pre-authentication limit is refused unread.
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (_ard, mut awr) = tokio::io::split(a);
        let (brd, mut bwr) = tokio::io::split(b);
        let mut big = hello("n", "c");
        big.cluster = "c".repeat(crate::frame::PRE_AUTH_MAX_FRAME_BYTES);
        write_frame(&mut awr, OutFrame::control(Header::Hello(Box::new(big))))
            .await
            .expect("write");
        let mut reader = FrameReader::new(brd, FrameCodec::handshake());
        match read_hello(&mut reader, &mut bwr, t).await {
            Err(HandshakeError::Frame(FrameError::TooLarge { max, .. })) => {
                assert_eq!(max, crate::frame::PRE_AUTH_MAX_FRAME_BYTES);
            }
            other => panic!("expected a frame too large, got {other:?}"),
        }

        // The largest interests pass once the proof holds.
        let name = |i: usize| format!("{i:0>width$}", width = MAX_NAME_BYTES);
        let interests = Interests {
            groups: (0..MAX_NAMES_PER_NODE).map(name).collect(),
            services: (0..MAX_NAMES_PER_NODE).map(name).collect(),
        };
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ard, mut awr) = tokio::io::split(a);
        let (brd, mut bwr) = tokio::io::split(b);
        let key = SessionKey::generate().expect("key");
        let mut h = hello("n", "c");
        h.session_key = key.public();
        let opener = async {
            let mut reader = FrameReader::new(ard, FrameCodec::handshake());
            let opener = Opener {
                key: &key,
                secret: Some(&secret),
                expect: None,
            };
            connect_handshake(&mut reader, &mut awr, &h, Some(&interests), opener, t).await
        };
        let acceptor = async {
            let mut reader = FrameReader::new(brd, FrameCodec::handshake());
            let hello = accept_hello(&mut reader, &mut bwr, "c", t).await?;
            challenge(&mut reader, &mut bwr, &hello, Some(&secret), None, t).await?;
            let got = read_interests(&mut reader, &mut bwr, t).await?;
            let welcome = Welcome {
                version: PROTOCOL_VERSION,
                cluster: "c".into(),
                max_message_bytes: 1,
                members: vec![],
                heartbeat_addr: None,
                session_secret: None,
            };
            write_frame(
                &mut bwr,
                OutFrame::control(Header::Welcome(Box::new(welcome))),
            )
            .await?;
            Ok::<_, HandshakeError>(got)
        };
        let (welcome, got) = tokio::join!(opener, acceptor);
        welcome.expect("welcomed");
        assert_eq!(got.expect("interests read"), interests);
    }

    #[tokio::test]
    async fn each_end_proves_what_the_other_requires() {
        let s = |secret| Side { secret };
        let cases = [
            Case {
                name: "same secret",
                opener: s(Some("s3cret")),
                acceptor: s(Some("s3cret")),
                foreign_key: false,
                wrong_acceptor: false,
                opener_gets: Ok(()),
            },
            Case {
                name: "no secret on either end",
                opener: s(None),
                acceptor: s(None),
                foreign_key: false,
                wrong_acceptor: false,
                opener_gets: Ok(()),
            },
            Case {
                name: "opener without the secret",
                opener: s(None),
                acceptor: s(Some("s3cret")),
                foreign_key: false,
                wrong_acceptor: false,
                opener_gets: Err("the peer refused the connection: bad credentials"),
            },
            Case {
                name: "opener with another secret",
                opener: s(Some("guess")),
                acceptor: s(Some("s3cret")),
                foreign_key: false,
                wrong_acceptor: false,
                opener_gets: Err("the peer failed authentication"),
            },
            Case {
                name: "acceptor without the secret",
                opener: s(Some("s3cret")),
                acceptor: s(None),
                foreign_key: false,
                wrong_acceptor: false,
                opener_gets: Err("the peer failed authentication"),
            },
            Case {
                name: "a hello naming a key the opener does not hold",
                opener: s(Some("s3cret")),
                acceptor: s(Some("s3cret")),
                foreign_key: true,
                wrong_acceptor: false,
                opener_gets: Err("the peer refused the connection: bad credentials"),
            },
            Case {
                name: "an acceptor that is not the member meant",
                opener: s(None),
                acceptor: s(None),
                foreign_key: false,
                wrong_acceptor: true,
                opener_gets: Err("the peer failed authentication: the acceptor is not"),
            },
        ];
        for case in &cases {
            let (opened, accepted) = run(case).await;
            match (&case.opener_gets, &opened) {
                (Ok(()), Ok(welcome)) => {
                    assert_eq!(welcome.session_secret, Some([9; 32]), "{}", case.name);
                    assert!(accepted.is_ok(), "{}: {accepted:?}", case.name);
                }
                (Err(start), Err(e)) => {
                    assert!(
                        e.to_string().starts_with(start),
                        "{}: got {e}, wanted {start}",
                        case.name
                    );
                    assert!(accepted.is_err(), "{}: the acceptor accepted", case.name);
                }
                (wanted, got) => panic!("{}: wanted {wanted:?}, got {got:?}", case.name),
            }
        }
    }
}
