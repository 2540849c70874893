//! Network interfaces chosen by name (`node.direct_interface = "eth0"`):
//! each is resolved to its address once, at start, and the address keys
//! it stands for are rewritten with it ([`Config::resolve_interfaces`]).
//!
//! | key | rewrites | port from |
//! | --- | --- | --- |
//! | `message_server.interface` | `message_server.listen` | `listen` |
//! | `cluster.heartbeat_interface` | `cluster.heartbeat_listen` | `heartbeat_listen`, else `listen` |
//! | `node.direct_interface` | `node.direct_listen` | `direct_listen` |
//! | `node.heartbeat_interface` | `node.heartbeat_bind` | `heartbeat_bind`, else any |
//!
//! An interface's address is its first IPv4 address, else its first IPv6
//! address that is not link-local. A name this host does not have, or an
//! interface without a usable address, is an error naming the key, the
//! interface and the interfaces the host has.

use std::net::{IpAddr, SocketAddr};

use crate::{Config, ConfigError};

/// One interface of this host with a usable address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInterface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its address.
    pub ip: IpAddr,
}

/// The interfaces of this host that have an address, one entry per
/// address, in the order the system lists them.
///
/// # Errors
///
/// The system would not list them.
pub fn host_interfaces() -> std::io::Result<Vec<HostInterface>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .map(|i| HostInterface {
            ip: i.ip(),
            name: i.name,
        })
        .collect())
}

/// The address of interface `name` among `interfaces` (see the module
/// docs for which one); `key` names the setting in the error.
///
/// # Errors
///
/// [`ConfigError::Interface`] if `name` has no usable address there.
pub fn interface_ip(
    interfaces: &[HostInterface],
    key: &str,
    name: &str,
) -> Result<IpAddr, ConfigError> {
    let mine = || interfaces.iter().filter(|i| i.name == name).map(|i| i.ip);
    let usable_v6 = |ip: &IpAddr| match ip {
        IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        IpAddr::V4(_) => false,
    };
    if let Some(ip) = mine()
        .find(IpAddr::is_ipv4)
        .or_else(|| mine().find(usable_v6))
    {
        return Ok(ip);
    }
    let mut names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let listed = if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    };
    let reason = if mine().next().is_some() {
        format!("interface {name:?} has only link-local addresses (interfaces with an address here: {listed})")
    } else if std::path::Path::new("/sys/class/net").join(name).exists() {
        format!("interface {name:?} has no address (interfaces with an address here: {listed})")
    } else {
        format!("this host has no network interface {name:?} (interfaces with an address here: {listed})")
    };
    Err(ConfigError::Interface {
        key: key.to_owned(),
        reason,
    })
}

impl Config {
    /// Whether any key names an interface, so that
    /// [`resolve_interfaces`](Config::resolve_interfaces) has work to do.
    #[must_use]
    pub fn names_interfaces(&self) -> bool {
        self.message_server.interface.is_some()
            || self.cluster.heartbeat_interface.is_some()
            || self.node.direct_interface.is_some()
            || self.node.heartbeat_interface.is_some()
    }

    /// This configuration with every interface named by a key resolved to
    /// its address on this host, and the address keys it stands for
    /// rewritten (the table in the module docs), and the `*_interface`
    /// keys cleared: their addresses took their place. Without such keys,
    /// the configuration unchanged.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Interface`] naming the key whose interface is
    /// missing or has no address; [`ConfigError::Read`]-like failures of
    /// the system to list its interfaces as [`ConfigError::Interface`].
    pub fn resolve_interfaces(&self) -> Result<Config, ConfigError> {
        if !self.names_interfaces() {
            return Ok(self.clone());
        }
        let interfaces = host_interfaces().map_err(|e| ConfigError::Interface {
            key: "interfaces".to_owned(),
            reason: format!("the system would not list its network interfaces: {e}"),
        })?;
        self.resolve_interfaces_among(&interfaces)
    }

    /// [`resolve_interfaces`](Config::resolve_interfaces) against a given
    /// list of interfaces.
    ///
    /// # Errors
    ///
    /// As `resolve_interfaces`.
    pub fn resolve_interfaces_among(
        &self,
        interfaces: &[HostInterface],
    ) -> Result<Config, ConfigError> {
        let mut out = self.clone();
        let ip = |key: &str, name: &Option<String>| -> Result<Option<IpAddr>, ConfigError> {
            name.as_deref()
                .map(|n| interface_ip(interfaces, key, n))
                .transpose()
        };
        let listen_port = self.message_server.listen.port();
        if let Some(ip) = ip("message_server.interface", &self.message_server.interface)? {
            out.message_server.listen = SocketAddr::new(ip, listen_port);
        }
        if let Some(ip) = ip(
            "cluster.heartbeat_interface",
            &self.cluster.heartbeat_interface,
        )? {
            let port = self
                .cluster
                .heartbeat_listen
                .map_or(listen_port, |a| a.port());
            out.cluster.heartbeat_listen = Some(SocketAddr::new(ip, port));
        }
        if let Some(ip) = ip("node.direct_interface", &self.node.direct_interface)? {
            out.node.direct_listen = SocketAddr::new(ip, self.node.direct_listen.port());
        }
        if let Some(ip) = ip("node.heartbeat_interface", &self.node.heartbeat_interface)? {
            let port = self.node.heartbeat_bind.map_or(0, |a| a.port());
            out.node.heartbeat_bind = Some(SocketAddr::new(ip, port));
        }
        out.message_server.interface = None;
        out.cluster.heartbeat_interface = None;
        out.node.direct_interface = None;
        out.node.heartbeat_interface = None;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, ip: &str) -> HostInterface {
        HostInterface {
            name: name.into(),
            ip: ip.parse().expect("an address"),
        }
    }

