//! Range and consistency checks, run once at start-up; an error names the
//! first bad key.

use crate::{Config, ConfigError};

impl Config {
    /// Checks ranges and consistency; `prefix` is put before key names.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Invalid {
                key: format!("{prefix}{key}"),
                reason,
            })
        };
        if self.cluster.name.is_empty() {
            return bad("cluster.name", "must not be empty".into());
        }
        let tls = &self.tls;
        let set = [&tls.ca_file, &tls.cert_file, &tls.key_file]
            .iter()
            .filter(|f| f.is_some())
            .count();
        if set != 0 && set != 3 {
            return bad(
                "tls",
                "ca_file, cert_file and key_file go together: set all three, or none".into(),
            );
        }
        let pairs = [
            (
                "message_server.interface",
                &self.message_server.interface,
                Some(self.message_server.listen),
                "message_server.listen",
            ),
            (
                "cluster.heartbeat_interface",
                &self.cluster.heartbeat_interface,
                self.cluster.heartbeat_listen,
                "cluster.heartbeat_listen",
            ),
            (
                "node.direct_interface",
                &self.node.direct_interface,
                Some(self.node.direct_listen),
                "node.direct_listen",
            ),
            (
                "node.heartbeat_interface",
                &self.node.heartbeat_interface,
                self.node.heartbeat_bind,
                "node.heartbeat_bind",
            ),
        ];
        for (key, interface, address, address_key) in pairs {
            let Some(name) = interface else { continue };
            if name.is_empty() {
                return bad(
                    key,
                    "must name an interface (\"eth0\") or be left out".into(),
                );
            }
            if let Some(address) = address.filter(|a| !a.ip().is_unspecified()) {
                return bad(
                    key,
                    format!("{address_key} = \"{address}\" names an address too: give its port with an unspecified address (0.0.0.0), or drop the interface"),
                );
            }
        }
        if self.message_server.dead_letter_entries == 0 {
            return bad(
                "message_server.dead_letter_entries",
                "must be at least 1 (the dead-letter queue cannot be turned off)".into(),
            );
        }
        if self.services.values().any(|s| s.retention_ms == Some(0)) {
            return bad(
                "services.retention_ms",
                "must be at least 1 (leave it out for messages that never expire)".into(),
            );
        }
        // Every connection may keep a 64 KiB chunk of the budget while it
        // holds anything.
        let chunks = self
            .message_server
            .max_connections
            .saturating_mul(64 * 1024);
        if self.message_server.memory_budget_bytes < chunks {
            return bad(
                "message_server.memory_budget_bytes",
                format!(
                    "{} is below 64 KiB for each of message_server.max_connections ({})",
                    self.message_server.memory_budget_bytes, self.message_server.max_connections
                ),
            );
        }
        if let Some(p) = self.permissions.bad_send_pattern() {
            return bad(
                "permissions.send",
                format!("{p:?} names no target: use node:<id>, group:<group>, all or *"),
            );
        }
        if self.cluster.heartbeat_interval_ms == 0 {
            return bad("cluster.heartbeat_interval_ms", "must be above 0".into());
        }
        if self.cluster.failure_timeout_ms <= self.cluster.heartbeat_interval_ms {
            return bad(
                "cluster.failure_timeout_ms",
                format!(
                    "{} must be above cluster.heartbeat_interval_ms ({})",
                    self.cluster.failure_timeout_ms, self.cluster.heartbeat_interval_ms
                ),
            );
        }
        let ms = &self.message_server;
        if ms.addresses.is_empty() {
            return bad(
                "message_server.addresses",
                "needs at least one address".into(),
            );
        }
        if let Some(a) = ms.addresses.iter().find(|a| !a.contains(':')) {
            return bad(
                "message_server.addresses",
                format!("{a:?} is not host:port"),
            );
        }
        if let Some(addr) = ms.heartbeat_advertise {
            if addr.port() == 0 {
                return bad(
                    "message_server.heartbeat_advertise",
                    format!("{addr} has port 0: give the port nodes are to send heartbeats to"),
                );
            }
            let ip = addr.ip().to_canonical();
            if ip.is_multicast() || ip == std::net::Ipv4Addr::BROADCAST {
                return bad(
                    "message_server.heartbeat_advertise",
                    format!("{addr} is a multicast or broadcast address, not one server's"),
                );
            }
        }
        for (key, v) in [
            ("message_server.connect_timeout_ms", ms.connect_timeout_ms),
            ("message_server.reconnect_delay_ms", ms.reconnect_delay_ms),
            ("message_server.slow_consumer_ms", ms.slow_consumer_ms),
            ("node.send_timeout_ms", self.node.send_timeout_ms),
            ("lazy.idle_close_ms", self.lazy.idle_close_ms),
            (
                "lazy.auto_activate_window_ms",
                self.lazy.auto_activate_window_ms,
            ),
            ("limits.max_message_bytes", self.limits.max_message_bytes),
        ] {
            if v == 0 {
                return bad(key, "must be above 0".into());
            }
        }
        if ms.reconnect_max_delay_ms < ms.reconnect_delay_ms {
            return bad(
                "message_server.reconnect_max_delay_ms",
                format!(
                    "{} is below message_server.reconnect_delay_ms ({})",
                    ms.reconnect_max_delay_ms, ms.reconnect_delay_ms
                ),
            );
        }
        for (key, v, min) in [
            ("message_server.queue_frames", ms.queue_frames, 16),
            ("message_server.queue_bytes", ms.queue_bytes, 64 * 1024),
            (
                "message_server.memory_budget_bytes",
                ms.memory_budget_bytes,
                1024 * 1024,
            ),
            ("message_server.max_connections", ms.max_connections, 1),
            (
                "message_server.max_unauthenticated",
                ms.max_unauthenticated,
                1,
            ),
            ("node.queue_frames", self.node.queue_frames, 16),
            ("node.max_channels", self.node.max_channels, 1),
            ("node.max_unauthenticated", self.node.max_unauthenticated, 1),
            ("node.queue_bytes", self.node.queue_bytes, 64 * 1024),
            ("node.target_queue_bytes", self.node.target_queue_bytes, 1),
            ("node.inbox_capacity", self.node.inbox_capacity, 1),
            ("node.max_in_flight", self.node.max_in_flight, 1),
            (
                "node.max_in_flight_bytes",
                self.node.max_in_flight_bytes,
                64 * 1024,
            ),
            (
                "node.processor_concurrency",
                self.node.processor_concurrency,
                1,
            ),
            ("node.max_in_a_row", self.node.max_in_a_row, 1),
        ] {
            if v < min {
                return bad(key, format!("{v} is below the minimum of {min}"));
            }
        }
        let chunk = self.limits.chunk_bytes;
        if !(4 * 1024..=16 * 1024 * 1024).contains(&chunk) {
            return bad(
                "limits.chunk_bytes",
                format!("{chunk} is outside 4096 to 16777216 (4 KiB to 16 MiB)"),
            );
        }
        if self.limits.stream_window_bytes < 2 * self.limits.chunk_bytes {
            return bad(
                "limits.stream_window_bytes",
                format!(
                    "{} is below two chunks (limits.chunk_bytes is {})",
                    self.limits.stream_window_bytes, self.limits.chunk_bytes
                ),
            );
        }
        let chunk = self.node.read_chunk_bytes;
        if !(4 * 1024..=16 * 1024 * 1024).contains(&chunk) {
            return bad(
                "node.read_chunk_bytes",
                format!("{chunk} is outside 4096 to 16777216 (4 KiB to 16 MiB)"),
            );
        }
        if ms.queue_bytes > u32::MAX as usize || self.node.queue_bytes > u32::MAX as usize {
            return bad("queue_bytes", "must be below 4 GiB".into());
        }
        if self.node.busy_lower >= self.node.busy_upper {
            return bad(
                "node.busy_lower",
                format!(
                    "{} must be below node.busy_upper ({})",
                    self.node.busy_lower, self.node.busy_upper
                ),
            );
        }
        let max_frame_body =
            transports::frame::MAX_FRAME_LEN as u64 - transports::frame::MAX_HEADER_BYTES as u64;
        if self.limits.max_message_bytes > max_frame_body {
            return bad(
                "limits.max_message_bytes",
                format!("must be at most {max_frame_body} (2 GiB less a header)"),
            );
        }
        if self.lazy.threshold_bytes > self.limits.max_message_bytes {
            return bad(
                "lazy.threshold_bytes",
                format!(
                    "{} is above limits.max_message_bytes ({})",
                    self.lazy.threshold_bytes, self.limits.max_message_bytes
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `message_server.heartbeat_advertise`: unset by default, any one
    /// host's address (an unspecified IP included) when set, and a bad
    /// one is refused naming the key, in a node section too.
    #[test]
    fn heartbeat_advertise_is_optional_and_checked() {
        assert_eq!(Config::default().message_server.heartbeat_advertise, None);
        for addr in ["192.0.2.7:7402", "0.0.0.0:7402", "[2001:db8::7]:7402"] {
            let text = format!("[message_server]\nheartbeat_advertise = \"{addr}\"\n");
            let config = Config::parse(&text, "t").expect("a valid address");
            assert_eq!(config.message_server.heartbeat_advertise, addr.parse().ok());
        }
        for (addr, says) in [
            ("192.0.2.7:0", "port 0"),
            ("255.255.255.255:7402", "broadcast"),
            ("[ff02::1]:7402", "multicast"),
            ("[::ffff:224.0.0.1]:7402", "multicast"),
        ] {
            let text = format!("[message_server]\nheartbeat_advertise = \"{addr}\"\n");
            match Config::parse(&text, "t") {
                Err(e @ ConfigError::Invalid { .. }) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("`message_server.heartbeat_advertise`")
                            && text.contains(says),
                        "{addr}: {text}"
                    );
                }
                other => panic!("{addr}: expected an error naming the key, got {other:?}"),
            }
        }
        let text = "[nodes.a.message_server]\nheartbeat_advertise = \"192.0.2.7:0\"\n";
        match Config::parse(text, "t") {
            Err(ConfigError::Invalid { key, .. }) => {
                assert_eq!(key, "nodes.a.message_server.heartbeat_advertise");
            }
            other => panic!("expected an error naming the node's key, got {other:?}"),
        }
        let err = Config::parse("[message_server]\nheartbeat_advertise = \"nowhere\"\n", "t")
            .expect_err("not an address");
        assert!(err.to_string().contains("heartbeat_advertise"), "{err}");
    }

    #[test]
    fn inconsistent_values_name_the_key() {
        let cases = [
            (
                "[node]\nbusy_lower = 900\nbusy_upper = 100\n",
                "node.busy_lower",
            ),
            (
                "[cluster]\nfailure_timeout_ms = 10\n",
                "cluster.failure_timeout_ms",
            ),
            (
                "[lazy]\nthreshold_bytes = 100\n[limits]\nmax_message_bytes = 10\n",
                "lazy.threshold_bytes",
            ),
            (
                "[message_server]\naddresses = []\n",
                "message_server.addresses",
            ),
            (
                "[message_server]\nheartbeat_advertise = \"192.0.2.7:0\"\n",
                "message_server.heartbeat_advertise",
            ),
            (
                "[message_server]\nheartbeat_advertise = \"239.1.2.3:7402\"\n",
                "message_server.heartbeat_advertise",
            ),
            ("[node]\ninbox_capacity = 0\n", "node.inbox_capacity"),
            ("[node]\nread_chunk_bytes = 1024\n", "node.read_chunk_bytes"),
            (
                "[node]\nread_chunk_bytes = 1073741824\n",
                "node.read_chunk_bytes",
            ),
        ];
        for (text, key) in cases {
            match Config::parse(text, "t") {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected an error naming {key}, got {other:?}"),
            }
        }
    }
}
