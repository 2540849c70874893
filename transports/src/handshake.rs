//! The handshake that opens every connection: the connecting end sends
//! [`Hello`], the accepting end answers [`Welcome`] or [`Refused`] and
//! closes. A version or cluster-name mismatch is a clear error on both ends:
//! the acceptor logs and refuses, the connector gets
//! [`HandshakeError::Refused`] with the reason.
//!
//! [`Refused`]: crate::protocol::Header::Refused

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::frame::{FrameCodec, FrameError, OutFrame, HANDSHAKE_MAX_FRAME_BYTES};
use crate::io::FrameReader;
use crate::protocol::{Header, Hello, Refusal, RefusalReason, Welcome, PROTOCOL_VERSION};
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

/// The connecting side: sends `hello`, waits for the answer.
///
/// The reader keeps any bytes that arrived after the answer.
///
/// # Errors
///
/// [`HandshakeError`]; in particular `Refused` with the peer's reason, and
/// `Mismatch` if the peer's `Welcome` is of another version or cluster.
pub async fn connect_handshake<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    hello: &Hello,
    timeout: Duration,
) -> Result<Welcome, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let exchange = async {
        write_frame(writer, OutFrame::control(Header::Hello(hello.clone()))).await?;
        match reader.next().await? {
            None => Err(HandshakeError::Closed),
            Some(frame) => match frame.into_parts().0 {
                Header::Welcome(welcome) => {
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
                    Ok(welcome)
                }
                Header::Refused(refusal) => Err(HandshakeError::Refused { refusal }),
                other => Err(HandshakeError::Unexpected {
                    expected: "welcome",
                    got: other.kind(),
                }),
            },
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    }
}

/// The accepting side, first half: reads the peer's [`Hello`].
///
/// A first frame that is not a `Hello` is answered with a
/// `ProtocolViolation` refusal.
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
        Ok(r) => r?,
    };
    match first {
        None => Err(HandshakeError::Closed),
        Some(frame) => match frame.into_parts().0 {
            Header::Hello(hello) => Ok(hello),
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

/// Checks a peer's [`Hello`] against our cluster name and credentials.
///
/// A refusal reveals nothing of this end (not its cluster name) and echoes
/// nothing long of the peer's: its cluster name comes back cut to
/// [`crate::protocol::MAX_NAME_BYTES`], its node id not at all.
///
/// # Errors
///
/// The [`Refusal`] to send back.
pub fn check_hello(hello: &Hello, cluster: &str, credentials: Option<&str>) -> Result<(), Refusal> {
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
    if let Some(expected) = credentials {
        if hello.credentials.as_deref() != Some(expected) {
            return Err(Refusal {
                reason: RefusalReason::BadCredentials,
                detail: "wrong or no credentials".into(),
            });
        }
    }
    Ok(())
}

/// The accepting side of a peer connection: reads the [`Hello`], checks it
/// against our cluster and credentials, and refuses a mismatch (telling the
/// peer why).
///
/// # Errors
///
/// [`HandshakeError::Mismatch`] with the reason when refused; otherwise as
/// [`read_hello`].
pub async fn accept_hello<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    cluster: &str,
    credentials: Option<&str>,
    timeout: Duration,
) -> Result<Hello, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello = read_hello(reader, writer, timeout).await?;
    if let Err(refusal) = check_hello(&hello, cluster, credentials) {
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

    fn hello(node: &str, cluster: &str, credentials: Option<&str>) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            cluster: cluster.into(),
            node: NodeId::new(node),
            incarnation: 1,
            role: Role::Server,
            groups: vec![],
            services: vec![],
            direct_addr: None,
            credentials: credentials.map(Into::into),
            max_message_bytes: 1,
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
        let cases: Vec<(&str, Hello, Option<&str>)> = vec![
            ("another cluster", hello("n", "other", None), None),
            ("a long cluster name", hello("n", &long, None), None),
            (
                "bad credentials",
                hello(&"n".repeat(200), ours, Some("guess")),
                Some("s3cret"),
            ),
        ];
        for (name, hello, credentials) in cases {
            let refusal = check_hello(&hello, ours, credentials).expect_err(name);
            let said = format!("{:?} {}", refusal.reason, refusal.detail);
            assert!(!said.contains(ours), "{name}: {said}");
            assert!(!said.contains("s3cret"), "{name}: {said}");
            assert!(said.len() < 600, "{name}: {} bytes", said.len());
            assert!(
                !said.contains(&"n".repeat(200)),
                "{name}: the node id echoed"
            );
        }
        assert!(check_hello(&hello("n", ours, Some("s3cret")), ours, Some("s3cret")).is_ok());
    }
}
