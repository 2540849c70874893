//! Building and starting a node.

use cluster_config::Config;
use tracing::Instrument;
use transports::out_queue;
use transports::protocol::{
    valid_name, Hello, Interests, NodeId, Role, MAX_NAMES_PER_NODE, PROTOCOL_VERSION,
};

use crate::node::{check_service_name, open_inbox, Node};
use crate::options::SubscribeOptions;
use crate::runtime::{Parts, Runtime};
use crate::NodeError;
use crate::{direct, routing, supervisor};

impl Node {
    /// Starts building a node with the given id.
    pub fn builder(id: impl Into<NodeId>) -> NodeBuilder {
        NodeBuilder::new(id.into())
    }
}

/// Configures a node; [`NodeBuilder::start`] connects it.
///
/// The configuration is layered as the `message-server` binary layers its
/// own: the [`Config`] given (with its `[nodes.<id>]` section), then the
/// environment (`CLUSTERCOMM_CLUSTER`, `CLUSTERCOMM_MESSAGE_SERVER`, see
/// [`Config::apply_env`]), then what is set on the builder
/// ([`NodeBuilder::message_server`]). [`NodeBuilder::ignore_environment`]
/// leaves the environment out.
///
/// ```no_run
/// # async fn run() -> Result<(), node_runtime::NodeError> {
/// let node = node_runtime::Node::builder("server-1")
///     .message_server("127.0.0.1:7400")
///     .groups(["web"])
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until started"]
pub struct NodeBuilder {
    id: NodeId,
    config: Config,
    addresses: Option<Vec<String>>,
    groups: Vec<String>,
    /// Services offered from the start (see [`NodeBuilder::subscribe`]).
    services: Vec<(String, SubscribeOptions)>,
    role: Role,
    environment: bool,
}

impl NodeBuilder {
    pub(crate) fn new(id: NodeId) -> Self {
        NodeBuilder {
            id,
            config: Config::default(),
            addresses: None,
            groups: Vec::new(),
            services: Vec::new(),
            role: Role::Server,
            environment: true,
        }
    }

    /// Uses this configuration (its `[nodes.<id>]` section is merged in at
    /// start). Defaults to [`Config::default`].
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Connects to this message server, overriding
    /// `message_server.addresses`.
    pub fn message_server(mut self, address: impl ToString) -> Self {
        self.addresses = Some(vec![address.to_string()]);
        self
    }

    /// Connects to these message servers, primary first, then standbys.
    pub fn message_servers<I, S>(mut self, addresses: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: ToString,
    {
        self.addresses = Some(addresses.into_iter().map(|a| a.to_string()).collect());
        self
    }

    /// The groups this node belongs to.
    pub fn groups<I, S>(mut self, groups: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.groups = groups.into_iter().map(Into::into).collect();
        self
    }

    /// Offers `service` from the start: the node registers with it, so
    /// that every member learns of the node and of its service in one
    /// membership event (a [`Node::subscribe`] after the start is a
    /// second one, sent to every member: in a cluster of thousands
    /// starting at once, that doubles the membership traffic). Its inbox
    /// is opened before the node reads anything; take it with
    /// [`Node::take_inbox`]. What arrives before it is taken waits there,
    /// as in any inbox, up to `node.inbox_capacity`.
    ///
    /// The start fails with [`NodeError::InvalidName`] for a bad name,
    /// [`NodeError::Reserved`] for a built-in one,
    /// [`NodeError::AlreadySubscribed`] for one named twice, and
    /// [`NodeError::Handshake`] if the message server's permissions refuse
    /// it.
    pub fn subscribe(self, service: impl Into<String>) -> Self {
        self.subscribe_with(service, &SubscribeOptions::default())
    }

    /// [`NodeBuilder::subscribe`] with `options` (as for
    /// [`Node::subscribe_with`]).
    pub fn subscribe_with(
        mut self,
        service: impl Into<String>,
        options: &SubscribeOptions,
    ) -> Self {
        self.services.push((service.into(), options.clone()));
        self
    }

    /// Leaves the environment's overrides (`CLUSTERCOMM_*`) out: for an
    /// application that configures its nodes only in code.
    pub fn ignore_environment(mut self) -> Self {
        self.environment = false;
        self
    }

    /// The node's role (server by default).
    pub fn role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }

    /// The configuration this node starts with: the given one with its
    /// `[nodes.<id>]` section, the environment's overrides read with `var`
    /// (unless ignored), then the builder's own settings; validated, with
    /// the interfaces it names resolved to their addresses.
    fn layered_config(&self, var: impl Fn(&str) -> Option<String>) -> Result<Config, NodeError> {
        let mut config = self.config.for_node(self.id.as_str())?;
        if self.environment {
            config.apply_env(var)?;
        }
        if let Some(addresses) = &self.addresses {
            config.message_server.addresses = addresses.clone();
        }
        config.validate("")?;
        // `node.direct_interface` and `node.heartbeat_interface` become
        // addresses here, once: a missing interface fails the start.
        Ok(config.resolve_interfaces()?)
    }

    /// Connects to the first reachable message server, registers, and starts
    /// the node's tasks.
    ///
    /// # Errors
    ///
    /// [`NodeError::Config`] for a bad configuration (or an interface it
    /// names that this host does not have),
    /// [`NodeError::Connect`] if no message server answers within
    /// `message_server.connect_timeout_ms` (for example when none is
    /// running), [`NodeError::Handshake`] if one refused this node (another
    /// cluster, another protocol version, the id already live).
    pub async fn start(self) -> Result<Node, NodeError> {
        if !valid_name(self.id.as_str()) {
            return Err(NodeError::invalid_name("node id", self.id.as_str()));
        }
        if let Some(g) = self.groups.iter().find(|g| !valid_name(g)) {
            return Err(NodeError::invalid_name("group", g));
        }
        if self.groups.len() > MAX_NAMES_PER_NODE {
            return Err(NodeError::invalid_name(
                "group list",
                &self.groups.join(","),
            ));
        }
        let mut services = vec![crate::tune::TUNE_SERVICE.to_owned()];
        for (service, _) in &self.services {
            check_service_name(service)?;
            if services.contains(service) {
                return Err(NodeError::AlreadySubscribed(service.clone()));
            }
            services.push(service.clone());
        }
        if services.len() > MAX_NAMES_PER_NODE {
            return Err(NodeError::invalid_name("service list", &services.join(",")));
        }
        let mut config = self.layered_config(|k| std::env::var(k).ok())?;
        // Heartbeats must leave from the address declared for them (or
        // the connection's). When the server takes them on an address of
        // its own (`cluster.heartbeat_listen`, on a heartbeat network) and
        // this node did not say where to send them from, they leave from
        // the interface that routes there, and that address is declared.
        if let Some(ip) = heartbeat_route(&config).await {
            let port = config.node.heartbeat_bind.map_or(0, |a| a.port());
            config.node.heartbeat_bind = Some(std::net::SocketAddr::new(ip, port));
        }
        let permissions = self.config.permissions_table()?;
        let recovery = open_store(&config).await?;
        let incarnation = crate::runtime::fresh_incarnation();
        let tls = match config.tls.files() {
            Some((ca, cert, key)) => Some(transports::tls::Tls::load(ca, cert, key)?),
            None => None,
        };
        let credentials = std::sync::Arc::new(crate::identity::Credentials::new(
            config.cluster.credentials.as_deref(),
            tls,
        )?);
        let mut hello = Hello {
            version: PROTOCOL_VERSION,
            cluster: config.cluster.name.clone(),
            node: self.id.clone(),
            incarnation,
            role: self.role,
            direct_addr: None,
            max_message_bytes: config.limits.max_message_bytes,
            // Each connection gets a fresh one (see `Credentials::fresh`).
            nonce: [0; transports::protocol::NONCE_BYTES],
            session_key: credentials.key.public(),
            heartbeat_ip: config
                .node
                .heartbeat_bind
                .map(|a| a.ip())
                .filter(|ip| !ip.is_unspecified()),
            rejoining: false,
        };

        // The direct-channel listener, announced at registration: the
        // configured address, or, when listening on every interface, the
        // one that routes to the message server.
        let direct_listen = config.node.direct_listen;
        let listener =
            transports::tcp::listen(direct_listen, &config.tcp.options()).map_err(|source| {
                NodeError::DirectListen {
                    address: direct_listen,
                    source,
                }
            })?;
        let bound = listener
            .local_addr()
            .map_err(|source| NodeError::DirectListen {
                address: direct_listen,
                source,
            })?;
        hello.direct_addr = Some(match config.node.direct_advertise {
            Some(addr) => addr,
            None if bound.ip().is_unspecified() => {
                let ip = route_to(&config.message_server.addresses)
                    .await
                    .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
                std::net::SocketAddr::new(ip, bound.port())
            }
            None => bound,
        });

        // The node's own metrics listener, bound before connecting so a
        // taken address fails the start, not a later scrape.
        let monitor = match config.node.monitor_listen {
            Some(address) => Some(
                transports::tcp::listen(address, &config.tcp.options())
                    .and_then(|l| {
                        let bound = l.local_addr()?;
                        Ok((l, bound))
                    })
                    .map_err(|source| NodeError::MonitorListen { address, source })?,
            ),
            None => None,
        };

        let heartbeat_at = config
            .node
            .heartbeat_bind
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let heartbeat_socket =
            tokio::net::UdpSocket::bind(heartbeat_at)
                .await
                .map_err(|source| NodeError::HeartbeatListen {
                    address: heartbeat_at,
                    source,
                })?;
        // The built-in service, and those offered from the start, are
        // registered with the node (their inboxes are opened below, before
        // anything is read).
        let interests = Interests {
            groups: self.groups,
            services,
        };
        let (link, welcome) =
            supervisor::connect_first(&config, &credentials, &hello, &interests).await?;
        let max_message = welcome
            .max_message_bytes
            .min(config.limits.max_message_bytes);
        let (queue, mut rx) = out_queue(config.node.queue_frames, config.node.queue_bytes);
        // The application's sends come in bursts: let them share writes.
        rx.coalesce_small_batches();
        rx.chunk_above(config.limits.chunk_bytes);
        // `Low` messages fill the sockets to the message server no deeper
        // than a window ahead of the more urgent ones.
        rx.window_low(transports::io::LOW_WINDOW_MARKS);
        let role = hello.role;
        let address = link.address.clone();
        let rt = Runtime::new(Parts {
            hello,
            groups: interests.groups,
            config,
            server_max: max_message,
            queue,
            members: welcome.members,
            server_index: link.index,
            credentials,
            permissions,
            recovery,
        });
        crate::tune::start(&rt)?;
        let mut inboxes = std::collections::HashMap::new();
        let capacity = rt.config.node.inbox_capacity;
        for (service, options) in &self.services {
            let inbox = open_inbox(
                &rt,
                service,
                capacity,
                crate::services::WhenFull::Wait,
                options.ack,
            )?;
            inboxes.insert(service.clone(), inbox);
        }
        let span = tracing::info_span!("node", id = %self.id, incarnation);
        tracing::info!(parent: &span, %address, "node connected to the message server");
        if rt.config.cluster.credentials.is_none() && !rt.config.tls.enabled() {
            tracing::warn!(parent: &span, "no cluster.credentials: any client that reaches this node's direct port can say hello");
        }
        rt.tasks
            .spawn(supervisor::supervise(rt.clone(), rx, link).instrument(span.clone()));
        rt.tasks
            .spawn(direct::accept_loop(rt.clone(), listener).instrument(span.clone()));
        rt.tasks
            .spawn(supervisor::heartbeats(rt.clone(), heartbeat_socket).instrument(span.clone()));
        rt.tasks
            .spawn(direct::idle_sweeper(rt.clone()).instrument(span.clone()));
        if rt.recovery.is_some() {
            rt.tasks
                .spawn(rt.clone().redeliver().instrument(span.clone()));
            rt.tasks
                .spawn(rt.clone().store_receipts().instrument(span.clone()));
            rt.tasks
                .spawn(rt.clone().watch_recoverable().instrument(span.clone()));
            rt.tasks
                .spawn(rt.clone().dispatch_recoverable().instrument(span.clone()));
        }
        let monitor_addr = monitor.map(|(listener, bound)| {
            tracing::info!(parent: &span, "node metrics at http://{bound}/metrics");
            rt.tasks
                .spawn(crate::monitor::serve(rt.clone(), listener).instrument(span.clone()));
            bound
        });
        if role == Role::Dispatcher {
            rt.tasks
                .spawn(routing::session_keeper(rt.clone()).instrument(span));
        }
        let mut node = Node::from_runtime(rt);
        node.monitor_addr = monitor_addr;
        node.offered = std::sync::Arc::new(std::sync::Mutex::new(inboxes));
        Ok(node)
    }
}