    fn host() -> Vec<HostInterface> {
        vec![
            iface("lo", "127.0.0.1"),
            iface("eth0", "fe80::1"),
            iface("eth0", "2001:db8::5"),
            iface("eth0", "10.0.0.5"),
            iface("eth1", "fe80::2"),
            iface("eth2", "2001:db8::9"),
        ]
    }

    #[test]
    fn an_interface_is_its_first_ipv4_address_else_its_first_routable_ipv6() {
        let host = host();
        assert_eq!(
            interface_ip(&host, "k", "eth0").expect("eth0"),
            "10.0.0.5".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            interface_ip(&host, "k", "eth2").expect("eth2"),
            "2001:db8::9".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn a_missing_or_addressless_interface_names_the_key_and_what_the_host_has() {
        let host = host();
        let missing = interface_ip(&host, "node.direct_interface", "eth9")
            .expect_err("no eth9")
            .to_string();
        assert!(missing.contains("node.direct_interface"), "{missing}");
        assert!(missing.contains("\"eth9\""), "{missing}");
        assert!(missing.contains("eth0, eth1, eth2, lo"), "{missing}");
        let link_local = interface_ip(&host, "node.heartbeat_interface", "eth1")
            .expect_err("eth1 has only fe80::2")
            .to_string();
        assert!(link_local.contains("only link-local"), "{link_local}");
    }

    #[test]
    fn resolving_rewrites_the_address_keys_and_keeps_their_ports() {
        let mut config = Config::default();
        config.message_server.listen = "0.0.0.0:7500".parse().expect("addr");
        config.message_server.interface = Some("eth0".into());
        config.cluster.heartbeat_interface = Some("lo".into());
        config.node.direct_listen = "0.0.0.0:7601".parse().expect("addr");
        config.node.direct_interface = Some("eth0".into());
        config.node.heartbeat_interface = Some("lo".into());
        let resolved = config.resolve_interfaces_among(&host()).expect("resolves");
        assert!(
            !resolved.names_interfaces(),
            "the keys gave way to addresses"
        );
        resolved.validate("").expect("a resolved config is valid");
        assert_eq!(resolved.message_server.listen.to_string(), "10.0.0.5:7500");
        assert_eq!(
            resolved.cluster.heartbeat_listen.map(|a| a.to_string()),
            Some("127.0.0.1:7500".into()),
            "the heartbeat port defaults to the listen port"
        );
        assert_eq!(resolved.node.direct_listen.to_string(), "10.0.0.5:7601");
        assert_eq!(
            resolved.node.heartbeat_bind.map(|a| a.to_string()),
            Some("127.0.0.1:0".into())
        );
        config.cluster.heartbeat_listen = Some("0.0.0.0:7502".parse().expect("addr"));
        config
            .validate("")
            .expect("an unspecified address beside an interface");
        config.node.heartbeat_bind = Some("0.0.0.0:7602".parse().expect("addr"));
        let resolved = config.resolve_interfaces_among(&host()).expect("resolves");
        assert_eq!(
            resolved.cluster.heartbeat_listen.map(|a| a.port()),
            Some(7502)
        );
        assert_eq!(resolved.node.heartbeat_bind.map(|a| a.port()), Some(7602));
    }

    #[test]
    fn an_interface_beside_a_specific_address_is_refused() {
        let mut config = Config::default();
        config.node.direct_interface = Some("eth0".into());
        config.node.direct_listen = "10.0.0.5:7401".parse().expect("addr");
        let err = config.validate("").expect_err("both set").to_string();
        assert!(err.contains("node.direct_interface"), "{err}");
        let mut config = Config::default();
        config.cluster.heartbeat_interface = Some("eth1".into());
        config.cluster.heartbeat_listen = Some("10.0.0.5:7402".parse().expect("addr"));
        let err = config.validate("").expect_err("both set").to_string();
        assert!(err.contains("cluster.heartbeat_interface"), "{err}");
    }

    #[test]
    fn without_interface_keys_nothing_changes() {
        let config = Config::default();
        assert!(!config.names_interfaces());
        assert_eq!(config.resolve_interfaces().expect("nothing to do"), config);
    }

    #[test]
    fn this_hosts_loopback_resolves() {
        // Every Linux host has `lo` with 127.0.0.1.
        let mut config = Config::default();
        config.node.direct_interface = Some("lo".into());
        let resolved = config.resolve_interfaces().expect("lo resolves");
        assert!(resolved.node.direct_listen.ip().is_loopback());
    }
}
