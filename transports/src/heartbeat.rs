//! Heartbeat datagrams (UDP), so that failure detection does not depend on
//! the TCP connections and cluster traffic can use its own interface.
//!
//! A node sends a [`Beat::Ping`] to its message server every
//! `cluster.heartbeat_interval_ms`; the server answers each with a
//! [`Beat::Pong`]. A node the server does not hear from for
//! `cluster.failure_timeout_ms` is declared failed; a node that hears no
//! answer for as long considers its link dead and reconnects.
//!
//! Both carry a MAC under the session secret the server issued at
//! registration (see `transports::auth::SessionMac`): a ping's nonce must
//! also grow and its source address match the node's, so that neither a
//! spoofed nor a replayed ping keeps a dead node registered, and a pong
//! proves it comes from the server that registered the node.

use serde::{Deserialize, Serialize};

use crate::protocol::{BeatMac, NodeId};

/// Largest heartbeat datagram accepted; larger ones are ignored unread.
pub const MAX_DATAGRAM_BYTES: usize = 512;

/// One heartbeat datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Beat {
    /// A node is alive.
    Ping {
        /// The node.
        node: NodeId,
        /// Its incarnation.
        incarnation: u64,
        /// Echoed in the answer; grows from one ping to the next.
        nonce: u64,
        /// The MAC under the session secret.
        mac: BeatMac,
    },
    /// The message server heard a ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
        /// The MAC under the session secret.
        mac: BeatMac,
    },
}

impl Beat {
    /// The datagram's bytes.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads a datagram from the network: `None` for anything malformed or
    /// oversized (never a panic).
    pub fn decode(bytes: &[u8]) -> Option<Beat> {
        if bytes.len() > MAX_DATAGRAM_BYTES {
            return None;
        }
        postcard::from_bytes(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let ping = Beat::Ping {
            node: NodeId::new("a"),
            incarnation: 7,
            nonce: 9,
            mac: [1; 16],
        };
        assert_eq!(Beat::decode(&ping.encode()), Some(ping));
        assert_eq!(
            Beat::decode(
                &Beat::Pong {
                    nonce: 3,
                    mac: [2; 16]
                }
                .encode()
            ),
            Some(Beat::Pong {
                nonce: 3,
                mac: [2; 16]
            })
        );
        assert_eq!(Beat::decode(&[0xff; 40]), None);
        assert_eq!(Beat::decode(&[0u8; 600]), None);
        assert_eq!(Beat::decode(&[]), None);
    }
}