/// The local address that routes to the first resolvable message server
/// (no packet is sent: a UDP socket is only connected).
async fn route_to(addresses: &[String]) -> Option<std::net::IpAddr> {
    for address in addresses {
        let Ok(mut resolved) = tokio::net::lookup_host(address).await else {
            continue;
        };
        let Some(target) = resolved.next() else {
            continue;
        };
        let unspecified: std::net::SocketAddr = if target.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(socket) = tokio::net::UdpSocket::bind(unspecified).await else {
            continue;
        };
        if socket.connect(target).await.is_ok() {
            if let Ok(local) = socket.local_addr() {
                return Some(local.ip());
            }
        }
    }
    None
}

/// The address this node's heartbeats should leave from when the
/// config gives the server's heartbeat address (`cluster.heartbeat_listen`,
/// a specific IP) but not the node's own (`node.heartbeat_bind` unset or
/// unspecified): the one that routes to it, if it is not the one that
/// routes to the message server (then the connection's address serves).
async fn heartbeat_route(config: &Config) -> Option<std::net::IpAddr> {
    if config
        .node
        .heartbeat_bind
        .is_some_and(|a| !a.ip().is_unspecified())
    {
        return None;
    }
    let listen = config
        .cluster
        .heartbeat_listen
        .filter(|a| !a.ip().is_unspecified())?;
    let heartbeats = route_to(&[listen.to_string()]).await?;
    let connection = route_to(&config.message_server.addresses).await;
    (connection != Some(heartbeats)).then_some(heartbeats)
}

