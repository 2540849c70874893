//! Who is at the other end: the cluster secret's challenge and response,
//! and the session key that proves one incarnation of a node.
//!
//! Two proofs guard every TCP connection (see [`crate::handshake`]):
//!
//! - **The cluster secret** (`cluster.credentials`), when configured. Each
//!   end answers the other's fresh nonce with an HMAC-SHA256 under the
//!   secret, over both nonces and the opener's hello. The secret never
//!   crosses the wire and a recorded exchange cannot be replayed. Both
//!   ends prove it: the opener learns that the acceptor holds it too.
//! - **The session key**: every incarnation of a node makes an Ed25519 key
//!   pair when it starts and says its public half in its hello; the
//!   message server tells every member (in [`crate::protocol::MemberInfo`]).
//!   Whoever signs the handshake's transcript with the private half is
//!   that incarnation: only it can take over its own registration at the
//!   message server, open a direct channel as that node, or answer one.
//!
//! The message server also hands each registered node a per-session
//! secret in its `Welcome` (masked under the cluster secret, so that it
//! never crosses the wire readable when there is one). Heartbeats carry a
//! MAC under it.

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, Ed25519KeyPair, KeyPair};

use crate::protocol::NodeId;
pub use crate::protocol::{
    BeatMac, Mac, Nonce, PublicKey, SessionSecret, BEAT_MAC_BYTES, MAC_BYTES, NONCE_BYTES,
    PUBLIC_KEY_BYTES, SESSION_SECRET_BYTES,
};

/// Bytes of a signature (Ed25519).
pub const SIGNATURE_BYTES: usize = 64;

/// Why an authentication step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// The session key could not be made.
    #[error("could not make a session key")]
    KeyGeneration,
}

/// Fills `N` bytes from the system's random number generator.
///
/// # Errors
///
/// [`AuthError::Random`] if the generator fails.
pub fn random<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| AuthError::Random)?;
    Ok(out)
}

/// The cluster secret: `cluster.credentials`, as an HMAC key.
#[derive(Clone)]
pub struct ClusterSecret {
    key: hmac::Key,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// The secret from its configured text.
    pub fn new(secret: &str) -> ClusterSecret {
        ClusterSecret {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        }
    }

    /// The MAC over `parts` (each length-prefixed, so that no two
    /// different lists of parts give the same input).
    pub fn mac(&self, parts: &[&[u8]]) -> Mac {
        mac(&self.key, parts)
    }

    /// Whether `mac` is the MAC over `parts`, compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], mac: &Mac) -> bool {
        verify(&self.key, parts, mac)
    }

    /// The mask that hides a session secret on the wire: a pseudo-random
    /// pad from the handshake's two nonces, used once.
    pub fn session_mask(&self, opener: &Nonce, acceptor: &Nonce) -> SessionSecret {
        self.mac(&[b"session-mask", opener, acceptor])
    }
}

/// `parts`, each after its length: what every MAC and signature covers,
/// so that no two different lists of parts give the same bytes.
pub fn framed(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for part in parts {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn mac(key: &hmac::Key, parts: &[&[u8]]) -> Mac {
    let tag = hmac::sign(key, &framed(parts));
    let mut out = [0u8; MAC_BYTES];
    out.copy_from_slice(tag.as_ref());
    out
}

fn verify(key: &hmac::Key, parts: &[&[u8]], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let actual = mac(key, parts);
    let n = expected.len().min(MAC_BYTES);
    // An empty or overlong MAC never matches.
    expected.len() == n && n > 0 && bool::from(actual[..n].ct_eq(expected))
}

/// A session secret with its HMAC key: what heartbeats are signed with.
#[derive(Clone)]
pub struct SessionMac {
    key: hmac::Key,
}

impl std::fmt::Debug for SessionMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionMac(..)")
    }
}

impl SessionMac {
    /// The key of a session secret.
    pub fn new(secret: &SessionSecret) -> SessionMac {
        SessionMac {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// A heartbeat MAC over `parts`.
    pub fn beat_mac(&self, parts: &[&[u8]]) -> BeatMac {
        let full = mac(&self.key, parts);
        let mut out = [0u8; BEAT_MAC_BYTES];
        out.copy_from_slice(&full[..BEAT_MAC_BYTES]);
        out
    }

    /// Whether `mac` is the heartbeat MAC over `parts` (constant time).
    pub fn verify_beat(&self, parts: &[&[u8]], mac: &BeatMac) -> bool {
        verify(&self.key, parts, mac)
    }

    /// The MAC of a node's ping.
    pub fn ping_mac(&self, node: &NodeId, incarnation: u64, nonce: u64) -> BeatMac {
        self.beat_mac(&ping_parts(
            node,
            &incarnation.to_be_bytes(),
            &nonce.to_be_bytes(),
        ))
    }

    /// Whether `mac` is the MAC of this ping.
    pub fn verify_ping(&self, node: &NodeId, incarnation: u64, nonce: u64, mac: &BeatMac) -> bool {
        self.verify_beat(
            &ping_parts(node, &incarnation.to_be_bytes(), &nonce.to_be_bytes()),
            mac,
        )
    }

    /// The MAC of the server's pong to a ping.
    pub fn pong_mac(&self, nonce: u64) -> BeatMac {
        self.beat_mac(&[b"pong", &nonce.to_be_bytes()])
    }

    /// Whether `mac` is the MAC of the pong to the ping with `nonce`.
    pub fn verify_pong(&self, nonce: u64, mac: &BeatMac) -> bool {
        self.verify_beat(&[b"pong", &nonce.to_be_bytes()], mac)
    }
}

fn ping_parts<'a>(node: &'a NodeId, incarnation: &'a [u8], nonce: &'a [u8]) -> [&'a [u8]; 4] {
    [b"ping", node.as_str().as_bytes(), incarnation, nonce]
}

/// XORs a session secret with a mask (masking and unmasking alike).
pub fn xor(secret: &SessionSecret, mask: &SessionSecret) -> SessionSecret {
    let mut out = *secret;
    for (o, m) in out.iter_mut().zip(mask) {
        *o ^= m;
    }
    out
}

/// One incarnation's Ed25519 key pair: made when a node starts, never
/// stored, never sent (only its public half is).
pub struct SessionKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKey")
            .field("public", &hex(&self.public[..8]))
            .finish_non_exhaustive()
    }
}

