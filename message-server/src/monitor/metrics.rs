//! `/metrics`: a [`Snapshot`] as Prometheus metrics, encoded by the
//! `prometheus-client` crate in the Prometheus text format (0.0.4), or in
//! OpenMetrics when the scraper asks for it.
//!
//! Names follow Prometheus' conventions: every name starts with
//! `clustercomm_server_`, counters end in `_total`, units are base units
//! named at the end (`_bytes`, `_seconds`), and a node's metrics carry a
//! `node` label (and `path` where the counts are per path).

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::role::RoleKind;
use super::snapshot::{DirectCounts, NodeStats, PathCounts, Snapshot};

/// Which text format to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format a scraper's `Accept` header asks for: OpenMetrics if it
    /// names it, the Prometheus text format otherwise.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// `snapshot` as metrics text in `format`.
///
/// # Errors
///
/// Only if the encoder fails to write into a `String` (it does not).
pub fn encode(snapshot: Arc<Snapshot>, format: Format) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
    }
    Ok(out)
}

#[derive(Debug)]
struct SnapshotCollector(Arc<Snapshot>);

/// A metric's name (without its unit or `_total`), help and unit.
type Name = (&'static str, &'static str, Option<Unit>);

/// Reads one per-path count.
type PathField = fn(&PathCounts) -> u64;

