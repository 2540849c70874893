//! Whether this server is the primary or a standby: which entry of
//! `message_server.addresses` (primary first, then standbys) it listens on.
//!
//! Pure: the listen address and the list go in, the role comes out. Host
//! names are not resolved (no DNS at start-up); `localhost` counts as
//! loopback.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// What this server is in `message_server.addresses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleKind {
    /// The first address: nodes prefer it, and come back to it.
    Primary,
    /// A later address: nodes come here only while the primary is out of
    /// reach, and leave as soon as it answers again.
    Standby,
    /// Not in the list: nodes configured with the list never come here.
    Unlisted,
    /// Listening on every interface, with several listed hosts on this
    /// port: which one is this host cannot be told without resolving them.
    Unknown,
}

/// This server's place among `message_server.addresses`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerRole {
    /// Primary, standby, or neither.
    pub kind: RoleKind,
    /// Its index in `message_server.addresses` (0 for the primary).
    pub position: Option<usize>,
    /// `message_server.addresses`, primary first.
    pub addresses: Vec<String>,
}

impl ServerRole {
    /// The role of a server listening on `local`, among `addresses`.
    pub fn of(local: SocketAddr, addresses: &[String]) -> ServerRole {
        let (kind, position) = match position(local, addresses) {
            Found::At(0) => (RoleKind::Primary, Some(0)),
            Found::At(i) => (RoleKind::Standby, Some(i)),
            Found::Nowhere => (RoleKind::Unlisted, None),
            Found::Ambiguous => (RoleKind::Unknown, None),
        };
        ServerRole {
            kind,
            position,
            addresses: addresses.to_vec(),
        }
    }

    /// Whether it is a standby: every node registered here failed over
    /// from the primary.
    pub fn is_standby(&self) -> bool {
        self.kind == RoleKind::Standby
    }
}

enum Found {
    At(usize),
    Nowhere,
    Ambiguous,
}

fn position(local: SocketAddr, addresses: &[String]) -> Found {
    let local_ip = local.ip().to_canonical();
    // (index, the host is loopback, the host is exactly the local address)
    let same_port: Vec<(usize, bool, bool)> = addresses
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let (host, port) = a.trim().rsplit_once(':')?;
            if port.parse::<u16>().ok()? != local.port() {
                return None;
            }
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let ip = if host.eq_ignore_ascii_case("localhost") {
                Some(IpAddr::from([127, 0, 0, 1]))
            } else {
                host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
            };
            let loopback = ip.is_some_and(|ip| ip.is_loopback());
            let exact = ip == Some(local_ip) || (loopback && local_ip.is_loopback());
            Some((i, loopback, exact))
        })
        .collect();
    if let Some(&(i, _, _)) = same_port.iter().find(|(_, _, exact)| *exact) {
        return Found::At(i);
    }
    if !local_ip.is_unspecified() {
        return Found::Nowhere;
    }
    // Listening on every interface: a loopback entry is this host; else
    // the only entry on this port is taken to be.
    if let Some(&(i, _, _)) = same_port.iter().find(|(_, loopback, _)| *loopback) {
        return Found::At(i);
    }
    match same_port.as_slice() {
        [] => Found::Nowhere,
        [(i, _, _)] => Found::At(*i),
        _ => Found::Ambiguous,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_by_listen_address() {
        let cases: &[(&str, &[&str], RoleKind, Option<usize>)] = &[
            (
                "127.0.0.1:7400",
                &["127.0.0.1:7400"],
                RoleKind::Primary,
                Some(0),
            ),
            (
                "127.0.0.1:7401",
                &["127.0.0.1:7400", "127.0.0.1:7401"],
                RoleKind::Standby,
                Some(1),
            ),
            (
                "127.0.0.1:7400",
                &["localhost:7400"],
                RoleKind::Primary,
                Some(0),
            ),
            (
                "127.0.0.2:7400",
                &["127.0.0.1:7400"],
                RoleKind::Primary,
                Some(0),
            ),
            (
                "0.0.0.0:7400",
                &["127.0.0.1:7400"],
                RoleKind::Primary,
                Some(0),
            ),
            (
                "0.0.0.0:7400",
                &["10.0.0.1:7400", "10.0.0.2:7400"],
                RoleKind::Unknown,
                None,
            ),
            (
                "0.0.0.0:7401",
                &["10.0.0.1:7400", "10.0.0.2:7401"],
                RoleKind::Standby,
                Some(1),
            ),
            (
                "10.0.0.2:7400",
                &["10.0.0.1:7400"],
                RoleKind::Unlisted,
                None,
            ),
            ("127.0.0.1:9", &["127.0.0.1:7400"], RoleKind::Unlisted, None),
            (
                "[::1]:7400",
                &["[::1]:7400", "h:7400"],
                RoleKind::Primary,
                Some(0),
            ),
            (
                "0.0.0.0:7400",
                &["nonsense", "db-host:7400"],
                RoleKind::Standby,
                Some(1),
            ),
        ];
        for (local, addresses, kind, position) in cases {
            let addresses: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
            let role = ServerRole::of(local.parse().expect("address"), &addresses);
            assert_eq!(
                (role.kind, role.position),
                (*kind, *position),
                "{local} in {addresses:?}"
            );
        }
    }
}