impl SessionKey {
    /// A fresh key pair.
    ///
    /// # Errors
    ///
    /// [`AuthError::KeyGeneration`] if the system cannot make one.
    pub fn generate() -> Result<SessionKey, AuthError> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| AuthError::KeyGeneration)?;
        let pair =
            Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| AuthError::KeyGeneration)?;
        let mut public = [0u8; PUBLIC_KEY_BYTES];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(SessionKey { pair, public })
    }

    /// The public half, as members see it.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// Signs a transcript.
    pub fn sign(&self, transcript: &[u8]) -> [u8; SIGNATURE_BYTES] {
        let sig = self.pair.sign(transcript);
        let mut out = [0u8; SIGNATURE_BYTES];
        out.copy_from_slice(sig.as_ref());
        out
    }
}

/// Whether `sig` is `public`'s signature of `transcript`.
pub fn verify_signature(public: &PublicKey, transcript: &[u8], sig: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, public)
        .verify(transcript, sig)
        .is_ok()
}

/// A short hex form of bytes, for logs.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_bind_every_part_and_compare_whole() {
        let secret = ClusterSecret::new("s3cret");
        let m = secret.mac(&[b"ab", b"c"]);
        assert!(secret.verify(&[b"ab", b"c"], &m));
        // The parts are length-prefixed: moving a byte across a border
        // changes the MAC.
        assert!(!secret.verify(&[b"a", b"bc"], &m));
        assert!(!ClusterSecret::new("other").verify(&[b"ab", b"c"], &m));
        let mut flipped = m;
        flipped[31] ^= 1;
        assert!(!secret.verify(&[b"ab", b"c"], &flipped));
    }

    #[test]
    fn beat_macs_are_truncated_and_checked() {
        let key = SessionMac::new(&[7; SESSION_SECRET_BYTES]);
        let a = NodeId::new("a");
        let m = key.ping_mac(&a, 1, 5);
        assert!(key.verify_ping(&a, 1, 5, &m));
        assert!(!key.verify_ping(&a, 1, 6, &m), "another nonce");
        assert!(!key.verify_ping(&a, 2, 5, &m), "another incarnation");
        assert!(
            !key.verify_ping(&NodeId::new("b"), 1, 5, &m),
            "another node"
        );
        let other = SessionMac::new(&[8; SESSION_SECRET_BYTES]);
        assert!(!other.verify_ping(&a, 1, 5, &m), "another session");
        let pong = key.pong_mac(5);
        assert!(key.verify_pong(5, &pong));
        assert!(!key.verify_pong(6, &pong));
        assert!(!other.verify_pong(5, &pong));
    }

    #[test]
    fn a_session_key_signs_for_itself_only() {
        let a = SessionKey::generate().expect("key");
        let b = SessionKey::generate().expect("key");
        assert_ne!(a.public(), b.public());
        let sig = a.sign(b"transcript");
        assert!(verify_signature(&a.public(), b"transcript", &sig));
        assert!(!verify_signature(&b.public(), b"transcript", &sig));
        assert!(!verify_signature(&a.public(), b"transcripT", &sig));
        assert!(!verify_signature(&a.public(), b"transcript", &sig[..63]));
        assert!(!verify_signature(&[0; 32], b"transcript", &sig));
    }

    #[test]
    fn masking_twice_gives_the_secret_back() {
        let secret = ClusterSecret::new("s3cret");
        let session = random::<SESSION_SECRET_BYTES>().expect("random");
        let mask = secret.session_mask(&[1; NONCE_BYTES], &[2; NONCE_BYTES]);
        let wire = xor(&session, &mask);
        assert_ne!(wire, session);
        assert_eq!(xor(&wire, &mask), session);
        let other = secret.session_mask(&[1; NONCE_BYTES], &[3; NONCE_BYTES]);
        assert_ne!(xor(&wire, &other), session);
    }
}