/// Opens the node's store if `node.data_dir` is set (see
/// [`crate::recovery`]); logs what a salvage could not keep.
async fn open_store(
    config: &Config,
) -> Result<Option<std::sync::Arc<crate::recovery::Recovery>>, NodeError> {
    let Some(dir) = config.node.data_dir.clone() else {
        return Ok(None);
    };
    let on_damage = match config.node.store_on_damage {
        cluster_config::StoreOnDamage::Refuse => clustercomm_store::OnDamage::Refuse,
        cluster_config::StoreOnDamage::Salvage => clustercomm_store::OnDamage::Salvage,
    };
    let opened =
        tokio::task::spawn_blocking(move || clustercomm_store::Store::open(&dir, on_damage))
            .await
            .map_err(|e| clustercomm_store::StoreError::Write {
                path: config.node.data_dir.clone().unwrap_or_default(),
                detail: format!("the thread opening the store failed: {e}"),
            })??;
    if let Some(damage) = &opened.damage {
        tracing::error!(path = %opened.store.path().display(), %damage, "the node's store was damaged; started with what was intact");
    }
    let contents = opened.contents;
    tracing::info!(
        path = %opened.store.path().display(),
        outgoing = contents.outgoing.len(),
        incoming = contents.incoming.len(),
        "node store opened"
    );
    Ok(Some(std::sync::Arc::new(crate::recovery::Recovery::new(
        opened.store,
        contents,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    /// The environment overrides the file, as for the binary; what is set
    /// on the builder overrides both.
    #[test]
    fn the_environment_is_layered_between_the_file_and_the_builder() {
        let vars = [
            ("CLUSTERCOMM_CLUSTER", "from-env"),
            ("CLUSTERCOMM_MESSAGE_SERVER", "10.0.0.1:7400, 10.0.0.2:7400"),
        ];
        let builder = Node::builder("n");
        let config = builder.layered_config(env(&vars)).expect("valid");
        assert_eq!(config.cluster.name, "from-env");
        assert_eq!(
            config.message_server.addresses,
            ["10.0.0.1:7400", "10.0.0.2:7400"]
        );

        let config = Node::builder("n")
            .message_server("127.0.0.1:1")
            .layered_config(env(&vars))
            .expect("valid");
        assert_eq!(config.cluster.name, "from-env");
        assert_eq!(config.message_server.addresses, ["127.0.0.1:1"]);

        let config = Node::builder("n")
            .ignore_environment()
            .layered_config(env(&vars))
            .expect("valid");
        assert_eq!(config.cluster.name, Config::default().cluster.name);
    }

    /// A bad value in the environment is an error naming the variable.
    #[test]
    fn a_bad_environment_value_names_the_variable() {
        let vars = [("CLUSTERCOMM_LISTEN", "not an address")];
        let err = Node::builder("n")
            .layered_config(env(&vars))
            .expect_err("refused");
        let mut chain = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(e) = source {
            chain.push_str(&format!(": {e}"));
            source = e.source();
        }
        assert!(chain.contains("CLUSTERCOMM_LISTEN"), "{chain}");
    }
}
