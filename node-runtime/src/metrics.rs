//! A node's metrics for Prometheus, made with `prometheus-client`: what it
//! sent and received on each path, its direct channels, refusals, and what
//! waits. Read live from the node's counters whenever the registry is
//! encoded; nothing is added to the message path.
//!
//! An application merges them into its own `/metrics` with
//! [`crate::Node::register_metrics`], or takes a registry of their own
//! with [`crate::Node::metrics`]. Every sample carries a `node` label.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::runtime::Runtime;

/// Encodes a node's counters when its registry is encoded.
#[derive(Debug)]
pub(crate) struct NodeCollector {
    rt: Runtime,
}

impl NodeCollector {
    pub(crate) fn new(rt: Runtime) -> NodeCollector {
        NodeCollector { rt }
    }
}

/// A metric's name (without its unit or `_total`), help and unit.
type Name = (&'static str, &'static str, Option<Unit>);

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let c = self.rt.counters.snapshot();
        let node = self.rt.id.as_str();
        let (members, pending) = {
            let core = self.rt.core.lock();
            (core.members().len(), core.tracker().len())
        };
        let by_path = |values: [(&'static str, u64); 3]| {
            values.map(|(path, v)| ([("node", node), ("path", path)], v))
        };
        counters(
            &mut enc,
            (
                "clustercomm_node_sent_messages",
                "Messages this node sent, by path.",
                None,
            ),
            by_path([
                ("server", c.server_messages),
                ("lazy", c.lazy_messages),
                ("session", c.session_messages),
            ]),
        )?;
        counters(
            &mut enc,
            (
                "clustercomm_node_sent",
                "Body bytes this node sent, by path.",
                Some(Unit::Bytes),
            ),
            by_path([
                ("server", c.server_bytes),
                ("lazy", c.lazy_bytes),
                ("session", c.session_bytes),
            ]),
        )?;
        counters(
            &mut enc,
            (
                "clustercomm_node_received_messages",
                "Messages this node received, by path (direct: lazy or session channels).",
                None,
            ),
            [
                ([("node", node), ("path", "server")], c.received_server),
                ([("node", node), ("path", "direct")], c.received_direct),
            ],
        )?;
        let by_kind = |values: [(&'static str, u64); 2]| {
            values.map(|(kind, v)| ([("node", node), ("kind", kind)], v))
        };
        counters(
            &mut enc,
            (
                "clustercomm_node_channels_opened",
                "Direct channels this node opened, by kind.",
                None,
            ),
            by_kind([("lazy", c.lazy_opened), ("session", c.session_opened)]),
        )?;
        counters(
            &mut enc,
            (
                "clustercomm_node_channels_failed",
                "Direct channels this node could not open, by kind.",
                None,
            ),
            by_kind([("lazy", c.lazy_failed), ("session", c.session_failed)]),
        )?;
        counters(
            &mut enc,
            (
                "clustercomm_node_lazy_channels_closed",
                "Lazy channels closed (idle, or broken).",
                None,
            ),
            [([("node", node)], c.lazy_closed)],
        )?;
        counters(
            &mut enc,
            (
                "clustercomm_node_refused",
                "What this node refused, by reason: messages from a sender declared failed, messages its sender may not send, channels over the caps.",
                None,
            ),
            [
                ([("node", node), ("reason", "sender_failed")], c.refused_failed),
                ([("node", node), ("reason", "not_permitted")], c.refused_not_permitted),
                ([("node", node), ("reason", "channel_caps")], c.channels_refused),
            ],
        )?;
        counters(
            &mut enc,
            (
                "clustercomm_node_late_failures",
                "Receivers that missed a message nobody waited on any more.",
                None,
            ),
            [(
                [("node", node)],
                self.rt
                    .counters
                    .late_failures
                    .load(std::sync::atomic::Ordering::Relaxed),
            )],
        )?;
        let gauges: [(Name, u64); 3] = [
            (
                (
                    "clustercomm_node_members",
                    "Members of the cluster this node knows, itself included.",
                    None,
                ),
                members as u64,
            ),
            (
                (
                    "clustercomm_node_pending",
                    "Acknowledged messages and requests waiting for their outcome.",
                    None,
                ),
                pending as u64,
            ),
            (
                (
                    "clustercomm_node_channels_open",
                    "Direct channels this node opened that are open.",
                    None,
                ),
                self.rt.direct.open_count() as u64,
            ),
        ];
        for ((name, help, unit), value) in gauges {
            let mut m = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(m.encode_family(&[("node", node)])?)?;
        }
        Ok(())
    }
}

/// A counter family, a sample per label set.
fn counters<'a, const N: usize>(
    enc: &mut DescriptorEncoder,
    (name, help, unit): Name,
    samples: impl IntoIterator<Item = ([(&'static str, &'a str); N], u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(m.encode_family(&labels.as_slice())?)?;
    }
    Ok(())
}