/// Reads one per-node figure.
type NodeField = fn(&NodeStats) -> u64;

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = &*self.0;
        let status = &s.status;
        let role = match status.failover.role.kind {
            RoleKind::Primary => "primary",
            RoleKind::Standby => "standby",
            RoleKind::Unlisted => "unlisted",
            RoleKind::Unknown => "unknown",
        };
        let info = Info::new(vec![
            ("version", status.version.to_owned()),
            ("cluster", status.cluster.clone()),
            ("role", role.to_owned()),
        ]);
        info.encode(enc.encode_descriptor(
            "clustercomm_server",
            "The message server: its version, cluster name, and role among message_server.addresses.",
            None,
            MetricType::Info,
        )?)?;
        let started = (status.now_unix_ms.saturating_sub(status.uptime_ms)) as f64 / 1000.0;
        gauge(
            &mut enc,
            (
                "clustercomm_server_start_time",
                "When the message server started, in seconds since the Unix epoch.",
                Some(Unit::Seconds),
            ),
            started,
        )?;
        gauge(
            &mut enc,
            ("clustercomm_server_members", "Registered members.", None),
            status.members as u64,
        )?;
        gauge(
            &mut enc,
            (
                "clustercomm_server_warming_up",
                "1 while messages to members not back yet are held (after a restart or a takeover).",
                None,
            ),
            u64::from(status.warming_up),
        )?;
        gauge(
            &mut enc,
            (
                "clustercomm_server_memory_budget_used",
                "Bytes of queued messages taken from the memory budget.",
                Some(Unit::Bytes),
            ),
            status.memory.used_bytes as u64,
        )?;
        gauge(
            &mut enc,
            (
                "clustercomm_server_memory_budget",
                "message_server.memory_budget_bytes: the bytes queued messages may take in all.",
                Some(Unit::Bytes),
            ),
            status.memory.budget_bytes as u64,
        )?;
        gauge(
            &mut enc,
            (
                "clustercomm_server_parked",
                "Bytes of messages parked for full receivers (part of the memory budget used).",
                Some(Unit::Bytes),
            ),
            status.memory.parked_bytes as u64,
        )?;
        let c = &status.counters;
        let totals: [(Name, u64); 14] = [
            (("clustercomm_server_connections_accepted", "Connections that completed the handshake.", None), c.connections_accepted),
            (("clustercomm_server_connections_refused", "Connections refused (at the caps or the handshake).", None), c.connections_refused),
            (("clustercomm_server_protocol_errors", "Connections closed for a protocol violation or a bad frame.", None), c.protocol_errors),
            (("clustercomm_server_messages", "Message frames received from senders.", None), c.messages),
            (("clustercomm_server_message", "Body bytes of the messages received.", Some(Unit::Bytes)), c.message_bytes),
            (("clustercomm_server_deliveries", "Message frames queued to receivers (a fan-out counts once per receiver).", None), c.deliveries),
            (("clustercomm_server_delivery", "Body bytes queued to receivers.", Some(Unit::Bytes)), c.delivery_bytes),
            (("clustercomm_server_route_failures", "Messages, or receivers of a fan-out, that could not be routed.", None), c.route_failures),
            (("clustercomm_server_overloaded", "Route failures because the receiver's queue was full.", None), c.overloaded),
            (("clustercomm_server_slow_consumers", "Connections cut off for not reading.", None), c.slow_consumers),
            (("clustercomm_server_failed_nodes", "Nodes declared failed (no heartbeat within the failure timeout).", None), c.failed_nodes),
            (("clustercomm_server_stale_frames", "Frames refused because they came from an earlier incarnation.", None), c.stale_frames),
            (("clustercomm_server_heartbeats_refused", "Heartbeat datagrams ignored: malformed, unknown, unsigned, replayed or from elsewhere.", None), c.heartbeats_refused),
            (("clustercomm_server_expired", "Messages the server found expired (their time to live ran out) and did not forward.", None), c.expired),
        ];
        for (name, value) in totals {
            counter(&mut enc, name, value)?;
        }
        counter(
            &mut enc,
            (
                "clustercomm_server_failovers_in",
                "On a standby, registrations of nodes that could not reach the primary; 0 on the primary.",
                None,
            ),
            status.failover.failovers_in,
        )?;
        let dead = &s.dead_letters.stats;
        let dead_gauges: [(Name, u64); 4] = [
            (
                (
                    "clustercomm_server_dead_letters",
                    "Dead letters held in the dead-letter queue.",
                    None,
                ),
                dead.entries,
            ),
            (
                (
                    "clustercomm_server_dead_letters",
                    "Body bytes of the dead letters held.",
                    Some(Unit::Bytes),
                ),
                dead.bytes,
            ),
            (
                (
                    "clustercomm_server_dead_letters_limit",
                    "message_server.dead_letter_entries: the dead letters the queue holds at most.",
                    None,
                ),
                dead.max_entries,
            ),
            (
                (
                    "clustercomm_server_dead_letters_limit",
                    "message_server.dead_letter_bytes: the body bytes the queue holds at most.",
                    Some(Unit::Bytes),
                ),
                dead.max_bytes,
            ),
        ];
        for (name, value) in dead_gauges {
            gauge(&mut enc, name, value)?;
        }
        let dead_totals: [(Name, u64); 2] = [
            (
                (
                    "clustercomm_server_dead_letters_added",
                    "Dead letters added to the queue (by the server, or filed by nodes).",
                    None,
                ),
                dead.added,
            ),
            (
                (
                    "clustercomm_server_dead_letters_overflowed",
                    "Dead letters not held because the queue was full (message_server.dead_letter_entries or dead_letter_bytes).",
                    None,
                ),
                dead.overflowed,
            ),
        ];
        for (name, value) in dead_totals {
            counter(&mut enc, name, value)?;
        }
        let t = &s.events.totals;
        let events = [
            ("joined", t.joined),
            ("returned", t.returned),
            ("reconnected", t.reconnected),
            ("stopped", t.stopped),
            ("disconnected", t.disconnected),
            ("failed", t.failed),
        ];
        counters(
            &mut enc,
            (
                "clustercomm_server_membership_events",
                "Membership events by kind: joined, returned (same incarnation after a broken link), reconnected (took its live registration over), stopped, disconnected, failed.",
                None,
            ),
            events.iter().map(|(event, n)| ([("event", *event)], *n)),
        )?;
        let per_node = |f: NodeField| {
            s.nodes
                .iter()
                .map(move |n| ([("node", n.id.as_str())], f(n)))
        };
        let per_server_path = |f: PathField| {
            s.nodes.iter().map(move |n| {
                (
                    [("node", n.id.as_str()), ("path", "server")],
                    f(&n.paths.server),
                )
            })
        };
        let paths: [(Name, PathField); 4] = [
            (
                (
                    "clustercomm_server_node_received_messages",
                    "Message frames the server read from the node, by path.",
                    None,
                ),
                |p| p.messages_in,
            ),
            (
                (
                    "clustercomm_server_node_received",
                    "Bytes of the message frames read from the node (header and body), by path.",
                    Some(Unit::Bytes),
                ),
                |p| p.bytes_in,
            ),
            (
                (
                    "clustercomm_server_node_forwarded_messages",
                    "Message frames queued to the node, by path.",
                    None,
                ),
                |p| p.messages_out,
            ),
            (
                (
                    "clustercomm_server_node_forwarded",
                    "Bytes of the message frames queued to the node (header and body), by path.",
                    Some(Unit::Bytes),
                ),
                |p| p.bytes_out,
            ),
        ];
        for (name, f) in paths {
            counters(&mut enc, name, per_server_path(f))?;
        }
        // What nodes report of the paths past the server.
        let direct = |f: fn(&DirectCounts) -> u64| {
            s.nodes.iter().flat_map(move |n| {
                [("lazy", n.paths.lazy), ("session", n.paths.session)]
                    .into_iter()
                    .filter_map(move |(path, c)| {
                        Some(([("node", n.id.as_str()), ("path", path)], f(&c?)))
                    })
            })
        };
        counters(
            &mut enc,
            (
                "clustercomm_server_node_direct_sent_messages",
                "Messages the node sent over direct channels, by path, as it last reported.",
                None,
            ),
            direct(|c| c.messages_sent),
        )?;
        counters(
            &mut enc,
            (
                "clustercomm_server_node_direct_sent",
                "Body bytes the node sent over direct channels, by path, as it last reported.",
                Some(Unit::Bytes),
            ),
            direct(|c| c.bytes_sent),
        )?;
        counters(
            &mut enc,
            (
                "clustercomm_server_node_direct_received_messages",
                "Messages the node received over direct channels, as it last reported.",
                None,
            ),
            s.nodes
                .iter()
                .filter_map(|n| Some(([("node", n.id.as_str())], n.paths.received_direct?))),
        )?;
        counters(
            &mut enc,
            (
                "clustercomm_server_node_written",
                "Bytes written to the node's socket (every frame).",
                Some(Unit::Bytes),
            ),
            per_node(|n| n.queue.written_bytes),
        )?;
        let queue_gauges: [(Name, NodeField); 3] = [
            (
                (
                    "clustercomm_server_node_queue_frames",
                    "Frames queued to the node, not yet taken by its writer.",
                    None,
                ),
                |n| n.queue.frames as u64,
            ),
            (
                (
                    "clustercomm_server_node_queue_messages",
                    "Messages queued to the node or being written.",
                    None,
                ),
                |n| n.queue.messages as u64,
            ),
            (
                (
                    "clustercomm_server_node_queue",
                    "Bytes of the messages queued to the node.",
                    Some(Unit::Bytes),
                ),
                |n| n.queue.bytes as u64,
            ),
        ];
        for (name, f) in queue_gauges {
            gauges(&mut enc, name, per_node(f))?;
        }
        gauges(
            &mut enc,
            (
                "clustercomm_server_node_queue_priority_frames",
                "Messages queued to the node at each priority, not yet taken by its writer.",
                None,
            ),
            s.nodes.iter().flat_map(|n| {
                n.queue.by_priority.named().map(|(priority, frames)| {
                    (
                        [("node", n.id.as_str()), ("priority", priority)],
                        frames as u64,
                    )
                })
            }),
        )?;
        gauges(
            &mut enc,
            (
                "clustercomm_server_node_queue_wait_estimate",
                "Estimated time a message waits in the node's queue (Little's law, or the time since its writer last wrote).",
                Some(Unit::Seconds),
            ),
            s.nodes.iter().filter_map(|n| {
                let ms = n.queue.wait_ms_estimate?;
                Some(([("node", n.id.as_str())], ms as f64 / 1000.0))
            }),
        )?;
        let ages = s.members.iter().filter_map(|m| {
            let ms = m.heartbeat_age_ms?;
            Some(([("node", m.id.as_str())], ms as f64 / 1000.0))
        });
        gauges(
            &mut enc,
            (
                "clustercomm_server_node_heartbeat_age",
                "Time since the node's last heartbeat (or its registration).",
                Some(Unit::Seconds),
            ),
            ages,
        )?;
        Ok(())
    }
}

fn counter(enc: &mut DescriptorEncoder, (name, help, unit): Name, value: u64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
    ConstCounter::new(value).encode(m)
}

fn gauge<N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    (name, help, unit): Name,
    value: N,
) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    ConstGauge::new(value).encode(m)
}

/// A counter family, a sample per label set (only its description when
/// there is none).
fn counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    (name, help, unit): Name,
    samples: impl Iterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family, a sample per label set (only its description when
/// there is none).
fn gauges<L: EncodeLabelSet, N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    (name, help, unit): Name,
    samples: impl Iterator<Item = (L, N)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_picks_the_format() {
        let cases = [
            (None, Format::Prometheus),
            (Some("text/plain"), Format::Prometheus),
            (
                Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
                Format::OpenMetrics,
            ),
        ];
        for (accept, format) in cases {
            assert_eq!(Format::from_accept(accept), format, "{accept:?}");
        }
    }
}
